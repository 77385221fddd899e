"""Fixed maze splits as a TFDS dataset ("maxrl_maze"), written as ArrayRecord and read without TensorFlow.

Training draws fresh mazes every step (`maze.generate_mazes`); this dataset holds the fixed mazes that must be
the same in every run: the held-out test mazes (the paper's 256) and, if wanted, a fixed training pool.

    grids_PxSxS = load_maze_split("/tmp/tfds", size=17, split="test", num_examples=256)

builds the dataset under `data_dir` on first use (`download_and_prepare(file_format="array_record")`; nothing
is downloaded) and reads it through `builder.as_data_source()`, a random-access ArrayRecord reader that needs
only `tensorflow_datasets` and `array_record`, not TensorFlow.

Content. Config `size{S}_train{T}_test{E}` holds T train and E test mazes of side S. Maze i of a split is
`maze.generate_maze(fold_in(fold_in(fold_in(key(DATASET_SEED), S), split_id), i), S)` with split_id 0 for
train and 1 for test, so test maze i does not depend on T or E (a config with fewer examples holds a
prefix of a larger one) and the splits use keys that a trainer seeding `generate_mazes` from `config.seed` does not
produce by accident. The train split never contains a test maze: a train draw equal to one of the config's
E test mazes is redrawn from `fold_in(key_i, attempt)` (so train maze i depends on E, and only where the first
draw was a test maze). Examples are stored in index order (shuffling disabled). Features:

    grid: uint8 [S, S], 1 = wall, 0 = free (start (1, 1), goal (S-2, S-2));
    shortest_path_length: int32, moves of the BFS shortest path;
    index: int32, the maze's index i in its split.

The prepared files are the source of truth: generation goes through JAX's PRNG, so regenerating with a
different JAX release could in principle give other mazes; bump VERSION if generation ever changes.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from maxrl_jax.tasks.maze import env as maze

DATASET_NAME = "maxrl_maze"
DATASET_SEED = 20260202
DEFAULT_NUM_TRAIN = 8192
DEFAULT_NUM_TEST = 256
SPLIT_IDS = {"train": 0, "test": 1}
_CHUNK = 512  # mazes generated per jitted call while preparing


def config_name(size: int, num_train: int, num_test: int) -> str:
    """The BuilderConfig name of a maze size and split sizes, e.g. 'size17_train8192_test256'."""
    return f"size{size}_train{num_train}_test{num_test}"


@dataclasses.dataclass(eq=False)
class MazeConfig(tfds.core.BuilderConfig):
    """A maze side and the number of mazes in each split. Build it with `maze_config`."""

    size: int = maze.PAPER_MAZE_SIZE
    num_train: int = DEFAULT_NUM_TRAIN
    num_test: int = DEFAULT_NUM_TEST


def _check_count(value, what: str, allow_zero: bool) -> int:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{what} must be an int >= {low}, got {value!r}.")
    return int(value)


def maze_config(size: int, num_train: int = DEFAULT_NUM_TRAIN, num_test: int = DEFAULT_NUM_TEST) -> MazeConfig:
    """A validated `MazeConfig` named by `config_name`."""
    size = maze.check_maze_size(size)
    # TFDS cannot write an empty split ("No examples were yielded"), so each split holds at least one maze.
    num_train = _check_count(num_train, "num_train", allow_zero=False)
    num_test = _check_count(num_test, "num_test", allow_zero=False)
    return MazeConfig(
        name=config_name(size, num_train, num_test),
        description=f"{num_train} train and {num_test} test randomised-Prim mazes of side {size}.",
        size=size,
        num_train=num_train,
        num_test=num_test,
    )


def split_key(size: int, split: str) -> jax.Array:
    """The PRNG key of a split; maze i of the split uses `fold_in(split_key(size, split), i)`."""
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}.")
    key = jax.random.fold_in(jax.random.key(DATASET_SEED), maze.check_maze_size(size))
    return jax.random.fold_in(key, SPLIT_IDS[split])


@functools.partial(jax.jit, static_argnames=("size",))
def _mazes_and_lengths(key: jax.Array, indices: jax.Array, size: int, excluded: jax.Array
                       ) -> tuple[jax.Array, jax.Array]:
    """Mazes int8 [C, S, S] for maze indices [C] of the split with key `key`, and their path lengths [C].

    Mazes whose hash is in the sorted table `excluded` are redrawn (`maze.draw_training_mazes_from_keys`).
    """
    keys = jax.vmap(lambda index: jax.random.fold_in(key, index))(indices)
    grids, _ = maze.draw_training_mazes_from_keys(keys, size, excluded)
    _, lengths = maze.shortest_path_actions_batch(grids)
    return grids, lengths


def split_mazes(size: int, split: str, num_examples: int, excluded=None) -> tuple[np.ndarray, np.ndarray]:
    """Generates mazes 0..num_examples-1 of a split: grids int8 [n, S, S] and path lengths int32 [n].

    `excluded`: optional mazes [M, S, S] the split must not contain (the builder passes the test split when
    it writes the train split); each maze of the split that is one of them is redrawn from its own key.
    This is what the builder writes; `load_maze_split` reads the written copy.
    """
    num_examples = _check_count(num_examples, "num_examples", allow_zero=True)
    key = split_key(size, split)
    table = jnp.asarray(maze.hash_table(excluded) if excluded is not None and len(excluded)
                        else np.zeros((0,), np.uint32))
    grids, lengths = [], []
    for start in range(0, num_examples, _CHUNK):
        indices = jnp.arange(start, start + _CHUNK, dtype=jnp.uint32)  # fixed shape: one compilation
        chunk_grids, chunk_lengths = _mazes_and_lengths(key, indices, size, table)
        count = min(_CHUNK, num_examples - start)
        grids.append(np.asarray(chunk_grids)[:count])
        lengths.append(np.asarray(chunk_lengths)[:count])
    if not grids:
        return np.zeros((0, size, size), np.int8), np.zeros((0,), np.int32)
    return np.concatenate(grids), np.concatenate(lengths)


class MaxrlMaze(tfds.core.GeneratorBasedBuilder):
    """Randomised-Prim mazes with fixed seeds; one config per (size, train size, test size)."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Initial release: Prim mazes from JAX keys, grid/shortest_path_length/index.",
        "1.1.0": "The train split excludes the test split's mazes (a train draw equal to a test maze is redrawn).",
    }
    BUILDER_CONFIGS = [maze_config(maze.PAPER_MAZE_SIZE), maze_config(9)]
    DEFAULT_CONFIG_NAME = config_name(maze.PAPER_MAZE_SIZE, DEFAULT_NUM_TRAIN, DEFAULT_NUM_TEST)
    # TFDS 4.9.10 works out `code_path` for a builder defined in a package through
    # `importlib_resources.abc.Traversable`, but declares `importlib_resources` only for Python < 3.9, so
    # `download_and_prepare` fails with "No module named 'importlib_resources'" where it is not installed
    # (tensorflow/datasets issue #11212). Giving the path directly skips that lookup; TFDS only uses it to look
    # for a checksums file beside this module (there is none: nothing is downloaded).
    code_path = epath.Path(__file__)

    def __init__(self, *args, **kwargs):
        # Configs are made from the run's config (`maze_config`), so TFDS's "Using custom data configuration"
        # warning would fire on every normal run; it is dropped while the builder is constructed.
        import logging  # pylint: disable=import-outside-toplevel

        def drop(record):
            return not str(record.msg).startswith("Using custom data configuration")

        absl_logger = logging.getLogger("absl")
        absl_logger.addFilter(drop)
        try:
            super().__init__(*args, **kwargs)
        finally:
            absl_logger.removeFilter(drop)

    # The mazes are generated here, nothing is downloaded: TFDS's banner ("Downloading and preparing dataset
    # Unknown size ...") and its "downloaded and prepared" line would be wrong, so neither is printed.
    def _log_download_bytes(self) -> None:
        pass

    def _log_download_done(self) -> None:
        pass

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly: `dataset_info_from_configs` would read README/CITATIONS files from this
        # module's package directory, which this builder does not have.
        size = self.builder_config.size
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "grid": tfds.features.Tensor(shape=(size, size), dtype=np.uint8),
                    "shortest_path_length": tfds.features.Scalar(dtype=np.int32),
                    "index": tfds.features.Scalar(dtype=np.int32),
                }
            ),
            disable_shuffling=True,
            homepage="https://arxiv.org/abs/2602.02710",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        config = self.builder_config
        test_grids, _ = split_mazes(config.size, "test", config.num_test)
        return {
            # The train split never holds a test maze: such a draw is redrawn from the maze's own key.
            "train": self._generate_examples(config.size, "train", config.num_train, excluded=test_grids),
            "test": self._generate_examples(config.size, "test", config.num_test),
        }

    def _generate_examples(self, size: int, split: str, num_examples: int, excluded=None):
        grids, lengths = split_mazes(size, split, num_examples, excluded)
        for index in range(num_examples):
            yield index, {
                "grid": grids[index].astype(np.uint8),
                "shortest_path_length": np.int32(lengths[index]),
                "index": np.int32(index),
            }


