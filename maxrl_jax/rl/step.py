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
  smoothing strength, SELF flag, and the index of the objective. A single run passes them as Python numbers
  (constants in the compiled step: the exact arithmetic of a plain run); a population passes per-member
  arrays for those its members do not share and vmaps the very same functions (maxrl_jax/rl/population.py).

Keys are explicit: `rl_step(state, batch, rng, ...)` samples with `rng` (the trainer passes
`fold_in(sampling_key, step)`), so a resumed run draws the keys an uninterrupted run would.
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
    warmup_steps: linear learning-rate warm-up of the RL optimizer (0: none).
    lockstep_axis: the vmap axis name of a population (the sampler's decode loop runs in lockstep over it).
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


# Config fields of the per-run hyperparameters (a population's members may differ in them), and their names.
HYPER_FIELDS = {
    "rl.learning_rate": "learning_rate",
    "rl.b1": "b1",
    "rl.b2": "b2",
    "rl.weight_decay": "weight_decay",
    "objective.entropy_coef": "entropy_coef",
    "objective.smoothing_gamma": "smoothing_gamma",
    "objective.self_filter": "self_filter",
}


@dataclasses.dataclass(frozen=True)
class Hyper:
  """Per-run hyperparameters of the RL step: Python numbers (one run) or arrays (population members).

  `objective` is the index of the run's advantage rule among the program's rules (0 for a single run).
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


def hyper_from_config(config) -> Hyper:
  """The Hyper of a single run's config (Python numbers)."""
  values = {}
  for field, name in HYPER_FIELDS.items():
    group, key = field.split(".")
    values[name] = config[group].get(key, Hyper.__dataclass_fields__[name].default)
  return Hyper(**values)


def rl_optimizer(hyper: Hyper, spec: RLSpec) -> optax.GradientTransformation:
  """The RL optimizer of a run: AdamW with its hyperparameters, the spec's clip and warm-up."""
  learning_rate = hyper.learning_rate
  if spec.warmup_steps > 0:
    learning_rate = optax.join_schedules(
        [optax.linear_schedule(0.0, hyper.learning_rate, spec.warmup_steps),
         optax.constant_schedule(hyper.learning_rate)], [spec.warmup_steps])
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


def update(spec: RLSpec, model_fns, state: TrainState, prompts: Array | sampling.PaddedPrompts,
           rollouts: sampling.Rollouts, rewards: Array, temperature: Array, hyper: Hyper, *,
           advantage_fn: AdvantageFn, zero_prompts: Array | None = None,
           tx: optax.GradientTransformation | None = None) -> tuple[TrainState, dict]:
  """One policy-gradient update from verified rollouts (pure; jit it or call it inside a jitted step).

  Args:
    spec: the static settings (reduction, micro-batching, shards, optimizer clip and warm-up).
    prompts: [P, L] int (or left-padded `sampling.PaddedPrompts`), the prompts the rollouts continue.
    rollouts: `sampling.Rollouts` with [P, N, M] tokens / logprobs / mask, sampled from `state.params`.
    rewards: [P, N] verifier rewards.
    temperature: the sampling temperature (log-probs are those of logits / temperature).
    hyper: the run's hyperparameters. `smoothing_gamma`: Differential Smoothing (a baseline of the
      paper's tables): with gamma > 0 the advantage becomes A_i - gamma r_i lbar_i + gamma (1 - r_i) lbar_i,
      lbar_i the mean token log-prob of rollout i under the sampling policy. A Python 0 skips it; an array
      (a member's value, possibly 0) is applied, which leaves the advantages unchanged where it is 0.
      `entropy_coef` likewise (see estimators.policy_gradient_loss).
    advantage_fn: (rewards [P, N], hyper) -> advantages [P, N].
    zero_prompts: optional [P] bool; the advantages of these prompts are set to 0 (SELF: prompts whose
      greedy decode is already correct).
    tx: the optimizer (default: `rl_optimizer(hyper, spec)`, AdamW); `state.opt_state` must be its state.

  Micro-batches (spec.micro_batch_prompts x spec.micro_batch_rollouts): advantages always come from the
  full groups; the gradient is then summed (lax.scan) over micro-batches, each weighted by its share of the
  reduction's denominator (rollouts, or tokens for token_mean), so the update equals the single-batch one
  up to float round-off while only one micro-batch's activations are alive at a time. With prompts split
  over `num_shards` devices in contiguous blocks, micro-batch g takes micro_batch_prompts / num_shards
  prompts from every block, so each micro-batch is spread over all devices without moving data.

  Returns:
    (new state, metrics): loss, grad_norm, pass_rate, fraction_solved, response lengths, entropy, and
    `logprob_mismatch`, the largest |teacher-forced - sampling| log-prob (0 up to round-off on-policy).
  """
  tx = rl_optimizer(hyper, spec) if tx is None else tx
  advantages = advantage_fn(rewards, hyper)
  if not _static_zero(hyper.smoothing_gamma):
    mask = rollouts.mask.astype(jnp.float32)
    mean_logprob = jnp.sum(rollouts.logprobs * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)  # [P, N]
    advantages = estimators.apply_differential_smoothing(advantages, rewards, mean_logprob,
                                                         hyper.smoothing_gamma)
  if zero_prompts is not None:
    advantages = estimators.apply_self_filter(advantages, zero_prompts)
  total_tokens = jnp.maximum(jnp.sum(rollouts.mask.astype(jnp.float32)), 1.0)

  def rollout_loss(params, batch_prompts, tokens, mask, sampled_logprobs, batch_advantages):
    """(loss over these rollouts, (sum of their token entropies, largest log-prob mismatch))."""
    logprobs, entropy = sampling.sequence_logprobs_shared_prefix(
        model_fns, params, batch_prompts, tokens, temperature=temperature, with_entropy=True)
    loss = estimators.policy_gradient_loss(
        logprobs, mask, batch_advantages, reduction=spec.reduction, entropy=entropy,
        entropy_coef=hyper.entropy_coef)
    fmask = mask.astype(jnp.float32)
    # On-policy check: teacher-forced log-probs of the sampled tokens equal the sampler's up to
    # round-off; a large value means sampler and learner disagree (a cache or dtype problem).
    mismatch = jnp.max(jnp.abs(jax.lax.stop_gradient(logprobs) - sampled_logprobs) * fmask)
    return loss, (jnp.sum(entropy * fmask), mismatch)

  num_prompts, num_samples = rewards.shape
  cp = spec.micro_batch_prompts or num_prompts
  cn = spec.micro_batch_rollouts or num_samples
  if num_prompts % cp or num_samples % cn or cp % spec.num_shards:
    raise ValueError(f"micro_batch_prompts={cp} must divide the {num_prompts} prompts and be a multiple of "
                     f"num_shards={spec.num_shards}; micro_batch_rollouts={cn} must divide N={num_samples}.")
  if (cp, cn) == (num_prompts, num_samples):
    (loss, (entropy_sum, mismatch)), grads = jax.value_and_grad(rollout_loss, has_aux=True)(
        state.params, prompts, rollouts.tokens, rollouts.mask, rollouts.logprobs, advantages)
  else:
    loss, entropy_sum, mismatch, grads = _accumulate_micro_batches(
        rollout_loss, state.params, prompts, rollouts, advantages, cp, cn, spec.num_shards, spec.reduction,
        total_tokens)
  new_state = apply_gradients(state, grads, tx)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                     **rollout_metrics(rollouts, rewards, advantages), "entropy": entropy_sum / total_tokens,
                     "logprob_mismatch": mismatch,
                     # Diagnostic (not logged): groups whose advantages the rule refused (NaN: a reward it does
                     # not take), named in the message of the non-finite stop.
                     "_refused_groups": jnp.sum(jnp.any(jnp.isnan(advantages), axis=-1))}


