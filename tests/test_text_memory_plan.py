"""The RL trainer's memory plan for language models (maxrl_jax/trainers/sizes.py: plan_memory, check_memory): a fake device budget
(config.memory.device_bytes) refuses an over-budget config before anything is compiled, naming the fields to
change and values that fit, and batch sizes left at 0 are chosen to fit. Arithmetic only, except the last test
(the tiny trainer refusing at start)."""

import re

import pytest

from configs import gsm8k_smollm2
from maxrl_jax import memory_plan
from maxrl_jax.models import decoder
from maxrl_jax import train
from maxrl_jax.trainers import sizes

MiB = 2**20


def _model(vocab=1024):
  return decoder.DecoderConfig(vocab_size=vocab, num_layers=2, hidden_size=64, ffn_size=128, num_heads=4,
                               num_kv_heads=2, dtype="float32", max_positions=1024)


def _config(prompt_chunk=0, micro_prompts=0, micro_rollouts=0):
  """8 prompts x 16 rollouts, prompts of 32 tokens, responses up to 512; evaluation calls of 2 x 4 rollouts."""
  config = gsm8k_smollm2.get_config("tiny")
  config.rollout.num_prompts, config.rollout.num_samples, config.rollout.max_new_tokens = 8, 16, 512
  config.data.max_prompt_tokens = 32
  config.rollout.prompt_chunk = prompt_chunk
  config.rl.micro_batch_prompts, config.rl.micro_batch_rollouts = micro_prompts, micro_rollouts
  config.eval.prompt_chunk, config.eval.samples_per_call, config.eval.num_samples = 2, 4, 8
  config.eval.max_new_tokens = 512
  config.memory.reserve_bytes = 0
  return config


def _peaks(config, model, chunk, micro_batch, mesh=(1, 1)):
  """(sampling, update) peak bytes per device of one RL step, as plan_memory adds them up."""
  plan = memory_plan.estimate(model, memory_plan.Workload(8, 16, 32, 512), sample_chunk=(chunk, 16),
                              micro_batch=micro_batch, mesh=mesh, reserve_bytes=config.memory.reserve_bytes)
  held = plan.state + plan.rollouts + plan.reserve
  return held + plan.sampling_peak, held + plan.update_peak


def test_auto_sizes_are_the_largest_that_fit():
  model, config = _model(), _config()
  everything = _peaks(config, model, 8, (8, 16))
  budget = max(everything) - 1  # Everything at once is just over.
  choice = sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=budget)
  assert choice.chosen == sizes.AUTO_SIZES and not choice.over_budget
  sampling, update = _peaks(config, model, choice.prompt_chunk, choice.micro_batch)
  assert sampling <= budget and update <= budget and choice.plan.total <= budget
  assert (choice.prompt_chunk, choice.micro_batch) != (8, (8, 16))
  # Nothing larger fits: the next sampling call and every micro-batch with more rollouts are over.
  larger_chunks = [c for c in (1, 2, 4, 8) if c > choice.prompt_chunk]
  assert all(_peaks(config, model, c, choice.micro_batch)[0] > budget for c in larger_chunks)
  rows = choice.micro_batch[0] * choice.micro_batch[1]
  assert all(_peaks(config, model, choice.prompt_chunk, (p, n))[1] > budget
             for p in (1, 2, 4, 8) for n in (1, 2, 4, 8, 16) if p * n > rows)
  # The same choice as memory_plan.choose for the paper's GSM8K setting on one H100 (90% of its memory).
  paper, smollm = gsm8k_smollm2.get_config(), memory_plan.smollm2_360m()
  h100 = int(memory_plan.CARDS["H100"].memory_bytes * 0.9)
  choice = sizes.plan_memory(paper, smollm, prompt_len=paper.data.max_prompt_tokens, device_bytes=h100)
  reference = memory_plan.choose(smollm, memory_plan.Workload(256, 128, 512, 2048), device_bytes=h100)
  assert (choice.prompt_chunk, 128) == reference.sample_chunk and choice.micro_batch == reference.micro_batch
  # On 8 devices (data 8) every call and micro-batch holds a multiple of 8 prompts.
  choice = sizes.plan_memory(paper, smollm, prompt_len=paper.data.max_prompt_tokens, mesh_shape=(8, 1), device_bytes=h100)
  assert choice.prompt_chunk % 8 == 0 and choice.micro_batch[0] % 8 == 0