def maze_builder(
    data_dir: str | os.PathLike,
    size: int,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
    *,
    prepare: bool = True,
) -> MaxrlMaze:
    """The ArrayRecord builder of a config under `data_dir`; with `prepare`, generated and written if missing."""
    config = maze_config(size, num_train, num_test)
    # TFDS refuses a config instance named like a registered one, so registered configs go by name.
    registered = {registered.name for registered in MaxrlMaze.BUILDER_CONFIGS}
    builder = MaxrlMaze(
        data_dir=os.fspath(data_dir),
        config=config.name if config.name in registered else config,
        file_format="array_record",
    )
    if prepare:
        builder.download_and_prepare(file_format="array_record")
    return builder


def load_maze_split_arrays(
    data_dir: str | os.PathLike,
    size: int,
    split: str,
    num_examples: int | None = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
) -> dict[str, np.ndarray]:
    """The first `num_examples` (default: all) mazes of a split as arrays, building the dataset if missing.

    Returns {"grid": int8 [n, S, S] (1 = wall), "shortest_path_length": int32 [n], "index": int32 [n]}.
    """
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}.")
    split_size = num_train if split == "train" else num_test
    if num_examples is None:
        num_examples = split_size
    num_examples = _check_count(num_examples, "num_examples", allow_zero=True)
    if num_examples > split_size:
        raise ValueError(
            f"asked for {num_examples} {split} mazes but the config holds {split_size}; "
            f"pass num_{split}={num_examples} or more."
        )
    builder = maze_builder(data_dir, size, num_train, num_test)
    source = builder.as_data_source(split=split)
    records = source.__getitems__(list(range(num_examples))) if num_examples else []
    size = maze.check_maze_size(size)
    arrays = {
        "grid": np.stack([np.asarray(r["grid"]) for r in records]).astype(np.int8)
        if records
        else np.zeros((0, size, size), np.int8),
        "shortest_path_length": np.asarray([r["shortest_path_length"] for r in records], np.int32),
        "index": np.asarray([r["index"] for r in records], np.int32),
    }
    if not np.array_equal(arrays["index"], np.arange(num_examples)):
        raise ValueError(f"{builder.data_dir} holds mazes out of index order; delete it and rebuild.")
    return arrays


def load_maze_split(
    data_dir: str | os.PathLike,
    size: int,
    split: str,
    num_examples: int | None = None,
    *,
    num_train: int = DEFAULT_NUM_TRAIN,
    num_test: int = DEFAULT_NUM_TEST,
) -> np.ndarray:
    """Grids int8 [num_examples, S, S] (1 = wall) of a fixed split, building the dataset under `data_dir` if
    missing. `split` is "train" or "test"; the config (and its directory) is `config_name(size, num_train,
    num_test)`, and `num_examples` (default: the whole split) must not exceed that split's size."""
    return load_maze_split_arrays(
        data_dir, size, split, num_examples, num_train=num_train, num_test=num_test
    )["grid"]
