"""Options from other RL libraries, each off by default: PPO-style mini-batches and epochs with a clipped
importance ratio (token or GSPO's sequence ratio), truncated importance sampling, a KL penalty to a frozen
reference, and LoRA adapters. Exact where the math allows (enumeration, identities), equivalence where two paths
must agree, and end to end on the tiny presets."""

import itertools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import gsm8k_smollm2
from configs import maze as maze_config
from maxrl_jax import config_fields
from maxrl_jax import estimators
from maxrl_jax import run_logging
from maxrl_jax import sampling
from maxrl_jax import train
from maxrl_jax.models import decoder
from maxrl_jax.models import hf_loading
from maxrl_jax.models import lora
from maxrl_jax.rl import population
from maxrl_jax.rl import step as step_lib
from maxrl_jax.rl import surrogates
from maxrl_jax.tasks.maze import env as maze
from maxrl_jax.trainers import harness
from maxrl_jax.trainers import loop

TIMING = ("step_time_s", "tokens_per_s", "sample_verify_s", "verify_s")


# ------------------------------------------------------------------------------------------------ ratios, clip, TIS


def test_importance_ratios_are_one_on_policy_with_the_policy_gradient():
  logp = jnp.log(jnp.array([[0.5, 0.25, 0.125, 1.0]]))
  mask = jnp.array([[True, True, True, False]])
  adv = jnp.array([1.5])
  for level in ("token", "sequence"):
    np.testing.assert_array_equal(surrogates.log_importance_ratio(logp, logp, mask, level), 0.0)

  # d/dlogp at r = 1 of the summed token objectives: A per token (both levels: under sequence_sum the
  # rollout's |y| copies of its sequence objective give |y| x A / |y|); of one sequence objective: A / |y|.
  def surrogate(x, level, tokens=slice(None)):
    objective, _ = surrogates.clipped_objective(surrogates.log_importance_ratio(x, logp, mask, level), adv, 0.2, 0.2)
    return jnp.sum((objective * mask)[:, tokens])

  np.testing.assert_allclose(jax.grad(surrogate)(logp, "token"), [[1.5, 1.5, 1.5, 0.0]])
  np.testing.assert_allclose(jax.grad(surrogate)(logp, "sequence"), [[1.5, 1.5, 1.5, 0.0]], rtol=1e-6)
  np.testing.assert_allclose(jax.grad(surrogate)(logp, "sequence", 0), [[0.5, 0.5, 0.5, 0.0]], rtol=1e-6)
  # GSPO's ratio is the length-normalised geometric mean of the token ratios.
  new = logp + jnp.array([[0.3, -0.1, 0.4, 7.0]])
  got = jnp.exp(surrogates.log_importance_ratio(new, logp, mask, "sequence"))
  np.testing.assert_allclose(got, [[np.exp(0.2)] * 3 + [1.0]], rtol=1e-6)


def test_clipping_on_a_constructed_case():
  # Ratios 0.5, 0.9, 1.1, 1.5 with A = +1 and A = -1; clip range [0.8, 1.28] (clip-higher).
  ratio = jnp.array([[0.5, 0.9, 1.1, 1.5], [0.5, 0.9, 1.1, 1.5]])
  adv = jnp.array([1.0, -1.0])
  objective, clipped = surrogates.clipped_objective(jnp.log(ratio), adv, 0.2, 0.28)
  np.testing.assert_allclose(objective, [[0.5, 0.9, 1.1, 1.28], [-0.8, -0.9, -1.1, -1.5]], rtol=1e-6)
  np.testing.assert_array_equal(clipped, [[False, False, False, True], [True, False, False, False]])
  # The clipped tokens get no gradient; the others r A.
  grad = jax.grad(lambda x: jnp.sum(surrogates.clipped_objective(x, adv, 0.2, 0.28)[0]))(jnp.log(ratio))
  np.testing.assert_allclose(grad, [[0.5, 0.9, 1.1, 0.0], [0.0, -0.9, -1.1, -1.5]], rtol=1e-6)


def test_truncated_importance_weights():
  learner = jnp.log(jnp.array([0.5, 0.5, 0.5]))
  sampler = jnp.log(jnp.array([0.5, 0.4, 0.1]))
  weights, capped = surrogates.truncated_importance_weights(learner, sampler, 2.0)
  np.testing.assert_allclose(weights, [1.0, 1.25, 2.0], rtol=1e-6)
  np.testing.assert_array_equal(capped, [False, False, True])
  assert float(jnp.sum(jax.grad(lambda x: jnp.sum(surrogates.truncated_importance_weights(x, sampler, 2.0)[0]))(
      learner))) == 0.0  # Weights carry no gradient.


