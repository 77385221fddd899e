"""A run's working directory: checked before anything is written, and held by one process at a time.

    workdir = prepare_workdir(workdir)        # clear errors for "", a file, an unwritable path
    with WorkdirLock(workdir):                # a second process on the same workdir stops at once
        ...

The lock is an advisory `flock` on `<workdir>/.lock`, which the kernel releases when the holding process ends
in any way (a crash or SIGKILL included), so a killed run never leaves a stale lock behind: the next run on
the workdir resumes. The file records the holder (pid, host, start time, command) for the error message.
Network filesystems without flock support (some NFS setups) make the lock a no-op there.
"""

from __future__ import annotations

import errno
import hashlib
import fcntl
import json
import os
import socket
import sys
import time
from typing import Any, Mapping

from maxrl_jax import config_fields
from maxrl_jax import run_logging

LOCK_FILE = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another process is running in this workdir."""


def prepare_workdir(workdir: str) -> str:
  """Creates `workdir` if needed and checks it can hold a run; returns its absolute path.

  Raises ValueError naming the problem and the fix for an empty path, a path that is a file, a directory
  that cannot be created, or one that is not writable.
  """
  if not isinstance(workdir, str) or not workdir.strip():
    raise ValueError("--workdir is empty: give the directory where the run's files go, e.g. "
                     "--workdir=workdirs/maze.")
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--workdir {path} is a file, not a directory: give a directory (a new one is created).")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise ValueError(f"--workdir {path} cannot be created ({e.strerror or e}); choose a directory you can "
                     "write to.") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise ValueError(f"--workdir {path} is not writable by this user; choose a directory you can write to.")
  return path


class WorkdirLock:
  """Holds `<workdir>/.lock` for the life of a run; a second holder raises WorkdirBusyError at once."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd = None

  def acquire(self) -> "WorkdirLock":
    if not self.enabled or self._fd is not None:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise WorkdirBusyError(
            f"--workdir {os.path.dirname(self.path)} is in use by another run ({holder}). Wait for it to "
            "finish, stop it, or use another --workdir; two runs in one workdir would mix their records "
            "and checkpoints.") from e
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):  # No flock on this filesystem.
        return self
      raise
    info = (f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}, "
            f"command: {' '.join(sys.argv)[:300]}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def config_identity(config_dict: Mapping[str, Any]) -> dict[str, Any]:
  """The flat {dotted field: value} of a config that defines what a run computes.

  Fields that may change on resume (run_logging.RESUMABLE_FIELDS and RESUMABLE_PREFIXES: logging, the device
  mesh, checkpoint intervals) are left out. Stored in every checkpoint and compared on restore.
  """
  # As a checkpoint stores it (tuples -> lists).
  flat = config_fields.flatten(json.loads(json.dumps(run_logging.jsonable(config_dict))))
  return {k: v for k, v in sorted(flat.items()) if k not in run_logging.RESUMABLE_FIELDS
          and not k.startswith(run_logging.RESUMABLE_PREFIXES)}


def config_digest(config_dict: Mapping[str, Any]) -> str:
  """SHA-256 of `config_identity` (summary.json records it: a finished run is recognised by it)."""
  return hashlib.sha256(json.dumps(config_identity(config_dict), sort_keys=True).encode()).hexdigest()


def read_finished_summary(workdir: str, config_dict: Mapping[str, Any]) -> dict | None:
  """<workdir>/summary.json if it was written by a run of exactly this config (same `config_digest`), else None.

  The trainers then check the summary's step count against the config before calling the run finished.
  """
  path = os.path.join(workdir, "summary.json")
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None  # Missing, or cut short: the resumed run rewrites it at its end.
  if isinstance(summary, dict) and summary.get("config_sha256") == config_digest(config_dict):
    return summary
  return None
