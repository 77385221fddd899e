"""The RL step, written once: sample N rollouts per prompt -> verify -> advantages -> policy-gradient update.

Every trainer, population and benchmark runs the functions of this module:

    sample(...)        N rollouts per prompt from the current policy (prefix-shared KV cache, jitted
                       `lax.while_loop`), plus each prompt's greedy decode when SELF is on.
    update(...)        advantages from the estimator registry (with Differential Smoothing and the SELF
                       filter) -> teacher-forced log-probs -> policy-gradient loss -> AdamW update,
                       optionally accumulated over micro-batches.
    rl_step(...)       sample -> the task's on-device verifier -> update, the whole step on device.

A task whose verifier runs on the host (language models: decode the text, compare answers) calls `sample`,
verifies, then `update`: the same advantage and update code (maxrl_jax/trainers/rl.py).

What is static and what is traced:

- `RLSpec` holds the static settings: group size N, response cap M, stop tokens, loss reduction,
  micro-batching, the number of batch shards, whether SELF's greedy decode runs, the optimizer's clip and
  warm-up. A change recompiles.
- `Hyper` holds the per-run hyperparameters: learning rate, Adam betas, weight decay, entropy bonus,
  smoothing strength, SELF flag, KL coefficient, and the index of the objective. A single run passes them as Python numbers
  (constants in the compiled step: the exact arithmetic of a plain run); a population passes per-member
  arrays for those its members do not share and vmaps the very same functions (maxrl_jax/rl/population.py).

Keys are explicit: `rl_step(state, batch, rng, ...)` samples with `rng` (the trainer passes
`fold_in(sampling_key, step)`), so a resumed run draws the keys an uninterrupted run would.

Options that researchers bring from other RL libraries, each off by default (docs/language_models.md has the
table of their names in TRL, verl and Tunix):

- Several optimizer updates per sampled batch (`RLSpec.ppo_mini_batches` x `RLSpec.ppo_epochs`) with the
  importance ratio pi_theta / pi_sampling of the tokens (or GSPO's sequence ratio) and PPO's clip with
  separate low / high ranges (`importance_ratio`, `clip_low`, `clip_high`; maxrl_jax/rl/surrogates.py).
  One RL step is still one sampled batch: `state.step` counts optimizer updates and the records say how many
  a step made (`optimizer_updates`).
- Truncated importance sampling (`RLSpec.tis_cap`) for a sampler whose probabilities differ from the
  learner's.
- A KL penalty to a frozen reference policy (`Hyper.kl_coef`, `RLSpec.kl_estimator`, `RLSpec.kl_in`): the
  reference's log-probs come from one extra teacher-forced pass without gradient over `Frozen.reference`.
- LoRA (`RLSpec.lora`): `state.params` are the adapters, `Frozen.base` the frozen weights they add to
  (maxrl_jax/models/lora.py).

With one mini-batch, one epoch and no ratio, TIS, KL or LoRA, `update` is the plain on-policy step.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from maxrl_jax import estimators
from maxrl_jax import metrics as metrics_lib
from maxrl_jax import sampling
from maxrl_jax import sharding
from maxrl_jax.models import lora as lora_lib
from maxrl_jax.rl import surrogates

Array = jax.Array
PyTree = Any
# (task batch [P, ...], responses [P, N, M]) -> rewards [P, N] in {0, 1}; jittable.
Verifier = Callable[[Any, Array], Array]
# (rewards [P, N], hyper) -> advantages [P, N].
AdvantageFn = Callable[[Array, "Hyper"], Array]


@flax.struct.dataclass
class TrainState:
  """Everything a phase needs to resume: step, parameters, optimizer state.

  Keys are not stored: every step's key is `fold_in(phase_key, step)` of a key derived from config.seed,
  so a resumed run draws exactly the keys an uninterrupted run would.
  """

  step: Array
  params: PyTree
  opt_state: PyTree


@flax.struct.dataclass
class Frozen:
  """Frozen parameters beside the RL state: passed to the step functions, never trained, never donated and
  never in the RL checkpoints (the trainer re-derives them on resume and checks their fingerprint).

  Attributes:
    base: with LoRA, the base weights the adapters (`TrainState.params`) add to; None without LoRA.
    reference: the KL reference policy's parameters; None without KL, and with LoRA (its base is the
      reference: the adapted policy with the adapters removed, the policy RL started from).
  """

  base: PyTree = None
  reference: PyTree = None


def adamw(learning_rate: float | Array | optax.Schedule, b1: float | Array, b2: float | Array,
          weight_decay: float | Array, grad_clip: float) -> optax.GradientTransformation:
  """AdamW with global-norm gradient clipping (clip <= 0 disables it)."""
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*parts)


def init_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def apply_gradients(state: TrainState, grads: PyTree, tx: optax.GradientTransformation) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                    opt_state=opt_state)


# ------------------------------------------------------------------------------------------------ settings


@dataclasses.dataclass(frozen=True)
class RLSpec:
  """The static settings of the RL step (hashable: one compilation per spec and shapes).

  Attributes:
    num_samples: N rollouts per prompt.
    max_new_tokens: M, the response cap (a rollout that reaches it unstopped is truncated).
    stop_tokens: token ids that end a rollout.
    pad_id: filler after a stop token (and left padding of prompts).
    reduction: how the loss sums over tokens (estimators.REDUCTIONS).
    micro_batch_prompts, micro_batch_rollouts: gradient accumulation over micro-batches of this many
      prompts x rollouts (None: the update's forward/backward runs on all P x N rollouts at once).
    num_shards: batch shards of the device mesh (micro-batches take prompts from every shard).
    use_self: run each prompt's greedy decode for SELF (when any run of the program has SELF on).
    grad_clip: global-norm clip of the RL optimizer (<= 0: none).
    warmup_steps: linear learning-rate warm-up of the RL optimizer over this many RL steps (0: none).
    lockstep_axis: the vmap axis name of a population (the sampler's decode loop runs in lockstep over it).
    ppo_mini_batches: optimizer updates per pass over the batch: the P prompts split into this many
      mini-batches of whole prompt groups (each with micro-batching inside it).
    ppo_epochs: passes over the batch; one RL step makes ppo_mini_batches x ppo_epochs updates.
    importance_ratio: "none" (the on-policy loss -A log pi), "token" (PPO's r_t = pi_theta / pi_old per
      token) or "sequence" (GSPO's length-normalised sequence ratio); see maxrl_jax/rl/surrogates.py.
    clip_low, clip_high: the ratio's clip range [1 - clip_low, 1 + clip_high] (with a ratio).
    tis_cap: truncated importance sampling: the policy-gradient term of a token is multiplied by
      min(pi_learner / pi_sampler, tis_cap) (0: off).
    kl_estimator: "k1", "k2" or "k3" (surrogates.kl_estimate), when Hyper.kl_coef is not 0.
    kl_in: "loss" (kl_coef x the reduced per-token estimate added to the loss) or "reward" (each rollout's
      summed estimate, centred in its group, times kl_coef, subtracted from its advantage).
    lora: the adapters (models/lora.LoraConfig) when `TrainState.params` are LoRA adapters; None: full weights.
  """

  num_samples: int
  max_new_tokens: int
  stop_tokens: tuple[int, ...]
  pad_id: int = 0
  reduction: str = "token_mean"
  micro_batch_prompts: int | None = None
  micro_batch_rollouts: int | None = None
  num_shards: int = 1
  use_self: bool = False
  grad_clip: float = 1.0
  warmup_steps: int = 0
  lockstep_axis: str | None = None
  ppo_mini_batches: int = 1
  ppo_epochs: int = 1
  importance_ratio: str = "none"
  clip_low: float = 0.2
  clip_high: float = 0.2
  tis_cap: float = 0.0
  kl_estimator: str = "k3"
  kl_in: str = "loss"
  lora: lora_lib.LoraConfig | None = None

  @property
  def updates_per_step(self) -> int:
    """Optimizer updates of one RL step: ppo_mini_batches x ppo_epochs."""
    return self.ppo_mini_batches * self.ppo_epochs


# Config fields of the per-run hyperparameters (a population's members may differ in them), and their names.
HYPER_FIELDS = {
    "rl.learning_rate": "learning_rate",
    "rl.b1": "b1",
    "rl.b2": "b2",
    "rl.weight_decay": "weight_decay",
    "objective.entropy_coef": "entropy_coef",
    "objective.smoothing_gamma": "smoothing_gamma",
    "objective.self_filter": "self_filter",
    "rl.kl_coef": "kl_coef",
}


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Per-run hyperparameters of the RL step: Python numbers (one run) or arrays (population members).

  `objective` is the index of the run's advantage rule among the program's rules (0 for a single run).
  `kl_coef` weights the KL penalty to the reference policy: a Python 0 skips the reference pass entirely; an
  array (a member's value, possibly 0) always runs it.
  Not a pytree on purpose: a population builds it inside its vmapped step from the per-member arrays and
  the shared Python numbers, so shared values stay compile-time constants.
  """

  learning_rate: float | Array
  b1: float | Array
  b2: float | Array
  weight_decay: float | Array
  entropy_coef: float | Array = 0.0
  smoothing_gamma: float | Array = 0.0
  self_filter: bool | Array = False
  objective: int | Array = 0
  kl_coef: float | Array = 0.0


def hyper_from_config(config) -> Hyper:
  """The Hyper of a single run's config (Python numbers)."""
  values = {}
  for field, name in HYPER_FIELDS.items():
    group, key = field.split(".")
    values[name] = config[group].get(key, Hyper.__dataclass_fields__[name].default)
  return Hyper(**values)


def rl_optimizer(hyper: Hyper, spec: RLSpec) -> optax.GradientTransformation:
  """The RL optimizer of a run: AdamW with its hyperparameters, the spec's clip and warm-up (over
  spec.warmup_steps RL steps, i.e. warmup_steps x updates_per_step optimizer updates)."""
  learning_rate = hyper.learning_rate
  if spec.warmup_steps > 0:
    # The schedule counts optimizer updates: the warm-up spans spec.warmup_steps RL steps.
    warmup = spec.warmup_steps * spec.updates_per_step
    learning_rate = optax.join_schedules(
        [optax.linear_schedule(0.0, hyper.learning_rate, warmup),
         optax.constant_schedule(hyper.learning_rate)], [warmup])
  return adamw(learning_rate, hyper.b1, hyper.b2, hyper.weight_decay, spec.grad_clip)


def single_advantage_fn(objective) -> AdvantageFn:
  """The advantage rule of a config's objective block, as (rewards, hyper) -> advantages."""
  fn = estimators.get_advantage_fn(objective.name, **estimators.kwargs_from_config(objective))
  return lambda rewards, hyper: fn(rewards)


def _static_zero(value) -> bool:
  """True for a Python (or numpy) number equal to 0; False for any other number and for traced arrays."""
  return isinstance(value, (int, float)) and value == 0


# ------------------------------------------------------------------------------------------------ the step


@flax.struct.dataclass
class Samples:
  """What `sample` returns: the rollouts [P, N, M] and, with SELF, each prompt's greedy decode [P, 1, M]."""

  rollouts: sampling.Rollouts
  greedy: sampling.Rollouts | None = None


def sample(spec: RLSpec, model_fns, params: PyTree, prompts: Array | sampling.PaddedPrompts, rng: Array,
           temperature: Array, *, greedy: bool | None = None) -> Samples:
  """N rollouts of each prompt [P, L] at `temperature` (and the greedy decodes when SELF runs).

  The greedy decode uses the same key (temperature 0 ignores it), so it is a function of the prompt and
  the parameters only.
  """
  rollouts = sampling.sample_rollouts(
      model_fns, params, prompts, rng, num_rollouts=spec.num_samples, max_new_tokens=spec.max_new_tokens,
      temperature=temperature, stop_tokens=spec.stop_tokens, pad_id=spec.pad_id,
      lockstep_axis=spec.lockstep_axis)
  greedy_rollouts = None
  if spec.use_self if greedy is None else greedy:
    greedy_rollouts = sampling.sample_rollouts(
        model_fns, params, prompts, rng, num_rollouts=1, max_new_tokens=spec.max_new_tokens,
        temperature=0.0, stop_tokens=spec.stop_tokens, pad_id=spec.pad_id, lockstep_axis=spec.lockstep_axis)
  return Samples(rollouts=rollouts, greedy=greedy_rollouts)


def self_zero_prompts(hyper: Hyper, greedy_correct: Array | None) -> Array | None:
  """SELF's filter [P] bool (prompts whose greedy decode is correct), or None when SELF is off."""
  if greedy_correct is None or hyper.self_filter is False:
    return None
  zero = jnp.asarray(greedy_correct) > 0
  if hyper.self_filter is not True:  # A per-member flag.
    zero = jnp.logical_and(zero, hyper.self_filter)
  return zero


def sampling_policy(spec: RLSpec, model_fns, params: PyTree, frozen: Frozen | None = None):
  """(model functions, parameters) the sampler and the evaluation use: `params` themselves, or with LoRA
  the merged weights base + (alpha / r) A B (formed once per call, outside the decode loop)."""
  if spec.lora is None:
    return model_fns, params
  return model_fns, lora_lib.merge(_frozen_part(frozen, "base"), params, spec.lora)


def learner_policy(spec: RLSpec, model_fns, params: PyTree, frozen: Frozen | None = None):
  """(model functions, parameters) of the learner's teacher-forced pass, differentiable in `params`: the
  parameters themselves, or with LoRA the adapted model in the form `spec.lora.update` says."""
  if spec.lora is None:
    return model_fns, params
  return lora_lib.policy(model_fns, _frozen_part(frozen, "base"), params, spec.lora)


def reference_policy(spec: RLSpec, model_fns, frozen: Frozen | None):
  """(model functions, parameters) of the KL reference: `frozen.reference`, or with LoRA the base."""
  if frozen is not None and frozen.reference is not None:
    return model_fns, frozen.reference
  if spec.lora is not None:
    return model_fns, _frozen_part(frozen, "base")
  raise ValueError("hyper.kl_coef is not 0 but the step got no reference policy: pass "
                   "frozen=Frozen(reference=<the parameters RL started from>).")


def _frozen_part(frozen: Frozen | None, name: str):
  value = None if frozen is None else getattr(frozen, name)
  if value is None:
    raise ValueError(f"spec.lora is set but the step got no frozen {name}: pass frozen=Frozen({name}=...).")
  return value


def _split_prompt_axis(x: Array, groups: int, num_shards: int) -> Array:
  """[P, ...] -> [groups, P / groups, ...]; group g holds rows d P/D + g local + j of each shard's block
  (D = num_shards, local = P / (groups D)), so every group is spread over all devices without moving data."""
  size = x.shape[0] // groups
  local = size // num_shards
  x = x.reshape(num_shards, groups, local, *x.shape[1:])
  return jnp.swapaxes(x, 0, 1).reshape(groups, size, *x.shape[3:])


def _merge_prompt_axis(x: Array, num_shards: int) -> Array:
  """The inverse of `_split_prompt_axis`: [groups, size, ...] -> [groups size, ...]."""
  groups, size = x.shape[:2]
  x = x.reshape(groups, num_shards, size // num_shards, *x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape(groups * size, *x.shape[3:])


def _split_groups(x: Array, cp: int, cn: int, num_shards: int) -> Array:
  """[P, N, ...] -> [gp gn, cp, cn, ...]: micro-batches of cp prompts x cn rollouts."""
  gp, gn = x.shape[0] // cp, x.shape[1] // cn
  trailing = x.shape[2:]
  x = _split_prompt_axis(x, gp, num_shards).reshape(gp, cp, gn, cn, *trailing)
  return jnp.swapaxes(x, 1, 2).reshape(gp * gn, cp, cn, *trailing)


def _merge_groups(x: Array, gp: int, num_shards: int) -> Array:
  """The inverse of `_split_groups`: [gp gn, cp, cn, ...] -> [P, N, ...]."""
  gn, cp, cn = x.shape[0] // gp, x.shape[1], x.shape[2]
  trailing = x.shape[3:]
  x = jnp.swapaxes(x.reshape(gp, gn, cp, cn, *trailing), 1, 2).reshape(gp, cp, gn * cn, *trailing)
  return _merge_prompt_axis(x, num_shards)


def _split_prompt_groups(x: Array, cp: int, gn: int, num_shards: int) -> Array:
  """[P, ...] -> [gp gn, cp, ...] (each prompt block repeated for its gn rollout groups)."""
  x = _split_prompt_axis(x, x.shape[0] // cp, num_shards)
  gp = x.shape[0]
  return jnp.broadcast_to(x[:, None], (gp, gn, *x.shape[1:])).reshape(gp * gn, *x.shape[1:])


def teacher_forced_logprobs(model_fns, params: PyTree, prompts: Array | sampling.PaddedPrompts, tokens: Array,
                            temperature: Array, micro_batch: tuple[int, int], num_shards: int = 1) -> Array:
  """Log-probs [P, N, M] of the sampled `tokens` under `params`, without gradient, one micro-batch of
  micro_batch = (cp prompts, cn rollouts) at a time (the update's micro-batches: the same activation memory)."""
  params = jax.lax.stop_gradient(params)
  num_prompts, num_samples = tokens.shape[:2]
  cp, cn = micro_batch

  def logprobs(batch_prompts, batch_tokens):
    return sampling.sequence_logprobs_shared_prefix(model_fns, params, batch_prompts, batch_tokens,
                                                    temperature=temperature)

  if (cp, cn) == (num_prompts, num_samples):
    return logprobs(prompts, tokens)
  gn = num_samples // cn
  batches = (jax.tree_util.tree_map(lambda x: _split_prompt_groups(x, cp, gn, num_shards), prompts),
             _split_groups(tokens, cp, cn, num_shards))
  out = jax.lax.map(lambda b: logprobs(*b), batches)
  return _merge_groups(out, num_prompts // cp, num_shards)


def _entropy_bonus(entropy: Array, mask: Array, reduction: str, coef) -> Array | float:
  """coef x the reduced entropy, as estimators.policy_gradient_loss adds it (a Python 0 skips it)."""
  if isinstance(coef, (int, float)) and coef == 0:
    return 0.0
  return coef * estimators.reduce_tokens(entropy.astype(jnp.float32), mask, reduction)


def update(spec: RLSpec, model_fns, state: TrainState, prompts: Array | sampling.PaddedPrompts,
           rollouts: sampling.Rollouts, rewards: Array, temperature: Array, hyper: Hyper, *,
           advantage_fn: AdvantageFn, zero_prompts: Array | None = None,
           tx: optax.GradientTransformation | None = None, frozen: Frozen | None = None) -> tuple[TrainState, dict]:
  """The policy update(s) of one RL step from verified rollouts (pure; jit it or call it inside a jitted step).

  Args:
    spec: the static settings (reduction, micro-batching, shards, optimizer clip and warm-up, mini-batches,
      epochs, importance ratio and clip, TIS, KL estimator and place, LoRA).
    prompts: [P, L] int (or left-padded `sampling.PaddedPrompts`), the prompts the rollouts continue.
    rollouts: `sampling.Rollouts` with [P, N, M] tokens / logprobs / mask, sampled from `state.params`.
    rewards: [P, N] verifier rewards.
    temperature: the sampling temperature (log-probs are those of logits / temperature).
    hyper: the run's hyperparameters. `smoothing_gamma`: Differential Smoothing (a baseline of the
      paper's tables): with gamma > 0 the advantage becomes A_i - gamma r_i lbar_i + gamma (1 - r_i) lbar_i,
      lbar_i the mean token log-prob of rollout i under the sampling policy. A Python 0 skips it; an array
      (a member's value, possibly 0) is applied, which leaves the advantages unchanged where it is 0.
      `entropy_coef` likewise (see estimators.policy_gradient_loss); `kl_coef` likewise for the KL penalty.
    advantage_fn: (rewards [P, N], hyper) -> advantages [P, N].
    zero_prompts: optional [P] bool; the advantages of these prompts are set to 0 (SELF: prompts whose
      greedy decode is already correct).
    tx: the optimizer (default: `rl_optimizer(hyper, spec)`, AdamW); `state.opt_state` must be its state.
    frozen: the frozen parameters the step needs (`Frozen`): LoRA's base, the KL reference.

  The loss of a batch of rollouts (reduced over tokens by spec.reduction, `surrogates` for the terms):
    importance_ratio "none":  -A_i log pi_theta(y_t)                        (today's on-policy loss)
                              x w_t with TIS (w_t = min(pi_theta / pi_sampler, tis_cap), no gradient)
    "token" / "sequence":     -min(r_t A_i, clip(r_t, 1 - clip_low, 1 + clip_high) A_i)   (x w_t with TIS,
                              where r_t is then measured against the learner's own pre-update log-probs
                              and w_t = min(those / the sampler's, tis_cap), as verl separates them)
    minus the entropy bonus, plus kl_coef x the reduced per-token KL estimate when kl_in = "loss". With
    kl_in = "reward" the KL enters the advantages instead: A_i - kl_coef (kl_i - mean of its group), kl_i
    the rollout's summed per-token estimate at the sampler's log-probs (the policy gradient of
    E[r] - kl_coef KL for every estimator, without changing the rewards the estimator sees).

  Updates: advantages (and the reference's log-probs) come from the whole batch first. The P prompts are
  then split into spec.ppo_mini_batches mini-batches of whole prompt groups (mini-batch j takes the j-th
  share of every device's block of prompts), and the mini-batches are visited in that fixed order
  spec.ppo_epochs times, one AdamW update each: ppo_mini_batches x ppo_epochs updates per RL step
  (`state.step` counts them). With one of each, one update on the whole batch (the default).

  Micro-batches (spec.micro_batch_prompts x spec.micro_batch_rollouts) inside each update: the gradient is
  summed (lax.scan) over micro-batches, each weighted by its share of the reduction's denominator
  (rollouts, or tokens for token_mean), so the update equals the single-batch one up to float round-off
  while only one micro-batch's activations are alive at a time. With prompts split over `num_shards`
  devices in contiguous blocks, micro-batch g takes micro_batch_prompts / num_shards prompts from every
  block, so each micro-batch is spread over all devices without moving data.

  Returns:
    (new state, metrics): loss, grad_norm, pass_rate, fraction_solved, response lengths, entropy, and
    `logprob_mismatch`, the largest |teacher-forced - sampling| log-prob (0 up to round-off on-policy; of the
    first update's mini-batch, whose parameters are the sampler's). With several updates, loss and
    grad_norm are their means and entropy that of the first epoch, and `optimizer_updates` says how many;
    `clip_fraction` (with a ratio), `tis_capped_fraction` (with TIS): the share of token updates clipped or
    capped; `kl` (with KL): the token mean of the estimate at the sampler's log-probs.
  """
  tx = rl_optimizer(hyper, spec) if tx is None else tx
  advantages = advantage_fn(rewards, hyper)
  if not _static_zero(hyper.smoothing_gamma):
    mask = rollouts.mask.astype(jnp.float32)
    mean_logprob = jnp.sum(rollouts.logprobs * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)  # [P, N]
    advantages = estimators.apply_differential_smoothing(advantages, rewards, mean_logprob,
                                                         hyper.smoothing_gamma)
  total_tokens = jnp.maximum(jnp.sum(rollouts.mask.astype(jnp.float32)), 1.0)

  num_prompts, num_samples = rewards.shape
  mini_batches = spec.ppo_mini_batches
  if num_prompts % mini_batches or (num_prompts // mini_batches) % spec.num_shards:
    raise ValueError(f"ppo_mini_batches={mini_batches} must divide the {num_prompts} prompts into mini-batches "
                     f"of a multiple of num_shards={spec.num_shards} prompts.")
  mini_prompts = num_prompts // mini_batches
  cp = spec.micro_batch_prompts or mini_prompts
  cn = spec.micro_batch_rollouts or num_samples
  if mini_prompts % cp or num_samples % cn or cp % spec.num_shards:
    where = f"the {mini_prompts} prompts" + (" of a mini-batch" if mini_batches > 1 else "")
    raise ValueError(f"micro_batch_prompts={cp} must divide {where} and be a multiple of "
                     f"num_shards={spec.num_shards}; micro_batch_rollouts={cn} must divide N={num_samples}.")

  extras, knob_metrics = {}, {}
  if not _static_zero(hyper.kl_coef):
    ref_fns, ref_params = reference_policy(spec, model_fns, frozen)
    ref_logprobs = teacher_forced_logprobs(ref_fns, ref_params, prompts, rollouts.tokens, temperature, (cp, cn),
                                           spec.num_shards)
    sampled_kl = surrogates.kl_estimate(rollouts.logprobs, ref_logprobs, spec.kl_estimator) * rollouts.mask
    knob_metrics["kl"] = jnp.sum(sampled_kl) / total_tokens
    if spec.kl_in == "reward":
      advantages = advantages - hyper.kl_coef * surrogates.group_centered(jnp.sum(sampled_kl, -1))
    else:
      extras["ref_logprobs"] = ref_logprobs
  if zero_prompts is not None:
    advantages = estimators.apply_self_filter(advantages, zero_prompts)
  with_ratio = spec.importance_ratio != "none"
  if with_ratio and spec.tis_cap:  # The learner's own log-probs before this step's updates (verl's old_log_prob).
    learner_fns, learner_params = learner_policy(spec, model_fns, state.params, frozen)
    extras["old_logprobs"] = teacher_forced_logprobs(learner_fns, learner_params, prompts, rollouts.tokens,
                                                     temperature, (cp, cn), spec.num_shards)

  def rollout_loss(params, batch_prompts, tokens, mask, sampled_logprobs, batch_advantages, batch_extras):
    """(loss over these rollouts, {sum of their token entropies, largest log-prob mismatch, counts})."""
    fns, policy = learner_policy(spec, model_fns, params, frozen)
    logprobs, entropy = sampling.sequence_logprobs_shared_prefix(
        fns, policy, batch_prompts, tokens, temperature=temperature, with_entropy=True)
    fmask = mask.astype(jnp.float32)
    counts = {}
    if with_ratio:
      old = batch_extras.get("old_logprobs", sampled_logprobs)
      log_ratio = surrogates.log_importance_ratio(logprobs, old, mask, spec.importance_ratio)
      objective, clipped = surrogates.clipped_objective(log_ratio, batch_advantages, spec.clip_low, spec.clip_high)
      counts["clipped"] = jnp.sum(clipped * fmask)
      if spec.tis_cap:
        weights, capped = surrogates.truncated_importance_weights(old, sampled_logprobs, spec.tis_cap)
        objective = objective * weights
        counts["tis_capped"] = jnp.sum(capped * fmask)
      loss = (-estimators.reduce_tokens(objective, mask, spec.reduction)
              - _entropy_bonus(entropy, mask, spec.reduction, hyper.entropy_coef))
    elif spec.tis_cap:
      weights, capped = surrogates.truncated_importance_weights(logprobs, sampled_logprobs, spec.tis_cap)
      counts["tis_capped"] = jnp.sum(capped * fmask)
      adv = jax.lax.stop_gradient(batch_advantages).astype(jnp.float32)[..., None]
      loss = (-estimators.reduce_tokens(weights * adv * logprobs, mask, spec.reduction)
              - _entropy_bonus(entropy, mask, spec.reduction, hyper.entropy_coef))
    else:
      loss = estimators.policy_gradient_loss(
          logprobs, mask, batch_advantages, reduction=spec.reduction, entropy=entropy,
          entropy_coef=hyper.entropy_coef)
    if "ref_logprobs" in batch_extras:
      kl = surrogates.kl_estimate(logprobs, batch_extras["ref_logprobs"], spec.kl_estimator)
      loss = loss + hyper.kl_coef * estimators.reduce_tokens(kl, mask, spec.reduction)
    # On-policy check: teacher-forced log-probs of the sampled tokens equal the sampler's up to
    # round-off; a large value means sampler and learner disagree (a cache or dtype problem).
    mismatch = jnp.max(jnp.abs(jax.lax.stop_gradient(logprobs) - sampled_logprobs) * fmask)
    return loss, {"entropy_sum": jnp.sum(entropy * fmask), "mismatch": mismatch, **counts}

  def gradients(params, batch, batch_tokens):
    """(loss, aux, gradient) of one optimizer update's rollouts, accumulated over micro-batches."""
    if (cp, cn) == batch[1].shape[:2]:
      (loss, aux), grads = jax.value_and_grad(rollout_loss, has_aux=True)(params, *batch)
      return loss, aux, grads
    return _accumulate_micro_batches(rollout_loss, params, batch, cp, cn, spec.num_shards, spec.reduction,
                                     batch_tokens)

  batch = (prompts, rollouts.tokens, rollouts.mask, rollouts.logprobs, advantages, extras)
  if spec.updates_per_step == 1:
    loss, aux, grads = gradients(state.params, batch, total_tokens)
    new_state = apply_gradients(state, grads, tx)
    update_metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), "entropy": aux["entropy_sum"] / total_tokens,
                      "logprob_mismatch": aux["mismatch"]}
    counted = {k: aux[k] for k in ("clipped", "tis_capped") if k in aux}
  else:
    minis = jax.tree_util.tree_map(lambda x: _split_prompt_axis(x, mini_batches, spec.num_shards), batch)

    def one_update(current, mini):
      mini_tokens = jnp.maximum(jnp.sum(mini[2].astype(jnp.float32)), 1.0)
      loss, aux, grads = gradients(current.params, mini, mini_tokens)
      return apply_gradients(current, grads, tx), {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}

    new_state, per_update = jax.lax.scan(lambda current, _: jax.lax.scan(one_update, current, minis), state, None,
                                         length=spec.ppo_epochs)  # per_update leaves: [epochs, mini-batches]
    update_metrics = {"loss": jnp.mean(per_update["loss"]), "grad_norm": jnp.mean(per_update["grad_norm"]),
                      "entropy": jnp.sum(per_update["entropy_sum"][0]) / total_tokens,
                      "logprob_mismatch": per_update["mismatch"][0, 0],
                      "optimizer_updates": jnp.float32(spec.updates_per_step)}
    counted = {k: jnp.sum(per_update[k]) / spec.ppo_epochs for k in ("clipped", "tis_capped") if k in per_update}
  if "clipped" in counted:
    knob_metrics["clip_fraction"] = counted["clipped"] / total_tokens
  if "tis_capped" in counted:
    knob_metrics["tis_capped_fraction"] = counted["tis_capped"] / total_tokens
  return new_state, {"loss": update_metrics.pop("loss"), "grad_norm": update_metrics.pop("grad_norm"),
                     **rollout_metrics(rollouts, rewards, advantages), **update_metrics, **knob_metrics,
                     # Diagnostic (not logged): groups whose advantages the rule refused (NaN: a reward it does
                     # not take), named in the message of the non-finite stop.
                     "_refused_groups": jnp.sum(jnp.any(jnp.isnan(advantages), axis=-1))}


def _accumulate_micro_batches(rollout_loss, params, batch, cp, cn, num_shards, reduction, total_tokens):
  """Sums `rollout_loss`'s gradient over micro-batches of cp prompts x cn rollouts (see `update`).

  `batch` is (prompts [P, ...], tokens, mask, sampled log-probs [P, N, M], advantages [P, N], extras {name:
  [P, N, M]}); returns (loss, aux, gradient) with aux summed over micro-batches ("mismatch": the largest).
  """
  prompts, tokens, mask, logprobs, advantages, extras = batch
  num_prompts, num_samples = advantages.shape
  gp, gn = num_prompts // cp, num_samples // cn
  split = lambda x: _split_groups(x, cp, cn, num_shards)
  batches = (jax.tree_util.tree_map(lambda x: _split_prompt_groups(x, cp, gn, num_shards), prompts), split(tokens),
             split(mask), split(logprobs), split(advantages), jax.tree_util.tree_map(split, extras))

  def weighted_loss(p, micro):
    loss, aux = rollout_loss(p, *micro)
    micro_mask = micro[2]
    weight = (jnp.sum(micro_mask.astype(jnp.float32)) / total_tokens if reduction == "token_mean"
              else 1.0 / (gp * gn))
    return loss * weight, aux

  def combine(name, acc, value):
    return jnp.maximum(acc, value) if name == "mismatch" else acc + value

  def body(carry, micro):
    grads_acc, loss_acc, aux_acc = carry
    (loss, aux), grads = jax.value_and_grad(weighted_loss, has_aux=True)(params, micro)
    grads_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
    aux_acc = {k: combine(k, aux_acc[k], aux[k]) for k in aux_acc}
    return (grads_acc, loss_acc + loss, aux_acc), None

  zero = jnp.zeros((), jnp.float32)
  first = jax.tree_util.tree_map(lambda x: x[0], batches)
  aux_shapes = jax.eval_shape(weighted_loss, params, first)[1]
  init = (jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params), zero,
          {k: jnp.zeros(v.shape, v.dtype) for k, v in aux_shapes.items()})
  (grads, loss, aux), _ = jax.lax.scan(body, init, batches)
  grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, aux, grads


def rollout_metrics(rollouts: sampling.Rollouts, rewards: Array, advantages: Array) -> dict:
  """On-device statistics of one RL step's rollouts: pass rate, fraction solved, lengths, advantages."""
  lengths = rollouts.lengths.astype(jnp.float32)
  return {
      "pass_rate": jnp.mean(rewards),
      "fraction_solved": metrics_lib.fraction_solved(rewards),
      "mean_response_length": jnp.mean(lengths),
      "truncated_fraction": 1.0 - jnp.mean(rollouts.stopped.astype(jnp.float32)),
      "generated_tokens": jnp.sum(lengths),
      "decode_steps": rollouts.num_steps,
      "mean_abs_advantage": jnp.mean(jnp.abs(advantages)),
  }


def rl_step(spec: RLSpec, model_fns, state: TrainState, batch: Any, rng: Array, temperature: Array,
            hyper: Hyper, *, prompt_fn: Callable[[Any], Array], verifier: Verifier,
            advantage_fn: AdvantageFn, frozen: Frozen | None = None) -> tuple[TrainState, dict]:
  """One RL step on device (pure): sample, verify, advantages, update(s).

  Args:
    spec, model_fns, state: the static settings, the policy, its TrainState.
    batch: the task's batch [P, ...] (e.g. maze grids).
    rng: this step's sampling key. temperature: the sampling temperature.
    hyper: the run's hyperparameters (Python numbers, or a population member's arrays under vmap).
    prompt_fn: batch -> prompts [P, L] (jittable). verifier: (batch, responses [P, N, M]) -> rewards [P, N].
    advantage_fn: (rewards, hyper) -> advantages.
    frozen: LoRA's base and the KL reference (`Frozen`), when the spec and hyperparameters use them.

  A member whose SELF flag is False keeps all its advantages and reports greedy_solved_fraction 0.
  """
  prompts = prompt_fn(batch)
  samples = sample(spec, *sampling_policy(spec, model_fns, state.params, frozen), prompts, rng, temperature)
  rewards = verifier(batch, samples.rollouts.tokens)  # [P, N]
  greedy_correct = None if samples.greedy is None else verifier(batch, samples.greedy.tokens)[:, 0]
  zero_prompts = self_zero_prompts(hyper, greedy_correct)
  new_state, step_metrics = update(spec, model_fns, state, prompts, samples.rollouts, rewards, temperature,
                                   hyper, advantage_fn=advantage_fn, zero_prompts=zero_prompts, frozen=frozen)
  if zero_prompts is not None:
    step_metrics["greedy_solved_fraction"] = jnp.mean(zero_prompts.astype(jnp.float32))
  return new_state, step_metrics


def eval_counts(spec: RLSpec, model_fns, params, batch: Any, rng: Array, temperature: Array, *,
                num_samples: int, prompt_fn: Callable[[Any], Array], verifier: Verifier) -> Array:
  """Correct samples per task [P] int32 out of `num_samples` (pure; held-out evaluation on device)."""
  rollouts = sampling.sample_rollouts(
      model_fns, params, prompt_fn(batch), rng, num_rollouts=num_samples, max_new_tokens=spec.max_new_tokens,
      temperature=temperature, stop_tokens=spec.stop_tokens, pad_id=spec.pad_id,
      lockstep_axis=spec.lockstep_axis)
  return jnp.sum(verifier(batch, rollouts.tokens), axis=-1).astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ jitting


def jit_step(fn, state_sharding: PyTree | None, batch_sharding: NamedSharding | None,
             num_replicated_args: int, out_replicated: bool = True):
  """jit(fn) with the state (argument 0) donated; with shardings: (state, batch, replicated...) in,
  (state, replicated metrics) out. Without them (one device) plain jit."""
  if state_sharding is None and batch_sharding is None:
    return jax.jit(fn, donate_argnums=0)
  if state_sharding is None or batch_sharding is None:
    raise ValueError("Pass both state_sharding and batch_sharding, or neither.")
  rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
  in_shardings = (state_sharding, batch_sharding) + (rep,) * num_replicated_args
  return jax.jit(fn, donate_argnums=0, in_shardings=in_shardings, out_shardings=(state_sharding, rep))


def _frozen_shardings(frozen: Frozen) -> Frozen:
  return jax.tree_util.tree_map(lambda x: x.sharding, frozen)


def make_rl_step(spec: RLSpec, model_fns, hyper: Hyper, *, prompt_fn, verifier, advantage_fn,
                 state_sharding: PyTree | None = None, batch_sharding: NamedSharding | None = None,
                 frozen: Frozen | None = None):
  """Jitted `step(state, batch, rng, temperature) -> (state, metrics)` of one run (state donated).

  `hyper` holds Python numbers (constants of the compiled step). With `state_sharding` (a TrainState of
  shardings, see sharding.init_sharded) and `batch_sharding` (the leading axis split over the mesh), the
  step is jitted with those in/out shardings: batch, prompts and rollouts split over prompts, rng and
  temperature replicated. `frozen` (device arrays: LoRA's base, the KL reference) is passed to every call
  as an argument in its own shardings (not donated, not a constant of the program).
  """
  if batch_sharding is not None:
    spec = dataclasses.replace(spec, num_shards=sharding.num_batch_shards(batch_sharding.mesh))

  if frozen is None:
    def step(state, batch, rng, temperature):
      return rl_step(spec, model_fns, state, batch, rng, temperature, hyper, prompt_fn=prompt_fn,
                     verifier=verifier, advantage_fn=advantage_fn)

    return jit_step(step, state_sharding, batch_sharding, 2)

  def frozen_step(state, batch, rng, temperature, frozen_params):
    return rl_step(spec, model_fns, state, batch, rng, temperature, hyper, prompt_fn=prompt_fn,
                   verifier=verifier, advantage_fn=advantage_fn, frozen=frozen_params)

  if state_sharding is None:
    jitted = jax.jit(frozen_step, donate_argnums=0)
  else:
    rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
    jitted = jax.jit(frozen_step, donate_argnums=0,
                     in_shardings=(state_sharding, batch_sharding, rep, rep, _frozen_shardings(frozen)),
                     out_shardings=(state_sharding, rep))
  return lambda state, batch, rng, temperature: jitted(state, batch, rng, temperature, frozen)


def rollouts_sharding(batch_sharding: NamedSharding) -> sampling.Rollouts:
  """Shardings of a Rollouts pytree split over prompts (its step count replicated)."""
  rep = sharding.replicated(batch_sharding.mesh)
  return sampling.Rollouts(tokens=batch_sharding, logprobs=batch_sharding, mask=batch_sharding,
                           lengths=batch_sharding, stopped=batch_sharding, num_steps=rep)


def make_update(spec: RLSpec, model_fns, hyper: Hyper, *, advantage_fn, state_sharding: PyTree | None = None,
                batch_sharding: NamedSharding | None = None, frozen: Frozen | None = None):
  """Jitted `update(state, prompts, rollouts, rewards, zero_prompts, temperature) -> (state, metrics)`.

  `update` of this module for rollouts verified on the host (state donated); `zero_prompts` is SELF's [P]
  filter or None. With shardings, prompts, rollouts, rewards and the filter are split over prompts.
  `frozen` (LoRA's base, the KL reference) is passed to every call as an argument, as in `make_rl_step`.
  """
  if batch_sharding is not None:
    spec = dataclasses.replace(spec, num_shards=sharding.num_batch_shards(batch_sharding.mesh))

  def fn(state, prompts, rollouts, rewards, zero_prompts, temperature, frozen_params=None):
    zero = self_zero_prompts(hyper, zero_prompts)
    new_state, metrics = update(spec, model_fns, state, prompts, rollouts, rewards, temperature, hyper,
                                advantage_fn=advantage_fn, zero_prompts=zero, frozen=frozen_params)
    if zero is not None:
      metrics["greedy_solved_fraction"] = jnp.mean(zero.astype(jnp.float32))
    return new_state, metrics

  if frozen is None:
    if state_sharding is None:
      return jax.jit(fn, donate_argnums=0)
    rep = sharding.replicated(batch_sharding.mesh)
    return jax.jit(fn, donate_argnums=0,
                   in_shardings=(state_sharding, batch_sharding, rollouts_sharding(batch_sharding),
                                 batch_sharding, batch_sharding, rep),
                   out_shardings=(state_sharding, rep))
  if state_sharding is None:
    jitted = jax.jit(fn, donate_argnums=0)
  else:
    rep = sharding.replicated(batch_sharding.mesh)
    jitted = jax.jit(fn, donate_argnums=0,
                     in_shardings=(state_sharding, batch_sharding, rollouts_sharding(batch_sharding),
                                   batch_sharding, batch_sharding, rep, _frozen_shardings(frozen)),
                     out_shardings=(state_sharding, rep))
  return lambda state, prompts, rollouts, rewards, zero_prompts, temperature: jitted(
      state, prompts, rollouts, rewards, zero_prompts, temperature, frozen)


def make_eval_counts(spec: RLSpec, model_fns, *, num_samples: int, prompt_fn, verifier,
                     params_sharding: PyTree | None = None, batch_sharding: NamedSharding | None = None):
  """Jitted `counts(params, batch [P, ...], rng, temperature) -> correct counts [P] int32` (see eval_counts).

  With shardings, the batch is split over prompts and the counts come back replicated (readable on every
  host).
  """
  fn = functools.partial(eval_counts, spec, model_fns, num_samples=num_samples, prompt_fn=prompt_fn,
                         verifier=verifier)
  if params_sharding is None and batch_sharding is None:
    return jax.jit(fn)
  rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(fn, in_shardings=(params_sharding, batch_sharding, rep, rep), out_shardings=rep)
