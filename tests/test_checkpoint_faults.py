"""Checkpoint files a user can break, and a disk that fills up during a save.

A full disk is simulated without special rights by a file size limit (RLIMIT_FSIZE, which makes writes
fail with EFBIG), and, where this process may mount one (root in a container), by a small tmpfs (ENOSPC).
The runs go through `python -m maxrl_jax.main` with a small trainer that saves a checkpoint, then a bigger
one that does not fit, so what the user sees is what main prints.
"""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
import uuid

import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TRAINER = '''
"""A trainer that saves step 1 (small), then step 2 (config.leaves arrays of config.size floats, records of
config.record_bytes bytes) after limiting the file size to config.fsize bytes (0: no limit)."""
import resource
import signal

import jax.numpy as jnp

from maxrl_jax import checkpoints


def state_of(leaves, size, offset):
  return {f"w{i}": jnp.arange(size, dtype=jnp.float32) * (i + 1) + offset for i in range(leaves)}


def train_and_evaluate(config, workdir):
  ckpt = checkpoints.PhaseCheckpointer(workdir, "rl", identity={"run": 1})
  try:
    if not ckpt.all_steps():
      ckpt.save(1, state_of(config.leaves, 50, 0.5), records=[{"step": 1}])
    if config.fsize:
      signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
      resource.setrlimit(resource.RLIMIT_FSIZE, (config.fsize, resource.RLIM_INFINITY))
    ckpt.save(2, state_of(config.leaves, config.size, 1.5), records=[{"text": "x" * config.record_bytes}])
  finally:
    ckpt.close()
'''

CONFIG = '''
import ml_collections


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict({"task": "fake", "leaves": 4, "size": 50, "record_bytes": 0, "fsize": 0})
'''

LAUNCH = ("import sys; sys.path.insert(0, sys.argv.pop(1)); from absl import app; from maxrl_jax import main, train; "
          "import fake_trainer; train.train_and_evaluate = fake_trainer.train_and_evaluate; app.run(main.main)")


@pytest.fixture
def launch(tmp_path):
  """Runs the small trainer through maxrl_jax.main: launch(workdir, **config) -> CompletedProcess."""
  code = tmp_path / "code"
  code.mkdir()
  (code / "fake_trainer.py").write_text(TRAINER)
  (code / "fake_config.py").write_text(CONFIG)

  def run(workdir, env=None, **config):
    overrides = [f"--config.{k}={v}" for k, v in config.items()]
    environment = {k: v for k, v in os.environ.items() if k != "MAXRL_TRACEBACK"}
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, str(code), f"--config={code / 'fake_config.py'}", f"--workdir={workdir}",
         *overrides], cwd=REPO, env={**environment, **(env or {})}, capture_output=True, text=True, timeout=300)

  return run


def _like(leaves, size):
  return {f"w{i}": jnp.zeros((size,), jnp.float32) for i in range(leaves)}


def _check_refused_save(result, workdir, leaves=4):
  """One error line naming the path and the kept step; no traceback; step 1 intact; nothing partial left."""
  assert result.returncode == 1, result.stderr
  for noise in ("Traceback", "Task exception was never retrieved", "Exception ignored", "Event loop is closed"):
    assert noise not in result.stderr, result.stderr
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: Could not save the 'rl' checkpoint of step 2 to "
                                                 f"{os.path.join(workdir, 'checkpoints', 'rl', '2')}: "), lines
  message = lines[0]
  assert "the last good checkpoint, step 1" in message and "is kept" in message and "free there" in message
  directory = os.path.join(workdir, "checkpoints", "rl")
  assert sorted(os.listdir(directory)) == ["1", "digests.json"]  # no <step>.orbax-checkpoint-tmp, no digest tmp
  ckpt = checkpoints.PhaseCheckpointer(workdir, "rl", identity={"run": 1})
  ckpt.verify(1)
  step, state, extra = ckpt.restore_latest(_like(leaves, 50))
  ckpt.close()
  assert step == 1 and extra["records"] == [{"step": 1}]
  np.testing.assert_array_equal(state["w1"], np.arange(50, dtype=np.float32) * 2 + 0.5)
  return message


