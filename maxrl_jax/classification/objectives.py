"""Objectives for classification: exact maximum likelihood and every sampled estimator, from class counts.

A rollout for input x is a class a ~ softmax(logits(x)); its reward is r = 1{a = label}, so the pass rate is
p = softmax(logits)[label] exactly and cross-entropy -log p is exact maximum likelihood.

Count-based surrogate. With N rollouts per input let c_j be how often class j was drawn (sum_j c_j = N) and
K = c_label the number of successes. Every rule of `maxrl_jax.estimators` is permutation-equivariant within
a group, so it gives just two advantages, A_succ(K) for the K successes and A_fail(K) for the N - K failures,
and the per-sample surrogate -(1/N) sum_i A_i log pi(a_i) equals

    loss(x) = -(1/N) [ K A_succ log pi(label) + A_fail sum_{j != label} c_j log pi(j) ],

advantages held constant (stop-gradient). It needs the counts [B, C] only, so the loss costs the same for
N = 4 and N = 4096; only drawing the counts depends on N (`sample_class_counts`: inverse-CDF draws and a
scatter-add, O(B N), or sequential conditional binomials, O(B C) independent of N).

A_succ and A_fail come from the registry's own rule evaluated at group level: the rule is elementwise in
(r, K, N, Q), so calling it with r = [1, 0] and the per-input K gives both values at once, O(B) (O(B T) for
Maclaurin of order T). `per_sample_surrogate_loss` is the reference path on explicit samples, through
`estimators.policy_gradient_loss`; the tests check that both give the same gradient for the same samples.

Losses return per-example values [B]; the caller reduces (the mean over inputs gives the paper's
-(1/(B N)) sum A log pi(a|x)).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from maxrl_jax import estimators

Array = jax.Array

CROSS_ENTROPY = "cross_entropy"
SAMPLERS = ("auto", "categorical", "binomial")
# Above this many rollouts per input, "auto" draws counts with conditional binomials (cost independent of N).
AUTO_CATEGORICAL_MAX_SAMPLES = 65536


def objective_names() -> tuple[str, ...]:
  """cross_entropy and every registered advantage estimator."""
  return (CROSS_ENTROPY,) + tuple(estimators.ADVANTAGE_ESTIMATORS)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A validated training objective.

  Attributes:
    name: 'cross_entropy' or a key of estimators.ADVANTAGE_ESTIMATORS.
    kwargs: the estimator's arguments with defaults filled in (empty for cross_entropy).
    num_samples: N, rollouts per input (unused by cross_entropy).
    sampler: how counts are drawn: 'categorical' or 'binomial' ('auto' resolved).
  """

  name: str
  kwargs: Mapping[str, Any]
  num_samples: int
  sampler: str

  @property
  def sampled(self) -> bool:
    return self.name != CROSS_ENTROPY


def make_objective(name: str, kwargs: Mapping[str, Any] | None, num_samples: int,
                   sampler: str = "auto") -> Objective:
  """Validates an objective and resolves defaults.

  Raises:
    ValueError: unknown name, unknown or invalid kwargs, or a group size N the estimator does not allow (N = 1
      for rloo/grpo/maxrl, order or k > N, ...). The estimator registry's own checks run here, so a config
      error surfaces before any data is loaded.
  """
  kwargs = dict(kwargs or {})
  if isinstance(num_samples, bool) or int(num_samples) != num_samples or num_samples < 1:
    raise ValueError(f"config.rollout.num_samples={num_samples!r} must be an integer >= 1.")
  num_samples = int(num_samples)
  if sampler not in SAMPLERS:
    raise ValueError(f"config.rollout.sampler={sampler!r}; allowed: {list(SAMPLERS)}.")
  if name == CROSS_ENTROPY:
    if kwargs:
      raise ValueError(f"config.objective.kwargs={kwargs!r}: cross_entropy takes no arguments.")
    return Objective(name, {}, num_samples, "none")
  if name not in estimators.ADVANTAGE_ESTIMATORS:
    raise ValueError(f"config.objective.name={name!r}; allowed: {list(objective_names())}.")
  advantage_fn = estimators.get_advantage_fn(name, **kwargs)  # Validates names and kwargs.
  try:  # Group-size checks run at trace time; tracing abstractly costs nothing even for N = 4096.
    jax.eval_shape(advantage_fn, jax.ShapeDtypeStruct((1, num_samples), jnp.float32))
  except ValueError as e:
    hint = " (N = 1 is only meaningful for reinforce and maclaurin/pkpo of order 1)" if num_samples == 1 else ""
    raise ValueError(f"config.rollout.num_samples={num_samples} is invalid for objective {name!r}{hint}: "
                     f"{e}") from e
  full = {**estimators.ADVANTAGE_ESTIMATORS[name].kwargs, **kwargs}
  for key in ("order", "k"):
    if key in full:
      full[key] = int(full[key])
  if sampler == "auto":
    sampler = "categorical" if num_samples <= AUTO_CATEGORICAL_MAX_SAMPLES else "binomial"
  return Objective(name, full, num_samples, sampler)


