"""Run outputs shared by the trainers: metrics.jsonl, config.json, summary.json and the final table."""

from __future__ import annotations

import atexit
import glob
import json
import logging as std_logging
import math
import os
import secrets
import socket
import struct
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

from maxrl_jax import config_fields

# Fields that may differ between the first launch of a run and a resumed launch on the same workdir.
RESUMABLE_FIELDS = ("progress_bar", "log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                    "population.member_devices", "population.vmap_chunk")
# A run may resume on another device mesh or coordinator (checkpoints restore into the new shardings).
# Where metrics are sent (TensorBoard, Weights & Biases) does not change what a run computes either.
RESUMABLE_PREFIXES = ("mesh.", "logging.")


def jsonable(value: Any) -> Any:
  """`value` with numpy / jax arrays as lists and non-finite floats as strings (what JSON can hold)."""
  if isinstance(value, Mapping):
    return {str(k): jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [jsonable(v) for v in value]
  if isinstance(value, (np.generic, np.ndarray)):
    return jsonable(value.tolist())
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if hasattr(value, "tolist"):  # jax arrays
    return jsonable(np.asarray(value).tolist())
  return value


def jsonable_record(record: Mapping[str, Any]) -> dict:
  """`record` exactly as metrics.jsonl stores and reads it back (a JSON round trip)."""
  return json.loads(json.dumps(jsonable(record), sort_keys=True))


def write_text_atomic(path: str, text: str) -> None:
  """Writes `text` to `path` through a temporary file and a rename, so readers never see half a file."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json_atomic(path: str, payload: Any) -> None:
  """Writes JSON to `path` atomically (see write_text_atomic)."""
  write_text_atomic(path, json.dumps(jsonable(payload), indent=1, sort_keys=True) + "\n")


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
  """["field: saved -> current", ...] of the fields that differ between two configs (as dicts) and may not
  change when a run resumes (RESUMABLE_FIELDS and RESUMABLE_PREFIXES may)."""
  a, b = config_fields.flatten(jsonable(saved)), config_fields.flatten(jsonable(current))
  keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in RESUMABLE_FIELDS
                and not k.startswith(RESUMABLE_PREFIXES))
  return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def check_config(workdir: str, config_dict: dict) -> None:
  """Refuses (ValueError naming the differing fields) a workdir whose config.json holds another run's config:
  resuming it would silently mix two experiments. Fields in RESUMABLE_FIELDS may differ."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    try:
      saved = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path} is not valid JSON ({e}); delete it or use a new --workdir.") from e
  diff = config_differences(saved, config_dict)
  if diff:
    raise ValueError(
        f"--workdir {workdir} holds a run with a different config ({', '.join(diff[:8])}). Resuming would mix "
        "two experiments: use a new --workdir, or the same config to resume.")


def check_or_write_config(workdir: str, config_dict: dict) -> None:
  """Writes <workdir>/config.json, or checks that a resumed run uses the same config (`check_config`)."""
  check_config(workdir, config_dict)
  write_json_atomic(os.path.join(workdir, "config.json"), jsonable(config_dict))


class MetricsWriter:
  """Appends one JSON object per logged step to <workdir>/metrics.jsonl.

  On resume the trainer calls `truncate` to drop records written after the checkpoint it resumes from, so
  a resumed run's file equals an uninterrupted run's.

  Every record is also forwarded to `sinks` (see `sinks_from_config`: TensorBoard event files, Weights &
  Biases); after `truncate` each sink is given the records that were kept (`sink.reset(records)`).
  """

  def __init__(self, workdir: str, sinks: Sequence[Any] = ()):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.sinks = list(sinks)

  def read(self) -> list[dict]:
    """The records in the file. A last line cut short by a kill mid-write (no newline) is left out; any other
    line that is not a JSON object is an error naming the file and the line (nothing is dropped silently)."""
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("not a JSON object")
      except ValueError as e:
        if number == len(lines):  # The unterminated last line of a killed write.
          break
        raise ValueError(
            f"{self.path}, line {number}, is not a metrics record ({e}): {line[:80]!r}. Fix or delete that "
            "line, or delete the file: a resumed run rebuilds it from its checkpoints.") from e
      records.append(record)
    return records

  def replace_all(self, records: list[dict]) -> None:
    """Rewrites the file with exactly `records` (atomically)."""
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(jsonable(r), sort_keys=True) + "\n")
    os.replace(tmp, self.path)
    for sink in getattr(self, "sinks", ()):
      sink.reset(records)

  def truncate(self, keep: Callable[[dict], bool]) -> None:
    """Rewrites the file with the records for which `keep(record)` is true (atomically)."""
    records = [r for r in self.read() if keep(r)]
    tmp = f"{self.path}.tmp"
    with open(tmp, "w") as f:
      for r in records:
        f.write(json.dumps(r, sort_keys=True) + "\n")
    os.replace(tmp, self.path)
    for sink in self.sinks:
      sink.reset(records)

  def write(self, record: Mapping[str, Any]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps(jsonable(record), sort_keys=True) + "\n")
      f.flush()
    for sink in self.sinks:
      sink.write(record)

  def close(self) -> None:
    """Flushes and closes the sinks (they also close themselves when the process exits)."""
    for sink in self.sinks:
      sink.close()


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


