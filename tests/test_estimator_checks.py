"""Reward checks of the estimators on every path (eager, jit, vmap, grouped) and MaxRL for partial credit.

Eager calls raise a ValueError on rewards a rule does not accept; traced calls give the group NaN
advantages, which make the loss NaN (a trainer's non-finite stop), and leave the other groups bit for bit as
they were.
"""

import itertools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from maxrl_jax import estimators as est
from maxrl_jax import run_logging
from maxrl_jax.trainers import loop as training_loop

EXACT_RTOL = 1e-9
PASS_RATES = np.array([0.01, 0.1, 0.5, 0.9, 0.99])
BINARY_RULES = [("maxrl", {}), ("maxrl", {"zero_failed_groups": False}), ("maclaurin", {"order": 3}),
                ("pkpo", {"k": 2}), ("pkpo", {"k": 2, "form": "official"})]
REAL_RULES = [("reinforce", {}), ("rloo", {}), ("dr_grpo", {}), ("grpo", {})]
NONNEGATIVE = {"reward_type": "nonnegative"}


def _binary(shape, seed=0):
  rng = np.random.default_rng(seed)
  rewards = (rng.random(shape) < rng.random(shape[:-1] + (1,))).astype(np.float32)
  rewards[0] = 0.0  # A failed group,
  rewards[1] = 1.0  # an all-success group.
  return rewards


def _paths(name, kwargs):
  """The dense rule eagerly, under jit, under vmap over the prompt axis, and in the grouped form (jitted)."""
  fn = est.get_advantage_fn(name, **kwargs)

  def grouped(rewards):
    num_groups, n = rewards.shape
    ids = jnp.repeat(jnp.arange(num_groups), n)
    return est.grouped_advantages(name, rewards.reshape(-1), ids, num_groups, **kwargs).reshape(rewards.shape)

  return {"eager": fn, "jit": jax.jit(fn), "vmap": jax.vmap(fn), "grouped": jax.jit(grouped)}


# ------------------------------------------------------------------ the quoted example


def test_partial_credit_example_on_every_path():
  rewards = jnp.array([[0.5, 0.25, 0.0, 0.0], [1.0, 0.0, 0.0, 1.0]])
  want = np.array([[5 / 3, 1 / 3, -1.0, -1.0], [1.0, -1.0, -1.0, 1.0]])
  for path, fn in _paths("maxrl", NONNEGATIVE).items():
    np.testing.assert_allclose(fn(rewards), want, rtol=1e-6, err_msg=path)
    np.testing.assert_allclose(est.maxrl_advantages(rewards, reward_type="nonnegative"), want, rtol=1e-6)
  # The binary rule refuses the first group: eagerly with a ValueError, traced by NaN-poisoning only it.
  with pytest.raises(ValueError, match=r"needs binary rewards.*reward_type='nonnegative'"):
    est.maxrl_advantages(rewards)
  for path, fn in _paths("maxrl", {}).items():
    if path == "eager":
      continue
    out = np.asarray(fn(rewards))
    assert np.all(np.isnan(out[0])), path
    np.testing.assert_array_equal(out[1], [1.0, -1.0, -1.0, 1.0])


# ------------------------------------------------------------------ binary rewards: nothing changes


def _maxrl_as_before(rewards, zero_failed_groups):
  """The binary MaxRL formula, op for op: r N / max(K, 1) - 1, 0 (or -1) where K = 0."""
  r = jnp.asarray(rewards, jnp.float32)
  K = jnp.sum(r, axis=-1, keepdims=True)
  adv = r * (jnp.float32(r.shape[-1]) / jnp.maximum(K, 1.0)) - 1.0
  return jnp.where(K > 0, adv, jnp.zeros_like(adv)) if zero_failed_groups else adv


