"""Fault injection on the classification trainer (a tiny procedural run): no fault may lose records or report a
wrong result. One finished tiny run is made once; each test copies its workdir, injects one fault and re-runs.
"""

import json
import os
import shutil
import sys

import pytest

from maxrl_jax import checkpoints
from maxrl_jax import training_loop
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.classification import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import classification as cls_configs  # noqa: E402
import run_files  # noqa: E402  (tests/run_files.py)

TIMING_FIELDS = ("examples_per_s",)
EVALS = ("eval", "eval_train", "initial_eval")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **overrides):
  """20 steps of an MLP on 100 procedural classes: train records, evaluations and checkpoints at 10 and 20."""
  config = cls_configs.get_config("tiny")
  config.data.name = "procedural_classes/c100"
  config.data.data_dir = data_dir
  config.model.hidden_sizes = (32,)
  config.train.batch_size = 32
  config.train.num_steps = 20
  config.train.log_every = 10
  config.train.steps_per_call = 10
  config.train.progress_bar = False
  config.optim.warmup_steps = 0
  config.eval.every_steps = 10
  config.eval.batch_size = 500
  config.eval.num_train_examples = 200
  config.rollout.num_samples = 64
  config.checkpoint.every_steps = 10
  return run_files.with_overrides(config, overrides)


_metrics = run_files.metrics


def _deterministic(records):
  return run_files.without(records, TIMING_FIELDS)


_summary = run_files.summary


_flip_bytes = run_files.flip_bytes


_largest_file = run_files.largest_file


@pytest.fixture(scope="module")
def finished(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finished") / "run")
  train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  return workdir


@pytest.fixture
def copy(finished, tmp_path):
  def make():
    target = str(tmp_path / "run")
    shutil.copytree(finished, target)
    os.remove(os.path.join(target, "summary.json"))  # An interrupted run: not finished yet.
    return target
  return make


def test_deleted_metrics_are_rebuilt_from_the_checkpoint(data_dir, finished, copy, capsys):
  workdir = copy()
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  summary = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  assert "rebuilt from the checkpoint" in capsys.readouterr().out
  original = _summary(finished)
  assert summary["steps"] == 20 and summary["config_sha256"] == original["config_sha256"]
  assert {k: summary[k] for k in EVALS} == {k: original[k] for k in EVALS}
  assert _metrics(workdir) == _metrics(finished)


def test_a_malformed_line_is_an_error_naming_file_and_line(data_dir, copy):
  workdir = copy()
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  lines[2] = '{"phase": "train", "step": \n'
  with open(path, "w") as f:
    f.writelines(lines)
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 3, is not a metrics record"):
    train_lib.train_and_evaluate(tiny_config(data_dir), workdir)


def test_a_corrupted_checkpoint_falls_back_to_the_previous_good_one(data_dir, finished, copy):
  workdir = copy()
  _flip_bytes(_largest_file(os.path.join(workdir, "checkpoints", "train", "20")))
  with pytest.warns(UserWarning, match=r"checkpoint .*train/20 is corrupt"):
    summary = train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  # Resumed from step 10 and redid steps 11-20: the same result as the uninterrupted run.
  assert summary["resumed_from_step"] == 10
  original = _summary(finished)
  assert {k: summary[k] for k in EVALS} == {k: original[k] for k in EVALS}
  assert _deterministic(_metrics(workdir)) == _deterministic(_metrics(finished))
  assert any(n.startswith("corrupt-20-") for n in os.listdir(os.path.join(workdir, "checkpoints", "train")))


def test_no_good_checkpoint_is_a_clear_error(data_dir, copy):
  workdir = copy()
  for step in ("10", "20"):
    _flip_bytes(_largest_file(os.path.join(workdir, "checkpoints", "train", step)))
  with pytest.warns(UserWarning):
    with pytest.raises(checkpoints.CheckpointError, match=r"(?s)No good .train. checkpoint.*step 20.*step 10"):
      train_lib.train_and_evaluate(tiny_config(data_dir), workdir)


def test_another_config_cannot_adopt_the_checkpoints_even_without_config_json(data_dir, copy):
  workdir = copy()
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(checkpoints.CheckpointError, match=r"another config \(objective.name: 'maxrl' -> 'grpo'"):
    train_lib.train_and_evaluate(tiny_config(data_dir, **{"objective.name": "grpo"}), workdir)


def test_rerunning_a_finished_run_changes_nothing(data_dir, finished, capsys):
  files = lambda: {os.path.relpath(os.path.join(r, n), finished): os.path.getmtime(os.path.join(r, n))
                   for r, _, ns in os.walk(finished) for n in ns if n != workdir_lib.LOCK_FILE}
  before = files()
  with open(os.path.join(finished, "summary.json")) as f:
    text = f.read()
  summary = train_lib.train_and_evaluate(tiny_config(data_dir), finished)
  assert "already holds this run, finished" in capsys.readouterr().out
  with open(os.path.join(finished, "summary.json")) as f:
    assert f.read() == text
  assert files() == before
  assert summary == json.loads(text)


def test_a_busy_workdir_stops_at_once(data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with workdir_lib.WorkdirLock(workdir):
    with pytest.raises(workdir_lib.WorkdirBusyError, match="is in use by another run"):
      train_lib.train_and_evaluate(tiny_config(data_dir), workdir)
  assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]


@pytest.mark.parametrize("checkpoint_every", [10, 20])
def test_a_diverged_run_stops_naming_the_step_and_the_quantity(data_dir, tmp_path, checkpoint_every):
  workdir = str(tmp_path / "run")
  config = tiny_config(data_dir, **{"optim.learning_rate": float("inf"), "train.log_every": 20,
                                    "checkpoint.every_steps": checkpoint_every})
  with pytest.raises(training_loop.NonFiniteError, match=r"train diverged: loss is nan at step 2\b"):
    train_lib.train_and_evaluate(config, workdir)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  directory = os.path.join(workdir, "checkpoints", "train")
  assert not [s for s in os.listdir(directory) if s.isdigit()]  # Nothing after the divergence was saved.
  # Only the evaluation of the initial parameters was recorded.
  assert [(r["step"], r["phase"]) for r in _metrics(workdir)] == [(0, "eval"), (0, "eval_train")]