# ------------------------------------------------------------------------------------------------ KL estimators


def test_kl_estimators_against_their_analytic_values():
  # A categorical policy p_theta = softmax(theta) and a fixed reference q; tokens y ~ p, enumerated exactly.
  theta = jnp.array([0.3, -1.2, 0.8, 0.1], jnp.float32)
  log_q = jax.nn.log_softmax(jnp.array([-0.4, 0.5, 0.2, -1.0], jnp.float32))

  def expected(estimator, t):
    log_p = jax.nn.log_softmax(t)
    weights = jax.lax.stop_gradient(jnp.exp(log_p))  # The sampling distribution (no gradient).
    return jnp.sum(weights * surrogates.kl_estimate(log_p, log_q, estimator))

  log_p = jax.nn.log_softmax(theta)
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  kl_pq = jnp.sum(p * (log_p - log_q))
  # k1 and k3 are unbiased for KL(p || q); k2 is half the second moment of log(p / q).
  np.testing.assert_allclose(expected("k1", theta), kl_pq, rtol=1e-6)
  np.testing.assert_allclose(expected("k3", theta), kl_pq, rtol=1e-5)
  np.testing.assert_allclose(expected("low_var_kl", theta), kl_pq, rtol=1e-5)
  np.testing.assert_allclose(expected("k2", theta), 0.5 * jnp.sum(p * jnp.square(log_p - log_q)), rtol=1e-6)
  assert float(expected("k2", theta)) != pytest.approx(float(kl_pq), rel=1e-3)  # biased for the value
  # In the loss (gradient through log p only, y ~ p held fixed): k1's gradient has expectation 0, k2's is the
  # gradient of KL(p || q), k3's that of KL(q || p).
  reverse = jax.grad(lambda t: jnp.sum(jnp.exp(jax.nn.log_softmax(t)) * (jax.nn.log_softmax(t) - log_q)))(theta)
  forward = jax.grad(lambda t: jnp.sum(q * (log_q - jax.nn.log_softmax(t))))(theta)
  np.testing.assert_allclose(jax.grad(functools_partial(expected, "k1"))(theta), 0.0, atol=1e-7)
  np.testing.assert_allclose(jax.grad(functools_partial(expected, "k2"))(theta), reverse, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jax.grad(functools_partial(expected, "k3"))(theta), forward, rtol=1e-5, atol=1e-7)
  # k3 >= 0 per sample; k1 is negative where q > p.
  samples = surrogates.kl_estimate(log_p, log_q, "k3")
  assert float(jnp.min(samples)) >= 0 and float(jnp.min(surrogates.kl_estimate(log_p, log_q, "k1"))) < 0
  with pytest.raises(ValueError, match="allowed"):
    surrogates.kl_estimate(log_p, log_q, "k4")


def functools_partial(fn, estimator):
  return lambda t: fn(estimator, t)


# ------------------------------------------------------------------------------------------------ LoRA identities


@pytest.fixture(scope="module")
def tiny_model():
  config = decoder.DecoderConfig.from_config(maze_config.get_config("tiny").model)
  fns = decoder.DecoderFns(config)
  return fns, fns.init(jax.random.key(0))


LORA = lora.LoraConfig(rank=4, alpha=8.0)


def _nonzero_b(adapters, key):
  """The adapters with B drawn at random (as after some training)."""
  leaves, treedef = jax.tree_util.tree_flatten(adapters)
  keys = jax.random.split(key, len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [x if x.shape[0] != LORA.rank else 0.05 * jax.random.normal(k, x.shape)
                                                for x, k in zip(leaves, keys)])


