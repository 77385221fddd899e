"""Exact and Monte Carlo checks of what every advantage estimator is unbiased for."""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax import estimators as est

GROUP_SIZES = (2, 3, 8, 16, 64)
PASS_RATES = np.array([0.01, 0.1, 0.5, 0.9, 0.99])
# expected_weight runs the rule in float64 and sums in float64: agreement is to rounding error.
EXACT_RTOL = 1e-9


# ------------------------------------------------------------------ targets, written independently in numpy


def maxrl_weight(p, order):
  """w_T(p) = sum_{k=1..T} (1-p)^(k-1), summed term by term in float64."""
  return sum((1.0 - p) ** (k - 1) for k in range(1, order + 1))


def pass_at_k_weight(p, k):
  """d pass@k / dp / (d p / dp) = k (1-p)^(k-1)."""
  return k * (1.0 - p) ** (k - 1)


def brute_force_weight(advantage_fn, n, p):
  """E[(1/N) sum_i A_i (r_i - p)] / (p (1-p)) over all 2^N reward vectors, unsorted, in float64."""
  vectors = np.array(list(itertools.product([0.0, 1.0], repeat=n)))  # [2^N, N]
  with jax.enable_x64(True):
    adv = np.asarray(advantage_fn(jnp.asarray(vectors)), np.float64)
  k = vectors.sum(-1)
  prob = p ** k * (1 - p) ** (n - k)
  return np.sum(prob * np.mean(adv * (vectors - p), axis=-1)) / (p * (1 - p))


# ------------------------------------------------------------------ exact enumeration


@pytest.mark.parametrize("n", GROUP_SIZES)
def test_maxrl_is_unbiased_for_order_n_minus_1(n):
  got = est.expected_weight("maxrl", n, PASS_RATES)
  np.testing.assert_allclose(got, maxrl_weight(PASS_RATES, n - 1), rtol=EXACT_RTOL)
  # ... and the paper's claim (order N) is wrong wherever (1-p)^(N-1) is visible.
  assert abs(got[0] / maxrl_weight(PASS_RATES[0], n) - 1) > 1e-3


@pytest.mark.parametrize("n", GROUP_SIZES)
def test_maxrl_with_control_variate_is_unbiased_for_order_n(n):
  got = est.expected_weight("maxrl", n, PASS_RATES, zero_failed_groups=False)
  np.testing.assert_allclose(got, maxrl_weight(PASS_RATES, n), rtol=EXACT_RTOL)


@pytest.mark.parametrize("n", GROUP_SIZES)
def test_maclaurin_is_unbiased_for_every_order(n):
  for order in range(1, n + 1):
    got = est.expected_weight("maclaurin", n, PASS_RATES, order=order)
    np.testing.assert_allclose(got, maxrl_weight(PASS_RATES, order), rtol=EXACT_RTOL,
                               err_msg=f"N={n} T={order}")


@pytest.mark.parametrize("n", GROUP_SIZES)
@pytest.mark.parametrize("name", ["reinforce", "rloo"])
def test_rl_estimators_are_unbiased_for_rl(n, name):
  np.testing.assert_allclose(est.expected_weight(name, n, PASS_RATES), 1.0, rtol=EXACT_RTOL)


@pytest.mark.parametrize("n", GROUP_SIZES)
def test_dr_grpo_is_scaled_rl(n):
  np.testing.assert_allclose(est.expected_weight("dr_grpo", n, PASS_RATES), (n - 1) / n, rtol=EXACT_RTOL)


@pytest.mark.parametrize("n", GROUP_SIZES)
@pytest.mark.parametrize("baseline", [False, True])
def test_pkpo_is_unbiased_for_pass_at_k(n, baseline):
  for k in sorted({1, 2, n // 2, n - 1, n} - {0}):
    got = est.expected_weight("pkpo", n, PASS_RATES, k=k, baseline=baseline)
    np.testing.assert_allclose(got, pass_at_k_weight(PASS_RATES, k), rtol=EXACT_RTOL, err_msg=f"N={n} k={k}")


def test_pkpo_with_baseline_at_k1_is_rloo():
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]])
  np.testing.assert_allclose(est.pkpo_advantages(rewards, k=1), est.rloo_advantages(rewards), rtol=1e-6)


