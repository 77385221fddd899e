"""`train_and_evaluate(config, workdir)`: the experiment a config describes, whatever its task.

    from maxrl_jax import train
    summary = train.train_and_evaluate(config, "workdirs/maze")     # config: e.g. configs/maze.py's get_config()

`config.task` names the task (maxrl_jax/tasks/<task>); the task names its trainer (maxrl_jax/trainers/<name>.py:
"rl" for token tasks, "classification"); the harness (maxrl_jax/trainers/harness.py) runs the lifecycle.
"""

from __future__ import annotations

import importlib

import ml_collections

from maxrl_jax.tasks import base as tasks_base
from maxrl_jax.trainers import harness


def make_trainer(config: ml_collections.ConfigDict):
  """The trainer of a config: its task's trainer module's `make_trainer(config, task)`."""
  task = tasks_base.make_task(config)
  module = importlib.import_module(f"maxrl_jax.trainers.{task.trainer}")
  return module.make_trainer(config, task)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Every check a run makes before it starts (the shared fields, the trainer's and the task's)."""
  harness.validate_run_fields(config)
  make_trainer(config).validate()


def expected_work(config: ml_collections.ConfigDict) -> dict[str, str]:
  """Validates the config and returns the work a run asks for ({what: how much}; `main --dry_run`)."""
  trainer = make_trainer(config)
  harness.validate_run_fields(config)
  trainer.validate()
  module = importlib.import_module(type(trainer).__module__)
  return module.expected_work(config, trainer.task)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the experiment in `workdir` and returns its summary (<workdir>/summary.json)."""
  return harness.train_and_evaluate(config, workdir, make_trainer(config))