def _accumulate_micro_batches(rollout_loss, params, prompts, rollouts, advantages, cp, cn, num_shards,
                              reduction, total_tokens):
  """Sums `rollout_loss`'s gradient over micro-batches of cp prompts x cn rollouts (see `update`)."""
  num_prompts, num_samples = advantages.shape
  gp, gn = num_prompts // cp, num_samples // cn
  local = cp // num_shards  # prompts of a micro-batch in each shard's block

  def split_prompt_axis(x):  # [P, ...] -> [gp, cp, ...]; micro-batch g: rows d P/D + g local + j
    x = x.reshape(num_shards, gp, local, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(gp, cp, *x.shape[3:])

  def split(x):  # [P, N, ...] -> [gp * gn, cp, cn, ...]
    trailing = x.shape[2:]
    x = split_prompt_axis(x).reshape(gp, cp, gn, cn, *trailing)
    return jnp.swapaxes(x, 1, 2).reshape(gp * gn, cp, cn, *trailing)

  def split_prompts(x):  # [P, ...] -> [gp * gn, cp, ...] (each prompt block repeated for its gn groups)
    x = split_prompt_axis(x)
    return jnp.broadcast_to(x[:, None], (gp, gn, *x.shape[1:])).reshape(gp * gn, *x.shape[1:])

  batches = (jax.tree_util.tree_map(split_prompts, prompts), split(rollouts.tokens), split(rollouts.mask),
             split(rollouts.logprobs), split(advantages))

  def weighted_loss(p, batch):
    loss, aux = rollout_loss(p, *batch)
    mask = batch[2]
    weight = jnp.sum(mask.astype(jnp.float32)) / total_tokens if reduction == "token_mean" else 1.0 / (gp * gn)
    return loss * weight, aux

  def body(carry, batch):
    grads_acc, loss_acc, entropy_acc, mismatch_acc = carry
    (loss, (entropy_sum, mismatch)), grads = jax.value_and_grad(weighted_loss, has_aux=True)(params, batch)
    grads_acc = jax.tree_util.tree_map(lambda a, g: a + g.astype(a.dtype), grads_acc, grads)
    return (grads_acc, loss_acc + loss, entropy_acc + entropy_sum, jnp.maximum(mismatch_acc, mismatch)), None

  zero = jnp.zeros((), jnp.float32)
  init = (jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params), zero, zero, zero)
  (grads, loss, entropy_sum, mismatch), _ = jax.lax.scan(body, init, batches)
  grads = jax.tree_util.tree_map(lambda g, p: g.astype(p.dtype), grads, params)
  return loss, entropy_sum, mismatch, grads


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
            advantage_fn: AdvantageFn) -> tuple[TrainState, dict]:
  """One on-policy RL step on device (pure): sample, verify, advantages, update.

  Args:
    spec, model_fns, state: the static settings, the policy, its TrainState.
    batch: the task's batch [P, ...] (e.g. maze grids).
    rng: this step's sampling key. temperature: the sampling temperature.
    hyper: the run's hyperparameters (Python numbers, or a population member's arrays under vmap).
    prompt_fn: batch -> prompts [P, L] (jittable). verifier: (batch, responses [P, N, M]) -> rewards [P, N].
    advantage_fn: (rewards, hyper) -> advantages.

  A member whose SELF flag is False keeps all its advantages and reports greedy_solved_fraction 0.
  """
  prompts = prompt_fn(batch)
  samples = sample(spec, model_fns, state.params, prompts, rng, temperature)
  rewards = verifier(batch, samples.rollouts.tokens)  # [P, N]
  greedy_correct = None if samples.greedy is None else verifier(batch, samples.greedy.tokens)[:, 0]
  zero_prompts = self_zero_prompts(hyper, greedy_correct)
  new_state, step_metrics = update(spec, model_fns, state, prompts, samples.rollouts, rewards, temperature,
                                   hyper, advantage_fn=advantage_fn, zero_prompts=zero_prompts)
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


