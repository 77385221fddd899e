"""Test-session setup, done before JAX is imported anywhere (subprocesses inherit the environment).

- Run on the CPU unless JAX_PLATFORMS says otherwise.
- A persistent compilation cache private to this test session: the end-to-end tests launch the trainer in
  subprocesses (to kill and resume it), and on 2 cores compiling the same step functions again in each
  process would dominate the suite's time. The cache only stores compiled executables; results are the same.
"""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="maxrl_jax_test_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import sys  # noqa: E402

import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)  # configs/ and experiments/ are used from the repository root.


@pytest.fixture(scope="session")
def finished_maze_run(tmp_path_factory):
  """A finished run of configs/maze.py:tiny, trained once per session (tests copy it before changing it)."""
  from configs import maze as maze_config  # pylint: disable=import-outside-toplevel
  from maxrl_jax import train  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path_factory.mktemp("finished_maze") / "run")
  train.train_and_evaluate(maze_config.get_config("tiny"), workdir)
  return workdir
