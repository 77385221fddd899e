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
from maxrl_jax.models.hf_loading import load_pretrained, load_pretrained_config, save_pretrained

__all__ = [
    "Decoder",
    "DecoderConfig",
    "DecoderFns",
    "KVCache",
    "count_params",
    "init_params",
    "init_suffix_cache",
    "load_pretrained",
    "load_pretrained_config",
    "param_shapes",
    "save_pretrained",
]
