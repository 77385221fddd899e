"""maxrl_jax.inflight_sampling: the in-flight sampler returns exactly the tokens of static batching with the same
per-rollout keys, whatever the number of slots; its log-probs are the model's; its work is what the
algorithm says (S = 1: one iteration per token; S >= P N: the longest rollout's length)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax import inflight_sampling
from maxrl_jax import sampling
from maxrl_jax.models import decoder

STOP = 3
N, M = 4, 12


@pytest.fixture(scope="module")
def model():
  config = decoder.DecoderConfig(vocab_size=16, num_layers=1, hidden_size=32, ffn_size=64, num_heads=2,
                                 num_kv_heads=1, max_positions=32, init_std=0.5)
  fns = decoder.DecoderFns(config)
  # Large random weights: peaked, different next-token distributions, so lengths spread over [1, M].
  return fns, fns.init(jax.random.key(0))


@pytest.fixture(scope="module")
def prompts():
  return sampling.left_pad([[1, 5, 7], [2, 9], [4, 4, 4, 4, 6]], 6, pad_id=0)  # P = 3, left-padded to 6


def _assert_same(a: sampling.Rollouts, b: sampling.Rollouts):
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
  np.testing.assert_array_equal(a.lengths, b.lengths)
  np.testing.assert_array_equal(a.stopped, b.stopped)
  assert int(a.num_steps) == int(b.num_steps)
  np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)


@pytest.mark.parametrize("num_slots", [1, 5, 64])
def test_inflight_equals_static_with_the_same_keys(model, prompts, num_slots):
  fns, params = model
  kwargs = dict(num_rollouts=N, max_new_tokens=M, stop_tokens=(STOP,), pad_id=0)
  key = jax.random.key(7)
  static = inflight_sampling.sample_rollouts_static(fns, params, prompts, key, **kwargs)
  rollouts, stats = inflight_sampling.sample_rollouts_inflight_with_stats(
      fns, params, prompts, key, num_slots=num_slots, **kwargs)
  _assert_same(rollouts, static)
  lengths = np.asarray(static.lengths)
  # The test is not vacuous: rollouts of different lengths, some stopped, some cut at M.
  assert len(set(lengths.ravel().tolist())) >= 3 and static.stopped.any() and (lengths == M).any()
  assert rollouts.tokens.shape == (3, N, M) and (np.asarray(rollouts.tokens)[~np.asarray(rollouts.mask)] == 0).all()
  # Work: one rollout at a time -> one iteration per token; every rollout at once -> the longest length.
  iterations = int(stats.iterations)
  if num_slots == 1:
    assert iterations == lengths.sum()
  elif num_slots >= lengths.size:
    assert iterations == lengths.max() == int(static.num_steps)
  else:
    assert lengths.sum() / num_slots <= iterations < lengths.sum() / num_slots + M


def test_sampling_options_and_logprobs(model, prompts):
  """Temperature, top-k and top-p give the same tokens as the static reference, with the sampling
  distribution's log-probs; at temperature 1 they are the model's teacher-forced log-probs."""
  fns, params = model
  kwargs = dict(num_rollouts=N, max_new_tokens=M, stop_tokens=(STOP,), temperature=0.8, top_k=6, top_p=0.9)
  key = jax.random.key(3)
  _assert_same(inflight_sampling.sample_rollouts_inflight(fns, params, prompts, key, num_slots=5, **kwargs),
               inflight_sampling.sample_rollouts_static(fns, params, prompts, key, **kwargs))
  rollouts = inflight_sampling.sample_rollouts_inflight(fns, params, prompts, key, num_rollouts=N,
                                                        max_new_tokens=M, num_slots=5, stop_tokens=(STOP,))
  teacher = sampling.sequence_logprobs_shared_prefix(fns, params, prompts, rollouts.tokens)
  np.testing.assert_allclose(np.where(rollouts.mask, teacher, 0.0), rollouts.logprobs, atol=1e-4)


def test_greedy_matches_the_prefix_shared_sampler(model, prompts):
  """At temperature 0 keys do not matter: the tokens of sampling.sample_rollouts."""
  fns, params = model
  kwargs = dict(num_rollouts=2, max_new_tokens=M, stop_tokens=(STOP,), temperature=0.0)
  reference = sampling.sample_rollouts(fns, params, prompts, jax.random.key(0), **kwargs)
  rollouts = inflight_sampling.sample_rollouts_inflight(fns, params, prompts, jax.random.key(1), num_slots=4,
                                                        **kwargs)
  _assert_same(rollouts, reference)


def test_prompt_ids_make_the_draws_independent_of_the_calls(model, prompts):
  """Two calls with global prompt ids return the rollouts of one call over all prompts."""
  fns, params = model
  kwargs = dict(num_rollouts=N, max_new_tokens=M, stop_tokens=(STOP,), num_slots=5)
  key = jax.random.key(11)
  whole = inflight_sampling.sample_rollouts_inflight(fns, params, prompts, key, **kwargs)
  parts = [inflight_sampling.sample_rollouts_inflight(
      fns, params, sampling.PaddedPrompts(tokens=prompts.tokens[rows], lengths=prompts.lengths[rows]), key,
      prompt_ids=jnp.asarray(rows), **kwargs) for rows in ([0, 1], [2])]
  np.testing.assert_array_equal(np.concatenate([p.tokens for p in parts]), whole.tokens)
  np.testing.assert_array_equal(np.concatenate([p.lengths for p in parts]), whole.lengths)


def test_errors_name_the_problem(model, prompts):
  fns, params = model
  with pytest.raises(ValueError, match="num_slots=0"):
    inflight_sampling.sample_rollouts_inflight(fns, params, prompts, jax.random.key(0), num_rollouts=2,
                                               max_new_tokens=4, num_slots=0)
  with pytest.raises(ValueError, match=r"prompt_ids .*\(3,\)"):
    inflight_sampling.sample_rollouts_inflight(fns, params, prompts, jax.random.key(0), num_rollouts=2,
                                               max_new_tokens=4, num_slots=2, prompt_ids=jnp.arange(2))


def test_text_trainer_with_inflight_sampling(tmp_path):
  """configs/gsm8k_smollm2.py:tiny with rollout.inflight_slots: the learner's log-probs match the sampler's."""
  import json
  import os

  from configs import gsm8k_smollm2
  from maxrl_jax import train

  config = gsm8k_smollm2.get_config("tiny")
  config.rollout.inflight_slots = 3  # 2 prompts x 4 rollouts per call through 3 rows
  config.sft.steps, config.rl.steps = 10, 2
  config.eval.every_steps, config.log_every_steps, config.checkpoint_every_steps = 2, 1, 2
  config.eval.num_problems = 4
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["rl_steps"] == 2 and 0 <= summary["eval"]["pass@1"] <= 1
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    rl = [r for r in map(json.loads, f) if r["phase"] == "rl"]
  assert [r["step"] for r in rl] == [1, 2]
  assert all(r["logprob_mismatch"] < 1e-4 for r in rl), rl
