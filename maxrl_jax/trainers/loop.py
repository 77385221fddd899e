"""The step loop every trainer runs for a phase (SFT, RL, supervised training): step, log, evaluate, save.

`run_phase` is the one loop of the package, so that logging intervals, evaluation points, checkpoint points
and the step clock mean the same thing for every task:

    for each call (one step, or `stride` fused steps) until `end`:
        state, metrics = step_fn(state, step)          step: the last step the call completes
        every log_every steps (and at `end`):          one JSONL record, the mean of the interval's metrics
        every eval_every steps (and at `end`):         the records of evaluate(state, step)
        every checkpoint_every steps (and at `end`):   save(step, state, pending)

Step times (`step_time_s`, throughput) exclude the evaluation and checkpoint pauses.

A diverged run stops instead of looking successful: when a logged interval has a non-finite value of one of
`finite_keys` (loss, gradient norm), or the parameters are not all finite when a checkpoint is due, the loop
raises `NonFiniteError` naming the phase, the first bad step and the quantity, before writing or saving
anything of that interval, so metrics.jsonl and the last checkpoint end with the last finite state.

A stop request (`stop_requested`, e.g. SIGTERM before a preemption) ends the loop after the current call:
the state of that step is saved with the metrics of the steps not logged yet (`pending`), and `Preempted`
is raised. A launch that resumes from that checkpoint passes those metrics back (`pending`), so its records
equal an uninterrupted run's.
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


class Preempted(RuntimeError):
  """The run was asked to stop (a signal) and saved its state at the step it reached.

  `signum`: the signal that asked (SIGTERM unless the harness says otherwise).
  """

  signum: int = 15


@jax.jit
def all_finite(tree) -> jax.Array:
  """bool scalar: every floating-point leaf of `tree` is finite (one device reduction)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _due(step: int, every: int | None, end: int) -> bool:
  return step == end or bool(every) and step % every == 0


def _per_step(history: Sequence[Mapping[str, Any]], stride: int) -> list[dict[str, np.ndarray]]:
  """The metrics of every step of the host `history` (calls of several steps: a leading [steps] axis)."""
  out = []
  for metrics in history:
    if stride == 1:
      out.append({k: np.asarray(v) for k, v in metrics.items()})
    else:
      count = len(np.asarray(next(iter(metrics.values()))))
      out.extend({k: np.asarray(v)[i] for k, v in metrics.items()} for i in range(count))
  return out


def interval_record(phase: str, step: int, steps: Sequence[Mapping[str, Any]], seconds: float,
                    throughput: Mapping[str, str], member: int | None = None) -> dict:
  """Mean of the metrics of an interval's steps (host values), with wall time per step.

  For a population (`member` = i) each metric is a [K] array and record i takes element i; the wall time
  per step is the population's, and a throughput is member i's share of it.
  """
  pick = (lambda v: np.asarray(v, np.float64)) if member is None else (
      lambda v: np.asarray(v, np.float64)[member])
  record = {"phase": phase, "step": step}
  for key in steps[0]:
    if key.startswith("_"):  # A diagnostic for messages, not a record field.
      continue
    record[key] = float(np.mean([float(pick(s[key])) for s in steps]))
  record["step_time_s"] = seconds / len(steps)
  for name, key in throughput.items():
    record[name] = float(sum(float(pick(s[key])) for s in steps)) / max(seconds, 1e-9)
  return record


def _first_non_finite(steps: Sequence[Mapping[str, Any]], first_step: int, keys: Sequence[str],
                      member: int | None) -> tuple[int, str, float, dict] | None:
  """(step, metric, value, that step's metrics of the member) of the first non-finite metric among `keys`."""
  for offset, metrics in enumerate(steps):
    for key in keys:
      if key in metrics:
        value = np.asarray(metrics[key], np.float64)
        value = float(value if member is None else value[member])
        if not math.isfinite(value):
          own = {k: (np.asarray(v) if member is None else np.asarray(v)[member]) for k, v in metrics.items()}
          return first_step + offset, key, value, own
  return None