@pytest.mark.parametrize("size,record_bytes", [(200_000, 0), (50, 300_000)], ids=["arrays", "json_item"])
def test_a_file_size_limit_during_a_save_is_one_error_line(launch, tmp_path, size, record_bytes):
  workdir = str(tmp_path / "run")
  message = _check_refused_save(launch(workdir, size=size, record_bytes=record_bytes, fsize=100_000), workdir)
  assert "a file size limit was reached (File too large)" in message and "ulimit -f" in message
  # The same command without the limit resumes from step 1 and writes step 2.
  result = launch(workdir, size=size, record_bytes=record_bytes)
  assert result.returncode == 0, result.stderr
  ckpt = checkpoints.PhaseCheckpointer(workdir, "rl", identity={"run": 1})
  assert ckpt.all_steps() == [1, 2]
  ckpt.verify(2)
  ckpt.close()


def test_the_traceback_is_still_there_when_asked_for(launch, tmp_path):
  result = launch(str(tmp_path / "run"), size=200_000, fsize=100_000, env={"MAXRL_TRACEBACK": "1"})
  assert result.returncode != 0 and "CheckpointSaveError" in result.stderr and "Traceback" in result.stderr


@pytest.fixture
def small_disk(tmp_path):
  """A 400 kB tmpfs (skipped where this process may not mount one)."""
  mount_point = tmp_path / f"disk-{uuid.uuid4().hex[:8]}"
  mount_point.mkdir()
  if os.geteuid() != 0 or shutil.which("mount") is None:
    pytest.skip("mounting a tmpfs needs root")
  result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
  if result.returncode != 0:
    pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
  try:
    yield str(mount_point)
  finally:
    subprocess.run(["umount", str(mount_point)], check=False)


# Which write hits the full disk first: one big array, many arrays at once (their abandoned writes used to
# print asyncio and event-loop tracebacks), the JSON item with the records.
@pytest.mark.parametrize("leaves,size,record_bytes", [(2, 400_000, 0), (30, 20_000, 0), (30, 3_000, 300_000)],
                         ids=["one_array", "many_arrays", "json_item"])
def test_a_full_disk_during_a_save_is_one_error_line(launch, small_disk, tmp_path, leaves, size, record_bytes):
  workdir = os.path.join(small_disk, "run")
  for attempt in range(2):  # Twice: the second run resumes from step 1 and fails the same way.
    result = launch(workdir, leaves=leaves, size=size, record_bytes=record_bytes)
    message = _check_refused_save(result, workdir, leaves)
    assert "the disk is full (No space left on device)" in message, (attempt, message)
  # A roomy copy of the workdir resumes exactly: step 1 restores, and step 2 is written there.
  roomy = str(tmp_path / "roomy")
  shutil.copytree(workdir, roomy)
  result = launch(roomy, leaves=leaves, size=size, record_bytes=record_bytes)
  assert result.returncode == 0, result.stderr
  ckpt = checkpoints.PhaseCheckpointer(roomy, "rl", identity={"run": 1})
  ckpt.verify(1)
  step, state, _ = ckpt.restore_latest(_like(leaves, size))
  assert step == 2
  np.testing.assert_array_equal(state["w0"], np.arange(size, dtype=np.float32) + 1.5)
  ckpt.close()


# ------------------------------------------------------------------------------------------------ in process


def _state(offset=0.0):
  return {"w": jnp.arange(6, dtype=jnp.float32) + offset, "step": jnp.int32(3)}


def test_out_of_space_while_writing_the_digest(tmp_path, monkeypatch):
  ckpt = checkpoints.PhaseCheckpointer(str(tmp_path), "rl", identity={"run": 1})
  ckpt.save(1, _state())
  real_dump = json.dump

  def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoints.json, "dump", full_disk)
  with pytest.raises(checkpoints.CheckpointSaveError) as info:
    ckpt.save(2, _state(1.0))
  monkeypatch.setattr(checkpoints.json, "dump", real_dump)
  error = info.value
  assert isinstance(error, OSError) and error.errno == errno.ENOSPC and error.kept_step == 1
  assert error.filename == os.path.join(ckpt.directory, "2") and "\n" not in str(error)
  assert "the disk is full" in str(error) and "step 1" in str(error) and "is kept" in str(error)
  assert sorted(os.listdir(ckpt.directory)) == ["1", "digests.json"]
  assert ckpt.all_steps() == [1]
  np.testing.assert_array_equal(ckpt.restore(1, _state())["w"], np.arange(6))
  ckpt.save(2, _state(1.0))  # With room again the same checkpointer saves the step.
  ckpt.verify(2)
  ckpt.close()


