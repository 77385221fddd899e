"""The step loop every trainer runs for a phase (SFT or RL): step, log, evaluate, checkpoint.

`run_phase` owns what the loops of train_maze.py and text/train.py have in common, so that logging
intervals, evaluation points, checkpoint points and the step clock mean the same thing everywhere:

    for step in start+1 .. end:
        state, metrics = step_fn(state, step)
        every log_every steps (and at `end`):     one JSONL record, the mean of the interval's metrics
        every eval_every steps (and at `end`):    {"phase": "eval", "step", **evaluate(state.params)}
        every checkpoint_every steps (and `end`): save(step, state)

Step times (`step_time_s`, `tokens_per_s`) exclude the evaluation and checkpoint pauses. What a step does
(on-device RL step, host verification, SFT batch) stays with the trainer in `step_fn`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from typing import Any

from maxrl_jax import run_logging


def _due(step: int, every: int | None, end: int) -> bool:
  return step == end or bool(every) and step % every == 0


def run_phase(
    phase: str,
    state: Any,
    step_fn: Callable[[Any, int], tuple[Any, dict]],
    *,
    start: int,
    end: int,
    writer: Any,
    save: Callable[[int, Any], None],
    log_every: int,
    checkpoint_every: int,
    progress: Callable[..., Any] | None = None,
    evaluate: Callable[[Any], dict] | None = None,
    eval_every: int | None = None,
    evals: MutableMapping[int, dict] | None = None,
    tokens_key: str | None = None,
    annotate: Callable[[dict, int], None] | None = None,
) -> Any:
  """Runs steps start+1..end of one phase and returns the final state.

  Args:
    phase: the "phase" field of the interval records ("sft", "rl").
    state: the state the first step receives (a resumed checkpoint or a fresh one).
    step_fn: (state, step) -> (new state, metrics of that step; device arrays are fine: they are fetched
      only when an interval is logged, so dispatch runs ahead of the host).
    start, end: the last step already done (0, or the resumed checkpoint's step) and the last step to do.
    writer: the run's metrics writer (run_logging.MetricsWriter, or sharding.ChiefOnlyWriter over one).
    save: (step, state) -> None, writes a checkpoint.
    log_every, checkpoint_every: intervals in steps; the last step always logs and saves.
    progress: optional tqdm-like factory called as progress(iterable, initial=, total=); the RL phase's bar
      shows the interval's pass rate.
    evaluate: optional params -> dict of held-out metrics, run every `eval_every` steps and at `end`;
      each result is written as an "eval" record and stored in `evals[step]`.
    tokens_key: metric summed into `tokens_per_s` (e.g. "generated_tokens").
    annotate: optional (record, step) -> None, adds fields (e.g. the epoch) to an interval record.
  """
  if evaluate is not None and evals is None:
    raise ValueError("Pass `evals` (a dict) to receive the evaluations.")
  steps = range(start + 1, end + 1)
  bar = progress(steps, initial=start, total=end) if progress is not None else steps
  history, tick = [], time.time()
  for step in bar:
    state, step_metrics = step_fn(state, step)
    history.append(step_metrics)
    if _due(step, log_every, end):
      record = run_logging.interval_record(phase, step, history, tick, tokens_key=tokens_key)
      if annotate is not None:
        annotate(record, step)
      writer.write(record)
      if "pass_rate" in record and hasattr(bar, "set_postfix"):
        bar.set_postfix(pass_rate=f"{record['pass_rate']:.3f}")
      history, tick = [], time.time()
    pause = time.time()
    if evaluate is not None and _due(step, eval_every, end):
      evals[step] = {"phase": "eval", "step": step, **evaluate(state.params)}
      writer.write(evals[step])
    if _due(step, checkpoint_every, end):
      save(step, state)
    tick += time.time() - pause  # Step times exclude evaluation and checkpointing.
  return state