def test_lora_with_zero_b_is_the_base_model_and_the_two_forms_agree(tiny_model, tmp_path):
  fns, base = tiny_model
  adapters = lora.init_adapters(jax.random.key(1), base, LORA)
  assert len(lora.adapter_paths(base, LORA)) == 7  # q, k, v, o, gate, up, down of the one layer
  tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, 32)
  reference = fns.forward(base, tokens)
  for form in lora.UPDATE_FORMS:  # Zero B: bit-identical logits, merged or factorized.
    policy_fns, params = lora.policy(fns, base, adapters, LORA, form)
    np.testing.assert_array_equal(policy_fns.forward(params, tokens), reference)
  trained = _nonzero_b(adapters, jax.random.key(3))
  merged_fns, merged = lora.policy(fns, base, trained, LORA, "merged")
  factorized_fns, factorized = lora.policy(fns, base, trained, LORA, "factorized")
  adapted = merged_fns.forward(merged, tokens)
  assert float(jnp.max(jnp.abs(adapted - reference))) > 1e-3
  np.testing.assert_allclose(factorized_fns.forward(factorized, tokens), adapted, rtol=1e-5, atol=1e-5)
  # Merged export through save_pretrained: the checkpoint read back gives the adapted model's logits.
  hf_loading.save_pretrained(str(tmp_path / "merged"), fns.config, merged, architecture="qwen2")
  model, loaded = hf_loading.load_pretrained(str(tmp_path / "merged"), dtype="float32")
  np.testing.assert_allclose(decoder.DecoderFns(model.config).forward(loaded, tokens), adapted, rtol=1e-6, atol=1e-6)
  # Gradients of the adapted model reach the adapters only (the base is not an argument): B first (A's
  # gradient is 0 while B = 0), then A as well.
  loss = lambda a: jnp.mean(lora.policy(fns, base, a, LORA, "factorized")[0].forward(
      {"base": base, "adapters": a}, tokens)[..., 0])
  grads = jax.grad(loss)(adapters)
  q = grads["layers_0"]["self_attn"]["q_proj"]
  assert float(jnp.max(jnp.abs(q["lora_a"]))) == 0.0 and float(jnp.max(jnp.abs(q["lora_b"]))) > 0
  q = jax.grad(loss)(trained)["layers_0"]["self_attn"]["q_proj"]
  assert float(jnp.max(jnp.abs(q["lora_a"]))) > 0
  # A bfloat16 base (stored in half): the merged float32 kernel at B = 0 is the rounded base kernel exactly.
  half = lora.LoraConfig(rank=4, alpha=8.0, base_dtype="bfloat16")
  stored = lora.cast_base(base, half)
  assert stored["layers_0"]["mlp"]["up_proj"]["kernel"].dtype == jnp.bfloat16
  merged_half = lora.merge(stored, adapters, half)["layers_0"]["mlp"]["up_proj"]["kernel"]
  assert merged_half.dtype == jnp.float32
  np.testing.assert_array_equal(merged_half, base["layers_0"]["mlp"]["up_proj"]["kernel"].astype(jnp.bfloat16))


# ------------------------------------------------------------------------------------------------ the update


STOP = (maze.DONE, maze.EOS)
REWARDS = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]]


@pytest.fixture(scope="module")
def batch(tiny_model):
  """4 maze prompts x 4 rollouts of up to 12 tokens sampled from the tiny policy, with fixed rewards."""
  fns, params = tiny_model
  prompts = maze.encode_prompts(maze.generate_mazes(jax.random.key(7), 4, 5))
  rollouts = jax.jit(lambda p: sampling.sample_rollouts(fns, p, prompts, jax.random.key(1), num_rollouts=4,
                                                        max_new_tokens=12, stop_tokens=STOP))(params)
  return prompts, rollouts, jnp.asarray(REWARDS, jnp.float32)


GRPO = estimators.get_advantage_fn("grpo")
SGD = optax.sgd(1.0)  # The parameter change is minus the gradient (Adam's first step is about lr sign(g)).


def _update(tiny_model, batch, *, params=None, rollouts=None, tx=SGD, frozen=None, reduction="token_mean",
            hyper=None, **spec_fields):
  fns, base = tiny_model
  prompts, sampled, rewards = batch
  spec = step_lib.RLSpec(num_samples=4, max_new_tokens=12, stop_tokens=STOP, reduction=reduction, **spec_fields)
  hyper = hyper or step_lib.Hyper(learning_rate=1.0, b1=0.9, b2=0.95, weight_decay=0.0)
  state = step_lib.init_state(jax.tree_util.tree_map(jnp.copy, base if params is None else params), tx)
  fn = jax.jit(lambda s, r, f: step_lib.update(spec, fns, s, prompts, r, rewards, jnp.float32(1.0), hyper,
                                               advantage_fn=lambda x, h: GRPO(x), tx=tx, frozen=f))
  return fn(state, sampled if rollouts is None else rollouts, frozen)


