"""scripts/bench_llm.py at tiny size on the CPU: both stacks run in their own processes and report; the
transformers architectures built from our LLM configs have the published parameter counts."""

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_llm") / "tiny.json"
  command = [sys.executable, os.path.join(REPO, "scripts", "bench_llm.py"), "--model=tiny", "--num_prompts=4",
             "--num_rollouts=2", "--prompt_len=8", "--new_tokens=6", "--repeats=1", "--micro_batch_prompts=2",
             "--micro_batch_rollouts=1", "--update_prompts=2", "--sample_chunk_prompts=2", "--sample_calls=1",
             f"--out={out}"]
  proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report == json.loads(proc.stdout)
  return report


def test_jax_stack_samples_and_updates(tiny_report):
  ours = tiny_report["jax"]
  assert ours["process"]["exit_code"] == 0, ours["process"]
  assert ours["sizes"]["sample_calls"] == 2 and ours["sizes"]["sample_calls_timed"] == 1
  sampler = ours["sampler"]
  assert sampler["median_s"] > 0 and sampler["step_s"] == pytest.approx(2 * sampler["median_s"], rel=1e-3)
  assert sampler["new_tokens_per_s"] > 0 and "xla_temp_gib" in sampler
  update = ours["update"]
  assert update["loss_is_finite"] and update["micro_batches_per_step"] == 4
  assert update["step_s"] == pytest.approx(2 * update["median_s"], rel=1e-3)  # 2 of 4 prompts timed
  assert ours["plan"]["fits"]


def test_torch_stack_generates_and_updates(tiny_report):
  theirs = tiny_report["torch"]
  if not HAVE_TORCH:
    assert "skipped" in theirs
    pytest.skip("torch / transformers are not installed: the torch half is skipped (and says so in the JSON)")
  assert theirs["process"]["exit_code"] == 0, theirs["process"]
  assert theirs["model_params"] == tiny_report["jax"]["model_params"]  # The same architecture in both stacks.
  generate = theirs["generate"]
  assert generate["rows_per_call"] == 4 and generate["calls"] == 2 and generate["median_s"] > 0
  assert theirs["update"]["loss_is_finite"] and theirs["update"]["rows_per_microbatch"] == 2
  comparison = tiny_report["comparison"]
  assert comparison["generate_s_over_sampler_s"] > 0 and comparison["torch_rl_step_s"] > 0


@pytest.mark.skipif(not HAVE_TORCH, reason="torch / transformers are not installed")
def test_transformers_architectures_match_the_plan():
  """hf_config_dict of our SmolLM2 / Qwen3 configs gives transformers models (on the meta device: nothing is
  allocated) with exactly our parameter count."""
  code = r"""
import inspect, json, sys, torch, transformers
from maxrl_jax import memory_plan
from maxrl_jax.models import decoder, hf_loading
out = {}
for name, arch, cls, model_cls in (("smollm2-360m", "llama", transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                   ("qwen3-1.7b", "qwen3", transformers.Qwen3Config, transformers.Qwen3ForCausalLM)):
  config = memory_plan.MODELS[name]()
  values = hf_loading.hf_config_dict(config, arch)
  values.pop("torch_dtype", None)
  if "rope_parameters" in inspect.signature(cls.__init__).parameters:
    values.pop("rope_scaling", None)
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": values.pop("rope_theta")}
  with torch.device("meta"):
    model = model_cls(cls(**values))
  out[name] = [sum(p.numel() for p in model.parameters()), decoder.count_params(config)]
print(json.dumps(out))
"""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  counts = json.loads(proc.stdout.strip().splitlines()[-1])
  assert counts["smollm2-360m"] == [361_821_120, 361_821_120]
  assert counts["qwen3-1.7b"] == [1_720_574_976, 1_720_574_976]


def test_a_process_out_of_time_exits_124_and_the_json_says_so(tmp_path):
  """A stack process killed at its time limit is a benchmark cut short, not a crash: exit 124 (as `timeout`
  exits), so scripts/gpu_all.sh reports the part as cut short; the JSON names the limit."""
  out = tmp_path / "cut.json"
  command = [sys.executable, os.path.join(REPO, "scripts", "bench_llm.py"), "--model=tiny", "--num_prompts=2",
             "--num_rollouts=2", "--prompt_len=8", "--new_tokens=6", "--repeats=1", "--child_timeout_s=1",
             "--torch_timeout_s=1", f"--out={out}"]
  proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 124, proc.stderr[-3000:]
  assert re.search(r"bench_llm: the jax (and torch processes|process) did not finish", proc.stderr), proc.stderr
  process = json.loads(out.read_text())["jax"]["process"]
  assert process["exit_code"] is None and process["timed_out_after_s"] == 1, process