def member_interval_records(phase: str, step: int, history: list[Mapping[str, Any]], since: float,
                            members: Sequence[Mapping[str, Any]], tokens_key: str | None = None) -> list[dict]:
  """`interval_record` for a population: each metric is a [K] array; one record per member.

  Record i holds member i's fields, the mean over the interval of element i of every metric, the
  population's wall time per step (`step_time_s`, shared by all members) and, with `tokens_key`, member
  i's tokens per second of that wall time (summed over members it is the population's throughput).
  """
  stacked = jax.device_get(list(history))
  seconds = time.time() - since
  records = []
  for i, fields in enumerate(members):
    record = {"phase": phase, "step": step, **dict(fields)}
    for key in stacked[0]:
      record[key] = float(np.mean([float(np.asarray(h[key])[i]) for h in stacked]))
    record["step_time_s"] = seconds / len(stacked)
    if tokens_key:
      record["tokens_per_s"] = float(sum(float(np.asarray(h[tokens_key])[i]) for h in stacked)) / max(seconds, 1e-9)
    records.append(record)
  return records


# ------------------------------------------------------------------------------------------------ sinks
# Besides metrics.jsonl, a MetricsWriter forwards every record to its sinks. A sink has write(record),
# reset(records) (the writer's records after a truncate: a resumed run) and close().

_log = std_logging.getLogger(__name__)


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
  """The numeric fields of a metrics record as {"<phase>/<field>": value}; nested dicts join with '/'.

  "phase" and "step" are not values; strings, lists and None are left out.
  """
  phase = str(record.get("phase", "metrics"))
  out = {}

  def visit(name, value):
    if isinstance(value, Mapping):
      for k, v in value.items():
        visit(f"{name}/{k}", v)
    elif isinstance(value, (bool, int, float, np.integer, np.floating)):
      out[name] = float(value)
    elif getattr(value, "shape", None) == ():  # 0-d numpy / jax arrays
      out[name] = float(value)

  for key, value in record.items():
    if key not in ("phase", "step"):
      visit(f"{phase}/{key}", value)
  return out


def _crc32c_table() -> list[int]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum of TFRecord files."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  """One TFRecord: length, masked CRC of the length, data, masked CRC of the data."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _varint(value: int) -> bytes:
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def event_proto(wall_time: float, step: int = 0, scalar_values: Mapping[str, float] | None = None,
                file_version: str | None = None) -> bytes:
  """A serialized tensorboard `Event`: wall_time (1), step (2), file_version (3), summary (5).

  The summary holds one `Summary.Value` per scalar: tag (1) and simple_value (2, float32), the scalar
  format TensorBoard reads directly.
  """
  out = struct.pack("<Bd", 1 << 3 | 1, wall_time) + _varint(2 << 3) + _varint(max(int(step), 0))
  if file_version is not None:
    out += _length_delimited(3, file_version.encode())
  if scalar_values:
    values = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + struct.pack("<Bf", 2 << 3 | 5, value))
        for tag, value in scalar_values.items())
    out += _length_delimited(5, values)
  return out