def _assert_close(a, b, rtol=2e-5, atol=1e-6):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def test_the_default_update_is_the_plain_policy_gradient_step_bit_for_bit(tiny_model, batch):
  fns, params = tiny_model
  prompts, rollouts, rewards = batch
  tx = optax.adamw(1e-3, b1=0.9, b2=0.95, weight_decay=0.01)
  state, metrics = _update(tiny_model, batch, tx=tx)

  @jax.jit
  def plain(state):  # One value_and_grad of -A log pi (token mean) and one AdamW step, written out.
    def loss_fn(p):
      logprobs = sampling.sequence_logprobs_shared_prefix(fns, p, prompts, rollouts.tokens, temperature=1.0,
                                                          with_entropy=True)[0]
      return estimators.policy_gradient_loss(logprobs, rollouts.mask, GRPO(rewards), reduction="token_mean")
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return step_lib.apply_gradients(state, grads, tx), loss

  want, loss = plain(step_lib.init_state(jax.tree_util.tree_map(jnp.copy, params), tx))
  jax.tree_util.tree_map(np.testing.assert_array_equal, state.params, want.params)
  assert float(metrics["loss"]) == float(loss) and int(state.step) == 1
  assert not {"optimizer_updates", "clip_fraction", "tis_capped_fraction", "kl"} & set(metrics)


def test_an_on_policy_ratio_gives_the_plain_update(tiny_model, batch):
  plain, _ = _update(tiny_model, batch)
  for level in ("token", "sequence"):
    state, metrics = _update(tiny_model, batch, importance_ratio=level, clip_low=0.2, clip_high=0.28)
    _assert_close(state.params, plain.params) if level == "token" else None
    assert float(metrics["clip_fraction"]) == 0.0
  # GSPO's sequence ratio has its own gradient (each token weighted by its rollout's mean), still unclipped.
  assert float(metrics["grad_norm"]) > 0


