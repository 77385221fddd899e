"""Hugging Face checkpoints (Llama / SmolLM2, Qwen2 / Qwen2.5, Qwen3) <-> our flax `Decoder`.

    model, params = load_pretrained("/models/SmolLM2-360M-Instruct", dtype="bfloat16", param_dtype="float32")
    logits_BxTxV = model.apply({"params": params}, tokens_BxT)
    fns = DecoderFns(model.config)                      # the sampler's / trainers' interface

A checkpoint directory holds `config.json` and `model.safetensors`, or shards `*.safetensors` listed in
`model.safetensors.index.json`. Nothing is downloaded: the path must be a local directory.

What is mapped (HF tensor -> our parameter, `kernel` = HF `weight` transposed):

    model.embed_tokens.weight                          embed_tokens/embedding
    model.layers.{i}.input_layernorm.weight            layers_{i}/input_layernorm/scale
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers_{i}/self_attn/{q,k,v,o}_proj/kernel
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       .../bias   (Qwen2; Llama/Qwen3 attention_bias=True)
    model.layers.{i}.self_attn.o_proj.bias             .../bias   (Llama/Qwen3 attention_bias=True only)
    model.layers.{i}.self_attn.{q,k}_norm.weight       layers_{i}/self_attn/{q,k}_norm/scale   (Qwen3)
    model.layers.{i}.post_attention_layernorm.weight   layers_{i}/post_attention_layernorm/scale
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers_{i}/mlp/{gate,up,down}_proj/kernel
    model.layers.{i}.mlp.{gate,up,down}_proj.bias      .../bias   (Llama mlp_bias=True only)
    model.norm.weight                                  norm/scale
    lm_head.weight                                     lm_head/kernel   (absent when embeddings are tied)

config.json fields read: architectures / model_type, vocab_size, hidden_size, intermediate_size,
num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_theta (or
rope_parameters.rope_theta), rope_scaling / rope_parameters (linear, llama3, yarn), max_position_embeddings,
tie_word_embeddings, attention_bias, mlp_bias, hidden_act (silu only), use_sliding_window / layer_types
(full attention only). Anything unsupported raises a ValueError that names it; so does a missing, misshaped
or unexpected tensor.

Safetensors files are read with our own reader (the format is an 8-byte header length, a JSON header and
raw little-endian data): each tensor is a memory-mapped view, converted and placed one at a time, so the
host never holds a second full copy of the model. With `shardings`, each device's shard is read straight
from the memory map (`jax.make_array_from_callback`), so a mesh is filled without a full host copy per
device. `save_pretrained` writes the reverse (config.json + safetensors), which transformers can load.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from maxrl_jax.models import decoder as dec

PyTree = Any

# HF class name -> our family name.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Tensors that may appear in a checkpoint without a parameter of ours (buffers of old exports).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_SAFETENSORS_CODES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}
_MAX_SAFETENSORS_HEADER = 100_000_000  # The safetensors format's own limit on the JSON header.
_REQUIRED_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads")
_RESTORE = "restore it from the original checkpoint (copy or download it again)"


# ----------------------------------------------------------------------------------------------------------
# JSON files.
# ----------------------------------------------------------------------------------------------------------


def read_json_file(path: str, what: str = "JSON file") -> dict[str, Any]:
    """A JSON object from `path`; ValueError naming the file, what it should be and the fix otherwise.

    `what` describes the file in the message (e.g. "model config").
    """
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read().decode("utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): the {what} is "
                         f"damaged or was replaced by another file; {_RESTORE}.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not valid JSON (not UTF-8 text): the {what} is damaged or was replaced by a "
                         f"binary file; {_RESTORE}.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} holds a JSON {type(value).__name__}, not an object: it is not a valid {what}; "
                         f"{_RESTORE}.")
    return value


# ----------------------------------------------------------------------------------------------------------
# Safetensors.
# ----------------------------------------------------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-maps one .safetensors file: {name: read-only array view} (no data is read until used).

    A damaged file (truncated, an impossible header length, a header that is not the format's JSON, tensors
    outside the file) raises a ValueError naming the file, the tensor and the fix.
    """
    damaged = f"re-download or re-save {os.path.basename(path)}"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes); {damaged}.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise ValueError(
                f"{path} is not a valid safetensors file: its first 8 bytes give a header of {header_len} bytes "
                f"but the file has {size} bytes (the format allows at most {_MAX_SAFETENSORS_HEADER}); the file "
                f"is truncated or not safetensors: {damaged}.")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not a safetensors file (bad JSON header: {e}); {damaged}.") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (its header is not a JSON object); {damaged}.")
    start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: the header entry of tensor {name!r} is malformed (needs dtype, shape and two "
                             f"data_offsets): {str(info)[:200]}; {damaged}.") from None
        if dtype_code not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {dtype_code!r}.")
        dtype = _SAFETENSORS_DTYPES[dtype_code].newbyteorder("<")
        if min(shape, default=0) < 0 or not 0 <= begin <= end:
            raise ValueError(f"{path}: tensor {name!r} has shape {shape} and data offsets [{begin}, {end}]; "
                             f"{damaged}.")
        if end - begin != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape}.")
        if start + end > size:
            raise ValueError(
                f"{path} is truncated: tensor {name!r} ends at byte {start + end} but the file has {size} bytes "
                f"(an interrupted download or copy?); {damaged}.")
        entries[name] = (dtype, shape, begin, end)
    if not entries:
        return {}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: data[start + begin:start + end].view(dtype).reshape(shape)
            for name, (dtype, shape, begin, end) in entries.items()}