@pytest.mark.parametrize("n", [3, 5, 64])
def test_binary_rewards_are_bit_identical_on_every_path(n):
  rewards = _binary((6, n), seed=n)
  for zero_failed_groups in (True, False):
    want = np.asarray(_maxrl_as_before(rewards, zero_failed_groups))
    for path, fn in _paths("maxrl", {"zero_failed_groups": zero_failed_groups}).items():
      np.testing.assert_array_equal(fn(jnp.asarray(rewards)), want, err_msg=path)
    np.testing.assert_array_equal(jax.jit(_maxrl_as_before, static_argnums=1)(rewards, zero_failed_groups), want)
  # Every other rule: the public function is its registered rule, unchanged, on valid rewards (the same
  # transformation of both, since XLA may round a fused rule differently from the op-by-op one).
  for name, kwargs in BINARY_RULES[2:] + REAL_RULES:
    spec = est.ADVANTAGE_ESTIMATORS[name]
    full = {**spec.kwargs, **kwargs}

    def bare(r, spec=spec, full=full):
      K, Q = jnp.sum(r, -1, keepdims=True), jnp.sum(r * r, -1, keepdims=True)
      return spec.rule(r, K, jnp.float32(r.shape[-1]), Q, **full)

    fn = est.get_advantage_fn(name, **kwargs)
    r = jnp.asarray(rewards)
    for transform in (lambda f: f, jax.jit, jax.vmap):
      np.testing.assert_array_equal(transform(fn)(r), transform(bare)(r), err_msg=name)


# ------------------------------------------------------------------ refused rewards under jit


@pytest.mark.parametrize("name,kwargs", BINARY_RULES)
@pytest.mark.parametrize("bad", [0.5, -1.0, 2.0, np.nan, np.inf])
def test_binary_rules_poison_only_the_group_with_a_refused_reward(name, kwargs, bad):
  clean = _binary((4, 6), seed=3)
  rewards = clean.copy()
  rewards[2, 4] = bad
  with pytest.raises(ValueError, match="binary rewards|non-finite rewards"):
    est.get_advantage_fn(name, **kwargs)(rewards)
  for path, fn in _paths(name, kwargs).items():
    if path == "eager":
      continue
    out, before = np.asarray(fn(jnp.asarray(rewards))), np.asarray(fn(jnp.asarray(clean)))
    assert np.all(np.isnan(out[2])), (path, out[2])
    np.testing.assert_array_equal(np.delete(out, 2, axis=0), np.delete(before, 2, axis=0), err_msg=path)
  assert bool(jax.jit(est.binary_reward_violation)(rewards))
  np.testing.assert_array_equal(jax.jit(lambda r: est.invalid_reward_groups(name, r, **kwargs))(rewards),
                                [False, False, True, False])


@pytest.mark.parametrize("name,kwargs", REAL_RULES)
def test_real_reward_rules_take_any_finite_reward_and_poison_non_finite_groups(name, kwargs):
  rewards = np.array([[0.5, -2.0, 0.25, 3.0], [1.0, 0.0, np.nan, 1.0], [0.0, 1.0, np.inf, 1.0]], np.float32)
  clean = rewards.copy()
  clean[1:] = 0.5
  assert np.all(np.isfinite(est.get_advantage_fn(name, **kwargs)(clean)))
  for path, fn in _paths(name, kwargs).items():
    if path == "eager":
      with pytest.raises(ValueError, match="non-finite rewards"):
        fn(rewards)
      continue
    out = np.asarray(fn(jnp.asarray(rewards)))
    np.testing.assert_array_equal(out[0], np.asarray(fn(jnp.asarray(clean)))[0], err_msg=path)
    assert np.all(np.isnan(out[1:])), path
  np.testing.assert_array_equal(est.invalid_reward_groups(name, rewards), [False, True, True])


def test_nonnegative_maxrl_refuses_negative_and_non_finite_rewards():
  rewards = np.array([[0.5, 0.0, 0.25, 1.0], [0.5, -0.25, 0.25, 1.0], [0.5, np.nan, 0.0, 0.0],
                      [np.inf, 0.0, 0.0, 0.0]], np.float32)
  with pytest.raises(ValueError, match=r"reward_type='nonnegative' needs rewards >= 0"):
    est.maxrl_advantages(rewards[:2], reward_type="nonnegative")
  with pytest.raises(ValueError, match="non-finite rewards"):
    est.maxrl_advantages(rewards[2:], reward_type="nonnegative")
  clean = np.broadcast_to(rewards[:1], rewards.shape)
  for path, fn in _paths("maxrl", NONNEGATIVE).items():
    if path == "eager":
      continue
    out = np.asarray(fn(jnp.asarray(rewards)))
    np.testing.assert_array_equal(out[0], np.asarray(fn(jnp.asarray(clean)))[0], err_msg=path)
    assert np.all(np.isnan(out[1:])), path
  np.testing.assert_array_equal(est.invalid_reward_groups("maxrl", rewards, **NONNEGATIVE),
                                [False, True, True, True])
  assert not bool(est.invalid_reward_groups("maxrl", rewards[:1], **NONNEGATIVE)[0])