# ----------------------------------------------------------------------------------------------------------
# Drawing rollouts.


def sample_classes(key: Array, logits_BxC: Array, num_samples: int) -> Array:
  """N classes per input drawn from softmax(logits), by inverse-CDF lookup.

  Args:
    key: PRNG key.
    logits_BxC: [B, C] logits (gradients are not needed and are stopped).
    num_samples: N (static).

  Returns:
    int32 [B, N] class ids. Exact up to float32 rounding of the cumulative probabilities.
  """
  probs_BxC = jax.nn.softmax(jax.lax.stop_gradient(logits_BxC).astype(jnp.float32), axis=-1)
  cdf_BxC = jnp.cumsum(probs_BxC, axis=-1)
  uniforms_BxN = jax.random.uniform(key, (logits_BxC.shape[0], num_samples)) * cdf_BxC[:, -1:]
  samples = jax.vmap(lambda cdf, u: jnp.searchsorted(cdf, u, side="right"))(cdf_BxC, uniforms_BxN)
  return jnp.minimum(samples, logits_BxC.shape[-1] - 1).astype(jnp.int32)


def counts_from_samples(samples_BxN: Array, num_classes: int) -> Array:
  """int32 [B, C] class counts of [B, N] samples (a scatter-add, no [B, N, C] one-hot)."""
  batch = samples_BxN.shape[0]
  rows = jnp.broadcast_to(jnp.arange(batch)[:, None], samples_BxN.shape)
  return jnp.zeros((batch, num_classes), jnp.int32).at[rows, samples_BxN].add(1)


def sample_counts_binomial(key: Array, logits_BxC: Array, num_samples: int) -> Array:
  """Multinomial(N, softmax(logits)) counts by sequential conditional binomials, cost independent of N.

  c_j ~ Binomial(N - sum_{i<j} c_i, p_j / sum_{i>=j} p_i), the last class takes the rest. The suffix sums
  are accumulated from the tail, so tiny probabilities keep their relative precision.

  Returns:
    int32 [B, C] counts, each row summing to N exactly.
  """
  probs_BxC = jax.nn.softmax(jax.lax.stop_gradient(logits_BxC).astype(jnp.float32), axis=-1)
  suffix_BxC = jnp.flip(jnp.cumsum(jnp.flip(probs_BxC, -1), -1), -1)
  conditional_BxC = jnp.clip(probs_BxC / jnp.maximum(suffix_BxC, 1e-30), 0.0, 1.0)
  conditional_BxC = conditional_BxC.at[:, -1].set(1.0)
  keys = jax.random.split(key, logits_BxC.shape[-1])

  def draw(remaining_B, inputs):
    class_key, prob_B = inputs
    count_B = jax.random.binomial(class_key, remaining_B, prob_B)
    count_B = jnp.minimum(jnp.round(count_B), remaining_B)
    return remaining_B - count_B, count_B

  remaining = jnp.full((logits_BxC.shape[0],), float(num_samples), jnp.float32)
  _, counts_CxB = jax.lax.scan(draw, remaining, (keys, conditional_BxC.T))
  return counts_CxB.T.astype(jnp.int32)


def sample_class_counts(key: Array, logits_BxC: Array, num_samples: int, method: str = "categorical") -> Array:
  """int32 [B, C] counts of N rollouts per input drawn from softmax(logits) ('categorical' or 'binomial')."""
  if method == "categorical":
    return counts_from_samples(sample_classes(key, logits_BxC, num_samples), logits_BxC.shape[-1])
  if method == "binomial":
    return sample_counts_binomial(key, logits_BxC, num_samples)
  raise ValueError(f"sample_class_counts: method={method!r}; allowed: 'categorical', 'binomial'.")


# ----------------------------------------------------------------------------------------------------------
# Advantages and losses.


