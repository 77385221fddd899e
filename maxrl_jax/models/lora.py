"""LoRA adapters for the decoder: frozen base weights, trainable low-rank updates of chosen projections.

A targeted projection's kernel W [in, out] (flax layout: y = x W) becomes

    W' = W + (alpha / r) A B,      A [in, r], B [r, out]

with A drawn from N(0, 1/in) and B = 0 at the start, so the adapted model equals the base exactly until the
first update. Only A and B are trained (they are the RL state's parameters and the only optimizer state);
the base is stored once, frozen (optionally in bfloat16: `LoraConfig.base_dtype`), and never checkpointed:
a run re-derives it from where it came from (the SFT policy, the Hugging Face checkpoint or the init key)
and checks its fingerprint (maxrl_jax/trainers/rl.py).

Two ways to compute the adapted model, with equal results up to float round-off:

- `merge(base, adapters, config)`: the full parameter tree with W' in place of W; the decoder runs unchanged.
  Merging costs one [in, r] x [r, out] product per projection, independent of the batch.
- `FactorizedFns`: x W + (alpha / r) (x A) B inside every targeted projection (flax method interception),
  without forming W'; costs 2 r (in + out) extra FLOPs per token and projection, and its backward never forms a
  full-size gradient of W'.

The RL step merges once per step for sampling (a decode step re-reads the weights; merged weights add nothing
to it) and uses `LoraConfig.update` ("merged" or "factorized") for the learner's teacher-forced pass;
docs/benchmarks.md has the measurements that chose the default.

Config fields (a model block: configs/maze.py, configs/countdown.py, configs/gsm8k_smollm2.py):
`lora_rank` (0: off), `lora_alpha`, `lora_targets`, `lora_base_dtype`, `lora_update`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxrl_jax.models import decoder

Array = jax.Array
PyTree = Any

# The decoder's projections that may carry adapters (names of its flax Dense modules and HF tensors).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
UPDATE_FORMS = ("merged", "factorized")
BASE_DTYPES = ("", "float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """The adapters of a run (hashable: a static setting of the RL step).

  Attributes:
    rank: r, the adapters' rank (>= 1).
    alpha: the scale numerator: the update is (alpha / r) A B.
    targets: projection names (of PROJECTIONS) that get adapters, in every layer.
    base_dtype: storage dtype of the frozen base ("" keeps the parameters' dtype; "bfloat16" halves it).
    update: how the learner computes the adapted model: "merged" (W' = W + s A B, then the plain decoder) or
      "factorized" (x W + s (x A) B); sampling always uses merged weights.
  """

  rank: int
  alpha: float = 16.0
  targets: tuple[str, ...] = PROJECTIONS
  base_dtype: str = ""
  update: str = "merged"

  def __post_init__(self):
    object.__setattr__(self, "targets", tuple(self.targets))

  @property
  def scale(self) -> float:
    return float(self.alpha) / int(self.rank)


def from_config(model_block: Any) -> LoraConfig | None:
  """The LoraConfig of a config's model block, or None when `lora_rank` is 0 or absent."""
  get = model_block.get
  rank = int(get("lora_rank", 0) or 0)
  if not rank:
    return None
  return LoraConfig(rank=rank, alpha=float(get("lora_alpha", 16.0)), targets=tuple(get("lora_targets", PROJECTIONS)),
                    base_dtype=str(get("lora_base_dtype", "") or ""), update=str(get("lora_update", "merged")))


def validate(model_block: Any, field_prefix: str = "config.model") -> None:
  """Checks the model block's lora_* fields; a ValueError names the field and the fix."""
  get = model_block.get
  rank = get("lora_rank", 0)
  if isinstance(rank, bool) or int(rank) != rank or rank < 0:
    raise ValueError(f"{field_prefix}.lora_rank: {rank!r} must be an integer >= 0 (0: no adapters).")
  if not rank:
    return
  if not float(get("lora_alpha", 16.0)) > 0:
    raise ValueError(f"{field_prefix}.lora_alpha: {get('lora_alpha')!r} must be > 0 (the update is "
                     "(alpha / rank) A B).")
  targets = tuple(get("lora_targets", PROJECTIONS))
  bad = [t for t in targets if t not in PROJECTIONS]
  if not targets or bad or len(set(targets)) != len(targets):
    raise ValueError(f"{field_prefix}.lora_targets: {targets!r} must name distinct projections of {list(PROJECTIONS)}.")
  if str(get("lora_base_dtype", "") or "") not in BASE_DTYPES:
    raise ValueError(f"{field_prefix}.lora_base_dtype: {get('lora_base_dtype')!r}; allowed: {list(BASE_DTYPES)} "
                     "('' keeps the parameters' dtype).")
  if str(get("lora_update", "merged")) not in UPDATE_FORMS:
    raise ValueError(f"{field_prefix}.lora_update: {get('lora_update')!r}; allowed: {list(UPDATE_FORMS)}.")


# ------------------------------------------------------------------------------------------------ parameters


def _targeted(path: tuple[str, ...], config: LoraConfig) -> bool:
  return len(path) >= 2 and path[-1] == "kernel" and path[-2] in config.targets


def _names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", k)) for k in path)


def adapter_paths(params: PyTree, config: LoraConfig) -> list[tuple[str, ...]]:
  """Module paths (e.g. ("layers_0", "self_attn", "q_proj")) of the targeted kernels, in tree order."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [_names(p)[:-1] for p, _ in flat if _targeted(_names(p), config)]


def _set(tree: dict, path: tuple[str, ...], value) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _get(tree: Mapping, path: tuple[str, ...]):
  for name in path:
    tree = tree[name]
  return tree


def init_adapters(key: Array, params: PyTree, config: LoraConfig, dtype: Any = jnp.float32) -> dict:
  """Adapters {module path...: {"lora_a": [in, r], "lora_b": [r, out]}} for the targeted kernels of `params`
  (arrays or ShapeDtypeStructs): A ~ N(0, 1/in) from fold_in(key, i) for the i-th kernel, B = 0."""
  adapters: dict = {}
  for i, path in enumerate(adapter_paths(params, config)):
    kernel = _get(params, path + ("kernel",))
    fan_in, fan_out = kernel.shape
    a = jax.random.normal(jax.random.fold_in(key, i), (fan_in, config.rank), jnp.float32) * fan_in**-0.5
    _set(adapters, path, {"lora_a": a.astype(dtype), "lora_b": jnp.zeros((config.rank, fan_out), dtype)})
  return adapters


@functools.lru_cache(maxsize=64)
def count_adapter_params(model_config: decoder.DecoderConfig, config: LoraConfig) -> int:
  """Trainable parameters of the adapters: r (in + out) per targeted kernel (shapes only)."""
  shapes = decoder.param_shapes(model_config)
  return sum(config.rank * sum(_get(shapes, p + ("kernel",)).shape) for p in adapter_paths(shapes, config))


@functools.lru_cache(maxsize=64)
def targeted_kernel_params(model_config: decoder.DecoderConfig, config: LoraConfig) -> int:
  """Elements of the targeted base kernels (what a merged update forms a full-size gradient of)."""
  shapes = decoder.param_shapes(model_config)
  return sum(int(_get(shapes, p + ("kernel",)).size) for p in adapter_paths(shapes, config))


def cast_base(params: PyTree, config: LoraConfig) -> PyTree:
  """The frozen base as stored: `params` in `config.base_dtype` (floating leaves; unchanged for "")."""
  if not config.base_dtype:
    return params
  dtype = jnp.dtype(config.base_dtype)
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)


def merge(base: PyTree, adapters: PyTree, config: LoraConfig) -> PyTree:
  """The adapted parameters: every targeted kernel W -> W + (alpha / r) A B (in float32, or the wider of W's
  and the adapters' dtypes); other leaves are the base's. Differentiable in `adapters` (and `base`)."""

  def one(path, leaf):
    names = _names(path)
    if not _targeted(names, config):
      return leaf
    ab = _get(adapters, names[:-1])
    dtype = jnp.promote_types(jnp.promote_types(leaf.dtype, ab["lora_a"].dtype), jnp.float32)
    delta = jnp.matmul(ab["lora_a"].astype(dtype), ab["lora_b"].astype(dtype))
    return leaf.astype(dtype) + config.scale * delta

  return jax.tree_util.tree_map_with_path(one, base)


# ------------------------------------------------------------------------------------------------ factorized


@dataclasses.dataclass(frozen=True)
class FactorizedFns:
  """The adapted decoder as `maxrl_jax.sampling.ModelFns` over params {"base": ..., "adapters": ...}:
  targeted projections compute x W + (alpha / r) (x A) B (in the decoder's compute dtype), W' never formed."""

  fns: decoder.DecoderFns
  lora: LoraConfig

  def _intercept(self, adapters):
    config, dtype = self.lora, self.fns.config.dtype

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      module = context.module
      if context.method_name != "__call__" or not isinstance(module, nn.Dense) or module.name not in config.targets:
        return out
      ab = _get(adapters, tuple(module.path))
      x = args[0].astype(dtype)
      low = jnp.matmul(jnp.matmul(x, ab["lora_a"].astype(dtype)), ab["lora_b"].astype(dtype))
      return out + (config.scale * low).astype(out.dtype)

    return nn.intercept_methods(interceptor)

  def forward(self, params, tokens, attention_mask=None):
    with self._intercept(params["adapters"]):
      return self.fns.forward(params["base"], tokens, attention_mask)

  def prefill(self, params, prompts, attention_mask=None):
    with self._intercept(params["adapters"]):
      return self.fns.prefill(params["base"], prompts, attention_mask)

  def init_suffix_cache(self, prefix_cache, num_rollouts, max_len):
    return self.fns.init_suffix_cache(prefix_cache, num_rollouts, max_len)

  def decode(self, params, tokens, prefix_cache, suffix_cache, step):
    with self._intercept(params["adapters"]):
      return self.fns.decode(params["base"], tokens, prefix_cache, suffix_cache, step)


def policy(fns: decoder.DecoderFns, base: PyTree, adapters: PyTree, config: LoraConfig, form: str | None = None):
  """(model functions, parameters) of the adapted policy in `form` ("merged" / "factorized"; default
  config.update)."""
  form = form or config.update
  if form == "merged":
    return fns, merge(base, adapters, config)
  if form == "factorized":
    return FactorizedFns(fns, config), {"base": base, "adapters": adapters}
  raise ValueError(f"form={form!r}; allowed: {list(UPDATE_FORMS)}.")