def test_reward_violation_metrics_are_jittable_and_vmappable():
  rewards = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 0.5], [0.0, 1.0]], [[-0.0, 1.0], [np.nan, 0.0]]])
  np.testing.assert_array_equal(jax.vmap(est.binary_reward_violation)(rewards), [False, True, True])
  assert bool(jax.jit(est.binary_reward_violation)(rewards))
  assert not bool(est.binary_reward_violation(rewards[0]))
  groups = jax.jit(jax.vmap(lambda r: est.invalid_reward_groups("maclaurin", r, order=2)))(rewards)
  np.testing.assert_array_equal(groups, [[False, False], [True, False], [False, True]])
  assert est.reward_domain("maxrl") == "binary" and est.reward_domain("maxrl", **NONNEGATIVE) == "nonnegative"
  assert est.reward_domain("grpo") == "real" and est.reward_domain("pkpo", k=2) == "binary"
  assert "reward_type='nonnegative'" in est.reward_requirement("maxrl")
  with pytest.raises(ValueError, match="reward_type='partial'"):
    est.get_advantage_fn("maxrl", reward_type="partial")
  with pytest.raises(ValueError, match="unknown argument"):
    est.invalid_reward_groups("grpo", rewards, reward_type="nonnegative")


def test_checkify_path_knows_the_nonnegative_form():
  def step(rewards):
    est.check_rewards("maxrl", rewards, **NONNEGATIVE)
    return est.maxrl_advantages(rewards, **NONNEGATIVE)

  checked = checkify.checkify(jax.jit(step))
  err, adv = checked(jnp.array([[0.5, 0.25, 0.0, 0.0]]))
  err.throw()
  np.testing.assert_allclose(adv, [[5 / 3, 1 / 3, -1.0, -1.0]], rtol=1e-6)
  err, _ = checked(jnp.array([[0.5, -0.25, 0.0, 0.0]]))
  with pytest.raises(Exception, match="needs rewards >= 0"):
    err.throw()


def test_a_poisoned_group_stops_training_with_the_reward_metric_set(tmp_path):
  """NaN advantages -> NaN loss -> training_loop's NonFiniteError; the step's nonbinary_rewards says why."""
  advantage_fn = est.get_advantage_fn("maxrl")
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.5, 0.25, 0.0, 0.0]])

  @jax.jit
  def step(theta, rewards):
    def loss_fn(theta):
      logprobs = jnp.broadcast_to(-jax.nn.softplus(-theta), (2, 4, 3))
      mask = jnp.ones((2, 4, 3), bool).at[:, :, 2].set(False)  # masked tokens do not hide a NaN
      return est.policy_gradient_loss(logprobs, mask, advantage_fn(rewards))
    loss, grad = jax.value_and_grad(loss_fn)(theta)
    return theta - 0.1 * grad, {"loss": loss, "grad_norm": jnp.abs(grad),
                                "nonbinary_rewards": est.binary_reward_violation(rewards).astype(jnp.float32)}

  @flax.struct.dataclass
  class State:
    params: dict

  seen = []

  def step_fn(state, _):
    theta, metrics = step(state.params["theta"], rewards)
    seen.append(metrics)
    return State({"theta": theta}), metrics

  with pytest.raises(training_loop.NonFiniteError, match="loss is nan at step 1"):
    training_loop.run_phase("rl", State({"theta": jnp.float32(0.0)}), step_fn, start=0, end=2,
                            writer=run_logging.MetricsWriter(str(tmp_path)), save=lambda *_: None,
                            log_every=1, checkpoint_every=2)
  assert float(seen[0]["nonbinary_rewards"]) == 1.0


# ------------------------------------------------------------------ MaxRL for partial credit


@pytest.mark.parametrize("n", [2, 3, 8, 64])
def test_nonnegative_form_on_binary_rewards_has_the_binary_targets(n):
  np.testing.assert_allclose(est.expected_weight("maxrl", n, PASS_RATES, **NONNEGATIVE),
                             est.expected_weight("maxrl", n, PASS_RATES), rtol=EXACT_RTOL)
  np.testing.assert_allclose(
      est.expected_weight("maxrl", n, PASS_RATES, zero_failed_groups=False, **NONNEGATIVE),
      [sum((1 - p) ** (k - 1) for k in range(1, n + 1)) for p in PASS_RATES], rtol=EXACT_RTOL)
  rewards = _binary((5, n), seed=n)
  np.testing.assert_allclose(est.maxrl_advantages(rewards, **NONNEGATIVE), est.maxrl_advantages(rewards),
                             rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 7.0, 1e30])
