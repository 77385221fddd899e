"""Per-input gradient norm against pass rate, for cross-entropy and sampled objectives (as in the paper's
ImageNet study).

For a trained checkpoint and a set of inputs x_1..x_n this computes, for each objective, the L2 norm of the
gradient (over all parameters) of that input's own loss, ||grad_theta loss(x_i)||, with one vmapped
per-example gradient (`estimators.per_prompt_gradient_norms`), and the input's pass rate p_i. Population
weights predict the picture: grad J = w(p) grad p with w = 1/p for CE, about 1/p for MaxRL with large N
(until no rollout succeeds), about 1/sqrt(p(1-p)) for GRPO, 1 for REINFORCE.

The forward pass uses eval mode (batch-norm running averages), so an input's gradient does not depend on
which other inputs are in the batch. Sampled objectives draw N rollouts per input once, from the checkpoint's
own softmax; their norms are therefore random (in particular 0 whenever no rollout succeeds).

    python scripts/grad_norm_analysis.py --workdir=RUN_DIR [--num_examples=1000 --num_samples=1024]
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxrl_jax import estimators
from maxrl_jax.classification import data as data_lib
from maxrl_jax.classification import models
from maxrl_jax.classification import objectives
from maxrl_jax import checkpoints
from maxrl_jax.classification import steps as steps_lib

DEFAULT_OBJECTIVES = ("cross_entropy", "maxrl", "grpo", "reinforce")


def load_run(workdir: str, data_dir: str | None = None):
  """(config, data, model, params, batch_stats) of a run's workdir (config.json + latest checkpoint)."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  if data_dir is not None:
    config.data.data_dir = data_dir
  data = data_lib.load_data(config.data, default_data_dir=os.path.join(workdir, "tfds"))
  model = models.create_model(config.model, data.num_classes)
  tx, _ = steps_lib.make_optimizer(config.optim, num_steps=2, steps_per_epoch=1)  # Only its structure.
  checkpointer = checkpoints.PhaseCheckpointer(workdir, steps_lib.CHECKPOINT_PHASE, config.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is None:
    raise FileNotFoundError(f"No checkpoint under {workdir}/checkpoints/{steps_lib.CHECKPOINT_PHASE}; run "
                            "train_and_evaluate with this workdir first.")
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # An analysis runs on one device.
  template = jax.eval_shape(lambda: steps_lib.create_train_state(model, tx, data.image_shape,
                                                                 jax.random.key(0)))
  template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), template)
  state = checkpointer.restore(latest, template)
  checkpointer.close()
  return config, data, model, state.params, state.batch_stats


def per_input_gradient_norms(model, params, batch_stats, images_uint8: np.ndarray, labels: np.ndarray,
                             objective: objectives.Objective, key: jax.Array, preprocess_kwargs: dict,
                             chunk_size: int = 256) -> np.ndarray:
  """[n] float32 norms ||grad_params loss(x_i)||_2 of each input's own loss under `objective`.

  Args:
    model, params, batch_stats: the classifier (evaluated in eval mode).
    images_uint8: [n, H, W, C] uint8 inputs; labels: [n] int labels.
    objective: cross_entropy or a sampled objective (N = objective.num_samples rollouts per input).
    key: PRNG key for the rollouts.
    preprocess_kwargs: mean/std/augment for data.device_preprocess.
    chunk_size: inputs per vmapped call (bounds memory for large models).
  """

  def example_loss(p, example):
    x = data_lib.device_preprocess(example["image"][None], None, train=False, **preprocess_kwargs)
    logits_1xC, _ = steps_lib.forward(model, p, batch_stats, x, train=False)
    label_1 = example["label"][None]
    if not objective.sampled:
      return objectives.cross_entropy_loss(logits_1xC, label_1)[0]
    counts_1xC = example["counts"][None]
    k_1 = jnp.take_along_axis(counts_1xC, label_1[:, None], axis=-1)[:, 0]
    adv_succ, adv_fail = objectives.success_failure_advantages(objective, k_1)
    return objectives.count_surrogate_loss(logits_1xC, label_1, counts_1xC, adv_succ, adv_fail,
                                           objective.num_samples)[0]

  @jax.jit
  def chunk_norms(p, images, labels, chunk_key):
    batch = {"image": images, "label": labels}
    if objective.sampled:
      x = data_lib.device_preprocess(images, None, train=False, **preprocess_kwargs)
      logits, _ = steps_lib.forward(model, p, batch_stats, x, train=False)
      batch["counts"] = objectives.sample_class_counts(chunk_key, logits, objective.num_samples,
                                                       objective.sampler)
    return estimators.per_prompt_gradient_norms(example_loss, p, batch)

  norms = []
  for i, start in enumerate(range(0, len(labels), chunk_size)):
    stop = min(start + chunk_size, len(labels))
    images, chunk_labels = images_uint8[start:stop], np.asarray(labels[start:stop], np.int32)
    pad = chunk_size - (stop - start)  # Pad to one shape so the function compiles once.
    if pad:
      images = np.concatenate([images, np.repeat(images[:1], pad, 0)])
      chunk_labels = np.concatenate([chunk_labels, np.repeat(chunk_labels[:1], pad)])
    out = chunk_norms(params, images, chunk_labels, jax.random.fold_in(key, i))
    norms.append(np.asarray(out)[:stop - start])
  return np.concatenate(norms)


