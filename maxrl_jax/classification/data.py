"""Data for the classification testbed: TFDS data sources (ArrayRecord, no TensorFlow) and a procedural default.

Any TFDS image classification dataset with an `image` (uint8 [H, W, C]) and a `label` (ClassLabel) feature
can be used once it is prepared in the ArrayRecord format (mnist, cifar10, cifar100, imagenet2012, ...). It
is read with `builder.as_data_source(split)`: random access, no TensorFlow, no tf.data.

`procedural_classes` is the embedded default. It needs no download: `download_and_prepare` draws it from fixed
seeds (a few seconds) and writes ArrayRecord files into the data dir like any other TFDS dataset. Every class
has a smooth random 16x16 prototype (a random low-frequency Fourier field); an example is its prototype
circularly shifted by up to `max_shift` pixels, times a random contrast, plus a faint copy of another random
class's prototype (a distractor) and pixel noise. With 200 classes (config `c200`, the default) a uniform
policy has pass rate 1/200 = 0.5%, the hard regime of the paper's ImageNet study at laptop scale; `c1000`
has ImageNet's 1000 classes (pass rate 0.1%).

Splits are read either into host memory (small datasets, storage 'memory') or streamed by index with a thread pool
(ImageNet); both give uint8 batches `image [B, H, W, C]`, `label [B]` for the same index arrays. The float
conversion, normalisation and augmentations that need randomness run on the device in the train step
(`device_preprocess`). Host-side resizing (variable-size images such as ImageNet) uses PIL.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

PROCEDURAL_NAME = "procedural_classes"

# Per-channel normalisation (mean, std) of pixel values in [0, 1]; other datasets default to (0.5, 0.25).
_NORMALIZATION = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    PROCEDURAL_NAME: ((0.5,), (0.2,)),
}

AUGMENTATIONS = ("none", "flip", "crop_flip", "inception_crop")
STORAGES = ("auto", "memory", "stream")


class DatasetNotPreparedError(FileNotFoundError):
  """A TFDS dataset was asked for but is not prepared (in the ArrayRecord format) in the data dir."""


# ----------------------------------------------------------------------------------------------------------
# The procedural dataset.


@dataclasses.dataclass(eq=False)
class ProceduralConfig(tfds.core.BuilderConfig):
  """Shape and difficulty of a procedural dataset variant (all draws come from fixed seeds)."""

  num_classes: int = 200
  image_size: int = 16
  train_per_class: int = 100
  test_per_class: int = 20
  max_freq: int = 3
  max_shift: int = 2
  noise: float = 1.2
  distractor: float = 0.6
  seed: int = 0


def procedural_prototypes(num_classes: int, image_size: int, max_freq: int, seed: int) -> np.ndarray:
  """[num_classes, S, S] float64 smooth random fields (zero mean, unit std), one per class."""
  rng = np.random.default_rng(seed)
  yy, xx = np.meshgrid(np.arange(image_size), np.arange(image_size), indexing="ij")
  fields = np.zeros((num_classes, image_size, image_size))
  for fy in range(-max_freq, max_freq + 1):
    for fx in range(0, max_freq + 1):
      if fx == 0 and fy <= 0:  # Skip the constant and the mirror-image duplicates.
        continue
      phase = 2 * np.pi * (fy * yy + fx * xx) / image_size
      cos_coef = rng.normal(size=(num_classes, 1, 1))
      sin_coef = rng.normal(size=(num_classes, 1, 1))
      fields += cos_coef * np.cos(phase) + sin_coef * np.sin(phase)
  fields -= fields.mean(axis=(1, 2), keepdims=True)
  fields /= fields.std(axis=(1, 2), keepdims=True)
  return fields


def procedural_examples(cfg: ProceduralConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The fixed examples of a split: uint8 images [n, S, S, 1] and int64 labels [n] (class-major order)."""
  if split not in ("train", "test"):
    raise ValueError(f"procedural split {split!r}; allowed: 'train', 'test'.")
  protos = procedural_prototypes(cfg.num_classes, cfg.image_size, cfg.max_freq, cfg.seed)
  per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
  rng = np.random.default_rng([cfg.seed, 1 if split == "train" else 2])
  labels = np.repeat(np.arange(cfg.num_classes), per_class)
  n = labels.size
  shifts = rng.integers(-cfg.max_shift, cfg.max_shift + 1, size=(n, 2))
  contrast = rng.uniform(0.6, 1.4, size=(n, 1, 1))
  distractors = rng.integers(0, cfg.num_classes, size=n)
  noise = rng.normal(size=(n, cfg.image_size, cfg.image_size))
  images = np.empty((n, cfg.image_size, cfg.image_size))
  for i in range(n):
    images[i] = np.roll(protos[labels[i]], tuple(shifts[i]), axis=(0, 1))
  images = contrast * images + cfg.distractor * protos[distractors] + cfg.noise * noise
  images = np.clip(np.round(128.0 + 40.0 * images), 0, 255).astype(np.uint8)[..., None]
  return images, labels.astype(np.int64)


