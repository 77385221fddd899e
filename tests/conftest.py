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
