"""pass@k and friends against brute-force combinatorics."""

import itertools
import math
from fractions import Fraction

import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax import metrics


def exact_pass_at_k(n, c, k):
  return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def test_pass_at_k_equals_subset_enumeration():
  n = 7
  for c in range(n + 1):
    outcomes = [1] * c + [0] * (n - c)
    for k in range(1, n + 1):
      subsets = list(itertools.combinations(outcomes, k))
      want = sum(any(s) for s in subsets) / len(subsets)
      assert np.isclose(metrics.pass_at_k(n, c, k), want, atol=1e-6), (c, k)


def test_pass_at_k_large_n_and_k_vectorised():
  n, ks = 4096, [1, 2, 32, 128, 1024]
  c = np.array([0, 1, 3, 17, 500, 3072, 4096])
  got = np.asarray(metrics.pass_at_k(n, jnp.asarray(c), ks))
  assert got.shape == (len(c), len(ks))
  want = np.array([[exact_pass_at_k(n, int(ci), k) for k in ks] for ci in c])
  np.testing.assert_allclose(got, want, atol=2e-6)


def test_pass_at_k_is_unbiased_for_analytic():
  # E_{c ~ Binomial(n, p)}[pass@k(n, c, k)] = 1 - (1-p)^k exactly.
  n, k, p = 16, 5, 0.13
  c = np.arange(n + 1)
  pmf = np.array([math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in c])
  got = np.sum(pmf * np.asarray(metrics.pass_at_k(n, jnp.asarray(c), k), np.float64))
  assert np.isclose(got, float(metrics.analytic_pass_at_k(p, k)), atol=1e-6)


def test_analytic_pass_at_k():
  p = jnp.array([1e-6, 0.1, 1.0])
  got = metrics.analytic_pass_at_k(p, [1, 4, 1024])
  np.testing.assert_allclose(got[:, 1], 1 - (1 - np.asarray(p, np.float64)) ** 4, rtol=1e-5)
  np.testing.assert_allclose(got[0, 0], 1e-6, rtol=1e-4)  # No cancellation at tiny p.


def test_pass_at_k_rejects_bad_k():
  with pytest.raises(ValueError, match="must be an integer in"):
    metrics.pass_at_k(4, 1, 5)


@pytest.mark.parametrize("num_answers", [None, 5])
def test_majority_vote(num_answers):
  answers = jnp.array([[1, 2, 2, 3], [4, 4, 0, 0], [3, 3, 3, 1]])
  targets = jnp.array([2, 0, 1])
  got = metrics.majority_vote_accuracy(answers, targets, num_answers=num_answers)
  np.testing.assert_array_equal(got, [1.0, 1.0, 0.0])  # Row 2 ties 4 vs 0: the smaller id wins.
  valid = jnp.array([[True] * 4, [True] * 4, [False, False, False, True]])
  got = metrics.majority_vote_accuracy(answers, targets, num_answers=num_answers, valid=valid, reduction="mean")
  assert np.isclose(got, 1.0)


def test_fraction_solved():
  rewards = jnp.array([[0, 0, 1], [0, 0, 0], [1, 1, 1], [0, 0, 0]])
  assert np.isclose(metrics.fraction_solved(rewards), 0.5)
  np.testing.assert_array_equal(metrics.fraction_solved(rewards, reduction="none"), [1, 0, 1, 0])


# ------------------------------------------------------------------ best@k with replacement (the official log)


def test_best_at_k_with_replacement_is_the_exact_resampling_expectation():
  # Enumerate every ordered draw of k indices out of n (n^k of them): the best is 1 iff one index is < c.
  n = 5
  for c in range(n + 1):
    for k in (1, 2, 3, 7):
      if n ** k > 10 ** 5:
        continue
      hits = sum(min(draw) < c for draw in itertools.product(range(n), repeat=k))
      np.testing.assert_allclose(metrics.pass_at_k_with_replacement(n, c, k), hits / n ** k, rtol=1e-6)
  assert metrics.pass_at_k_with_replacement is metrics.best_at_k_with_replacement


def test_best_at_k_with_replacement_is_below_pass_at_k_by_the_documented_amounts():
  n, c = 2048, np.arange(2049)
  gap = np.asarray(metrics.pass_at_k(n, c, [32, 128, 256])) - np.asarray(
      metrics.best_at_k_with_replacement(n, c, [32, 128, 256]))
  assert gap.min() > -1e-6
  np.testing.assert_allclose(gap.max(axis=0), [0.0028, 0.0118, 0.0242], atol=2e-4)


def test_bootstrap_best_at_k_converges_to_the_closed_form():
  import jax  # pylint: disable=import-outside-toplevel

  n, ks, draws = 64, (1, 4, 16, 128), 4000
  counts = jnp.array([0, 1, 3, 16, 40, 63, 64])
  boot = jax.jit(lambda c, key: metrics.bootstrap_best_at_k(n, c, ks, key=key, num_bootstrap=draws))(
      counts, jax.random.key(0))
  closed = np.asarray(metrics.best_at_k_with_replacement(n, counts, ks))
  assert boot.shape == (7, 4)
  # Each entry is a mean of `draws` Bernoulli(q) variables: standard error sqrt(q (1-q) / draws).
  se = np.sqrt(closed * (1 - closed) / draws)
  assert np.all(np.abs(np.asarray(boot) - closed) <= 5 * se + 1e-6)
  np.testing.assert_array_equal(boot[0], 0.0)  # c = 0 and c = n are exact.
  np.testing.assert_array_equal(boot[-1], 1.0)
  one = metrics.bootstrap_best_at_k(n, counts, 4, key=jax.random.key(0), num_bootstrap=draws)
  np.testing.assert_allclose(one, boot[:, 1])  # A k draws the same in any list of ks.
  with pytest.raises(ValueError, match="num_correct must hold integers"):
    metrics.bootstrap_best_at_k(n, jnp.array([65]), 4, key=jax.random.key(0))
  with pytest.raises(ValueError, match="num_bootstrap"):
    metrics.bootstrap_best_at_k(n, counts, 4, key=jax.random.key(0), num_bootstrap=0)


@pytest.mark.parametrize("count", [5, -1, 1.5])
def test_pass_at_k_raises_on_impossible_counts_and_names_the_argument(count):
  with pytest.raises(ValueError, match=r"num_correct must hold integers in \[0, num_samples=4\]"):
    metrics.pass_at_k(4, jnp.array([count]), 2)
  with pytest.raises(ValueError, match=r"k=0 must be an integer"):
    metrics.best_at_k_with_replacement(4, 1, 0)
