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
