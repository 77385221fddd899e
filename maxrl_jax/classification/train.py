"""Training and evaluation for the classification testbed: `train_and_evaluate(config, workdir)`.

Entry point (maxrl_jax.main dispatches here when config.task == "classification"):

    python -m maxrl_jax.main --config=configs/classification.py --workdir=DIR

Writes into DIR:
  config.json     the resolved config.
  metrics.jsonl   one JSON object per logged step: {"step", "phase", "pass_rate", ...}. phase "train" lines
                  average the last log interval (pass rate of the training batches under the policy that
                  sampled them, loss, grad norm, fraction of inputs with a success, ...); phase "eval" is
                  the held-out split and "eval_train" a fixed subset of the train split, both in eval mode
                  with analytic pass@k (k = 1, 2, 4, ..., 1024), top-1 accuracy and NLL.
  summary.json    {"objective", "num_samples", "eval": {"pass@1", ..., "top1", "pass_rate"}, "eval_train",
                  "initial_eval", timings, hardware, "config_sha256"}.
  tensorboard/    TensorBoard event files of the same records (config.logging.tensorboard, on by default);
                  config.logging.wandb=True also logs them to Weights & Biases.
  curves_*.png    held-out pass@k and the training curves, drawn from metrics.jsonl (maxrl_jax/plots.py).
  tfds/           the prepared dataset, unless config.data.data_dir names another TFDS data dir.
  checkpoints/train/<step>/   orbax checkpoints of the train state (params, batch_stats, optimiser state,
                  step) and of the run's records so far: every config.checkpoint.every_steps and at the end,
                  verified by digest when restored (maxrl_jax/checkpoints.py).

Re-running the same command on the same workdir resumes from the newest good checkpoint (a corrupt one is
moved aside and the previous one used; one of another config is refused), and metrics.jsonl is rebuilt from
that checkpoint's records. A workdir holding a finished run of the same config (summary.json's
"config_sha256") is left untouched, and one process at a time holds a workdir. A non-finite loss, gradient
norm or parameter stops the run (training_loop.NonFiniteError, naming the step) before it is evaluated or saved.

The step is a pure function `(state, batch) -> (state, metrics)`; `steps_per_call` steps are fused into one
jitted `lax.scan`, so metrics leave the device once per call. Keys are `fold_in(named_key, step)`, so a
resumed run repeats the uninterrupted one exactly (the data order is a pure function of the step too).
Batches are sharded over all local devices on a 'data' mesh axis; parameters are replicated and batch norm
statistics are taken over the global batch.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
from flax import struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxrl_jax import checkpoints as checkpoints_lib
from maxrl_jax import metrics as metrics_lib
from maxrl_jax import plots
from maxrl_jax import run_logging
from maxrl_jax import training_loop
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.classification import data as data_lib
from maxrl_jax.classification import models
from maxrl_jax.classification import objectives

Array = jax.Array

CHECKPOINT_PHASE = "train"  # Checkpoints live in <workdir>/checkpoints/train/<step>.


class TrainState(struct.PyTreeNode):
  """step: int32 scalar; params; batch_stats ({} for models without batch norm); opt_state."""

  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any


# ----------------------------------------------------------------------------------------------------------
# Config validation.


def objective_from_config(config: ml_collections.ConfigDict) -> objectives.Objective:
  """The validated objective of a config (kwargs that are None are dropped)."""
  raw_kwargs = config.objective.get("kwargs") or {}
  if isinstance(raw_kwargs, ml_collections.ConfigDict):
    raw_kwargs = raw_kwargs.to_dict()
  kwargs = {k: v for k, v in dict(raw_kwargs).items() if v is not None}
  return objectives.make_objective(config.objective.name, kwargs, config.rollout.num_samples,
                                   config.rollout.get("sampler", "auto"))


def validate_config(config: ml_collections.ConfigDict) -> objectives.Objective:
  """Checks the config and returns its objective; raises ValueError naming the offending field."""
  if config.get("task", "classification") != "classification":
    raise ValueError(f"config.task={config.task!r}; this trainer runs 'classification'.")
  objective = objective_from_config(config)

  def positive_int(path: str, value, allow_zero: bool = False):
    if isinstance(value, bool) or int(value) != value or value < (0 if allow_zero else 1):
      raise ValueError(f"config.{path}={value!r} must be an integer >= {0 if allow_zero else 1}.")

  positive_int("train.batch_size", config.train.batch_size)
  positive_int("train.log_every", config.train.log_every)
  positive_int("train.steps_per_call", config.train.steps_per_call)
  positive_int("eval.every_steps", config.eval.every_steps, allow_zero=True)
  positive_int("eval.batch_size", config.eval.batch_size)
  positive_int("eval.num_train_examples", config.eval.num_train_examples, allow_zero=True)
  positive_int("checkpoint.every_steps", config.checkpoint.every_steps, allow_zero=True)
  if config.train.num_steps <= 0 and not config.train.num_epochs > 0:
    raise ValueError(f"Set config.train.num_steps > 0 or config.train.num_epochs > 0 (got "
                     f"{config.train.num_steps}, {config.train.num_epochs}).")
  spc = config.train.steps_per_call
  for path, value in (("train.log_every", config.train.log_every),
                      ("eval.every_steps", config.eval.every_steps),
                      ("checkpoint.every_steps", config.checkpoint.every_steps)):
    if value % spc:
      raise ValueError(f"config.{path}={value} must be a multiple of config.train.steps_per_call={spc} "
                       "(logging, evaluation and checkpoints happen between fused calls).")
  ks = tuple(config.eval.pass_at_k)
  if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
    raise ValueError(f"config.eval.pass_at_k={ks!r} must be integers >= 1.")
  optim = config.optim
  if optim.name not in ("sgd", "adamw"):
    raise ValueError(f"config.optim.name={optim.name!r}; allowed: 'sgd', 'adamw'.")
  if not optim.learning_rate > 0:
    raise ValueError(f"config.optim.learning_rate={optim.learning_rate!r} must be > 0.")
  if not 0 <= optim.momentum < 1:
    raise ValueError(f"config.optim.momentum={optim.momentum!r} must lie in [0, 1).")
  if optim.weight_decay < 0 or optim.grad_clip_norm < 0:
    raise ValueError("config.optim.weight_decay and config.optim.grad_clip_norm must be >= 0.")
  if optim.schedule not in ("cosine", "constant"):
    raise ValueError(f"config.optim.schedule={optim.schedule!r}; allowed: 'cosine', 'constant'.")
  if config.data.augment not in data_lib.AUGMENTATIONS:
    raise ValueError(f"config.data.augment={config.data.augment!r}; allowed: {list(data_lib.AUGMENTATIONS)}.")
  if config.data.storage not in data_lib.STORAGES:
    raise ValueError(f"config.data.storage={config.data.storage!r}; allowed: {list(data_lib.STORAGES)}.")
  if config.data.augment == "inception_crop" and (config.data.storage != "stream" or not config.data.image_size):
    raise ValueError("config.data.augment='inception_crop' crops on the host while streaming: set "
                     "config.data.storage='stream' and config.data.image_size.")
  if config.model.name not in models.MODEL_NAMES:
    raise ValueError(f"config.model.name={config.model.name!r}; allowed: {list(models.MODEL_NAMES)}.")
  num_devices = jax.device_count()
  for path, value in (("train.batch_size", config.train.batch_size), ("eval.batch_size",
                                                                      config.eval.batch_size)):
    if value % num_devices:
      raise ValueError(f"config.{path}={value} must be divisible by the {num_devices} devices.")
  return objective


def _dataset_sizes(config: ml_collections.ConfigDict, workdir: str | None) -> tuple[int | None, int | None]:
  """(train, held-out) example counts without reading the data: known for the procedural dataset, read from
  the dataset info of a prepared TFDS dataset, else (None, None)."""
  base, _, variant = config.data.name.partition("/")
  if base == data_lib.PROCEDURAL_NAME:
    configs = data_lib.ProceduralClasses.builder_configs
    variant = variant or data_lib.ProceduralClasses.DEFAULT_CONFIG_NAME
    if variant not in configs:
      raise ValueError(f"config.data.name={config.data.name!r}; procedural variants: {sorted(configs)}.")
    cfg = configs[variant]
    return cfg.num_classes * cfg.train_per_class, cfg.num_classes * cfg.test_per_class
  data_dir = config.data.get("data_dir") or (os.path.join(workdir, "tfds") if workdir else None)
  try:
    builder = tfds.builder(config.data.name, data_dir=data_dir)
    if not builder.is_prepared():
      return None, None
    splits = builder.info.splits
    return splits[config.data.train_split].num_examples, splits[config.data.eval_split].num_examples
  except Exception:  # pylint: disable=broad-except  # Unknown or unprepared: train_and_evaluate says why.
    return None, None


def expected_work(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """Validates the config and returns the work a run will do, without training (`main --dry_run`)."""
  objective = validate_config(config)
  num_train, num_eval = _dataset_sizes(config, workdir)
  batch_size = int(config.train.batch_size)
  if config.train.num_steps > 0:
    num_steps = int(config.train.num_steps)
  elif num_train is not None:
    num_steps = int(math.ceil(config.train.num_epochs * (num_train // batch_size)))
  else:
    num_steps = None
  def count(n):
    return "?" if n is None else f"{n:,}"

  work = {"dataset": f"{config.data.name} ({count(num_train)} train / {count(num_eval)} held-out examples)"}
  if num_steps is None:
    work["train steps"] = (f"{config.train.num_epochs:g} epochs of batch {batch_size} (the dataset is not "
                           "prepared yet, so its size is unknown)")
    return work
  examples = num_steps * batch_size
  work["train steps"] = count(num_steps)
  if num_train:
    work["epochs"] = f"{examples / num_train:.2f}"
  work["training examples (steps x batch)"] = count(examples)
  if objective.sampled:
    work["sampled classes (examples x N)"] = (f"{examples * objective.num_samples:,} "
                                              f"(N = {objective.num_samples})")
  every = int(config.eval.every_steps)
  eval_steps = {0, num_steps} | (set(range(every, num_steps + 1, every)) if every else set())
  held_out = num_eval if config.eval.max_examples < 0 or num_eval is None else min(num_eval,
                                                                                  config.eval.max_examples)
  work["evaluations"] = (f"{len(eval_steps)} (at the start, every {every} steps and at the end)" if every
                         else "2 (at the start and at the end)")
  work["examples per evaluation"] = (f"{count(held_out)} held-out + {count(config.eval.num_train_examples)} "
                                     "train-subset")
  return work


# ----------------------------------------------------------------------------------------------------------
# Optimiser, init, steps.


def make_optimizer(optim_config, num_steps: int, steps_per_epoch: int):
  """(optax transformation, learning-rate schedule) from config.optim."""
  if optim_config.warmup_steps >= 0:
    warmup = int(optim_config.warmup_steps)
  else:
    warmup = int(round(optim_config.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(num_steps - 1, 0))
  peak = float(optim_config.learning_rate)
  if optim_config.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(num_steps, warmup + 1), 0.0)
  else:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)], [warmup]) if warmup else (
            optax.constant_schedule(peak))
  parts = []
  if optim_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.grad_clip_norm))
  if optim_config.name == "sgd":
    if optim_config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(optim_config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=optim_config.momentum or None,
                           nesterov=bool(optim_config.nesterov)))
  else:
    parts.append(optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2,
                             weight_decay=optim_config.weight_decay))
  return optax.chain(*parts), schedule


def _variables(params, batch_stats) -> dict:
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


def forward(model, params, batch_stats, x, train: bool):
  """Logits [B, C] and (in train mode) the updated batch statistics."""
  if train and batch_stats:
    logits, updates = model.apply(_variables(params, batch_stats), x, train=True, mutable=["batch_stats"])
    return logits, updates["batch_stats"]
  return model.apply(_variables(params, batch_stats), x, train=train), batch_stats


def make_train_step(model, tx, schedule, objective: objectives.Objective, rollout_key: Array,
                    augment_key: Array, preprocess_kwargs: dict):
  """Returns train_step(state, batch) -> (state, metrics) for uint8 batch {"image", "label"}."""

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    step_rollout_key = jax.random.fold_in(rollout_key, state.step)
    step_augment_key = jax.random.fold_in(augment_key, state.step)
    x = data_lib.device_preprocess(batch["image"], step_augment_key, train=True, **preprocess_kwargs)
    labels_B = batch["label"]

    def loss_fn(params):
      logits_BxC, new_batch_stats = forward(model, params, state.batch_stats, x, train=True)
      loss_B, aux = objectives.objective_loss(objective, logits_BxC, labels_B, step_rollout_key)
      return jnp.mean(loss_B), (logits_BxC, new_batch_stats, aux)

    (loss, (logits_BxC, new_batch_stats, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    logp_BxC = jax.nn.log_softmax(jax.lax.stop_gradient(logits_BxC), axis=-1)
    logp_label_B = jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1)[:, 0]
    step_metrics = {
        "loss": loss,
        "pass_rate": jnp.mean(jnp.exp(logp_label_B)),
        "nll": -jnp.mean(logp_label_B),
        "top1": jnp.mean((jnp.argmax(logp_BxC, -1) == labels_B).astype(jnp.float32)),
        "grad_norm": optax.global_norm(grads),
        "lr": schedule(state.step),
    }
    if objective.sampled:
      k_B = aux["num_successes"].astype(jnp.float32)
      step_metrics["frac_solved"] = jnp.mean((k_B > 0).astype(jnp.float32))
      step_metrics["mean_successes"] = jnp.mean(k_B)
    new_state = state.replace(step=state.step + 1, params=params, batch_stats=new_batch_stats,
                              opt_state=opt_state)
    return new_state, step_metrics

  return train_step


def make_eval_step(model, preprocess_kwargs: dict, ks: tuple[int, ...]):
  """Returns eval_step(params, batch_stats, batch) -> sums over the valid examples of the batch."""

  def eval_step(params, batch_stats, batch):
    x = data_lib.device_preprocess(batch["image"], None, train=False, **preprocess_kwargs)
    logits_BxC, _ = forward(model, params, batch_stats, x, train=False)
    logp_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
    logp_B = jnp.take_along_axis(logp_BxC, batch["label"][:, None], axis=-1)[:, 0]
    p_B = jnp.exp(logp_B)
    valid_B = batch["valid"].astype(jnp.float32)
    pass_BxK = metrics_lib.analytic_pass_at_k(p_B, ks)
    top1_B = (jnp.argmax(logits_BxC, -1) == batch["label"]).astype(jnp.float32)
    return {
        "count": jnp.sum(valid_B),
        "pass_rate": jnp.sum(p_B * valid_B),
        "nll": -jnp.sum(logp_B * valid_B),
        "top1": jnp.sum(top1_B * valid_B),
        "pass_at_k": jnp.sum(pass_BxK * valid_B[:, None], axis=0),
    }

  return eval_step


def softmax_probabilities(model, params, batch_stats, images_uint8: np.ndarray, preprocess_kwargs: dict,
                          batch_size: int = 1000) -> np.ndarray:
  """Eval-mode softmax probabilities [n, C] (float32 numpy) for uint8 images; used by the analyses."""
  apply = jax.jit(lambda p, s, im: jax.nn.softmax(forward(
      model, p, s, data_lib.device_preprocess(im, None, train=False, **preprocess_kwargs), False)[0], -1))
  return np.concatenate([np.asarray(apply(params, batch_stats, images_uint8[i:i + batch_size]))
                         for i in range(0, len(images_uint8), batch_size)])


def create_train_state(model, tx, image_shape: tuple[int, ...], init_key: Array) -> TrainState:
  """A fresh TrainState (call under jax.jit, or jax.eval_shape for a restore template)."""
  variables = model.init({"params": init_key}, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables.get("batch_stats", {}),
                    opt_state=tx.init(params))


def open_checkpointer(workdir: str, config: ml_collections.ConfigDict,
                      identity: dict | None = None) -> checkpoints_lib.PhaseCheckpointer:
  """The run's checkpointer; with `identity` (workdir.config_identity) a checkpoint of another config is refused."""
  return checkpoints_lib.PhaseCheckpointer(workdir, CHECKPOINT_PHASE, int(config.checkpoint.get("keep", 2)),
                                           identity=identity)


