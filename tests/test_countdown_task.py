"""The Countdown task on the RL trainer (configs/countdown.py:tiny): a run with Differential Smoothing and SELF,
a population of two objectives x two seeds, and a run stopped by a signal that resumes to the same records."""

import json

import pytest

from configs import countdown as countdown_config
from maxrl_jax import config_fields
from maxrl_jax import run_logging
from maxrl_jax import train
from maxrl_jax.tasks import base as tasks_base
from maxrl_jax.tasks import countdown
from maxrl_jax.trainers import harness
from maxrl_jax.trainers import loop

TIMING = ("step_time_s", "tokens_per_s")


def tiny(**overrides):
  config = countdown_config.get_config("tiny")
  config.logging.tensorboard = False
  config.logging.plots = False
  config_fields.set_fields(config, overrides)
  return config


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in run_logging.MetricsWriter(str(workdir)).read()]


SMOOTH_SELF = {"objective.name": "grpo", "objective.smoothing_gamma": 0.05, "objective.self_filter": True}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("countdown") / "run"
  return workdir, train.train_and_evaluate(tiny(**SMOOTH_SELF), str(workdir))


def test_countdown_is_a_task_of_the_entry_point():
  assert {"countdown", "maze", "text", "classification"} <= set(tasks_base.available())
  assert isinstance(tasks_base.make_task(tiny()), countdown.CountdownTask)


def test_a_run_with_smoothing_and_self_writes_its_results(single):
  workdir, summary = single
  records = _records(workdir)
  assert {r["phase"] for r in records} == {"sft", "rl", "eval"}
  rl = [r for r in records if r["phase"] == "rl"]
  assert all("greedy_solved_fraction" in r and r["logprob_mismatch"] < 1e-4 for r in rl)
  assert summary["objective"] == "grpo" and summary["task"] == "countdown"
  assert set(summary["eval"]) >= {"pass@1", "pass@8", "pass@1_se", "fraction_solved"}
  report = summary["training_problems"]
  assert report["drawn"] == 6 * 8 + 6 * 4 and report["overlap_with_heldout"] == 0  # SFT + RL problems
  assert summary["heldout_problems"]["num_problems"] == 8
  assert json.loads((workdir / "summary.json").read_text())["eval"] == summary["eval"]


def test_a_stopped_run_saves_its_step_and_resumes_to_the_same_records(single, tmp_path, monkeypatch):
  reference, _ = single
  workdir = tmp_path / "stopped"
  seen = []  # Steps asked about: SFT 1..6, then RL 1..; stop after RL step 3 (a signal there).
  monkeypatch.setattr(harness.StopSignals, "requested", lambda self, step: seen.append(step) or len(seen) == 6 + 3)
  with pytest.raises(loop.Preempted, match="stopped at step 3"):
    train.train_and_evaluate(tiny(**SMOOTH_SELF), str(workdir))
  assert (workdir / "checkpoints" / "rl" / "3").is_dir() and not (workdir / "summary.json").exists()
  monkeypatch.undo()
  summary = train.train_and_evaluate(tiny(**SMOOTH_SELF), str(workdir))
  assert _records(workdir) == _records(reference)
  assert summary["eval"] == json.loads((reference / "summary.json").read_text())["eval"]


def test_a_population_of_two_objectives_and_two_seeds(tmp_path):
  config = tiny()
  config.population.objectives = ("maxrl", "pkpo2: objective.name=pkpo, objective.k=2")
  config.population.seeds = (0, 1)
  summary = train.train_and_evaluate(config, str(tmp_path / "population"))
  assert [m["name"] for m in summary["members"]] == ["maxrl/seed0", "maxrl/seed1", "pkpo2/seed0", "pkpo2/seed1"]
  assert [row["objective"] for row in summary["table"]] == ["maxrl", "pkpo2"]
  assert summary["training_problems"]["seed1"]["overlap_with_heldout"] == 0
  records = _records(tmp_path / "population")
  assert sorted({r["seed"] for r in records if r["phase"] == "sft"}) == [0, 1]
  assert sorted({r["member"] for r in records if r["phase"] == "rl"}) == [0, 1, 2, 3]
  exported = tmp_path / "population" / "members" / "pkpo2" / "seed1" / "summary.json"
  assert json.loads(exported.read_text())["eval"] == summary["members"][3]["eval"]


@pytest.mark.parametrize("overrides, match", [
    ({"countdown.num_numbers": 5}, r"config.countdown.num_numbers must be in \{3, 4\}"),
    ({"countdown.max_target": 3}, r"config.countdown.max_target must be in"),
    ({"rollout.max_new_tokens": 4}, r"config.rollout.max_new_tokens: 4 is shorter than the longest canonical"),
    ({"eval.prompt_chunk": 3}, r"config.eval.prompt_chunk: 3 must divide eval.num_problems=8"),
    ({"model.max_positions": 12}, r"config.model.max_positions: 12 < prompt"),
    ({"objective.name": "maclaurin", "objective.order": 9}, r"exceeds the group size N = 4"),
])
def test_bad_countdown_configs_are_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.validate_config(tiny(**overrides))


def test_every_objective_of_the_registry_is_a_valid_countdown_run():
  from maxrl_jax import estimators  # pylint: disable=import-outside-toplevel

  for name in estimators.ADVANTAGE_ESTIMATORS:
    extra = {"objective.order": 3} if name == "maclaurin" else {"objective.k": 2} if name == "pkpo" else {}
    train.validate_config(tiny(**{"objective.name": name, **extra}))
  countdown_config.get_config("default")  # The default preset loads too.
  train.validate_config(countdown_config.get_config("default"))
