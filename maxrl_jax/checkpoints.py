"""Atomic, verified, resumable checkpoints of a training state with orbax.

Each phase of a run (e.g. `sft`, `rl`) keeps its own CheckpointManager under `<workdir>/checkpoints/<phase>`.
A checkpoint holds two items, written together by one orbax save (into a temporary directory renamed when
complete, so a killed process leaves the previous checkpoint or the new one, never half of one):

    state   the training state pytree (params, optimizer state, step, ...)
    extra   JSON: {"records": the run's metrics records up to this step, "identity": the config that made it}

After the save, a SHA-256 digest of every file of the step is written (atomically) to
`<workdir>/checkpoints/<phase>/digests.json`. On restore the digest is checked first: a checkpoint whose bytes
changed (a flipped bit, a truncated file) is never restored silently. `restore_latest` then falls back to the
previous good checkpoint with a warning, moving the bad one aside (to `corrupt-<step>-<time>`), or stops with
an error naming every checkpoint it tried when none is good. A checkpoint made by a run with a different
config (its `identity`) is refused, so a run cannot adopt another run's checkpoints even if config.json is
gone. Saves are synchronous: when `save` returns the step is on disk.

Old checkpoints (beyond `max_to_keep`) are deleted only once the new one and its digest are on disk, so a
failed save never costs the previous checkpoint. A save that runs out of space (ENOSPC, a disk quota, a file
size limit) raises one `CheckpointSaveError` naming the checkpoint's path, the space it needs and the space
free, and the last good checkpoint, which is kept; the partial files of the failed save are removed, and the
tracebacks orbax's worker threads log about the same failure are not printed.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import glob
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
import types
import warnings
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

DIGESTS_FILE = "digests.json"
TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax writes a step into <step><TMP_SUFFIX>, renamed when complete
_ORBAX_DIR = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep  # .../site-packages/orbax/


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: corrupt, from an older format, or from a run with another config."""


class CheckpointSaveError(OSError):
  """A checkpoint could not be written for lack of space; the previous checkpoints are intact.

  Attributes:
    errno: ENOSPC (disk full), EDQUOT (quota) or EFBIG (file size limit).
    filename: the checkpoint directory that could not be written.
    kept_step: the newest good checkpoint of the phase (None if there is none).
  """

  def __init__(self, message: str, code: int, filename: str, kept_step: int | None):
    super().__init__(message)
    self.errno, self.filename, self.kept_step = code, filename, kept_step

  def __str__(self) -> str:
    return str(self.args[0])


# ------------------------------------------------------------------------------------------------ out of space

# errno -> (what happened, what to do)
_SPACE_ERRNOS = {
    errno.ENOSPC: ("the disk is full", "free space (or move the workdir to a larger disk)"),
    errno.EDQUOT: ("the disk quota is exceeded", "free space within the quota (or raise the quota)"),
    errno.EFBIG: ("a file size limit was reached", "raise the file size limit (ulimit -f)"),
}
_SPACE_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                "File too large": errno.EFBIG}
# What a failed orbax save leaves behind in its other workers: a closed event loop, a shut-down executor.
_AFTERMATH = ("Event loop is closed", "cannot schedule new futures after shutdown")


def _exceptions(exc: BaseException | None):
  """`exc`, its causes and contexts, and the members of exception groups (each once)."""
  seen, stack = set(), [exc]
  while stack:
    e = stack.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    stack.extend([e.__cause__, e.__context__, *getattr(e, "exceptions", ())])


def out_of_space_errno(exc: BaseException | None) -> int | None:
  """ENOSPC, EDQUOT or EFBIG when `exc` (or what caused it) is a write that ran out of space, else None.

  Recognises OSError's errno, and the messages of tensorstore (which orbax raises as ValueError, e.g.
  "RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']").
  """
  for e in _exceptions(exc):
    if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
      return e.errno
    text = str(e)
    for marker, code in _SPACE_TEXTS.items():
      if marker in text:
        return code
    match = re.search(r"os_error_code='?(\d+)", text)
    if match and int(match.group(1)) in _SPACE_ERRNOS:
      return int(match.group(1))
  return None


def _is_aftermath(exc: BaseException | None, text: str = "") -> bool:
  """Whether a logged or unraisable error is a consequence of an out-of-space save."""
  if out_of_space_errno(exc) is not None or any(m in text for m in _SPACE_TEXTS):
    return True
  if any(isinstance(e, asyncio.CancelledError) for e in _exceptions(exc)):
    return True
  return any(m in str(e) for e in _exceptions(exc) for m in _AFTERMATH) or any(m in text for m in _AFTERMATH)


