"""The run lifecycle, written once for every trainer: `train_and_evaluate(config, workdir, trainer)`.

    initialise the distributed runtime (multi-host: before any JAX computation)
    validate the config (the trainer's checks, which call the task's and the shared blocks')
    build the device mesh and check the batch sizes against it          (before the workdir is touched)
    prepare the workdir and lock it (one process per workdir)
    a finished run of the same config?  -> print where its results are, return its summary, change nothing
    refuse a workdir holding another config's run; the trainer's data (a bad file stops here, nothing written)
    write config.json, the config identity; open metrics.jsonl and its sinks (process 0 writes)
    trainer.train(run): the phases, each through `Run.run_phase` (the step loop, trainers/loop.py), resumed
        from the newest good checkpoint with the records it holds (`Run.resume`)
    check that the last held-out evaluation is of the final step
    summary.json (the trainer's fields + task, final_step, hardware, wall time, config digest), atomically
    the trainer's report: plots, tables

A `Trainer` (trainers/rl.py for token tasks, trainers/classification.py) says what the phases are; a
`Task` (maxrl_jax/tasks/) says what the data, verifier and held-out set are. Neither repeats any step above.

Stopping: SIGTERM or SIGINT (a preemption notice from a TPU VM, SLURM or Kubernetes, or Ctrl-C) lets the
current step finish, saves a checkpoint of it on every process at the same step, writes the records and
ends the run with `loop.Preempted` (main prints one line and exits with status 143); a second signal exits at
once. Re-running the same command resumes, and the resumed run's records equal an uninterrupted run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import jax
import ml_collections
import tqdm

from maxrl_jax import checkpoints
from maxrl_jax import config_fields
from maxrl_jax import plots
from maxrl_jax import run_logging
from maxrl_jax import sharding
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.trainers import loop

# Set to "1" to draw progress bars where stderr is not a terminal (a log file); config.progress_bar=False
# turns them off everywhere.
PROGRESS_ENV = "MAXRL_PROGRESS_BAR"


class Trainer(Protocol):
  """What a trainer provides to the harness (see trainers/rl.py, trainers/classification.py)."""

  config: ml_collections.ConfigDict

  def validate(self) -> None:
    """Raises ValueError naming the config field and the fix on any invalid setting."""

  def make_mesh(self) -> jax.sharding.Mesh:
    """The device mesh of the run (config.mesh, and a member axis for populations)."""

  def batch_sizes(self) -> dict[str, int]:
    """{config field: batch size} that must split over the mesh's batch shards."""

  def prepare(self, workdir: str) -> None:
    """Reads (or builds) the task's data before config.json is written: a bad data file stops the run with
    nothing of it on disk, so a corrected config may use the same workdir."""

  def close(self) -> None:
    """Releases what `prepare` started (worker processes); called however the launch ends."""

  def final_step(self, workdir: str | None = None) -> int | None:
    """The step of the last phase at which the run is finished (its final evaluation); None while it depends
    on data not read yet (then the run is not recognised as finished before it starts)."""

  def sinks(self, workdir: str) -> list | None:
    """The metrics sinks of process 0 (None: those config.logging asks for)."""

  def train(self, run: "Run") -> None:
    """Runs (or resumes) the phases through `run`; every record goes to run.records."""

  def summary(self, run: "Run") -> dict:
    """The trainer's summary fields, from run.records."""

  def report(self, run: "Run", summary: dict) -> None:
    """Plots and tables of a finished run (process 0)."""


# ------------------------------------------------------------------------------------------------ records


class Records:
  """The run's metrics records in memory (what each checkpoint stores) and in metrics.jsonl.

  `Records.resume(writer, records_of_the_checkpoint, where)` when a run (re)starts: the checkpoint's
  records are the source of truth, so metrics.jsonl is rewritten to exactly them (a deleted, shortened or
  edited file is rebuilt, with a message); a malformed line in the file is an error naming it.
  """

  def __init__(self, writer: Any, records: list[dict]):
    self.writer = writer
    self.records = [dict(r) for r in records]

  @classmethod
  def resume(cls, writer: Any, records: list[dict] | None, where: str) -> "Records":
    records = [dict(r) for r in (records or [])]
    on_file = writer.read()  # Raises, naming file and line, on a malformed record.
    if on_file[:len(records)] != records:
      print(f"{writer.path}: did not hold the records of {where} ({len(on_file)} records on file, "
            f"{len(records)} in the checkpoint); rebuilt from the checkpoint.", flush=True)
    writer.replace_all(records)
    return cls(writer, records)

  @property
  def path(self):
    return getattr(self.writer, "path", None)

  def read(self) -> list[dict]:
    return [dict(r) for r in self.records]

  def write(self, record) -> None:
    self.records.append(run_logging.jsonable_record(record))
    self.writer.write(record)

  def evals(self, phase: str = "eval") -> dict[int, list[dict]]:
    """{step: [records of that step's evaluation]} of the held-out records (`phase`)."""
    out: dict[int, list[dict]] = {}
    for record in self.records:
      if record.get("phase") == phase:
        out.setdefault(record["step"], []).append(record)
    return out


