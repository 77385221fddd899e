"""Per-token terms of the RL loss beyond -A log pi: importance ratios, the clipped surrogate, truncated
importance sampling, and estimators of the KL divergence to a reference policy.

Pure jax functions with explicit shapes; `maxrl_jax.rl.step.update` combines them (static settings in
`RLSpec`, the KL coefficient in `Hyper`). Notation, per token t of rollout i (mask selects response tokens):

    logp_t       log pi_theta(y_t | y_<t, x): the learner's (differentiable) log-prob of the sampled token
    old_t        log pi_old(y_t | ...): the policy that produced the rollouts (the sampler's log-probs,
                 `Rollouts.logprobs`, or the learner's own before this step's first update)
    ref_t        log pi_ref(y_t | ...): a frozen reference policy (the policy RL started from)

Importance ratio (`log_importance_ratio`):
    token     r_t = exp(logp_t - old_t)                                  (PPO; DAPO)
    sequence  r_t = s_i = exp( (1/|y_i|) sum_t (logp_t - old_t) )         (GSPO: the length-normalised
              geometric mean of the token ratios, i.e. (pi_theta(y_i) / pi_old(y_i))^(1/|y_i|), the same for
              every token of rollout i)
On-policy (theta = old) both are exactly 1 and their gradient is grad logp_t (token) or the rollout's
mean grad logp (sequence).

Clipped surrogate (`clipped_objective`): o_t = min(r_t A_i, clip(r_t, 1 - clip_low, 1 + clip_high) A_i).
Its gradient is r_t A_i grad log r_t where the unclipped branch is the minimum, and 0 where the clipped one is
(A_i > 0 and r_t > 1 + clip_high, or A_i < 0 and r_t < 1 - clip_low): those tokens are "clipped". At r = 1
it equals A_i grad logp_t, the on-policy policy gradient. clip_high > clip_low is DAPO's "clip-higher".

Truncated importance sampling (`truncated_importance_weights`): w_t = min(exp(learner_t - sampler_t), cap),
with gradients stopped: the policy-gradient term of token t is multiplied by w_t. When the sampler's
probabilities differ from the learner's (a lower-precision sampler, slightly stale weights), w_t corrects the
expectation toward the learner's policy; the cap bounds the variance at the cost of a bias wherever the
ratio exceeds it.

KL estimators (`kl_estimate`), with log rho_t = ref_t - logp_t and y_t drawn from pi_theta:
    k1 = -log rho                  unbiased for KL(pi_theta || pi_ref); can be negative per sample; as a
                                   loss term its gradient, grad logp_t, has expectation 0 (E_pi[grad log pi]
                                   = 0): in the loss it only adds noise; in the reward (the score-function
                                   form) it is the exact penalty of E[r] - beta KL.
    k2 = (log rho)^2 / 2           biased for KL (it is half the second moment of the log-ratio; equal to KL
                                   to second order when the two policies are close); as a loss term its
                                   gradient E_pi[(logp - ref) grad logp] is exactly grad KL(pi_theta || pi_ref).
    k3 = rho - 1 - log rho         unbiased for KL(pi_theta || pi_ref), >= 0, lower variance than k1 ("low_var_kl"
                                   in verl; TRL's per-token KL); as a loss term its gradient E_pi[(1 - rho) grad
                                   logp] is grad KL(pi_ref || pi_theta), the reverse direction.
These statements hold per token for the next-token distribution; for samples of an older policy (mini-batches
after the first update) they hold approximately. tests/test_knobs.py checks each against exact enumeration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

IMPORTANCE_RATIOS = ("none", "token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
# The peers' names of the same estimators (verl's kl_loss_type / kl_penalty).
KL_ALIASES = {"kl": "k1", "mse": "k2", "low_var_kl": "k3"}
KL_PLACES = ("loss", "reward")


def canonical_kl_estimator(name: str) -> str:
  """k1 / k2 / k3 for a name or a peer's alias (verl: kl = k1, mse = k2, low_var_kl = k3); ValueError else."""
  name = KL_ALIASES.get(name, name)
  if name not in KL_ESTIMATORS:
    raise ValueError(f"{name!r}; allowed: {list(KL_ESTIMATORS)} (or verl's names {sorted(KL_ALIASES)}).")
  return name