class _SaveReports:
  """Holds back, during one save, what orbax's worker threads report, and lets it go afterwards.

  While active it captures: records of the `absl` logger emitted from orbax's modules, records of the
  `asyncio` logger ("Task exception was never retrieved"), unraisable exceptions and uncaught exceptions of
  threads. On exit everything is restored; captured reports are then re-emitted unless the save failed for
  lack of space and the report is about that failure (the same error, its closed event loops, its cancelled
  tasks), which the one CheckpointSaveError describes. Nothing else is hidden.
  """

  def __init__(self):
    self.records: list[tuple[logging.Logger, logging.LogRecord]] = []
    self.unraisable: list[Any] = []
    self.thread_errors: list[Any] = []

  def _capture(self, logger, orbax_only):
    def keep_back(record: logging.LogRecord) -> bool:
      if orbax_only and not os.path.abspath(record.pathname).startswith(_ORBAX_DIR):
        return True
      self.records.append((logger, record))
      return False
    return keep_back

  def __enter__(self):
    self._loggers = [(logging.getLogger("absl"), True), (logging.getLogger("asyncio"), False)]
    self._filters = [(logger, self._capture(logger, orbax_only)) for logger, orbax_only in self._loggers]
    for logger, keep_back in self._filters:
      logger.addFilter(keep_back)
    self._unraisablehook, self._threading_excepthook = sys.unraisablehook, threading.excepthook
    sys.unraisablehook = self.unraisable.append
    threading.excepthook = self.thread_errors.append
    return self

  def settle(self, before: set[threading.Thread], timeout_s: float = 10.0) -> None:
    """Waits for the threads the save started, then collects its abandoned tasks so they report now."""
    deadline = time.time() + timeout_s
    for thread in set(threading.enumerate()) - before:
      if thread is not threading.current_thread():
        try:
          thread.join(max(0.0, deadline - time.time()))
        except Exception:  # pylint: disable=broad-except  # orbax's threads re-raise their error in join()
          pass
    self._finish_abandoned_work()
    reported = -1
    while time.time() < deadline:  # until a collection brings no new report
      gc.collect()
      count = len(self.records) + len(self.unraisable) + len(self.thread_errors)
      if count == reported:
        return
      reported = count
      time.sleep(0.05)

  @staticmethod
  def _finish_abandoned_work() -> None:
    """Closes the coroutines the failed save left suspended, and marks its futures' errors as seen.

    Otherwise the interpreter finalises them at exit, after this window: a closed coroutine's cleanup then
    fails ("Exception ignored in: <coroutine ...>"), and asyncio logs "Future exception was never retrieved"
    for each future that holds the same out-of-space error. Only orbax's suspended coroutines are closed, and
    only futures whose error is the out-of-space failure (or its aftermath) are marked.
    """
    objects = gc.get_objects()
    for obj in objects:
      if isinstance(obj, types.CoroutineType):
        if obj.cr_frame is not None and obj.cr_code.co_filename.startswith(_ORBAX_DIR):
          try:
            obj.close()
          except Exception:  # pylint: disable=broad-except  # a consequence of the failed save
            pass
    for obj in objects:
      if isinstance(obj, asyncio.Future) and obj.done() and not obj.cancelled():
        if getattr(obj, "_log_traceback", False) and _is_aftermath(getattr(obj, "_exception", None)):
          obj._log_traceback = False  # pylint: disable=protected-access  # what Future.exception() does
    del objects

  def __exit__(self, exc_type, exc, tb):
    for logger, keep_back in self._filters:
      logger.removeFilter(keep_back)
    sys.unraisablehook, threading.excepthook = self._unraisablehook, self._threading_excepthook
    drop = isinstance(exc, CheckpointSaveError)
    for logger, record in self.records:
      error = record.exc_info[1] if record.exc_info else None
      if not (drop and _is_aftermath(error, record.getMessage())):
        logger.handle(record)
    for report in self.unraisable:
      if not (drop and _is_aftermath(report.exc_value, str(report.err_msg or ""))):
        sys.unraisablehook(report)
    for report in self.thread_errors:
      if not (drop and _is_aftermath(report.exc_value)):
        threading.excepthook(report)
    return False


def _directory_bytes(path: str) -> int:
  total = 0
  for root, _, names in os.walk(path):
    for name in names:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


def _state_bytes(state: Any) -> int:
  return int(sum(getattr(x, "nbytes", 0) for x in jax.tree_util.tree_leaves(state)))


def _size(num_bytes: int) -> str:
  for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
    if num_bytes >= scale:
      return f"{num_bytes / scale:.1f} {unit} ({num_bytes:,} bytes)"
  return f"{num_bytes} bytes"