def success_failure_advantages(objective: Objective, num_successes_B: Array) -> tuple[Array, Array]:
  """The two advantages of a group with K successes out of N, from the registry's rule.

  Args:
    objective: a sampled objective (from make_objective).
    num_successes_B: [B] K per input (int or float), 0 <= K <= N.

  Returns:
    (adv_succ [B], adv_fail [B]) float32; adv_succ is 0 where K = 0 and adv_fail is 0 where K = N (those
    values multiply zero counts and are set to 0 so that no inf/NaN can leak into the loss).
  """
  spec = estimators.ADVANTAGE_ESTIMATORS[objective.name]
  k_Bx1 = jnp.asarray(num_successes_B, jnp.float32)[:, None]
  n = jnp.asarray(objective.num_samples, jnp.float32)
  rewards_2 = jnp.array([1.0, 0.0], jnp.float32)  # One success slot, one failure slot.
  # Binary rewards: Q = sum r^2 = K.
  adv_Bx2 = spec.rule(rewards_2, k_Bx1, n, k_Bx1, **objective.kwargs)
  adv_Bx2 = jnp.broadcast_to(adv_Bx2, (k_Bx1.shape[0], 2)).astype(jnp.float32)
  k_B = k_Bx1[:, 0]
  adv_succ = jnp.where(k_B > 0, adv_Bx2[:, 0], 0.0)
  adv_fail = jnp.where(k_B < n, adv_Bx2[:, 1], 0.0)
  return adv_succ, adv_fail


def count_surrogate_loss(logits_BxC: Array, labels_B: Array, counts_BxC: Array, adv_succ_B: Array,
                         adv_fail_B: Array, num_samples: int) -> Array:
  """Per-input surrogate -(1/N) [K A_succ log pi(label) + A_fail sum_{j != label} c_j log pi(j)].

  Args:
    logits_BxC: [B, C] logits (differentiable).
    labels_B: [B] int labels.
    counts_BxC: [B, C] counts of the N rollouts (K = counts[label]).
    adv_succ_B, adv_fail_B: [B] advantages (held constant).
    num_samples: N.

  Returns:
    [B] losses; d(mean)/d(theta) is minus the estimator's gradient (1/B) sum_x (1/N) sum_i A_i S_i.
  """
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  is_label = jax.nn.one_hot(labels_B, logits_BxC.shape[-1], dtype=jnp.bool_)
  adv_BxC = jnp.where(is_label, adv_succ_B[:, None], adv_fail_B[:, None])
  weights_BxC = jax.lax.stop_gradient(adv_BxC * counts_BxC.astype(jnp.float32))
  return -jnp.sum(weights_BxC * logp_BxC, axis=-1) / num_samples


def cross_entropy_loss(logits_BxC: Array, labels_B: Array) -> Array:
  """[B] -log softmax(logits)[label] (exact maximum likelihood: -log p)."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BxC, labels_B[:, None], axis=-1)[:, 0]


def per_sample_surrogate_loss(logits_BxC: Array, labels_B: Array, samples_BxN: Array,
                              objective: Objective) -> Array:
  """Reference: the surrogate on explicit samples, via estimators.get_advantage_fn and policy_gradient_loss.

  Materialises [B, N] rewards and advantages; use for tests and small N only.

  Returns:
    Scalar loss -(1/(B N)) sum A_i log pi(a_i | x) (the mean over inputs of the count-based loss).
  """
  rewards_BxN = (samples_BxN == labels_B[:, None]).astype(jnp.float32)
  advantages_BxN = estimators.get_advantage_fn(objective.name, **objective.kwargs)(rewards_BxN)
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  logp_BxNx1 = jnp.take_along_axis(logp_BxC, samples_BxN, axis=-1)[..., None]
  return estimators.policy_gradient_loss(logp_BxNx1, jnp.ones_like(logp_BxNx1, bool), advantages_BxN,
                                         reduction="sequence_sum")


def objective_loss(objective: Objective, logits_BxC: Array, labels_B: Array,
                   key: Array) -> tuple[Array, dict[str, Array]]:
  """Per-input training loss of an objective, drawing the rollouts from the (stopped) logits.

  Returns:
    (loss [B], aux) where aux holds [B] arrays: for sampled objectives `num_successes` (K), `adv_succ`,
    `adv_fail`; empty for cross_entropy.
  """
  if not objective.sampled:
    return cross_entropy_loss(logits_BxC, labels_B), {}
  counts_BxC = sample_class_counts(key, logits_BxC, objective.num_samples, objective.sampler)
  k_B = jnp.take_along_axis(counts_BxC, labels_B[:, None], axis=-1)[:, 0]
  adv_succ, adv_fail = success_failure_advantages(objective, k_B)
  loss_B = count_surrogate_loss(logits_BxC, labels_B, counts_BxC, adv_succ, adv_fail, objective.num_samples)
  return loss_B, {"num_successes": k_B, "adv_succ": adv_succ, "adv_fail": adv_fail}


__all__ = ["CROSS_ENTROPY", "SAMPLERS", "Objective", "objective_names", "make_objective", "sample_classes",
           "counts_from_samples", "sample_counts_binomial", "sample_class_counts",
           "success_failure_advantages", "count_surrogate_loss", "cross_entropy_loss",
           "per_sample_surrogate_loss", "objective_loss"]