def run_phase(
    phase: str,
    state: Any,
    step_fn: Callable[[Any, int], tuple[Any, dict]],
    *,
    start: int,
    end: int,
    writer: Any,
    save: Callable[[int, Any, list], None],
    log_every: int,
    checkpoint_every: int,
    stride: int = 1,
    progress: Callable[..., Any] | None = None,
    evaluate: Callable[[Any, int], list[dict]] | None = None,
    eval_every: int | None = None,
    evals: MutableMapping[int, list[dict]] | None = None,
    throughput: Mapping[str, str] | None = None,
    annotate: Callable[[dict, int], None] | None = None,
    finite_keys: Sequence[str] = FINITE_KEYS,
    last_saved: int | None = None,
    members: Sequence[Mapping[str, Any]] | None = None,
    pending: Sequence[Mapping[str, Any]] | None = None,
    stop_requested: Callable[[int], bool] | None = None,
    diagnose: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> Any:
  """Runs steps start+1..end of one phase and returns the final state.

  Args:
    phase: the "phase" field of the interval records ("sft", "rl", "train").
    state: the state the first step receives (a resumed checkpoint or a fresh one).
    step_fn: (state, step) -> (new state, metrics); `step` is the last step the call completes. Device
      arrays are fine: they are fetched only when an interval is logged, so dispatch runs ahead of the host.
      With `stride` > 1 each call does `stride` steps (the last call of a phase may do fewer) and every
      metric has a leading [steps of the call] axis.
    start, end: the last step already done (0, or the resumed checkpoint's step) and the last step to do.
    writer: the run's records (trainers.harness.Records, or anything with write(record)).
    save: (step, state, pending) -> None writes a checkpoint; `pending` holds the host metrics of the
      steps after the last logged interval (empty except at a stop request).
    log_every, checkpoint_every, eval_every: intervals in steps (multiples of `stride`); the last step
      always logs, evaluates and saves.
    stride: steps per call of `step_fn` (a fused lax.scan of several steps).
    progress: optional tqdm-like factory called as progress(total=, initial=); the bar shows the pass rate.
    evaluate: optional (state, step) -> held-out records (each with its "phase", e.g. "eval"; the loop
      sets "step"), written and stored in `evals[step]`.
    throughput: {record field: summed metric}, e.g. {"tokens_per_s": "generated_tokens"}.
    annotate: optional (record, step) -> None, adds fields (e.g. the epoch) to an interval record.
    finite_keys: metrics that must stay finite; a non-finite one raises NonFiniteError (as does a
      non-finite value anywhere in the state when a checkpoint is due).
    last_saved: the step of the newest checkpoint already on disk (for the error message).
    members: for a population (maxrl_jax/rl/population.py): one dict of record fields per member (e.g.
      {"member": 0, "objective": "maxrl", "seed": 0}). Each step's metrics are then [K] arrays and every
      logged interval writes K records. A non-finite value of any member stops the whole population.
    pending: host metrics of steps done before `start` but not logged yet (from a checkpoint saved at a
      stop request): they open the first interval.
    stop_requested: optional (step) -> bool, asked after every call; True saves and raises `Preempted`.
    diagnose: optional (the diverged step's host metrics, of its member in a population) -> a sentence on the
      likely cause, appended to the NonFiniteError's message (metrics whose names start with "_" are such
      diagnostics: they are passed here and never written to the records).
  """
  if evaluate is not None and evals is None:
    raise ValueError("Pass `evals` (a dict) to receive the evaluations.")
  for name, every in (("log_every", log_every), ("checkpoint_every", checkpoint_every),
                      ("eval_every", eval_every)):
    if every and every % stride:
      raise ValueError(f"{name}={every} must be a multiple of the {stride} steps of a call.")
  throughput = dict(throughput or {})
  bar = progress(total=end, initial=start) if progress is not None and start < end else None
  history: list = []  # Device metrics of the calls since the last logged interval.
  carried = [dict(m) for m in (pending or [])]  # Host metrics of steps before `start` in this interval.
  tick = time.time()
  saved = last_saved if last_saved is not None else (start or None)

  def diverged(step, quantity, value, metrics=None):
    where = f"the checkpoint of step {saved}" if saved else "no checkpoint of this phase"
    cause = diagnose(metrics) if diagnose is not None and metrics is not None else None
    return NonFiniteError(
        f"{phase} diverged: {quantity} is {value} at step {step}. Nothing after it was saved; the run keeps "
        f"{where} (the last finite state). "
        + (cause + " " if cause else "Lower the learning rate (or check the data) and start again in a new "
           "--workdir."))

  def flush_steps():
    return carried + _per_step(jax.device_get(history), stride)

  step = start
  try:
    while step < end:
      step = min(step + stride, end)
      state, step_metrics = step_fn(state, step)
      history.append(step_metrics)
      if bar is not None:
        bar.update(step - bar.n)
      if _due(step, log_every, end):
        steps = flush_steps()  # Waits for the dispatched steps: the time below is of finished work.
        seconds = time.time() - tick
        first = step - len(steps) + 1
        indices = [None] if members is None else range(len(members))
        for i in indices:  # Nothing of a diverged interval is written.
          bad = _first_non_finite(steps, first, finite_keys, i)
          if bad is not None:
            label = bad[1] if i is None else f"{bad[1]} of member {dict(members[i])}"
            raise diverged(bad[0], label, bad[2], bad[3])
        records = [interval_record(phase, step, steps, seconds, throughput, i) for i in indices]
        for i, record in zip(indices, records):
          if i is not None:
            record.update(members[i])
          if annotate is not None:
            annotate(record, step)
          writer.write(record)
        rates = [r["pass_rate"] for r in records if "pass_rate" in r]
        if rates and bar is not None:
          bar.set_postfix(pass_rate=f"{np.mean(rates):.3f}")
        history, carried, tick = [], [], time.time()
      pause = time.time()
      checkpoint_due = _due(step, checkpoint_every, end)
      stop = stop_requested is not None and stop_requested(step)
      eval_due = evaluate is not None and _due(step, eval_every, end)
      if (checkpoint_due or stop or eval_due) and not bool(all_finite(state)):
        raise diverged(step, "a parameter", "not finite")
      if eval_due:
        evals[step] = [{**record, "step": step} for record in evaluate(state, step)]
        for record in evals[step]:
          writer.write(record)
      if checkpoint_due or stop:
        save(step, state, run_logging.jsonable(flush_steps()) if history or carried else [])
        saved = step
      if stop and step < end:
        raise Preempted(f"{phase}: stopped at step {step} on request; its state is saved. Run the same "
                        "command again to resume from it.")
      tick += time.time() - pause  # Step times exclude evaluation and checkpointing.
  finally:
    if bar is not None:
      bar.close()
  return state
