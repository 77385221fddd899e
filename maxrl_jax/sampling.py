"""Rollout sampling with a prefix-shared KV cache, a recompute baseline, and teacher-forced log-probs.

The RL trainer samples N rollouts for each of P prompts. `sample_rollouts` runs the prompt pass ONCE per
prompt (prefix cache [P, L, K, D] per layer) and then decodes the P x N continuations in a `lax.while_loop`.
Each decode step's queries attend to the shared prefix of their prompt (broadcast over N, never copied) and
to their own suffix cache ([P, N, M, K, D] per layer for `DecoderFns`), with a single softmax over both. The
suffix cache grows by blocks of B slots (`suffix_block`, see `suffix_windows`): the loop runs in segments of
B steps, one `lax.while_loop` each, segment b on a cache of (b + 1) B slots, so that a step's attention reads
the filled part of the cache (plus less than a block) instead of all M slots at every step.

Conventions (both samplers):

- All prompts of a call have the same length L (no padding inside prompts; maze prompts are fixed-length).
  Generated token i of a rollout sits at absolute position L + i. Prompts of different lengths are passed
  left-padded as a `PaddedPrompts` (tokens [P, L] and lengths [P]; build it with `left_pad`) wherever a
  prompts array is accepted: prompt p's real tokens then sit at positions 0..lengths[p]-1, pad keys are
  masked out, and generated token i sits at position lengths[p] + i, exactly as for the unpadded prompt.
  The model then needs `prefill(params, prompts, attention_mask=...)` and `forward(..., attention_mask=...)`
  (DecoderFns has both); models without them still work for plain arrays.
- `max_new_tokens` (M) and `num_rollouts` (N) are static: one compilation per (P, L, N, M, sampling
  options); new params, prompts, keys and temperatures reuse it.
- Step i draws with key `jax.random.fold_in(rng, i)`, so for the same key the cached and the recompute
  samplers return the same tokens (up to float round-off in near-ties).
- Sampling distribution at step i: logits / temperature, then top-k (keep logits >= the k-th largest),
  then top-p (keep the smallest set of largest logits whose probability reaches top_p, at least one),
  renormalised. temperature == 0 means greedy (argmax of the raw logits; top-k/top-p ignored).
- `Rollouts.logprobs` is the log-probability of the sampled token under that sampling distribution.
  At temperature 1 without top-k/top-p it equals the model's log-prob (what `sequence_logprobs` returns);
  with temperature T != 1 it equals `sequence_logprobs(..., temperature=T)`; with top-k/top-p it is the
  truncated, renormalised log-prob. For greedy rollouts (point mass) it is 0.
- After a stop token is emitted (the stop token itself is kept and masked in), the rollout is done: later
  positions hold `pad_id` with mask False and logprob 0. The loop exits as soon as every rollout is done.

Model interface (`ModelFns`, any hashable object with these methods, e.g. `DecoderFns(config)`):

    prefill(params, prompts [P, L]) -> (next-token logits [P, V] float32, prefix_cache)
    init_suffix_cache(prefix_cache, num_rollouts N, max_len M) -> suffix_cache   (M: the slots it holds)
    decode(params, tokens [P, N, R], prefix_cache, suffix_cache, step) -> (logits [P, N, R, V], suffix_cache)
        tokens sit at suffix slots step..step+R-1 (positions L+step..); logits predict the next token.
    forward(params, tokens [B, T]) -> logits [B, T, V] float32       (full causal forward)

For `PaddedPrompts`, prefill and forward are also called with `attention_mask=` ([P, L] / [B, T] bool,
True on real tokens); the prefix cache must then carry what decode needs (DecoderFns keeps the mask in it).
`sample_rollouts` may ask `init_suffix_cache` for fewer slots than M and grow the cache between loop
segments by copying each leaf into the leading corner of the matching leaf of a larger cache; it does so
only when the leaves of caches of different sizes differ in size alone (otherwise it allocates all M slots).

A fake model implementing these four methods can drive every function here (see tests/test_sampling.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import flax
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


class ModelFns(Protocol):
    """The model as pure functions over params. Must be hashable: it is a static jit argument."""

    def prefill(self, params: PyTree, prompts: Array) -> tuple[Array, PyTree]: ...

    def init_suffix_cache(self, prefix_cache: PyTree, num_rollouts: int, max_len: int) -> PyTree: ...

    def decode(
        self, params: PyTree, tokens: Array, prefix_cache: PyTree, suffix_cache: PyTree, step: Array
    ) -> tuple[Array, PyTree]: ...

    def forward(self, params: PyTree, tokens: Array) -> Array: ...


@flax.struct.dataclass
class PaddedPrompts:
    """Left-padded prompts of different lengths: a pytree accepted wherever a prompts array is.

    Attributes:
      tokens: [P, L] int32; prompt p's real tokens are tokens[p, L - lengths[p]:], the rest is padding.
      lengths: [P] int32, number of real tokens of each prompt, 1 <= lengths[p] <= L.
    """

    tokens: Array
    lengths: Array

    @property
    def shape(self) -> tuple[int, int]:
        return self.tokens.shape

    def attention_mask(self) -> Array:
        """[P, L] bool, True on real tokens."""
        width = self.tokens.shape[-1]
        return jnp.arange(width) >= (width - self.lengths)[..., None]


def left_pad(sequences: Sequence[Sequence[int]], length: int | None = None, pad_id: int = 0) -> PaddedPrompts:
    """Host-side: token lists -> PaddedPrompts (numpy arrays) of width `length` (default: the longest).

    Raises a ValueError if a sequence is empty or longer than `length`.
    """
    lengths = np.asarray([len(s) for s in sequences], np.int32)
    width = int(lengths.max()) if length is None else int(length)
    if lengths.size and (lengths.min() < 1 or lengths.max() > width):
        raise ValueError(
            f"left_pad: prompt lengths must be in [1, {width}], got {lengths.min()}..{lengths.max()}."
        )
    tokens = np.full((len(sequences), width), pad_id, np.int32)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            tokens[row, width - len(sequence):] = np.asarray(sequence, np.int32)
    return PaddedPrompts(tokens=tokens, lengths=lengths)


def _as_prompts(prompts: Array | PaddedPrompts) -> Array | PaddedPrompts:
    """int32 prompts, plain or padded (outside jit)."""
    if isinstance(prompts, PaddedPrompts):
        return PaddedPrompts(
            tokens=jnp.asarray(prompts.tokens, jnp.int32), lengths=jnp.asarray(prompts.lengths, jnp.int32)
        )
    return jnp.asarray(prompts, jnp.int32)


def _prefill(model_fns, params, prompts: Array | PaddedPrompts):
    if isinstance(prompts, PaddedPrompts):
        return model_fns.prefill(params, prompts.tokens, attention_mask=prompts.attention_mask())
    return model_fns.prefill(params, prompts)


def _forward_after_prompts(model_fns, params, prompts: Array | PaddedPrompts, continuations: Array) -> Array:
    """Full forward over concat(prompts, continuations [B, C]) -> logits [B, L + C, V]."""
    if isinstance(prompts, PaddedPrompts):
        mask = jnp.concatenate(
            [prompts.attention_mask(), jnp.ones(continuations.shape, bool)], axis=1
        )
        sequences = jnp.concatenate([prompts.tokens, continuations], axis=1)
        return model_fns.forward(params, sequences, attention_mask=mask)
    return model_fns.forward(params, jnp.concatenate([prompts, continuations], axis=1))


@flax.struct.dataclass
class Rollouts:
    """Sampled continuations of P prompts, N each, M = max_new_tokens slots.

    Attributes:
      tokens: [P, N, M] int32, generated tokens; `pad_id` after the stop token and in unused slots.
      logprobs: [P, N, M] float32, log-prob of each token under the sampling distribution; 0 where masked.
      mask: [P, N, M] bool, True for generated tokens up to and including the stop token.
      lengths: [P, N] int32, number of True entries of mask.
      stopped: [P, N] bool, True if the rollout emitted a stop token (False: truncated at M).
      num_steps: [] int32, decode-loop positions actually run (<= M; < M when all stopped early).
    """

    tokens: Array
    logprobs: Array
    mask: Array
    lengths: Array
    stopped: Array
    num_steps: Array


@flax.struct.dataclass
class _LoopState:
    """Carry of the decode loop; `carry` is the sampler-specific model state (e.g. the suffix cache)."""

    step: Array  # [] int32: next slot to write
    tokens: Array  # [P, N, M] int32
    logprobs: Array  # [P, N, M] float32
    lengths: Array  # [P, N] int32
    done: Array  # [P, N] bool
    carry: PyTree
    rng: Array  # base key; step i uses fold_in(rng, i)


# ----------------------------------------------------------------------------------------------------------
# Token selection.
# ----------------------------------------------------------------------------------------------------------


def sampling_logprobs(
    logits: Array,
    temperature: Array | float = 1.0,
    *,
    top_k: int | None = None,
    top_p: float | None = None,
) -> Array:
    """Log-probs of the sampling distribution: logits [..., V] -> [..., V] float32 (-inf where cut).

    log_softmax(truncate(logits / temperature)), truncation by top-k then top-p (ties at the cut are kept).
    `temperature` must be > 0 here (greedy is handled by the caller); it may be traced.
    """
    scaled = logits.astype(jnp.float32) / jnp.asarray(temperature, jnp.float32)
    if top_k is not None and top_k < scaled.shape[-1]:
        kth_largest = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth_largest, -jnp.inf, scaled)
    if top_p is not None and top_p < 1.0:
        descending = -jnp.sort(-scaled, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of strictly larger logits
        keep = mass_before < top_p  # always keeps the largest
        threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    return jax.nn.log_softmax(scaled, axis=-1)


def _select_tokens(
    key: Array, logits: Array, temperature: Array, top_k: int | None, top_p: float | None
) -> tuple[Array, Array]:
    """logits [P, N, V] -> (tokens [P, N] int32, logprobs [P, N] float32); temperature <= 0 is greedy."""
    greedy = temperature <= 0
    logp = sampling_logprobs(
        logits, jnp.where(greedy, 1.0, temperature), top_k=top_k, top_p=top_p
    )
    sampled = jax.random.categorical(key, logp, axis=-1)
    tokens = jnp.where(greedy, jnp.argmax(logits, axis=-1), sampled).astype(jnp.int32)
    token_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
    return tokens, jnp.where(greedy, 0.0, token_logp)


# ----------------------------------------------------------------------------------------------------------
# The shared decode loop.
# ----------------------------------------------------------------------------------------------------------


def suffix_windows(max_new_tokens: int, suffix_block: int | str | None = "auto") -> tuple[int, ...]:
    """Sizes of the cached sampler's suffix cache over the decode loop, growing by blocks of B slots.

    The loop runs in segments, one `lax.while_loop` each: segment b decodes the tokens of suffix slots
    [b B, (b + 1) B) on a suffix cache of W_b = min((b + 1) B, M) slots (those filled so far plus at most
    B - 1 empty ones), grown from the previous segment's by one copy of its slots. A decode step's
    attention reads the whole cache it is given: fewer than s + B suffix slots at the step that writes
    slot s instead of M, about M^2 / 2 + M B / 2 over the M steps instead of M^2. Each segment is its own
    compiled copy of the decode step, so B trades compile time for run time.

    Args:
      max_new_tokens: M.
      suffix_block: B, slots per block (an int >= 1); None or "full": one segment with all M slots (every
        step reads the whole preallocated cache, one compiled step); "auto": B = the smallest multiple of 8
        that is >= max(16, M / 4), i.e. at most 4 segments of at least 16 slots, and one segment when
        M < 32.

    Returns:
      The increasing cache sizes (W_0, ..., W_last = M).
    """
    if suffix_block is None or suffix_block == "full":
        return (max_new_tokens,)
    if suffix_block == "auto":
        block = max(16, -(-max_new_tokens // 4))
        block = -(-block // 8) * 8
        if max_new_tokens < 32:
            block = max_new_tokens
    elif isinstance(suffix_block, (int, np.integer)) and not isinstance(suffix_block, bool):
        if suffix_block < 1:
            raise ValueError(f"suffix_block must be >= 1, got {suffix_block}.")
        block = int(suffix_block)
    else:
        raise ValueError(f"suffix_block must be an int >= 1, 'auto', 'full' or None; got {suffix_block!r}.")
    return tuple(min(end, max_new_tokens) for end in range(block, max_new_tokens + block, block))


def _decode_loop(
    first_logits: Array,
    next_logits_fn: Callable[[PyTree, Array, Array], tuple[Array, PyTree]],
    carry: PyTree,
    rng: Array,
    *,
    max_new_tokens: int,
    temperature: Array,
    stop_tokens: tuple[int, ...],
    top_k: int | None,
    top_p: float | None,
    pad_id: int,
    windows: tuple[int, ...] | None = None,
    grow_fn: Callable[[PyTree, int], PyTree] | None = None,
    lockstep_axis: str | None = None,
) -> Rollouts:
    """Samples slot 0 from `first_logits` [P, N, V], then slots 1.. in while_loops.

    `next_logits_fn(carry, tokens [P, N, M], step) -> (logits [P, N, V] for slot `step`, carry)` may read
    any slot < step of the token buffer. With `windows` (increasing static ints, the last = M; see
    `suffix_windows`) the steps run in one while_loop per window W, over the steps with step <= W; before
    each loop but the first, `grow_fn(carry, W)` resizes the carry for it. Without, one loop runs every
    step. Every loop also stops once every rollout is done, so the loops after an early exit run no step.
    """
    num_prompts, num_rollouts = first_logits.shape[:2]
    shape = (num_prompts, num_rollouts, max_new_tokens)
    stop_ids = jnp.asarray(stop_tokens, jnp.int32)

    def write(state: _LoopState, logits: Array) -> _LoopState:
        new_tokens, new_logp = _select_tokens(
            jax.random.fold_in(state.rng, state.step), logits, temperature, top_k, top_p
        )
        active = ~state.done
        new_tokens = jnp.where(active, new_tokens, pad_id)
        new_logp = jnp.where(active, new_logp, 0.0)
        is_stop = jnp.any(new_tokens[..., None] == stop_ids, axis=-1)
        zero = jnp.zeros((), jnp.int32)
        at = (zero, zero, state.step)
        return state.replace(
            step=state.step + 1,
            tokens=jax.lax.dynamic_update_slice(state.tokens, new_tokens[..., None], at),
            logprobs=jax.lax.dynamic_update_slice(state.logprobs, new_logp[..., None], at),
            lengths=state.lengths + active.astype(jnp.int32),
            done=state.done | (active & is_stop),
        )

    def run_steps(state: _LoopState, last_step: int) -> _LoopState:
        """Steps state.step .. min(last_step, M - 1) (fewer if every rollout is done)."""

        def cond(state: _LoopState) -> Array:
            live = ~jnp.all(state.done)
            if lockstep_axis is not None:  # One loop for every vmapped instance: runs while any is live.
                live = jax.lax.pmax(live.astype(jnp.int32), lockstep_axis) > 0
            return (state.step <= min(last_step, max_new_tokens - 1)) & live

        def body(state: _LoopState) -> _LoopState:
            logits, new_carry = next_logits_fn(state.carry, state.tokens, state.step)
            return write(state.replace(carry=new_carry), logits)

        return jax.lax.while_loop(cond, body, state)

    state = _LoopState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full(shape, pad_id, jnp.int32),
        logprobs=jnp.zeros(shape, jnp.float32),
        lengths=jnp.zeros(shape[:2], jnp.int32),
        done=jnp.zeros(shape[:2], bool),
        carry=carry,
        rng=rng,
    )
    state = write(state, first_logits)
    if windows is None:
        state = run_steps(state, max_new_tokens - 1)
    else:
        # Step s decodes the token of slot s - 1 into a cache of W slots: s <= W.
        for index, window in enumerate(windows):
            if index:
                state = state.replace(carry=grow_fn(state.carry, window))
            state = run_steps(state, window)
    mask = jnp.arange(max_new_tokens) < state.lengths[..., None]
    return Rollouts(
        tokens=state.tokens,
        logprobs=state.logprobs,
        mask=mask,
        lengths=state.lengths,
        stopped=state.done,
        # With a lockstep loop the counter is the slowest instance's; every instance's own count of decode
        # steps is its longest rollout (a loop stops right after the write that ends its last rollout).
        num_steps=state.step if lockstep_axis is None else jnp.max(state.lengths),
    )


def _grow_suffix_cache(cache: PyTree, larger: PyTree) -> PyTree:
    """Copies every leaf of `cache` into the leading corner of the matching (zero) leaf of `larger`."""
    return jax.tree_util.tree_map(
        lambda big, small: jax.lax.dynamic_update_slice(
            big, small.astype(big.dtype), (jnp.zeros((), jnp.int32),) * big.ndim
        ),
        larger,
        cache,
    )


def _cache_can_grow(model_fns, prefix_cache, num_rollouts: int, small: int, large: int) -> bool:
    """Whether suffix caches of `small` and `large` slots have the same tree and leaf ranks and dtypes,
    each leaf of the small one fitting in the large one (growing then copies it into the leading corner,
    see `_grow_suffix_cache`)."""
    shapes = [
        jax.eval_shape(lambda p, m=m: model_fns.init_suffix_cache(p, num_rollouts, m), prefix_cache)
        for m in (small, large)
    ]
    leaves_small, tree_small = jax.tree_util.tree_flatten(shapes[0])
    leaves_large, tree_large = jax.tree_util.tree_flatten(shapes[1])
    return tree_small == tree_large and all(
        a.ndim == b.ndim and a.dtype == b.dtype and all(x <= y for x, y in zip(a.shape, b.shape))
        for a, b in zip(leaves_small, leaves_large)
    )


def check_options(
    num_rollouts: int,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    top_k: int | None,
    top_p: float | None,
) -> tuple[int, ...]:
    """The stop tokens as a tuple of ints; a ValueError on impossible sampling options (shared by both samplers)."""
    if num_rollouts < 1 or max_new_tokens < 1:
        raise ValueError(f"num_rollouts={num_rollouts} and max_new_tokens={max_new_tokens} must be >= 1.")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}.")
    return tuple(int(t) for t in stop_tokens)


_STATIC = ("model_fns", "num_rollouts", "max_new_tokens", "stop_tokens", "top_k", "top_p", "pad_id")


@functools.partial(jax.jit, static_argnames=_STATIC + ("windows", "lockstep_axis"))
def _sample_cached(
    model_fns, params, prompts, rng, temperature, *, num_rollouts, max_new_tokens, stop_tokens, top_k,
    top_p, pad_id, windows, lockstep_axis=None,
) -> Rollouts:
    last_logits, prefix_cache = _prefill(model_fns, params, prompts)  # [P, V]
    if windows is not None and not _cache_can_grow(
        model_fns, prefix_cache, num_rollouts, windows[0], max_new_tokens
    ):
        windows = None
    first_size = max_new_tokens if windows is None else windows[0]
    suffix_cache = model_fns.init_suffix_cache(prefix_cache, num_rollouts, first_size)
    first_logits = jnp.broadcast_to(
        last_logits[:, None], (last_logits.shape[0], num_rollouts, last_logits.shape[-1])
    )

    def next_logits(suffix_cache, tokens, step):
        previous = jax.lax.dynamic_slice_in_dim(tokens, step - 1, 1, axis=2)  # [P, N, 1]
        logits, suffix_cache = model_fns.decode(params, previous, prefix_cache, suffix_cache, step - 1)
        return logits[:, :, 0], suffix_cache

    def grow(suffix_cache, size):
        return _grow_suffix_cache(
            suffix_cache, model_fns.init_suffix_cache(prefix_cache, num_rollouts, size)
        )

    return _decode_loop(
        first_logits, next_logits, suffix_cache, rng, max_new_tokens=max_new_tokens,
        temperature=temperature, stop_tokens=stop_tokens, top_k=top_k, top_p=top_p, pad_id=pad_id,
        windows=windows, grow_fn=grow, lockstep_axis=lockstep_axis,
    )


def sample_rollouts(
    model_fns: ModelFns,
    params: PyTree,
    prompts: Array | PaddedPrompts,
    rng: Array,
    *,
    num_rollouts: int,
    max_new_tokens: int,
    temperature: Array | float = 1.0,
    stop_tokens: Sequence[int] = (),
    top_k: int | None = None,
    top_p: float | None = None,
    pad_id: int = 0,
    suffix_block: int | str | None = "auto",
    lockstep_axis: str | None = None,
) -> Rollouts:
    """Samples `num_rollouts` continuations of each prompt with a prefix-shared KV cache (jitted).

    Args:
      model_fns: hashable `ModelFns` (e.g. `DecoderFns(config)`); static.
      params: model parameters.
      prompts: [P, L] int, all of the same length L, or left-padded `PaddedPrompts`.
      rng: PRNG key; slot i uses `fold_in(rng, i)`.
      num_rollouts: N (static).
      max_new_tokens: M, slots per rollout (static).
      temperature: scalar, may be a traced array (no recompile when it changes); 0 means greedy.
      stop_tokens: token ids that end a rollout (e.g. maze DONE=7, EOS=2); static.
      top_k: keep the k largest logits (static) or None.
      top_p: nucleus mass (static) or None.
      pad_id: filler after the stop token (static).
      suffix_block: how the suffix cache grows (static): an int B grows it by blocks of B slots, so that
        each step's attention reads the filled blocks only (`suffix_windows`); "auto" picks B from M (at
        most 4 blocks of >= 16 slots; all M slots from the start when M < 32); None or "full" allocates
        all M slots up front and every step reads them all. The rollouts are the same up to float
        round-off. Growing needs suffix caches whose leaves differ only in size between slot counts,
        slot i at index i (`DecoderFns`, and any cache of that form); other models get all M slots.
      lockstep_axis: when this call runs under `jax.vmap(..., axis_name=lockstep_axis)` (a population of
        policies, maxrl_jax/population.py): the decode loop's exit test is reduced over that axis, so one
        loop with an unbatched step counter serves every instance (each still stops writing when its own
        rollouts are done). Without it, vmap batches the counter and the cache writes become scatters.
        The tokens are the same either way.

    Returns:
      `Rollouts` with [P, N, M] tokens / logprobs / mask; see the module docstring for conventions.
    """
    stop_tokens = check_options(num_rollouts, max_new_tokens, stop_tokens, top_k, top_p)
    windows = suffix_windows(max_new_tokens, suffix_block)
    if len(windows) == 1:
        windows = None
    return _sample_cached(
        model_fns, params, _as_prompts(prompts), rng, jnp.asarray(temperature, jnp.float32),
        num_rollouts=num_rollouts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, top_k=top_k,
        top_p=top_p, pad_id=pad_id, windows=windows, lockstep_axis=lockstep_axis,
    )


@functools.partial(jax.jit, static_argnames=_STATIC)
def _sample_recompute(
    model_fns, params, prompts, rng, temperature, *, num_rollouts, max_new_tokens, stop_tokens, top_k,
    top_p, pad_id,
) -> Rollouts:
    num_prompts, prompt_len = prompts.shape
    flat_prompts = jax.tree_util.tree_map(
        lambda x: jnp.repeat(x, num_rollouts, axis=0), prompts
    )  # [P*N, L], row p*N + n
    empty = jnp.zeros((num_prompts * num_rollouts, 0), jnp.int32)
    first_logits = _forward_after_prompts(model_fns, params, flat_prompts, empty)[:, -1]
    first_logits = first_logits.reshape(num_prompts, num_rollouts, -1)

    def next_logits(carry, tokens, step):
        # [P*N, L+M]; slots >= step are padding the causal mask ignores
        logits = _forward_after_prompts(
            model_fns, params, flat_prompts, tokens.reshape(num_prompts * num_rollouts, max_new_tokens)
        )
        logits = jax.lax.dynamic_index_in_dim(logits, prompt_len + step - 1, axis=1, keepdims=False)
        return logits.reshape(num_prompts, num_rollouts, -1), carry

    return _decode_loop(
        first_logits, next_logits, (), rng, max_new_tokens=max_new_tokens, temperature=temperature,
        stop_tokens=stop_tokens, top_k=top_k, top_p=top_p, pad_id=pad_id,
    )


def sample_rollouts_recompute(
    model_fns: ModelFns,
    params: PyTree,
    prompts: Array | PaddedPrompts,
    rng: Array,
    *,
    num_rollouts: int,
    max_new_tokens: int,
    temperature: Array | float = 1.0,
    stop_tokens: Sequence[int] = (),
    top_k: int | None = None,
    top_p: float | None = None,
    pad_id: int = 0,
) -> Rollouts:
    """Baseline without a KV cache: every step runs `model_fns.forward` on all P*N full sequences.

    Same arguments, outputs and key schedule as `sample_rollouts` (for tests and benchmarks only: its cost
    per step is a full forward over [P*N, L+M] tokens).
    """
    stop_tokens = check_options(num_rollouts, max_new_tokens, stop_tokens, top_k, top_p)
    return _sample_recompute(
        model_fns, params, _as_prompts(prompts), rng, jnp.asarray(temperature, jnp.float32),
        num_rollouts=num_rollouts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, top_k=top_k,
        top_p=top_p, pad_id=pad_id,
    )


# ----------------------------------------------------------------------------------------------------------
# Teacher forcing.
# ----------------------------------------------------------------------------------------------------------


def _token_logprobs(logits: Array, tokens: Array, temperature: Array | float) -> Array:
    """logits [..., V], tokens [...] -> log softmax(logits / temperature)[token], float32 [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(logp, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def sequence_logprobs(
    model_fns: ModelFns,
    params: PyTree,
    prompts: Array | PaddedPrompts,
    responses: Array,
    *,
    temperature: Array | float = 1.0,
) -> Array:
    """Teacher-forced per-token log-probs of responses given prompts (differentiable; not jitted here).

    One full forward over concat(prompts, responses[:, :-1]): out[b, r] = log pi(responses[b, r] |
    prompts[b], responses[b, :r]), computed from logits / temperature. Positions after a stop token
    (padding) get values too; multiply by `Rollouts.mask`.

    Args:
      prompts: [B, L] int, same length L (as in sampling), or left-padded `PaddedPrompts`.
      responses: [B, R] int.

    Returns:
      [B, R] float32.
    """
    prompt_len = prompts.shape[1]
    logits = _forward_after_prompts(model_fns, params, prompts, responses[:, :-1])  # [B, L+R-1, V]
    logits = logits[:, prompt_len - 1 :]  # [B, R, V]
    return _token_logprobs(logits, responses, temperature)


def sequence_logprobs_shared_prefix(
    model_fns: ModelFns,
    params: PyTree,
    prompts: Array | PaddedPrompts,
    responses: Array,
    *,
    temperature: Array | float = 1.0,
    with_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    """Like `sequence_logprobs` for N responses per prompt, with each prompt's pass run once.

    Runs `prefill` on the P prompts, then one `decode` over all R-1 teacher-forced response tokens of the
    P x N responses (attending to the shared prefix). Equal to `sequence_logprobs` on the flattened
    [P*N] batch up to float round-off, at roughly 1/N of the prompt cost. Differentiable.

    Args:
      prompts: [P, L] int, or left-padded `PaddedPrompts`.
      responses: [P, N, R] int (e.g. `Rollouts.tokens`).

      with_entropy: also return the entropy of each position's next-token distribution (from the same
        logits / temperature), for an entropy bonus.

    Returns:
      [P, N, R] float32 log-probs, or (log-probs, entropies), both [P, N, R], with `with_entropy`.
    """
    num_rollouts, response_len = responses.shape[1], responses.shape[2]
    last_logits, prefix_cache = _prefill(model_fns, params, prompts)  # [P, V]
    first_logits = jnp.broadcast_to(
        last_logits[:, None, None, :], (last_logits.shape[0], num_rollouts, 1, last_logits.shape[-1])
    )  # [P, N, 1, V]
    if response_len == 1:
        logits = first_logits
    else:
        suffix_cache = model_fns.init_suffix_cache(prefix_cache, num_rollouts, response_len - 1)
        rest_logits, _ = model_fns.decode(
            params, responses[:, :, :-1], prefix_cache, suffix_cache, jnp.zeros((), jnp.int32)
        )  # [P, N, R-1, V]
        logits = jnp.concatenate([first_logits, rest_logits.astype(first_logits.dtype)], axis=2)
    logprobs = _token_logprobs(logits, responses, temperature)
    if not with_entropy:
        return logprobs
    logp_all = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return logprobs, -jnp.sum(jnp.exp(logp_all) * logp_all, axis=-1)