@pytest.mark.parametrize("n", GROUP_SIZES)
def test_grpo_matches_no_maxrl_order(n):
  got = est.expected_weight("grpo", n, PASS_RATES)
  for order in range(1, n + 1):
    assert np.max(np.abs(got / maxrl_weight(PASS_RATES, order) - 1)) > 1e-2
  if n == 64:  # Large N: close to 1/sqrt(p(1-p)) away from the edges, and symmetric in p <-> 1-p.
    mid = PASS_RATES[1:4]
    np.testing.assert_allclose(got[1:4], 1 / np.sqrt(mid * (1 - mid)), rtol=0.05)
  np.testing.assert_allclose(got, got[::-1], rtol=1e-9)


@pytest.mark.parametrize("n", [2, 3, 5, 8, 10])
def test_brute_force_over_all_reward_vectors_agrees(n):
  rules = [("maxrl", {}), ("maxrl", {"zero_failed_groups": False}), ("grpo", {}), ("rloo", {}),
           ("reinforce", {}), ("dr_grpo", {}), ("maclaurin", {"order": n}), ("maclaurin", {"order": 2}),
           ("pkpo", {"k": 2}), ("pkpo", {"k": n, "baseline": False})]
  for name, kwargs in rules:
    fn = est.get_advantage_fn(name, **kwargs)
    for p in (0.1, 0.5, 0.9):
      np.testing.assert_allclose(
          brute_force_weight(fn, n, p), est.expected_weight(name, n, p, **kwargs), rtol=1e-9,
          err_msg=f"{name} {kwargs} N={n} p={p}")


def test_expected_weight_is_stable_for_n_1024():
  p = np.array([1e-4, 0.01, 0.5, 0.999])
  got = est.expected_weight("maxrl", 1024, p, zero_failed_groups=False)
  np.testing.assert_allclose(got, -np.expm1(1024 * np.log1p(-p)) / p, rtol=1e-9)
  got = est.expected_weight("maclaurin", 1024, p, order=1024)
  np.testing.assert_allclose(got, -np.expm1(1024 * np.log1p(-p)) / p, rtol=1e-7)


def test_expected_weight_accepts_user_functions():
  def my_rule(rewards):  # RLOO written by hand.
    n = rewards.shape[-1]
    return n / (n - 1) * (rewards - rewards.mean(-1, keepdims=True))

  np.testing.assert_allclose(est.expected_weight(my_rule, 7, PASS_RATES), 1.0, rtol=EXACT_RTOL)


# ------------------------------------------------------------------ Monte Carlo through autodiff


def _outcome_logits():
  # Two prompts, five outcomes each; outcomes 0 and 1 are correct. Pass rates ~0.08 and ~0.6.
  return jnp.array([[-1.5, -2.0, 0.5, 0.3, 0.0], [0.8, 0.2, -0.3, 0.0, -0.6]])


CORRECT = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])


def _pass_rates(logits):
  return jnp.sum(jax.nn.softmax(logits, -1) * CORRECT, -1)


@functools.partial(jax.jit, static_argnames=("advantage_fn", "num_samples", "num_groups"))
def _per_group_gradients(logits, key, advantage_fn, num_samples, num_groups):
  """[G, 2, 5] gradients of the surrogate (1/N) sum_i stop_grad(A_i) log pi(z_i), one per group of each prompt."""

  def one_group(key):
    samples = jax.random.categorical(key, logits[:, None, :], shape=(2, num_samples))  # [2, N]
    rewards = CORRECT[samples]
    adv = advantage_fn(rewards)

    def surrogate(logits):
      logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), samples, axis=-1)
      return jnp.sum(jnp.mean(jax.lax.stop_gradient(adv) * logp, axis=-1))

    return jax.grad(surrogate)(logits)

  return jax.vmap(one_group)(jax.random.split(key, num_groups))


def _z_scores(advantage_fn, target_order, num_samples, num_groups=40_000, seed=0):
  logits = _outcome_logits()
  grads = _per_group_gradients(logits, jax.random.key(seed), advantage_fn, num_samples, num_groups)
  mean = np.asarray(grads.mean(0))
  stderr = np.asarray(grads.std(0)) / math.sqrt(num_groups)
  target = np.asarray(jax.grad(lambda l: jnp.sum(est.truncated_objective(_pass_rates(l), target_order)))(logits))
  return (mean - target) / np.maximum(stderr, 1e-12)