def test_mini_batches_and_epochs_are_successive_updates_on_whole_prompt_groups(tiny_model, batch):
  prompts, rollouts, rewards = batch
  state, metrics = _update(tiny_model, batch, importance_ratio="token", ppo_mini_batches=2, ppo_epochs=2)
  assert int(state.step) == 4 and float(metrics["optimizer_updates"]) == 4.0
  # The same four updates by hand: mini-batch j holds prompts 2j, 2j + 1 with all their rollouts, visited in
  # order in each epoch, each clipped against the sampler's log-probs of the batch.
  params = None
  rows = lambda x, j: jax.tree_util.tree_map(lambda a: a[2 * j:2 * j + 2] if a.ndim else a, x)
  for _, j in itertools.product(range(2), range(2)):
    sub = (prompts[2 * j:2 * j + 2], rows(rollouts, j), rewards[2 * j:2 * j + 2])
    manual, _ = _update(tiny_model, sub, params=params, importance_ratio="token")
    params = manual.params
  _assert_close(state.params, params)
  assert 0 < float(metrics["clip_fraction"]) < 1  # The later updates are off-policy; some tokens clip.
  # Micro-batches inside the mini-batches: the same updates.
  micro, micro_metrics = _update(tiny_model, batch, importance_ratio="token", ppo_mini_batches=2, ppo_epochs=2,
                                 micro_batch_prompts=1, micro_batch_rollouts=2)
  _assert_close(micro.params, state.params, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(micro_metrics["clip_fraction"], metrics["clip_fraction"])
  with pytest.raises(ValueError, match="ppo_mini_batches=3 must divide the 4 prompts"):
    _update(tiny_model, batch, importance_ratio="token", ppo_mini_batches=3)
  # Prompts split over 2 devices in blocks (0, 1 | 2, 3): mini-batch j takes the j-th of each block, (0, 2)
  # then (1, 3), so every mini-batch is spread over all devices.
  sharded, _ = _update(tiny_model, batch, importance_ratio="token", ppo_mini_batches=2, num_shards=2)
  params = None
  for rows in ([0, 2], [1, 3]):
    pick = lambda x: jax.tree_util.tree_map(lambda a: a[jnp.asarray(rows)] if a.ndim else a, x)
    manual, _ = _update(tiny_model, (prompts[jnp.asarray(rows)], pick(rollouts), rewards[jnp.asarray(rows)]),
                        params=params, importance_ratio="token")
    params = manual.params
  _assert_close(sharded.params, params)


def test_truncated_importance_sampling(tiny_model, batch):
  plain, _ = _update(tiny_model, batch)
  state, metrics = _update(tiny_model, batch, tis_cap=2.0)  # On-policy: every weight is 1.
  _assert_close(state.params, plain.params)
  assert float(metrics["tis_capped_fraction"]) == 0.0
  # A sampler that gave every token e times less probability: every ratio is e > 2, capped at 2, so the
  # update is twice the plain one.
  _, rollouts, _ = batch
  shifted = rollouts.replace(logprobs=rollouts.logprobs - 1.0)
  state, metrics = _update(tiny_model, batch, rollouts=shifted, tis_cap=2.0)
  fns, params = tiny_model
  _assert_close(jax.tree_util.tree_map(lambda a, p: a - p, state.params, params),
                jax.tree_util.tree_map(lambda a, p: 2 * (a - p), plain.params, params))
  assert float(metrics["tis_capped_fraction"]) == 1.0
  # With a ratio: clipped against the learner's own log-probs, capped against the sampler's.
  state, metrics = _update(tiny_model, batch, rollouts=shifted, tis_cap=2.0, importance_ratio="token")
  _assert_close(jax.tree_util.tree_map(lambda a, p: a - p, state.params, params),
                jax.tree_util.tree_map(lambda a, p: 2 * (a - p), plain.params, params))
  assert float(metrics["clip_fraction"]) == 0.0 and float(metrics["tis_capped_fraction"]) == 1.0


def test_kl_penalty_to_the_reference(tiny_model, batch):
  fns, params = tiny_model
  plain, _ = _update(tiny_model, batch)
  hyper = step_lib.Hyper(learning_rate=1.0, b1=0.9, b2=0.95, weight_decay=0.0, kl_coef=0.5)
  same = step_lib.Frozen(reference=params)
  # At the reference itself every estimate is 0, and so are the gradients of k2 and k3 (k1's is grad log pi).
  for estimator in ("k2", "k3"):
    state, metrics = _update(tiny_model, batch, hyper=hyper, frozen=same, kl_estimator=estimator)
    assert abs(float(metrics["kl"])) < 1e-6
    _assert_close(state.params, plain.params)
  # Away from it: k3 >= 0; in the reward it shifts the advantages by -kl_coef (kl_i - the group's mean).
  other = step_lib.Frozen(reference=fns.init(jax.random.key(5)))
  loss_kl, metrics = _update(tiny_model, batch, hyper=hyper, frozen=other, kl_estimator="k3")
  assert float(metrics["kl"]) > 0
  reward_kl, reward_metrics = _update(tiny_model, batch, hyper=hyper, frozen=other, kl_in="reward")
  np.testing.assert_allclose(reward_metrics["kl"], metrics["kl"], rtol=1e-6)
  assert float(reward_metrics["mean_abs_advantage"]) != float(metrics["mean_abs_advantage"])
  # A Python 0 skips the reference pass (no reference needed); any other value needs one.
  _update(tiny_model, batch, frozen=None)
  with pytest.raises(ValueError, match="no reference policy"):
    _update(tiny_model, batch, hyper=hyper, frozen=None)


def test_lora_update_trains_the_adapters_only(tiny_model, batch):
  fns, params = tiny_model
  adapters = lora.init_adapters(jax.random.key(1), params, LORA)
  frozen = step_lib.Frozen(base=params)
  adam = optax.adam(1e-2)
  merged, metrics = _update(tiny_model, batch, params=adapters, frozen=frozen, lora=LORA, tx=adam)
  assert jax.tree_util.tree_structure(merged.params) == jax.tree_util.tree_structure(adapters)
  q, q0 = merged.params["layers_0"]["self_attn"]["q_proj"], adapters["layers_0"]["self_attn"]["q_proj"]
  np.testing.assert_array_equal(q["lora_a"], q0["lora_a"])  # A's gradient is 0 while B = 0,
  assert float(jnp.max(jnp.abs(q["lora_b"]))) > 0  # and B moves.
  assert float(metrics["logprob_mismatch"]) < 1e-5  # The sampler's merged weights are the learner's.
  factorized, _ = _update(tiny_model, batch, params=adapters, frozen=frozen, lora=lora.LoraConfig(
      rank=4, alpha=8.0, update="factorized"), tx=adam)
  _assert_close(factorized.params, merged.params, rtol=1e-4, atol=1e-5)
  # KL with LoRA: the base is the reference (no separate copy); at the start the estimate is 0.
  hyper = step_lib.Hyper(learning_rate=1.0, b1=0.9, b2=0.95, weight_decay=0.0, kl_coef=0.5)
  _, metrics = _update(tiny_model, batch, params=adapters, frozen=frozen, lora=LORA, hyper=hyper)
  assert abs(float(metrics["kl"])) < 1e-6


# ------------------------------------------------------------------------------------------------ configs


def _maze(**overrides):
  config = maze_config.get_config("tiny")
  config.logging.tensorboard = False
  config.logging.plots = False
  config_fields.set_fields(config, overrides)
  return config


@pytest.mark.parametrize("overrides, match", [
    ({"rl.ppo_mini_batches": 3}, r"config.rl.ppo_mini_batches: 3 must divide rollout.num_prompts=4"),
    ({"rl.ppo_epochs": 0}, r"config.rl.ppo_epochs: 0 must be an integer >= 1"),
    ({"rl.ppo_epochs": 2}, r"config.rl.importance_ratio: 'none' .* = 2: set it to 'token'"),
    ({"rl.importance_ratio": "seq"}, r"config.rl.importance_ratio: 'seq'; allowed"),
    ({"rl.importance_ratio": "token", "rl.clip_low": 1.0}, r"config.rl.clip_low: 1.0 must be in \[0, 1\)"),
    ({"rl.ppo_mini_batches": 2, "rl.importance_ratio": "token", "rl.micro_batch_prompts": 4},
     r"config.rl.micro_batch_prompts: 4 must divide the 2 prompts of a mini-batch"),
    ({"rl.tis_cap": -1.0}, r"config.rl.tis_cap: -1.0 must be >= 0"),
    ({"rl.kl_coef": -0.1}, r"config.rl.kl_coef: -0.1 must be >= 0"),
    ({"rl.kl_estimator": "k4"}, r"config.rl.kl_estimator: 'k4'; allowed: \['k1', 'k2', 'k3'\]"),
    ({"rl.kl_in": "advantage"}, r"config.rl.kl_in: 'advantage'; allowed"),
    ({"model.lora_rank": -1}, r"config.model.lora_rank: -1 must be an integer >= 0"),
    ({"model.lora_rank": 4, "model.lora_targets": ("q_proj", "lm_head")}, r"config.model.lora_targets"),
    ({"model.lora_rank": 4, "model.lora_base_dtype": "float16"}, r"config.model.lora_base_dtype: 'float16'"),
    ({"model.lora_rank": 4, "model.lora_update": "fused"}, r"config.model.lora_update: 'fused'"),
])
def test_bad_knob_settings_name_the_field_and_the_fix(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.validate_config(_maze(**overrides))


def test_every_knob_is_off_in_every_preset():
  from configs import countdown  # pylint: disable=import-outside-toplevel
  for config in [maze_config.get_config(p) for p in ("default", "tiny", "paper")] + [
      countdown.get_config(p) for p in ("default", "tiny")] + [gsm8k_smollm2.get_config(p) for p in ("paper", "tiny")]:
    rl = config.rl
    assert (rl.ppo_mini_batches, rl.ppo_epochs, rl.importance_ratio, rl.tis_cap, rl.kl_coef) == (1, 1, "none", 0.0, 0.0)
    assert config.model.lora_rank == 0
  assert "rl.kl_coef" in population.MEMBER_FIELDS and step_lib.HYPER_FIELDS["rl.kl_coef"] == "kl_coef"


# ------------------------------------------------------------------------------------------------ end to end


def _records(workdir):
  return [{k: v for k, v in r.items() if k not in TIMING} for r in run_logging.MetricsWriter(str(workdir)).read()]


# Every knob at once on the tiny maze (an SFT long enough that some rollouts pass).
KNOBS = {"sft.steps": 300, "sft.learning_rate": 3e-3, "rl.steps": 4, "eval.every_steps": 2, "log_every_steps": 1,
         "checkpoint_every_steps": 2, "rl.ppo_mini_batches": 2, "rl.ppo_epochs": 2, "rl.importance_ratio": "token",
         "rl.clip_high": 0.28, "rl.tis_cap": 2.0, "rl.kl_coef": 0.05, "model.lora_rank": 4}


@pytest.fixture(scope="module")
def knob_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("knobs") / "run"
  return workdir, train.train_and_evaluate(_maze(**KNOBS), str(workdir))


def test_tiny_maze_with_every_knob_runs_and_says_what_it_did(knob_run):
  workdir, summary = knob_run
  rl = [r for r in _records(workdir) if r["phase"] == "rl"]
  assert len(rl) == 4 and all(r["optimizer_updates"] == 4.0 for r in rl)
  assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["kl"] >= 0 for r in rl)
  assert all(0 <= r["clip_fraction"] <= 1 and 0 <= r["tis_capped_fraction"] <= 1 for r in rl)
  assert any(0 < r["pass_rate"] < 1 for r in rl) and any(r["kl"] > 0 for r in rl)
  assert all(r["logprob_mismatch"] < 1e-4 for r in rl)  # The sampler's merged weights are the learner's.
  assert set(summary["eval"]) >= {"pass@1", "pass@8"}
  # The RL checkpoint holds the adapters (and their optimizer state) only, and names the frozen base.
  step_dir = workdir / "checkpoints" / "rl" / "4"
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  state = ocp.StandardCheckpointer().restore(str(step_dir / "state"))
  names = {jax.tree_util.keystr(p)[-9:] for p, _ in jax.tree_util.tree_leaves_with_path(state["params"])}
  assert names == {"'lora_a']", "'lora_b']"}
  extra = json.loads((step_dir / "extra" / "metadata").read_text())
  assert extra["frozen_source"].startswith("the final SFT checkpoint") and len(extra["frozen_fingerprint"]) == 64


def test_a_lora_and_kl_run_stopped_by_a_signal_resumes_to_the_same_records(knob_run, tmp_path, monkeypatch):
  reference, _ = knob_run
  workdir = tmp_path / "stopped"
  seen = []  # SFT steps 1..300, then RL 1..; a signal during RL step 3.
  monkeypatch.setattr(harness.StopSignals, "requested", lambda self, step: seen.append(step) or len(seen) == 300 + 3)
  with pytest.raises(loop.Preempted, match="stopped at step 3"):
    train.train_and_evaluate(_maze(**KNOBS), str(workdir))
  monkeypatch.undo()
  # Frozen weights re-derived wrongly are refused (here: another policy in place of the final SFT one).
  from maxrl_jax.trainers import rl as rl_trainer  # pylint: disable=import-outside-toplevel
  original = rl_trainer.RLTrainer._start_params
  monkeypatch.setattr(rl_trainer.RLTrainer, "_start_params", lambda self, run, seed: jax.tree_util.tree_map(
      lambda x: x * 1.0001, original(self, run, seed)))
  with pytest.raises(ValueError, match="frozen weights .* that source changed since"):
    train.train_and_evaluate(_maze(**KNOBS), str(workdir))
  monkeypatch.undo()
  train.train_and_evaluate(_maze(**KNOBS), str(workdir))
  assert _records(workdir) == _records(reference)


def test_a_population_whose_members_differ_in_the_kl_coefficient(tmp_path):
  # Two objectives x two seeds with LoRA and mini-batches: each member's frozen base is its seed's SFT policy;
  # the KL member reproduces its single run.
  overrides = {k: v for k, v in KNOBS.items() if k not in ("rl.kl_coef", "rl.tis_cap")}
  config = _maze(**overrides)
  config.population.objectives = ("maxrl", "maxrl_kl: objective.name=maxrl, rl.kl_coef=0.05")
  config.population.seeds = (0, 1)
  summary = train.train_and_evaluate(config, str(tmp_path / "population"))
  assert [m["name"] for m in summary["members"]] == ["maxrl/seed0", "maxrl/seed1", "maxrl_kl/seed0", "maxrl_kl/seed1"]
  records = _records(tmp_path / "population")
  member = population.members(config)[3]
  single_dir = tmp_path / "single"
  train.train_and_evaluate(member.config, str(single_dir))
  mine = [r for r in records if r.get("member") == 3 and r["phase"] in ("rl", "eval")]
  theirs = [r for r in _records(single_dir) if r["phase"] in ("rl", "eval")]
  assert [(r["phase"], r["step"]) for r in mine] == [(r["phase"], r["step"]) for r in theirs]
  for a, b in zip(mine, theirs):
    for key in ("loss", "grad_norm", "kl", "clip_fraction", "entropy"):
      if key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-6, err_msg=f"{b['step']} {key}")
    for key in ("pass_rate", "generated_tokens", "optimizer_updates"):
      if key in b:
        assert a[key] == b[key], (b["step"], key)


