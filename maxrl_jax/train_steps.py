"""The jitted training steps: supervised next-token step (SFT) and the on-policy RL step.

Both are pure functions `(state, batch, rng) -> (new_state, metrics)` built by a factory that closes over
the model functions, the optimizer and the static sizes, jitted with the state donated. The RL step runs
the whole loop body on device:

    sample N rollouts per prompt (prefix-shared KV cache) -> verify -> advantages from the registry
    -> policy-gradient loss (teacher-forced log-probs, prompt pass shared by the N rollouts) -> AdamW update.
"""

from __future__ import annotations

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
Verifier = Callable[[Array, Array], Array]  # (task batch [P, ...], responses [P, N, M]) -> rewards [P, N]


@flax.struct.dataclass
class TrainState:
  """Everything a phase needs to resume: step, parameters, optimizer state.

  Keys are not stored: every step's key is `fold_in(phase_key, step)` of a key derived from config.seed,
  so a resumed run draws exactly the keys an uninterrupted run would.
  """

  step: Array
  params: PyTree
  opt_state: PyTree


def adamw(learning_rate: float | optax.Schedule, b1: float, b2: float, weight_decay: float,
          grad_clip: float) -> optax.GradientTransformation:
  """AdamW with global-norm gradient clipping (clip <= 0 disables it)."""
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay))
  return optax.chain(*parts)


def init_state(params: PyTree, tx: optax.GradientTransformation) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


def _apply_gradients(state: TrainState, grads: PyTree, tx: optax.GradientTransformation) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                    opt_state=opt_state)


def next_token_loss(model_fns, params, inputs: Array, loss_mask: Array) -> tuple[Array, dict]:
  """Mean cross-entropy over the masked target tokens.

  Args:
    inputs: [B, T] int tokens (prompt followed by target).
    loss_mask: [B, T] bool, True on tokens to predict; logits at t - 1 predict inputs[:, t].

  Returns:
    (loss, {"token_accuracy": ...}).
  """
  logits = model_fns.forward(params, inputs[:, :-1])  # [B, T-1, V]
  targets, weights = inputs[:, 1:], loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / denom
  return jnp.sum(nll * weights) / denom, {"token_accuracy": accuracy}


def _static_zero(value) -> bool:
  """True for a Python (or numpy) number equal to 0; False for any other number and for traced arrays."""
  return isinstance(value, (int, float)) and value == 0


def _jit_step(fn, state_sharding, batch_sharding, num_replicated_args: int):
  """jit(fn) with the state (argument 0) donated; with shardings: (state, batch, replicated...) in,
  (state, replicated metrics) out. Without them (one device) plain jit, as before."""
  if state_sharding is None and batch_sharding is None:
    return jax.jit(fn, donate_argnums=0)
  if state_sharding is None or batch_sharding is None:
    raise ValueError("Pass both state_sharding and batch_sharding, or neither.")
  rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
  in_shardings = (state_sharding, batch_sharding) + (rep,) * num_replicated_args
  return jax.jit(fn, donate_argnums=0, in_shardings=in_shardings, out_shardings=(state_sharding, rep))


def make_sft_step(model_fns, tx: optax.GradientTransformation, *, state_sharding: PyTree | None = None,
                  batch_sharding: NamedSharding | None = None):
  """Returns jitted `sft_step(state, batch) -> (state, metrics)`; batch has "inputs" and "loss_mask".

  With `state_sharding` (a TrainState of shardings, see sharding.init_sharded) and `batch_sharding` (the
  leading axis split over the mesh), the step is jitted with those in/out shardings, metrics replicated.
  """

  return _jit_step(functools.partial(sft_step, model_fns, tx), state_sharding, batch_sharding, 0)


def sft_step(model_fns, tx: optax.GradientTransformation, state: TrainState, batch: dict
             ) -> tuple[TrainState, dict]:
  """One supervised step (pure; `make_sft_step` jits it, a population vmaps it over seeds)."""
  (loss, aux), grads = jax.value_and_grad(
      lambda p: next_token_loss(model_fns, p, batch["inputs"], batch["loss_mask"]), has_aux=True)(
          state.params)
  new_state = _apply_gradients(state, grads, tx)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}


