"""A Qwen2 / Llama / Qwen3-family causal decoder in flax.linen, with a prefix-shared KV cache.

The model is configured by a frozen, hashable `DecoderConfig`. The paper's maze policy is the default
configuration: 4 layers, hidden 256, SwiGLU FFN 1024, 4 query heads, 2 KV heads, vocab 32, RMSNorm eps 1e-6,
RoPE theta 1e6, 512 positions, tied embeddings, q/k/v biases (Qwen2): 3.94M parameters.

Parameter tree (names chosen to map one-to-one onto Hugging Face Llama / Qwen2 / Qwen3 tensors; a flax
`kernel` is the transpose of the HF `weight`, `[in, out]` instead of `[out, in]`):

    embed_tokens/embedding                        [V, E]       model.embed_tokens.weight
    layers_{i}/input_layernorm/scale              [E]          model.layers.{i}.input_layernorm.weight
    layers_{i}/self_attn/q_proj/{kernel,bias}     [E, H*D]     model.layers.{i}.self_attn.q_proj.{weight,bias}
    layers_{i}/self_attn/k_proj/{kernel,bias}     [E, K*D]     ... k_proj
    layers_{i}/self_attn/v_proj/{kernel,bias}     [E, K*D]     ... v_proj
    layers_{i}/self_attn/o_proj/kernel            [H*D, E]     ... o_proj
    layers_{i}/self_attn/{q_norm,k_norm}/scale    [D]          ... q_norm / k_norm (Qwen3, qk_norm=True)
    layers_{i}/post_attention_layernorm/scale     [E]          ....post_attention_layernorm.weight
    layers_{i}/mlp/{gate_proj,up_proj}/kernel     [E, F]       model.layers.{i}.mlp.{gate_proj,up_proj}.weight
    layers_{i}/mlp/down_proj/kernel               [F, E]       model.layers.{i}.mlp.down_proj.weight
    norm/scale                                    [E]          model.norm.weight
    lm_head/kernel                                [E, V]       lm_head.weight (only when tie_embeddings=False)

RoPE uses the HF "rotate half" convention (the two halves of each head, not interleaved pairs), so HF
checkpoints load without permuting q/k rows. Query head h uses KV head h // (H / K), as HF's `repeat_kv`.

Three entry points (methods of `Decoder`, also exposed as pure functions over params by `DecoderFns`):

- `__call__(tokens [B, T]) -> logits [B, T, V]`: full causal forward (teacher forcing, recompute sampling).
- `prefill(prompts [P, L]) -> (last_logits [P, V], prefix_cache)`: the prompt pass, run once per prompt.
- `decode(tokens [P, N, R], prefix_cache, suffix_cache, step) -> (logits [P, N, R, V], suffix_cache)`:
  N continuations of each prompt. Each continuation's queries attend to the shared prefix cache of its
  prompt (`[P, L, K, D]`, broadcast over N, never copied) and to its own suffix cache (`[P, N, M, K, D]`),
  with a single softmax over the concatenated scores. The R new tokens sit at suffix slots
  `step .. step+R-1` (absolute positions `L+step ..`). R = 1 is one sampling step; R = M is
  prefix-shared teacher forcing of whole responses. The suffix cache may hold fewer slots than the
  response will have (M is only its capacity; positions come from `step`): a sampler can grow it block
  by block (`maxrl_jax.sampling.suffix_windows`) so that attention reads the filled part only.

Left-padded prompts: `__call__` and `prefill` take an optional `attention_mask` [B, T] (True on real tokens);
real tokens then sit at positions 0.., pad keys are masked, and a padded prefix cache carries the mask so that
`decode` continues each prompt right after its own tokens (see `maxrl_jax.sampling.PaddedPrompts`). RoPE
scaling (`rope_scaling`: linear, llama3, yarn) and the Llama bias options (`o_proj_bias`, `mlp_bias`) exist for
Hugging Face checkpoints (`maxrl_jax.models.hf_loading`).

Logits are always float32: the final norm output and the output projection are computed in float32 (the
log-probs used by RL losses are sensitive to a bf16 lm_head). Everything else computes in `config.dtype`,
with attention scores and softmax in float32 and parameters stored in `config.param_dtype`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
DType = Any

_MASKED_SCORE = -1e30  # finite, so fully masked rows cannot produce NaN


# ----------------------------------------------------------------------------------------------------------
# Configuration.
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Hyper-parameters of the decoder. Frozen and hashable (it may be a static jit argument).

    Defaults are the paper's maze policy (Qwen2-style, 3.94M parameters) in float32; set
    `dtype=jnp.bfloat16` for the paper's bf16 compute.

    Attributes:
      vocab_size: V.
      num_layers: number of decoder blocks.
      hidden_size: E, the embedding / residual width.
      ffn_size: F, the SwiGLU inner width.
      num_heads: H, query heads.
      num_kv_heads: K, key/value heads (GQA; must divide H).
      head_dim: D, per-head width; None means hidden_size // num_heads.
      rope_theta: RoPE base.
      rms_norm_eps: RMSNorm epsilon.
      max_positions: longest supported sequence (prompt + response); checked at trace time.
      tie_embeddings: output projection is the transposed input embedding (no lm_head parameter).
      qk_norm: RMSNorm on each query/key head before RoPE (Qwen3).
      attention_bias: biases on q/k/v projections (Qwen2: True; Llama, Qwen3: False).
      dtype: compute dtype (e.g. float32, bfloat16). Strings such as "bfloat16" are accepted.
      param_dtype: parameter storage dtype.
      init_std: standard deviation of the normal initialiser of kernels and embeddings.
      rope_scaling: None (plain RoPE) or the HF `rope_scaling` / `rope_parameters` entries as a mapping
        or (key, value) pairs; stored as a sorted tuple of pairs (hashable). Supported `rope_type`s:
        "default", "linear", "llama3", "yarn" (see `rope_frequencies`).
      o_proj_bias: bias on o_proj (HF Llama / Qwen3 with `attention_bias=True`; Qwen2 has none).
      mlp_bias: biases on gate/up/down projections (HF Llama `mlp_bias`).
    """

    vocab_size: int = 32
    num_layers: int = 4
    hidden_size: int = 256
    ffn_size: int = 1024
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_positions: int = 512
    tie_embeddings: bool = True
    qk_norm: bool = False
    attention_bias: bool = True
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32
    init_std: float = 0.02
    rope_scaling: Any = None
    o_proj_bias: bool = False
    mlp_bias: bool = False

    def __post_init__(self):
        # Canonicalise dtypes so that "bfloat16", jnp.bfloat16 and np.dtype("bfloat16") compare equal.
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))
        object.__setattr__(self, "rope_scaling", _canonical_rope_scaling(self.rope_scaling))
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                    "set head_dim explicitly."
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}.")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}.")

    @property
    def num_groups(self) -> int:
        """Query heads per KV head, H / K."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_config(cls, config: Any, *, strict: bool = True) -> "DecoderConfig":
        """Builds a DecoderConfig from an `ml_collections.ConfigDict` (or any mapping), e.g. `cfg.model`.

        Keys are the field names of this class; missing keys take the defaults (the maze policy). Dtypes may
        be strings ("bfloat16", "float32"). With `strict=True` unknown keys raise a ValueError (catches
        typos); with `strict=False` they are ignored (for blocks that also hold e.g. a checkpoint path).
        The LoRA fields of a model block (`ADAPTER_FIELDS`, read by maxrl_jax/models/lora.py) are skipped.
        """
        if hasattr(config, "to_dict"):
            values = dict(config.to_dict())
        elif isinstance(config, Mapping):
            values = dict(config)
        else:
            raise TypeError(f"Expected a ConfigDict or a mapping, got {type(config).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names - set(ADAPTER_FIELDS))
        if unknown and strict:
            raise ValueError(f"Unknown DecoderConfig keys {unknown}; known keys are {sorted(names)}.")
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (dtypes as strings), suitable for `ml_collections.ConfigDict(...)`."""
        values = dataclasses.asdict(self)
        values["dtype"] = jnp.dtype(self.dtype).name
        values["param_dtype"] = jnp.dtype(self.param_dtype).name
        values["rope_scaling"] = None if self.rope_scaling is None else dict(self.rope_scaling)
        return values