def directory_digest(path: str) -> str:
  """SHA-256 over every file under `path` (relative names and contents, in sorted order)."""
  digest = hashlib.sha256()
  files = []
  for root, _, names in os.walk(path):
    for name in names:
      files.append(os.path.relpath(os.path.join(root, name), path))
  for rel in sorted(files):
    digest.update(rel.encode() + b"\0")
    with open(os.path.join(path, rel), "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    digest.update(b"\0")
  return digest.hexdigest()


@jax.jit
def _leaf_sums(leaves):
  """Per leaf (sum of its bits, sum of its bits x (2 i + 1)), i the flat position, as uint32 mod 2^32."""
  out = []
  for x in leaves:
    x = x.reshape(-1)
    if x.dtype == jax.numpy.bool_:
      bits = x.astype(jax.numpy.uint32)
    else:
      width = {1: jax.numpy.uint8, 2: jax.numpy.uint16, 4: jax.numpy.uint32}[x.dtype.itemsize]
      bits = jax.lax.bitcast_convert_type(x, width).astype(jax.numpy.uint32)
    odd = 2 * jax.numpy.arange(x.shape[0], dtype=jax.numpy.uint32) + 1
    out.append(jax.numpy.stack([jax.numpy.sum(bits, dtype=jax.numpy.uint32),
                                jax.numpy.sum(bits * odd, dtype=jax.numpy.uint32)]))
  return out


def tree_fingerprint(tree: Any) -> str:
  """A SHA-256 over the paths, shapes, dtypes and exact values of an array tree's leaves, the same for any
  sharding or device layout (the values enter as wrapping integer sums of their bits, which do not depend on
  the order of the reduction). Used to check that frozen weights re-derived on resume are the ones a run
  trained against (e.g. LoRA's base, the KL reference)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  sums = jax.device_get(_leaf_sums([leaf for _, leaf in flat])) if flat else []
  items = [[jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype), [int(v) for v in total]]
           for (path, leaf), total in zip(flat, sums)]
  return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def _identity_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  keys = sorted(set(saved) | set(current))
  return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


class PhaseCheckpointer:
  """Saves and restores one phase's state pytree (params, optimizer state, step, RNG key data).

  Args:
    workdir: the run's directory.
    phase: the phase's name ("sft", "rl", ...): checkpoints go to <workdir>/checkpoints/<phase>.
    max_to_keep: how many checkpoints to keep (the oldest are deleted).
    identity: a flat JSON-able dict of the config fields that define the computation (see
      run_logging.config_identity); stored in every checkpoint and compared on restore. None: not checked.
    is_chief: whether this process writes the digest file (one process of a multi-host run).
  """

  def __init__(self, workdir: str, phase: str, max_to_keep: int = 2, identity: Mapping[str, Any] | None = None,
               is_chief: bool | None = None):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", phase))
    self.phase = phase
    self.identity = dict(identity) if identity is not None else None
    self.is_chief = jax.process_index() == 0 if is_chief is None else is_chief
    if isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep!r} must be an integer >= 1 (the checkpoints kept per phase).")
    self._max_to_keep = max_to_keep
    self._check_directory(os.path.abspath(workdir))
    self._digests()  # A damaged digest file stops the run now, not at its first checkpoint.
    self._manager = self._open()

  def _check_directory(self, workdir: str) -> None:
    """A clear error when a file stands where the checkpoint directories go (orbax would fail at the save)."""
    path = self.directory
    while True:
      if os.path.exists(path) and not os.path.isdir(path):
        raise CheckpointError(
            f"{path} is a file, not a directory, so the {self.phase!r} checkpoints cannot be written to "
            f"{self.directory}. Move or delete that file, or use a new --workdir.")
      if path == workdir or os.path.dirname(path) == path:
        break
      path = os.path.dirname(path)
    try:
      os.makedirs(self.directory, exist_ok=True)
    except OSError as e:
      raise CheckpointError(f"The checkpoint directory {self.directory} cannot be created ({e.strerror or e}); "
                            "use a --workdir you can write to.") from e

  def _open(self) -> ocp.CheckpointManager:
    # Retention is done here, after the digest (see `save`), so orbax keeps every step.
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True, enable_async_checkpointing=False),
        item_names=("state", "extra"),
    )

  # ------------------------------------------------------------------------------------------ digests

  def _digests(self) -> dict[str, str]:
    path = os.path.join(self.directory, DIGESTS_FILE)
    if not os.path.exists(path):
      return {}
    fix = ("Restore it from a copy, or use a new --workdir (deleting it leaves every checkpoint of the phase "
           "unverified, and they are then refused).")
    try:
      with open(path) as f:
        digests = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: JSONDecodeError, UnicodeDecodeError
      raise CheckpointError(f"{path} is unreadable ({e}). {fix}") from e
    if not isinstance(digests, dict):
      raise CheckpointError(f"{path} holds a JSON {type(digests).__name__}, not the object "
                            "{\"<step>\": \"<sha256>\"} this code writes. " + fix)
    for step, digest in digests.items():
      if not (step.isdigit() and isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise CheckpointError(f"{path} has the entry {step!r}: {digest!r}, not a step and its SHA-256 hex "
                              "digest. " + fix)
    return digests

  def _write_digests(self, digests: dict[str, str]) -> None:
    path = os.path.join(self.directory, DIGESTS_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
      with open(tmp, "w") as f:
        json.dump(digests, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, path)
    except BaseException:
      if os.path.exists(tmp):
        os.remove(tmp)
      raise

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ------------------------------------------------------------------------------------------ API

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def _good_steps(self) -> list[int]:
    """The steps on disk that have a digest (what a resume can restore), oldest first."""
    try:
      digests = self._digests()
    except CheckpointError:
      return []
    return [step for step in self.all_steps() if str(step) in digests]

  def _discard(self, step: int) -> None:
    """Removes what a failed save of `step` left: its temporary directory (and the step, if it was finalised)."""
    if not self.is_chief:
      return
    for path in glob.glob(glob.escape(self._step_dir(step)) + TMP_SUFFIX + "*"):
      shutil.rmtree(path, ignore_errors=True)
    if os.path.isdir(self._step_dir(step)):
      shutil.rmtree(self._step_dir(step), ignore_errors=True)
    self._manager.reload()

  def _space_error(self, step: int, code: int, estimate: tuple[int, str]) -> CheckpointSaveError:
    """The one error of a save that ran out of space (after its partial files are gone)."""
    kept = self._good_steps()
    kept_step = kept[-1] if kept else None
    try:
      free = f"{_size(shutil.disk_usage(self.directory).free)} are free there"
    except OSError:
      free = "the free space is unknown"
    needed, basis = estimate
    what, action = _SPACE_ERRNOS[code]
    if kept_step is None:
      outcome = (f"The partial files were removed; no earlier {self.phase!r} checkpoint exists, so once you "
                 f"{action}, re-running the same command starts this phase again.")
    else:
      outcome = (f"The partial files were removed and nothing was lost: the last good checkpoint, step "
                 f"{kept_step} ({self._step_dir(kept_step)}), is kept; {action} and re-run the same command to "
                 f"resume from step {kept_step}.")
    return CheckpointSaveError(
        f"Could not save the {self.phase!r} checkpoint of step {step} to {self._step_dir(step)}: {what} "
        f"({os.strerror(code)}); it needs about {_size(needed)} ({basis}) and {free}. {outcome}",
        code, self._step_dir(step), kept_step)

  def save(self, step: int, state: Any, records: list[dict] | None = None, extra: dict | None = None) -> None:
    """Writes `state` (and the run's `records` so far) as `step`, atomically, then records its digest.

    `extra`: more JSON fields stored beside the records (e.g. the metrics of steps not logged yet). A step
    that already exists is left alone. Once the step and its digest are on disk, the oldest steps
    beyond max_to_keep are deleted.

    Raises:
      CheckpointSaveError: the file system ran out of space (or a quota or file size limit was hit). The
        partial step is removed and the previous checkpoints stay as they were; the message names them.
      Any other error of the write is raised as it comes.
    """
    if step in self._manager.all_steps():
      return
    extra = {**(extra or {}), "records": list(records or []), "identity": self.identity}
    self._digests()  # Raises for a damaged digest file before anything is written.
    kept = self._good_steps()
    estimate = (_state_bytes(state), "the bytes of the state's arrays")
    if kept:
      previous = _directory_bytes(self._step_dir(kept[-1]))
      if previous >= estimate[0]:
        estimate = (previous, f"the size of the checkpoint of step {kept[-1]}")
    threads = set(threading.enumerate())
    with _SaveReports() as reports:
      try:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                         extra=ocp.args.JsonSave(extra)), force=True)
        self._manager.wait_until_finished()
        if self.is_chief:
          digests = {s: d for s, d in self._digests().items() if int(s) in self._manager.all_steps()}
          digests[str(step)] = directory_digest(self._step_dir(step))
          self._write_digests(digests)
      except Exception as e:  # pylint: disable=broad-except
        code = out_of_space_errno(e)
        if code is None:
          raise
        reports.settle(threads)
        self._discard(step)
        raise self._space_error(step, code, estimate) from e
    if jax.process_count() > 1:  # Every process sees the digest before any of them may restore the step.
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"checkpoint_digest_{self.phase}_{step}")
    self._delete_old_steps()

  def _delete_old_steps(self) -> None:
    """Deletes the oldest steps beyond max_to_keep (after the new step's digest is on disk) and their digests.

    If even the shorter digest file cannot be written for lack of space, it keeps their entries (a warning):
    entries of steps that are gone are ignored, and dropped at the next save.
    """
    old = self.all_steps()[:-self._max_to_keep]
    if not old:
      return
    if self.is_chief:
      try:
        self._write_digests({s: d for s, d in self._digests().items() if int(s) not in old})
      except OSError as e:
        if out_of_space_errno(e) is None:
          raise
        warnings.warn(f"{os.path.join(self.directory, DIGESTS_FILE)} still lists the deleted steps {old} "
                      f"({e.strerror or e}); the entries are dropped at the next checkpoint.", stacklevel=3)
    for step in old:
      self._manager.delete(step)

  def verify(self, step: int) -> None:
    """Raises CheckpointError unless `step`'s files match the digest written when it was saved."""
    expected = self._digests().get(str(step))
    if expected is None:
      raise CheckpointError(f"checkpoint {self._step_dir(step)} has no digest in "
                            f"{os.path.join(self.directory, DIGESTS_FILE)} (written by an older version, or "
                            "its save was interrupted before the digest): it cannot be verified.")
    actual = directory_digest(self._step_dir(step))
    if actual != expected:
      raise CheckpointError(f"checkpoint {self._step_dir(step)} is corrupt: its files changed since they were "
                            f"saved (SHA-256 {actual[:12]}... instead of {expected[:12]}...).")

  def restore_with_extra(self, step: int, like: Any) -> tuple[Any, dict]:
    """(state, extra) of `step`, verified, in the structure, shapes, dtypes and shardings of `like`."""
    self.verify(step)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), extra=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises a variety of types for corrupt or mismatched checkpoints.
      raise CheckpointError(
          f"Could not restore the {self.phase!r} checkpoint at step {step} from {self.directory}: {e}\n"
          "It was written by a run with a different model or optimizer, or by an older version of this "
          "code. Use a new --workdir.") from e
    extra = dict(restored["extra"] or {})
    saved_identity = extra.get("identity")
    if self.identity is not None and saved_identity is not None and saved_identity != self.identity:
      details = ", ".join(_identity_diff(saved_identity, self.identity)[:8])
      raise CheckpointError(
          f"The {self.phase!r} checkpoint at step {step} in {self.directory} was made by a run with another "
          f"config ({details}); it will not be continued under this config. Use a new --workdir, or the "
          "config that made it.")
    return restored["state"], extra

  def restore(self, step: int, like: Any) -> Any:
    """The verified state of `step` (see `restore_with_extra`)."""
    return self.restore_with_extra(step, like)[0]

  def restore_latest(self, like: Any) -> tuple[int, Any, dict] | None:
    """(step, state, extra) of the newest good checkpoint, or None when there is none at all.

    A checkpoint that fails verification is moved aside with a warning and the previous one is tried; if none
    is good, CheckpointError names each one and why. A checkpoint of a run with another config is not skipped:
    its error is raised at once.
    """
    failures = []
    self._digests()  # A damaged digest file is an error of its own: no checkpoint is moved aside for it.
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, extra = self.restore_with_extra(step, like)
      except CheckpointError as e:
        if "another config" in str(e):
          raise
        failures.append(f"step {step}: {e}")
        moved = self.quarantine(step)
        warnings.warn(f"{e}\nMoved it to {moved}; trying the previous checkpoint.", stacklevel=2)
        continue
      return step, state, extra
    if failures:
      raise CheckpointError(f"No good {self.phase!r} checkpoint in {self.directory}:\n  " + "\n  ".join(failures)
                            + "\nUse a new --workdir (the bad checkpoints were moved aside, not deleted).")
    return None

  def quarantine(self, step: int) -> str:
    """Moves a bad checkpoint out of the manager's sight (kept for inspection); returns its new path."""
    target = os.path.join(self.directory, f"corrupt-{step}-{int(time.time())}")
    if self.is_chief:
      os.replace(self._step_dir(step), target)
      digests = self._digests()
      digests.pop(str(step), None)
      self._write_digests(digests)
    self._manager.close()
    self._manager = self._open()
    return target

  def close(self) -> None:
    self._manager.close()
