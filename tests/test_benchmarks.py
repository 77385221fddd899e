"""scripts/bench_rollout.py's roofline and torch baseline, scripts/batching_waste.py. (The benchmarks' runs at toy
size, through scripts/gpu_all.sh: tests/test_gpu_all.py.)"""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_script(name):
  """A module of scripts/ imported once per test session (its absl flags are defined on import)."""
  import importlib.util

  if name in sys.modules:
    return sys.modules[name]
  sys.path.insert(0, REPO)
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "scripts", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def test_roofline_of_the_paper_maze_scale():
  from maxrl_jax import memory_plan

  bench = _load_script("bench_rollout")
  roof = bench.roofline(bench.decoder_config("bfloat16"), 32, 128, 310, 100, memory_plan.CARDS["H200"])
  kv_per_token = 2 * 4 * 2 * 64 * 2  # k, v x 4 layers x 2 KV heads x 64 dims x bf16
  suffix_reads = 99 * 4096 * 100 * kv_per_token  # 99 decode steps x all 100 slots of 4096 rows
  assert roof["sampler_implemented"]["gbytes"] == pytest.approx(suffix_reads / 1e9, rel=0.06)
  assert roof["sampler_implemented"]["bound_s"] == pytest.approx(0.0183, abs=2e-4)  # memory-bound at 4.8 TB/s
  assert roof["sampler_filled"]["bound_s"] < 0.6 * roof["sampler_implemented"]["bound_s"]
  assert roof["rl_step"]["bound_s"] == pytest.approx(
      roof["sampler_implemented"]["bound_s"] + roof["update"]["bound_s"], rel=1e-3)
  assert roof["card"]["hbm_tb_s"] == 4.8 and roof["card"]["bf16_dense_tflop_s"] == 989.0


def test_torch_microbatches_fit_and_do_not_change_the_step():
  bench = _load_script("bench_rollout")
  # 4096 sequences of 50 MB each with 40 GB free: parts of at most 0.7 x 40 GB = 560 sequences -> 8 parts.
  assert bench.choose_torch_microbatches(50e6, 4096, 40e9) == 8
  assert bench.choose_torch_microbatches(1e3, 4096, 40e9) == 1
  assert bench.choose_torch_microbatches(1e12, 4, 1e9) == 4  # One sequence per part at worst.
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")

  def step(microbatches):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    model = transformers.Qwen2ForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    sequences = torch.randint(0, 32, (6, 12), generator=generator)
    advantages = torch.randn(6, generator=generator)
    bench.torch_policy_gradient_step(model, optimizer, sequences, advantages, prompt_len=5,
                                     microbatches=microbatches)
    return torch.cat([p.detach().flatten() for p in model.parameters()])

  one, three = step(1), step(3)
  assert torch.allclose(one, three, atol=1e-6), (one - three).abs().max()


def test_batching_waste():
  waste = _load_script("batching_waste")
  import numpy as np

  lengths = np.asarray([1, 3, 2, 2])
  assert waste.static_row_steps(lengths, 2) == 2 * 3 + 2 * 2  # each call runs to its longest
  # Slots: 1 then 2 (ends at 3), 3 then 2 (ends at 5): 2 slots x 5 steps.
  assert waste.inflight_row_steps(lengths, 2) == 2 * 5
  rng = np.random.default_rng(0)
  uniform = rng.integers(100, 2049, size=32768)
  row = waste.waste_table(uniform, [128])[0]
  # E[max of 128 uniforms] ~ 2033, mean 1074: about 47% of the row-steps are spent on finished rollouts.
  assert 0.45 < row["static_waste"] < 0.49 and row["inflight_waste"] < 0.01 and row["recovered"] > 0.45
