"""The classification testbed (configs/classification.py): MaxRL against exact maximum likelihood and RL.

A rollout for input x is a class drawn from the classifier's softmax, r = 1 iff it is the label, so the pass
rate p = softmax[label] is exact and cross-entropy is exact maximum likelihood (the paper's ImageNet study).
The task provides the data (any prepared TFDS image classification dataset, or the embedded procedural one,
maxrl_jax/classification/data.py), the model (classification/models.py) and the objective
(classification/objectives.py: every estimator of the registry, from class counts); the trainer is
maxrl_jax/trainers/classification.py.
"""

from __future__ import annotations

import math
import os

import ml_collections
import tensorflow_datasets as tfds

from maxrl_jax import estimators
from maxrl_jax.classification import data as data_lib
from maxrl_jax.classification import models
from maxrl_jax.classification import objectives
from maxrl_jax.tasks import base


def objective_from_config(config: ml_collections.ConfigDict) -> objectives.Objective:
  """The validated objective of a config: config.objective.name and the options that estimator takes."""
  name = config.objective.name
  kwargs = {} if name == objectives.CROSS_ENTROPY else estimators.kwargs_from_config(config.objective)
  return objectives.make_objective(name, kwargs, config.rollout.num_samples, config.rollout.get("sampler", "auto"))


class ClassificationTask(base.Task):
  """Image classification as a one-step pass/fail task (see the module docstring)."""

  trainer = "classification"

  def validate(self) -> objectives.Objective:
    """Checks the task's fields and returns the objective; raises ValueError naming the offending field."""
    config = self.config
    objective = objective_from_config(config)
    objective_block = config.objective
    for field, default in (("entropy_coef", 0.0), ("smoothing_gamma", 0.0), ("self_filter", False)):
      if objective_block.get(field, default) != default:
        raise ValueError(f"config.objective.{field}={objective_block[field]!r}: the classification testbed's "
                         "count-based objectives take no entropy bonus, Differential Smoothing or SELF; leave it "
                         f"at {default!r}.")

    def positive_int(path: str, value, allow_zero: bool = False):
      if isinstance(value, bool) or int(value) != value or value < (0 if allow_zero else 1):
        raise ValueError(f"config.{path}={value!r} must be an integer >= {0 if allow_zero else 1}.")

    positive_int("train.batch_size", config.train.batch_size)
    positive_int("train.steps_per_call", config.train.steps_per_call)
    positive_int("eval.every_steps", config.eval.every_steps, allow_zero=True)
    positive_int("eval.batch_size", config.eval.batch_size)
    positive_int("eval.num_train_examples", config.eval.num_train_examples, allow_zero=True)
    if config.train.num_steps <= 0 and not config.train.num_epochs > 0:
      raise ValueError(f"Set config.train.num_steps > 0 or config.train.num_epochs > 0 (got "
                       f"{config.train.num_steps}, {config.train.num_epochs}).")
    spc = config.train.steps_per_call
    for path, value in (("log_every_steps", config.log_every_steps), ("eval.every_steps", config.eval.every_steps),
                        ("checkpoint_every_steps", config.checkpoint_every_steps)):
      if value % spc:
        raise ValueError(f"config.{path}={value} must be a multiple of config.train.steps_per_call={spc} "
                         "(logging, evaluation and checkpoints happen between fused calls).")
    ks = tuple(config.eval.ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
      raise ValueError(f"config.eval.ks={ks!r} must be integers >= 1.")
    optim = config.optim
    if optim.name not in ("sgd", "adamw"):
      raise ValueError(f"config.optim.name={optim.name!r}; allowed: 'sgd', 'adamw'.")
    if not optim.learning_rate > 0:
      raise ValueError(f"config.optim.learning_rate={optim.learning_rate!r} must be > 0.")
    if not 0 <= optim.momentum < 1:
      raise ValueError(f"config.optim.momentum={optim.momentum!r} must lie in [0, 1).")
    if optim.weight_decay < 0 or optim.grad_clip < 0:
      raise ValueError("config.optim.weight_decay and config.optim.grad_clip must be >= 0.")
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
    return objective

  def batch_sizes(self) -> dict[str, int]:
    return {"train.batch_size": self.config.train.batch_size, "eval.batch_size": self.config.eval.batch_size}

  def dataset_sizes(self, workdir: str | None) -> tuple[int | None, int | None]:
    """(train, held-out) example counts without reading the data: known for the procedural dataset, read from
    the dataset info of a prepared TFDS dataset, else (None, None)."""
    config = self.config
    base_name, _, variant = config.data.name.partition("/")
    if base_name == data_lib.PROCEDURAL_NAME:
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
    except Exception:  # pylint: disable=broad-except  # Unknown or unprepared: loading says why.
      return None, None

  def num_steps(self, num_train: int | None) -> int | None:
    """The run's number of steps, or None when it depends on a dataset whose size is not known yet."""
    if self.config.train.num_steps > 0:
      return int(self.config.train.num_steps)
    if num_train is None:
      return None
    return int(math.ceil(self.config.train.num_epochs * (num_train // int(self.config.train.batch_size))))

  def load(self, workdir: str) -> data_lib.ClassificationData:
    return data_lib.load_data(self.config.data, default_data_dir=os.path.join(workdir, "tfds"))

  def expected_work(self) -> dict[str, str]:
    config = self.config
    objective = objective_from_config(config)
    num_train, num_eval = self.dataset_sizes(None)
    batch_size = int(config.train.batch_size)
    num_steps = self.num_steps(num_train)

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
      work["sampled classes (examples x N)"] = f"{examples * objective.num_samples:,} (N = {objective.num_samples})"
    every = int(config.eval.every_steps)
    eval_steps = {0, num_steps} | (set(range(every, num_steps + 1, every)) if every else set())
    held_out = num_eval if config.eval.max_examples < 0 or num_eval is None else min(num_eval, config.eval.max_examples)
    work["evaluations"] = (f"{len(eval_steps)} (at the start, every {every} steps and at the end)" if every
                           else "2 (at the start and at the end)")
    work["examples per evaluation"] = (f"{count(held_out)} held-out + {count(config.eval.num_train_examples)} "
                                       "train-subset")
    return work


def make_task(config: ml_collections.ConfigDict) -> ClassificationTask:
  return ClassificationTask(config)