def make_rl_step(spec: RLSpec, model_fns, hyper: Hyper, *, prompt_fn, verifier, advantage_fn,
                 state_sharding: PyTree | None = None, batch_sharding: NamedSharding | None = None):
  """Jitted `step(state, batch, rng, temperature) -> (state, metrics)` of one run (state donated).

  `hyper` holds Python numbers (constants of the compiled step). With `state_sharding` (a TrainState of
  shardings, see sharding.init_sharded) and `batch_sharding` (the leading axis split over the mesh), the
  step is jitted with those in/out shardings: batch, prompts and rollouts split over prompts, rng and
  temperature replicated.
  """
  if batch_sharding is not None:
    spec = dataclasses.replace(spec, num_shards=sharding.num_batch_shards(batch_sharding.mesh))

  def step(state, batch, rng, temperature):
    return rl_step(spec, model_fns, state, batch, rng, temperature, hyper, prompt_fn=prompt_fn,
                   verifier=verifier, advantage_fn=advantage_fn)

  return jit_step(step, state_sharding, batch_sharding, 2)


def rollouts_sharding(batch_sharding: NamedSharding) -> sampling.Rollouts:
  """Shardings of a Rollouts pytree split over prompts (its step count replicated)."""
  rep = sharding.replicated(batch_sharding.mesh)
  return sampling.Rollouts(tokens=batch_sharding, logprobs=batch_sharding, mask=batch_sharding,
                           lengths=batch_sharding, stopped=batch_sharding, num_steps=rep)


def make_update(spec: RLSpec, model_fns, hyper: Hyper, *, advantage_fn, state_sharding: PyTree | None = None,
                batch_sharding: NamedSharding | None = None):
  """Jitted `update(state, prompts, rollouts, rewards, zero_prompts, temperature) -> (state, metrics)`.

  `update` of this module for rollouts verified on the host (state donated); `zero_prompts` is SELF's [P]
  filter or None. With shardings, prompts, rollouts, rewards and the filter are split over prompts.
  """
  if batch_sharding is not None:
    spec = dataclasses.replace(spec, num_shards=sharding.num_batch_shards(batch_sharding.mesh))

  def fn(state, prompts, rollouts, rewards, zero_prompts, temperature):
    zero = self_zero_prompts(hyper, zero_prompts)
    new_state, metrics = update(spec, model_fns, state, prompts, rollouts, rewards, temperature, hyper,
                                advantage_fn=advantage_fn, zero_prompts=zero)
    if zero is not None:
      metrics["greedy_solved_fraction"] = jnp.mean(zero.astype(jnp.float32))
    return new_state, metrics

  if state_sharding is None:
    return jax.jit(fn, donate_argnums=0)
  rep = sharding.replicated(batch_sharding.mesh)
  return jax.jit(fn, donate_argnums=0,
                 in_shardings=(state_sharding, batch_sharding, rollouts_sharding(batch_sharding),
                               batch_sharding, batch_sharding, rep),
                 out_shardings=(state_sharding, rep))


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
