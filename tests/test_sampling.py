"""Tests of the rollout samplers and teacher-forced log-probs, with fake models and a tiny decoder."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from maxrl_jax import sampling
from maxrl_jax.models import decoder as dec

PAD, EOS, DONE = 0, 2, 7


@dataclasses.dataclass(frozen=True)
class FixedDistributionModel:
    """Fake ModelFns: next-token logits are params["logits"] [V] whatever the context.

    `traces` counts how often `prefill` is traced (a Python side effect, excluded from hash/eq).
    """

    traces: list = dataclasses.field(default_factory=lambda: [0], compare=False, hash=False)

    def prefill(self, params, prompts):
        self.traces[0] += 1
        logits = jnp.broadcast_to(params["logits"], (prompts.shape[0], params["logits"].shape[-1]))
        return logits, jnp.zeros((prompts.shape[0], 1))

    def init_suffix_cache(self, prefix_cache, num_rollouts, max_len):
        return jnp.zeros((prefix_cache.shape[0], num_rollouts, max_len))

    def decode(self, params, tokens, prefix_cache, suffix_cache, step):
        return jnp.broadcast_to(params["logits"], tokens.shape + params["logits"].shape), suffix_cache

    def forward(self, params, tokens):
        return jnp.broadcast_to(params["logits"], tokens.shape + params["logits"].shape)


@dataclasses.dataclass(frozen=True)
class SuccessorModel:
    """Fake ModelFns: the next token is (previous token + 1) mod V, with probability ~1."""

    vocab_size: int = 32

    def _logits(self, previous):
        return 50.0 * jax.nn.one_hot((previous + 1) % self.vocab_size, self.vocab_size)

    def prefill(self, params, prompts):
        return self._logits(prompts[:, -1]), prompts

    def init_suffix_cache(self, prefix_cache, num_rollouts, max_len):
        return ()

    def decode(self, params, tokens, prefix_cache, suffix_cache, step):
        return self._logits(tokens), suffix_cache

    def forward(self, params, tokens):
        return self._logits(tokens)


FAKE_PROBS = np.array([0.04, 0.08, 0.12, 0.16, 0.26, 0.34])


def _expected_probs(temperature, top_k=None, top_p=None):
    """Sampling distribution, computed independently in numpy."""
    probs = FAKE_PROBS ** (1.0 / temperature)
    probs /= probs.sum()
    order = np.argsort(-probs)
    keep = np.zeros(len(probs), bool)
    if top_k is not None:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    probs = np.where(keep, probs, 0.0) / probs[keep].sum()
    if top_p is not None:
        cumulative = np.cumsum(probs[order])
        n_keep = int(np.searchsorted(cumulative, top_p - 1e-12)) + 1
        keep = np.zeros(len(probs), bool)
        keep[order[:n_keep]] = True
        probs = np.where(keep, probs, 0.0) / probs[keep].sum()
    return probs


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, None, None), (0.6, None, None), (1.7, None, None), (1.0, 3, None), (0.8, None, 0.7),
     (1.3, 4, 0.8)],
)
def test_sampled_frequencies_match_distribution(temperature, top_k, top_p):
    model = FixedDistributionModel()
    params = {"logits": jnp.log(jnp.asarray(FAKE_PROBS, jnp.float32))}
    prompts = jnp.ones((4, 3), jnp.int32)
    out = sampling.sample_rollouts(
        model, params, prompts, jax.random.key(1234), num_rollouts=128, max_new_tokens=8,
        temperature=temperature, top_k=top_k, top_p=top_p,
    )
    expected = _expected_probs(temperature, top_k, top_p)
    tokens = np.asarray(out.tokens).ravel()
    assert np.all(np.asarray(out.mask)) and int(out.num_steps) == 8
    counts = np.bincount(tokens, minlength=len(expected))
    assert np.all(counts[expected == 0] == 0)
    support = expected > 0
    result = scipy.stats.chisquare(counts[support], expected[support] * len(tokens))
    assert result.pvalue > 1e-3, (counts, expected * len(tokens))
    # Reported log-probs are those of the (truncated, tempered) sampling distribution.
    np.testing.assert_allclose(np.asarray(out.logprobs).ravel(), np.log(expected[tokens]), atol=1e-5)


def test_greedy_with_fake_model():
    model = FixedDistributionModel()
    params = {"logits": jnp.log(jnp.asarray(FAKE_PROBS, jnp.float32))}
    out = sampling.sample_rollouts(
        model, params, jnp.ones((2, 3), jnp.int32), jax.random.key(0), num_rollouts=4,
        max_new_tokens=5, temperature=0.0,
    )
    assert np.all(np.asarray(out.tokens) == np.argmax(FAKE_PROBS))
    assert np.all(np.asarray(out.logprobs) == 0.0)


def test_no_retrace_for_new_params_prompts_keys_temperature():
    model = FixedDistributionModel()
    kwargs = dict(num_rollouts=4, max_new_tokens=6, stop_tokens=(EOS, DONE))
    for i in range(3):
        params = {"logits": jax.random.normal(jax.random.key(i), (6,))}
        prompts = jax.random.randint(jax.random.key(10 + i), (2, 5), 0, 6)
        sampling.sample_rollouts(model, params, prompts, jax.random.key(20 + i),
                                 temperature=[1.0, 0.5, 0.0][i], **kwargs)
    assert model.traces[0] == 1
    # An equal (but distinct) model object also hits the cache.
    sampling.sample_rollouts(FixedDistributionModel(model.traces), params, prompts, jax.random.key(0),
                             **kwargs)
    assert model.traces[0] == 1


def test_stop_tokens_padding_and_early_exit():
    model = SuccessorModel()
    # Prompts end in 3 -> 4 5 6 DONE ; 5 -> 6 DONE ; 0 -> 1 EOS.
    prompts = jnp.array([[9, 3], [9, 5], [9, 0]], jnp.int32)
    expected_tokens = np.zeros((3, 10), np.int32)
    expected_tokens[0, :4] = [4, 5, 6, DONE]
    expected_tokens[1, :2] = [6, DONE]
    expected_tokens[2, :2] = [1, EOS]
    for sampler in (sampling.sample_rollouts, sampling.sample_rollouts_recompute):
        out = sampler(model, {}, prompts, jax.random.key(0), num_rollouts=2, max_new_tokens=10,
                      stop_tokens=(EOS, DONE))
        np.testing.assert_array_equal(out.tokens, np.repeat(expected_tokens[:, None], 2, axis=1))
        np.testing.assert_array_equal(out.lengths, [[4, 4], [2, 2], [2, 2]])
        np.testing.assert_array_equal(out.mask, np.asarray(out.tokens) != PAD)
        assert np.all(np.asarray(out.logprobs)[~np.asarray(out.mask)] == 0.0)
        assert np.all(np.asarray(out.stopped))
        assert int(out.num_steps) == 4  # the loop exited once every rollout was done


def test_truncated_rollouts_are_not_stopped():
    model = SuccessorModel()
    prompts = jnp.array([[9, 10], [9, 5]], jnp.int32)  # 11 12 13 14 (no stop) ; 6 DONE
    out = sampling.sample_rollouts(model, {}, prompts, jax.random.key(0), num_rollouts=1,
                                   max_new_tokens=4, stop_tokens=(DONE,))
    np.testing.assert_array_equal(out.tokens[:, 0], [[11, 12, 13, 14], [6, DONE, PAD, PAD]])
    np.testing.assert_array_equal(out.stopped[:, 0], [False, True])
    np.testing.assert_array_equal(out.lengths[:, 0], [4, 2])
    assert int(out.num_steps) == 4


# ----------------------------------------------------------------------------------------------------------
# With the real (tiny) decoder.
# ----------------------------------------------------------------------------------------------------------

TINY = dec.DecoderConfig(
    vocab_size=32, num_layers=2, hidden_size=32, ffn_size=64, num_heads=4, num_kv_heads=2,
    max_positions=64, init_std=0.15,
)
NUM_PROMPTS, NUM_ROLLOUTS, PROMPT_LEN, MAX_NEW = 3, 4, 7, 10
SAMPLE_KW = dict(num_rollouts=NUM_ROLLOUTS, max_new_tokens=MAX_NEW, stop_tokens=(EOS, DONE))


@dataclasses.dataclass(frozen=True)
class CountingDecoderFns(dec.DecoderFns):
    traces: list = dataclasses.field(default_factory=lambda: [0], compare=False, hash=False)

    def prefill(self, params, prompts):
        self.traces[0] += 1
        return super().prefill(params, prompts)


@pytest.fixture(scope="module")
def tiny():
    fns = CountingDecoderFns(TINY)
    params = fns.init(jax.random.key(0))
    prompts = jax.random.randint(jax.random.key(1), (NUM_PROMPTS, PROMPT_LEN), 0, 32, jnp.int32)
    rollouts = sampling.sample_rollouts(fns, params, prompts, jax.random.key(2), **SAMPLE_KW)
    return fns, params, prompts, rollouts


def test_rollouts_shapes_and_masks(tiny):
    _, _, _, out = tiny
    shape = (NUM_PROMPTS, NUM_ROLLOUTS, MAX_NEW)
    assert out.tokens.shape == shape and out.tokens.dtype == jnp.int32
    assert out.logprobs.shape == shape and out.logprobs.dtype == jnp.float32
    assert out.mask.shape == shape and out.mask.dtype == jnp.bool_
    tokens, mask, lengths = map(np.asarray, (out.tokens, out.mask, out.lengths))
    np.testing.assert_array_equal(mask, np.arange(MAX_NEW) < lengths[..., None])
    assert np.all(tokens[~mask] == PAD)
    is_stop = np.isin(tokens, [EOS, DONE]) & mask
    np.testing.assert_array_equal(is_stop.any(-1), np.asarray(out.stopped))
    for p, n in zip(*np.nonzero(np.asarray(out.stopped))):  # the stop token is the last masked one
        assert tokens[p, n, lengths[p, n] - 1] in (EOS, DONE) and is_stop[p, n].sum() == 1


def test_logprobs_equal_teacher_forced(tiny):
    fns, params, prompts, out = tiny
    flat = out.tokens.reshape(-1, MAX_NEW)
    teacher = jax.jit(sampling.sequence_logprobs, static_argnums=0)(
        fns, params, jnp.repeat(prompts, NUM_ROLLOUTS, axis=0), flat
    ).reshape(out.tokens.shape)
    mask = np.asarray(out.mask)
    np.testing.assert_allclose(np.asarray(out.logprobs)[mask], np.asarray(teacher)[mask], atol=2e-5)
    shared = jax.jit(sampling.sequence_logprobs_shared_prefix, static_argnums=0)(
        fns, params, prompts, out.tokens)
    np.testing.assert_allclose(shared, teacher, atol=2e-5)


def test_shared_prefix_logprob_gradients(tiny):
    fns, params, prompts, out = tiny

    def loss_flat(params):
        logp = sampling.sequence_logprobs(
            fns, params, jnp.repeat(prompts, NUM_ROLLOUTS, axis=0), out.tokens.reshape(-1, MAX_NEW))
        return jnp.sum(logp.reshape(out.tokens.shape) * out.mask)

    def loss_shared(params):
        return jnp.sum(sampling.sequence_logprobs_shared_prefix(fns, params, prompts, out.tokens) * out.mask)

    grads_flat = jax.jit(jax.grad(loss_flat))(params)
    grads_shared = jax.jit(jax.grad(loss_shared))(params)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads_flat, grads_shared)


def test_reproducible_and_matches_recompute(tiny):
    fns, params, prompts, out = tiny
    again = sampling.sample_rollouts(fns, params, prompts, jax.random.key(2), **SAMPLE_KW)
    jax.tree_util.tree_map(np.testing.assert_array_equal, out, again)
    other = sampling.sample_rollouts(fns, params, prompts, jax.random.key(3), **SAMPLE_KW)
    assert np.any(np.asarray(other.tokens) != np.asarray(out.tokens))
    recompute = sampling.sample_rollouts_recompute(fns, params, prompts, jax.random.key(2), **SAMPLE_KW)
    np.testing.assert_array_equal(recompute.tokens, out.tokens)
    np.testing.assert_array_equal(recompute.mask, out.mask)
    np.testing.assert_array_equal(recompute.num_steps, out.num_steps)
    np.testing.assert_allclose(recompute.logprobs, out.logprobs, atol=2e-5)


def test_greedy_matches_recompute_and_argmax(tiny):
    fns, params, prompts, _ = tiny
    greedy = sampling.sample_rollouts(fns, params, prompts, jax.random.key(5), temperature=0.0,
                                      **SAMPLE_KW)
    tokens = np.asarray(greedy.tokens)
    assert np.all(tokens == tokens[:, :1])  # all rollouts of a prompt agree
    recompute = sampling.sample_rollouts_recompute(fns, params, prompts, jax.random.key(6),
                                                   temperature=0.0, **SAMPLE_KW)
    np.testing.assert_array_equal(recompute.tokens, tokens)
    # Each greedy token is the argmax of the teacher-forced next-token distribution.
    sequences = jnp.concatenate([prompts, greedy.tokens[:, 0]], axis=1)
    logits = jax.jit(fns.forward)(params, sequences)[:, PROMPT_LEN - 1 : -1]
    mask = np.asarray(greedy.mask[:, 0])
    np.testing.assert_array_equal(np.argmax(logits, -1)[mask], tokens[:, 0][mask])


def test_no_retrace_with_real_decoder(tiny):
    fns, params, prompts, _ = tiny
    traces = fns.traces[0]
    for i in range(2):
        new_params = jax.tree_util.tree_map(lambda x: x * (1.0 + 0.1 * (i + 1)), params)
        sampling.sample_rollouts(fns, new_params, (prompts + i) % 32, jax.random.key(i), temperature=0.9,
                                 **SAMPLE_KW)
    rebuilt = CountingDecoderFns(TINY, fns.traces)  # equal config -> same cache entry
    sampling.sample_rollouts(rebuilt, params, prompts, jax.random.key(7), **SAMPLE_KW)
    assert fns.traces[0] == traces


def test_sampler_inside_outer_jit(tiny):
    fns, params, prompts, out = tiny

    @jax.jit
    def rollout(params, prompts, key):
        return sampling.sample_rollouts(fns, params, prompts, key, **SAMPLE_KW)

    inner = rollout(params, prompts, jax.random.key(2))
    np.testing.assert_array_equal(inner.tokens, out.tokens)


# ----------------------------------------------------------------------------------------------------------
# Growing suffix cache (each step's attention reads only the filled blocks of the suffix cache).
# ----------------------------------------------------------------------------------------------------------


def test_suffix_windows():
    assert sampling.suffix_windows(10, 5) == (5, 10)
    assert sampling.suffix_windows(10, 3) == (3, 6, 9, 10)
    assert sampling.suffix_windows(10, 1) == tuple(range(1, 11))
    assert sampling.suffix_windows(10, 64) == (10,)
    assert sampling.suffix_windows(10, None) == sampling.suffix_windows(10, "full") == (10,)
    # "auto": at most 4 blocks of >= 16 slots (a multiple of 8); the whole cache below 32 slots.
    assert sampling.suffix_windows(24, "auto") == (24,)
    assert sampling.suffix_windows(40, "auto") == (16, 32, 40)
    assert sampling.suffix_windows(100, "auto") == (32, 64, 96, 100)
    assert sampling.suffix_windows(200, "auto") == (56, 112, 168, 200)
    for bad in (0, -2, "blocks", 2.5, True):
        with pytest.raises(ValueError, match="suffix_block"):
            sampling.suffix_windows(10, bad)


def _padded_prompts():
    """Three prompts of lengths 7, 4 and 1, left-padded to 7 tokens."""
    tokens = np.asarray(jax.random.randint(jax.random.key(11), (NUM_PROMPTS, PROMPT_LEN), 3, 32))
    return sampling.left_pad([list(tokens[0]), list(tokens[1, :4]), list(tokens[2, :1])])


@pytest.mark.parametrize("suffix_block, padded", [(5, False), (3, False), (4, True), (1, True)])
def test_blockwise_suffix_attention_matches_full(tiny, suffix_block, padded):
    """Reading only the filled blocks gives the rollouts of the full-suffix attention (B | M and B ∤ M)."""
    fns, params, prompts, _ = tiny
    fns = dec.DecoderFns(TINY)  # Takes attention_mask (padded prompts).
    prompts = _padded_prompts() if padded else prompts
    for temperature, key in ((1.0, 2), (0.0, 3)):
        kwargs = dict(SAMPLE_KW, temperature=temperature)
        full = sampling.sample_rollouts(
            fns, params, prompts, jax.random.key(key), suffix_block=None, **kwargs)
        blocks = sampling.sample_rollouts(
            fns, params, prompts, jax.random.key(key), suffix_block=suffix_block, **kwargs)
        np.testing.assert_array_equal(blocks.tokens, full.tokens)
        np.testing.assert_array_equal(blocks.mask, full.mask)
        np.testing.assert_array_equal(blocks.stopped, full.stopped)
        np.testing.assert_array_equal(blocks.num_steps, full.num_steps)
        np.testing.assert_allclose(blocks.logprobs, full.logprobs, atol=2e-5)
    # Both equal the teacher-forced log-probs (an independent computation).
    sampled = sampling.sample_rollouts(
        fns, params, prompts, jax.random.key(2), suffix_block=suffix_block, **SAMPLE_KW)
    teacher = jax.jit(sampling.sequence_logprobs_shared_prefix, static_argnums=0)(
        fns, params, prompts, sampled.tokens)
    mask = np.asarray(sampled.mask)
    np.testing.assert_allclose(np.asarray(sampled.logprobs)[mask], np.asarray(teacher)[mask], atol=2e-5)


@dataclasses.dataclass(frozen=True)
class SlotCacheSuccessorModel(SuccessorModel):
    """SuccessorModel with a suffix cache of M slots [P, N, M] that it fills with the decoded tokens and
    reads back: from slot 1 on, it continues the token it finds in the previous slot (so a cache that lost
    its contents while growing breaks the chain). It predicts token 31 whenever the slot it writes is
    outside the cache, and records the cache sizes it was traced with."""

    sizes: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def init_suffix_cache(self, prefix_cache, num_rollouts, max_len):
        return jnp.zeros((prefix_cache.shape[0], num_rollouts, max_len), jnp.int32)

    def decode(self, params, tokens, prefix_cache, suffix_cache, step):
        self.sizes.append(suffix_cache.shape[-1])
        before = jax.lax.dynamic_slice_in_dim(suffix_cache, jnp.maximum(step - 1, 0), 1, axis=2)
        logits, _ = super().decode(params, jnp.where(step > 0, before + 1, tokens), prefix_cache,
                                   suffix_cache, step)
        logits = jnp.where(step < suffix_cache.shape[-1], logits, self._logits(jnp.full_like(tokens, 30)))
        return logits, jax.lax.dynamic_update_slice_in_dim(suffix_cache, tokens, step, axis=2)


def test_blockwise_segments_cover_every_step_and_exit_early():
    prompts = jnp.array([[9, 10], [9, 5]], jnp.int32)  # 11 12 .. 20 (truncated) ; 6 DONE
    for suffix_block, sizes in ((3, [3, 6, 9, 10]), (5, [5, 10]), (None, [10])):
        model = SlotCacheSuccessorModel()
        out = sampling.sample_rollouts(model, {}, prompts, jax.random.key(0), num_rollouts=2,
                                       max_new_tokens=10, stop_tokens=(DONE,), suffix_block=suffix_block)
        assert model.sizes == sizes
        np.testing.assert_array_equal(out.tokens[0], np.broadcast_to(np.arange(11, 21), (2, 10)))
        np.testing.assert_array_equal(out.lengths, [[10, 10], [2, 2]])
        assert int(out.num_steps) == 10
    # Every rollout stops inside the first block: the later segments run no step.
    out = sampling.sample_rollouts(SlotCacheSuccessorModel(), {}, jnp.array([[9, 3], [9, 5]], jnp.int32),
                                   jax.random.key(0), num_rollouts=2, max_new_tokens=10, stop_tokens=(DONE,),
                                   suffix_block=5)
    np.testing.assert_array_equal(out.lengths, [[4, 4], [2, 2]])
    assert int(out.num_steps) == 4
    # A suffix cache whose leaves do not only grow with M is allocated once, with all M slots.
    model = ShrinkingCacheModel()
    params = {"logits": jnp.log(jnp.asarray(FAKE_PROBS, jnp.float32))}
    out = sampling.sample_rollouts(model, params, prompts, jax.random.key(0), num_rollouts=2,
                                   max_new_tokens=10, suffix_block=4)
    assert model.sizes == [4, 10, 10]  # The two shape checks, then the one cache.
    assert out.tokens.shape == (2, 2, 10) and int(out.num_steps) == 10


@dataclasses.dataclass(frozen=True)
class ShrinkingCacheModel(FixedDistributionModel):
    """FixedDistributionModel whose suffix cache leaf shrinks as M grows; records the sizes asked for."""

    sizes: list = dataclasses.field(default_factory=list, compare=False, hash=False)

    def init_suffix_cache(self, prefix_cache, num_rollouts, max_len):
        self.sizes.append(max_len)
        return jnp.zeros((prefix_cache.shape[0], num_rollouts, 20 - max_len))


def test_lockstep_decode_under_vmap_equals_each_instance():
    # A population of 3 policies vmapped with one decode loop (lockstep_axis): each instance's tokens,
    # log-probs, lengths and own decode-step count equal its separate call, though the instances stop at
    # different steps.
    fns = dec.DecoderFns(TINY)
    params = jax.vmap(fns.init)(jnp.stack([jax.random.key(i) for i in range(3)]))
    prompts = jax.random.randint(jax.random.key(5), (3, NUM_PROMPTS, PROMPT_LEN), 0, 32, jnp.int32)
    keys = jnp.stack([jax.random.key(10 + i) for i in range(3)])
    kw = dict(SAMPLE_KW, max_new_tokens=40, stop_tokens=tuple(range(3, 9)), suffix_block=16)
    together = jax.jit(jax.vmap(
        lambda p, x, k: sampling.sample_rollouts(fns, p, x, k, lockstep_axis="member", **kw),
        axis_name="member"))(params, prompts, keys)
    steps = []
    for i in range(3):
        alone = sampling.sample_rollouts(fns, jax.tree_util.tree_map(lambda x: x[i], params), prompts[i],
                                         keys[i], **kw)
        np.testing.assert_array_equal(together.tokens[i], alone.tokens)
        np.testing.assert_array_equal(together.lengths[i], alone.lengths)
        np.testing.assert_allclose(together.logprobs[i], alone.logprobs, atol=1e-6)
        assert int(together.num_steps[i]) == int(alone.num_steps)
        steps.append(int(alone.num_steps))
    assert len(set(steps)) > 1, steps  # The instances really stopped at different steps.