def test_the_first_save_of_a_phase_says_there_is_no_earlier_checkpoint(tmp_path, monkeypatch):
  ckpt = checkpoints.PhaseCheckpointer(str(tmp_path), "sft")

  def full_disk(*args, **kwargs):
    raise ValueError("RESOURCE_EXHAUSTED: Error writing local file \"x\": Failed to write 10 bytes to file 3: "
                     "Disk quota exceeded [os_error_code='122']")

  monkeypatch.setattr(ckpt._manager, "save", full_disk)
  with pytest.raises(checkpoints.CheckpointSaveError, match=r"the disk quota is exceeded .* about 28 bytes "
                     r"\(the bytes of the state's arrays\).* no earlier 'sft' checkpoint exists") as info:
    ckpt.save(1, _state())
  assert info.value.errno == errno.EDQUOT and info.value.kept_step is None
  ckpt.close()


def test_other_save_errors_are_raised_as_they_are(tmp_path, monkeypatch):
  ckpt = checkpoints.PhaseCheckpointer(str(tmp_path), "rl")

  def denied(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")

  monkeypatch.setattr(ckpt._manager, "save", denied)
  with pytest.raises(PermissionError):
    ckpt.save(1, _state())
  ckpt.close()


def test_out_of_space_is_recognised_in_every_form():
  assert checkpoints.out_of_space_errno(OSError(errno.ENOSPC, "No space left on device")) == errno.ENOSPC
  assert checkpoints.out_of_space_errno(OSError(errno.EDQUOT, "x")) == errno.EDQUOT
  assert checkpoints.out_of_space_errno(OSError(errno.EFBIG, "File too large")) == errno.EFBIG
  tensorstore = ValueError('RESOURCE_EXHAUSTED: Error writing "w/0" in OCDBT database: Failed to write 962991 '
                           "bytes to file 14: No space left on device [os_error_code='28']")
  assert checkpoints.out_of_space_errno(tensorstore) == errno.ENOSPC
  assert checkpoints.out_of_space_errno(ValueError("OUT_OF_RANGE: ... File too large [os_error_code='27']")) == 27
  try:
    try:
      raise tensorstore
    except ValueError as e:
      raise RuntimeError("save failed") from e
  except RuntimeError as chained:
    assert checkpoints.out_of_space_errno(chained) == errno.ENOSPC
  assert checkpoints.out_of_space_errno(ExceptionGroup("g", [KeyError("a"), OSError(errno.ENOSPC, "x")])) == 28
  assert checkpoints.out_of_space_errno(ValueError("RESOURCE_EXHAUSTED: Out of memory allocating 4 GiB")) is None
  assert checkpoints.out_of_space_errno(PermissionError(errno.EACCES, "Permission denied")) is None


def test_reports_of_the_failed_save_are_held_back_and_others_let_through(caplog):
  """What orbax's threads log about the out-of-space failure is dropped; anything else is re-emitted."""
  logger = logging.getLogger("absl")
  filters = list(logger.filters)
  orbax_file = os.path.join(checkpoints._ORBAX_DIR, "checkpoint", "_src", "futures", "future.py")

  def orbax_log(message, error):
    record = logger.makeRecord("absl", logging.ERROR, orbax_file, 1, message, (), (type(error), error, None))
    logger.handle(record)

  space_error = checkpoints.CheckpointSaveError("full", errno.ENOSPC, "/x/2", 1)
  with caplog.at_level(logging.ERROR):
    with pytest.raises(checkpoints.CheckpointSaveError):
      with checkpoints._SaveReports():
        orbax_log("raised an exception: No space left on device", OSError(errno.ENOSPC, "No space left"))
        orbax_log("raised an exception", RuntimeError("Event loop is closed"))
        orbax_log("raised an exception: bad permissions", PermissionError(errno.EACCES, "denied"))
        logging.getLogger("absl").error("not from orbax")
        assert [r.getMessage() for r in caplog.records] == ["not from orbax"]  # orbax's are held back
        raise space_error
    assert [r.getMessage() for r in caplog.records] == ["not from orbax", "raised an exception: bad permissions"]
    caplog.clear()
    with pytest.raises(KeyError):
      with checkpoints._SaveReports():
        orbax_log("raised an exception: No space left on device", OSError(errno.ENOSPC, "No space left"))
        raise KeyError("another failure")
    assert [r.getMessage() for r in caplog.records] == ["raised an exception: No space left on device"]
  assert logger.filters == filters  # the filter is gone again


# ------------------------------------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("content,match", [
    ("[1, 2]", r"holds a JSON list, not the object"),
    ('"abc"', r"holds a JSON str"),
    ('{"1": 5}', r"has the entry '1': 5, not a step and its SHA-256"),
    ('{"one": "' + "0" * 64 + '"}', r"has the entry 'one'"),
    ('{"1": ', r"is unreadable"),
])
def test_a_damaged_digest_file_is_named_and_moves_nothing_aside(tmp_path, content, match):
  ckpt = checkpoints.PhaseCheckpointer(str(tmp_path), "rl")
  ckpt.save(1, _state())
  ckpt.close()
  path = os.path.join(ckpt.directory, checkpoints.DIGESTS_FILE)
  with open(path, "w") as f:
    f.write(content)
  with pytest.raises(checkpoints.CheckpointError, match=match) as info:
    checkpoints.PhaseCheckpointer(str(tmp_path), "rl")  # at the start of a run, not at its first checkpoint
  assert path in str(info.value) and "new --workdir" in str(info.value)
  assert sorted(os.listdir(ckpt.directory)) == ["1", "digests.json"]


