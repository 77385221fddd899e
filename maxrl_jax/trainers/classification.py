"""The trainer of the classification testbed (maxrl_jax/tasks/classification.py).

    python -m maxrl_jax.main --config=configs/classification.py --workdir=DIR

One phase, "train": `train.steps_per_call` steps fused in one jitted `lax.scan` per call of the harness's step
loop (maxrl_jax/trainers/loop.py), the held-out split ("eval") and a fixed train subset ("eval_train")
evaluated at the start, every eval.every_steps and at the end with analytic pass@k, top-1 and NLL. Batches
are split over the data x fsdp axes of config.mesh (batch norm statistics are over the global batch),
parameters placed by config.mesh.param_rules; multi-host runs write their files from process 0.

Writes, besides the harness's config.json, metrics.jsonl (phases "train", "eval", "eval_train"),
checkpoints/train/ and summary.json ({"objective", "num_samples", "eval", "eval_train", "initial_eval", ...}):
curves_*.png and a table of the held-out and train-subset metrics.
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from maxrl_jax import sharding
from maxrl_jax.classification import data as data_lib
from maxrl_jax.classification import models
from maxrl_jax.classification import objectives
from maxrl_jax.classification import steps as steps_lib
from maxrl_jax.tasks import classification as task_lib
from maxrl_jax.trainers import harness


class ClassificationTrainer:
  """Trains a classifier with a sampled objective (or cross-entropy) and evaluates it (module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, task: task_lib.ClassificationTask):
    self.config = config
    self.task = task
    self.num_steps = None

  # ---------------------------------------------------------------- harness hooks

  def validate(self) -> None:
    self.objective = self.task.validate()

  def make_mesh(self):
    return sharding.make_mesh(self.config.get("mesh"))

  def batch_sizes(self) -> dict[str, int]:
    return self.task.batch_sizes()

  def final_step(self, workdir: str | None = None) -> int | None:
    if self.num_steps is None:
      self.num_steps = self.task.num_steps(self.task.dataset_sizes(workdir)[0])
    return self.num_steps

  def sinks(self, workdir: str):
    del workdir
    return None  # Those config.logging asks for.

  # ---------------------------------------------------------------- training

  def prepare(self, workdir: str) -> None:
    self.data = self.task.load(workdir)

  def close(self) -> None:
    pass

  def train(self, run: harness.Run) -> None:
    config, objective, mesh = self.config, self.objective, run.mesh
    data = self.data
    batch_size = int(config.train.batch_size)
    steps_per_epoch = len(data.train) // batch_size
    if steps_per_epoch < 1:
      raise ValueError(f"config.train.batch_size={batch_size} exceeds the {len(data.train)} training examples.")
    self.steps_per_epoch = steps_per_epoch
    self.num_steps = num_steps = self.task.num_steps(len(data.train))
    ks = tuple(int(k) for k in config.eval.ks)
    preprocess_kwargs = {"mean": data.mean, "std": data.std, "augment": config.data.augment}
    model = models.create_model(config.model, data.num_classes)
    self.model_name = config.model.name + (f"-{config.model.depth}" if config.model.name == "resnet" else "")
    tx, schedule = steps_lib.make_optimizer(config.optim, num_steps, steps_per_epoch)
    root_key = jax.random.key(config.seed)
    init_key, rollout_key, augment_key = (jax.random.fold_in(root_key, i) for i in range(3))
    data_seed = int(config.seed)

    rules = sharding.MeshConfig.from_config(config.get("mesh")).param_rules
    batch_axes = sharding.batch_axes(mesh)
    batch_sharding = NamedSharding(mesh, PartitionSpec(batch_axes))
    calls_sharding = NamedSharding(mesh, PartitionSpec(None, batch_axes))  # [steps, batch, ...]
    replicated = sharding.replicated(mesh)
    init = lambda: steps_lib.create_train_state(model, tx, data.image_shape, init_key)
    like = harness.abstract_state(init, shardings=lambda a: sharding.tree_shardings(a, mesh, rules))
    state_sharding = harness.shardings_of(like)
    resumed = run.resume([(steps_lib.CHECKPOINT_PHASE, like)])
    if resumed is not None:
      start, state, pending = resumed.step, resumed.state, resumed.pending
    else:
      start, state, pending = 0, jax.jit(init, out_shardings=state_sharding)(), []
    self.resumed_from = start if resumed is not None else None

    train_step = steps_lib.make_train_step(model, tx, schedule, objective, rollout_key, augment_key,
                                           preprocess_kwargs)
    donate = (0,) if jax.default_backend() != "cpu" else ()  # The CPU cannot reuse donated buffers.
    train_chunk = jax.jit(lambda s, batches: jax.lax.scan(train_step, s, batches), donate_argnums=donate,
                          out_shardings=(state_sharding, replicated))
    eval_step = jax.jit(steps_lib.make_eval_step(model, preprocess_kwargs, ks), out_shardings=replicated)
    eval_limit = None if config.eval.max_examples < 0 else int(config.eval.max_examples)
    eval_sets = [("eval", data.eval, data_lib.eval_index_batches(len(data.eval), config.eval.batch_size,
                                                                 eval_limit))]
    if config.eval.num_train_examples > 0:
      eval_sets.append(("eval_train", data.train, data_lib.eval_index_batches(
          len(data.train), config.eval.batch_size, config.eval.num_train_examples, seed=data_seed)))

    def evaluate(state, step):
      del step
      records = []
      for phase, split, batches in eval_sets:
        sums = None
        for indices, valid in batches:
          batch = split.get_batch(indices, train=False)
          batch["valid"] = valid
          placed = jax.tree.map(lambda x: sharding.shard_global_array(x, batch_sharding), batch)
          out = eval_step(state.params, state.batch_stats, placed)
          sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
        sums = jax.device_get(sums)
        count = float(sums["count"])
        result = {"pass_rate": float(sums["pass_rate"]) / count, "top1": float(sums["top1"]) / count,
                  "nll": float(sums["nll"]) / count}
        result.update({f"pass@{k}": float(v) / count for k, v in zip(ks, sums["pass_at_k"])})
        result["num_examples"] = int(count)
        records.append({"phase": phase, **result})
      return records

    done = [start]

    def step_fn(state, step):
      """The fused steps done+1..step (0-indexed steps done..step-1 draw their batches)."""
      first = done[0]
      indices = np.stack([data_lib.train_batch_indices(s, len(data.train), batch_size, data_seed)
                          for s in range(first, step)])
      host_rng = np.random.default_rng([data_seed, first, 3])
      flat = data.train.get_batch(indices.reshape(-1), train=True, rng=host_rng)
      batches = jax.tree.map(lambda a: a.reshape((step - first, batch_size) + a.shape[1:]), flat)
      done[0] = step
      return train_chunk(state, jax.tree.map(lambda x: sharding.shard_global_array(x, calls_sharding), batches))

    evals = run.records.evals()
    if 0 not in evals:
      for record in evaluate(state, 0):
        run.records.write({**record, "step": 0})

    def annotate(record, step):
      record["epoch"] = step / steps_per_epoch
      record["examples_per_s"] = batch_size / max(record["step_time_s"], 1e-9)

    desc = objective.name + (f" N={objective.num_samples}" if objective.sampled else "")
    run.run_phase("train", state, step_fn, start=start, end=num_steps, stride=int(config.train.steps_per_call),
                  checkpoint=steps_lib.CHECKPOINT_PHASE, desc=desc, pending=pending, evaluate=evaluate,
                  eval_every=int(config.eval.every_steps), evals=evals, annotate=annotate)

  # ---------------------------------------------------------------- results

  def summary(self, run: harness.Run) -> dict:
    objective, data, num_steps = self.objective, self.data, self.num_steps
    evals = {(r["step"], r["phase"]): harness.metric_fields(r) for r in run.records.records
             if r.get("phase") in ("eval", "eval_train")}
    train = [r for r in run.records.records if r.get("phase") == "train"]
    previous, train_time = 0, 0.0
    for record in train:  # Wall time of the training steps (evaluations and checkpoints excluded).
      train_time += record["step_time_s"] * (record["step"] - previous)
      previous = record["step"]
    return {
        "objective": objective.name,
        "objective_kwargs": dict(objective.kwargs),
        "num_samples": objective.num_samples if objective.sampled else None,
        "sampler": objective.sampler if objective.sampled else None,
        "dataset": data.name,
        "num_classes": data.num_classes,
        "num_train_examples": len(data.train),
        "model": self.model_name,
        "steps": num_steps,
        "epochs": num_steps / self.steps_per_epoch,
        "batch_size": int(self.config.train.batch_size),
        "eval": evals[(num_steps, "eval")],
        "eval_train": evals.get((num_steps, "eval_train")),
        "initial_eval": evals.get((0, "eval")),
        "resumed_from_step": self.resumed_from,
        "train_time_s": train_time,
    }

  def report(self, run: harness.Run, summary: dict) -> None:
    print_table(summary, tuple(int(k) for k in self.config.eval.ks))
    harness.plot_curves(run.workdir, self.config)