def policy_update(
    model_fns,
    tx: optax.GradientTransformation,
    state: TrainState,
    prompts: Array,
    rollouts: sampling.Rollouts,
    rewards: Array,
    temperature: Array,
    *,
    advantage_fn: estimators.AdvantageFn,
    reduction: str = "sequence_sum",
    entropy_coef: float = 0.0,
    smoothing_gamma: float = 0.0,
    zero_prompts: Array | None = None,
    micro_batch_prompts: int | None = None,
    micro_batch_rollouts: int | None = None,
    num_shards: int = 1,
) -> tuple[TrainState, dict]:
  """One policy-gradient update from verified rollouts (pure; jit it or call it inside a jitted step).

  Args:
    prompts: [P, L] int (or left-padded `sampling.PaddedPrompts`), the prompts the rollouts continue.
    rollouts: `sampling.Rollouts` with [P, N, M] tokens / logprobs / mask, sampled from `state.params`.
    rewards: [P, N] verifier rewards.
    temperature: the sampling temperature (log-probs are those of logits / temperature).
    advantage_fn: rewards [P, N] -> advantages [P, N] (from estimators.get_advantage_fn).
    reduction, entropy_coef: see estimators.policy_gradient_loss.
    smoothing_gamma: Differential Smoothing (a baseline of the paper's tables): with gamma > 0 the
      advantage becomes A_i - gamma r_i lbar_i + gamma (1 - r_i) lbar_i, lbar_i the mean token log-prob of
      rollout i under the sampling policy. A Python 0 skips it; an array (a population member's value,
      possibly 0) is applied, which leaves the advantages unchanged where it is 0.
    entropy_coef may likewise be an array (see estimators.policy_gradient_loss).
    zero_prompts: optional [P] bool; the advantages of these prompts are set to 0 (SELF: prompts whose
      greedy decode is already correct).
    micro_batch_prompts, micro_batch_rollouts: optional gradient accumulation (static). Advantages always
      come from the full groups; the gradient is then summed (lax.scan) over micro-batches of
      micro_batch_prompts prompts x micro_batch_rollouts rollouts, each weighted by its share of the
      reduction's denominator (rollouts, or tokens for token_mean), so the update equals the single-batch
      one up to float round-off while only one micro-batch's activations are alive at a time. None (or the
      full size) for both: one batch.
    num_shards: with micro-batches and prompts split over `num_shards` devices in contiguous blocks,
      micro-batch g takes micro_batch_prompts / num_shards prompts from every block, so each micro-batch is
      spread over all devices without moving data.

  Returns:
    (new state, metrics): loss, grad_norm, pass_rate, fraction_solved, response lengths, entropy, and
    `logprob_mismatch`, the largest |teacher-forced - sampling| log-prob (0 up to round-off on-policy).
  """
  advantages = advantage_fn(rewards)
  if not _static_zero(smoothing_gamma):
    mask = rollouts.mask.astype(jnp.float32)
    mean_logprob = jnp.sum(rollouts.logprobs * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)  # [P, N]
    advantages = estimators.apply_differential_smoothing(advantages, rewards, mean_logprob, smoothing_gamma)
  if zero_prompts is not None:
    advantages = estimators.apply_self_filter(advantages, zero_prompts)
  total_tokens = jnp.maximum(jnp.sum(rollouts.mask.astype(jnp.float32)), 1.0)

  def rollout_loss(params, batch_prompts, tokens, mask, sampled_logprobs, batch_advantages):
    """(loss over these rollouts, (sum of their token entropies, largest log-prob mismatch))."""
    logprobs, entropy = sampling.sequence_logprobs_shared_prefix(
        model_fns, params, batch_prompts, tokens, temperature=temperature, with_entropy=True)
    loss = estimators.policy_gradient_loss(
        logprobs, mask, batch_advantages, reduction=reduction, entropy=entropy, entropy_coef=entropy_coef)
    fmask = mask.astype(jnp.float32)
    # On-policy check: teacher-forced log-probs of the sampled tokens equal the sampler's up to
    # round-off; a large value means sampler and learner disagree (a cache or dtype problem).
    mismatch = jnp.max(jnp.abs(jax.lax.stop_gradient(logprobs) - sampled_logprobs) * fmask)
    return loss, (jnp.sum(entropy * fmask), mismatch)

  num_prompts, num_samples = rewards.shape
  cp, cn = micro_batch_prompts or num_prompts, micro_batch_rollouts or num_samples
  if num_prompts % cp or num_samples % cn or cp % num_shards:
    raise ValueError(f"micro_batch_prompts={cp} must divide the {num_prompts} prompts and be a multiple of "
                     f"num_shards={num_shards}; micro_batch_rollouts={cn} must divide N={num_samples}.")
  if (cp, cn) == (num_prompts, num_samples):
    (loss, (entropy_sum, mismatch)), grads = jax.value_and_grad(rollout_loss, has_aux=True)(
        state.params, prompts, rollouts.tokens, rollouts.mask, rollouts.logprobs, advantages)
  else:
    loss, entropy_sum, mismatch, grads = _accumulate_micro_batches(
        rollout_loss, state.params, prompts, rollouts, advantages, cp, cn, num_shards, reduction, total_tokens)
  new_state = _apply_gradients(state, grads, tx)
  return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads),
                     **rollout_metrics(rollouts, rewards, advantages), "entropy": entropy_sum / total_tokens,
                     "logprob_mismatch": mismatch}