def log_importance_ratio(logprobs: Array, old_logprobs: Array, mask: Array, level: str) -> Array:
  """log r_t [..., T] of the learner's log-probs against the behaviour policy's (see the module docstring).

  Args:
    logprobs: [..., T] the learner's log-probs of the sampled tokens (differentiable).
    old_logprobs: [..., T] the behaviour policy's log-probs of the same tokens (gradients stopped).
    mask: [..., T] bool / 0-1, True on response tokens.
    level: "token" (PPO) or "sequence" (GSPO: the mean of the token log-ratios over the rollout's tokens,
      the same for every token of the rollout).

  Returns:
    [..., T] float32; 0 where `mask` is False.
  """
  fmask = mask.astype(jnp.float32)
  delta = (logprobs.astype(jnp.float32) - jax.lax.stop_gradient(old_logprobs).astype(jnp.float32)) * fmask
  if level == "token":
    return delta
  if level == "sequence":
    mean = jnp.sum(delta, -1, keepdims=True) / jnp.maximum(jnp.sum(fmask, -1, keepdims=True), 1.0)
    return jnp.broadcast_to(mean, delta.shape) * fmask
  raise ValueError(f"level={level!r}; allowed: 'token', 'sequence'.")


def clipped_objective(log_ratio: Array, advantages: Array, clip_low: float, clip_high: float
                      ) -> tuple[Array, Array]:
  """PPO's per-token objective min(r A, clip(r, 1 - clip_low, 1 + clip_high) A) and where it is clipped.

  Args:
    log_ratio: [..., T] log r_t (from `log_importance_ratio`).
    advantages: [...] one advantage per rollout (gradients stopped).
    clip_low, clip_high: the clip range [1 - clip_low, 1 + clip_high] of r.

  Returns:
    (objective [..., T] float32, to maximise; clipped [..., T] bool: True where the clipped branch is the
    minimum and differs from the unclipped one, so the token's gradient is 0).
  """
  ratio = jnp.exp(log_ratio)
  adv = jax.lax.stop_gradient(advantages).astype(jnp.float32)[..., None]
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
  unclipped, clipped = ratio * adv, clipped_ratio * adv
  return jnp.minimum(unclipped, clipped), jax.lax.stop_gradient(clipped < unclipped)


def truncated_importance_weights(learner_logprobs: Array, sampler_logprobs: Array, cap: float
                                 ) -> tuple[Array, Array]:
  """TIS weights w_t = min(pi_learner / pi_sampler, cap) [..., T] (gradients stopped) and where capped.

  Args:
    learner_logprobs: [..., T] the learner's log-probs of the sampled tokens (before this step's update).
    sampler_logprobs: [..., T] the sampler's log-probs of the same tokens (`Rollouts.logprobs`).
    cap: the truncation C > 0.

  Returns:
    (weights [..., T] float32, capped [..., T] bool: the ratio exceeded the cap).
  """
  ratio = jnp.exp(jax.lax.stop_gradient(learner_logprobs).astype(jnp.float32)
                  - jax.lax.stop_gradient(sampler_logprobs).astype(jnp.float32))
  return jnp.minimum(ratio, cap), ratio > cap


def kl_estimate(logprobs: Array, ref_logprobs: Array, estimator: str) -> Array:
  """Per-token estimate [..., T] of KL(pi_theta || pi_ref) from sampled tokens (see the module docstring).

  Args:
    logprobs: [..., T] the learner's log-probs of the sampled tokens (differentiable: the loss form).
    ref_logprobs: [..., T] the reference policy's log-probs of the same tokens (gradients stopped).
    estimator: "k1", "k2" or "k3" (or an alias of `KL_ALIASES`).

  Returns:
    [..., T] float32 (multiply by the mask before reducing).
  """
  estimator = canonical_kl_estimator(estimator)
  log_rho = jax.lax.stop_gradient(ref_logprobs).astype(jnp.float32) - logprobs.astype(jnp.float32)
  if estimator == "k1":
    return -log_rho
  if estimator == "k2":
    return 0.5 * jnp.square(log_rho)
  return jnp.exp(log_rho) - 1.0 - log_rho


def group_centered(values: Array) -> Array:
  """values [P, N] minus the mean of each prompt's group [P, 1]: a baseline that leaves the gradient unbiased."""
  return values - jnp.mean(values, axis=-1, keepdims=True)
