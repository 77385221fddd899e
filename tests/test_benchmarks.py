"""scripts/gpu_benchmark.sh (and through it scripts/bench_rollout.py) at toy size: every step runs and reports.

A GPU session has minutes of device time; this makes sure the script it will run works before then.
"""

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def toy_benchmark(tmp_path_factory):
  out = tmp_path_factory.mktemp("gpu_benchmark")
  env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
             SIZES="--num_prompts=2 --num_rollouts=4 --prompt_len=34 --new_tokens=6 --repeats=1",
             SWEEP="--sweep_prompts=2 --sweep_rollouts=2,4 --sweep_new_tokens=4,6 --sweep_repeats=1")
  proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_benchmark.sh"), str(out)], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + (out / "log.txt").read_text()[-5000:]
  return out


def test_every_step_writes_its_output(toy_benchmark):
  log = (toy_benchmark / "log.txt").read_text()
  for step in ("versions", "paper_scale", "sweep"):
    assert f"== {step}: exit 0 after" in log
  versions = (toy_benchmark / "versions.txt").read_text()
  assert "jax " in versions and "jax devices" in versions


def test_paper_scale_json_has_the_ratios_and_the_rl_step(toy_benchmark):
  report = json.loads((toy_benchmark / "paper_scale.json").read_text())
  assert report["setup"]["num_prompts"] == 2 and report["setup"]["dtype"] == "bfloat16"
  assert report["sampler"]["median_s"] > 0 and report["ratios"]["recompute_s_over_sampler_s"] > 0
  assert report["rl_step"]
  # The comparison with transformers' generate runs only where torch and transformers are installed.
  pytest.importorskip("torch", reason="the generate comparison needs torch")
  pytest.importorskip("transformers", reason="the generate comparison needs transformers")
  assert "sampler_vs_generate" in report["targets"]
  assert report["ratios"]["generate_s_over_sampler_s"] > 0
  assert report["conversion_max_abs_logit_diff"] < 0.1  # bf16 logits of the same weights in both stacks


def test_sweep_json_covers_every_point(toy_benchmark):
  sweeps = json.loads((toy_benchmark / "sweep.json").read_text())["sweeps"]
  points = set()
  for group in (sweeps.values() if isinstance(sweeps, dict) else [sweeps]):
    for point in group:
      assert point["sampler"]["median_s"] > 0
      points.add((point["num_rollouts"], point["new_tokens"]))
  # N in {2, 4} at --new_tokens=6, and M in {4, 6} at --num_rollouts=4.
  assert points == {(2, 6), (4, 6), (4, 4)}
