"""Policy models."""

from maxrl_jax.models.decoder import (
    Decoder,
    DecoderConfig,
    DecoderFns,
    KVCache,
    count_params,
    init_params,
    init_suffix_cache,
    param_shapes,
)

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderFns",
    "KVCache",
    "count_params",
    "init_params",
    "init_suffix_cache",
    "param_shapes",
]