class TensorBoardSink:
  """Writes the scalars of every record to TensorBoard event files in `logdir` (no TensorFlow needed).

  Tags are "<phase>/<field>" (e.g. "rl/pass_rate", "eval/pass@1") at the record's step. After a resume the
  event files are rewritten from the kept records, so TensorBoard shows what metrics.jsonl holds.
  """

  def __init__(self, logdir: str):
    self.logdir = logdir
    self._file = None
    atexit.register(self.close)

  def _open(self):
    if self._file is None:
      os.makedirs(self.logdir, exist_ok=True)
      name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
      self._file = open(os.path.join(self.logdir, name), "ab")
      self._file.write(tfrecord(event_proto(time.time(), file_version="brain.Event:2")))
    return self._file

  def write(self, record: Mapping[str, Any]) -> None:
    values = scalars(record)
    if values:
      f = self._open()
      f.write(tfrecord(event_proto(time.time(), int(record.get("step", 0) or 0), values)))
      f.flush()

  def reset(self, records: Sequence[Mapping[str, Any]]) -> None:
    self.close()
    for path in glob.glob(os.path.join(self.logdir, "events.out.tfevents.*")):
      os.remove(path)
    for record in records:
      self.write(record)

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None


class WandbSink:
  """Logs every record to a Weights & Biases run (`pip install wandb`; WANDB_MODE=offline works offline).

  Each phase has its own step axis ("rl/step", "sft/step", ...). The run id is kept in <workdir>/wandb_run_id,
  so a resumed run continues the same W&B run; steps redone after a resume are logged again.
  """

  def __init__(self, workdir: str, project: str, config: Mapping[str, Any] | None = None,
                 name: str | None = None):
    import wandb  # pylint: disable=import-outside-toplevel

    id_path = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(id_path):
      with open(id_path) as f:
        run_id = f.read().strip()
    else:
      run_id = secrets.token_hex(4)  # W&B run ids: [a-z0-9], 8 characters
      write_text_atomic(id_path, run_id + "\n")
    self._run = wandb.init(project=project, dir=workdir, id=run_id, resume="allow",
                           name=name or os.path.basename(os.path.normpath(workdir)),
                           config=jsonable(dict(config or {})))
    self._phases = set()
    atexit.register(self.close)

  def write(self, record: Mapping[str, Any]) -> None:
    values = scalars(record)
    if not values or self._run is None:
      return
    phase = str(record.get("phase", "metrics"))
    if phase not in self._phases:
      self._run.define_metric(f"{phase}/step")
      self._run.define_metric(f"{phase}/*", step_metric=f"{phase}/step")
      self._phases.add(phase)
    self._run.log({**values, f"{phase}/step": int(record.get("step", 0) or 0)})

  def reset(self, records: Sequence[Mapping[str, Any]]) -> None:
    del records  # W&B keeps what it was sent.

  def close(self) -> None:
    if self._run is not None:
      self._run.finish()
      self._run = None


def curves_wanted(config: Any) -> bool:
  """`config.logging.plots` (True when absent): whether a trainer draws its PNG curves at the end of a run."""
  block = config.get("logging") if hasattr(config, "get") else None
  return bool((block or {}).get("plots", True))


def sinks_from_config(config: Any, workdir: str, is_chief: bool | None = None) -> list:
  """The sinks asked for by the optional `config.logging` block (defaults when it is absent):

    logging.tensorboard = True     event files in <workdir>/tensorboard (`tensorboard --logdir=<workdir>`)
    logging.wandb = False          a Weights & Biases run (needs `pip install wandb`)
    logging.wandb_project = ""     W&B project; "" = "maxrl_jax"

  Only process 0 of a multi-host job gets sinks (`is_chief`, default jax.process_index() == 0).
  """
  block = config.get("logging") if hasattr(config, "get") else None
  block = block or {}
  if is_chief is None:
    is_chief = jax.process_index() == 0
  if not is_chief:
    return []
  sinks = []
  if block.get("tensorboard", True):
    sinks.append(TensorBoardSink(os.path.join(workdir, "tensorboard")))
  if block.get("wandb", False):
    try:
      import wandb  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise ImportError("config.logging.wandb=True needs Weights & Biases: `pip install wandb` (or "
                        "`pip install -e \".[wandb]\"`), or set --config.logging.wandb=False.") from e
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    sinks.append(WandbSink(workdir, block.get("wandb_project") or "maxrl_jax", config_dict))
  _log.info("metrics sinks: %s", [type(s).__name__ for s in sinks])
  return sinks