def print_table(summary: dict, ks, out=sys.stdout) -> None:
  """The held-out, train-subset and initial metrics of a finished run."""
  held, train = summary["eval"], summary.get("eval_train") or {}
  initial = summary.get("initial_eval") or {}
  obj = summary["objective"] + ("" if summary["objective"] == objectives.CROSS_ENTROPY
                                else f" (N = {summary['num_samples']})")
  lines = [
      "=" * 72,
      f"classification | {obj} | {summary['dataset']} ({summary['num_classes']} classes) | {summary['model']}",
      f"{summary['steps']} steps ({summary['epochs']:.1f} epochs) in {summary['train_time_s']:.1f} s on "
      f"{summary['hardware']['num_devices']} x {summary['hardware']['device_kind']}",
      "-" * 72,
      f"{'metric':<14}{'held-out':>14}{'train subset':>16}{'at init (held-out)':>22}",
  ]
  rows = [("pass rate", "pass_rate"), ("top-1", "top1"), ("NLL", "nll")] + [(f"pass@{k}", f"pass@{k}") for k in ks]

  def fmt(d, key):
    return f"{d[key]:.4f}" if key in d and d[key] is not None else "-"

  for label, key in rows:
    lines.append(f"{label:<14}{fmt(held, key):>14}{fmt(train, key):>16}{fmt(initial, key):>22}")
  lines.append("=" * 72)
  print("\n".join(lines), file=out, flush=True)


def expected_work(config: ml_collections.ConfigDict, task: task_lib.ClassificationTask) -> dict[str, str]:
  return task.expected_work()


def make_trainer(config: ml_collections.ConfigDict, task: task_lib.ClassificationTask) -> ClassificationTrainer:
  return ClassificationTrainer(config, task)