class ProceduralClasses(tfds.core.GeneratorBasedBuilder):
  """Procedurally drawn image classes with fixed splits; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      ProceduralConfig(name="c200", description="200 classes, 100 train / 20 test per class, 16x16x1."),
      ProceduralConfig(name="c1000", description="1000 classes (ImageNet's count), 50 train / 10 test per "
                       "class, 16x16x1.", num_classes=1000, train_per_class=50, test_per_class=10),
      ProceduralConfig(name="c100", description="100 classes, 50 train / 10 test per class, 16x16x1 (small, "
                       "for tests).", num_classes=100, train_per_class=50, test_per_class=10),
  ]
  DEFAULT_CONFIG_NAME = "c200"

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS's default probes `importlib_resources` (a backport that may not be installed) for package-relative
    # paths; this module's own file is what it would find.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedurally drawn image classes (maxrl_jax): smooth random class prototypes, shifted, "
                    "rescaled, mixed with a distractor class and noised; fixed seeds and splits.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(cfg.image_size, cfg.image_size, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=cfg.num_classes),
        }),
        supervised_keys=("image", "label"),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

  # Nothing is downloaded: TFDS's banner ("Downloading and preparing dataset Unknown size ...") and its
  # "downloaded and prepared" line would be wrong here, so neither is printed.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def _generate_examples(self, split: str):
    images, labels = procedural_examples(self.builder_config, split)
    for i in range(labels.size):
      yield i, {"image": images[i], "label": int(labels[i])}


# ----------------------------------------------------------------------------------------------------------
# Loading.


@dataclasses.dataclass
class Split:
  """One split: either arrays in host memory or a random-access TFDS data source.

  Attributes:
    images: uint8 [n, H, W, C] when in memory, else None.
    labels: int32 [n] (always in memory; labels are small).
    source: the TFDS data source when streamed, else None.
    image_size: output side length for streamed variable-size images (None: stored size).
    num_workers: threads used to decode/resize streamed images.
  """

  images: np.ndarray | None
  labels: np.ndarray
  source: Any = None
  image_size: int | None = None
  num_workers: int = 8

  def __len__(self) -> int:
    return int(self.labels.shape[0])

  def get_batch(self, indices: np.ndarray, train: bool, rng: np.random.Generator | None = None) -> dict:
    """uint8 images [B, H, W, C] and int32 labels [B] for the given example indices."""
    indices = np.asarray(indices)
    if self.images is not None:
      return {"image": self.images[indices], "label": self.labels[indices]}
    records = _get_records(self.source, [int(i) for i in indices])
    seeds = (rng.integers(0, 2**31 - 1, size=len(records)) if rng is not None
             else np.zeros(len(records), np.int64))

    def prepare(item):
      record, seed = item
      image = np.asarray(record["image"])
      if self.image_size is None:
        return image
      return resize_for_model(image, self.image_size, train, np.random.default_rng(seed))

    with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
      images = list(pool.map(prepare, zip(records, seeds)))
    return {"image": np.stack(images), "label": self.labels[indices]}


@dataclasses.dataclass
class ClassificationData:
  """The train and held-out splits of a dataset plus what the model needs to know about them."""

  name: str
  train: Split
  eval: Split
  num_classes: int
  image_shape: tuple[int, int, int]
  mean: tuple[float, ...]
  std: tuple[float, ...]


def _get_records(source, keys: list[int]) -> list:
  """Batched random access; falls back to one record at a time for sources without it (TFDS mocks)."""
  try:
    return source.__getitems__(keys)
  except TypeError:
    return [source[k] for k in keys]


def _read_labels(source) -> np.ndarray:
  labels = np.empty(len(source), np.int32)
  for start in range(0, len(source), 4096):
    stop = min(start + 4096, len(source))
    for i, record in enumerate(_get_records(source, list(range(start, stop)))):
      labels[start + i] = int(record["label"])
  return labels


def _read_all(source) -> tuple[np.ndarray, np.ndarray]:
  images, labels = [], []
  for start in range(0, len(source), 4096):
    records = _get_records(source, list(range(start, min(start + 4096, len(source)))))
    images.extend(np.asarray(r["image"]) for r in records)
    labels.extend(int(r["label"]) for r in records)
  shapes = {im.shape for im in images}
  if len(shapes) > 1:
    raise ValueError(f"images of different shapes {sorted(shapes)[:3]}...; set config.data.image_size and "
                     "config.data.storage='stream' to stream and resize them.")
  return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)


def _not_prepared_message(name: str, data_dir: str | None, cause: str) -> str:
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  manual = ""
  if name.startswith("imagenet2012"):
    manual = (f"\n  imagenet2012 needs a manual download: put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
              f"into {where}/downloads/manual/ first (https://image-net.org).")
  return (
      f"TFDS dataset {name!r} is not prepared in the ArrayRecord format in data_dir={where!r} ({cause}).\n"
      "Prepare it once (encoding the images needs `pip install tensorflow` on the preparing machine; reading "
      "it here does not):\n"
      f"  tfds build {name} --data_dir={where} --file_format=array_record\n"
      "or, in Python,\n"
      f"  tfds.builder({name!r}, data_dir={where!r}, file_format='array_record').download_and_prepare()\n"
      "If it is already prepared in the TFRecord format, convert it with\n"
      f"  tfds convert_format --dataset_dir={where}/{name.split('/')[0]}/<version> --out_file_format=array_record"
      f"{manual}\n"
      "If it is prepared in another directory (e.g. ~/tensorflow_datasets), pass that directory as "
      "--config.data.data_dir.\n"
      "Or set config.data.name='procedural_classes' for the embedded dataset that needs no download.")


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """tfds.builder with a clear error for unknown names; prepares the procedural dataset when missing."""
  try:
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"config.data.name={name!r} is not a TFDS dataset. Use an image classification dataset such as "
        f"'mnist', 'cifar10', 'cifar100', 'imagenet2012', or the embedded {PROCEDURAL_NAME!r} "
        f"(variants: {[c.name for c in ProceduralClasses.BUILDER_CONFIGS]}).") from e
  # (`builder.is_prepared()` would log a warning about the empty version folder of a new data dir.)
  if name.split("/")[0] == PROCEDURAL_NAME and not (epath.Path(builder.data_dir) / "dataset_info.json").exists():
    if not sys.stderr.isatty():
      tfds.disable_progress_bar()  # Its nested bars would leave cursor-movement codes in a log file.
    builder.download_and_prepare(file_format="array_record")
  return builder


def _open_split(builder, name: str, split: str, data_dir: str | None):
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # TFDS raises KeyError/NotImplementedError/AssertionError depending on the state.
    if not builder.is_prepared():
      raise DatasetNotPreparedError(_not_prepared_message(name, data_dir, f"{type(e).__name__}: {e}")) from e
    available = sorted(builder.info.splits.keys())
    if split.split("[")[0] not in available:
      raise ValueError(f"Split {split!r} of {name!r} does not exist; available: {available}. Set "
                       "config.data.train_split / config.data.eval_split.") from e
    raise DatasetNotPreparedError(_not_prepared_message(name, data_dir, f"{type(e).__name__}: {e}")) from e


def _check_features(builder, name: str) -> int:
  features = builder.info.features
  if "image" not in features or "label" not in features:
    raise ValueError(f"Dataset {name!r} has features {list(features.keys())}; the classification testbed "
                     "needs an 'image' and a 'label' feature.")
  num_classes = getattr(features["label"], "num_classes", None)
  if not num_classes:
    raise ValueError(f"Dataset {name!r}: 'label' is not a ClassLabel with num_classes.")
  return int(num_classes)


def load_data(data_config: ml_collections.ConfigDict,
              default_data_dir: str | None = None) -> ClassificationData:
  """Opens the train and eval splits named by the config (see configs/classification.py, block `data`).

  The TFDS data dir is `data_config.data_dir`, else `default_data_dir` (the trainer passes <workdir>/tfds),
  else TFDS's own default ($TFDS_DATA_DIR or ~/tensorflow_datasets).

  Raises:
    ValueError: unknown dataset or split, or features that are not (image, label).
    DatasetNotPreparedError: a real dataset that is not prepared as ArrayRecord in the data dir (the message
      says how to prepare it).
  """
  name = data_config.name
  data_dir = data_config.get("data_dir") or default_data_dir or None
  if data_dir:
    data_dir = os.path.expanduser(data_dir)
  builder = get_builder(name, data_dir)
  num_classes = _check_features(builder, name)
  sources = {s: _open_split(builder, name, getattr(data_config, s), data_dir)
             for s in ("train_split", "eval_split")}
  image_size = data_config.get("image_size") or None
  storage = data_config.get("storage", "auto")
  if storage not in STORAGES:
    raise ValueError(f"config.data.storage={storage!r}; allowed: {list(STORAGES)}.")
  if storage == "auto":
    in_memory = image_size is None and len(sources["train_split"]) <= int(data_config.get(
        "max_in_memory_examples", 300_000))
  else:
    in_memory = storage == "memory"
  splits = {}
  for key, source in sources.items():
    if in_memory:
      images, labels = _read_all(source)
      splits[key] = Split(images, labels)
    else:
      if image_size is None:
        raise ValueError(f"config.data.storage='stream' streams {name!r}: set config.data.image_size so "
                         "batches have one shape.")
      splits[key] = Split(None, _read_labels(source), source, int(image_size),
                          int(data_config.get("num_workers", 8)))
  if in_memory:
    image_shape = tuple(splits["train_split"].images.shape[1:])
  else:
    channels = builder.info.features["image"].shape[-1] or 3
    image_shape = (int(image_size), int(image_size), int(channels))
  base = name.split("/")[0].split(":")[0]
  default_mean, default_std = _NORMALIZATION.get(base, ((0.5,), (0.25,)))
  mean = tuple(data_config.get("mean") or default_mean)
  std = tuple(data_config.get("std") or default_std)
  if len(mean) not in (1, image_shape[-1]) or len(std) not in (1, image_shape[-1]):
    raise ValueError(f"config.data.mean/std have {len(mean)}/{len(std)} entries for {image_shape[-1]} "
                     "channels.")
  return ClassificationData(name, splits["train_split"], splits["eval_split"], num_classes, image_shape,
                            mean, std)


# ----------------------------------------------------------------------------------------------------------
# Batching (host) and preprocessing (device).


def train_batch_indices(step: int, num_examples: int, batch_size: int, seed: int) -> np.ndarray:
  """Example indices of training step `step`: epochs of a seeded permutation, remainder dropped.

  A pure function of (step, seed), so a resumed run sees exactly the batches of an uninterrupted one.
  """
  steps_per_epoch = num_examples // batch_size
  epoch, offset = divmod(step, steps_per_epoch)
  perm = _epoch_permutation(seed, epoch, num_examples)
  return perm[offset * batch_size:(offset + 1) * batch_size]


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  key = (seed, epoch, num_examples)
  if key not in _PERM_CACHE:
    _PERM_CACHE.clear()  # Only the current epoch is needed.
    _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return _PERM_CACHE[key]


def eval_index_batches(num_examples: int, batch_size: int, limit: int | None = None,
                       seed: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
  """Fixed evaluation batches: (indices [B], valid mask [B]) with the last batch padded by index 0.

  With `seed` a fixed random subset of `limit` examples is used (for the train-split evaluation); without
  it the first `limit` examples (all when None).
  """
  n = num_examples if limit is None else min(int(limit), num_examples)
  if seed is None:
    chosen = np.arange(n)
  else:
    chosen = np.sort(np.random.default_rng([seed, 7]).permutation(num_examples)[:n])
  batches = []
  for start in range(0, n, batch_size):
    idx = chosen[start:start + batch_size]
    valid = np.ones(batch_size, bool)
    valid[idx.size:] = False
    batches.append((np.concatenate([idx, np.zeros(batch_size - idx.size, idx.dtype)]), valid))
  return batches


def resize_for_model(image: np.ndarray, size: int, train: bool, rng: np.random.Generator) -> np.ndarray:
  """Host-side geometry for variable-size images, with PIL.

  Train: random-resized crop (area 8%-100%, aspect 3/4-4/3) to size x size. Eval: resize the short side to
  size * 256/224 and take the centre size x size crop (the standard ImageNet protocol).
  """
  from PIL import Image  # Imported lazily: only streamed datasets need it.

  height, width = image.shape[:2]
  squeeze = image.ndim == 3 and image.shape[-1] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  if train:
    area = height * width
    for _ in range(10):
      target = area * rng.uniform(0.08, 1.0)
      aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
      w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
      if 0 < w <= width and 0 < h <= height:
        top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        break
    else:
      side = min(height, width)
      h = w = side
      top, left = (height - side) // 2, (width - side) // 2
    pil = pil.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  else:
    short = int(round(size * 256 / 224))
    scale = short / min(height, width)
    new_w, new_h = max(size, int(round(width * scale))), max(size, int(round(height * scale)))
    pil = pil.resize((new_w, new_h), Image.BILINEAR)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    pil = pil.crop((left, top, left + size, top + size))
  out = np.asarray(pil, np.uint8)
  return out[..., None] if out.ndim == 2 else out


def device_preprocess(images_BxHxWxC: jax.Array, key: jax.Array | None, *, mean: Sequence[float],
                      std: Sequence[float], augment: str = "none", train: bool = False) -> jax.Array:
  """uint8 images -> normalised float32 images on the device, with random augmentation when training.

  Args:
    images_BxHxWxC: uint8 images.
    key: PRNG key for the augmentation (unused when augment == 'none' or not train).
    mean, std: per-channel statistics of pixel values in [0, 1] (length 1 or C).
    augment: 'none'; 'flip' (random horizontal flip); 'crop_flip' (zero-pad 4 pixels, random crop back, flip;
      the CIFAR recipe); 'inception_crop' (the crop was done on the host, so only the flip is left here).
    train: augment only when True.

  Returns:
    float32 [B, H, W, C].
  """
  x = images_BxHxWxC.astype(jnp.float32) / 255.0
  if train and augment != "none":
    flip_key, crop_key = jax.random.split(key)
    batch, height, width = x.shape[:3]
    if augment == "crop_flip":
      pad = 4
      padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
      offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * pad + 1)
      x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (height, width, x.shape[3])))(
          padded, offsets)
    flips = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    x = jnp.where(flips, x[:, :, ::-1, :], x)
  mean_arr = jnp.asarray(mean, jnp.float32)
  std_arr = jnp.asarray(std, jnp.float32)
  return (x - mean_arr) / std_arr


__all__ = ["ProceduralClasses", "ProceduralConfig", "procedural_examples", "procedural_prototypes",
           "DatasetNotPreparedError", "ClassificationData", "Split", "load_data", "get_builder",
           "train_batch_indices", "eval_index_batches", "device_preprocess", "resize_for_model",
           "AUGMENTATIONS", "PROCEDURAL_NAME"]
