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
