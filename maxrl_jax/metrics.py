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

__all__ = [
    "pass_at_k",
    "check_counts",
    "best_at_k_with_replacement",
    "pass_at_k_with_replacement",
    "bootstrap_best_at_k",
    "analytic_pass_at_k",
    "majority_vote_accuracy",
    "fraction_solved",
    "heldout_summary",
]


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


def _check_ks(what: str, k, max_k: int | None = None) -> list[int]:
  ks = [k] if isinstance(k, (int, np.integer)) else list(k)
  for kk in ks:
    if isinstance(kk, bool) or int(kk) != kk or kk < 1 or (max_k is not None and kk > max_k):
      upper = f", num_samples={max_k}]" if max_k is not None else ", inf)"
      raise ValueError(f"{what}: k={kk!r} must be an integer in [1{upper}.")
  return [int(kk) for kk in ks]


def check_counts(num_samples: int, num_correct: Array) -> None:
  """The count check of `pass_at_k` and the best@k functions, for use under jit through checkify.

  Those functions check their counts eagerly and skip the check when they are traced (no host sync inside
  jit). Call this inside the jitted function and wrap it:

      def evaluate(counts):
        metrics.check_counts(n, counts)
        return metrics.pass_at_k(n, counts, (1, 32))
      err, values = checkify.checkify(jax.jit(evaluate))(counts)
      err.throw()   # raises if some count is not an integer in [0, n]
  """
  from jax.experimental import checkify  # pylint: disable=import-outside-toplevel

  c = jnp.asarray(num_correct)
  checkify.check(jnp.all((c >= 0) & (c <= num_samples) & (c == jnp.round(c))),
                 f"pass_at_k: num_correct must hold integers in [0, {num_samples}].")


def best_at_k_with_replacement(num_samples: int, num_correct: Array, k: int | Sequence[int]) -> Array:
  """The exact expectation of a bootstrap best@k: the best of k samples drawn WITH replacement from the n.

      best@k = 1 - (1 - c/n)^k

  Each of the k draws is correct with probability c/n, independently, so the best of them is 0 with
  probability (1 - c/n)^k: `bootstrap_best_at_k`, the authors' `best@k/mean` log metric, converges to this
  as its number of bootstrap draws grows. It is not pass@k (`pass_at_k`, subsets without replacement): it
  is biased low, since a draw can repeat a failed sample; at n = 2048 it is below the unbiased pass@k by up
  to 0.0028 at k = 32, 0.0118 at k = 128 and 0.0242 at k = 256 (the worst c being about n/k). Use it to
  compare with such logs; use `pass_at_k` for the paper's tables.

  Args:
    num_samples: n (static).
    num_correct: [...] counts c, integers in [0, n]. Checked eagerly (a ValueError otherwise); under jit
      unchecked, see `check_counts`.
    k: an int or a sequence of ints >= 1 (static; k > n is allowed, draws repeat).

  Returns:
    [...] for an int k, [..., len(k)] for a sequence.
  """
  _check_counts("best_at_k_with_replacement", int(num_samples), num_correct)
  ks = _check_ks("best_at_k_with_replacement", k)
  c = jnp.asarray(num_correct)
  fail = 1.0 - c.astype(_float_dtype(c)) / num_samples
  result = 1.0 - fail[..., None] ** jnp.asarray(ks, fail.dtype)
  return result[..., 0] if isinstance(k, (int, np.integer)) else result


# The same function under the name that says what it is: pass@k had the k samples been drawn with replacement.
pass_at_k_with_replacement = best_at_k_with_replacement


