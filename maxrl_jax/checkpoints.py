"""Atomic, resumable checkpoints of a training state with orbax.

Each phase of a run (e.g. `sft`, `rl`) keeps its own CheckpointManager under `<workdir>/checkpoints/<phase>`.
Orbax writes a step into a temporary directory and renames it when complete, so a killed process leaves
either the previous checkpoint or the new one, never half of one. Saves are synchronous: when `save` returns
the step is on disk.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class PhaseCheckpointer:
  """Saves and restores one phase's state pytree (params, optimizer state, step, RNG key data)."""

  def __init__(self, workdir: str, phase: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints", phase))
    self.phase = phase
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    """Writes `state` as `step` (atomically; a step that already exists is left alone)."""
    if step in self._manager.all_steps():
      return
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, like: Any) -> Any:
    """Restores `step` into the structure, shapes and dtypes (and shardings) of `like`."""
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like)
    try:
      return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # Orbax raises a variety of types for corrupt or mismatched checkpoints.
      raise ValueError(
          f"Could not restore the {self.phase!r} checkpoint at step {step} from {self.directory}: {e}\n"
          "The checkpoint is corrupt or was written by a run with a different model or optimizer. Use a "
          f"new --workdir, or delete {os.path.join(self.directory, str(step))} to fall back to an earlier "
          "checkpoint.") from e

  def close(self) -> None:
    self._manager.close()