def _text(**overrides):
  config = gsm8k_smollm2.get_config("tiny")
  config.logging.tensorboard = False
  config.logging.plots = False
  config_fields.set_fields(config, overrides)
  return config


def test_tiny_text_with_knobs_and_the_merged_export(tmp_path):
  config = _text(**{"rl.ppo_mini_batches": 2, "rl.importance_ratio": "sequence", "rl.kl_coef": 0.05,
                    "rl.kl_in": "reward", "rl.kl_estimator": "k1", "model.lora_rank": 4})
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(config, str(workdir))
  rl = [r for r in _records(workdir) if r["phase"] == "rl"]
  assert rl and all(r["optimizer_updates"] == 2.0 and "kl" in r and "clip_fraction" in r for r in rl)
  assert all(np.isfinite(r["loss"]) and r["logprob_mismatch"] < 1e-4 for r in rl)
  assert "pass@1" in summary["eval"]
  # The merged export is the adapted policy: its logits equal the base + adapters computed in factorized form.
  from maxrl_jax.trainers import rl as rl_trainer  # pylint: disable=import-outside-toplevel
  out = rl_trainer.export_merged_policy(config, str(workdir), str(tmp_path / "merged"))
  model, exported = hf_loading.load_pretrained(out, dtype="float32")
  assert os.path.exists(os.path.join(out, "tokenizer.json"))
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  raw = lambda phase, step: ocp.StandardCheckpointer().restore(str(workdir / "checkpoints" / phase / str(step) / "state"))
  adapters = raw("rl", config.rl.steps)["params"]
  base = raw("sft", config.sft.steps)["params"]
  fns = decoder.DecoderFns(model.config)
  tokens = jax.random.randint(jax.random.key(0), (2, 6), 0, model.config.vocab_size)
  adapted_fns, adapted = lora.policy(fns, base, adapters, lora.from_config(config.model), "factorized")
  np.testing.assert_allclose(fns.forward(exported, tokens), adapted_fns.forward(adapted, tokens), rtol=1e-5, atol=1e-5)