# Fields of a config's model block that configure LoRA adapters (maxrl_jax/models/lora.py), not the decoder.
ADAPTER_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_base_dtype", "lora_update")

_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _canonical_rope_scaling(scaling: Any) -> tuple[tuple[str, Any], ...] | None:
    """None, a mapping or (key, value) pairs -> None or a sorted tuple of pairs (None values dropped).

    HF's legacy key "type" becomes "rope_type"; "rope_theta" is dropped (it is `DecoderConfig.rope_theta`).
    A default rope type without other entries is None. Unsupported rope types raise a ValueError.
    """
    if scaling is None:
        return None
    if hasattr(scaling, "to_dict"):
        scaling = scaling.to_dict()
    items = dict(scaling.items() if isinstance(scaling, Mapping) else scaling)
    if "type" in items:
        items.setdefault("rope_type", items.pop("type"))
    items.pop("rope_theta", None)
    items = {str(k): v for k, v in items.items() if v is not None}
    rope_type = items.setdefault("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"Unsupported RoPE scaling type {rope_type!r}; supported: {list(_ROPE_TYPES)}.")
    if float(items.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={items['partial_rotary_factor']} is not supported (1.0 only).")
    items.pop("partial_rotary_factor", None)
    if rope_type == "default" and len(items) == 1:
        return None
    return tuple(sorted(items.items()))


# ----------------------------------------------------------------------------------------------------------
# KV caches.
# ----------------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class KVCache:
    """Keys and values of one layer, after RoPE.

    Prefix caches are `[P, L, K, D]` (one per prompt); suffix caches are `[P, N, M, K, D]` (one per
    rollout, preallocated for M tokens). A model's cache is a tuple with one KVCache per layer.

    `mask` is set only on prefix caches of padded prompts (`prefill(..., attention_mask=...)`): [P, L] bool,
    True on real prompt tokens; decoding then ignores the pad keys and continues each prompt at position
    `sum(mask[p])`. None means every prefix position is real.
    """

    k: Array
    v: Array
    mask: Array | None = None


def init_suffix_cache(
    config: DecoderConfig, num_prompts: int, num_rollouts: int, max_len: int
) -> tuple[KVCache, ...]:
    """Zero suffix cache: per layer k, v of shape [P, N, M, K, D] in `config.dtype`."""
    shape = (num_prompts, num_rollouts, max_len, config.num_kv_heads, config.head_dim)
    zeros = jnp.zeros(shape, config.dtype)
    return tuple(KVCache(k=zeros, v=zeros) for _ in range(config.num_layers))


# ----------------------------------------------------------------------------------------------------------
# Pure building blocks.
# ----------------------------------------------------------------------------------------------------------


def rope_frequencies(
    head_dim: int, theta: float, scaling: Any = None
) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim / 2] (float64 numpy) and the cos/sin scale of a RoPE variant.

    Plain RoPE: inv_freq_i = theta^(-2i/D), scale 1. With `scaling` (see DecoderConfig.rope_scaling), the
    HF rope types, from their published formulas:
      linear: inv_freq / factor.
      llama3: wavelengths 2 pi / inv_freq longer than original_max_position_embeddings / low_freq_factor
        are divided by factor, shorter than .../high_freq_factor kept, and in between interpolated with
        s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor):
        (1 - s) inv_freq / factor + s inv_freq.
      yarn: per-dimension blend of inv_freq / factor and inv_freq with a linear ramp between the correction
        dimensions of beta_fast (32) and beta_slow (1) rotations over original_max_position_embeddings
        (floored / ceiled unless truncate=False); cos and sin are scaled by attention_factor, by default
        0.1 ln(factor) + 1 (or the ratio of the mscale / mscale_all_dim versions of it).
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    options = dict(_canonical_rope_scaling(scaling) or ())
    rope_type = options.get("rope_type", "default")

    def need(key):
        if key not in options:
            raise ValueError(f"RoPE scaling {rope_type!r} needs {key!r}; got {options}.")
        return float(options[key])

    if rope_type == "default":
        return inv_freq, 1.0
    if rope_type == "linear":
        return inv_freq / need("factor"), 1.0
    if rope_type == "llama3":
        factor, low, high = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        original = need("original_max_position_embeddings")
        wavelength = 2 * np.pi / inv_freq
        scaled = np.where(wavelength > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelength - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high) & (wavelength <= original / low)
        return np.where(medium, smoothed, scaled), 1.0
    # yarn
    factor, original = need("factor"), need("original_max_position_embeddings")

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * np.log(scale) + 1.0

    attention_factor = options.get("attention_factor")
    if attention_factor is None:
        if options.get("mscale") and options.get("mscale_all_dim"):
            attention_factor = mscale(factor, options["mscale"]) / mscale(factor, options["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = options.get("beta_fast") or 32.0, options.get("beta_slow") or 1.0

    def correction_dim(rotations):
        return head_dim * np.log(original / (rotations * 2 * np.pi)) / (2 * np.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if options.get("truncate", True):
        low, high = np.floor(low), np.ceil(high)
    low, high = max(low, 0.0), min(high, head_dim - 1.0)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp  # 1: keep inv_freq (high frequencies), 0: inv_freq / factor
    blended = inv_freq / factor * (1.0 - extrapolation) + inv_freq * extrapolation
    return blended, float(attention_factor)


def rope_cos_sin(
    positions: Array, head_dim: int, theta: float, scaling: Any = None
) -> tuple[Array, Array]:
    """Rotary tables for integer `positions` [...] -> (cos, sin), each [..., head_dim] float32.

    Frequencies theta^(-2i/D) for i < D/2 (or a scaled variant, see `rope_frequencies`), repeated for
    the two halves (HF "rotate half" layout); cos and sin are multiplied by the variant's scale.
    """
    inv_freq, scale = rope_frequencies(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)
    angles = jnp.concatenate([angles, angles], axis=-1)
    if scale == 1.0:
        return jnp.cos(angles), jnp.sin(angles)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates x [..., T, heads, D] by position; cos/sin broadcast to [..., T, D]. Math in float32.

    out = x * cos + rotate_half(x) * sin, with rotate_half([x1, x2]) = [-x2, x1].
    """
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[..., None, :] + rotated * sin[..., None, :]
    return out.astype(x.dtype)


def grouped_query_attention(q: Array, k: Array, v: Array, mask: Array) -> Array:
    """Softmax attention with grouped KV heads, without materialising repeated K/V.

    Args:
      q: [B, T, H, D] queries.
      k: [B, S, K, D] keys; K divides H and query head h reads KV head h // (H / K).
      v: [B, S, K, D] values.
      mask: bool, broadcastable to [B, T, S]; True where query t may attend to key s.

    Returns:
      [B, T, H, D] in v's dtype. Scores and softmax are float32, scaled by D^-1/2.
    """
    batch, q_len, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    q_grouped = q.reshape(batch, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q_grouped, k, preferred_element_type=jnp.float32)
    scores = scores * (head_dim**-0.5)
    mask = jnp.broadcast_to(mask, (batch, q_len, k.shape[1]))
    scores = jnp.where(mask[:, None, None], scores, _MASKED_SCORE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(batch, q_len, num_heads, head_dim)


def prefix_suffix_attention(
    q: Array, prefix: KVCache, suffix: KVCache, suffix_mask: Array, prefix_mask: Array | None = None
) -> Array:
    """Attention of N continuations per prompt over a shared prefix and their own suffixes.

    One softmax over [prefix keys ; suffix keys]: the prefix is attended in full, suffix slots where
    `suffix_mask` is True.

    Args:
      q: [P, N, R, H, D] queries of R new tokens of each of the N continuations of each of P prompts.
      prefix: k, v [P, L, K, D], shared by the N continuations (broadcast, not copied).
      suffix: k, v [P, N, M, K, D], per continuation.
      suffix_mask: bool broadcastable to [R, M]; True where new token r may attend to suffix slot m.
      prefix_mask: optional bool [P, L], True on the prefix positions to attend (real prompt tokens);
        None attends every prefix position.

    Returns:
      [P, N, R, H, D] in the value dtype.
    """
    num_prompts, num_rollouts, q_len, num_heads, head_dim = q.shape
    num_kv_heads = prefix.k.shape[2]
    prefix_len = prefix.k.shape[1]
    q_grouped = q.reshape(
        num_prompts, num_rollouts, q_len, num_kv_heads, num_heads // num_kv_heads, head_dim
    )
    scale = head_dim**-0.5
    scores_prefix = jnp.einsum(
        "pnrkgd,plkd->pnkgrl", q_grouped, prefix.k, preferred_element_type=jnp.float32
    )
    scores_suffix = jnp.einsum(
        "pnrkgd,pnmkd->pnkgrm", q_grouped, suffix.k, preferred_element_type=jnp.float32
    )
    scores_suffix = jnp.where(suffix_mask, scores_suffix, _MASKED_SCORE)
    if prefix_mask is not None:
        scores_prefix = jnp.where(
            prefix_mask[:, None, None, None, None, :], scores_prefix, _MASKED_SCORE
        )
    scores = jnp.concatenate([scores_prefix, scores_suffix], axis=-1) * scale
    probs = jax.nn.softmax(scores, axis=-1).astype(prefix.v.dtype)
    probs_prefix, probs_suffix = probs[..., :prefix_len], probs[..., prefix_len:]
    out = jnp.einsum("pnkgrl,plkd->pnrkgd", probs_prefix, prefix.v) + jnp.einsum(
        "pnkgrm,pnmkd->pnrkgd", probs_suffix, suffix.v
    )
    return out.reshape(num_prompts, num_rollouts, q_len, num_heads, head_dim)


# ----------------------------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, normalised in float32, returned in `dtype`."""

    eps: float
    dtype: DType = jnp.float32
    param_dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return normed.astype(self.dtype) * scale.astype(self.dtype)


def _dense(config: DecoderConfig, features: int, use_bias: bool, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=use_bias,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=nn.initializers.normal(config.init_std),
        name=name,
    )


class Attention(nn.Module):
    """GQA self-attention with RoPE (and optional Qwen3 q/k norm)."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.q_proj = _dense(c, c.num_heads * c.head_dim, c.attention_bias, "q_proj")
        self.k_proj = _dense(c, c.num_kv_heads * c.head_dim, c.attention_bias, "k_proj")
        self.v_proj = _dense(c, c.num_kv_heads * c.head_dim, c.attention_bias, "v_proj")
        self.o_proj = _dense(c, c.hidden_size, c.o_proj_bias, "o_proj")
        if c.qk_norm:
            self.q_norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="q_norm")
            self.k_norm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype, name="k_norm")

    def _qkv(self, x: Array, cos: Array, sin: Array) -> tuple[Array, Array, Array]:
        """x [..., T, E] -> q [..., T, H, D], k, v [..., T, K, D] (q, k rotated)."""
        c = self.config
        lead = x.shape[:-1]
        q = self.q_proj(x).reshape(*lead, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(*lead, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(*lead, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array | None = None
    ) -> tuple[Array, KVCache]:
        """Causal attention over x [B, T, E] -> (out [B, T, E], this layer's cache k, v [B, T, K, D]).

        `mask` (bool, broadcastable to [B, T, T]) replaces the causal mask when given.
        """
        q, k, v = self._qkv(x, cos, sin)
        if mask is None:
            seq_len = x.shape[1]
            mask = jnp.tril(jnp.ones((seq_len, seq_len), bool))[None]
        out = grouped_query_attention(q, k, v, mask)
        return self.o_proj(out.reshape(*x.shape[:-1], -1)), KVCache(k=k, v=v)

    def decode(
        self, x: Array, cos: Array, sin: Array, prefix: KVCache, suffix: KVCache, step: Array
    ) -> tuple[Array, KVCache]:
        """x [P, N, R, E] at suffix slots step..step+R-1 -> (out [P, N, R, E], updated suffix cache)."""
        q, k, v = self._qkv(x, cos, sin)
        zero = jnp.zeros((), jnp.int32)
        start = (zero, zero, jnp.asarray(step, jnp.int32), zero, zero)
        suffix = KVCache(
            k=jax.lax.dynamic_update_slice(suffix.k, k.astype(suffix.k.dtype), start),
            v=jax.lax.dynamic_update_slice(suffix.v, v.astype(suffix.v.dtype), start),
        )
        q_len, cache_len = x.shape[2], suffix.k.shape[2]
        # New token r (slot step + r) sees suffix slots m <= step + r.
        visible = jnp.arange(cache_len)[None, :] <= step + jnp.arange(q_len)[:, None]  # [R, M]
        out = prefix_suffix_attention(q, prefix, suffix, visible, prefix.mask)
        return self.o_proj(out.reshape(*x.shape[:-1], -1)), suffix


class MLP(nn.Module):
    """SwiGLU: down_proj(silu(gate_proj(x)) * up_proj(x))."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.gate_proj = _dense(c, c.ffn_size, c.mlp_bias, "gate_proj")
        self.up_proj = _dense(c, c.ffn_size, c.mlp_bias, "up_proj")
        self.down_proj = _dense(c, c.hidden_size, c.mlp_bias, "down_proj")

    def __call__(self, x: Array) -> Array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.input_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.rms_norm_eps, c.dtype, c.param_dtype)
        self.mlp = MLP(c)

    def __call__(
        self, x: Array, cos: Array, sin: Array, mask: Array | None = None
    ) -> tuple[Array, KVCache]:
        attn_out, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv

    def decode(
        self, x: Array, cos: Array, sin: Array, prefix: KVCache, suffix: KVCache, step: Array
    ) -> tuple[Array, KVCache]:
        attn_out, suffix = self.self_attn.decode(
            self.input_layernorm(x), cos, sin, prefix, suffix, step
        )
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), suffix


class Decoder(nn.Module):
    """Causal LM. See the module docstring for the parameter names and the three entry points."""

    config: DecoderConfig

    def setup(self):
        c = self.config
        self.embed_tokens = nn.Embed(
            c.vocab_size,
            c.hidden_size,
            dtype=c.dtype,
            param_dtype=c.param_dtype,
            embedding_init=nn.initializers.normal(c.init_std),
        )
        self.layers = [DecoderLayer(c) for _ in range(c.num_layers)]  # named layers_0, layers_1, ...
        self.norm = RMSNorm(c.rms_norm_eps, jnp.float32, c.param_dtype)
        if not c.tie_embeddings:
            self.lm_head = nn.Dense(
                c.vocab_size,
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=c.param_dtype,
                kernel_init=nn.initializers.normal(c.init_std),
            )

    def _logits(self, hidden: Array) -> Array:
        """Final norm and output projection, in float32: hidden [..., E] -> logits [..., V] float32."""
        hidden = self.norm(hidden)
        if self.config.tie_embeddings:
            embedding = self.embed_tokens.embedding.astype(jnp.float32)  # [V, E]
            return jnp.einsum("...e,ve->...v", hidden, embedding)
        return self.lm_head(hidden)

    def _check_length(self, length: int) -> None:
        if length > self.config.max_positions:
            raise ValueError(
                f"Sequence length {length} exceeds max_positions={self.config.max_positions}."
            )

    def _forward_hidden(
        self, tokens: Array, attention_mask: Array | None = None
    ) -> tuple[Array, tuple[KVCache, ...]]:
        """tokens [B, T] -> (hidden [B, T, E] pre-norm, k/v [B, T, K, D] per layer).

        Without `attention_mask` the tokens sit at positions 0..T-1. With it ([B, T] bool, True on real
        tokens, e.g. False on left padding), token t sits at position (number of real tokens before t) and
        attends only to real tokens at or before t; outputs at pad positions are meaningless.
        """
        c = self.config
        self._check_length(tokens.shape[1])
        x = self.embed_tokens(tokens)
        seq_len = tokens.shape[1]
        if attention_mask is None:
            positions, mask = jnp.arange(seq_len), None  # [T]
        else:
            attention_mask = jnp.asarray(attention_mask, bool)
            positions = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)  # [B, T]
            causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))
            mask = causal[None] & attention_mask[:, None, :]  # [B, T, T]
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)  # [(B,) T, D]
        caches = []
        for layer in self.layers:
            x, kv = layer(x, cos, sin, mask)
            caches.append(kv)
        return x, tuple(caches)

    def __call__(self, tokens: Array, attention_mask: Array | None = None) -> Array:
        """Full causal forward: tokens [B, T] int -> logits [B, T, V] float32 (positions 0..T-1).

        `attention_mask` [B, T] bool (True on real tokens) supports padding, see `_forward_hidden`.
        """
        hidden, _ = self._forward_hidden(tokens, attention_mask)
        return self._logits(hidden)

    def prefill(
        self, prompts: Array, attention_mask: Array | None = None
    ) -> tuple[Array, tuple[KVCache, ...]]:
        """Prompt pass: prompts [P, L] -> (logits of the next token [P, V] float32, prefix cache).

        The prefix cache is a tuple over layers of KVCache with k, v [P, L, K, D] in `config.dtype`.
        Left-padded prompts: pass `attention_mask` [P, L] bool (True on real tokens; the last column must
        be real). It is stored in the cache (`KVCache.mask`), so `decode` skips the pad keys and places
        each continuation right after its prompt's real tokens, as for the unpadded prompt.
        """
        hidden, caches = self._forward_hidden(prompts, attention_mask)
        if attention_mask is not None:
            mask = jnp.asarray(attention_mask, bool)
            caches = tuple(KVCache(k=kv.k, v=kv.v, mask=mask) for kv in caches)
        return self._logits(hidden[:, -1]), caches

    def decode(
        self,
        tokens: Array,
        prefix_cache: tuple[KVCache, ...],
        suffix_cache: tuple[KVCache, ...],
        step: Array,
    ) -> tuple[Array, tuple[KVCache, ...]]:
        """Continuation step(s) with a shared prefix.

        Args:
          tokens: [P, N, R] int, the tokens at suffix slots step..step+R-1 of each continuation.
          prefix_cache: per layer k, v [P, L, K, D] from `prefill`.
          suffix_cache: per layer k, v [P, N, M, K, D]; slots < step must hold the earlier tokens.
          step: int scalar (may be traced), the suffix slot of tokens[..., 0]; absolute position L + step
            (or sum(mask[p]) + step for a padded prefix cache).

        Returns:
          (logits [P, N, R, V] float32 predicting the token after each input token, suffix cache with
          slots step..step+R-1 written).
        """
        c = self.config
        prefix_len, cache_len = prefix_cache[0].k.shape[1], suffix_cache[0].k.shape[2]
        self._check_length(prefix_len + cache_len)
        offsets = step + jnp.arange(tokens.shape[-1])  # [R]
        prefix_mask = prefix_cache[0].mask
        if prefix_mask is None:
            positions = prefix_len + offsets  # [R]
        else:
            lengths = jnp.sum(prefix_mask, axis=-1, dtype=jnp.int32)  # [P]
            positions = lengths[:, None, None] + offsets  # [P, 1, R], broadcasts over N
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta, c.rope_scaling)  # [(P, 1,) R, D]
        x = self.embed_tokens(tokens)
        new_suffix = []
        for layer, prefix, suffix in zip(self.layers, prefix_cache, suffix_cache):
            x, suffix = layer.decode(x, cos, sin, prefix, suffix, step)
            new_suffix.append(suffix)
        return self._logits(x), tuple(new_suffix)