@pytest.mark.parametrize("name,kwargs,n,order", [
    ("maxrl", {}, 4, 3),
    ("maxrl", {"zero_failed_groups": False}, 4, 4),
    ("maclaurin", {"order": 3}, 6, 3),
    ("rloo", {}, 4, 1),
])
def test_monte_carlo_gradient_matches_analytic(name, kwargs, n, order):
  z = _z_scores(est.get_advantage_fn(name, **kwargs), order, n)
  assert np.max(np.abs(z)) < 5.0, z


def test_monte_carlo_detects_wrong_rule():
  # GRPO's advantages in place of MaxRL's: the same test must reject it.
  z = _z_scores(est.get_advantage_fn("grpo"), 3, 4)
  assert np.max(np.abs(z)) > 5.0, z
  # And MaxRL checked against the order the paper states (N instead of N-1) is rejected too.
  z = _z_scores(est.get_advantage_fn("maxrl"), 4, 4)
  assert np.max(np.abs(z)) > 5.0, z


# ------------------------------------------------------------------ forms, dtypes, tracing, errors


def _random_binary(shape, seed=0, p=0.3):
  return (np.random.default_rng(seed).random(shape) < p).astype(np.float32)


@pytest.mark.parametrize("name,kwargs", [
    ("reinforce", {}), ("rloo", {}), ("dr_grpo", {}), ("grpo", {}), ("maxrl", {}),
    ("maxrl", {"zero_failed_groups": False}), ("maclaurin", {"order": 3}), ("pkpo", {"k": 2}),
])
def test_grouped_form_matches_dense_on_interleaved_ragged_groups(name, kwargs):
  rng = np.random.default_rng(1)
  sizes = [4, 6, 3, 5]
  groups = [_random_binary((s,), seed=i) for i, s in enumerate(sizes)]
  groups[1][:] = 0.0  # A failed group.
  groups[2][:] = 1.0  # An all-success group.
  rewards = np.concatenate(groups)
  ids = np.concatenate([np.full(s, g) for g, s in enumerate(sizes)])
  perm = rng.permutation(len(rewards))
  got = est.grouped_advantages(name, rewards[perm], ids[perm], num_groups=len(sizes), **kwargs)
  want = np.concatenate([np.asarray(est.get_advantage_fn(name, **kwargs)(g)) for g in groups])[perm]
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_values_on_a_worked_example():
  r = jnp.array([1.0, 0.0, 0.0, 1.0])  # K = 2, N = 4, mu = 1/2.
  np.testing.assert_allclose(est.maxrl_advantages(r), [1.0, -1.0, -1.0, 1.0])
  np.testing.assert_allclose(est.rloo_advantages(r), [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)
  np.testing.assert_allclose(est.grpo_advantages(r, eps=0.0), np.array([0.5, -0.5, -0.5, 0.5]) / np.sqrt(1 / 3),
                             rtol=1e-6)
  # Maclaurin T = 3, F = 2: failures get -(C(1,1)/C(3,1) + C(1,2)/C(3,2)) = -1/3.
  np.testing.assert_allclose(est.maclaurin_advantages(r, order=3), [1, -1 / 3, -1 / 3, 1], rtol=1e-6)
  zeros = jnp.zeros(4)
  np.testing.assert_array_equal(est.maxrl_advantages(zeros), np.zeros(4))
  np.testing.assert_array_equal(est.maxrl_advantages(zeros, zero_failed_groups=False), -np.ones(4))


@pytest.mark.parametrize("name,kwargs", [
    ("grpo", {}), ("maxrl", {}), ("maxrl", {"zero_failed_groups": False}), ("maclaurin", {"order": 64}),
    ("pkpo", {"k": 64}), ("rloo", {}), ("dr_grpo", {}),
])
def test_bfloat16_and_edge_groups_stay_finite(name, kwargs):
  rewards = np.zeros((3, 64), np.float32)
  rewards[1] = 1.0
  rewards[2, :1] = 1.0
  out = est.get_advantage_fn(name, **kwargs)(jnp.asarray(rewards, jnp.bfloat16))
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out)))