def test_nonnegative_form_is_scale_invariant_and_bounded(scale):
  rewards = _binary((5, 16), seed=1)
  scaled = jnp.asarray(rewards * np.float32(scale))
  for path, fn in _paths("maxrl", NONNEGATIVE).items():
    np.testing.assert_allclose(fn(scaled), est.maxrl_advantages(rewards), rtol=1e-5, atol=1e-5, err_msg=path)
  rng = np.random.default_rng(0)
  partial = (rng.random((50, 8)) * (rng.random((50, 8)) < 0.3)).astype(np.float32) * np.float32(scale)
  for zero_failed_groups in (True, False):
    adv = np.asarray(jax.jit(lambda r: est.maxrl_advantages(
        r, zero_failed_groups=zero_failed_groups, **NONNEGATIVE))(partial))
    assert np.all(np.isfinite(adv)) and adv.min() >= -1.0 and adv.max() <= 8 - 1 + 1e-5
    solved = partial.sum(-1) > 0
    np.testing.assert_allclose(adv[solved].sum(-1), 0.0, atol=1e-5)  # sum_i (r_i / mu - 1) = 0
    np.testing.assert_array_equal(adv[~solved], 0.0 if zero_failed_groups else -1.0)


def test_tiny_denormal_means_stay_finite():
  rewards = jnp.array([[1e-44, 0.0, 0.0, 3e-45], [0.0, 0.0, 0.0, 0.0]], jnp.float32)
  adv = np.asarray(jax.jit(lambda r: est.maxrl_advantages(r, **NONNEGATIVE))(rewards))
  assert np.all(np.isfinite(adv)) and adv.min() >= -1.0 and adv.max() <= 3.0
  np.testing.assert_array_equal(adv[1], 0.0)


def _multinomial_expected_gradient(values, probs, n):
  """E[(1/N) sum_i A_i S_i] of nonnegative MaxRL for a categorical policy over outcomes with rewards `values`.

  Exact: the sum over every count vector c (sum c = N) of Multinomial(c; N, probs) times the estimate, with
  the score of outcome j being e_j - probs (softmax logits) and A_j = v_j N / K - 1 (0 when K = 0).
  """
  values, probs = np.asarray(values, np.float64), np.asarray(probs, np.float64)
  m = len(values)
  total = np.zeros(m)
  for counts in itertools.product(range(n + 1), repeat=m - 1):
    if sum(counts) > n:
      continue
    c = np.array(counts + (n - sum(counts),), np.float64)
    log_pmf = math.lgamma(n + 1) - sum(math.lgamma(x + 1) for x in c) + np.sum(
        np.where(c > 0, c * np.log(probs), 0.0))
    K = float(c @ values)
    adv = values * n / K - 1.0 if K > 0 else np.zeros(m)
    scores = np.eye(m) - probs  # row j: grad_logits log pi(j)
    total += math.exp(log_pmf) * (c * adv) @ scores / n
  return total


def test_nonnegative_form_is_consistent_for_grad_log_expected_reward():
  """Exact expectation (enumeration) approaches grad log E[r] as N grows; it is biased at small N."""
  values, probs = np.array([0.0, 0.5, 1.0]), np.array([0.7, 0.2, 0.1])
  mean = probs @ values
  target = probs * (values - mean) / mean  # grad_logits log E[r]
  errors = [np.abs(_multinomial_expected_gradient(values, probs, n) - target).max() / np.abs(target).max()
            for n in (4, 16, 64)]
  assert errors[0] > 0.02  # biased at small N ...
  assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02  # ... and consistent
  # The same expectation computed by the estimator code on every count vector's reward vector.
  n = 4
  rewards = np.array([[values[j] for j in seq] for seq in itertools.product(range(3), repeat=n)])
  with jax.enable_x64(True):
    adv = np.asarray(est.maxrl_advantages(jnp.asarray(rewards), **NONNEGATIVE))
  outcome = np.array(list(itertools.product(range(3), repeat=n)))
  prob = np.prod(probs[outcome], axis=-1)
  scores = (np.eye(3)[outcome] - probs)  # [3^N, N, 3]
  estimate = np.einsum("s,sn,snj->j", prob, adv, scores) / n
  np.testing.assert_allclose(estimate, _multinomial_expected_gradient(values, probs, n), rtol=1e-9, atol=1e-12)
