"""trainers/loop.run_phase: which steps log, evaluate and save, what a record holds, resume, divergence, stops."""

import flax
import numpy as np
import pytest

from maxrl_jax import run_logging
from maxrl_jax.trainers import loop


@flax.struct.dataclass
class _State:
  value: float


def _step(state, step):
  """Adds the step to the state; reports it, a pass rate and 2 generated tokens."""
  return _State(state.value + step), {"step_value": float(step), "pass_rate": 0.25, "generated_tokens": 2.0,
                                      "loss": 1.0}


def _run(tmp_path, start, end, state=None, step_fn=_step, **kwargs):
  tmp_path.mkdir(parents=True, exist_ok=True)
  writer = run_logging.MetricsWriter(str(tmp_path))
  saves, evals = [], {}
  final = loop.run_phase(
      "rl", state or _State(0), step_fn, start=start, end=end, writer=writer,
      save=lambda step, s, pending: saves.append((step, s.value, pending)), log_every=2, checkpoint_every=4,
      evaluate=lambda s, step: [{"phase": "eval", "pass@1": s.value / 100.0}], eval_every=3, evals=evals,
      throughput={"tokens_per_s": "generated_tokens"}, annotate=lambda record, step: record.update(epoch=step // 5),
      **kwargs)
  return final, writer.read(), saves, evals


def _drop_times(records):
  return [{k: v for k, v in r.items() if k not in ("step_time_s", "tokens_per_s")} for r in records]


def test_intervals_records_and_saves(tmp_path):
  final, records, saves, evals = _run(tmp_path, 0, 7)
  assert final.value == sum(range(1, 8))
  logged = [r for r in records if r["phase"] == "rl"]
  assert [r["step"] for r in logged] == [2, 4, 6, 7]  # every 2 steps and the last one
  assert [r["step_value"] for r in logged] == [1.5, 3.5, 5.5, 7.0]  # mean over the interval
  assert [r["epoch"] for r in logged] == [0, 0, 1, 1]
  assert all(r["step_time_s"] >= 0 and r["tokens_per_s"] > 0 for r in logged)
  assert sorted(evals) == [3, 6, 7]
  assert evals[6] == [{"phase": "eval", "step": 6, "pass@1": sum(range(1, 7)) / 100.0}]
  assert [r["step"] for r in records if r["phase"] == "eval"] == [3, 6, 7]
  assert [(s, v) for s, v, _ in saves] == [(4, sum(range(1, 5))), (7, sum(range(1, 8)))]
  assert all(pending == [] for _, _, pending in saves)


def test_resumed_phase_continues_where_the_checkpoint_stopped(tmp_path):
  _, whole, _, _ = _run(tmp_path / "whole", 0, 7)
  first_state, _, saves, _ = _run(tmp_path / "resumed", 0, 4)
  assert saves[-1][:2] == (4, first_state.value)
  final, _, _, _ = _run(tmp_path / "resumed", 4, 7, state=first_state)
  resumed = run_logging.MetricsWriter(str(tmp_path / "resumed")).read()
  assert final.value == sum(range(1, 8))
  # The first launch ends at its own last step (4), which an uninterrupted run logs too (4 is a log point);
  # only the eval it adds at its end is extra.
  assert _drop_times([r for r in resumed if not (r["phase"] == "eval" and r["step"] == 4)]) == _drop_times(whole)


def test_a_stop_request_saves_the_step_with_its_unlogged_metrics_and_resumes_exactly(tmp_path):
  _, whole, _, _ = _run(tmp_path / "whole", 0, 7)
  with pytest.raises(loop.Preempted, match="stopped at step 5"):
    _run(tmp_path / "stopped", 0, 7, stop_requested=lambda step: step == 5)
  writer = run_logging.MetricsWriter(str(tmp_path / "stopped"))
  records = writer.read()
  # Step 5 is not a log point: its metrics travel with the checkpoint, not into metrics.jsonl.
  assert [r["step"] for r in records if r["phase"] == "rl"] == [2, 4]
  # What the checkpoint of step 5 holds, and the resumed launch from it.
  state, saves = _State(sum(range(1, 6))), []
  (tmp_path / "probe").mkdir()
  with pytest.raises(loop.Preempted):
    loop.run_phase("rl", _State(0), _step, start=0, end=7, writer=run_logging.MetricsWriter(str(tmp_path / "probe")),
                   save=lambda step, s, pending: saves.append((step, pending)), log_every=2, checkpoint_every=4,
                   stop_requested=lambda step: step == 5)
  assert [s for s, _ in saves] == [4, 5] and saves[0][1] == [] and len(saves[1][1]) == 1
  pending = saves[1][1]
  assert pending[0]["step_value"] == 5.0
  _run(tmp_path / "stopped", 5, 7, state=state, pending=pending)
  resumed = run_logging.MetricsWriter(str(tmp_path / "stopped")).read()
  assert _drop_times(resumed) == _drop_times(whole)


def test_a_non_finite_interval_is_not_written(tmp_path):
  def step_fn(state, step):
    new, metrics = _step(state, step)
    if step == 4:
      metrics["loss"] = float("nan")
    return new, metrics

  with pytest.raises(loop.NonFiniteError, match=r"rl diverged: loss is nan at step 4"):
    _run(tmp_path, 0, 7, step_fn=step_fn)
  records = run_logging.MetricsWriter(str(tmp_path)).read()
  assert [r["step"] for r in records if r["phase"] == "rl"] == [2]  # Nothing of the diverged interval.


def test_population_records_one_per_member_and_name_the_diverged_member(tmp_path):
  members = [{"member": 0, "objective": "maxrl", "seed": 0}, {"member": 1, "objective": "grpo", "seed": 0}]

  def step_fn(state, step):
    loss = np.asarray([1.0, np.nan if step == 3 else 1.0], np.float32)
    return state, {"loss": loss, "pass_rate": np.asarray([0.5, 0.25], np.float32)}

  writer = run_logging.MetricsWriter(str(tmp_path))
  with pytest.raises(loop.NonFiniteError, match=r"loss of member \{'member': 1, 'objective': 'grpo'.* at step 3"):
    loop.run_phase("rl", _State(0), step_fn, start=0, end=4, writer=writer, save=lambda *a: None, log_every=2,
                   checkpoint_every=2, members=members)
  records = writer.read()
  assert [(r["step"], r["member"], r["pass_rate"]) for r in records] == [(2, 0, 0.5), (2, 1, 0.25)]


def test_fused_calls_log_every_step_of_the_interval(tmp_path):
  def step_fn(state, step):  # A call of the steps after the previous call, metrics [steps of the call].
    count = 2 if step % 2 == 0 else 1
    return state, {"loss": np.arange(step - count + 1, step + 1, dtype=np.float32)}

  writer = run_logging.MetricsWriter(str(tmp_path))
  loop.run_phase("train", _State(0), step_fn, start=0, end=5, writer=writer, save=lambda *a: None, log_every=4,
                 checkpoint_every=4, stride=2)
  records = writer.read()
  assert [(r["step"], r["loss"]) for r in records] == [(4, 2.5), (5, 5.0)]


def test_evaluate_needs_a_dict_to_fill(tmp_path):
  with pytest.raises(ValueError, match="evals"):
    loop.run_phase("rl", _State(0), _step, start=0, end=1, writer=run_logging.MetricsWriter(str(tmp_path)),
                   save=lambda *_: None, log_every=1, checkpoint_every=1, evaluate=lambda s, step: [])