# ----------------------------------------------------------------------------------------------------------
# Pure functions over params (the sampler's model interface).
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DecoderFns:
    """The decoder as pure functions of (params, inputs); implements `maxrl_jax.sampling.ModelFns`.

    Hashable by its config, so two DecoderFns built from equal configs hit the same jit cache entry when
    passed as a static argument. Build it with `DecoderFns(DecoderConfig.from_config(cfg.model))`.
    """

    config: DecoderConfig

    @property
    def module(self) -> Decoder:
        return Decoder(self.config)

    def init(self, rng: Array) -> dict:
        """Fresh parameters (a plain nested dict of arrays)."""
        return init_params(self.config, rng)

    def forward(self, params: Any, tokens: Array, attention_mask: Array | None = None) -> Array:
        """tokens [B, T] -> logits [B, T, V] float32; optional attention_mask [B, T] (True: real token)."""
        return self.module.apply({"params": params}, tokens, attention_mask)

    def prefill(
        self, params: Any, prompts: Array, attention_mask: Array | None = None
    ) -> tuple[Array, tuple[KVCache, ...]]:
        """prompts [P, L] -> (next-token logits [P, V] float32, prefix cache k/v [P, L, K, D] per layer).

        Left-padded prompts: attention_mask [P, L] bool, True on real tokens (kept in the cache).
        """
        return self.module.apply(
            {"params": params}, prompts, attention_mask, method=Decoder.prefill
        )

    def init_suffix_cache(
        self, prefix_cache: tuple[KVCache, ...], num_rollouts: int, max_len: int
    ) -> tuple[KVCache, ...]:
        """Zero suffix cache k/v [P, N, M, K, D] per layer for N rollouts of M tokens."""
        return init_suffix_cache(self.config, prefix_cache[0].k.shape[0], num_rollouts, max_len)

    def decode(
        self,
        params: Any,
        tokens: Array,
        prefix_cache: tuple[KVCache, ...],
        suffix_cache: tuple[KVCache, ...],
        step: Array,
    ) -> tuple[Array, tuple[KVCache, ...]]:
        """tokens [P, N, R] at suffix slots step.. -> (logits [P, N, R, V] float32, suffix cache)."""
        return self.module.apply(
            {"params": params}, tokens, prefix_cache, suffix_cache, step, method=Decoder.decode
        )


def init_params(config: DecoderConfig, rng: Array) -> dict:
    """Initialises parameters: a plain nested dict {name: array} (no FrozenDict)."""
    variables = Decoder(config).init(rng, jnp.zeros((1, 1), jnp.int32))
    return flax.core.unfreeze(variables["params"])


def param_shapes(config: DecoderConfig) -> dict:
    """Parameter tree of jax.ShapeDtypeStruct, without allocating anything."""
    return jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))


def count_params(config: DecoderConfig) -> int:
    """Number of parameters (computed from shapes only)."""
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(param_shapes(config)))