def metric_fields(record: Mapping[str, Any], drop: Sequence[str] = ()) -> dict:
  """A record's values without its bookkeeping fields ("phase", "step" and `drop`)."""
  return {k: v for k, v in record.items() if k not in ("phase", "step", *drop)}


# ------------------------------------------------------------------------------------------------ stopping


class StopSignals:
  """SIGTERM / SIGINT handlers for the life of a run: the first asks the loop to stop, a second exits."""

  def __init__(self):
    self.received: int | None = None
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received is not None:  # The second signal: stop now, without saving.
      print(f"\n{signal.Signals(signum).name} again: exiting at once without saving.", file=sys.stderr,
            flush=True)
      os._exit(128 + signum)  # pylint: disable=protected-access
    self.received = signum
    print(f"\n{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint "
          "(send it again to exit at once).", file=sys.stderr, flush=True)

  def __enter__(self) -> "StopSignals":
    for signum in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[signum] = signal.signal(signum, self._handle)
      except ValueError:  # Not the main thread: leave the handlers alone.
        pass
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`: the same answer on every process of a multi-host run."""
    local = self.received is not None
    if jax.process_count() == 1:
      return local
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    # The preemption sync point (jax.distributed's preemption service) agrees on a step across hosts once any
    # process was notified; a signal handled here on one host is shared with the others through a gather.
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        return True
    except Exception:  # pylint: disable=broad-except  # No preemption service in this runtime.
      pass
    flags = multihost_utils.process_allgather(jax.numpy.int32(local))
    return bool(flags.max())


# ------------------------------------------------------------------------------------------------ a run


@dataclasses.dataclass
class Resumed:
  """Where a launch starts: the phase and step of the checkpoint it restored, its state and pending metrics,
  and the JSON fields the phase stored beside them (`run_phase(..., checkpoint_extra=...)`)."""

  phase: str
  step: int
  state: Any
  pending: list
  extra: dict = dataclasses.field(default_factory=dict)


class Run:
  """One launch of a run in its workdir: what the phases of a trainer use.

  Attributes:
    config, workdir, mesh: the run's config, absolute workdir and device mesh.
    identity: the config fields that define the computation (stored in every checkpoint).
    records: the run's records (`Records`), set by `resume`.
    start_time: when this launch started.
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, mesh, cleanup: contextlib.ExitStack,
               signals: StopSignals, sinks: Sequence[Any] | None = None):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    self.identity = workdir_lib.config_identity(config.to_dict())
    self.start_time = time.time()
    self._cleanup = cleanup
    self._signals = signals
    self._checkpointers: dict[str, checkpoints.PhaseCheckpointer] = {}
    if sinks is None:
      sinks = run_logging.sinks_from_config(config, workdir) if sharding.is_chief() else ()
    self.writer = sharding.ChiefOnlyWriter(run_logging.MetricsWriter(workdir, sinks=sinks))
    cleanup.callback(self.writer.close)
    self.records: Records | None = None

  def on_close(self, fn: Callable[[], Any]) -> None:
    """Calls `fn` when the launch ends, however it ends (e.g. to stop a task's worker processes)."""
    self._cleanup.callback(fn)

  # ---------------------------------------------------------------- checkpoints

  def checkpointer(self, phase: str) -> checkpoints.PhaseCheckpointer:
    """The checkpointer of <workdir>/checkpoints/<phase> (opened once, closed when the run ends)."""
    if phase not in self._checkpointers:
      ckpt = checkpoints.PhaseCheckpointer(self.workdir, phase, self.config.keep_checkpoints,
                                           identity=self.identity)
      self._cleanup.callback(ckpt.close)
      self._checkpointers[phase] = ckpt
    return self._checkpointers[phase]

  def resume(self, phases: Sequence[tuple[str, Any]]) -> Resumed | None:
    """Restores the newest good checkpoint of the phases (searched from the last) and its records.

    Args:
      phases: [(checkpoint phase, abstract state to restore into)] in the order the run trains them; the
        abstract states are `abstract_state` trees (shapes, dtypes, shardings; nothing is allocated).

    Returns:
      Where to continue, or None for a fresh start. Either way `self.records` holds the records so far
      (metrics.jsonl rebuilt from the checkpoint when it differs).
    """
    for phase, like in reversed(list(phases)):
      found = self.checkpointer(phase).restore_latest(like)
      if found is not None:
        step, state, extra = found
        self.records = Records.resume(self.writer, extra.get("records"), f"{phase} step {step}")
        return Resumed(phase, step, state, list(extra.get("pending") or []),
                       {k: v for k, v in extra.items() if k not in ("pending", "records", "identity")})
    self.records = Records.resume(self.writer, [], "the start")
    return None

  def restore_final(self, phase: str, like: Any, workdir: str | None = None) -> Any:
    """The state of the newest checkpoint of `phase` (a finished phase's last step), verified.

    With `workdir`, from another run's workdir (e.g. a shared SFT policy); its config is not checked here.
    """
    if workdir is None:
      ckpt = self.checkpointer(phase)
    else:
      ckpt = checkpoints.PhaseCheckpointer(workdir, phase, self.config.keep_checkpoints)
      self._cleanup.callback(ckpt.close)
    found = ckpt.restore_latest(like)
    if found is None:
      raise ValueError(f"{ckpt.directory} holds no checkpoint to start from; run that phase first.")
    return found[1]

  # ---------------------------------------------------------------- the loop

  def progress(self, desc: str) -> Callable[..., Any] | None:
    """A tqdm factory for `loop.run_phase`, or None where no bar is drawn.

    Bars are drawn on process 0 when config.progress_bar is on and stderr is a terminal (or the environment
    sets MAXRL_PROGRESS_BAR=1): a log file gets no carriage-return noise; metrics.jsonl records the progress.
    """
    shown = bool(self.config.get("progress_bar", True)) and sharding.is_chief() and (
        sys.stderr.isatty() or os.environ.get(PROGRESS_ENV) == "1")
    if not shown:
      return None
    return lambda total, initial: tqdm.tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True,
                                            file=sys.stderr, disable=False)

  def run_phase(self, phase: str, state: Any, step_fn, *, start: int, end: int, checkpoint: str | None = None,
                desc: str | None = None, pending: Sequence[Mapping[str, Any]] | None = None,
                checkpoint_extra: Mapping[str, Any] | None = None, **kwargs) -> Any:
    """`loop.run_phase` with the run's intervals, records, checkpointer, progress bar and stop signals.

    `checkpoint` names the checkpoint folder (default: the phase); `checkpoint_extra`, JSON fields stored in
    every checkpoint of the phase (read back as `Resumed.extra`); other arguments go to loop.run_phase.
    """
    ckpt = self.checkpointer(checkpoint or phase)

    def save(step, state, unlogged):
      extra = {**(checkpoint_extra or {}), **({"pending": unlogged} if unlogged else {})}
      ckpt.save(step, state, self.records.records, extra=extra or None)

    return loop.run_phase(
        phase, state, step_fn, start=start, end=end, writer=self.records, save=save,
        log_every=self.config.log_every_steps, checkpoint_every=self.config.checkpoint_every_steps,
        progress=self.progress(desc or phase), pending=pending, stop_requested=self._signals.requested,
        **kwargs)


# ------------------------------------------------------------------------------------------------ helpers


def abstract_state(init_fn: Callable[..., Any], *args: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs (with `shardings`) of `init_fn(*args)`: a restore target that allocates nothing.

  `shardings` is a tree of shardings matching the result, or a function abstract tree -> shardings.
  """
  abstract = jax.eval_shape(init_fn, *args)
  if callable(shardings):
    shardings = shardings(abstract)
  return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                shardings)


def shardings_of(abstract: Any) -> Any:
  """The shardings of an abstract (or concrete) tree."""
  return jax.tree_util.tree_map(lambda a: a.sharding, abstract)


# Fields of earlier versions of the configs -> the field that replaced them ("" when there is none).
RENAMED_FIELDS = {
    "train.log_every": "log_every_steps",
    "train.progress_bar": "progress_bar",
    "checkpoint.every_steps": "checkpoint_every_steps",
    "checkpoint.keep": "keep_checkpoints",
    "checkpoint.resume": "",
    "eval.pass_at_k": "eval.ks",
    "optim.grad_clip_norm": "optim.grad_clip",
    "objective.kwargs": "objective.<option> (e.g. objective.order, objective.k, objective.pkpo_form)",
}


def renamed_field_message(field: str) -> str | None:
  """The message for a config field of an earlier version (`field` dotted, e.g. "train.log_every"), else None."""
  for old, new in RENAMED_FIELDS.items():
    if field == old or field.startswith(old + "."):
      if not new:
        return (f"config.{field} no longer exists: a run always resumes from its workdir's checkpoints; use a "
                "new --workdir for a fresh run.")
      return f"config.{field} is now config.{new} (one vocabulary for every task); rename it."
  return None


def validate_run_fields(config: ml_collections.ConfigDict) -> None:
  """Checks the fields every run has: seed, log / checkpoint intervals, checkpoints kept, progress_bar; refuses
  fields of earlier config versions, naming their replacement."""
  for field in config_fields.flatten(config.to_dict()):
    message = renamed_field_message(field)
    if message:
      raise ValueError(message)
  for field, least in (("log_every_steps", 1), ("checkpoint_every_steps", 0), ("keep_checkpoints", 1)):
    value = config.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
      raise ValueError(f"config.{field}={value!r} must be an integer >= {least}"
                       + (" (0: only at the end)." if least == 0 else "."))
  if config.checkpoint_every_steps % config.log_every_steps:
    raise ValueError(f"config.checkpoint_every_steps={config.checkpoint_every_steps} must be a multiple of "
                     f"log_every_steps={config.log_every_steps} (so a resumed run logs the same intervals).")
  if not isinstance(config.get("progress_bar", True), bool):
    raise ValueError(f"config.progress_bar={config.progress_bar!r} must be True or False.")
  if isinstance(config.get("seed"), bool) or not isinstance(config.get("seed"), int):
    raise ValueError(f"config.seed={config.get('seed')!r} must be an integer.")


def hardware() -> dict:
  """The devices and versions a run ran on (summary.json)."""
  import flax  # pylint: disable=import-outside-toplevel

  devices = jax.devices()
  return {"platform": devices[0].platform, "device_kind": devices[0].device_kind,
          "num_devices": len(devices), "num_processes": jax.process_count(), "cpu_count": os.cpu_count(),
          "jax_version": jax.__version__, "flax_version": flax.__version__}


def finished_summary(config: ml_collections.ConfigDict, workdir: str, final_step: int) -> dict | None:
  """The summary of a finished run of exactly this config in `workdir` (same digest and final step), else None."""
  summary = workdir_lib.read_finished_summary(workdir, config.to_dict())
  if summary is not None and summary.get("final_step") == final_step:
    return summary
  return None


# ------------------------------------------------------------------------------------------------ lifecycle


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, trainer: Trainer) -> dict:
  """Runs (or resumes) `trainer` in `workdir` and returns the summary written to <workdir>/summary.json.

  One process at a time per workdir (a second one stops at once, naming the holder). A workdir that holds a
  finished run of the same config is left untouched: its summary is returned.
  """
  sharding.initialize_distributed(config.get("mesh"))  # Multi-host: before any JAX computation.
  validate_run_fields(config)
  trainer.validate()
  mesh = trainer.make_mesh()
  sharding.check_batch_sizes(mesh, trainer.batch_sizes())  # Device layout checked before anything is written.
  workdir = workdir_lib.prepare_workdir(workdir)
  with workdir_lib.WorkdirLock(workdir, enabled=sharding.is_chief()):
    final_step = trainer.final_step(workdir)
    finished = finished_summary(config, workdir, final_step)
    if finished is not None:
      print(f"{workdir} already holds this run, finished (step {final_step}); nothing was changed. Its "
            f"results: {os.path.join(workdir, 'summary.json')}", flush=True)
      return finished
    run_logging.check_config(workdir, config.to_dict())  # Another run's workdir is refused before anything.
    with contextlib.ExitStack() as cleanup, StopSignals() as signals:
      cleanup.callback(trainer.close)
      trainer.prepare(workdir)
      if sharding.is_chief():  # Run files are written once; orbax coordinates the checkpoints itself.
        run_logging.check_or_write_config(workdir, config.to_dict())
      run = Run(config, workdir, mesh, cleanup, signals, sinks=trainer.sinks(workdir))
      try:
        trainer.train(run)
      except loop.Preempted as e:
        e.signum = signals.received or e.signum
        raise
      final_step = trainer.final_step(workdir)  # Known now even where it depends on the data.
      evals = run.records.evals()
      last = max(evals, default=None)
      if last != final_step:  # Never report an evaluation the run did not make.
        raise RuntimeError(f"{workdir}: the last held-out evaluation is at step {last}, not the final step "
                           f"{final_step}; the records are incomplete. Re-run to resume.")
      summary = {"task": config.get("task"), **trainer.summary(run), "final_step": final_step,
                 "hardware": hardware(), "wall_time_s_this_launch": time.time() - run.start_time,
                 "config_sha256": workdir_lib.config_digest(config.to_dict())}
      cleanup.close()  # Checkpoints and metrics sinks are done.
    if sharding.is_chief():
      run_logging.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
      trainer.report(run, summary)
      print(f"Results: {os.path.join(workdir, 'summary.json')}", flush=True)
    return summary


def plot_curves(workdir: str, config: ml_collections.ConfigDict) -> list[str]:
  """The PNG curves of a run's metrics.jsonl (maxrl_jax/plots.py), unless config.logging.plots is False;
  prints where they are."""
  if not run_logging.curves_wanted(config):
    return []
  curves = plots.plot_run(workdir)
  if curves:
    print("Curves: " + ", ".join(curves), flush=True)
  return curves