# ----------------------------------------------------------------------------------------------------------
# The loop.


def _hardware() -> dict:
  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "num_devices": len(devices), "cpu_count": os.cpu_count(), "jax_version": jax.__version__,
          "flax_version": flax.__version__}


def _print_table(summary: dict, ks, out=sys.stdout) -> None:
  held, train = summary["eval"], summary.get("eval_train") or {}
  initial = summary.get("initial_eval") or {}
  obj = summary["objective"] + ("" if summary["objective"] == objectives.CROSS_ENTROPY
                                else f" (N = {summary['num_samples']})")
  lines = [
      "=" * 72,
      f"classification | {obj} | {summary['dataset']} ({summary['num_classes']} classes) | "
      f"{summary['model']}",
      f"{summary['steps']} steps ({summary['epochs']:.1f} epochs) in {summary['train_time_s']:.1f} s on "
      f"{summary['hardware']['num_devices']} x {summary['hardware']['device_kind']}",
      "-" * 72,
      f"{'metric':<14}{'held-out':>14}{'train subset':>16}{'at init (held-out)':>22}",
  ]
  rows = [("pass rate", "pass_rate"), ("top-1", "top1"), ("NLL", "nll")] + [
      (f"pass@{k}", f"pass@{k}") for k in ks]

  def fmt(d, key):
    return f"{d[key]:.4f}" if key in d and d[key] is not None else "-"

  for label, key in rows:
    lines.append(f"{label:<14}{fmt(held, key):>14}{fmt(train, key):>16}{fmt(initial, key):>22}")
  lines.append("=" * 72)
  print("\n".join(lines), file=out, flush=True)