def test_the_knobs_benchmark_runs_at_toy_size(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  out = tmp_path / "knobs.json"
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, os.path.join(repo, "scripts", "bench_knobs.py"), "--model=tiny",
                         "--num_prompts=4", "--num_samples=4", "--maze_size=5", "--new_tokens=6", "--lora_rank=2",
                         "--repeats=1", f"--out={out}"], capture_output=True, text=True, timeout=900,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-5000:]
  report = json.loads(out.read_text())
  variants = report["variants"]
  assert set(variants) == {"plain", "ppo4", "kl", "lora_merged", "lora_factorized"}
  assert variants["ppo4"]["optimizer_updates"] == 4 and variants["plain"]["step_over_plain"] == 1.0
  assert variants["lora_merged"]["trainable_params"] < variants["plain"]["trainable_params"]
  assert all(v["step"]["median_s"] > 0 and v["update"]["median_s"] > 0 for v in variants.values())


def test_the_memory_plan_counts_lora_the_reference_and_mini_batches():
  from maxrl_jax import memory_plan  # pylint: disable=import-outside-toplevel
  from maxrl_jax.trainers import sizes  # pylint: disable=import-outside-toplevel

  model = memory_plan.smollm2_360m()
  work = memory_plan.Workload(16, 16, 512, 1024)
  plain = memory_plan.estimate(model, work, micro_batch=(1, 4))
  adapters = lora.LoraConfig(rank=16, base_dtype="bfloat16")
  with_lora = memory_plan.estimate(model, work, micro_batch=(1, 4), lora=adapters)
  trainable = lora.count_adapter_params(model, adapters)
  # r (in + out) per projection: 32 layers x (q, k, v, o: E -> 15 x 64, 5 x 64, 5 x 64, E; gate, up, down: E <-> F).
  e, f = 960, 2560
  assert trainable == 16 * 32 * ((e + 960) + 2 * (e + 320) + (960 + e) + 3 * (e + f))
  assert with_lora.optimizer == 8 * trainable < plain.optimizer / 40  # AdamW moments of the adapters only (2.4%)
  assert with_lora.params == plain.params // 2 + 4 * trainable  # a bf16 base + float32 adapters
  assert with_lora.total < plain.total
  with_kl = memory_plan.estimate(model, work, micro_batch=(1, 4), reference=True, extra_logprobs=1)
  assert with_kl.frozen == plain.params and with_kl.rollouts == plain.rollouts * 13 // 9
  assert memory_plan.estimate(model, work, micro_batch=(1, 4), lora=adapters, reference=True).frozen == 0
  # Mini-batches: an update's micro-batch divides the mini-batch's prompts.
  config = gsm8k_smollm2.get_config("smoke")
  config.rl.micro_batch_prompts = 0
  config.rl.ppo_mini_batches = 4
  config.rl.importance_ratio = "token"
  choice = sizes.plan_memory(config, model, prompt_len=512, device_bytes=80 * memory_plan.GiB)
  assert (config.rollout.num_prompts // 4) % choice.micro_batch[0] == 0


def test_tiny_countdown_with_every_knob(tmp_path):
  from configs import countdown  # pylint: disable=import-outside-toplevel
  config = countdown.get_config("tiny")
  config.logging.tensorboard = False
  config.logging.plots = False
  config_fields.set_fields(config, {k: v for k, v in KNOBS.items() if k.startswith(("rl.ppo", "rl.imp", "rl.clip",
                                                                                    "rl.tis", "rl.kl", "model."))})
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  rl = [r for r in _records(tmp_path / "run") if r["phase"] == "rl"]
  assert rl and all(r["optimizer_updates"] == 4.0 and "kl" in r and np.isfinite(r["loss"]) for r in rl)
  assert summary["task"] == "countdown" and "pass@1" in summary["eval"]
