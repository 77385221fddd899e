r"""In-flight (continuous) batching of rollouts: S decode slots, each refilled as soon as its rollout finishes.

`maxrl_jax.sampling.sample_rollouts` decodes the P x N rollouts of a call together until the longest one
stops: a call costs P N x max(length) row-steps, of which only sum(length) produce tokens. With response
lengths spread over [100, 2048] (GSM8K-like) about 47% of the row-steps go to rollouts that have already
finished (scripts/batching_waste.py). `sample_rollouts_inflight` keeps S rows busy instead:

    prefill the P prompts once: prefix caches [P, L, K, D] per layer, next-token logits [P, V]
    queue: rollouts r = p N + n (prompt p, rollout n), in that order
    while the queue is not empty or a slot is busy (one lax.while_loop iteration):
      1. refill: each free slot s (in slot order) takes the next queued rollout r: the prompt's prefix cache
         is copied into the slot's own prefix cache [L, K, D], its logits are the prompt's prefill logits,
         and its position t_s = 0;
      2. sample: each busy slot draws token t_s of its rollout from its logits with the key
         fold_in(fold_in(fold_in(rng, prompt_ids[p]), n), t_s) and writes it, with its log-prob, to the
         output row r [M];
      3. the rollout is done after a stop token or its M-th token; its slot is free for step 1;
      4. decode: one batched call of the model's `decode` over all S slots (vmapped: slot s feeds its new
         token at its own suffix slot t_s, attending to its own prefix and suffix caches) gives every slot's
         next logits; t_s += 1.

Shapes: slot state prefix [S, 1, L, K, D] and suffix [S, 1, 1, M, K, D] per layer (the model's caches with
P = N = 1, stacked over slots), logits [S, V]; outputs [P N, M], returned as `sampling.Rollouts` [P, N, M].

Cost: about sum(lengths) / S iterations plus the tail of the last rollouts, each one decode of S rows (one
wasted row per rollout: the decode of its stop token), against sum over calls of max(length) decode steps of
P N rows for static batching. Memory: KV caches of (P + S) L prompt tokens (every slot holds its own copy of
its prompt's prefix) and S M suffix tokens, against P L + P N M for static batching of the P x N at once.

Guarantees:
- Each rollout's randomness depends only on (rng, prompt_ids[p], n, token index): its tokens depend on its
  prompt, the parameters and that key schedule alone, not on S, on the order in which rollouts finish, or
  on the other rollouts. `sample_rollouts_static` is static batching with the same key schedule; both return
  the same tokens for the same arguments (tested exactly on tiny models; the logits of the two batch layouts
  agree to float round-off, so a near-tie between two tokens could in principle break differently).
- The `Rollouts` conventions are those of `maxrl_jax.sampling` (slot i of a rollout at position L + i, or
  lengths[p] + i for left-padded `PaddedPrompts`; the stop token kept and masked in; pad_id, mask False and
  log-prob 0 after it; the same sampling distribution, temperature 0 greedy). `num_steps` is the longest
  rollout's length, as for static batching; `InflightStats.iterations` counts the batched decode steps.
  The key schedule differs from `sampling.sample_rollouts` (fold_in(rng, i) shared by every rollout), so the
  tokens differ from it except when greedy.

Model interface: `prefill`, `init_suffix_cache` and `decode` of `maxrl_jax.sampling.ModelFns`; every leaf of
the prefix cache has the prompt axis first, every leaf of the suffix cache [prompts, rollouts] first, and
`decode` must accept a traced step under `jax.vmap` (`DecoderFns` does).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp

from maxrl_jax import sampling

Array = jax.Array
PyTree = Any


@flax.struct.dataclass
class InflightStats:
  """Work of one in-flight sampling call.

  Attributes:
    iterations: [] int32, batched decode steps run (each one decode over all slots).
    num_slots: S, rows decoded together (static).
  """

  iterations: Array
  num_slots: int = flax.struct.field(pytree_node=False)


@flax.struct.dataclass
class _SlotState:
  """Carry of the in-flight loop (S slots, R = P N rollouts, M slots per rollout)."""

  iterations: Array  # [] int32: batched decode steps run
  next_rollout: Array  # [] int32: the first rollout still queued
  slot_rollout: Array  # [S] int32: the rollout r = p N + n a busy slot holds
  slot_pos: Array  # [S] int32: tokens of that rollout generated so far (the next token's index)
  busy: Array  # [S] bool
  logits: Array  # [S, V] float32: next-token logits of each busy slot
  prefix: PyTree  # the model's prefix cache with P = 1, stacked over slots: leaves [S, 1, ...]
  suffix: PyTree  # the model's suffix cache with P = N = 1, stacked over slots: leaves [S, 1, 1, ...]
  tokens: Array  # [R, M] int32
  logprobs: Array  # [R, M] float32
  lengths: Array  # [R] int32
  stopped: Array  # [R] bool


def rollout_keys(rng: Array, prompt_ids: Array, num_rollouts: int) -> Array:
  """Per-rollout keys [P, N]: fold_in(fold_in(rng, prompt_ids[p]), n); token i uses fold_in(key, i)."""
  fold = jax.vmap(jax.random.fold_in, in_axes=(None, 0))
  return jax.vmap(lambda p: fold(jax.random.fold_in(rng, p), jnp.arange(num_rollouts)))(prompt_ids)


def select_tokens(keys: Array, logits: Array, temperature: Array, top_k: int | None,
                  top_p: float | None) -> tuple[Array, Array]:
  """One token per row with its own key: keys [B], logits [B, V] -> (tokens [B] int32, log-probs [B] float32).

  The distribution is `sampling.sampling_logprobs(logits, temperature, top_k, top_p)`; temperature <= 0 is
  greedy (argmax of the raw logits, log-prob 0), as in `sampling.sample_rollouts`. Row b depends only on
  keys[b] and logits[b].
  """
  greedy = temperature <= 0
  logp = sampling.sampling_logprobs(logits, jnp.where(greedy, 1.0, temperature), top_k=top_k, top_p=top_p)
  sampled = jax.vmap(jax.random.categorical)(keys, logp)
  tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
  token_logp = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
  return tokens, jnp.where(greedy, 0.0, token_logp)


def _as_prompts(prompts: Array | sampling.PaddedPrompts) -> Array | sampling.PaddedPrompts:
  """int32 prompts, plain or left-padded (outside jit)."""
  if isinstance(prompts, sampling.PaddedPrompts):
    return sampling.PaddedPrompts(tokens=jnp.asarray(prompts.tokens, jnp.int32),
                                  lengths=jnp.asarray(prompts.lengths, jnp.int32))
  return jnp.asarray(prompts, jnp.int32)


def _prefill(model_fns, params, prompts: Array | sampling.PaddedPrompts) -> tuple[Array, PyTree]:
  """The prompt pass: (next-token logits [P, V], prefix cache), with the padding mask for PaddedPrompts."""
  if isinstance(prompts, sampling.PaddedPrompts):
    return model_fns.prefill(params, prompts.tokens, attention_mask=prompts.attention_mask())
  return model_fns.prefill(params, prompts)


def _prompt_ids(prompt_ids: Array | None, num_prompts: int) -> Array:
  if prompt_ids is None:
    return jnp.arange(num_prompts, dtype=jnp.int32)
  prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
  if prompt_ids.shape != (num_prompts,):
    raise ValueError(f"prompt_ids has shape {prompt_ids.shape}; it needs one id per prompt: ({num_prompts},).")
  return prompt_ids


_STATIC = ("model_fns", "num_rollouts", "max_new_tokens", "num_slots", "stop_tokens", "top_k", "top_p", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_inflight(model_fns, params, prompts, rng, temperature, prompt_ids, *, num_rollouts, max_new_tokens,
                     num_slots, stop_tokens, top_k, top_p, pad_id):
  num_prompts = prompts.shape[0]
  num_total = num_prompts * num_rollouts
  first_logits, prompt_prefix = _prefill(model_fns, params, prompts)  # [P, V], leaves [P, ...]
  keys = rollout_keys(rng, prompt_ids, num_rollouts).reshape(num_total)  # [R]
  stop_ids = jnp.asarray(stop_tokens, jnp.int32)
  slots = jnp.arange(num_slots)
  one_prefix = jax.tree_util.tree_map(lambda x: x[:1], prompt_prefix)
  one_suffix = model_fns.init_suffix_cache(one_prefix, 1, max_new_tokens)  # leaves [1, 1, ...]
  stack = lambda x: jnp.broadcast_to(x[None], (num_slots,) + x.shape)  # noqa: E731

  def refill(state: _SlotState) -> _SlotState:
    free = ~state.busy
    rank = jnp.cumsum(free) - 1  # order among the free slots
    take = free & (rank < num_total - state.next_rollout)
    rollout = jnp.where(take, state.next_rollout + rank, state.slot_rollout)
    prompt = jnp.minimum(rollout // num_rollouts, num_prompts - 1)
    target = jnp.where(take, slots, num_slots)  # out of range: not written

    def copy(prefix):
      return jax.tree_util.tree_map(lambda slot_x, x: slot_x.at[target].set(x[prompt][:, None], mode="drop"),
                                    prefix, prompt_prefix)

    return state.replace(
        next_rollout=state.next_rollout + jnp.sum(take, dtype=jnp.int32), slot_rollout=rollout,
        slot_pos=jnp.where(take, 0, state.slot_pos), busy=state.busy | take,
        logits=jnp.where(take[:, None], first_logits[prompt], state.logits),
        prefix=jax.lax.cond(jnp.any(take), copy, lambda prefix: prefix, state.prefix))

  def decode_slot(prefix, suffix, token, pos):
    logits, suffix = model_fns.decode(params, token.reshape(1, 1, 1), prefix, suffix, pos)
    return logits[0, 0, 0], suffix

  def body(state: _SlotState) -> _SlotState:
    state = refill(state)
    busy, pos = state.busy, state.slot_pos
    token_keys = jax.vmap(jax.random.fold_in)(keys[state.slot_rollout], pos)
    tokens, logp = select_tokens(token_keys, state.logits, temperature, top_k, top_p)
    tokens = jnp.where(busy, tokens, pad_id)
    is_stop = busy & jnp.any(tokens[:, None] == stop_ids, axis=-1)
    finished = busy & (is_stop | (pos + 1 >= max_new_tokens))
    row = jnp.where(busy, state.slot_rollout, num_total)  # out of range: not written
    done_row = jnp.where(finished, state.slot_rollout, num_total)
    logits, suffix = jax.vmap(decode_slot)(state.prefix, state.suffix, tokens, pos)
    return state.replace(
        iterations=state.iterations + 1,
        slot_pos=pos + busy.astype(jnp.int32), busy=busy & ~finished, logits=logits, suffix=suffix,
        tokens=state.tokens.at[row, pos].set(tokens, mode="drop"),
        logprobs=state.logprobs.at[row, pos].set(jnp.where(busy, logp, 0.0), mode="drop"),
        lengths=state.lengths.at[done_row].set(pos + 1, mode="drop"),
        stopped=state.stopped.at[done_row].set(is_stop, mode="drop"))

  def cond(state: _SlotState) -> Array:
    return (state.next_rollout < num_total) | jnp.any(state.busy)

  zero = jnp.zeros((), jnp.int32)
  state = _SlotState(
      iterations=zero, next_rollout=zero, slot_rollout=jnp.zeros(num_slots, jnp.int32),
      slot_pos=jnp.zeros(num_slots, jnp.int32), busy=jnp.zeros(num_slots, bool),
      logits=jnp.zeros((num_slots, first_logits.shape[-1]), first_logits.dtype),
      prefix=jax.tree_util.tree_map(lambda x: jnp.zeros((num_slots,) + x.shape, x.dtype), one_prefix),
      suffix=jax.tree_util.tree_map(stack, one_suffix),
      tokens=jnp.full((num_total, max_new_tokens), pad_id, jnp.int32),
      logprobs=jnp.zeros((num_total, max_new_tokens), jnp.float32),
      lengths=jnp.zeros(num_total, jnp.int32), stopped=jnp.zeros(num_total, bool))
  state = jax.lax.while_loop(cond, body, state)
  shape = (num_prompts, num_rollouts)
  lengths = state.lengths.reshape(shape)
  rollouts = sampling.Rollouts(
      tokens=state.tokens.reshape(shape + (max_new_tokens,)),
      logprobs=state.logprobs.reshape(shape + (max_new_tokens,)),
      mask=jnp.arange(max_new_tokens) < lengths[..., None], lengths=lengths,
      stopped=state.stopped.reshape(shape), num_steps=jnp.max(lengths))
  return rollouts, InflightStats(iterations=state.iterations, num_slots=num_slots)


def sample_rollouts_inflight_with_stats(
    model_fns: sampling.ModelFns, params: PyTree, prompts: Array | sampling.PaddedPrompts, rng: Array, *,
    num_rollouts: int, max_new_tokens: int, num_slots: int, temperature: Array | float = 1.0,
    stop_tokens: Sequence[int] = (), top_k: int | None = None, top_p: float | None = None, pad_id: int = 0,
    prompt_ids: Array | None = None) -> tuple[sampling.Rollouts, InflightStats]:
  """`sample_rollouts_inflight` and the work it did (`InflightStats`)."""
  stop_tokens = sampling.check_options(num_rollouts, max_new_tokens, stop_tokens, top_k, top_p)
  if num_slots < 1:
    raise ValueError(f"num_slots={num_slots} must be >= 1 (rows decoded together).")
  prompts = _as_prompts(prompts)
  return _sample_inflight(
      model_fns, params, prompts, rng, jnp.asarray(temperature, jnp.float32),
      _prompt_ids(prompt_ids, prompts.shape[0]), num_rollouts=num_rollouts, max_new_tokens=max_new_tokens,
      num_slots=num_slots, stop_tokens=stop_tokens, top_k=top_k, top_p=top_p, pad_id=pad_id)


def sample_rollouts_inflight(
    model_fns: sampling.ModelFns, params: PyTree, prompts: Array | sampling.PaddedPrompts, rng: Array, *,
    num_rollouts: int, max_new_tokens: int, num_slots: int, temperature: Array | float = 1.0,
    stop_tokens: Sequence[int] = (), top_k: int | None = None, top_p: float | None = None, pad_id: int = 0,
    prompt_ids: Array | None = None) -> sampling.Rollouts:
  """Samples `num_rollouts` continuations of each prompt with `num_slots` rows refilled in flight (jitted).

  Args:
    model_fns: hashable `ModelFns` (e.g. `DecoderFns(config)`); static.
    params: model parameters.
    prompts: [P, L] int, or left-padded `sampling.PaddedPrompts`.
    rng: PRNG key; token i of rollout n of prompt p uses fold_in(fold_in(fold_in(rng, prompt_ids[p]), n), i).
    num_rollouts: N (static). max_new_tokens: M, slots per rollout (static).
    num_slots: S, rows decoded together (static); S >= P N decodes everything at once (static batching).
    temperature: scalar, may be traced; 0 is greedy. top_k, top_p: as `sampling.sample_rollouts` (static).
    stop_tokens: ids that end a rollout (static). pad_id: filler after the stop token (static).
    prompt_ids: [P] int, the prompts' ids in the key schedule (default 0..P-1); pass global indices to make
      the draws independent of how a batch of prompts is split into calls.

  Returns:
    `sampling.Rollouts` with [P, N, M] tokens / logprobs / mask (see the module docstring).
  """
  rollouts, _ = sample_rollouts_inflight_with_stats(
      model_fns, params, prompts, rng, num_rollouts=num_rollouts, max_new_tokens=max_new_tokens,
      num_slots=num_slots, temperature=temperature, stop_tokens=stop_tokens, top_k=top_k, top_p=top_p,
      pad_id=pad_id, prompt_ids=prompt_ids)
  return rollouts


@functools.partial(jax.jit, static_argnames=tuple(s for s in _STATIC if s != "num_slots"))
def _sample_static(model_fns, params, prompts, rng, temperature, prompt_ids, *, num_rollouts, max_new_tokens,
                   stop_tokens, top_k, top_p, pad_id):
  num_prompts = prompts.shape[0]
  rows = num_prompts * num_rollouts
  shape = (num_prompts, num_rollouts)
  last_logits, prefix = _prefill(model_fns, params, prompts)  # [P, V]
  suffix = model_fns.init_suffix_cache(prefix, num_rollouts, max_new_tokens)
  keys = rollout_keys(rng, prompt_ids, num_rollouts).reshape(rows)
  stop_ids = jnp.asarray(stop_tokens, jnp.int32)
  logits = jnp.broadcast_to(last_logits[:, None], shape + last_logits.shape[-1:]).reshape(rows, -1)

  def body(carry):
    step, logits, suffix, tokens, logprobs, lengths, done = carry
    new, logp = select_tokens(jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step), logits, temperature,
                              top_k, top_p)
    active = ~done
    new = jnp.where(active, new, pad_id)
    tokens = tokens.at[:, step].set(new)
    logprobs = logprobs.at[:, step].set(jnp.where(active, logp, 0.0))
    lengths = lengths + active.astype(jnp.int32)
    done = done | (active & jnp.any(new[:, None] == stop_ids, axis=-1))
    logits, suffix = model_fns.decode(params, new.reshape(shape + (1,)), prefix, suffix, step)
    return step + 1, logits.reshape(rows, -1), suffix, tokens, logprobs, lengths, done

  def cond(carry):
    step, done = carry[0], carry[-1]
    return (step < max_new_tokens) & ~jnp.all(done)

  carry = (jnp.zeros((), jnp.int32), logits, suffix, jnp.full((rows, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((rows, max_new_tokens), jnp.float32), jnp.zeros(rows, jnp.int32), jnp.zeros(rows, bool))
  step, _, _, tokens, logprobs, lengths, done = jax.lax.while_loop(cond, body, carry)
  lengths = lengths.reshape(shape)
  return sampling.Rollouts(
      tokens=tokens.reshape(shape + (max_new_tokens,)), logprobs=logprobs.reshape(shape + (max_new_tokens,)),
      mask=jnp.arange(max_new_tokens) < lengths[..., None], lengths=lengths, stopped=done.reshape(shape),
      num_steps=step)


def sample_rollouts_static(
    model_fns: sampling.ModelFns, params: PyTree, prompts: Array | sampling.PaddedPrompts, rng: Array, *,
    num_rollouts: int, max_new_tokens: int, temperature: Array | float = 1.0, stop_tokens: Sequence[int] = (),
    top_k: int | None = None, top_p: float | None = None, pad_id: int = 0,
    prompt_ids: Array | None = None) -> sampling.Rollouts:
  """Static batching with the in-flight sampler's key schedule: the reference it is tested against (jitted).

  All P N rollouts decode together (prefix-shared caches, one `decode` of [P, N, 1] tokens per step) until
  every one has stopped or reached M tokens, as `sampling.sample_rollouts` does, but token i of rollout n of
  prompt p draws with fold_in(fold_in(fold_in(rng, prompt_ids[p]), n), i). Same arguments and outputs as
  `sample_rollouts_inflight` (without num_slots); `num_steps` is the number of decode steps run.
  """
  stop_tokens = sampling.check_options(num_rollouts, max_new_tokens, stop_tokens, top_k, top_p)
  prompts = _as_prompts(prompts)
  return _sample_static(
      model_fns, params, prompts, rng, jnp.asarray(temperature, jnp.float32),
      _prompt_ids(prompt_ids, prompts.shape[0]), num_rollouts=num_rollouts, max_new_tokens=max_new_tokens,
      stop_tokens=stop_tokens, top_k=top_k, top_p=top_p, pad_id=pad_id)