def analyze(workdir: str, out_dir: str | None = None, objective_names: Sequence[str] = DEFAULT_OBJECTIVES,
            num_samples: int = 1024, num_examples: int = 1000, split: str = "eval", seed: int = 0,
            data_dir: str | None = None) -> dict:
  """Computes pass rates and per-input gradient norms for each objective and writes a JSON and a scatter plot.

  Returns:
    {"pass_rate": [n], "<objective>": [n] norms, ..., "files": {...}} (lists, for JSON).
  """
  config, data, model, params, batch_stats = load_run(workdir, data_dir)
  split_data = data.eval if split == "eval" else data.train
  n = min(num_examples, len(split_data))
  indices = np.sort(np.random.default_rng([seed, 11]).permutation(len(split_data))[:n])
  batch = split_data.get_batch(indices, train=False)
  preprocess_kwargs = {"mean": data.mean, "std": data.std, "augment": config.data.augment}
  probs = steps_lib.softmax_probabilities(model, params, batch_stats, batch["image"], preprocess_kwargs)
  pass_rate = probs[np.arange(n), batch["label"]]
  result = {"pass_rate": pass_rate.tolist(), "num_samples": num_samples, "split": split,
            "checkpoint": os.path.abspath(workdir), "objective_of_checkpoint": config.objective.name}
  key = jax.random.key(seed)
  for i, name in enumerate(objective_names):
    objective = objectives.make_objective(name, {}, num_samples)
    norms = per_input_gradient_norms(model, params, batch_stats, batch["image"], batch["label"], objective,
                                     jax.random.fold_in(key, i), preprocess_kwargs)
    result[name] = norms.tolist()
  out_dir = out_dir or workdir
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, "grad_norms.json")
  with open(json_path, "w", encoding="utf-8") as f:
    json.dump(result, f)
  png_path = os.path.join(out_dir, "grad_norms.png")
  plot_grad_norms(result, objective_names, png_path)
  result["files"] = {"json": json_path, "png": png_path}
  return result


def plot_grad_norms(result: dict, objective_names: Sequence[str], path: str) -> None:
  """Scatter of per-input gradient norm against pass rate, one panel per objective, binned medians."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  p = np.clip(np.asarray(result["pass_rate"]), 1e-6, 1.0 - 1e-6)
  fig, axes = plt.subplots(1, len(objective_names), figsize=(4.2 * len(objective_names), 3.8), sharex=True)
  axes = np.atleast_1d(axes)
  logit_edges = np.linspace(-14.0, 14.0, 15)  # Bins of equal width in logit(p): both tails resolved.
  logit_p = np.log(p) - np.log1p(-p)
  for ax, name in zip(axes, objective_names):
    norms = np.asarray(result[name])
    ax.scatter(p, norms, s=6, alpha=0.35, color="tab:blue", edgecolors="none")
    centers, medians = [], []
    for lo, hi in zip(logit_edges[:-1], logit_edges[1:]):
      in_bin = (logit_p >= lo) & (logit_p < hi)
      if in_bin.sum() >= 5:
        centers.append(1.0 / (1.0 + np.exp(-(lo + hi) / 2)))
        medians.append(np.median(norms[in_bin]))
    ax.plot(centers, medians, color="tab:red", lw=2, marker="o", ms=3, label="binned median")
    zero_share = float(np.mean(norms == 0.0))
    title = name if name == objectives.CROSS_ENTROPY else f"{name} (N = {result['num_samples']})"
    ax.set_title(f"{title}\n{100 * zero_share:.0f}% of inputs with zero gradient", fontsize=10)
    ax.set_xscale("logit")
    ticks = [1e-6, 1e-4, 1e-2, 0.5, 1 - 1e-2, 1 - 1e-4, 1 - 1e-6]
    ax.set_xticks(ticks, ["1e-6", "1e-4", "0.01", "0.5", "0.99", "1-1e-4", "1-1e-6"], fontsize=7)
    ax.minorticks_off()
    ax.set_xlabel("pass rate p = softmax[label] (logit scale)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("per-input gradient L2 norm")
  axes[0].legend(loc="upper right", fontsize=8)
  fig.suptitle(f"Per-input gradient norm vs pass rate ({result['split']} split, checkpoint trained with "
               f"{result['objective_of_checkpoint']})", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


__all__ = ["DEFAULT_OBJECTIVES", "load_run", "per_input_gradient_norms", "analyze", "plot_grad_norms"]