def _accumulate_micro_batches(rollout_loss, params, prompts, rollouts, advantages, cp, cn, num_shards,
                              reduction, total_tokens):
  """Sums `rollout_loss`'s gradient over micro-batches of cp prompts x cn rollouts (see policy_update)."""
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


def make_rl_step(
    model_fns,
    tx: optax.GradientTransformation,
    *,
    prompt_fn: Callable[[Array], Array],
    verifier: Verifier,
    advantage_fn: estimators.AdvantageFn,
    num_samples: int,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...],
    reduction: str = "sequence_sum",
    entropy_coef: float = 0.0,
    pad_id: int = 0,
    smoothing_gamma: float = 0.0,
    self_filter: bool = False,
    micro_batch_prompts: int | None = None,
    micro_batch_rollouts: int | None = None,
    state_sharding: PyTree | None = None,
    batch_sharding: NamedSharding | None = None,
):
  """Returns jitted `rl_step(state, tasks, rng, temperature) -> (state, metrics)`, all on device.

  Args:
    model_fns: `maxrl_jax.sampling.ModelFns` (e.g. DecoderFns).
    tx: optimizer.
    prompt_fn: tasks [P, ...] -> prompts [P, L] int (e.g. maze.encode_prompts).
    verifier: jittable (tasks [P, ...], responses [P, N, M]) -> rewards [P, N] in {0, 1}.
    advantage_fn: rewards [P, N] -> advantages [P, N] (from estimators.get_advantage_fn).
    num_samples: N rollouts per prompt. max_new_tokens: response cap M. stop_tokens: end a rollout.
    reduction, entropy_coef: see estimators.policy_gradient_loss.
    smoothing_gamma: Differential Smoothing's gamma (0 disables), see `policy_update`.
    self_filter: SELF: decode each prompt greedily with the same sampler and zero the advantages of
      prompts whose greedy decode the verifier accepts.
    micro_batch_prompts, micro_batch_rollouts: gradient accumulation over micro-batches (see
      `policy_update`); None: the update's forward/backward runs on all P x N rollouts at once.
    state_sharding, batch_sharding: optional; as in `make_sft_step` (tasks, prompts and rollouts are split
      over prompts, rng and temperature replicated).

  The step is on-policy: rollouts are sampled from `state.params` and one update is made (see
  `policy_update`). For a verifier that runs on the host, call `sampling.sample_rollouts`, verify, then a
  jitted `policy_update`.
  """

  num_shards = 1 if batch_sharding is None else sharding.num_batch_shards(batch_sharding.mesh)
  step = functools.partial(
      rl_step, model_fns=model_fns, tx=tx, prompt_fn=prompt_fn, verifier=verifier, advantage_fn=advantage_fn,
      num_samples=num_samples, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, reduction=reduction,
      entropy_coef=entropy_coef, pad_id=pad_id, smoothing_gamma=smoothing_gamma, self_filter=self_filter,
      micro_batch_prompts=micro_batch_prompts, micro_batch_rollouts=micro_batch_rollouts, num_shards=num_shards)
  return _jit_step(step, state_sharding, batch_sharding, 2)


