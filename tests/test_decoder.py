"""Tests of the Qwen2/Llama/Qwen3-family decoder: shapes, causality, GQA, KV-cache equivalence, dtypes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from maxrl_jax.models import decoder as dec

# Tiny Qwen2-style (q/k/v bias, tied) and Qwen3-style (qk-norm, no bias, untied, head_dim != E / H).
QWEN2_TINY = dec.DecoderConfig(
    vocab_size=32, num_layers=2, hidden_size=32, ffn_size=64, num_heads=4, num_kv_heads=2,
    max_positions=64, init_std=0.2,
)
QWEN3_TINY = dec.DecoderConfig(
    vocab_size=40, num_layers=2, hidden_size=32, ffn_size=48, num_heads=4, num_kv_heads=1, head_dim=16,
    max_positions=64, tie_embeddings=False, qk_norm=True, attention_bias=False, init_std=0.2,
)
CONFIGS = {"qwen2": QWEN2_TINY, "qwen3": QWEN3_TINY}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request):
    """(fns, params, jitted forward) for each tiny config; one compile per config and shape."""
    config = CONFIGS[request.param]
    fns = dec.DecoderFns(config)
    params = fns.init(jax.random.key(0))
    return fns, params, jax.jit(fns.forward)


def _tokens(key, shape, vocab):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab, dtype=jnp.int32)


def test_forward_shapes_and_dtypes(model):
    fns, params, forward = model
    tokens = _tokens(1, (3, 12), fns.config.vocab_size)
    logits = forward(params, tokens)
    assert logits.shape == (3, 12, fns.config.vocab_size)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))


def test_causality(model):
    fns, params, forward = model
    tokens = _tokens(2, (2, 12), fns.config.vocab_size)
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % fns.config.vocab_size)
    logits, logits_changed = forward(params, tokens), forward(params, changed)
    np.testing.assert_allclose(logits[:, :7], logits_changed[:, :7], atol=1e-6)
    assert np.abs(logits[:, 7:] - logits_changed[:, 7:]).max() > 1e-3


def test_paper_maze_param_count_and_names():
    config = dec.DecoderConfig()  # defaults are the paper's maze policy
    shapes = dec.param_shapes(config)
    embed, hidden, ffn, kv = 32 * 256, 256, 1024, 2 * 64
    attention = (hidden * hidden + hidden) + 2 * (hidden * kv + kv) + hidden * hidden
    layer = attention + 3 * hidden * ffn + 2 * hidden
    assert dec.count_params(config) == embed + 4 * layer + hidden == 3_944_704
    assert sorted(shapes) == ["embed_tokens", "layers_0", "layers_1", "layers_2", "layers_3", "norm"]
    assert sorted(shapes["layers_0"]) == [
        "input_layernorm", "mlp", "post_attention_layernorm", "self_attn"]
    assert sorted(shapes["layers_0"]["self_attn"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert sorted(shapes["layers_0"]["mlp"]) == ["down_proj", "gate_proj", "up_proj"]
    assert shapes["layers_0"]["self_attn"]["k_proj"]["kernel"].shape == (256, 128)
    qwen3 = dec.param_shapes(QWEN3_TINY)
    assert "lm_head" in qwen3 and "q_norm" in qwen3["layers_0"]["self_attn"]
    assert qwen3["layers_0"]["self_attn"]["q_norm"]["scale"].shape == (16,)
    assert "bias" not in qwen3["layers_0"]["self_attn"]["q_proj"]


def test_config_from_config_dict():
    cfg = ml_collections.ConfigDict(dict(num_layers=2, dtype="bfloat16", qk_norm=True))
    config = dec.DecoderConfig.from_config(cfg)
    assert config.dtype == jnp.bfloat16 and config.num_layers == 2 and config.head_dim == 64
    assert config == dec.DecoderConfig(num_layers=2, dtype=jnp.bfloat16, qk_norm=True)
    assert hash(config) == hash(dec.DecoderConfig.from_config(config.to_dict()))
    with pytest.raises(ValueError, match="Unknown"):
        dec.DecoderConfig.from_config({"num_layer": 2})
    assert dec.DecoderConfig.from_config({"checkpoint": "x"}, strict=False) == dec.DecoderConfig()
    with pytest.raises(ValueError):
        dec.DecoderConfig(num_heads=4, num_kv_heads=3)


def _reference_attention(q, k, v, mask):
    """Multi-head attention after explicitly repeating each KV head H/K times (HF repeat_kv)."""
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(mask[:, None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("bhts,bshd->bthd", probs, v)


def test_grouped_attention_matches_repeated_kv():
    rng = np.random.default_rng(3)
    q, k, v = (rng.normal(size=s).astype(np.float32) for s in [(2, 5, 6, 8), (2, 7, 2, 8), (2, 7, 2, 8)])
    mask = rng.random((2, 5, 7)) < 0.6
    mask[:, :, 0] = True
    out = jax.jit(dec.grouped_query_attention)(q, k, v, mask)
    expected = _reference_attention(q.astype(np.float64), k, v, mask)
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_prefix_suffix_attention_is_one_softmax_over_both():
    """Shared prefix + own suffix == plain attention over the concatenated keys of each continuation."""
    rng = np.random.default_rng(4)
    normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
    num_prompts, num_rollouts, prefix_len, cache_len, q_len = 2, 3, 5, 4, 2
    q = normal(num_prompts, num_rollouts, q_len, 4, 8)
    prefix = dec.KVCache(normal(num_prompts, prefix_len, 2, 8), normal(num_prompts, prefix_len, 2, 8))
    suffix = dec.KVCache(normal(num_prompts, num_rollouts, cache_len, 2, 8),
                         normal(num_prompts, num_rollouts, cache_len, 2, 8))
    visible = np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)  # [R, M]
    out = jax.jit(dec.prefix_suffix_attention)(q, prefix, suffix, visible)
    for p in range(num_prompts):
        for n in range(num_rollouts):
            k_all = np.concatenate([prefix.k[p], suffix.k[p, n]])[None]
            v_all = np.concatenate([prefix.v[p], suffix.v[p, n]])[None]
            mask = np.concatenate([np.ones((q_len, prefix_len), bool), visible], axis=1)[None]
            expected = _reference_attention(q[p, n][None], k_all, v_all, mask)[0]
            np.testing.assert_allclose(out[p, n], expected, atol=1e-5)


def test_rope_is_relative():
    """<rope(q, i), rope(k, j)> depends only on i - j, and RoPE preserves norms."""
    q, k = jax.random.normal(jax.random.key(5), (2, 1, 1, 16))
    def rotate(x, pos):
        cos, sin = dec.rope_cos_sin(jnp.array([pos]), 16, 1e4)
        return dec.apply_rope(x, cos, sin)[0, 0]
    dot_a = jnp.dot(rotate(q, 7), rotate(k, 3))
    dot_b = jnp.dot(rotate(q, 104), rotate(k, 100))
    np.testing.assert_allclose(dot_a, dot_b, rtol=1e-4)
    np.testing.assert_allclose(jnp.linalg.norm(rotate(q, 9)), jnp.linalg.norm(q), rtol=1e-5)


def _numpy_hf_forward(config, params, tokens):
    """Llama/Qwen2/Qwen3 forward written from the HF formulas, in float64 numpy, with HF weight layout."""
    p = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), params)
    weight = lambda d: d["kernel"].T  # HF stores [out, in]
    linear = lambda x, d: x @ weight(d).T + d.get("bias", 0.0)
    def rms(x, scale):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + config.rms_norm_eps) * scale
    seq_len, dim = tokens.shape[1], config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2) / dim)
    angles = np.arange(seq_len)[:, None] * inv_freq[None]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))
    def rope(x):  # x [B, T, heads, D]
        rotated = np.concatenate([-x[..., dim // 2:], x[..., : dim // 2]], -1)
        return x * cos[:, None] + rotated * sin[:, None]
    x = p["embed_tokens"]["embedding"][tokens]
    mask = np.tril(np.ones((seq_len, seq_len), bool))[None]
    for i in range(config.num_layers):
        layer = p[f"layers_{i}"]
        attn = layer["self_attn"]
        h = rms(x, layer["input_layernorm"]["scale"])
        shape = h.shape[:2]
        q = linear(h, attn["q_proj"]).reshape(*shape, config.num_heads, dim)
        k = linear(h, attn["k_proj"]).reshape(*shape, config.num_kv_heads, dim)
        v = linear(h, attn["v_proj"]).reshape(*shape, config.num_kv_heads, dim)
        if config.qk_norm:
            q, k = rms(q, attn["q_norm"]["scale"]), rms(k, attn["k_norm"]["scale"])
        out = _reference_attention(rope(q), rope(k), v, mask).reshape(*shape, -1)
        x = x + linear(out, attn["o_proj"])
        h = rms(x, layer["post_attention_layernorm"]["scale"])
        mlp = layer["mlp"]
        gate = linear(h, mlp["gate_proj"])
        x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, mlp["up_proj"]), mlp["down_proj"])
    x = rms(x, p["norm"]["scale"])
    head = p["embed_tokens"]["embedding"] if config.tie_embeddings else weight(p["lm_head"])
    return x @ head.T


def test_matches_numpy_hf_reference(model):
    fns, params, forward = model
    tokens = _tokens(6, (2, 9), fns.config.vocab_size)
    expected = _numpy_hf_forward(fns.config, params, np.asarray(tokens))
    np.testing.assert_allclose(forward(params, tokens), expected, atol=2e-5, rtol=1e-4)


def test_kv_cache_decode_matches_full_forward(model):
    """prefill + stepwise decode, and prefill + one chunked decode, equal the full causal forward."""
    fns, params, forward = model
    vocab = fns.config.vocab_size
    num_prompts, num_rollouts, prompt_len, new = 2, 3, 6, 5
    prompts = _tokens(7, (num_prompts, prompt_len), vocab)
    continuations = _tokens(8, (num_prompts, num_rollouts, new), vocab)
    full = forward(params, jnp.concatenate(
        [jnp.repeat(prompts, num_rollouts, 0), continuations.reshape(-1, new)], axis=1))
    full = full.reshape(num_prompts, num_rollouts, prompt_len + new, vocab)

    prefill = jax.jit(fns.prefill)
    decode = jax.jit(fns.decode)
    last_logits, prefix_cache = prefill(params, prompts)
    np.testing.assert_allclose(last_logits, full[:, 0, prompt_len - 1], atol=1e-5)
    cache = fns.init_suffix_cache(prefix_cache, num_rollouts, new)
    for step in range(new):
        logits, cache = decode(params, continuations[:, :, step : step + 1], prefix_cache, cache,
                               jnp.int32(step))
        np.testing.assert_allclose(logits[:, :, 0], full[:, :, prompt_len + step], atol=1e-5)

    cache = fns.init_suffix_cache(prefix_cache, num_rollouts, new)
    logits, _ = decode(params, continuations, prefix_cache, cache, jnp.int32(0))
    np.testing.assert_allclose(logits, full[:, :, prompt_len:], atol=1e-5)


def test_decode_into_a_smaller_cache_matches_the_full_one(model):
    """The suffix cache size is a capacity only: decoding into W < M slots, then copying them into a cache
    of M slots and going on there (as the sampler grows its cache), equals decoding with all M slots from
    the start, for left-padded prompts too."""
    fns, params, _ = model
    vocab = fns.config.vocab_size
    num_prompts, num_rollouts, prompt_len, new = 2, 3, 6, 7
    prompts = _tokens(10, (num_prompts, prompt_len), vocab)
    left_padded = jnp.arange(prompt_len) >= jnp.array([[0], [2]])  # the second prompt has 4 real tokens
    continuations = _tokens(11, (num_prompts, num_rollouts, new), vocab)
    decode = jax.jit(fns.decode)

    def grow(cache, size):  # slots 0..W-1 of every layer's k, v [P, N, W, K, D] into a zero cache of `size`
        larger = fns.init_suffix_cache(prefix_cache, num_rollouts, size)
        return jax.tree_util.tree_map(lambda big, small: big.at[:, :, : small.shape[2]].set(small),
                                      larger, cache)

    for attention_mask in (None, left_padded):
        _, prefix_cache = jax.jit(fns.prefill)(params, prompts, attention_mask)
        full_cache = fns.init_suffix_cache(prefix_cache, num_rollouts, new)
        block_cache = fns.init_suffix_cache(prefix_cache, num_rollouts, 3)
        for step in range(new):
            if step in (3, 6):  # sizes 3, 6, 7 (a block of 3 that does not divide 7)
                block_cache = grow(block_cache, min(new, step + 3))
            token = continuations[:, :, step : step + 1]
            full, full_cache = decode(params, token, prefix_cache, full_cache, jnp.int32(step))
            blocks, block_cache = decode(params, token, prefix_cache, block_cache, jnp.int32(step))
            np.testing.assert_allclose(blocks, full, atol=1e-5)
        jax.tree_util.tree_map(
            functools.partial(np.testing.assert_allclose, atol=1e-5), block_cache, full_cache)
        # Several new tokens at once into a cache of 5 slots (teacher forcing of slots 2..4).
        _, cache = decode(params, continuations[:, :, :2], prefix_cache,
                          fns.init_suffix_cache(prefix_cache, num_rollouts, 2), jnp.int32(0))
        chunk = continuations[:, :, 2:5]
        blocks, _ = decode(params, chunk, prefix_cache, grow(cache, 5), jnp.int32(2))
        full, _ = decode(params, chunk, prefix_cache, grow(cache, new), jnp.int32(2))
        np.testing.assert_allclose(blocks, full, atol=1e-5)


def test_bfloat16_compute():
    config = dataclasses.replace(QWEN2_TINY, dtype=jnp.bfloat16)
    fns = dec.DecoderFns(config)
    params = fns.init(jax.random.key(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    tokens = _tokens(9, (2, 10), config.vocab_size)
    logits = jax.jit(fns.forward)(params, tokens)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
    reference = jax.jit(dec.DecoderFns(QWEN2_TINY).forward)(params, tokens)
    assert np.abs(logits - reference).max() < 0.1  # bf16 round-off only
    _, prefix_cache = jax.eval_shape(fns.prefill, params, tokens)
    assert prefix_cache[0].k.dtype == jnp.bfloat16
    # A bf16 decode step (the sampler's) runs on this backend and agrees with the full forward.
    _, prefix_cache = jax.jit(fns.prefill)(params, tokens[:, :6])
    cache = fns.init_suffix_cache(prefix_cache, 1, 4)
    step_logits, cache = jax.jit(fns.decode)(params, tokens[:, None, 6:7], prefix_cache, cache, jnp.int32(0))
    assert cache[0].k.dtype == jnp.bfloat16
    assert np.abs(step_logits[:, 0, 0] - reference[:, 6]).max() < 0.1


def test_max_positions_is_enforced():
    fns = dec.DecoderFns(QWEN2_TINY)
    with pytest.raises(ValueError, match="max_positions"):
        jax.eval_shape(fns.forward, dec.param_shapes(QWEN2_TINY), jnp.zeros((1, 65), jnp.int32))
