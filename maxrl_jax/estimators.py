"""Advantage estimators for binary-reward policy gradients, and the tools to audit them.

Notation (per prompt x): the policy samples a group of N rollouts z_1..z_N, a binary verifier returns
r_i in {0, 1}; K = sum_i r_i successes, F = N - K failures, mu = K / N, p = P(r = 1 | x) the pass rate and
S_i = grad log pi(z_i | x) the score. Every estimator here is a rule for the advantages A_1..A_N of one group,
and the per-prompt gradient estimate always has the same scale:

    g_hat = (1/N) sum_i A_i S_i.

Its expectation is a population weighting E[g_hat] = w(p) grad p, and w identifies the objective:
w = 1 is RL (E[p]), w = 1/p is maximum likelihood (E[log p]) and w_T = (1 - (1-p)^T) / p is MaxRL of order T,
the truncated Maclaurin series J_T = -sum_{k=1..T} (1-p)^k / k (Tajwar et al., 2026, arXiv 2602.02710).
`expected_weight` computes the exact w(p) that any rule implies, by enumerating K ~ Binomial(N, p).

| name        | A_i                                                       | unbiased for              |
|-------------|-----------------------------------------------------------|---------------------------|
| reinforce   | r_i                                                       | grad E[p]                 |
| rloo        | N/(N-1) (r_i - mu)                                        | grad E[p]                 |
| dr_grpo     | r_i - mu                                                  | (N-1)/N grad E[p]         |
| grpo        | (r_i - mu) / (std + eps)                                  | no J_T (~1/sqrt(p(1-p)))  |
| maxrl       | (r_i - mu) / mu, 0 when K = 0                             | grad J_{N-1}              |
| maxrl, zero_failed_groups=False | r_i N / K - 1, -1 when K = 0          | grad J_N                  |
| maxrl, reward_type="nonnegative" | (r_i - mu)/mu for real r_i >= 0, 0 when mu = 0 | grad log E[r], as N -> inf |
| maclaurin T | 1 for successes, -sum_{k=2..min(T,F)} C(F-1,k-1)/C(N-1,k-1) for failures | grad J_T |
| pkpo k      | k r_i C(F, k-1) / C(N-1, k-1) (+ leave-one-out baseline)  | grad pass@k               |

The authors' code (a verl fork) differs in three places; each form is selectable, ours stays the default:

  pkpo, form="official": A_i = s_i - mean_{j != i} s_j with s_i = r_i C(F,k-1)/C(N-1,k-1) and no factor k.
    The baseline depends on r_i (through F), so it is biased for k > 1.
  maclaurin, cap_order_at_n=True: an order T > N means T = N (ours raises); unbiased for grad J_N then.
  grpo, population_std=True: the group variance divided by N, not N - 1 (Differential Smoothing's GRPO part).

(The official Maclaurin advantages are ours divided by N; with Adam only the loss scale differs.)

Conventions. Dense functions take rewards `[..., N]` with the group on the last axis and any leading axes,
and return advantages of the same shape in float32 (float64 for float64 input). Group statistics come from
sums of the rewards (integer counts for binary rewards), never from a floating std of 0/1 values. The grouped
form (`grouped_advantages`) takes flat rewards `[R]` with integer `group_ids [R]` for ragged or interleaved
rollouts and gives the same numbers.

Validation. Static properties (the group size N, the order T, k) are checked when the function is traced, so
they raise a ValueError under `jax.jit` too. Reward *values* are checked in eager calls: every rule raises a
ValueError on NaN or inf rewards, the MaxRL (reward_type="binary", the default), Maclaurin and PKPO rules also
on rewards other than 0 and 1, and MaxRL with reward_type="nonnegative" on negative rewards. Under `jax.jit`
or `jax.vmap` the rewards are tracers and these eager checks are skipped (raising would need a host sync);
instead every group that holds a reward the rule does not accept gets NaN advantages (the whole group: its
statistics are wrong for every member), while the other groups are unchanged. A NaN advantage makes the
policy-gradient loss NaN, so a trainer's non-finite-loss stop catches it instead of training on silently wrong
advantages. `invalid_reward_groups(name, rewards)` says which groups those are and
`binary_reward_violation(rewards)` whether any reward is not 0 or 1 (both jittable, e.g. as step metrics). To
raise inside jit instead, call `check_rewards(name, rewards)` in the jitted function and wrap it with
`jax.experimental.checkify.checkify`.

Non-binary rewards. A verifier that gives partial credit (r_i >= 0 real) needs a rule built for it: MaxRL with
reward_type="nonnegative" is A_i = (r_i - mu) / mu with mu the group's mean reward (0 where mu = 0). The
binary-only rules count successes, and a fractional "count" makes their advantages meaningless: at rewards
[0.5, 0.25, 0, 0], taking K = 0.75 as a count of at least one success gives [1, 0, -1, -1], where
(r - mu) / mu is [1.67, 0.33, -1, -1]; a group mean near 0 or below flips the sign or blows it up. This is
why those rules refuse such rewards (eagerly) or poison their group (under jit).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
AdvantageFn = Callable[[Array], Array]

__all__ = [
    "reinforce_advantages",
    "rloo_advantages",
    "dr_grpo_advantages",
    "grpo_advantages",
    "maxrl_advantages",
    "maclaurin_advantages",
    "pkpo_advantages",
    "grouped_advantages",
    "apply_differential_smoothing",
    "check_rewards",
    "binary_reward_violation",
    "invalid_reward_groups",
    "reward_domain",
    "reward_requirement",
    "REWARD_TYPES",
    "apply_self_filter",
    "get_advantage_fn",
    "ADVANTAGE_ESTIMATORS",
    "weight_function",
    "truncated_objective",
    "expected_weight",
    "policy_gradient_loss",
    "reduce_tokens",
    "token_entropy",
    "per_prompt_gradient_norms",
    "REDUCTIONS",
]


# --------------------------------------------------------------------------------------------------
# Rules: each maps (r, K, N, Q) to advantages, where r are the rewards and K = sum r, N = group size,
# Q = sum r^2 are the group's sums broadcast against r. Dense and grouped forms share these rules.
# --------------------------------------------------------------------------------------------------


def _float_dtype(x: Array) -> jnp.dtype:
  return jnp.promote_types(jnp.asarray(x).dtype, jnp.float32)


def _reinforce_rule(r, K, N, Q):
  del K, N, Q
  return r


def _rloo_rule(r, K, N, Q):
  del Q
  return N / (N - 1) * (r - K / N)


def _dr_grpo_rule(r, K, N, Q):
  del Q
  return r - K / N


def _grpo_rule(r, K, N, Q, *, eps: float = 1e-6, population_std: bool = False):
  mean = K / N
  # Unbiased (Bessel) group variance from sums; for binary rewards Q = K and this is K (N - K) / (N (N-1)).
  # population_std divides by N instead (the official Differential Smoothing's GRPO part).
  var = jnp.maximum(Q - K * mean, 0.0) / (N if population_std else N - 1)
  return (r - mean) / (jnp.sqrt(var) + eps)


def _maxrl_rule(r, K, N, Q, *, zero_failed_groups: bool = True, reward_type: str = "binary"):
  del Q
  if reward_type == "binary":
    safe_K = jnp.maximum(K, 1.0)
    adv = r * (N / safe_K) - 1.0  # == (r - mu) / mu when K >= 1.
  else:
    # Real K = sum r > 0: (r / K) * N - 1 == (r - mu) / mu. r_i <= K, so r_i / K lies in [0, 1] and a tiny mean
    # cannot overflow it (N / K could); A_i lies in [-1, N - 1].
    safe_K = jnp.where(K > 0, K, jnp.ones_like(K))
    adv = (r / safe_K) * N - 1.0
  if zero_failed_groups:
    adv = jnp.where(K > 0, adv, jnp.zeros_like(adv))
  return adv


def _ratio_products(top, N, num_factors: int):
  """prod_{m=0..j-1} (top - m) / (N - 1 - m) for j = 1..num_factors, shape [..., num_factors].

  With top = F - 1 this is C(F-1, j) / C(N-1, j); once top - m hits 0 every later product is 0, which is
  exactly C(a, j) = 0 for j > a. All factors lie in [0, 1] for valid inputs, so the cumulative product is
  stable in float32 for N in the thousands.
  """
  m = jnp.arange(num_factors, dtype=top.dtype)
  factors = (top[..., None] - m) / jnp.maximum(N[..., None] - 1.0 - m, 1.0)
  factors = jnp.maximum(factors, 0.0)  # Inputs outside the support (e.g. F = 0) contribute zeros.
  return jnp.cumprod(factors, axis=-1)


def _maclaurin_rule(r, K, N, Q, *, order: int, cap_order_at_n: bool = False):
  # Terms k > N vanish (C(F-1, k-1) = 0 for k > F), so an order above N is the order-N rule: capping needs
  # nothing here, only the check that refuses it by default (`_check_group_size`).
  del Q, cap_order_at_n
  if order == 1:
    return r
  F = N - K
  # sum_{k=2..T} C(F-1, k-1) / C(N-1, k-1) = sum_{j=1..T-1} C(F-1, j) / C(N-1, j).
  ratios = _ratio_products(F - 1.0, N * jnp.ones_like(F), order - 1)
  failure_adv = -jnp.sum(ratios, axis=-1)
  return jnp.where(r > 0.5, jnp.ones_like(failure_adv), failure_adv)


def _comb_ratio(top, N, j: int):
  """C(top, j) / C(N - 1, j) for a static j >= 0 (1 when j = 0; 0 when top < j)."""
  if j == 0:
    return jnp.ones_like(top)
  return _ratio_products(top, N * jnp.ones_like(top), j)[..., -1]


def _pkpo_rule(r, K, N, Q, *, k: int, baseline: bool = True, form: str = "unbiased"):
  del Q
  F = N - K
  # A group of one rollout has no other rollouts to build a leave-one-out baseline from: it gets none (the
  # official code does the same), and the divisions by N - 1 below are guarded.
  has_others = N > 1
  others = jnp.maximum(N - 1.0, 1.0)
  if form == "official":
    # s_i = r_i C(F, k-1)/C(N-1, k-1) (no factor k), A_i = s_i - mean_{j != i} s_j. The baseline uses the
    # other rollouts' s_j, which depend on r_i through F, so it is biased for k > 1.
    c = _comb_ratio(F, N, k - 1)
    if not baseline:
      return r * c
    return jnp.where(has_others, jnp.where(r > 0.5, c * F / others, -c * K / others), r * c)
  if not baseline:
    # A_i = k r_i C(F, k-1) / C(N-1, k-1): for a success the other N-1 rollouts hold all F failures, and
    # C(F, k-1) / C(N-1, k-1) is the unbiased estimate of (1-p)^(k-1) from them.
    return k * r * _comb_ratio(F, N, k - 1)
  # A_i = k g_i (r_i - b_i), with g_i = C(F_{-i}, k-1)/C(N-1, k-1) and b_i = K_{-i}/(N-1) both computed from
  # the other N-1 rollouts only, so E[g_i b_i S_i] = 0 and the expectation is unchanged; k = 1 gives RLOO.
  success_adv = k * _comb_ratio(F, N, k - 1) * F / others
  failure_adv = -k * _comb_ratio(F - 1.0, N, k - 1) * K / others
  return jnp.where(has_others, jnp.where(r > 0.5, success_adv, failure_adv), k * r * _comb_ratio(F, N, k - 1))


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
  """A registered advantage rule.

  Attributes:
    rule: (r, K, N, Q, **kwargs) -> advantages, elementwise with broadcasting.
    binary_rewards: whether rewards must be 0/1 (for maxrl: unless reward_type="nonnegative"; see
      `reward_domain`).
    min_group_size: smallest N for which the rule is meaningful.
    kwargs: allowed keyword arguments and their defaults.
    unbiased_for: human-readable target, used in docs and the audit.
  """

  rule: Callable[..., Array]
  binary_rewards: bool
  min_group_size: int
  kwargs: Mapping[str, Any]
  unbiased_for: str


# Reward types of MaxRL: 0/1 rewards (the paper's setting), or partial credit r >= 0.
REWARD_TYPES = ("binary", "nonnegative")

ADVANTAGE_ESTIMATORS: dict[str, EstimatorSpec] = {
    "reinforce": EstimatorSpec(_reinforce_rule, False, 1, {}, "grad J_1 = grad E[p]"),
    "rloo": EstimatorSpec(_rloo_rule, False, 2, {}, "grad J_1 = grad E[p]"),
    "dr_grpo": EstimatorSpec(_dr_grpo_rule, False, 2, {}, "(N-1)/N grad J_1"),
    "grpo": EstimatorSpec(_grpo_rule, False, 2, {"eps": 1e-6, "population_std": False},
                          "no J_T; w ~ 1/sqrt(p(1-p))"),
    "maxrl": EstimatorSpec(
        _maxrl_rule, True, 2, {"zero_failed_groups": True, "reward_type": "binary"},
        "grad J_{N-1} (grad J_N with zero_failed_groups=False); reward_type='nonnegative': consistent for "
        "grad log E[r]"),
    "maclaurin": EstimatorSpec(_maclaurin_rule, True, 1, {"order": None, "cap_order_at_n": False},
                               "grad J_T, T = order (T = min(order, N) with cap_order_at_n)"),
    "pkpo": EstimatorSpec(_pkpo_rule, True, 1, {"k": None, "baseline": True, "form": "unbiased"},
                          "grad pass@k (form='official': biased, see pkpo_advantages)"),
}


def _check_kwargs(name: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(
        f"Unknown advantage estimator {name!r}. Allowed: {sorted(ADVANTAGE_ESTIMATORS)}.")
  spec = ADVANTAGE_ESTIMATORS[name]
  unknown = set(kwargs) - set(spec.kwargs)
  if unknown:
    raise ValueError(
        f"Estimator {name!r} got unknown argument(s) {sorted(unknown)}; it takes "
        f"{sorted(spec.kwargs) or 'no arguments'}.")
  full = {**spec.kwargs, **kwargs}
  for key in ("order", "k"):
    if key in full:
      value = full[key]
      if value is None:
        raise ValueError(f"Estimator {name!r} needs the integer argument {key!r} (>= 1).")
      if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"Estimator {name!r}: {key}={value!r} must be an integer >= 1.")
      full[key] = int(value)
  if "eps" in full and not full["eps"] >= 0:
    raise ValueError(f"Estimator {name!r}: eps={full['eps']!r} must be >= 0.")
  if "form" in full and full["form"] not in ("unbiased", "official"):
    raise ValueError(f"Estimator {name!r}: form={full['form']!r}; allowed: 'unbiased', 'official'.")
  if "reward_type" in full and full["reward_type"] not in REWARD_TYPES:
    raise ValueError(f"Estimator {name!r}: reward_type={full['reward_type']!r}; allowed: "
                     f"{', '.join(map(repr, REWARD_TYPES))}.")
  for key in ("zero_failed_groups", "baseline", "cap_order_at_n", "population_std"):
    if key in full and not isinstance(full[key], (bool, np.bool_)):
      raise ValueError(f"Estimator {name!r}: {key}={full[key]!r} must be True or False.")
    if key in full:
      full[key] = bool(full[key])
  return full


def _check_group_size(name: str, group_size: int, kwargs: Mapping[str, Any]) -> None:
  spec = ADVANTAGE_ESTIMATORS[name]
  if group_size < spec.min_group_size:
    raise ValueError(
        f"Estimator {name!r} needs at least {spec.min_group_size} rollouts per prompt, got N = "
        f"{group_size}" + (" (with N = 1 the MaxRL advantage is identically 0)." if name == "maxrl" else "."))
  for key, what in (("order", "the Maclaurin order T"), ("k", "pass@k's k")):
    if key == "order" and kwargs.get("cap_order_at_n"):
      continue  # The official behaviour: an order above N means N.
    if key in kwargs and kwargs[key] > group_size:
      raise ValueError(
          f"Estimator {name!r}: {what} = {kwargs[key]} exceeds the group size N = {group_size}; an "
          f"unbiased estimate needs {key} <= N. Use more rollouts per prompt or a smaller {key}"
          + (", or cap_order_at_n=True to use order N (the official code's behaviour)." if key == "order"
             else "."))


def reward_domain(name: str, **kwargs) -> str:
  """The rewards a registered rule accepts: "real" (any finite value), "binary" (0 or 1) or "nonnegative".

  Args:
    name: a key of ADVANTAGE_ESTIMATORS.
    **kwargs: the rule's arguments; only maxrl's `reward_type` changes the answer.
  """
  if name not in ADVANTAGE_ESTIMATORS:
    raise ValueError(f"Unknown advantage estimator {name!r}. Allowed: {sorted(ADVANTAGE_ESTIMATORS)}.")
  spec = ADVANTAGE_ESTIMATORS[name]
  unknown = set(kwargs) - set(spec.kwargs)
  if unknown:
    raise ValueError(f"Estimator {name!r} got unknown argument(s) {sorted(unknown)}; it takes "
                     f"{sorted(spec.kwargs) or 'no arguments'}.")
  if "reward_type" in spec.kwargs:
    reward_type = kwargs.get("reward_type", spec.kwargs["reward_type"])
    if reward_type not in REWARD_TYPES:
      raise ValueError(f"Estimator {name!r}: reward_type={reward_type!r}; allowed: "
                       f"{', '.join(map(repr, REWARD_TYPES))}.")
    return reward_type
  return "binary" if spec.binary_rewards else "real"


def reward_requirement(name: str, **kwargs) -> str:
  """One sentence on the rewards a registered rule needs and what happens to other ones (for messages)."""
  domain = reward_domain(name, **kwargs)
  if domain == "real":
    return (f"Estimator {name!r} needs finite rewards; a group with a NaN or inf reward gets NaN advantages "
            "under jit.")
  if domain == "binary":
    partial = (" For partial-credit rewards (r >= 0) use maxrl with reward_type='nonnegative'."
               if name == "maxrl" else " For partial-credit rewards (r >= 0) use maxrl with "
               "reward_type='nonnegative', or threshold the verifier's output.")
    return (f"Estimator {name!r} needs binary rewards (0 or 1); a group with any other reward gets NaN "
            f"advantages under jit.{partial}")
  return (f"Estimator {name!r} with reward_type='nonnegative' needs finite rewards >= 0; a group with a "
          "negative or non-finite reward gets NaN advantages under jit.")


def _accepted(domain: str, r: Array) -> Array:
  """Elementwise bool: reward r lies in `domain` ("real": finite; "binary": 0 or 1; "nonnegative": >= 0)."""
  if domain == "binary":
    return (r == 0) | (r == 1)  # False for NaN and inf.
  ok = jnp.isfinite(r)
  return ok & (r >= 0) if domain == "nonnegative" else ok


def binary_reward_violation(rewards: Array) -> Array:
  """bool scalar: some reward is not exactly 0 or 1 (a fraction, a negative value, NaN or inf).

  Jittable and vmappable (under vmap: one bool per mapped element), for a step metric such as
  `nonbinary_rewards`: the binary rules (maxrl, maclaurin, pkpo) give NaN advantages to such groups.

  Args:
    rewards: any shape.
  """
  r = jnp.asarray(rewards)
  return jnp.logical_not(jnp.all(_accepted("binary", r)))


def invalid_reward_groups(name: str, rewards: Array, **kwargs) -> Array:
  """bool [...]: the groups whose advantages the named rule makes NaN under jit (a reward it does not accept).

  Args:
    name: a key of ADVANTAGE_ESTIMATORS.
    rewards: [..., N], the group on the last axis.
    **kwargs: the rule's arguments (maxrl's reward_type matters).

  Returns:
    [...] bool, True for a group holding a non-finite reward, or (per `reward_domain`) a reward other than 0/1
    or a negative one. Jittable and vmappable; jnp.sum of it counts the refused groups.
  """
  domain = reward_domain(name, **kwargs)
  r = jnp.asarray(rewards)
  if r.ndim < 1:
    raise ValueError("rewards must have shape [..., N] with the group on the last axis, got a scalar.")
  return jnp.logical_not(jnp.all(_accepted(domain, r), axis=-1))


def _check_reward_values(name: str, rewards: Array, kwargs: Mapping[str, Any]) -> None:
  """Eager value checks of rewards: finite for every rule, 0/1 for the binary ones, >= 0 for "nonnegative".

  Skipped when the rewards are traced (under jit there are no values to look at without a host sync); the
  rule then NaN-poisons the refused groups (`_poison`), and `check_rewards` inside a
  `jax.experimental.checkify.checkify`-wrapped function raises there instead.
  """
  if isinstance(rewards, jax.core.Tracer):
    return
  values = np.asarray(jax.device_get(rewards), dtype=np.float64)
  if not np.all(np.isfinite(values)):
    bad = values[~np.isfinite(values)]
    raise ValueError(
        f"Estimator {name!r} got non-finite rewards (e.g. {bad[:3].tolist()}); the advantages of their "
        "groups would be NaN. Fix the verifier or reward function so every reward is a finite number.")
  domain = reward_domain(name, **kwargs)
  if domain == "binary" and not np.all((values == 0.0) | (values == 1.0)):
    bad = values[(values != 0.0) & (values != 1.0)]
    hint = (" For partial-credit rewards (r >= 0) use reward_type='nonnegative' (A = (r - mean) / mean)."
            if name == "maxrl" else " Or use maxrl with reward_type='nonnegative' for partial-credit rewards.")
    raise ValueError(
        f"Estimator {name!r} needs binary rewards in {{0, 1}}, got values such as {bad[:3].tolist()}. "
        "Threshold or rescale the verifier's output; with non-binary rewards the group's sum is not a "
        f"success count, and the advantage explodes or flips sign.{hint}")
  if domain == "nonnegative" and np.any(values < 0):
    bad = values[values < 0]
    raise ValueError(
        f"Estimator {name!r} with reward_type='nonnegative' needs rewards >= 0, got values such as "
        f"{bad[:3].tolist()}: a group mean near 0 or below flips the sign of (r - mean) / mean or blows it up. "
        "Shift or rescale the rewards to be >= 0 (or use a rule for real rewards: rloo, grpo, dr_grpo).")


def check_rewards(name: str, rewards: Array, **kwargs) -> None:
  """The reward checks of the estimators, for use under jit through `jax.experimental.checkify`.

  In eager calls the estimators raise a ValueError; traced (jit, vmap), they skip that check and give NaN
  advantages to the groups they refuse. To raise under jit instead, call this inside the function and wrap it:

      def step(rewards):
        estimators.check_rewards("maxrl", rewards)
        return estimators.maxrl_advantages(rewards)
      err, adv = checkify.checkify(jax.jit(step))(rewards)
      err.throw()   # JaxRuntimeError naming the failed check

  Checks: every reward finite; for the binary rules (maxrl, maclaurin, pkpo) every reward 0 or 1; for maxrl
  with reward_type="nonnegative" (pass it here too) every reward >= 0.
  """
  from jax.experimental import checkify  # pylint: disable=import-outside-toplevel

  domain = reward_domain(name, **kwargs)
  r = jnp.asarray(rewards)
  checkify.check(jnp.all(jnp.isfinite(r)), f"Estimator {name!r} got non-finite rewards.")
  if domain == "binary":
    checkify.check(jnp.all((r == 0) | (r == 1)), f"Estimator {name!r} needs binary rewards (0 or 1).")
  if domain == "nonnegative":
    checkify.check(jnp.all(r >= 0), f"Estimator {name!r} with reward_type='nonnegative' needs rewards >= 0.")


def _poison(advantages: Array, group_ok: Array) -> Array:
  """NaN for the advantages of groups that are not ok; the others unchanged (bit for bit)."""
  return jnp.where(group_ok, advantages, jnp.asarray(jnp.nan, advantages.dtype))


def _dense(name: str, rewards: Array, **kwargs) -> Array:
  kwargs = _check_kwargs(name, kwargs)
  rewards = jnp.asarray(rewards)
  if rewards.ndim < 1:
    raise ValueError("rewards must have shape [..., N] with the group on the last axis, got a scalar.")
  _check_group_size(name, rewards.shape[-1], kwargs)
  _check_reward_values(name, rewards, kwargs)
  r = rewards.astype(_float_dtype(rewards))
  K = jnp.sum(r, axis=-1, keepdims=True)
  Q = jnp.sum(r * r, axis=-1, keepdims=True)
  N = jnp.asarray(rewards.shape[-1], r.dtype)
  advantages = ADVANTAGE_ESTIMATORS[name].rule(r, K, N, Q, **kwargs)
  group_ok = jnp.all(_accepted(reward_domain(name, **kwargs), r), axis=-1, keepdims=True)
  return _poison(advantages, group_ok)


def reinforce_advantages(rewards: Array) -> Array:
  """REINFORCE: A_i = r_i.

  Args:
    rewards: [..., N] rewards of each group (any real values).

  Returns:
    [..., N] advantages. E[(1/N) sum_i A_i S_i] = grad p: unbiased for the RL objective J_1 = E[p]
    (weight w(p) = 1).
  """
  return _dense("reinforce", rewards)


def rloo_advantages(rewards: Array) -> Array:
  """REINFORCE with a leave-one-out baseline: A_i = r_i - mean_{j != i} r_j = N/(N-1) (r_i - mu).

  Args:
    rewards: [..., N] rewards (any real values), N >= 2.

  Returns:
    [..., N] advantages; unbiased for grad E[p] (the baseline uses only the other rollouts).
  """
  return _dense("rloo", rewards)


def dr_grpo_advantages(rewards: Array) -> Array:
  """Dr. GRPO: A_i = r_i - mu (group mean baseline, no std normalisation).

  Args:
    rewards: [..., N] rewards (any real values), N >= 2.

  Returns:
    [..., N] advantages; E = (N-1)/N grad p, i.e. RL up to a constant factor (the baseline includes r_i).
  """
  return _dense("dr_grpo", rewards)


def grpo_advantages(rewards: Array, eps: float = 1e-6, population_std: bool = False) -> Array:
  """GRPO: A_i = (r_i - mu) / (std + eps), std the Bessel-corrected group standard deviation.

  The std comes from group sums (variance K (N-K) / (N (N-1)) for binary rewards), so groups with K = 0 or
  K = N get advantage exactly 0 and no NaN/inf.

  Args:
    rewards: [..., N] finite rewards (any real values), N >= 2; NaN/inf raise a ValueError in eager calls
      (under jit the group gets NaN advantages; see `check_rewards`).
    eps: added to the std.
    population_std: divide the group variance by N instead of N - 1 (variance K (N-K) / N^2 for binary
      rewards), as the official Differential Smoothing's GRPO part does. The advantages then grow by the
      factor sqrt(N/(N-1)) (up to eps): 1.41 at N = 2, 1.004 at N = 128. Neither form is unbiased for a J_T.

  Returns:
    [..., N] advantages. Unbiased for none of the J_T: for large N the implied weight approaches
    1/sqrt(p(1-p)), which grows again as p -> 1 (it up-weights very easy prompts).
  """
  return _dense("grpo", rewards, eps=eps, population_std=population_std)


def maxrl_advantages(rewards: Array, zero_failed_groups: bool = True, reward_type: str = "binary") -> Array:
  """MaxRL (Algorithm 1 of the paper): A_i = (r_i - mu) / mu = r_i N / K - 1, and 0 when K = 0.

  With K = sum_i r_i and mu = K / N, the estimate (1/N) sum_i A_i S_i = (1/K) sum_i r_i S_i - (1/N) sum_i S_i
  averages the score over the rollouts weighted by their reward, with the group-mean score as a control
  variate.

  reward_type="binary" (default): rewards r_i in {0, 1}, K the number of successes. Unbiased for grad J_{N-1}
    (see zero_failed_groups); in exact arithmetic the numbers are those of the paper.
  reward_type="nonnegative": partial-credit rewards r_i >= 0 (e.g. a verifier's score in [0, 1]), with the
    same formula on the real sum K: A_i = (r_i - mu) / mu, 0 for every rollout of a group with mu = 0 (all
    rewards 0). A_i lies in [-1, N - 1] however small mu is, and the rule is invariant to rescaling the
    rewards (r -> c r, c > 0). For non-binary rewards the estimate is the self-normalised (ratio) estimator
    of grad log E[r] = grad E[r] / E[r], the maximum-likelihood gradient of a partial-credit objective:
    consistent as N -> infinity, biased at finite N (no exact order T exists there). On 0/1 rewards it is the
    binary rule (equal up to float rounding, so its expectation is the same grad J_{N-1}).

  Examples (N = 4): rewards [1, 0, 0, 1] -> [1, -1, -1, 1] with either type; rewards [0.5, 0.25, 0, 0] with
  reward_type="nonnegative" -> [5/3, 1/3, -1, -1] (the binary type refuses them: a ValueError in eager
  calls, NaN advantages under jit).

  Args:
    rewards: [..., N] rewards, N >= 2: binary, or >= 0 with reward_type="nonnegative". Checked eagerly (a
      ValueError otherwise); under jit or vmap a group holding a refused reward (NaN, inf, a non-binary one, or
      a negative one for "nonnegative") gets NaN advantages, the other groups are unaffected (see
      `invalid_reward_groups`, and `check_rewards` to raise there through checkify).
    zero_failed_groups: if True (the paper's rule) groups without a success get advantage 0. Dropping the
      control variate there removes E[(1/N) sum_i S_i 1{K=0}] = -(1-p)^(N-1) grad p, so the estimator is
      unbiased for grad J_{N-1} (not J_N as the paper states). If False every rollout of a failed group
      gets -1 and the binary estimator is unbiased for grad J_N, with w_N(p) = (1 - (1-p)^N) / p.
    reward_type: "binary" or "nonnegative" (static).

  Returns:
    [..., N] advantages, float32 (float64 for float64 rewards).
  """
  return _dense("maxrl", rewards, zero_failed_groups=zero_failed_groups, reward_type=reward_type)


def maclaurin_advantages(rewards: Array, order: int, cap_order_at_n: bool = False) -> Array:
  """Unbiased estimator of the order-T MaxRL gradient, grad J_T = sum_{k=1..T} (1/k) grad pass@k.

  Averaging the subset estimator of grad pass@k over all size-k subsets of the group gives a success the
  coefficient k/N and a failure (k/N) (1 - C(F-1,k-1)/C(N-1,k-1)); dividing by k, summing k = 1..T and
  subtracting the constant T - 1 (a baseline with zero expectation) leaves

      A_i = 1                                              if r_i = 1,
      A_i = -sum_{k=2..min(T,F)} C(F-1, k-1) / C(N-1, k-1)  if r_i = 0.

  T = 1 is REINFORCE. Ratios are accumulated as products of factors in [0, 1], stable for N in the
  thousands. Only T <= N is estimable from N rollouts: every term with k > N vanishes (C(F-1, k-1) = 0), so
  an order above N would silently be order N, and it raises a ValueError unless cap_order_at_n is set.

  The official code's advantages are these divided by N (its success weight is 1/N); the directions agree
  and under Adam only the loss scale differs.

  Args:
    rewards: [..., N] binary rewards (checked eagerly, a ValueError otherwise; under jit or vmap a group with
      a reward other than 0 or 1 gets NaN advantages, since F would not be a count; see `check_rewards` to
      raise there through checkify).
    order: T, an integer with 1 <= T <= N (static).
    cap_order_at_n: accept T > N and use T = min(T, N), as the official code does silently (its 17x17
      maze script sets T = 64).

  Returns:
    [..., N] advantages with E[(1/N) sum_i A_i S_i] = grad J_T = (1 - (1-p)^T)/p grad p, with T = min(order,
    N) when capped.
  """
  return _dense("maclaurin", rewards, order=order, cap_order_at_n=cap_order_at_n)


def pkpo_advantages(rewards: Array, k: int, baseline: bool = True, form: str = "unbiased") -> Array:
  """Pass@k policy optimisation: unbiased for grad pass@k = k (1-p)^(k-1) grad p.

  Without baseline: A_i = k r_i C(F, k-1) / C(N-1, k-1), the success's score times an unbiased estimate of
  k (1-p)^(k-1) from the other N-1 rollouts. With the baseline (default), A_i = k g_i (r_i - K_{-i}/(N-1))
  where g_i = C(F_{-i}, k-1)/C(N-1, k-1) and K_{-i}, F_{-i} count the *other* rollouts; both g_i and the
  baseline are independent of rollout i, so the expectation is unchanged and k = 1 reduces to RLOO. (A
  leave-one-out baseline built from the other rollouts' *advantages* depends on r_i and is biased for k > 1.)

  form="official" is the authors' code instead: s_i = r_i C(F, k-1)/C(N-1, k-1) with no factor k, and
  A_i = s_i - mean_{j != i} s_j (successes F C(F,k-1)/((N-1) C(N-1,k-1)), failures -K C(F,k-1)/((N-1)
  C(N-1,k-1))). Its baseline is built from the other rollouts' s_j, which depend on r_i, so it is biased
  for k > 1: at N = 4, k = 2 its exact population weight is 0.993, 0.967, 0.867, 0.667, 0.400 at p = 0.01,
  0.05, 0.2, 0.5, 0.9, where (1/k) grad pass@k has (1-p) = 0.99, 0.95, 0.8, 0.5, 0.1.

  With N = 1 there are no other rollouts and no baseline: A = r for k = 1, in both forms.

  Args:
    rewards: [..., N] binary rewards (checked eagerly, a ValueError otherwise; under jit or vmap a group with
      a reward other than 0 or 1 gets NaN advantages, since K and F would not be counts; see `check_rewards`
      to raise there through checkify).
    k: 1 <= k <= N (static).
    baseline: whether to subtract the leave-one-out baseline.
    form: "unbiased" (ours, above) or "official".

  Returns:
    [..., N] advantages; with form="unbiased", E[(1/N) sum_i A_i S_i] = k (1-p)^(k-1) grad p; with
    form="official", E = w(p) grad p with w(p) != (1-p)^(k-1) for k > 1 (exact values: `expected_weight`).
  """
  return _dense("pkpo", rewards, k=k, baseline=baseline, form=form)


def grouped_advantages(name: str, rewards: Array, group_ids: Array, num_groups: int, **kwargs) -> Array:
  """Any registered rule for flat, ragged or interleaved rollouts, via segment sums.

  Args:
    name: a key of ADVANTAGE_ESTIMATORS.
    rewards: [R] rewards of all rollouts, in any order.
    group_ids: [R] int prompt id of each rollout, in [0, num_groups).
    num_groups: number of groups G (static).
    **kwargs: the rule's arguments (order, k, eps, zero_failed_groups, reward_type, baseline, ...).

  Returns:
    [R] advantages, equal to the dense rule applied to each group's rewards. Group sizes may differ; each
    group must satisfy the rule's size constraints (checked when group_ids are concrete; under jit a too
    small group gives meaningless advantages). Reward values are checked as in the dense rules: a ValueError
    in eager calls, NaN advantages for the refused groups under jit.
  """
  kwargs = _check_kwargs(name, kwargs)
  rewards = jnp.asarray(rewards)
  group_ids = jnp.asarray(group_ids)
  if rewards.ndim != 1 or group_ids.shape != rewards.shape:
    raise ValueError(
        f"grouped_advantages takes flat rewards [R] and group_ids [R], got {rewards.shape} and "
        f"{group_ids.shape}; use the dense functions for [..., N] groups.")
  _check_reward_values(name, rewards, kwargs)
  r = rewards.astype(_float_dtype(rewards))
  sizes = jax.ops.segment_sum(jnp.ones_like(r), group_ids, num_segments=num_groups)
  if not isinstance(group_ids, jax.core.Tracer):
    present = np.asarray(sizes)[np.unique(np.asarray(group_ids))]
    if present.size:
      _check_group_size(name, int(present.min()), kwargs)
  K = jax.ops.segment_sum(r, group_ids, num_segments=num_groups)[group_ids]
  Q = jax.ops.segment_sum(r * r, group_ids, num_segments=num_groups)[group_ids]
  N = sizes[group_ids]
  advantages = ADVANTAGE_ESTIMATORS[name].rule(r, K, N, Q, **kwargs)
  refused = jnp.logical_not(_accepted(reward_domain(name, **kwargs), r)).astype(r.dtype)
  group_ok = jax.ops.segment_sum(refused, group_ids, num_segments=num_groups)[group_ids] == 0
  return _poison(advantages, group_ok)


def apply_differential_smoothing(advantages: Array, rewards: Array, mean_logprobs: Array,
                                 gamma: float = 0.05) -> Array:
  """Differential Smoothing (a baseline of the paper's tables), applied on top of any advantages.

      A_i <- A_i - gamma r_i lbar_i + gamma (1 - r_i) lbar_i,

  where lbar_i is the mean token log-prob of rollout i under the sampling policy (<= 0). With GRPO's
  advantages this is the baseline as the paper runs it (gamma = 0.05). Not an unbiased estimator of any J_T.

  The group std belongs to the advantages passed in. The official code's GRPO part divides by the
  population std (variance over N): pass `grpo_advantages(rewards, population_std=True)`, or set
  `objective.smoothing_std = "population"` in a config (see `kwargs_from_config`); the default GRPO std is
  Bessel's (variance over N - 1), whose advantages are smaller by the factor sqrt((N-1)/N).

  Args:
    advantages: [..., N]. rewards: [..., N] binary. mean_logprobs: [..., N] lbar_i.
    gamma: smoothing strength (>= 0).

  Returns:
    [..., N] advantages.
  """
  rewards = jnp.asarray(rewards, _float_dtype(rewards))
  return advantages + gamma * mean_logprobs * (1.0 - 2.0 * rewards)


def apply_self_filter(advantages: Array, greedy_correct: Array) -> Array:
  """SELF (a baseline of the paper's tables): zero the advantages of prompts whose greedy decode is correct.

  Args:
    advantages: [..., N] advantages of each prompt's N rollouts (the paper uses GRPO's).
    greedy_correct: [...] bool, whether the prompt's greedy decode passes the verifier.

  Returns:
    [..., N] advantages, 0 for the filtered prompts.
  """
  return jnp.where(jnp.asarray(greedy_correct, bool)[..., None], jnp.zeros_like(advantages), advantages)


def get_advantage_fn(name: str, **kwargs) -> AdvantageFn:
  """Returns `rewards [..., N] -> advantages [..., N]` for a registered estimator name.

  Names: reinforce, rloo, dr_grpo, grpo (eps, population_std), maxrl (zero_failed_groups, reward_type),
  maclaurin (order, cap_order_at_n), pkpo (k, baseline, form). Unknown names or arguments raise a ValueError
  at once; constraints that need N (T <= N unless cap_order_at_n, k <= N, N >= 2 for the MaxRL family) raise
  when the function is first called or traced. Reward values raise in eager calls; under jit the refused
  groups get NaN advantages (see the module's Validation note and `check_rewards`).
  """
  kwargs = _check_kwargs(name, kwargs)

  def advantage_fn(rewards: Array) -> Array:
    return _dense(name, rewards, **kwargs)

  advantage_fn.__name__ = f"{name}_advantages"
  advantage_fn.__doc__ = f"{name} advantages with {kwargs}; unbiased for {ADVANTAGE_ESTIMATORS[name].unbiased_for}."
  return advantage_fn


def kwargs_from_config(objective: Mapping[str, Any]) -> dict[str, Any]:
  """The keyword arguments of `get_advantage_fn(objective["name"], ...)` that a config's objective block sets.

  A config's `objective` holds the fields of every estimator (order, k, eps, ...); only those the named
  estimator takes, and that are not None, are passed. Three fields select the official code's forms and are
  passed only to the estimator they concern:

    pkpo_form: "unbiased" (default) | "official"      -> pkpo's `form`.
    cap_order_at_n: False (default) | True             -> maclaurin's `cap_order_at_n` (T > N means T = N).
    smoothing_std: "bessel" (default) | "population"  -> grpo's `population_std`, only with Differential
                                                           Smoothing on (smoothing_gamma > 0).

  A block without them (an older config.json) gets the defaults. Their values are checked whatever the
  estimator, so a typo raises instead of being ignored. An unknown name raises a ValueError listing the
  registered ones.
  """
  name = objective["name"]
  allowed = ADVANTAGE_ESTIMATORS.get(name)
  if allowed is None:
    raise ValueError(f"config.objective.name={name!r} is not an estimator; allowed: "
                     f"{sorted(ADVANTAGE_ESTIMATORS)}.")
  get = objective.get if hasattr(objective, "get") else (lambda key, default=None: default)
  choices = {"pkpo_form": ("unbiased", "official"), "smoothing_std": ("bessel", "population"),
             "cap_order_at_n": (False, True)}
  for field, allowed_values in choices.items():
    value = get(field, None)
    if field == "cap_order_at_n":
      valid = isinstance(value, bool)
    else:
      valid = isinstance(value, str) and value in allowed_values
    if value is not None and not valid:
      raise ValueError(f"config.objective.{field}={value!r}; allowed: {', '.join(map(repr, allowed_values))}.")
  kwargs = {k: objective[k] for k in allowed.kwargs if k in objective and objective[k] is not None}
  # Config fields whose names differ from the rule's arguments.
  if name == "pkpo" and get("pkpo_form", None) is not None:
    kwargs["form"] = get("pkpo_form")
  if name == "grpo" and get("smoothing_gamma", 0.0) and get("smoothing_std", None) == "population":
    kwargs["population_std"] = True  # The official Differential Smoothing: GRPO with the population std.
  return kwargs


# --------------------------------------------------------------------------------------------------
# Population weights and exact audit.
# --------------------------------------------------------------------------------------------------

WEIGHT_FUNCTIONS = ("rl", "grpo", "maxrl", "ml")


def weight_function(p: Array, name: str, order: int | None = None) -> Array:
  """Population weight w(p) of an objective: grad J = E_x[w(p) grad p].

  rl: 1.  grpo: 1/sqrt(p (1-p)) (GRPO's large-N limit).  maxrl: (1 - (1-p)^T)/p = sum_{k=1..T} (1-p)^(k-1)
  for order T (order=None means T -> infinity, i.e. ml).  ml: 1/p.

  Args:
    p: array of pass rates in (0, 1].
    name: one of WEIGHT_FUNCTIONS.
    order: T for maxrl.

  Returns:
    w(p), same shape as p (computed with expm1/log1p, accurate for small p).
  """
  p = jnp.asarray(p, _float_dtype(p))
  if name == "rl":
    return jnp.ones_like(p)
  if name == "grpo":
    return 1.0 / jnp.sqrt(p * (1.0 - p))
  if name == "ml" or (name == "maxrl" and order is None):
    return 1.0 / p
  if name == "maxrl":
    if int(order) != order or order < 1:
      raise ValueError(f"weight_function: order={order!r} must be an integer >= 1 (or None for ML).")
    return -jnp.expm1(order * jnp.log1p(-p)) / p
  raise ValueError(f"Unknown weight function {name!r}; allowed: {list(WEIGHT_FUNCTIONS)}.")


def truncated_objective(p: Array, order: int | None) -> Array:
  """MaxRL objective of order T for one prompt: J_T(p) = -sum_{k=1..T} (1-p)^k / k.

  J_1 = p - 1 (RL up to a constant), and J_T -> log p as T -> infinity (order=None returns log p).
  dJ_T/dp = weight_function(p, "maxrl", T).

  Args:
    p: array of pass rates.
    order: T >= 1 (static), or None for log p.

  Returns:
    J_T(p), same shape as p.
  """
  p = jnp.asarray(p, _float_dtype(p))
  if order is None:
    return jnp.log(p)
  if int(order) != order or order < 1:
    raise ValueError(f"truncated_objective: order={order!r} must be an integer >= 1 (or None for log p).")
  k = jnp.arange(1, int(order) + 1, dtype=p.dtype)
  return -jnp.sum((1.0 - p)[..., None] ** k / k, axis=-1)


def _enable_x64():
  if hasattr(jax, "enable_x64"):
    return jax.enable_x64(True)
  from jax.experimental import enable_x64  # Older JAX releases.
  return enable_x64()


def _log_binomial_pmf(num_samples: int, p: np.ndarray) -> np.ndarray:
  """log P(K = j) for j = 0..N, shape [len(p), N+1], in float64."""
  j = np.arange(num_samples + 1, dtype=np.float64)
  log_comb = np.array([math.lgamma(num_samples + 1) - math.lgamma(i + 1) - math.lgamma(num_samples - i + 1)
                       for i in range(num_samples + 1)])
  with np.errstate(divide="ignore"):
    log_p, log_q = np.log(p)[:, None], np.log1p(-p)[:, None]
  return log_comb + np.where(j > 0, j * log_p, 0.0) + np.where(j < num_samples, (num_samples - j) * log_q, 0.0)


def expected_weight(name_or_fn: str | AdvantageFn, num_samples: int, p: Array | float, **kwargs) -> np.ndarray:
  """The exact population weight w(p) that an advantage rule implies, E[(1/N) sum_i A_i S_i] = w(p) grad p.

  Uses the one-parameter Bernoulli policy (logit theta, score S = r - p, grad p = p (1-p)). For a rule
  that is permutation-equivariant within the group (every rule here, and any rule that depends on r_i and
  symmetric group statistics), A depends only on (r_i, K), so

      w(p) = sum_{K=0..N} Binom(K; N, p) [K A_succ(K) (1-p) - (N-K) A_fail(K) p] / (N p (1-p)).

  The rule is evaluated once on the N+1 sorted reward vectors [1]*K + [0]*(N-K) under float64, and the sum
  is taken with log-space binomial weights in float64, stable for N up to a few thousand.

  Args:
    name_or_fn: a registered estimator name, or any function rewards [..., N] -> advantages [..., N].
    num_samples: N, the group size.
    p: pass rate(s) in (0, 1), scalar or array.
    **kwargs: arguments of the named estimator (order, k, ...); not allowed with a function.

  Returns:
    float64 numpy array of w(p), shaped like p. Compare with weight_function: e.g. a rule is unbiased for
    J_T iff this equals (1 - (1-p)^T)/p for all p.
  """
  if isinstance(name_or_fn, str):
    fn = get_advantage_fn(name_or_fn, **kwargs)
  else:
    if kwargs:
      raise ValueError("expected_weight: keyword arguments are only for registered names; bind them "
                       "into your function (functools.partial) instead.")
    fn = name_or_fn
  if isinstance(num_samples, bool) or not float(num_samples).is_integer() or num_samples < 1:
    raise ValueError(f"expected_weight: num_samples={num_samples!r} must be an integer >= 1 (the group "
                     "size N); it is not rounded.")
  N = int(num_samples)
  p_arr = np.asarray(p, dtype=np.float64)
  flat_p = p_arr.reshape(-1)
  if np.any((flat_p <= 0) | (flat_p >= 1)):
    raise ValueError("expected_weight: p must lie strictly inside (0, 1), where grad p = p(1-p) != 0.")
  rewards = (np.arange(N)[None, :] < np.arange(N + 1)[:, None]).astype(np.float64)  # [N+1, N], row K.
  with _enable_x64():
    adv = np.asarray(fn(jnp.asarray(rewards, jnp.float64)), dtype=np.float64)
  if adv.shape != rewards.shape:
    raise ValueError(f"expected_weight: the rule returned shape {adv.shape}, expected {rewards.shape}.")
  K = np.arange(N + 1, dtype=np.float64)
  a_succ = np.where(K > 0, adv[:, 0], 0.0)  # [N+1]
  a_fail = np.where(K < N, adv[:, -1], 0.0)
  # sum_i A_i (r_i - p) = K A_succ (1-p) - (N-K) A_fail p; divide by N p (1-p).
  pmf = np.exp(_log_binomial_pmf(N, flat_p))  # [P, N+1]
  q = 1.0 - flat_p[:, None]
  per_k = (K * a_succ * q - (N - K) * a_fail * flat_p[:, None]) / (N * flat_p[:, None] * q)
  return np.sum(pmf * per_k, axis=-1).reshape(p_arr.shape)


# --------------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------------

REDUCTIONS = ("sequence_sum", "token_mean", "sequence_mean", "constant_normalized")


def token_entropy(logits: Array) -> Array:
  """Entropy of the next-token distribution, H = -sum_v pi_v log pi_v.

  Args:
    logits: [..., T, V].

  Returns:
    [..., T] entropies in nats (float32).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def reduce_tokens(values: Array, mask: Array, reduction: str) -> Array:
  """A scalar from per-token values [..., T] under a loss reduction of REDUCTIONS (see policy_gradient_loss),
  mask [..., T] selecting response tokens; equal groups (every rollout weighted alike)."""
  return _reduce_tokens(values, mask, reduction, None, None)


def _reduce_tokens(values, mask, reduction, group_ids, num_groups):
  mask = mask.astype(values.dtype)
  if reduction == "token_mean":
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  if reduction == "sequence_sum":
    per_rollout = jnp.sum(values * mask, axis=-1)
  elif reduction == "sequence_mean":
    per_rollout = jnp.sum(values * mask, axis=-1) / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
  elif reduction == "constant_normalized":
    per_rollout = jnp.sum(values * mask, axis=-1) / values.shape[-1]
  else:
    raise ValueError(f"Unknown reduction {reduction!r}; allowed: {list(REDUCTIONS)}.")
  if group_ids is None:
    return jnp.mean(per_rollout)
  # Ragged groups: mean over each group's rollouts, then mean over the groups present.
  ones = jnp.ones_like(per_rollout)
  sums = jax.ops.segment_sum(per_rollout.reshape(-1), group_ids.reshape(-1), num_segments=num_groups)
  sizes = jax.ops.segment_sum(ones.reshape(-1), group_ids.reshape(-1), num_segments=num_groups)
  present = sizes > 0
  return jnp.sum(jnp.where(present, sums / jnp.maximum(sizes, 1.0), 0.0)) / jnp.maximum(jnp.sum(present), 1)


def policy_gradient_loss(
    logprobs: Array,
    mask: Array,
    advantages: Array,
    *,
    reduction: str = "sequence_sum",
    entropy: Array | None = None,
    entropy_coef: float = 0.0,
    group_ids: Array | None = None,
    num_groups: int | None = None,
) -> Array:
  """Surrogate loss whose gradient is minus the policy-gradient estimate.

      loss = -reduce_t( stop_gradient(A_i) * log pi(y_{i,t} | y_{i,<t}, x) ) - entropy_coef * reduce_t(H_{i,t})

  Reductions (mask selects response tokens):
    sequence_sum (default): sum over a rollout's tokens (= log pi(z_i)), mean over rollouts. With equal
      groups this is the mean over prompts of (1/N) sum_i A_i log pi(z_i), whose gradient is exactly the
      per-prompt estimate (1/N) sum_i A_i S_i averaged over prompts, i.e. unbiased for the rule's target.
    token_mean: verl's default, sum over all tokens / number of tokens; reweights long responses (biased).
    sequence_mean: mean over each rollout's tokens, then over rollouts (GRPO's original form; biased).
    constant_normalized: sum over tokens / max length T, mean over rollouts (Dr. GRPO; unbiased up to 1/T).

  Args:
    logprobs: [..., T] per-token log-probs of the sampled tokens under the current policy (differentiable).
    mask: [..., T] bool/0-1, true on response tokens.
    advantages: [...] one advantage per rollout (gradients are stopped).
    reduction: one of REDUCTIONS.
    entropy: optional [..., T] per-token entropies (see token_entropy) for an entropy bonus.
    entropy_coef: weight of the entropy bonus (reduced like the log-probs); a Python 0 skips it, an array
      (e.g. one value per population member) is always applied.
    group_ids: optional [...] int prompt ids for ragged groups: rollouts are averaged within each group,
      then over groups (the unbiased per-prompt mean). None means all groups have equal size.
    num_groups: number of groups (static), required with group_ids.

  Returns:
    Scalar loss.
  """
  if logprobs.shape != mask.shape or advantages.shape != logprobs.shape[:-1]:
    raise ValueError(
        f"policy_gradient_loss: expected logprobs [..., T], mask [..., T], advantages [...]; got "
        f"{logprobs.shape}, {mask.shape}, {advantages.shape}.")
  if group_ids is not None and num_groups is None:
    raise ValueError("policy_gradient_loss: num_groups is required with group_ids.")
  logprobs = logprobs.astype(jnp.promote_types(logprobs.dtype, jnp.float32))
  adv = jax.lax.stop_gradient(advantages).astype(logprobs.dtype)
  loss = -_reduce_tokens(adv[..., None] * logprobs, mask, reduction, group_ids, num_groups)
  if entropy is not None and not (isinstance(entropy_coef, (int, float)) and entropy_coef == 0):
    loss = loss - entropy_coef * _reduce_tokens(entropy.astype(logprobs.dtype), mask, reduction,
                                                group_ids, num_groups)
  return loss


def per_prompt_gradient_norms(
    loss_fn: Callable[[Any, Any], Array], params: Any, batch: Any) -> Array:
  """L2 norm of each prompt's own gradient, for the gradient-norm versus pass-rate analysis.

  Args:
    loss_fn: (params, example) -> scalar loss of ONE prompt (its N rollouts), where `example` is `batch`
      without its leading axis.
    params: parameter pytree.
    batch: pytree whose leaves have a leading prompt axis [P, ...].

  Returns:
    [P] float32 norms ||grad_params loss_fn(params, batch[p])||_2, computed with one vmapped gradient.
  """
  grads = jax.vmap(jax.grad(loss_fn), in_axes=(None, 0))(params, batch)
  squares = [jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=-1)
             for g in jax.tree_util.tree_leaves(grads)]
  return jnp.sqrt(sum(squares))
