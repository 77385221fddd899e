"""Fault injection on the run lifecycle (maxrl_jax/trainers/harness.py): no fault may lose records or report a
wrong result. Every trainer runs through the same harness and step loop, so the faults are injected once, on the
fastest run (the maze's tiny preset); tests/test_train_maze.py, test_text_pipeline.py, test_classification.py
and test_countdown_task.py resume each trainer's own run.

One finished tiny run is made once per session (conftest.py); each test copies its workdir, injects one fault
and re-runs.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from maxrl_jax import checkpoints
from maxrl_jax import train
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.trainers import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import maze as maze_config  # noqa: E402
import run_files  # noqa: E402  (tests/run_files.py)

TIMING_FIELDS = ("step_time_s", "tokens_per_s")


def tiny_config(**overrides):
  return run_files.with_overrides(maze_config.get_config("tiny"), overrides)


_metrics = run_files.metrics


def _deterministic(records):
  return run_files.without(records, TIMING_FIELDS)


_summary = run_files.summary


@pytest.fixture
def finished(finished_maze_run):
  return finished_maze_run


@pytest.fixture
def copy(finished, tmp_path):
  def make():
    target = str(tmp_path / "run")
    shutil.copytree(finished, target)
    os.remove(os.path.join(target, "summary.json"))  # An interrupted run: not finished yet.
    return target
  return make


def test_deleted_metrics_are_rebuilt_from_the_checkpoint(finished, copy, capsys):
  workdir = copy()
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert "rebuilt from the checkpoint" in capsys.readouterr().out
  assert summary["rl_steps"] == 6
  original = _summary(finished)
  assert summary["initial_eval"] == original["initial_eval"] and summary["eval"] == original["eval"]
  assert _deterministic(_metrics(workdir)) == _deterministic(_metrics(finished))


def test_a_malformed_line_is_an_error_naming_file_and_line(copy):
  workdir = copy()
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    lines = f.readlines()
  lines[3] = '{"phase": "sft", "step": \n'
  with open(path, "w") as f:
    f.writelines(lines)
  with pytest.raises(ValueError, match=r"metrics.jsonl, line 4, is not a metrics record"):
    train.train_and_evaluate(tiny_config(), workdir)


def test_a_record_cut_by_a_kill_mid_write_is_not_an_error(finished, copy):
  workdir = copy()
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"phase": "rl", "st')  # No newline: the last write of a killed process.
  summary = train.train_and_evaluate(tiny_config(), workdir)
  assert summary["eval"] == _summary(finished)["eval"]


_flip_bytes = run_files.flip_bytes


_largest_file = run_files.largest_file


def test_a_corrupted_checkpoint_falls_back_to_the_previous_good_one(finished, copy):
  workdir = copy()
  _flip_bytes(_largest_file(os.path.join(workdir, "checkpoints", "rl", "6")))
  with pytest.warns(UserWarning, match=r"checkpoint .*rl/6 is corrupt"):
    summary = train.train_and_evaluate(tiny_config(), workdir)
  # Resumed from step 4 and redid steps 5-6: the same result as the uninterrupted run.
  assert summary["eval"] == _summary(finished)["eval"]
  assert _deterministic(_metrics(workdir)) == _deterministic(_metrics(finished))
  assert any(name.startswith("corrupt-6-") for name in os.listdir(os.path.join(workdir, "checkpoints", "rl")))


def test_no_good_checkpoint_is_a_clear_error(copy):
  workdir = copy()
  for step in ("4", "6"):
    _flip_bytes(_largest_file(os.path.join(workdir, "checkpoints", "rl", step)))
  with pytest.warns(UserWarning):
    with pytest.raises(checkpoints.CheckpointError, match=r"(?s)No good .rl. checkpoint.*step 6.*step 4"):
      train.train_and_evaluate(tiny_config(), workdir)


def test_another_config_cannot_adopt_the_checkpoints_even_without_config_json(copy):
  workdir = copy()
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(checkpoints.CheckpointError, match=r"another config \(objective.name: 'maxrl' -> 'grpo'"):
    train.train_and_evaluate(tiny_config(**{"objective.name": "grpo"}), workdir)


@pytest.mark.parametrize("field", ["sft.learning_rate", "rl.learning_rate"])
def test_a_diverged_run_stops_naming_the_step_and_the_quantity(tmp_path, field):
  workdir = str(tmp_path / "run")
  with pytest.raises(loop.NonFiniteError, match=r"diverged: .* is (nan|inf|not finite) at step \d+"):
    train.train_and_evaluate(tiny_config(**{field: float("inf")}), workdir)
  assert not os.path.exists(os.path.join(workdir, "summary.json"))
  # Every checkpoint kept holds finite parameters.
  for phase in ("sft", "rl"):
    directory = os.path.join(workdir, "checkpoints", phase)
    saved = [int(s) for s in os.listdir(directory) if s.isdigit()] if os.path.isdir(directory) else []
    if field.startswith("sft"):
      assert not saved or max(saved) < 2


def test_rerunning_a_finished_run_changes_nothing(finished, capsys):
  files = lambda: {name: os.path.getmtime(os.path.join(finished, name)) for name in os.listdir(finished)
                   if name != workdir_lib.LOCK_FILE}  # The lock file records its latest holder.
  before = files()
  with open(os.path.join(finished, "summary.json")) as f:
    text = f.read()
  summary = train.train_and_evaluate(tiny_config(), finished)
  assert "already holds this run, finished" in capsys.readouterr().out
  with open(os.path.join(finished, "summary.json")) as f:
    assert f.read() == text
  assert files() == before
  assert summary == json.loads(text)


def _main(workdir, *extra):
  cmd = [sys.executable, "-m", "maxrl_jax.main", f"--config={REPO}/configs/maze.py:tiny",
         f"--workdir={workdir}", *extra]
  return subprocess.run(cmd, cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=300)


def test_a_second_process_on_a_busy_workdir_stops_at_once(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with workdir_lib.WorkdirLock(workdir):
    start = time.time()
    result = _main(workdir)
  assert result.returncode != 0
  assert "is in use by another run (pid" in result.stderr and workdir in result.stderr
  assert time.time() - start < 120
  assert not os.path.exists(os.path.join(workdir, "metrics.jsonl"))


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  code = ("import sys, time; sys.path.insert(0, %r); from maxrl_jax import workdir as w; "
          "w.WorkdirLock(%r).acquire(); print('locked', flush=True); time.sleep(60)" % (REPO, workdir))
  holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(workdir_lib.WorkdirBusyError, match=f"pid {holder.pid}"):
    workdir_lib.WorkdirLock(workdir).acquire()
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  workdir_lib.WorkdirLock(workdir).acquire().release()  # The kernel dropped the dead holder's lock.


@pytest.mark.parametrize("bad, message", [
    ("", r"--workdir is empty"),
    ("FILE", r"is a file, not a directory"),
    ("/proc/maxrl_cannot_create/run", r"cannot be created"),
])
def test_bad_workdirs_are_named(tmp_path, bad, message):
  if bad == "FILE":
    bad = str(tmp_path / "a_file")
    with open(bad, "w") as f:
      f.write("x")
  with pytest.raises(ValueError, match=message):
    workdir_lib.prepare_workdir(bad)


def test_bad_workdir_on_the_command_line_exits_nonzero_with_the_message(tmp_path):
  bad = str(tmp_path / "a_file")
  with open(bad, "w") as f:
    f.write("x")
  result = _main(bad)
  assert result.returncode != 0 and "is a file, not a directory" in result.stderr
  assert "Traceback" not in result.stderr