def write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes {name: array} as one .safetensors file (the header is padded to 8 bytes with spaces)."""
    header: dict[str, Any] = {}
    arrays = []
    offset = 0
    for name in sorted(tensors):
        array = np.ascontiguousarray(np.asarray(tensors[name]))
        if array.dtype not in _SAFETENSORS_CODES:
            raise ValueError(f"Tensor {name!r}: dtype {array.dtype} has no safetensors code.")
        array = array.astype(array.dtype.newbyteorder("<"), copy=False)
        header[name] = {
            "dtype": _SAFETENSORS_CODES[array.dtype.newbyteorder("=")],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + array.nbytes],
        }
        arrays.append(array)
        offset += array.nbytes
    header["__metadata__"] = {"format": "pt", **dict(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for array in arrays:
            f.write(array.tobytes())
    os.replace(tmp, path)


def read_checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of a HF checkpoint directory (single file or sharded index), memory-mapped."""
    index_path = os.path.join(path, "model.safetensors.index.json")
    single_path = os.path.join(path, "model.safetensors")
    if os.path.exists(index_path):
        weight_map = read_json_file(index_path, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index_path} has no \"weight_map\" object of tensor name -> shard file: it is not "
                             f"a valid safetensors index; {_RESTORE}.")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = os.path.join(path, shard)
            if not os.path.exists(shard_path):
                raise FileNotFoundError(f"{index_path} lists shard {shard!r}, which is missing.")
            tensors.update(read_safetensors(shard_path))
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ValueError(f"Tensors listed in {index_path} but absent from the shards: {missing[:10]}.")
        return tensors
    if os.path.exists(single_path):
        return read_safetensors(single_path)
    present = sorted(os.listdir(path))
    hint = ""
    if any(name.endswith(".bin") or name.endswith(".pt") for name in present):
        hint = (" Only safetensors are read; convert PyTorch .bin weights with transformers: "
                "AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, safe_serialization=True).")
    raise FileNotFoundError(
        f"No model.safetensors or model.safetensors.index.json in {path} (found {present[:12]}).{hint}"
    )


# ----------------------------------------------------------------------------------------------------------
# Config.
# ----------------------------------------------------------------------------------------------------------