def bootstrap_best_at_k(num_samples: int, num_correct: Array, k: int | Sequence[int], *, key: Array,
                        num_bootstrap: int = 1000) -> Array:
  """The official code's best@k log metric: a bootstrap, k of the n samples drawn with replacement.

  For each problem, num_bootstrap times: draw k indices uniformly from the n samples WITH replacement and
  take the best reward among them; report the mean of those bests. With binary rewards the best is 1 iff a
  drawn index points at a correct sample; the law does not depend on where the c correct samples sit, so
  they are taken to be the first c and a draw is a success iff its smallest index is < c. The indices are
  shared by all problems (the official code reseeds before every problem, so it shares them too); each
  problem's value is still an unbiased estimate of `best_at_k_with_replacement`, 1 - (1 - c/n)^k, with
  variance q (1 - q) / num_bootstrap, q that value.

  This is NOT the unbiased pass@k: its expectation is below `pass_at_k` by up to about 0.012 at k = 128 and
  0.024 at k = 256 with n = 2048. Use it only to compare with logs of the official code.

  Jittable: num_samples, k and num_bootstrap are static, key and num_correct may be traced. Memory is
  num_bootstrap * k indices per k plus [..., num_bootstrap] booleans.

  Args:
    num_samples: n (static).
    num_correct: [...] counts c, integers in [0, n]. Checked eagerly (a ValueError otherwise); under jit
      unchecked, see `check_counts`.
    k: an int or a sequence of ints >= 1 (static; k > n is allowed).
    key: PRNG key; each k draws with `fold_in(key, k)`, so a k gets the same draws in any list of ks.
    num_bootstrap: number of bootstrap draws (static); the official code uses 1000, for k = 2, 4, 8, ... below
      n and k = n.

  Returns:
    [...] float32 means for an int k, [..., len(k)] for a sequence.
  """
  n = int(num_samples)
  _check_counts("bootstrap_best_at_k", n, num_correct)
  ks = _check_ks("bootstrap_best_at_k", k)
  if isinstance(num_bootstrap, bool) or int(num_bootstrap) != num_bootstrap or num_bootstrap < 1:
    raise ValueError(f"bootstrap_best_at_k: num_bootstrap={num_bootstrap!r} must be an integer >= 1.")
  c = jnp.asarray(num_correct)
  results = []
  for kk in ks:
    draws = jax.random.randint(jax.random.fold_in(key, kk), (int(num_bootstrap), kk), 0, n)
    first = jnp.min(draws, axis=-1)  # [B]: a draw holds a correct sample iff its smallest index is < c.
    best = first < c[..., None]  # [..., B]
    results.append(jnp.mean(best.astype(jnp.float32), axis=-1))
  result = jnp.stack(results, axis=-1)
  return result[..., 0] if isinstance(k, (int, np.integer)) else result


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
      ValueError naming the bad counts). Under jit the counts are tracers and are not checked (no host
      sync): a count above n gives 1.0, a negative one 0.0 and a fractional one the value of the next
      integer, all silently; call `check_counts` inside the jitted function and wrap it with checkify to
      keep the check.
    k: an int, or a sequence of ints, each 1 <= k <= n (static).

  Returns:
    [...] pass@k for an int k, or [..., len(k)] for a sequence.
  """
  n = int(num_samples)
  _check_counts("pass_at_k", n, num_correct)
  ks = _check_ks("pass_at_k", k, max_k=n)
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
  return result[..., 0] if isinstance(k, (int, np.integer)) else result


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


def heldout_summary(num_correct, num_samples: int, ks: Sequence[int]) -> dict[str, float]:
  """Held-out metrics of a set of problems from their correct counts [M] out of `num_samples` samples each.

  Returns (host floats):
    pass@k: the unbiased pass@k (`pass_at_k`) averaged over the M problems, for each k in `ks`;
    pass@k_se: its standard error over problems (std over problems, ddof 1, / sqrt(M)): it covers both the
      choice of problems and the sampling noise within each problem;
    best@k_bootstrap: the expectation of the official code's log metric, the best of k samples drawn WITH
      replacement from the n (`best_at_k_with_replacement`, 1 - (1 - c/n)^k, in float64): biased low against
      pass@k;
    pass_rate: the mean fraction of correct samples; fraction_solved: the fraction of problems with one.
  """
  counts = jnp.asarray(num_correct)
  per_problem = np.asarray(pass_at_k(num_samples, counts, list(ks)), np.float64)  # [M, len(ks)]
  num_problems = per_problem.shape[0]
  se = per_problem.std(axis=0, ddof=1) / np.sqrt(num_problems) if num_problems > 1 else np.zeros(len(ks))
  result = {}
  for i, k in enumerate(ks):
    result[f"pass@{k}"] = float(per_problem[:, i].mean())
    result[f"pass@{k}_se"] = float(se[i])
  fail_rate = 1.0 - np.asarray(counts, np.float64) / num_samples
  for k in ks:
    result[f"best@{k}_bootstrap"] = float(np.mean(1.0 - fail_rate ** k))
  result["pass_rate"] = float(jnp.mean(counts) / num_samples)
  result["fraction_solved"] = float(jnp.mean(counts > 0))
  return result