def _expected_steps(config: ml_collections.ConfigDict, workdir: str) -> int | None:
  """The run's number of steps, or None when it depends on a dataset whose size is not known yet."""
  if config.train.num_steps > 0:
    return int(config.train.num_steps)
  num_train, _ = _dataset_sizes(config, workdir)
  if num_train is None:
    return None
  return int(math.ceil(config.train.num_epochs * (num_train // int(config.train.batch_size))))


def finished_summary(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The summary of a finished run of exactly this config in `workdir`, else None."""
  summary = workdir_lib.read_finished_summary(workdir, config.to_dict())
  if summary is None:
    return None
  expected = _expected_steps(config, workdir)
  if "steps" not in summary or (expected is not None and summary["steps"] != expected):
    return None
  return summary


def _diverged(step: int, quantity: str, value: Any, saved: int | None) -> training_loop.NonFiniteError:
  where = f"the checkpoint of step {saved}" if saved else "no checkpoint"
  return training_loop.NonFiniteError(
      f"train diverged: {quantity} is {value} at step {step}. Nothing after it was saved; the run keeps {where} "
      "(the last finite state). Lower the learning rate (or check the data) and start again in a new --workdir.")


def _check_finite_metrics(calls: list[tuple[int, dict]], saved: int | None) -> None:
  """Raises NonFiniteError at the first step whose loss or gradient norm is not finite.

  `calls` holds (first step of the call, {metric: [steps of the call]}) of the fused calls not checked yet.
  """
  for first_step, metrics in jax.device_get(calls):
    for key in training_loop.FINITE_KEYS:
      if key not in metrics:
        continue
      values = np.ravel(np.asarray(metrics[key], np.float64))
      bad = np.flatnonzero(~np.isfinite(values))
      if bad.size:
        raise _diverged(first_step + int(bad[0]), key, float(values[bad[0]]), saved)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains a classifier with config.objective and evaluates it; returns the summary (see module doc).

  One process at a time per workdir (a second one stops at once, naming the holder). A workdir that holds a
  finished run of the same config is left untouched: its summary is returned.
  """
  start_time = time.time()
  objective = validate_config(config)
  workdir = workdir_lib.prepare_workdir(workdir)
  with workdir_lib.WorkdirLock(workdir, enabled=jax.process_index() == 0):
    finished = finished_summary(config, workdir)
    if finished is not None:
      print(f"{workdir} already holds this run, finished ({finished['steps']} steps); nothing was changed. "
            f"Its results: {os.path.join(workdir, 'summary.json')}", flush=True)
      return finished
    return _train_and_evaluate(config, workdir, objective, start_time)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, objective: objectives.Objective,
                        start_time: float) -> dict:
  run_logging.check_or_write_config(workdir, config.to_dict())
  identity = workdir_lib.config_identity(config.to_dict())

  data = data_lib.load_data(config.data, default_data_dir=os.path.join(workdir, "tfds"))
  batch_size = int(config.train.batch_size)
  steps_per_epoch = len(data.train) // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f"config.train.batch_size={batch_size} exceeds the {len(data.train)} training examples.")
  num_steps = (int(config.train.num_steps) if config.train.num_steps > 0
               else int(math.ceil(config.train.num_epochs * steps_per_epoch)))
  ks = tuple(int(k) for k in config.eval.pass_at_k)
  preprocess_kwargs = {"mean": data.mean, "std": data.std, "augment": config.data.augment}

  model = models.create_model(config.model, data.num_classes)
  tx, schedule = make_optimizer(config.optim, num_steps, steps_per_epoch)
  root_key = jax.random.key(config.seed)
  init_key, rollout_key, augment_key = (jax.random.fold_in(root_key, i) for i in range(3))
  data_seed = int(config.seed)

  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  chunk_sharding = NamedSharding(mesh, PartitionSpec(None, "data"))  # [steps, batch, ...]
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))

  state = jax.jit(lambda: create_train_state(model, tx, data.image_shape, init_key),
                  out_shardings=replicated)()
  # Checkpoints carry the run's records and its config identity; they are verified when restored.
  checkpointer = open_checkpointer(workdir, config, identity=identity)
  try:
    latest = checkpointer.latest_step()
    if latest is not None and not config.checkpoint.resume:
      raise ValueError(f"--workdir {workdir} already holds checkpoints (latest step {latest}) and "
                       "config.checkpoint.resume=False: use a new --workdir.")
    writer = run_logging.MetricsWriter(workdir, sinks=run_logging.sinks_from_config(config, workdir))
    found = checkpointer.restore_latest(state)
    if found is not None:
      restored_step, state, extra = found
      records = training_loop.RecordKeeper.resume(writer, extra.get("records"), f"step {restored_step}")
    else:
      records = training_loop.RecordKeeper.resume(writer, [], "the start")
    resumed = found is not None
    start_step = int(state.step)
    run = _train_loop(config, objective, data, model, tx, schedule, state, start_step, num_steps, ks,
                      preprocess_kwargs, rollout_key, augment_key, data_seed, steps_per_epoch, records,
                      checkpointer, replicated, chunk_sharding, batch_sharding,
                      saved=found[0] if found is not None else None)
  finally:
    checkpointer.close()

  # The results are what the records hold (the checkpoint's records, and this launch's).
  evals = {(r["step"], r["phase"]): {k: v for k, v in r.items() if k not in ("step", "phase")}
           for r in records.records if r.get("phase") in ("eval", "eval_train")}
  if (num_steps, "eval") not in evals:  # Never report an evaluation the run did not make.
    last = max((s for s, p in evals if p == "eval"), default=None)
    raise RuntimeError(f"{workdir}: the last held-out evaluation is at step {last}, not the final step "
                       f"{num_steps}; the records are incomplete. Re-run to resume.")
  summary = {
      "task": "classification",
      "objective": objective.name,
      "objective_kwargs": dict(objective.kwargs),
      "num_samples": objective.num_samples if objective.sampled else None,
      "sampler": objective.sampler if objective.sampled else None,
      "dataset": data.name,
      "num_classes": data.num_classes,
      "num_train_examples": len(data.train),
      "model": config.model.name + (f"-{config.model.depth}" if config.model.name == "resnet" else ""),
      "steps": num_steps,
      "epochs": num_steps / steps_per_epoch,
      "batch_size": batch_size,
      "eval": evals[(num_steps, "eval")],
      "eval_train": evals.get((num_steps, "eval_train")),
      "initial_eval": evals.get((0, "eval")),
      "resumed_from_step": start_step if resumed else None,
      "train_time_s": run["train_time_s"],
      "total_time_s": time.time() - start_time,
      "hardware": _hardware(),
      "config_sha256": workdir_lib.config_digest(config.to_dict()),
  }
  run_logging.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  writer.close()
  curves = plots.plot_run(workdir)
  _print_table(summary, ks)
  print(f"Results: {os.path.join(workdir, 'summary.json')}", flush=True)
  if curves:
    print("Curves: " + ", ".join(curves), flush=True)
  return summary


def _train_loop(config, objective, data, model, tx, schedule, state, start_step, num_steps, ks, preprocess_kwargs,
                rollout_key, augment_key, data_seed, steps_per_epoch, records, checkpointer, replicated,
                chunk_sharding, batch_sharding, saved) -> dict:
  """Steps start_step+1..num_steps with logging, evaluations and checkpoints; returns {"train_time_s"}.

  Every record goes to `records` (metrics.jsonl and the next checkpoint). A non-finite loss, gradient norm or
  parameter raises NonFiniteError before anything after it is evaluated or saved.
  """
  batch_size = int(config.train.batch_size)
  train_step = make_train_step(model, tx, schedule, objective, rollout_key, augment_key, preprocess_kwargs)

  def train_chunk(state, batches):
    return jax.lax.scan(train_step, state, batches)

  donate = (0,) if jax.default_backend() != "cpu" else ()  # CPU cannot reuse donated buffers.
  train_chunk = jax.jit(train_chunk, donate_argnums=donate,
                        out_shardings=(replicated, replicated))
  eval_step = jax.jit(make_eval_step(model, preprocess_kwargs, ks))

  eval_limit = None if config.eval.max_examples < 0 else int(config.eval.max_examples)
  eval_sets = [("eval", data.eval, data_lib.eval_index_batches(len(data.eval), config.eval.batch_size,
                                                               eval_limit))]
  if config.eval.num_train_examples > 0:
    eval_sets.append(("eval_train", data.train, data_lib.eval_index_batches(
        len(data.train), config.eval.batch_size, config.eval.num_train_examples, seed=data_seed)))

  def evaluate(state, step) -> None:
    for phase, split, batches in eval_sets:
      sums = None
      for indices, valid in batches:
        batch = split.get_batch(indices, train=False)
        batch["valid"] = valid
        out = eval_step(state.params, state.batch_stats, jax.device_put(batch, batch_sharding))
        sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
      sums = jax.device_get(sums)
      count = float(sums["count"])
      result = {"pass_rate": float(sums["pass_rate"]) / count, "top1": float(sums["top1"]) / count,
                "nll": float(sums["nll"]) / count}
      result.update({f"pass@{k}": float(v) / count for k, v in zip(ks, sums["pass_at_k"])})
      result["num_examples"] = int(count)
      records.write({"step": step, "phase": phase, **result})

  def logged(at_step: int) -> bool:
    return any(r.get("step") == at_step and r.get("phase") == "eval" for r in records.records)

  def check_params(at_step: int) -> None:
    if not bool(training_loop.params_are_finite({"params": state.params, "batch_stats": state.batch_stats})):
      raise _diverged(at_step, "a parameter", "not finite", saved)

  if start_step == 0 and not logged(0):
    evaluate(state, 0)

  progress = None
  if config.train.progress_bar:
    from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
    progress = tqdm_auto.tqdm(total=num_steps, initial=start_step, unit="step", dynamic_ncols=True,
                              desc=f"{objective.name}" + (f" N={objective.num_samples}"
                                                          if objective.sampled else ""))
  steps_per_call = int(config.train.steps_per_call)
  pending: list[dict] = []
  unchecked: list[tuple[int, dict]] = []
  train_time = 0.0
  interval_start, interval_steps = time.time(), 0
  step = start_step
  try:
    while step < num_steps:
      t0 = time.time()
      chunk = min(steps_per_call, num_steps - step)
      indices = np.stack([data_lib.train_batch_indices(s, len(data.train), batch_size, data_seed)
                          for s in range(step, step + chunk)])
      host_rng = np.random.default_rng([data_seed, step, 3])
      flat = data.train.get_batch(indices.reshape(-1), train=True, rng=host_rng)
      batches = jax.tree.map(lambda a: a.reshape((chunk, batch_size) + a.shape[1:]), flat)
      state, chunk_metrics = train_chunk(state, jax.device_put(batches, chunk_sharding))
      pending.append(chunk_metrics)
      unchecked.append((step + 1, chunk_metrics))
      step += chunk
      interval_steps += chunk
      if progress is not None:
        progress.update(chunk)
      log_due = step % config.train.log_every == 0 or step == num_steps
      eval_due = bool(config.eval.every_steps and step % config.eval.every_steps == 0) or step == num_steps
      checkpoint_due = bool(config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0
                            ) or step == num_steps
      if log_due or eval_due or checkpoint_due:
        _check_finite_metrics(unchecked, saved)  # Before anything of these steps is logged as a result.
        unchecked = []
      if log_due:
        host = jax.device_get(pending)
        pending = []
        record = {k: float(np.mean(np.concatenate([np.ravel(m[k]) for m in host]))) for k in host[0]}
        elapsed = time.time() - interval_start
        record.update({"step": step, "phase": "train", "epoch": step / steps_per_epoch,
                       "examples_per_s": interval_steps * batch_size / max(elapsed, 1e-9)})
        records.write(record)
        if progress is not None:
          progress.set_postfix(pass_rate=f"{record['pass_rate']:.4f}", loss=f"{record['loss']:.3g}")
        interval_start, interval_steps = time.time(), 0
      if eval_due:
        jax.block_until_ready(state)  # Count the pending compute as training time, not evaluation time.
      train_time += time.time() - t0
      if eval_due or checkpoint_due:
        check_params(step)
      if eval_due:
        eval_start = time.time()
        evaluate(state, step)
        interval_start += time.time() - eval_start  # Throughput excludes evaluation.
      if checkpoint_due:
        checkpointer.save(step, state, records.records)  # After the evaluation: its records go with it.
        saved = step
  finally:
    if progress is not None:
      progress.close()
  if not logged(step):  # Resumed at the end without a logged final evaluation.
    evaluate(state, step)
    checkpointer.save(step, state, records.records)
  return {"train_time_s": train_time}


__all__ = ["TrainState", "train_and_evaluate", "validate_config", "expected_work", "objective_from_config",
           "make_optimizer", "make_train_step", "make_eval_step", "forward", "softmax_probabilities",
           "create_train_state", "open_checkpointer", "finished_summary", "CHECKPOINT_PHASE"]