def read_hf_config(path: str) -> dict[str, Any]:
    """config.json of a local checkpoint directory, with a clear error when it is not one."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"Checkpoint directory {path!r} does not exist. Models are never downloaded: pass a local "
            "directory holding config.json and *.safetensors (e.g. from `huggingface-cli download`)."
        )
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} is missing; {path} is not a Hugging Face model directory.")
    return read_json_file(config_path, "model config")


def architecture_of(hf_config: Mapping[str, Any]) -> str:
    """'llama' | 'qwen2' | 'qwen3' from `architectures` (or `model_type`); ValueError naming others."""
    names = list(hf_config.get("architectures") or [])
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    model_type = hf_config.get("model_type")
    if not names and model_type in _MODEL_TYPES:
        return model_type
    raise ValueError(
        f"Unsupported architecture {names or None} (model_type {model_type!r}); supported: "
        f"{sorted(ARCHITECTURES)} (SmolLM2 and Llama 2/3 are LlamaForCausalLM, Qwen2.5 is Qwen2ForCausalLM)."
    )


def _rope_settings(hf_config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling entries or None) from the legacy or the transformers-5 config layout."""
    parameters = dict(hf_config.get("rope_parameters") or {})
    if parameters and all(isinstance(v, Mapping) for v in parameters.values()):
        raise ValueError(f"Per-layer-type rope_parameters {sorted(parameters)} are not supported.")
    theta = hf_config.get("rope_theta", parameters.get("rope_theta", 10000.0))
    scaling = dict(hf_config.get("rope_scaling") or {}) or parameters
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in ("default", None) and len([k for k in scaling if k not in ("rope_type", "type")]) == 0:
        return float(theta), None
    if rope_type in ("llama3", "yarn"):
        scaling.setdefault("original_max_position_embeddings",
                           hf_config.get("original_max_position_embeddings",
                                         hf_config.get("max_position_embeddings")))
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = hf_config["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    return float(theta), scaling


def decoder_config_from_hf(
    hf_config: Mapping[str, Any],
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    max_positions: int | None = None,
    tie_embeddings: bool | None = None,
    source: str = "config.json",
) -> dec.DecoderConfig:
    """DecoderConfig for a HF Llama / Qwen2 / Qwen3 config dict.

    Args:
      hf_config: the parsed config.json.
      dtype: compute dtype. param_dtype: storage dtype (default: dtype).
      max_positions: longest sequence to allow (default: max_position_embeddings).
      tie_embeddings: overrides tie_word_embeddings (used when config.json lacks it).
      source: the file named in errors (the loaders pass config.json's path).
    """
    arch = architecture_of(hf_config)
    missing = [field for field in _REQUIRED_CONFIG_FIELDS if hf_config.get(field) is None]
    if missing:
        raise ValueError(f"{source} lacks {missing}, which a {arch} model needs: it is not the checkpoint's complete "
                         f"config.json; {_RESTORE}.")
    for field in _REQUIRED_CONFIG_FIELDS + ("num_key_value_heads", "head_dim", "max_position_embeddings"):
        value = hf_config.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{source}: {field}={value!r} must be a positive integer; {_RESTORE}.")
    act = hf_config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"hidden_act={act!r} is not supported (SwiGLU with silu only).")
    if hf_config.get("use_sliding_window"):
        raise ValueError("use_sliding_window=True is not supported (full causal attention only).")
    layer_types = set(hf_config.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"layer_types {sorted(layer_types)} are not supported (full_attention only).")
    if float(hf_config.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError(f"partial_rotary_factor={hf_config['partial_rotary_factor']} is not supported.")
    num_heads = int(hf_config["num_attention_heads"])
    hidden = int(hf_config["hidden_size"])
    theta, scaling = _rope_settings(hf_config)
    attention_bias = bool(hf_config.get("attention_bias", False))
    mlp_bias = bool(hf_config.get("mlp_bias", False))
    if mlp_bias and arch != "llama":
        raise ValueError(f"mlp_bias=True is only defined for Llama, not {arch}.")
    if tie_embeddings is None:
        tie_embeddings = bool(hf_config.get("tie_word_embeddings", False))
    return dec.DecoderConfig(
        vocab_size=int(hf_config["vocab_size"]),
        num_layers=int(hf_config["num_hidden_layers"]),
        hidden_size=hidden,
        ffn_size=int(hf_config["intermediate_size"]),
        num_heads=num_heads,
        num_kv_heads=int(hf_config.get("num_key_value_heads") or num_heads),
        head_dim=int(hf_config.get("head_dim") or hidden // num_heads),
        rope_theta=theta,
        rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
        max_positions=int(max_positions or hf_config.get("max_position_embeddings", 4096)),
        tie_embeddings=tie_embeddings,
        qk_norm=arch == "qwen3",
        attention_bias=True if arch == "qwen2" else attention_bias,
        o_proj_bias=False if arch == "qwen2" else attention_bias,
        mlp_bias=mlp_bias,
        dtype=dtype,
        param_dtype=dtype if param_dtype is None else param_dtype,
        rope_scaling=scaling,
    )


def load_pretrained_config(path: str, **kwargs) -> dec.DecoderConfig:
    """DecoderConfig of a local checkpoint (kwargs as `decoder_config_from_hf`), without reading weights.

    Use it to build shardings before `load_pretrained(path, shardings=...)`.
    """
    hf_config = read_hf_config(path)
    if "tie_embeddings" not in kwargs and "tie_word_embeddings" not in hf_config:
        kwargs["tie_embeddings"] = "lm_head.weight" not in read_checkpoint_tensors(path)
    kwargs.setdefault("source", os.path.join(path, "config.json"))
    return decoder_config_from_hf(hf_config, **kwargs)


# ----------------------------------------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------------------------------------


def _path_names(path) -> tuple[str, ...]:
    return tuple(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def hf_tensor_name(param_path: tuple[str, ...]) -> tuple[str, bool]:
    """Our parameter path, e.g. ('layers_0', 'mlp', 'up_proj', 'kernel') -> (HF name, transposed?)."""
    *modules, leaf = param_path
    suffix, transpose = {"kernel": ("weight", True), "embedding": ("weight", False),
                         "scale": ("weight", False), "bias": ("bias", False)}[leaf]
    if modules[0] == "lm_head":
        return f"lm_head.{suffix}", transpose
    if modules[0].startswith("layers_"):
        modules = ["layers", modules[0][len("layers_"):], *modules[1:]]
    return ".".join(["model", *modules, suffix]), transpose


def hf_tensor_names(config: dec.DecoderConfig) -> dict[tuple[str, ...], tuple[str, bool]]:
    """{our parameter path: (HF tensor name, transposed?)} for every parameter of `config`."""
    leaves = jax.tree_util.tree_flatten_with_path(dec.param_shapes(config))[0]
    return {_path_names(path): hf_tensor_name(_path_names(path)) for path, _ in leaves}


def _set_nested(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------------------
# Loading.
# ----------------------------------------------------------------------------------------------------------


def _sharding_tree(shardings: Any, config: dec.DecoderConfig) -> dict[tuple[str, ...], Any]:
    """Normalises `shardings` (None, one Sharding, a pytree, or a callable of the shape tree) per path."""
    shapes = dec.param_shapes(config)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return {_path_names(p): shardings for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0]}
    if callable(shardings):
        shardings = shardings(shapes)
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding) or x is None
    )[0]
    out = {_path_names(p): s for p, s in flat}
    expected = set(_path_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(shapes)[0])
    if set(out) != expected:
        raise ValueError(
            "shardings must have the parameter tree's structure; missing "
            f"{sorted('/'.join(p) for p in expected - set(out))[:5]}, extra "
            f"{sorted('/'.join(p) for p in set(out) - expected)[:5]}."
        )
    return out


def _place(view: np.ndarray, dtype: np.dtype, sharding: Any) -> jax.Array:
    """One tensor onto device(s): whole, or shard by shard from the memory map when `sharding` is set.

    Each piece is copied out of the memory map first (np.array), so no device buffer can alias the
    read-only file mapping (the CPU backend may place numpy memory without copying).
    """
    if sharding is None:
        return jax.device_put(np.array(view, dtype=dtype))
    return jax.make_array_from_callback(
        view.shape, sharding, lambda index: np.array(view[index], dtype=dtype)
    )


def load_pretrained(
    path: str,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    max_positions: int | None = None,
    shardings: Any = None,
) -> tuple[dec.Decoder, dict]:
    """Loads a local HF Llama / Qwen2 / Qwen3 checkpoint into our decoder.

    Args:
      path: directory with config.json and model.safetensors (or model.safetensors.index.json + shards).
      dtype: compute dtype ("float32", "bfloat16", ...).
      param_dtype: parameter storage dtype; default `dtype`. For RL, "float32" with dtype="bfloat16" keeps
        full-precision master weights.
      max_positions: longest prompt + response allowed (default: the checkpoint's max_position_embeddings).
      shardings: None (default device), one `jax.sharding.Sharding` for every parameter, a pytree of
        Shardings with the parameter tree's structure, or a callable taking the tree of parameter
        ShapeDtypeStructs and returning such a pytree (e.g. sharding rules over a mesh). Each device then
        reads only its own shard from the memory-mapped file.

    Returns:
      (model, params): `model` is a `Decoder` (`model.config` is its DecoderConfig; `model.apply(
      {"params": params}, tokens [B, T]) -> logits [B, T, V]`), params a nested dict of jax Arrays.

    Raises:
      FileNotFoundError: no such directory, config.json or safetensors files.
      ValueError: unsupported architecture or config field, a config.json / index that is not JSON or lacks
        required fields, a damaged (e.g. truncated) safetensors file, or missing / misshaped / unexpected
        tensors (all named, with the file).
    """
    hf_config = read_hf_config(path)
    tensors = read_checkpoint_tensors(path)
    tie = None if "tie_word_embeddings" in hf_config else "lm_head.weight" not in tensors
    config = decoder_config_from_hf(
        hf_config, dtype=dtype, param_dtype=param_dtype, max_positions=max_positions, tie_embeddings=tie,
        source=os.path.join(path, "config.json"),
    )
    names = hf_tensor_names(config)
    shapes = {
        _path_names(p): s.shape
        for p, s in jax.tree_util.tree_flatten_with_path(dec.param_shapes(config))[0]
    }
    missing = sorted(hf for hf, _ in names.values() if hf not in tensors)
    used = {hf for hf, _ in names.values()}
    unexpected = sorted(
        name for name in tensors
        if name not in used and not name.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_embeddings and name == "lm_head.weight")
    )
    misshaped = []
    for param_path, (hf, transpose) in names.items():
        if hf in tensors:
            shape = tensors[hf].shape[::-1] if transpose else tensors[hf].shape
            if tuple(shape) != tuple(shapes[param_path]):
                misshaped.append(f"{hf}: {tensors[hf].shape}, expected "
                                 f"{tuple(shapes[param_path])[::-1] if transpose else shapes[param_path]}")
    if missing or unexpected or misshaped:
        arch = architecture_of(hf_config)
        problems = []
        if missing:
            problems.append(f"missing tensors {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        if unexpected:
            problems.append(f"unexpected tensors {unexpected[:10]}" + (" ..." if len(unexpected) > 10 else ""))
        if misshaped:
            problems.append(f"misshaped tensors {misshaped[:10]}")
        raise ValueError(f"Checkpoint {path} ({arch}) does not match its config.json: " + "; ".join(problems))

    shardings_by_path = _sharding_tree(shardings, config)
    storage = np.dtype(config.param_dtype)
    params: dict = {}
    for param_path, (hf, transpose) in names.items():
        view = tensors[hf].T if transpose else tensors[hf]
        _set_nested(params, param_path, _place(view, storage, shardings_by_path[param_path]))
    return dec.Decoder(config), params


# ----------------------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------------------


def hf_config_dict(config: dec.DecoderConfig, architecture: str, **extra) -> dict[str, Any]:
    """config.json content describing `config` as a HF `architecture` ('llama' | 'qwen2' | 'qwen3')."""
    if architecture not in _MODEL_TYPES:
        raise ValueError(f"architecture={architecture!r}; allowed: {sorted(_MODEL_TYPES)}.")
    problems = []
    if architecture == "qwen2":
        if not config.attention_bias or config.o_proj_bias or config.qk_norm:
            problems.append("Qwen2 has q/k/v biases, no o_proj bias and no q/k norm")
    else:
        if config.attention_bias != config.o_proj_bias:
            problems.append(f"{architecture} has biases on all of q/k/v/o or on none")
        if config.qk_norm != (architecture == "qwen3"):
            problems.append("q/k norm is Qwen3's alone")
    if config.mlp_bias and architecture != "llama":
        problems.append("mlp_bias is Llama's alone")
    if problems:
        raise ValueError(f"Cannot export this DecoderConfig as {architecture}: {'; '.join(problems)}.")
    result = {
        "architectures": [_MODEL_TYPES[architecture]],
        "model_type": architecture,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": None if config.rope_scaling is None else dict(config.rope_scaling),
        "max_position_embeddings": config.max_positions,
        "tie_word_embeddings": config.tie_embeddings,
        "torch_dtype": np.dtype(config.param_dtype).name,
        "use_sliding_window": False,
    }
    if architecture != "qwen2":
        result["attention_bias"] = config.attention_bias
    if architecture == "llama":
        result["mlp_bias"] = config.mlp_bias
    result.update(extra)
    return result


def save_pretrained(
    path: str,
    config: dec.DecoderConfig,
    params: PyTree,
    *,
    architecture: str,
    max_shard_bytes: int | None = None,
    **extra_config,
) -> None:
    """Writes a HF checkpoint directory (config.json + safetensors) that `load_pretrained` and transformers
    read back. Tensors keep the parameters' dtype. `max_shard_bytes` splits them into shards with an index.
    `extra_config` entries (e.g. bos_token_id, eos_token_id) are added to config.json.
    """
    hf_config = hf_config_dict(config, architecture, **extra_config)
    os.makedirs(path, exist_ok=True)
    names = hf_tensor_names(config)
    flat = {_path_names(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    if set(flat) != set(names):
        raise ValueError(f"params do not match the config: differing paths "
                         f"{sorted('/'.join(p) for p in set(flat) ^ set(names))[:10]}.")
    tensors = {}
    for param_path, (hf, transpose) in names.items():
        array = np.asarray(jax.device_get(flat[param_path]))
        tensors[hf] = np.ascontiguousarray(array.T if transpose else array)
    for stale in ("model.safetensors", "model.safetensors.index.json"):
        if os.path.exists(os.path.join(path, stale)):
            os.remove(os.path.join(path, stale))
    if max_shard_bytes is None:
        write_safetensors(os.path.join(path, "model.safetensors"), tensors)
    else:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        for name in sorted(tensors):
            if shards[-1] and size + tensors[name].nbytes > max_shard_bytes:
                shards.append({})
                size = 0
            shards[-1][name] = tensors[name]
            size += tensors[name].nbytes
        weight_map = {}
        for i, shard in enumerate(shards):
            filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(os.path.join(path, filename), shard)
            weight_map.update({name: filename for name in shard})
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                 "weight_map": weight_map}
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1, sort_keys=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1, sort_keys=True)