def test_jit_vmap_and_single_trace():
  traces = []

  @jax.jit
  def step(rewards):
    traces.append(1)
    return est.maclaurin_advantages(rewards, order=4) + est.maxrl_advantages(rewards)

  for seed in range(3):
    step(jnp.asarray(_random_binary((5, 8), seed)))
  assert len(traces) == 1
  batched = jax.vmap(est.maxrl_advantages)(jnp.asarray(_random_binary((3, 5, 8))))
  np.testing.assert_allclose(batched, est.maxrl_advantages(jnp.asarray(_random_binary((3, 5, 8)))))


@pytest.mark.parametrize("call,match", [
    (lambda: est.get_advantage_fn("maxrll"), "Unknown advantage estimator 'maxrll'.*Allowed"),
    (lambda: est.get_advantage_fn("maclaurin"), "needs the integer argument 'order'"),
    (lambda: est.get_advantage_fn("maxrl", order=3), "unknown argument"),
    (lambda: est.maclaurin_advantages(jnp.ones((2, 4)), order=5), "exceeds the group size N = 4"),
    (lambda: est.pkpo_advantages(jnp.ones((2, 4)), k=5), "exceeds the group size"),
    (lambda: est.maxrl_advantages(jnp.ones((2, 1))), "at least 2 rollouts"),
    (lambda: est.maxrl_advantages(jnp.array([0.5, 1.0])), "binary rewards"),
    (lambda: est.pkpo_advantages(jnp.array([-1.0, 1.0]), k=1), "binary rewards"),
    (lambda: est.maclaurin_advantages(jnp.ones(4), order=0), "integer >= 1"),
])
def test_bad_input_is_named(call, match):
  with pytest.raises(ValueError, match=match):
    call()


@pytest.mark.parametrize("name,kwargs", [
    ("maclaurin", {"order": 2, "cap_order_at_n": "yes"}), ("grpo", {"population_std": 1}),
    ("pkpo", {"k": 2, "baseline": None}), ("maxrl", {"zero_failed_groups": "False"}),
])
def test_switches_must_be_booleans(name, kwargs):
  key = next(k for k in kwargs if k not in ("order", "k"))
  with pytest.raises(ValueError, match=f"{key}=.* must be True or False"):
    est.get_advantage_fn(name, **kwargs)


@pytest.mark.parametrize("form", ["unbiased", "official"])
def test_pkpo_with_one_rollout_has_no_baseline_and_stays_finite(form):
  # N = 1 leaves no other rollouts for a leave-one-out baseline: A = r (k = 1), not 0/0.
  for fn in (lambda r: est.pkpo_advantages(r, k=1, form=form),
             lambda r: est.grouped_advantages("pkpo", r.reshape(-1), jnp.arange(2), 2, k=1, form=form)):
    np.testing.assert_array_equal(np.asarray(fn(jnp.array([[1.0], [0.0]]))).reshape(-1), [1.0, 0.0])
  np.testing.assert_allclose(est.expected_weight("pkpo", 1, PASS_RATES, k=1, form=form), 1.0, rtol=EXACT_RTOL)


def test_maclaurin_capped_order_is_unbiased_for_order_n():
  for n in (2, 8):
    got = est.expected_weight("maclaurin", n, PASS_RATES, order=64, cap_order_at_n=True)
    np.testing.assert_allclose(got, maxrl_weight(PASS_RATES, n), rtol=EXACT_RTOL)
  np.testing.assert_array_equal(
      est.maclaurin_advantages(jnp.array([[1.0, 0.0, 0.0]]), order=64, cap_order_at_n=True),
      est.maclaurin_advantages(jnp.array([[1.0, 0.0, 0.0]]), order=3))


def test_binary_rules_document_the_jit_path_of_their_reward_check():
  for fn in (est.maxrl_advantages, est.maclaurin_advantages, est.pkpo_advantages, est.grpo_advantages):
    assert "check_rewards" in fn.__doc__, fn.__name__
  assert "checkify" in est.__doc__ and "skipped" in est.__doc__


def test_static_checks_also_fire_under_jit():
  with pytest.raises(ValueError, match="exceeds the group size"):
    jax.jit(lambda r: est.maclaurin_advantages(r, order=9))(jnp.ones((2, 8)))


