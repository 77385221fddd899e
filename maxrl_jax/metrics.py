"""Evaluation metrics for pass/fail tasks: pass@k, majority vote, fraction solved.

All functions are pure jnp, jit- and vmap-friendly, and return per-example values unless a reduction is
asked for explicitly.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["pass_at_k", "check_counts", "best_at_k_with_replacement", "analytic_pass_at_k", "majority_vote_accuracy", "fraction_solved"]


def _float_dtype(x) -> jnp.dtype:
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _check_counts(what: str, n: int, num_correct) -> None:
  """Eager check that counts are integers in [0, n]; skipped for traced counts (see `check_counts`)."""
  if isinstance(num_correct, jax.core.Tracer):
    return
  c = np.asarray(jax.device_get(num_correct), dtype=np.float64)
  bad = c[~np.isfinite(c) | (c < 0) | (c > n) | (c != np.round(c))]
  if bad.size:
    raise ValueError(f"{what}: num_correct must hold integers in [0, num_samples={n}], got e.g. "
                     f"{bad[:3].tolist()}; a count outside that range has no pass@k (it is not clipped).")


def check_counts(num_samples: int, num_correct: Array) -> None:
  """`pass_at_k`'s count check for use under jit, through `jax.experimental.checkify`.

  `pass_at_k` checks its counts eagerly and skips the check when they are traced (no host sync inside jit);
  call this inside the jitted function and wrap it with `checkify.checkify` to keep the check there.
  """
  from jax.experimental import checkify  # pylint: disable=import-outside-toplevel

  c = jnp.asarray(num_correct)
  checkify.check(jnp.all((c >= 0) & (c <= num_samples) & (c == jnp.round(c))),
                 f"pass_at_k: num_correct must hold integers in [0, {num_samples}].")


def best_at_k_with_replacement(num_samples: int, num_correct: Array, k: int | Sequence[int]) -> Array:
  """The expectation of a bootstrap best@k: the best of k samples drawn WITH replacement from the n.

      best@k = 1 - (1 - c/n)^k

  This is what verl-style training logs estimate by resampling (e.g. the authors' `best@k/mean`, 1000
  bootstrap draws per problem). It is not pass@k: it is biased low, since sampling with replacement can
  draw the same failed sample twice (below the unbiased pass@k by up to about 0.012 at k = 128 and 0.024
  at k = 256 with n = 2048). Use it to compare with such logs; use `pass_at_k` for the paper's tables.

  Args:
    num_samples: n (static). num_correct: [...] counts c in [0, n]. k: an int or a sequence of ints >= 1.

  Returns:
    [...] for an int k, [..., len(k)] for a sequence.
  """
  _check_counts("best_at_k_with_replacement", int(num_samples), num_correct)
  ks = [k] if isinstance(k, int) else list(k)
  c = jnp.asarray(num_correct)
  fail = 1.0 - c.astype(_float_dtype(c)) / num_samples
  result = 1.0 - fail[..., None] ** jnp.asarray(ks, fail.dtype)
  return result[..., 0] if isinstance(k, int) else result


def pass_at_k(num_samples: int, num_correct: Array, k: int | Sequence[int]) -> Array:
  """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021).

      pass@k = 1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1..n} (1 - k/i),   and 1 when n - c < k.

  It is the probability that a uniformly random size-k subset of the n samples holds a correct one, so its
  expectation over c ~ Binomial(n, p) is exactly 1 - (1-p)^k. (A with-replacement bootstrap is biased.)
  The product is evaluated as a masked sum of log1p(-k/i) terms, each in (-inf, 0], so it is stable for
  k up to 1024 with n up to several thousand in float32.

  Args:
    num_samples: n, the number of samples per problem (a static Python int, the same for all problems).
    num_correct: [...] integer number of correct samples c per problem, 0 <= c <= n. Checked eagerly (a
      ValueError otherwise); under jit the check needs `check_counts` with checkify.
    k: an int, or a sequence of ints, each 1 <= k <= n (static).

  Returns:
    [...] pass@k for an int k, or [..., len(k)] for a sequence.
  """
  n = int(num_samples)
  ks = [k] if isinstance(k, int) else list(k)
  _check_counts("pass_at_k", n, num_correct)
  for kk in ks:
    if int(kk) != kk or not 1 <= kk <= n:
      raise ValueError(f"pass_at_k: k={kk!r} must be an integer in [1, num_samples={n}].")
  c = jnp.asarray(num_correct)
  dtype = _float_dtype(c) if jnp.issubdtype(c.dtype, jnp.floating) else jnp.float32
  c = c.astype(dtype)
  k_arr = jnp.asarray(ks, dtype)  # [len(k)]
  i = jnp.arange(1, n + 1, dtype=dtype)  # [n]
  # Terms log(1 - k/i) for i in (n-c, n]; only needed (and finite) when n - c >= k, i.e. i > k.
  in_range = i > (n - c)[..., None, None]  # [..., 1, n]
  finite = i > k_arr[:, None]  # [len(k), n]
  terms = jnp.log1p(-k_arr[:, None] / jnp.where(finite, i, 1.0 + k_arr[:, None]))
  log_fail = jnp.sum(jnp.where(in_range & finite, terms, 0.0), axis=-1)  # [..., len(k)]
  result = jnp.where((n - c)[..., None] < k_arr, 1.0, -jnp.expm1(log_fail))
  return result[..., 0] if isinstance(k, int) else result


def analytic_pass_at_k(p: Array, k: int | Sequence[int]) -> Array:
  """pass@k = 1 - (1-p)^k when the pass rate p is known exactly (e.g. classification, p = softmax[label]).

  Args:
    p: [...] pass rates in [0, 1].
    k: an int or a sequence of ints >= 1.

  Returns:
    [...] for an int k, [..., len(k)] for a sequence; computed as -expm1(k log1p(-p)), accurate for tiny p.
  """
  p = jnp.asarray(p, _float_dtype(p))
  ks = jnp.asarray([k] if isinstance(k, int) else list(k), p.dtype)
  result = -jnp.expm1(ks * jnp.log1p(-p)[..., None])
  return result[..., 0] if isinstance(k, int) else result


def majority_vote_accuracy(
    answers: Array, targets: Array, num_answers: int | None = None, valid: Array | None = None,
    reduction: str = "none") -> Array:
  """Whether the most frequent answer among a problem's samples is the target (ties: smallest answer id).

  For classification with samples from the softmax, majority vote over many samples is top-1 accuracy.

  Args:
    answers: [..., N] integer answer ids of the N samples.
    targets: [...] integer correct answer id.
    num_answers: size of the answer space (static). With it votes are counted with a one-hot sum,
      O(N * num_answers); without it with pairwise comparisons, O(N^2).
    valid: optional [..., N] bool; invalid samples (e.g. unparsable) do not vote.
    reduction: "none" for [...] 0/1 values, "mean" for their mean.

  Returns:
    [...] float 0/1 (or a scalar with reduction="mean").
  """
  answers = jnp.asarray(answers)
  targets = jnp.asarray(targets)
  valid = jnp.ones(answers.shape, bool) if valid is None else jnp.asarray(valid, bool)
  if num_answers is not None:
    votes = jnp.sum(jax.nn.one_hot(answers, num_answers, dtype=jnp.int32) * valid[..., None], axis=-2)
    winner = jnp.argmax(votes, axis=-1)
    has_vote = jnp.any(valid, axis=-1)
  else:
    same = (answers[..., :, None] == answers[..., None, :]) & valid[..., None, :]
    counts = jnp.where(valid, jnp.sum(same, axis=-1), -1)  # [..., N]
    best = jnp.max(counts, axis=-1, keepdims=True)
    big = jnp.iinfo(jnp.int32).max
    winner = jnp.min(jnp.where(counts == best, answers, big), axis=-1)
    has_vote = best[..., 0] > 0
  correct = ((winner == targets) & has_vote).astype(jnp.float32)
  if reduction == "mean":
    return jnp.mean(correct)
  if reduction != "none":
    raise ValueError(f"majority_vote_accuracy: reduction={reduction!r}; allowed: 'none', 'mean'.")
  return correct


def fraction_solved(rewards: Array, reduction: str = "mean") -> Array:
  """Share of prompts with at least one correct rollout; prompts with K = 0 give MaxRL and GRPO no gradient.

  Args:
    rewards: [..., N] rewards of each prompt's N rollouts (> 0 counts as correct).
    reduction: "mean" for the fraction (scalar), "none" for [...] 0/1 indicators.
  """
  solved = jnp.any(jnp.asarray(rewards) > 0, axis=-1).astype(jnp.float32)
  if reduction == "mean":
    return jnp.mean(solved)
  if reduction != "none":
    raise ValueError(f"fraction_solved: reduction={reduction!r}; allowed: 'none', 'mean'.")
  return solved
