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
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp

DIGESTS_FILE = "digests.json"


class CheckpointError(ValueError):
  """A checkpoint that cannot be used: corrupt, from an older format, or from a run with another config."""


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
    self._max_to_keep = max_to_keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=self._max_to_keep, create=True, enable_async_checkpointing=False),
        item_names=("state", "extra"),
    )

  # ------------------------------------------------------------------------------------------ digests

  def _digests(self) -> dict[str, str]:
    path = os.path.join(self.directory, DIGESTS_FILE)
    if not os.path.exists(path):
      return {}
    try:
      with open(path) as f:
        return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path} is unreadable ({e}); delete it to re-verify nothing (every checkpoint "
                            "will then be refused as unverified), or use a new --workdir.") from e

  def _write_digests(self, digests: dict[str, str]) -> None:
    path = os.path.join(self.directory, DIGESTS_FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(digests, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # ------------------------------------------------------------------------------------------ API

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, records: list[dict] | None = None, extra: dict | None = None) -> None:
    """Writes `state` (and the run's `records` so far) as `step`, atomically, then records its digest.

    `extra`: more JSON fields stored beside the records (e.g. the metrics of steps not logged yet). A step
    that already exists is left alone.
    """
    if step in self._manager.all_steps():
      return
    extra = {**(extra or {}), "records": list(records or []), "identity": self.identity}
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     extra=ocp.args.JsonSave(extra)), force=True)
    self._manager.wait_until_finished()
    if self.is_chief:
      digests = {s: d for s, d in self._digests().items() if int(s) in self._manager.all_steps()}
      digests[str(step)] = directory_digest(self._step_dir(step))
      self._write_digests(digests)
    if jax.process_count() > 1:  # Every process sees the digest before any of them may restore the step.
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"checkpoint_digest_{self.phase}_{step}")

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