def test_over_budget_config_is_refused_with_the_fields_and_values_that_fit():
  model = _model()
  config = _config(prompt_chunk=8, micro_prompts=8, micro_rollouts=16)  # everything at once
  sampling, update = _peaks(config, model, 8, (8, 16))
  budget = min(sampling, update) - 1  # Both phases are over.
  with pytest.raises(ValueError) as error:
    sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=budget)
  message = str(error.value)
  assert "Over the device memory budget" in message and "GiB" in message
  for field in ("rollout.prompt_chunk", "rl.micro_batch_prompts", "rl.micro_batch_rollouts"):
    assert f"--config.{field}=" in message, field
  # The values it names fit.
  chunk = int(re.search(r"--config\.rollout\.prompt_chunk=(\d+)", message).group(1))
  micro = tuple(int(re.search(rf"--config\.rl\.micro_batch_{f}=(\d+)", message).group(1))
                for f in ("prompts", "rollouts"))
  config = _config(chunk, *micro)
  choice = sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=budget)
  assert (choice.prompt_chunk, choice.micro_batch, choice.chosen) == (chunk, micro, ())
  # Not enforced: the same sizes, and what is over.
  config = _config(prompt_chunk=8, micro_prompts=8, micro_rollouts=16)
  choice = sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=budget, enforce=False)
  assert (choice.prompt_chunk, choice.micro_batch) == (8, (8, 16)) and "rollout.prompt_chunk" in choice.over_budget


def test_evaluation_calls_and_the_state_are_checked_too():
  model = _model()
  config = _config(prompt_chunk=1, micro_prompts=1, micro_rollouts=1)
  config.eval.prompt_chunk, config.eval.samples_per_call, config.eval.num_samples = 8, 16, 16
  fits = sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=10**12)
  budget = max(_peaks(config, model, 1, (1, 1))) + 1  # The RL step fits, an evaluation call of 8 x 16 does not.
  assert fits.eval_bytes > budget
  with pytest.raises(ValueError, match=r"evaluation call .* --config\.eval\.samples_per_call=\d"):
    sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=budget)
  # Nothing fits: the error says so and names the other ways out.
  with pytest.raises(ValueError, match=r"alone take .*fsdp: --config\.mesh\.shape.*max_new_tokens"):
    sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=MiB)


def test_without_a_budget_nothing_is_refused_and_auto_sizes_are_the_smallest(capsys):
  model = _model()
  choice = sizes.plan_memory(_config(), model, prompt_len=_config().data.max_prompt_tokens, device_bytes=None)
  assert (choice.prompt_chunk, choice.micro_batch, choice.over_budget) == (1, (1, 1), "")
  config = _config(prompt_chunk=8, micro_prompts=8, micro_rollouts=16)
  assert sizes.plan_memory(config, model, prompt_len=config.data.max_prompt_tokens, device_bytes=None).prompt_chunk == 8
  # check_memory on this CPU (no device limit): nothing printed, nothing refused; with a budget it prints.
  assert sizes.device_memory_budget(config) is None
  sizes.check_memory(config, model, (1, 1), config.data.max_prompt_tokens)
  assert capsys.readouterr().out == ""
  config.memory.device_bytes = 10**12
  sizes.check_memory(config, model, (1, 1), config.data.max_prompt_tokens)
  assert "memory plan: rollout.prompt_chunk=8" in capsys.readouterr().out


def test_the_tiny_trainer_refuses_an_over_budget_config_at_start(tmp_path):
  config = gsm8k_smollm2.get_config("tiny")
  config.memory.device_bytes = MiB  # The tiny model's state fits; its sampling call does not.
  with pytest.raises(ValueError, match=r"Over the device memory budget of 0\.00 GiB .*rollout\.prompt_chunk"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