# ------------------------------------------------------------------ weights, objective, losses


def test_weight_functions_and_truncated_objective():
  p = jnp.linspace(0.05, 0.95, 7)
  np.testing.assert_allclose(est.weight_function(p, "maxrl", 5), maxrl_weight(np.asarray(p), 5), rtol=1e-5)
  np.testing.assert_allclose(est.weight_function(p, "ml"), 1 / p, rtol=1e-6)
  np.testing.assert_allclose(est.weight_function(p, "rl"), 1.0)
  np.testing.assert_allclose(est.weight_function(p, "grpo"), 1 / np.sqrt(p * (1 - p)), rtol=1e-6)
  for order in (1, 3, 20):
    grad = jax.vmap(jax.grad(lambda q: est.truncated_objective(q, order)))(p)
    np.testing.assert_allclose(grad, est.weight_function(p, "maxrl", order), rtol=1e-5)
  np.testing.assert_allclose(est.truncated_objective(p, 2000), np.log(p), atol=1e-5)


def test_policy_gradient_loss_reductions():
  logprobs = jnp.array([[[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]]])  # [P=1, N=2, T=3]
  mask = jnp.array([[[1, 1, 1], [1, 1, 0]]], bool)
  adv = jnp.array([[2.0, -1.0]])
  # sequence_sum: mean_i A_i sum_t logp = (2 * -6 + -1 * -1) / 2.
  assert np.isclose(est.policy_gradient_loss(logprobs, mask, adv), -(-12 + 1) / 2)
  assert np.isclose(est.policy_gradient_loss(logprobs, mask, adv, reduction="token_mean"), -(-12 + 1) / 5)
  assert np.isclose(est.policy_gradient_loss(logprobs, mask, adv, reduction="sequence_mean"),
                    -(2 * -2 + -1 * -0.5) / 2)
  assert np.isclose(est.policy_gradient_loss(logprobs, mask, adv, reduction="constant_normalized"),
                    -(-12 + 1) / 2 / 3)
  # Ragged groups: rollouts of group 0 averaged first, then groups.
  flat_lp, flat_mask = logprobs.reshape(2, 3), mask.reshape(2, 3)
  loss = est.policy_gradient_loss(jnp.concatenate([flat_lp, flat_lp[:1]]), jnp.concatenate([flat_mask, flat_mask[:1]]),
                                  jnp.array([2.0, -1.0, 3.0]), group_ids=jnp.array([0, 0, 1]), num_groups=3)
  assert np.isclose(loss, -((-12 + 1) / 2 + 3 * -6) / 2)
  # Advantages get no gradient.
  g = jax.grad(lambda a: est.policy_gradient_loss(logprobs, mask, a))(adv)
  np.testing.assert_array_equal(g, 0.0)
  with pytest.raises(ValueError, match="Unknown reduction"):
    est.policy_gradient_loss(logprobs, mask, adv, reduction="mean")


def test_entropy_bonus_lowers_loss_by_coef_times_entropy():
  logits = jnp.zeros((1, 2, 3, 4))
  ent = est.token_entropy(logits)
  np.testing.assert_allclose(ent, np.log(4), rtol=1e-6)
  lp, mask, adv = jnp.zeros((1, 2, 3)), jnp.ones((1, 2, 3), bool), jnp.zeros((1, 2))
  loss = est.policy_gradient_loss(lp, mask, adv, reduction="token_mean", entropy=ent, entropy_coef=0.1)
  assert np.isclose(loss, -0.1 * np.log(4))


def test_per_prompt_gradient_norms_match_a_python_loop():
  params = {"w": jnp.array([0.3, -0.2, 0.1])}
  batch = {"x": jnp.arange(12.0).reshape(4, 3) / 10, "y": jnp.array([1.0, 0.0, 2.0, -1.0])}

  def loss_fn(params, example):
    return (jnp.dot(params["w"], example["x"]) - example["y"]) ** 2

  got = est.per_prompt_gradient_norms(loss_fn, params, batch)
  want = [np.linalg.norm(jax.grad(loss_fn)(params, {"x": batch["x"][i], "y": batch["y"][i]})["w"]) for i in range(4)]
  np.testing.assert_allclose(got, want, rtol=1e-5)