@pytest.mark.parametrize("file_at", ["checkpoints", os.path.join("checkpoints", "rl")])
def test_a_file_where_the_checkpoint_directory_goes(tmp_path, file_at):
  os.makedirs(os.path.dirname(tmp_path / file_at), exist_ok=True)
  (tmp_path / file_at).write_text("not a directory")
  with pytest.raises(checkpoints.CheckpointError, match="is a file, not a directory") as info:
    checkpoints.PhaseCheckpointer(str(tmp_path), "rl")
  assert str(tmp_path / file_at) in str(info.value) and "Move or delete that file" in str(info.value)


def test_old_checkpoints_go_only_after_the_new_one_and_its_digest(tmp_path):
  ckpt = checkpoints.PhaseCheckpointer(str(tmp_path), "rl", max_to_keep=2)
  for step in (1, 2, 3, 4):
    ckpt.save(step, _state(step))
  assert ckpt.all_steps() == [3, 4]
  with open(os.path.join(ckpt.directory, checkpoints.DIGESTS_FILE)) as f:
    assert sorted(json.load(f)) == ["3", "4"]
  assert sorted(os.listdir(ckpt.directory)) == ["3", "4", "digests.json"]
  ckpt.close()
  with pytest.raises(ValueError, match="max_to_keep=0"):
    checkpoints.PhaseCheckpointer(str(tmp_path), "rl", max_to_keep=0)


def test_a_full_disk_while_pruning_old_digests_keeps_the_new_checkpoint(tmp_path, monkeypatch):
  ckpt = checkpoints.PhaseCheckpointer(str(tmp_path), "rl", max_to_keep=1)
  ckpt.save(1, _state())
  writes = []
  real_write = checkpoints.PhaseCheckpointer._write_digests

  def second_write_fails(self, digests):
    writes.append(dict(digests))
    if len(writes) == 2:  # the save's own digest succeeds, the pruned one does not
      raise OSError(errno.ENOSPC, "No space left on device")
    real_write(self, digests)

  monkeypatch.setattr(checkpoints.PhaseCheckpointer, "_write_digests", second_write_fails)
  with pytest.warns(UserWarning, match=r"still lists the deleted steps \[1\]"):
    ckpt.save(2, _state(1.0))
  monkeypatch.undo()
  assert ckpt.all_steps() == [2]
  ckpt.verify(2)
  ckpt.save(3, _state(2.0))  # the stale entry is dropped with the next digest
  with open(os.path.join(ckpt.directory, checkpoints.DIGESTS_FILE)) as f:
    assert sorted(json.load(f)) == ["3"]
  ckpt.close()
