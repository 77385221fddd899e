"""training_loop.run_phase: which steps log, evaluate and save, what a record holds, and resume."""

import pytest

from maxrl_jax import run_logging
from maxrl_jax import training_loop


class _State:
  def __init__(self, value):
    self.value = value
    self.params = {"value": value}


def _step(state, step):
  """Adds the step to the state; reports it, a pass rate and 2 generated tokens."""
  return _State(state.value + step), {"step_value": float(step), "pass_rate": 0.25, "generated_tokens": 2.0}


def _run(tmp_path, start, end, state=None, **kwargs):
  tmp_path.mkdir(parents=True, exist_ok=True)
  writer = run_logging.MetricsWriter(str(tmp_path))
  saves, evals = [], {}
  final = training_loop.run_phase(
      "rl", state or _State(0), _step, start=start, end=end, writer=writer,
      save=lambda step, s: saves.append((step, s.value)), log_every=2, checkpoint_every=4,
      evaluate=lambda params: {"pass@1": params["value"] / 100.0}, eval_every=3, evals=evals,
      tokens_key="generated_tokens", annotate=lambda record, step: record.update(epoch=step // 5), **kwargs)
  return final, writer.read(), saves, evals


def test_intervals_records_and_saves(tmp_path):
  final, records, saves, evals = _run(tmp_path, 0, 7)
  assert final.value == sum(range(1, 8))
  logged = [r for r in records if r["phase"] == "rl"]
  assert [r["step"] for r in logged] == [2, 4, 6, 7]  # every 2 steps and the last one
  assert [r["step_value"] for r in logged] == [1.5, 3.5, 5.5, 7.0]  # mean over the interval
  assert [r["epoch"] for r in logged] == [0, 0, 1, 1]
  assert all(r["step_time_s"] >= 0 and r["tokens_per_s"] > 0 for r in logged)
  assert sorted(evals) == [3, 6, 7]
  assert evals[6] == {"phase": "eval", "step": 6, "pass@1": sum(range(1, 7)) / 100.0}
  assert [r["step"] for r in records if r["phase"] == "eval"] == [3, 6, 7]
  assert saves == [(4, sum(range(1, 5))), (7, sum(range(1, 8)))]


def test_resumed_phase_continues_where_the_checkpoint_stopped(tmp_path):
  _, whole, _, _ = _run(tmp_path / "whole", 0, 7)
  first_state, _, saves, _ = _run(tmp_path / "resumed", 0, 4)
  assert saves[-1] == (4, first_state.value)
  final, _, _, _ = _run(tmp_path / "resumed", 4, 7, state=first_state)
  resumed = run_logging.MetricsWriter(str(tmp_path / "resumed")).read()
  drop_times = lambda rs: [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in rs]
  assert final.value == sum(range(1, 8))
  # The first launch ends at its own last step (4), which an uninterrupted run logs too (4 is a log point);
  # only the eval it adds at its end is extra.
  assert drop_times([r for r in resumed if not (r["phase"] == "eval" and r["step"] == 4)]) == drop_times(whole)


def test_evaluate_needs_a_dict_to_fill(tmp_path):
  with pytest.raises(ValueError, match="evals"):
    training_loop.run_phase("rl", _State(0), _step, start=0, end=1, writer=run_logging.MetricsWriter(
        str(tmp_path)), save=lambda *_: None, log_every=1, checkpoint_every=1, evaluate=lambda p: {})