def rl_step(state: TrainState, tasks: Array, rng: Array, temperature: Array, *, model_fns,
            tx: optax.GradientTransformation, prompt_fn, verifier: Verifier, advantage_fn: estimators.AdvantageFn,
            num_samples: int, max_new_tokens: int, stop_tokens: tuple[int, ...], reduction: str = "sequence_sum",
            entropy_coef: float | Array = 0.0, pad_id: int = 0, smoothing_gamma: float | Array = 0.0,
            self_filter: bool | Array = False, micro_batch_prompts: int | None = None,
            micro_batch_rollouts: int | None = None, num_shards: int = 1,
            lockstep_axis: str | None = None) -> tuple[TrainState, dict]:
  """One on-policy RL step (pure): sample, verify, advantages, update. See `make_rl_step` for the arguments.

  A population (maxrl_jax/population.py) vmaps it over members; there `entropy_coef`, `smoothing_gamma` and
  `self_filter` may be per-member arrays: a member whose `self_filter` is False keeps all its advantages, and
  its `greedy_solved_fraction` is reported as 0. `lockstep_axis` names the vmap axis the sampler's decode
  loop runs in lockstep over (sampling.sample_rollouts).
  """
  prompts = prompt_fn(tasks)
  rollouts = sampling.sample_rollouts(
      model_fns, state.params, prompts, rng, num_rollouts=num_samples, max_new_tokens=max_new_tokens,
      temperature=temperature, stop_tokens=stop_tokens, pad_id=pad_id, lockstep_axis=lockstep_axis)
  rewards = verifier(tasks, rollouts.tokens)  # [P, N]
  zero_prompts = None
  if self_filter is not False:
    greedy = sampling.sample_rollouts(
        model_fns, state.params, prompts, rng, num_rollouts=1, max_new_tokens=max_new_tokens,
        temperature=0.0, stop_tokens=stop_tokens, pad_id=pad_id, lockstep_axis=lockstep_axis)
    zero_prompts = verifier(tasks, greedy.tokens)[:, 0] > 0  # [P]
    if self_filter is not True:  # A per-member flag.
      zero_prompts = jnp.logical_and(zero_prompts, self_filter)
  new_state, step_metrics = policy_update(
      model_fns, tx, state, prompts, rollouts, rewards, temperature, advantage_fn=advantage_fn,
      reduction=reduction, entropy_coef=entropy_coef, smoothing_gamma=smoothing_gamma,
      zero_prompts=zero_prompts, micro_batch_prompts=micro_batch_prompts,
      micro_batch_rollouts=micro_batch_rollouts, num_shards=num_shards)
  if zero_prompts is not None:
    step_metrics["greedy_solved_fraction"] = jnp.mean(zero_prompts.astype(jnp.float32))
  return new_state, step_metrics


def make_eval_fn(
    model_fns,
    *,
    prompt_fn: Callable[[Array], Array],
    verifier: Verifier,
    num_samples: int,
    max_new_tokens: int,
    stop_tokens: tuple[int, ...],
    pad_id: int = 0,
    params_sharding: PyTree | None = None,
    batch_sharding: NamedSharding | None = None,
):
  """Returns jitted `eval_fn(params, tasks [P, ...], rng, temperature) -> correct counts [P] int32`.

  With `params_sharding` and `batch_sharding`, tasks are split over prompts and the counts come back
  replicated (readable on every host).
  """

  eval_fn = functools.partial(eval_counts, model_fns=model_fns, prompt_fn=prompt_fn, verifier=verifier,
                              num_samples=num_samples, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                              pad_id=pad_id)
  if params_sharding is None and batch_sharding is None:
    return jax.jit(eval_fn)
  rep = NamedSharding(batch_sharding.mesh, PartitionSpec())
  return jax.jit(eval_fn, in_shardings=(params_sharding, batch_sharding, rep, rep), out_shardings=rep)


def eval_counts(params, tasks: Array, rng: Array, temperature: Array, *, model_fns, prompt_fn, verifier: Verifier,
                num_samples: int, max_new_tokens: int, stop_tokens: tuple[int, ...], pad_id: int = 0,
                lockstep_axis: str | None = None) -> Array:
  """Correct samples per task [P] int32 out of `num_samples` (pure; `make_eval_fn` jits it)."""
  rollouts = sampling.sample_rollouts(
      model_fns, params, prompt_fn(tasks), rng, num_rollouts=num_samples, max_new_tokens=max_new_tokens,
      temperature=temperature, stop_tokens=stop_tokens, pad_id=pad_id, lockstep_axis=lockstep_axis)
  return jnp.sum(verifier(tasks, rollouts.tokens), axis=-1).astype(jnp.int32)
