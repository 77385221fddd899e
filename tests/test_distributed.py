"""A two-process `jax.distributed` job on localhost (CPU collectives over gloo) gives the metrics of one process.

Both runs use a data=2 x fsdp=2 mesh: two processes with 2 CPU devices each, and one process with 4. They run
tests/sharding_checks.py (SFT steps, RL steps, a sharded sampler call, an orbax save / restore of the sharded
RL state, and a metrics file written by process 0 only).
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "sharding_checks.py")
TIMEOUT_S = 400


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  # Optimisation level 0 of the CPU backend (LLVM) compiles 2-3x faster; partitioning is unaffected.
  return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={num_devices} --xla_backend_optimization_level=0"))


def _finish(procs):
  """Waits for every process; on a timeout kills the ones this test started. Returns their logs."""
  logs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for p in procs:
        if p.poll() is None:
          p.kill()
      out, _ = proc.communicate()
    logs.append((proc.returncode, out))
  return logs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("distributed")
  port = _free_port()
  common = [sys.executable, WORKER, "distributed"]
  procs = [
      subprocess.Popen(common + ["--num_processes=2", f"--process_id={i}", f"--port={port}",
                                 f"--workdir={tmp / 'two'}", f"--out={tmp / 'two.json'}"],
                       env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)
  ]
  procs.append(subprocess.Popen(
      common + ["--num_processes=1", f"--workdir={tmp / 'one'}", f"--out={tmp / 'one.json'}"],
      env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  logs = _finish(procs)
  for name, (code, out) in zip(("process 0", "process 1", "one process"), logs):
    assert code == 0, f"{name} failed:\n{out[-6000:]}"
  with open(tmp / "two.json") as f:
    two = json.load(f)
  with open(tmp / "one.json") as f:
    one = json.load(f)
  return two, one, tmp


def test_two_processes_span_one_mesh(runs):
  two, one, _ = runs
  assert two["process_count"] == 2 and two["local_devices"] == 2
  assert one["process_count"] == 1 and one["local_devices"] == 4
  assert two["mesh"] == "data=2 x fsdp=2 (4 devices, 2 processes, cpu)"
  assert two["kernel_spec"] == ["None", "fsdp"] and two["kernel_shard_shape"] == [32, 32]


def test_two_processes_give_the_metrics_of_one(runs):
  two, one, _ = runs
  for phase in ("sft", "rl"):
    assert len(two[phase]) == len(one[phase]) == 2
    for a, b in zip(two[phase], one[phase]):
      assert a.keys() == b.keys()
      for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-5, err_msg=f"{phase} {key}")
  assert all(step["grad_norm"] > 0.1 for step in one["rl"])
  np.testing.assert_array_equal(two["tokens"], one["tokens"])
  np.testing.assert_allclose(two["logprobs"], one["logprobs"], atol=1e-4)
  for path, values in one["params"].items():
    np.testing.assert_allclose(two["params"][path], values, atol=2e-3, err_msg=path)


def test_per_host_batches_assemble_into_the_global_batch(runs):
  two, one, _ = runs
  assert two["host_local_batch_equal"] and one["host_local_batch_equal"]
  assert two["host_local_batch_shape"] == [8, 3]


def test_checkpoint_written_once_and_restored_sharded(runs):
  two, _, tmp = runs
  assert two["restore_equal"] and two["restore_sharding_equal"]
  assert two["checkpoint_steps"] == ["2", "digests.json"]
  step_dir = tmp / "two" / "checkpoints" / "rl" / "2"
  assert (step_dir / "commit_success.txt").exists() or (step_dir / "_CHECKPOINT_METADATA").exists()


def test_metrics_written_by_process_0_only(runs):
  two, _, tmp = runs
  assert two["metrics_records"] == [{"phase": "rl", "process": 0, "step": 1}]
  with open(tmp / "two" / "metrics.jsonl") as f:
    assert [json.loads(line) for line in f] == [{"phase": "rl", "process": 0, "step": 1}]
