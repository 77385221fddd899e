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

A diverged run stops instead of looking successful: when a logged interval has a non-finite value of one of
`finite_keys` (loss, gradient norm), or the parameters are not all finite when a checkpoint is due, the loop
raises `NonFiniteError` naming the phase, the first bad step and the quantity, before saving anything, so the
last checkpoint kept is the last finite one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from maxrl_jax import run_logging

FINITE_KEYS = ("loss", "grad_norm")


class NonFiniteError(RuntimeError):
  """Training produced a non-finite loss, gradient norm or parameter."""


@jax.jit
def params_are_finite(params) -> jax.Array:
  """bool scalar: every floating-point leaf of `params` is finite (one device reduction)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(params)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _first_non_finite(phase, history, first_step, keys):
  """(step, key, value) of the first non-finite metric among `keys` in an interval's history, else None."""
  for offset, metrics in enumerate(jax.device_get(list(history))):
    for key in keys:
      if key in metrics and not math.isfinite(float(np.asarray(metrics[key]))):
        return first_step + offset, key, float(np.asarray(metrics[key]))
  return None


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
    finite_keys: Sequence[str] = FINITE_KEYS,
    last_saved: int | None = None,
    members: Sequence[Mapping[str, Any]] | None = None,
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
    finite_keys: metrics that must stay finite; a non-finite one raises NonFiniteError (as do non-finite
      parameters at a checkpoint).
    last_saved: the step of the newest checkpoint already on disk (for the error message).
    members: for a population (maxrl_jax/population.py): one dict of record fields per member (e.g.
      {"member": 0, "objective": "maxrl", "seed": 0}). Each step's metrics are then [K] arrays, every logged
      interval writes K records (one per member, with its fields), and `evaluate` returns a list of K dicts,
      written as K "eval" records and stored as a list in `evals[step]`. A non-finite value of any member
      stops the whole population.
  """
  if evaluate is not None and evals is None:
    raise ValueError("Pass `evals` (a dict) to receive the evaluations.")
  steps = range(start + 1, end + 1)
  bar = progress(steps, initial=start, total=end) if progress is not None else steps
  history, tick = [], time.time()
  saved = last_saved if last_saved is not None else (start or None)

  def diverged(step, quantity, value):
    where = f"the checkpoint of step {saved}" if saved else "no checkpoint of this phase"
    return NonFiniteError(
        f"{phase} diverged: {quantity} is {value} at step {step}. Nothing after it was saved; the run keeps "
        f"{where} (the last finite state). Lower the learning rate (or check the data) and start again in a "
        "new --workdir.")

  for step in bar:
    state, step_metrics = step_fn(state, step)
    history.append(step_metrics)
    if _due(step, log_every, end):
      if members is None:
        records = [run_logging.interval_record(phase, step, history, tick, tokens_key=tokens_key)]
      else:
        records = run_logging.member_interval_records(phase, step, history, tick, members,
                                                      tokens_key=tokens_key)
      for record in records:
        if annotate is not None:
          annotate(record, step)
        writer.write(record)
      for i, record in enumerate(records):
        if any(key in record and not math.isfinite(record[key]) for key in finite_keys):
          member_history = history if members is None else [
              {k: np.asarray(v)[i] for k, v in h.items()} for h in jax.device_get(list(history))]
          bad = _first_non_finite(phase, member_history, step - len(history) + 1, finite_keys)
          bad = bad or (step, "an interval mean", "not finite")
          if members is not None:
            bad = (bad[0], f"{bad[1]} of member {dict(members[i])}", bad[2])
          raise diverged(*bad)
      rates = [r["pass_rate"] for r in records if "pass_rate" in r]
      if rates and hasattr(bar, "set_postfix"):
        bar.set_postfix(pass_rate=f"{np.mean(rates):.3f}")
      history, tick = [], time.time()
    pause = time.time()
    checkpoint_due = _due(step, checkpoint_every, end)
    if checkpoint_due and not bool(params_are_finite(state.params)):
      raise diverged(step, "a parameter", "not finite")
    if evaluate is not None and _due(step, eval_every, end):
      if members is None:
        evals[step] = {"phase": "eval", "step": step, **evaluate(state.params)}
        writer.write(evals[step])
      else:
        evals[step] = [{"phase": "eval", "step": step, **dict(fields), **result}
                       for fields, result in zip(members, evaluate(state.params), strict=True)]
        for record in evals[step]:
          writer.write(record)
    if checkpoint_due:
      save(step, state)
      saved = step
    tick += time.time() - pause  # Step times exclude evaluation and checkpointing.
  return state


class RecordKeeper:
  """The run's metrics records in memory (what each checkpoint stores) and in metrics.jsonl.

  Use `RecordKeeper.resume(writer, records_of_the_checkpoint, where)` when a phase starts: the checkpoint's
  records are the source of truth, so metrics.jsonl is rewritten to exactly them (a deleted, shortened or
  edited file is rebuilt, with a message); a malformed line in the file is an error naming it.
  """

  def __init__(self, writer: Any, records: list[dict]):
    self.writer = writer
    self.records = [dict(r) for r in records]

  @classmethod
  def resume(cls, writer: Any, records: list[dict] | None, where: str) -> "RecordKeeper":
    records = [dict(r) for r in (records or [])]
    on_file = writer.read()  # Raises, naming file and line, on a malformed record.
    if on_file[:len(records)] != records:
      print(f"{writer.path}: did not hold the records of {where} ({len(on_file)} records on file, "
            f"{len(records)} in the checkpoint); rebuilt from the checkpoint.", flush=True)
    replace = getattr(writer, "replace_all", None)
    if replace is None:
      writer.truncate(lambda r: False)
      for r in records:
        writer.write(r)
    else:
      replace(records)
    return cls(writer, records)

  @property
  def path(self):
    return getattr(self.writer, "path", None)

  def read(self) -> list[dict]:
    return [dict(r) for r in self.records]

  def write(self, record) -> None:
    self.records.append(run_logging.jsonable_record(record))
    self.writer.write(record)
