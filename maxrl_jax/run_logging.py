"""Run outputs shared by the trainers: metrics.jsonl, config.json, summary.json and the final table."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

import time

import jax
import numpy as np

# Fields that may differ between the first launch of a run and a resumed launch on the same workdir.
RESUMABLE_FIELDS = ("progress_bar", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints")
# A run may resume on another device mesh or coordinator (checkpoints restore into the new shardings).
# Where metrics are sent (TensorBoard, Weights & Biases) does not change what a run computes either.
RESUMABLE_PREFIXES = ("mesh.", "logging.")


def _jsonable(value: Any) -> Any:
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    return _jsonable(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if hasattr(value, "tolist"):  # jax arrays
    return _jsonable(np.asarray(value).tolist())
  return value


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename, so readers never see half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, payload: Any) -> None:
  """Writes JSON to `path` atomically (see write_text_atomic)."""
  write_text_atomic(path, json.dumps(_jsonable(payload), indent=1, sort_keys=True) + "\n")


def check_or_write_config(workdir: str, config_dict: dict) -> None:
  """Writes <workdir>/config.json, or checks that a resumed run uses the same config.

  Raises a ValueError naming the differing fields when the workdir holds a run with another config
  (resuming it would silently mix two experiments). Fields in RESUMABLE_FIELDS may differ.
  """
  path = os.path.join(workdir, "config.json")
  config_dict = _jsonable(config_dict)
  if os.path.exists(path):
    with open(path) as f:
      try:
        saved = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or use a new --workdir.") from e

    def flat(d, prefix=""):
      out = {}
      for k, v in d.items():
        if isinstance(v, dict):
          out.update(flat(v, f"{prefix}{k}."))
        else:
          out[f"{prefix}{k}"] = v
      return out

    a, b = flat(saved), flat(config_dict)
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS
                  and not k.startswith(RESUMABLE_PREFIXES))
    if diff:
      details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8])
      raise ValueError(
          f"--workdir {workdir} holds a run with a different config ({details}). Resuming would mix two "
          "experiments: use a new --workdir, or the same config to resume.")
  write_json_atomic(path, config_dict)


class MetricsWriter:
  """Appends one JSON object per logged step to <workdir>/metrics.jsonl.

  On resume the trainer calls `truncate` to drop records written after the checkpoint it resumes from, so
  a resumed run's file equals an uninterrupted run's.
  """

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, "metrics.jsonl")

  def read(self) -> list[dict]:
    if not os.path.exists(self.path):
      return []
    records = []
    with open(self.path) as f:
      for line in f:
        line = line.strip()
        if line:
          try:
            records.append(json.loads(line))
          except json.JSONDecodeError:
            break  # A line cut by a kill mid-write; everything after it is dropped too.
    return records

  def truncate(self, keep: Callable[[dict], bool]) -> None:
    """Rewrites the file with the records for which `keep(record)` is true (atomically)."""
    records = [r for r in self.read() if keep(r)]
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, self.path)

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(_jsonable(record), sort_keys=True) + "\n")
      f.flush()


def format_table(rows: list[Mapping[str, Any]], columns: list[str], title: str = "") -> str:
  """A markdown table (fits one screen) of `rows` restricted to `columns`; floats with 4 digits."""

  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4f}"
    return str(v)

  lines = ([title, ""] if title else []) + ["| " + " | ".join(columns) + " |",
                                           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(fmt(row.get(c, "")) for c in columns) + " |")
  return "\n".join(lines)


def interval_record(phase: str, step: int, history: list[Mapping[str, Any]], since: float,
                    tokens_key: str | None = None) -> dict:
  """Mean of the on-device metrics of the steps since the last log, with wall time per step.

  The metrics are fetched first (which waits for the dispatched steps to finish), then the time since
  `since` is taken, so step_time_s and tokens_per_s measure finished work, not just dispatch.
  """
  stacked = jax.device_get(list(history))
  seconds = time.time() - since
  record = {"phase": phase, "step": step}
  for key in stacked[0]:
    record[key] = float(np.mean([float(h[key]) for h in stacked]))
  record["step_time_s"] = seconds / len(stacked)
  if tokens_key:
    record["tokens_per_s"] = float(sum(float(h[tokens_key]) for h in stacked)) / max(seconds, 1e-9)
  return record
