"""The official code's estimator forms pinned on fixed reward matrices, the bootstrap best@k, and the value
checks that turn silent wrong numbers into errors (eagerly, and under jit through checkify)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

from maxrl_jax import estimators
from maxrl_jax import metrics
from maxrl_jax.tasks.maze import env as maze

REWARDS = np.array([[1, 0, 0, 1], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], np.float32)


def test_official_pkpo_on_fixed_rewards():
  # N = 4, k = 2: s_i = r_i C(F,1)/C(3,1) = r_i F/3; A_i = s_i - mean of the other three s_j.
  expected = np.array([[4 / 9, -4 / 9, -4 / 9, 4 / 9],
                       [1.0, -1 / 3, -1 / 3, -1 / 3],
                       [1 / 9, 1 / 9, 1 / 9, -1 / 3],
                       [0.0, 0.0, 0.0, 0.0]])
  np.testing.assert_allclose(estimators.pkpo_advantages(REWARDS, k=2, form="official"), expected, rtol=1e-6,
                             atol=1e-7)
  # The same from the definition, row by row.
  for row, want in zip(REWARDS, expected):
    F = 4 - row.sum()
    s = row * F / 3
    np.testing.assert_allclose([s[i] - np.delete(s, i).mean() for i in range(4)], want, rtol=1e-6, atol=1e-7)


def test_official_pkpo_is_biased_by_the_exact_amount():
  p = np.array([0.01, 0.05, 0.2, 0.5, 0.9])
  official = estimators.expected_weight("pkpo", 4, p, k=2, form="official")
  np.testing.assert_allclose(official, [0.99333333, 0.96666667, 0.86666667, 0.66666667, 0.4], rtol=1e-7)
  # Ours is unbiased for grad pass@2 = 2 (1-p) grad p.
  np.testing.assert_allclose(estimators.expected_weight("pkpo", 4, p, k=2), 2 * (1 - p), rtol=1e-9)


def test_maclaurin_order_capped_at_n_like_the_official_code():
  with pytest.raises(ValueError, match="exceeds the group size"):
    estimators.maclaurin_advantages(REWARDS, order=64)
  capped = estimators.get_advantage_fn("maclaurin", order=64, cap_order_at_n=True)(REWARDS)
  np.testing.assert_allclose(capped, estimators.maclaurin_advantages(REWARDS, order=4), rtol=1e-7)
  # Order 4 at N = 4: failures get -(sum_{j=1..3} C(F-1,j)/C(3,j)); F = 2 -> -1/3, F = 3 -> -(2/3 + 1/3).
  np.testing.assert_allclose(capped[0], [1, -1 / 3, -1 / 3, 1], rtol=1e-6)
  np.testing.assert_allclose(capped[1], [1, -1, -1, -1], rtol=1e-6)


def test_differential_smoothing_population_std_from_the_config():
  objective = {"name": "grpo", "smoothing_gamma": 0.05, "smoothing_std": "population"}
  kwargs = estimators.kwargs_from_config(objective)
  assert kwargs == {"population_std": True}
  adv = estimators.get_advantage_fn("grpo", **kwargs)(REWARDS)
  # [1, 0, 0, 0]: mean 1/4, population std sqrt(3)/4; Bessel std 1/2.
  np.testing.assert_allclose(adv[1], [np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3), -1 / np.sqrt(3)], rtol=1e-5)
  np.testing.assert_allclose(estimators.grpo_advantages(REWARDS)[1], [1.5, -0.5, -0.5, -0.5], rtol=1e-5)
  assert estimators.kwargs_from_config({**objective, "smoothing_std": "bessel"}) == {}
  with pytest.raises(ValueError, match="smoothing_std"):
    estimators.kwargs_from_config({**objective, "smoothing_std": "sample"})
  assert estimators.kwargs_from_config({"name": "pkpo", "k": 2, "pkpo_form": "official"}) == {
      "k": 2, "form": "official"}
  assert estimators.kwargs_from_config({"name": "maxrl"}) == {}  # Older configs without the new fields.


def test_bootstrap_best_at_k_closed_form_matches_resampling():
  n, ks = 32, (1, 4, 16)
  counts = np.array([0, 1, 5, 16, 31, 32])
  closed = np.asarray(metrics.best_at_k_with_replacement(n, counts, ks))
  rng = np.random.default_rng(0)
  draws = 20000
  for i, c in enumerate(counts):
    samples = np.arange(n) < c
    for j, k in enumerate(ks):
      picked = samples[rng.integers(0, n, size=(draws, k))].any(axis=1)
      se = np.sqrt(max(closed[i, j] * (1 - closed[i, j]), 1e-12) / draws)
      assert abs(picked.mean() - closed[i, j]) <= 5 * se + 1e-12, (c, k)
  # Biased low against the unbiased pass@k.
  unbiased = np.asarray(metrics.pass_at_k(n, counts, list(ks)))
  assert np.all(closed <= unbiased + 1e-7)
  assert np.any(closed < unbiased - 1e-3)


@pytest.mark.parametrize("count", [5, -1, 1.5, np.nan])
def test_pass_at_k_refuses_impossible_counts(count):
  with pytest.raises(ValueError, match=r"num_correct must hold integers in \[0, num_samples=4\]"):
    metrics.pass_at_k(4, np.array([count]), 1)


def test_pass_at_k_counts_checked_under_jit_with_checkify():
  def f(c):
    metrics.check_counts(4, c)
    return metrics.pass_at_k(4, c, 1)

  checked = checkify.checkify(jax.jit(f))
  err, _ = checked(jnp.array([1.0, 2.0]))
  err.throw()  # Valid counts: no error.
  err, _ = checked(jnp.array([1.0, 5.0]))
  with pytest.raises(Exception, match="num_correct must hold integers"):
    err.throw()


def test_expected_weight_refuses_a_non_integer_group_size():
  with pytest.raises(ValueError, match=r"num_samples=2.7 must be an integer"):
    estimators.expected_weight("maxrl", 2.7, 0.5)


@pytest.mark.parametrize("name", ["grpo", "rloo", "dr_grpo", "reinforce", "maxrl", "maclaurin", "pkpo"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_every_rule_refuses_non_finite_rewards(name, bad):
  kwargs = {"order": 2} if name == "maclaurin" else {"k": 2} if name == "pkpo" else {}
  rewards = np.array([[1.0, bad, 0.0, 1.0]])
  with pytest.raises(ValueError, match="non-finite rewards|binary rewards"):
    estimators.get_advantage_fn(name, **kwargs)(rewards)


def test_reward_checks_under_jit_with_checkify():
  def step(rewards):
    estimators.check_rewards("maxrl", rewards)
    return estimators.maxrl_advantages(rewards)

  checked = checkify.checkify(jax.jit(step))
  err, _ = checked(jnp.asarray(REWARDS))
  err.throw()
  for bad in ([[1.0, 0.5, 0.0, 1.0]], [[1.0, np.nan, 0.0, 1.0]]):
    err, _ = checked(jnp.asarray(bad, jnp.float32))
    with pytest.raises(Exception, match="binary rewards|non-finite"):
      err.throw()


def test_maze_verifier_refuses_ids_that_would_wrap():
  grid = np.asarray(maze.generate_mazes(jax.random.key(0), 1, 7))[0]
  with pytest.raises(ValueError, match="outside the int32 range"):
    maze.verify(grid, np.array([maze.UP + 2**32, maze.DONE], np.int64))
  with pytest.raises(ValueError, match="outside the int32 range"):
    maze.verify_groups(grid[None], np.array([[[maze.UP + 2**32, maze.DONE]]], np.int64))
  # In range but outside the vocabulary: an invalid token before DONE, reward 0.
  assert float(maze.verify(grid, np.array([99, maze.DONE], np.int64))) == 0.0


# ------------------------------------------------------------------ fixed [3, 4] and [2, 8] reward matrices

R3x4 = np.array([[1, 0, 0, 1], [1, 1, 1, 0], [0, 1, 0, 0]], np.float32)
R2x8 = np.array([[1, 0, 0, 0, 0, 0, 1, 0], [1, 1, 0, 1, 1, 1, 0, 1]], np.float32)


def test_official_pkpo_pinned_on_3x4_and_2x8():
  # N = 4, k = 2: s_i = r_i F / 3; A = s_i - mean of the other three.
  np.testing.assert_allclose(estimators.pkpo_advantages(R3x4, k=2, form="official"),
                             [[4 / 9, -4 / 9, -4 / 9, 4 / 9],
                              [1 / 9, 1 / 9, 1 / 9, -1 / 3],
                              [-1 / 3, 1, -1 / 3, -1 / 3]], rtol=1e-6, atol=1e-7)
  # N = 8, k = 3: s_i = r_i C(F,2)/C(7,2). Row 1: F = 6, s = 15/21 = 5/7; successes 5/7 * 6/7, failures
  # -5/7 * 2/7. Row 2: F = 2, s = 1/21; successes 1/21 * 2/7, failures -1/21 * 6/7.
  np.testing.assert_allclose(estimators.pkpo_advantages(R2x8, k=3, form="official"),
                             [[30 / 49, -10 / 49, -10 / 49, -10 / 49, -10 / 49, -10 / 49, 30 / 49, -10 / 49],
                              [2 / 147, 2 / 147, -2 / 49, 2 / 147, 2 / 147, 2 / 147, -2 / 49, 2 / 147]],
                             rtol=1e-6, atol=1e-7)
  # Ours on the first row for contrast: successes k C(F,k-1)/C(3,k-1) F/3 = 8/9, failures -k (1/3)(2/3).
  np.testing.assert_allclose(estimators.pkpo_advantages(R3x4[:1], k=2), [[8 / 9, -4 / 9, -4 / 9, 8 / 9]],
                             rtol=1e-6)


def test_official_pkpo_weights_by_enumerating_all_reward_vectors():
  # E[(1/N) sum_i A_i (r_i - p)] / (p (1-p)) over the 16 reward vectors of N = 4, independent of expected_weight.
  vectors = np.array(list(itertools.product([0.0, 1.0], repeat=4)))
  adv = np.asarray(estimators.pkpo_advantages(vectors, k=2, form="official"), np.float64)
  weights = []
  for p in (0.01, 0.05, 0.2, 0.5, 0.9):
    prob = p ** vectors.sum(-1) * (1 - p) ** (4 - vectors.sum(-1))
    weights.append(np.sum(prob * np.mean(adv * (vectors - p), axis=-1)) / (p * (1 - p)))
  np.testing.assert_allclose(weights, [0.993, 0.967, 0.867, 0.667, 0.400], atol=5e-4)
  # Without the factor k the unbiased target is (1-p): 0.5 at p = 0.5, where the official form gives 0.667.
  assert abs(weights[3] - 0.5) > 0.1


def test_maclaurin_capped_pinned_on_3x4_and_2x8():
  # Order 64 means order N. N = 4: failures -sum_{j=1..3} C(F-1,j)/C(3,j): F = 2 -> -1/3, F = 1 -> 0,
  # F = 3 -> -(2/3 + 1/3).
  np.testing.assert_allclose(estimators.maclaurin_advantages(R3x4, order=64, cap_order_at_n=True),
                             [[1, -1 / 3, -1 / 3, 1], [1, 1, 1, 0], [-1, 1, -1, -1]], rtol=1e-6, atol=1e-7)
  # N = 8, F = 6: sum_{j=1..5} C(5,j)/C(7,j) = (15 + 10 + 6 + 3 + 1)/21 = 5/3; F = 2: C(1,1)/C(7,1) = 1/7.
  f1, f2 = -5 / 3, -1 / 7
  np.testing.assert_allclose(estimators.maclaurin_advantages(R2x8, order=64, cap_order_at_n=True),
                             [[1, f1, f1, f1, f1, f1, 1, f1], [1, 1, f2, 1, 1, 1, f2, 1]], rtol=1e-6)
  with pytest.raises(ValueError, match="exceeds the group size N = 8"):
    estimators.maclaurin_advantages(R2x8, order=64)


def test_differential_smoothing_population_std_pinned_on_3x4():
  lbar = np.array([[-1.0, -2.0, -0.5, -4.0], [-1.0] * 4, [-2.0] * 4], np.float32)
  s3 = 3 ** 0.5
  official = estimators.apply_differential_smoothing(
      estimators.grpo_advantages(R3x4, population_std=True), R3x4, lbar, gamma=0.05)
  # GRPO with the population std: [1,0,0,1] -> +-1; [1,1,1,0] -> 1/sqrt3, -sqrt3; [0,1,0,0] -> sqrt3, -1/sqrt3.
  # Then A - 0.05 r lbar + 0.05 (1-r) lbar.
  np.testing.assert_allclose(official, [[1.05, -1.1, -1.025, 1.2],
                                        [1 / s3 + 0.05, 1 / s3 + 0.05, 1 / s3 + 0.05, -s3 - 0.05],
                                        [-1 / s3 - 0.1, s3 + 0.1, -1 / s3 - 0.1, -1 / s3 - 0.1]], rtol=1e-5)
  ours = estimators.apply_differential_smoothing(estimators.grpo_advantages(R3x4), R3x4, lbar, gamma=0.05)
  # Bessel std on [1,0,0,1]: sqrt(1/3), advantages +-sqrt(3)/2.
  np.testing.assert_allclose(ours[0], [s3 / 2 + 0.05, -s3 / 2 - 0.1, -s3 / 2 - 0.025, s3 / 2 + 0.2], rtol=1e-5)


def test_config_fields_reach_only_the_estimator_they_concern():
  from configs import maze as maze_config  # pylint: disable=import-outside-toplevel

  cfg = maze_config.get_config()
  assert (cfg.objective.pkpo_form, cfg.objective.cap_order_at_n, cfg.objective.smoothing_std) == (
      "unbiased", False, "bessel")
  cfg.objective.name = "grpo"
  cfg.objective.smoothing_std = "population"
  assert estimators.kwargs_from_config(cfg.objective) == {}  # Smoothing off: the std choice is unused.
  cfg.objective.smoothing_gamma = 0.05
  assert estimators.kwargs_from_config(cfg.objective) == {"population_std": True}
  cfg.objective.name, cfg.objective.order, cfg.objective.cap_order_at_n = "maclaurin", 64, True
  assert estimators.kwargs_from_config(cfg.objective) == {"order": 64, "cap_order_at_n": True}
  cfg.objective.name, cfg.objective.k, cfg.objective.pkpo_form = "pkpo", 2, "official"
  assert estimators.kwargs_from_config(cfg.objective) == {"k": 2, "form": "official"}
  cfg.objective.name = "maxrl"
  assert estimators.kwargs_from_config(cfg.objective) == {"zero_failed_groups": True, "reward_type": "binary"}
  # An older config.json without the fields, and typos that would otherwise be ignored.
  assert estimators.kwargs_from_config({"name": "maclaurin", "order": 4}) == {"order": 4}
  for field, value in (("pkpo_form", "oficial"), ("cap_order_at_n", "yes"), ("smoothing_std", "sample")):
    with pytest.raises(ValueError, match=f"config.objective.{field}="):
      estimators.kwargs_from_config({"name": "maxrl", field: value})


def test_grouped_rules_refuse_non_finite_rewards():
  with pytest.raises(ValueError, match="non-finite rewards"):
    estimators.grouped_advantages("rloo", np.array([1.0, np.nan, 0.0, 1.0]), np.array([0, 0, 1, 1]), 2)


def _corridor():
  grid = np.ones((5, 5), np.int32)  # Start (1,1) -> RIGHT, RIGHT, DOWN, DOWN -> goal (3,3).
  grid[1, 1:4] = 0
  grid[1:4, 3] = 0
  return grid


def test_maze_verifier_never_moves_on_wide_ids_under_jit():
  grid = _corridor()
  path = np.array([maze.RIGHT, maze.RIGHT, maze.DOWN, maze.DOWN, maze.DONE], np.int64)
  with jax.enable_x64(True):
    verify = jax.jit(maze.verify)
    assert float(verify(grid, path)) == 1.0
    assert float(verify(grid, path + np.array([2 ** 32] * 4 + [0]))) == 0.0  # Would wrap to the same path.
    groups = jax.jit(maze.verify_groups)(grid[None], (path + np.array([2 ** 32] * 4 + [0]))[None, None])
    assert float(groups[0, 0]) == 0.0
  assert float(maze.verify(grid, path.astype(np.uint8))) == 1.0
  with pytest.raises(ValueError, match="must hold integer token ids"):
    jax.jit(maze.verify)(grid, path.astype(np.float32))  # A dtype is known under jit: refused there too.
