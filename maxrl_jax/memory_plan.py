r"""Memory plan and roofline of one RL step: what a (model, batch, mesh) needs per device, and how fast it can be.

    python -m maxrl_jax.memory_plan                     # the paper's GSM8K and Qwen3 settings on H100 / H200
    python -m maxrl_jax.memory_plan --setting=qwen3-4b --card=H100 --chips=8

Everything here is arithmetic on shapes (nothing is allocated or run). Sizes follow the code:

- Sampler (`maxrl_jax.sampling.sample_rollouts` with `DecoderFns`), per sampling call of `cp` prompts x `cn`
  rollouts: the prefix cache holds k and v of every layer as [cp, L, K, D] (one per prompt, shared by its
  rollouts) and the suffix cache [cp, cn, M, K, D] (one per rollout, preallocated for all M slots), both in
  `config.dtype`. Every decode step attends over the whole prefix and ALL M suffix slots (masked beyond the
  current step), so its suffix read is cp cn M slots whatever the step; `suffix="filled"` counts only the
  slots written so far (what an attention restricted to the filled part would read).
- Update (`maxrl_jax.rl.step.update`), per micro-batch of `mp` prompts x `mn` rollouts: one prompt
  pass over [mp, L] and one teacher-forced pass over [mp, mn, M - 1] tokens attending to the prefix and to
  all M - 1 response slots; float32 logits [mp, mn, M, V]; gradients accumulated in float32.
- State: parameters in `config.param_dtype` and AdamW's two moments (float32 here, as the parameters in
  every config of this project), split over the `fsdp` mesh axis leaf by leaf exactly as
  `maxrl_jax.sharding` does (the largest dimension the fsdp size divides; replicated when none does).
- Options of the RL step (`estimate(lora=..., reference=..., extra_logprobs=...)`): with LoRA the
  parameters are the frozen base (in `lora.base_dtype`) plus the float32 adapters, AdamW's moments and the
  gradients those of the adapters only; the merged weights the sampler uses add one float32 copy of the
  targeted kernels, and the "merged" update form its full-size gradient of them. A KL reference without LoRA
  is one more copy of the parameters (`frozen`; with LoRA the base is the reference). The reference's
  log-probs (and, with TIS and a ratio, the learner's own pre-update log-probs) add one float32 [P, N, M]
  array each to the step's rollouts; their teacher-forced passes run one micro-batch at a time without
  gradient, within the update's peak.
- A mesh of data x fsdp devices splits prompts over both axes: each device samples cp / (data fsdp) prompts
  of a call and trains on mp / (data fsdp) prompts of a micro-batch.

The transient terms (copies XLA keeps beside the caches, activations kept for the backward pass, logits
buffers) are counted with coefficients fitted to `compile().memory_analysis()` of the jitted sampler and
update on the CPU (jax 0.10.2): over the float32 configurations of tests/test_memory_plan.py the estimate is
within 10% of XLA's temp bytes. GPU XLA fuses differently (and may hoist FSDP all-gathers of the weights out
of the decode loop, which `gathered_params` counts: a full copy of the weights per device), so treat the
totals as a plan with a margin, not as a measurement.

Roofline (`sampling_cost`, `update_cost`, `generate_cost`, `recompute_cost`): FLOPs of the matmuls
(2 x multiply-adds: projections, attention scores and values, the output projection) and the bytes that must
cross HBM at least once per step (weights, KV caches, logits, optimizer state, saved activations);
`Cost.bound_s(card)` sums max(FLOPs / peak, bytes / bandwidth) over the steps. The time a step takes is at
least that bound; measured / bound says how far an implementation is from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from typing import Any, Sequence

import jax
import numpy as np

from maxrl_jax.models import decoder
from maxrl_jax.models import lora as lora_lib

GiB = 2**30


# ------------------------------------------------------------------------------------------------ cards


@dataclasses.dataclass(frozen=True)
class Card:
  """An accelerator's memory and peaks.

  Attributes:
    name: what the card is.
    memory_bytes: HBM capacity in bytes (as nvidia-smi reports it).
    bandwidth: HBM bandwidth in bytes/s.
    flops: dense bf16 matmul peak in FLOP/s (no sparsity).
  """

  name: str
  memory_bytes: int
  bandwidth: float
  flops: float


# NVIDIA's data-sheet figures (SXM parts); memory as nvidia-smi reports it (H200: the measured card).
CARDS = {
    "H100": Card("NVIDIA H100 SXM 80GB (HBM3)", 81559 * 2**20, 3.35e12, 989e12),
    "H200": Card("NVIDIA H200 SXM 141GB (HBM3e)", 143771 * 2**20, 4.8e12, 989e12),
}


def card_for_device_kind(device_kind: str) -> Card | None:
  """The CARDS entry whose key appears in a `jax.Device.device_kind` ("NVIDIA H200" -> H200), else None."""
  for key, card in CARDS.items():
    if key.lower() in device_kind.lower():
      return card
  return None


# ------------------------------------------------------------------------------------------------ models


def _llama_like(**kwargs) -> decoder.DecoderConfig:
  return decoder.DecoderConfig(**{"dtype": "bfloat16", "param_dtype": "float32", **kwargs})


def smollm2_360m(**overrides) -> decoder.DecoderConfig:
  """SmolLM2-360M (LlamaForCausalLM): hidden 960, 32 layers, 15 heads, 5 KV heads (head_dim 64), FFN 2560,
  vocab 49152, tied embeddings, RoPE theta 1e5, RMSNorm eps 1e-5, no biases: 361.8M parameters."""
  return _llama_like(**{"vocab_size": 49152, "num_layers": 32, "hidden_size": 960, "ffn_size": 2560,
                        "num_heads": 15, "num_kv_heads": 5, "head_dim": 64, "rope_theta": 100000.0,
                        "rms_norm_eps": 1e-5, "max_positions": 8192, "tie_embeddings": True,
                        "attention_bias": False, **overrides})


def qwen3_1p7b(**overrides) -> decoder.DecoderConfig:
  """Qwen3-1.7B (Qwen3ForCausalLM): hidden 2048, 28 layers, 16 heads, 8 KV heads, head_dim 128, FFN 6144,
  vocab 151936, q/k norm, tied embeddings, RoPE theta 1e6, eps 1e-6: 1.72B parameters."""
  return _llama_like(**{"vocab_size": 151936, "num_layers": 28, "hidden_size": 2048, "ffn_size": 6144,
                        "num_heads": 16, "num_kv_heads": 8, "head_dim": 128, "rope_theta": 1e6,
                        "rms_norm_eps": 1e-6, "max_positions": 40960, "tie_embeddings": True,
                        "qk_norm": True, "attention_bias": False, **overrides})


def qwen3_4b(**overrides) -> decoder.DecoderConfig:
  """Qwen3-4B: hidden 2560, 36 layers, 32 heads, 8 KV heads, head_dim 128, FFN 9728, vocab 151936, q/k norm,
  tied embeddings: 4.02B parameters."""
  return qwen3_1p7b(**{"num_layers": 36, "hidden_size": 2560, "ffn_size": 9728, "num_heads": 32, **overrides})


MODELS = {"smollm2-360m": smollm2_360m, "qwen3-1.7b": qwen3_1p7b, "qwen3-4b": qwen3_4b}


# ------------------------------------------------------------------------------------------------ shapes


@dataclasses.dataclass(frozen=True)
class Workload:
  """One RL step's batch: P prompts x N rollouts, prompts of L tokens, responses of up to M tokens."""

  num_prompts: int
  num_rollouts: int
  prompt_len: int
  max_new_tokens: int

  @property
  def sequences(self) -> int:
    return self.num_prompts * self.num_rollouts


def _itemsize(dtype: Any) -> int:
  return int(np.dtype(dtype).itemsize)


def kv_bytes_per_token(config: decoder.DecoderConfig) -> int:
  """Bytes of k and v over all layers for one token, in config.dtype: 2 layers K D itemsize."""
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim * _itemsize(config.dtype)


def matmul_params(config: decoder.DecoderConfig) -> int:
  """Multiply-adds per token of the projections of all layers (q, k, v, o, gate, up, down), no lm head."""
  c = config
  attention = c.hidden_size * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim + c.num_heads * c.head_dim * c.hidden_size
  return c.num_layers * (attention + 3 * c.hidden_size * c.ffn_size)


@functools.lru_cache(maxsize=64)
def param_leaf_shapes(config: decoder.DecoderConfig) -> tuple[tuple[int, ...], ...]:
  """Shapes of every parameter (from `decoder.param_shapes`: traced once per config, nothing allocated)."""
  return tuple(tuple(x.shape) for x in jax.tree_util.tree_leaves(decoder.param_shapes(config)))


def _shard_elements(shape: tuple[int, ...], fsdp: int) -> int:
  """Elements of one leaf held per device under `sharding`'s "fsdp" rule (largest divisible dimension)."""
  size = math.prod(shape)
  if fsdp > 1 and shape and any(d % fsdp == 0 for d in shape):
    return size // fsdp
  return size


def param_elements_per_device(config: decoder.DecoderConfig, fsdp: int = 1) -> int:
  """Parameter elements per device with every leaf placed by the default rule ((".*", "fsdp"),)."""
  return sum(_shard_elements(shape, fsdp) for shape in param_leaf_shapes(config))


# ------------------------------------------------------------------------------------------------ memory

# Transient coefficients, fitted to XLA's memory_analysis on the CPU (see the module docstring).
# Update: bytes kept for the backward pass per token and layer = itemsize(dtype) x (E_COPIES E +
# QKV_COPIES (H + 2K) D + FFN_COPIES F) + SCORE_COPIES x 4 bytes per attention score (float32), plus
# LOGIT_COPIES float32 [tokens, V] buffers (logits, log-softmax, entropy terms, their gradient).
_E_COPIES, _QKV_COPIES, _FFN_COPIES, _SCORE_COPIES, _LOGIT_COPIES = 3.6, 2.4, 6.1, 2.3, 5.0
# Sampler: besides both caches, one layer's suffix k/v is copied by the decode loop; a step holds two float32
# score buffers of one layer and three float32 [rows, V] buffers (logits, log-probs, sampling).
_STEP_SCORE_COPIES, _STEP_LOGIT_COPIES = 2.0, 3.0


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one RL step. Sampling and the update do not overlap: peak = state + max(both).

  Attributes:
    config, workload, mesh (data, fsdp), sample_chunk (prompts, rollouts per sampling call),
    micro_batch (prompts, rollouts per update micro-batch), device_bytes (the budget; None: unchecked).
    params, optimizer: the state (parameters in param_dtype, AdamW's two float32 moments), per device.
    rollouts: tokens / log-probs / masks of all rollouts of the step on this device.
    prefix_cache, suffix_cache, sampling_transient: the sampler, per call.
    gradients: float32 accumulator + one micro-batch's gradient (per device, sharded like the params).
    gathered_params: a compute-dtype copy of the full weights (casts, FSDP all-gathers), per phase; with
      LoRA also the merged float32 targeted kernels.
    activations, logits: the update's micro-batch.
    frozen: frozen weights beside the state (a KL reference copy of the parameters), per device.
  """

  config: decoder.DecoderConfig
  workload: Workload
  mesh: tuple[int, int]
  sample_chunk: tuple[int, int]
  micro_batch: tuple[int, int]
  device_bytes: int | None
  params: int
  optimizer: int
  rollouts: int
  prefix_cache: int
  suffix_cache: int
  sampling_transient: int
  gradients: int
  gathered_params: int
  activations: int
  logits: int
  reserve: int
  frozen: int = 0

  @property
  def state(self) -> int:
    return self.params + self.optimizer + self.frozen

  @property
  def sampling_peak(self) -> int:
    return self.prefix_cache + self.suffix_cache + self.sampling_transient + self.gathered_params

  @property
  def update_peak(self) -> int:
    return self.gradients + self.gathered_params + self.activations + self.logits

  @property
  def total(self) -> int:
    """Peak bytes per device: state + rollouts + reserve + the larger of sampling and update."""
    return self.state + self.rollouts + self.reserve + max(self.sampling_peak, self.update_peak)

  @property
  def fits(self) -> bool:
    return self.device_bytes is None or self.total <= self.device_bytes

  def summary(self) -> dict:
    """The plan in GiB (and its sizes), e.g. for JSON."""
    g = lambda x: round(x / GiB, 3)
    return {
        "mesh": {"data": self.mesh[0], "fsdp": self.mesh[1]},
        "sample_chunk": {"prompts": self.sample_chunk[0], "rollouts": self.sample_chunk[1]},
        "micro_batch": {"prompts": self.micro_batch[0], "rollouts": self.micro_batch[1]},
        "gib_per_device": {
            "params": g(self.params), "optimizer": g(self.optimizer), "rollouts": g(self.rollouts),
            "prefix_cache": g(self.prefix_cache), "suffix_cache": g(self.suffix_cache),
            "sampling_transient": g(self.sampling_transient), "gathered_params": g(self.gathered_params),
            "gradients": g(self.gradients), "activations": g(self.activations), "logits": g(self.logits),
            "reserve": g(self.reserve), "sampling_peak": g(self.sampling_peak), "update_peak": g(self.update_peak),
            **({"frozen": g(self.frozen)} if self.frozen else {}), "total": g(self.total)},
        "device_gib": None if self.device_bytes is None else g(self.device_bytes),
        "fits": self.fits,
    }

  def describe(self) -> str:
    s = self.summary()
    parts = ", ".join(f"{k} {v} GiB" for k, v in s["gib_per_device"].items() if k != "total")
    budget = "no budget" if self.device_bytes is None else f"budget {s['device_gib']} GiB"
    return (f"{s['gib_per_device']['total']} GiB per device ({budget}; mesh data={self.mesh[0]} x "
            f"fsdp={self.mesh[1]}, sampling {self.sample_chunk[0]} prompts x {self.sample_chunk[1]} rollouts "
            f"per call, micro-batch {self.micro_batch[0]} x {self.micro_batch[1]}): {parts}")


def sampling_bytes(config: decoder.DecoderConfig, prompts: int, rollouts: int, prompt_len: int,
                   max_new_tokens: int) -> dict:
  """Bytes of one sampling call of `prompts` x `rollouts` on one device: prefix, suffix, transient."""
  c = config
  kv = kv_bytes_per_token(c)
  rows = prompts * rollouts
  suffix = rows * max_new_tokens * kv
  step = (_STEP_SCORE_COPIES * rows * c.num_heads * (prompt_len + max_new_tokens) * 4
          + _STEP_LOGIT_COPIES * rows * c.vocab_size * 4)
  prefill = (_STEP_SCORE_COPIES * prompts * c.num_heads * prompt_len * prompt_len * 4
             + prompts * prompt_len * (4 * c.hidden_size + 3 * c.ffn_size) * _itemsize(c.dtype))
  loop_buffers = 2 * rows * max_new_tokens * (4 + 4)  # tokens int32 + log-probs float32, carry and result
  return {"prefix_cache": int(prompts * prompt_len * kv), "suffix_cache": int(suffix),
          "sampling_transient": int(suffix / c.num_layers + max(step, prefill) + loop_buffers)}


def inflight_sampling_bytes(config: decoder.DecoderConfig, prompts: int, rollouts: int, slots: int,
                            prompt_len: int, max_new_tokens: int) -> dict:
  """Bytes of one in-flight sampling call (`maxrl_jax.inflight_sampling`) on one device: `prompts` x `rollouts`
  rollouts decoded in `slots` rows refilled as rollouts finish.

  Caches: the prefix caches of the call's prompts [prompts, L] plus each slot's copy [slots, L], and the
  slots' suffix caches [slots, M]. Transient: one layer's suffix cache (a copy XLA made with the decoder's
  [P, N, M, K, D] suffix layout and not with [P, N, K, M, D]: counted, to keep a margin), a refill's gathered
  prefixes [slots, L], the larger of a `slots`-row decode step's buffers (as in `sampling_bytes`) and the
  prompts' prefill, and the outputs of every rollout (tokens int32 and log-probs float32 [prompts rollouts,
  M], carry and result).
  """
  c = config
  kv = kv_bytes_per_token(c)
  step = (_STEP_SCORE_COPIES * slots * c.num_heads * (prompt_len + max_new_tokens) * 4
          + _STEP_LOGIT_COPIES * slots * c.vocab_size * 4)
  prefill = (_STEP_SCORE_COPIES * prompts * c.num_heads * prompt_len * prompt_len * 4
             + prompts * prompt_len * (4 * c.hidden_size + 3 * c.ffn_size) * _itemsize(c.dtype))
  outputs = 2 * prompts * rollouts * max_new_tokens * (4 + 4)
  return {"prefix_cache": int((prompts + slots) * prompt_len * kv), "suffix_cache": int(slots * max_new_tokens * kv),
          "sampling_transient": int(slots * max_new_tokens * kv / c.num_layers + slots * prompt_len * kv
                                    + max(step, prefill) + outputs)}


def update_bytes(config: decoder.DecoderConfig, prompts: int, rollouts: int, prompt_len: int,
                 max_new_tokens: int, keep_scores: bool = True) -> dict:
  """Activation and logits bytes of one update micro-batch of `prompts` x `rollouts` on one device.

  `keep_scores=False` leaves out the float32 attention scores kept for the backward pass (quadratic in the
  sequence length): what an attention that recomputes them in the backward pass would need. The decoder as
  implemented keeps them (`keep_scores=True`).
  """
  c = config
  item = _itemsize(c.dtype)
  decode_tokens = prompts * rollouts * (max_new_tokens - 1)
  prompt_tokens = prompts * prompt_len
  per_token_layer = item * (_E_COPIES * c.hidden_size + _QKV_COPIES * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
                            + _FFN_COPIES * c.ffn_size)
  scores = _SCORE_COPIES * 4 * c.num_heads * (decode_tokens * (prompt_len + max_new_tokens - 1)
                                              + prompt_tokens * prompt_len)
  activations = c.num_layers * ((decode_tokens + prompt_tokens) * per_token_layer + (scores if keep_scores else 0))
  logits = _LOGIT_COPIES * prompts * rollouts * max_new_tokens * c.vocab_size * 4
  return {"activations": int(activations), "logits": int(logits)}


def estimate(config: decoder.DecoderConfig, workload: Workload, *, sample_chunk: tuple[int, int] | None = None,
             micro_batch: tuple[int, int] | None = None, mesh: tuple[int, int] = (1, 1),
             device_bytes: int | None = None, reserve_bytes: int = 0, keep_scores: bool = True,
             lora: Any = None, reference: bool = False, extra_logprobs: int = 0) -> MemoryPlan:
  """Bytes per device of an RL step (see the module docstring for what is counted).

  Args:
    config: the policy.
    workload: P x N rollouts, prompt length L, response cap M.
    sample_chunk: (prompts, rollouts) per sampling call; default (P, N), everything at once. The prompts of a
      call are split over the data x fsdp devices.
    micro_batch: (prompts, rollouts) per update micro-batch; default (P, N).
    mesh: (data, fsdp) device counts.
    device_bytes: the budget per device (None: not checked).
    reserve_bytes: bytes set aside per device (runtime, libraries, fragmentation).
    keep_scores: see `update_bytes` (True: the decoder as implemented).
    lora: a `maxrl_jax.models.lora.LoraConfig` when the RL state holds LoRA adapters (None: all weights).
    reference: a KL reference policy is held beside the state (a copy of the parameters; none with LoRA).
    extra_logprobs: float32 [P, N, M] arrays the step keeps beside the rollouts (reference and learner
      log-probs).
  """
  data, fsdp = mesh
  shards = data * fsdp
  w = workload
  cp, cn = sample_chunk or (w.num_prompts, w.num_rollouts)
  mp, mn = micro_batch or (w.num_prompts, w.num_rollouts)
  for name, (p, n) in (("sample_chunk", (cp, cn)), ("micro_batch", (mp, mn))):
    if p < 1 or n < 1 or w.num_prompts % p or w.num_rollouts % n or p % shards:
      raise ValueError(f"{name}=({p}, {n}): the prompts must divide P={w.num_prompts} and be a multiple of the "
                       f"{shards} devices (data {data} x fsdp {fsdp}); the rollouts must divide N={w.num_rollouts}.")
  if w.num_prompts % shards:
    raise ValueError(f"P={w.num_prompts} prompts do not split over {shards} devices.")
  param_elements = param_elements_per_device(config, fsdp)
  full_elements = param_elements_per_device(config, 1)
  param_item = _itemsize(config.param_dtype)
  needs_copy = fsdp > 1 or np.dtype(config.dtype) != np.dtype(config.param_dtype)
  sample = sampling_bytes(config, cp // shards, cn, w.prompt_len, w.max_new_tokens)
  update = update_bytes(config, mp // shards, mn, w.prompt_len, w.max_new_tokens, keep_scores)
  gathered = full_elements * _itemsize(config.dtype) if needs_copy else 0
  params, trainable, gradients = param_elements * param_item, param_elements, param_elements * (4 + param_item)
  if lora is not None:
    base_item = _itemsize(lora.base_dtype or config.param_dtype)
    trainable = lora_lib.count_adapter_params(config, lora)
    targeted = lora_lib.targeted_kernel_params(config, lora) // max(fsdp, 1)
    params = param_elements * base_item + trainable * 4
    gradients = trainable * 8 + (targeted * _itemsize(config.dtype) if lora.update == "merged" else 0)
    gathered += targeted * 4  # The merged targeted kernels.
  return MemoryPlan(
      config=config, workload=w, mesh=(data, fsdp), sample_chunk=(cp, cn), micro_batch=(mp, mn),
      device_bytes=device_bytes, params=params, optimizer=2 * 4 * trainable,
      rollouts=(w.num_prompts // shards) * w.num_rollouts * w.max_new_tokens * (4 + 4 + 1 + 4 * extra_logprobs),
      gradients=gradients, gathered_params=gathered, reserve=reserve_bytes,
      frozen=param_elements * param_item if reference and lora is None else 0, **sample, **update)


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def choose(config: decoder.DecoderConfig, workload: Workload, *, device_bytes: int,
           mesh: tuple[int, int] = (1, 1), reserve_bytes: int = GiB, keep_scores: bool = True) -> MemoryPlan:
  """The plan with the largest sampling call and the largest update micro-batch that fit `device_bytes`.

  Sampling: the most prompts per call (a multiple of the data x fsdp devices dividing P) with all N rollouts;
  if even one prompt per device does not fit, the most rollouts per call (a divisor of N). Update: the most
  rollouts per micro-batch (prompts x rollouts), with the fewest prompts among equals. Raises a ValueError
  with the numbers when even the smallest choice does not fit (see `check`).
  """
  data, fsdp = mesh
  shards = data * fsdp
  w = workload
  prompt_choices = [p for p in _divisors(w.num_prompts) if p % shards == 0]
  if not prompt_choices:
    raise ValueError(f"P={w.num_prompts} prompts do not split over {shards} devices (data {data} x fsdp {fsdp}).")
  plan = lambda sc, mb: estimate(config, w, sample_chunk=sc, micro_batch=mb, mesh=mesh, device_bytes=device_bytes,
                                 reserve_bytes=reserve_bytes, keep_scores=keep_scores)
  smallest_mb = (prompt_choices[0], 1)
  sample_options = ([(p, w.num_rollouts) for p in reversed(prompt_choices)]
                    + [(prompt_choices[0], n) for n in reversed(_divisors(w.num_rollouts)[:-1])])
  sample_chunk = next((sc for sc in sample_options if plan(sc, smallest_mb).fits), sample_options[-1])
  mb_options = sorted(((p, n) for p in prompt_choices for n in _divisors(w.num_rollouts)),
                      key=lambda pn: (-pn[0] * pn[1], pn[0]))
  micro_batch = next((mb for mb in mb_options if plan(sample_chunk, mb).fits), smallest_mb)
  result = plan(sample_chunk, micro_batch)
  check(result)
  return result


def check(plan: MemoryPlan) -> MemoryPlan:
  """Returns `plan` if it fits its device budget; else raises a ValueError that lists every term in GiB."""
  if plan.fits:
    return plan
  raise ValueError(f"Over the device memory budget: {plan.describe()}. Use smaller sampling calls or update "
                   "micro-batches, more fsdp devices, or a card with more memory.")


# ------------------------------------------------------------------------------------------------ roofline


@dataclasses.dataclass(frozen=True)
class Cost:
  """FLOPs and HBM bytes of a computation as groups of identical steps: (count, flops, bytes) each."""

  steps: tuple[tuple[int, float, float], ...]

  @property
  def flops(self) -> float:
    return float(sum(n * f for n, f, _ in self.steps))

  @property
  def bytes(self) -> float:
    return float(sum(n * b for n, _, b in self.steps))

  def bound_s(self, card: Card) -> float:
    """Lower bound on the time: sum over steps of max(flops / peak, bytes / bandwidth)."""
    return float(sum(n * max(f / card.flops, b / card.bandwidth) for n, f, b in self.steps))

  def __add__(self, other: "Cost") -> "Cost":
    return Cost(self.steps + other.steps)

  def summary(self, card: Card | None = None) -> dict:
    out = {"tflop": round(self.flops / 1e12, 4), "gbytes": round(self.bytes / 1e9, 3)}
    if card is not None:
      bound = self.bound_s(card)
      out.update(bound_s=round(bound, 5), compute_s=round(self.flops / card.flops, 5),
                 memory_s=round(self.bytes / card.bandwidth, 5))
    return out


def _forward_flops_per_token(config: decoder.DecoderConfig, keys: float, logits: bool) -> float:
  """Matmul FLOPs of one token's forward: projections, attention over `keys` keys, lm head if `logits`."""
  c = config
  attention = 4 * c.num_layers * c.num_heads * c.head_dim * keys
  return 2 * matmul_params(c) + attention + (2 * c.hidden_size * c.vocab_size if logits else 0)


def _weight_bytes(config: decoder.DecoderConfig) -> int:
  """Weights read by one forward: every parameter once in param_dtype (the lm head is the tied embedding)."""
  return param_elements_per_device(config, 1) * _itemsize(config.param_dtype)


def sampling_cost(config: decoder.DecoderConfig, workload: Workload, *, chunk_prompts: int | None = None,
                  suffix: str = "implemented") -> Cost:
  """Our sampler over P x N rollouts of exactly M tokens, in calls of `chunk_prompts` prompts (default P).

  Prefill: one pass over [P, L] (attention over all L x L scores, as implemented), logits of the last token.
  Decode: M - 1 steps over P N rows, one token each; per step and call the weights are read once, the prefix
  cache once (shared by the N rollouts), the suffix cache over all M slots (`suffix="implemented"`) or over
  the s slots written before step s (`suffix="filled"`), one new slot written, and [rows, V] float32 logits
  written and read once.
  """
  if suffix not in ("implemented", "filled"):
    raise ValueError(f"suffix={suffix!r}; use 'implemented' or 'filled'.")
  c, w = config, workload
  P, N, L, M = w.num_prompts, w.num_rollouts, w.prompt_len, w.max_new_tokens
  calls = P // (chunk_prompts or P)
  kv, weights = kv_bytes_per_token(c), _weight_bytes(c)
  prefill_flops = P * L * _forward_flops_per_token(c, L, logits=False) + 2 * c.hidden_size * c.vocab_size * P
  prefill = (1, prefill_flops, calls * weights + P * L * kv)
  rows = P * N
  steps = []
  slots = [M] * (M - 1) if suffix == "implemented" else list(range(1, M))
  groups: dict[int, int] = {}
  for s in slots:
    groups[s] = groups.get(s, 0) + 1
  for s, count in groups.items():
    flops = rows * _forward_flops_per_token(c, L + s, logits=True)
    bytes_ = calls * weights + P * L * kv + rows * s * kv + rows * kv + 2 * rows * c.vocab_size * 4
    steps.append((count, flops, bytes_))
  return Cost((prefill,) + tuple(steps))


def generate_cost(config: decoder.DecoderConfig, workload: Workload) -> Cost:
  """Ideal cost of a per-sequence KV-cache sampler (e.g. transformers `generate`) on the P N repeated prompts:
  a causal prefill of every row's prompt, then M - 1 steps each reading every row's L + s cached tokens."""
  c, w = config, workload
  P, N, L, M = w.num_prompts, w.num_rollouts, w.prompt_len, w.max_new_tokens
  rows, kv, weights = P * N, kv_bytes_per_token(c), _weight_bytes(c)
  prefill = (1, rows * L * _forward_flops_per_token(c, (L + 1) / 2, logits=False), weights + rows * L * kv)
  steps = tuple((1, rows * _forward_flops_per_token(c, L + s, logits=True),
                 weights + rows * (L + s) * kv + 2 * rows * c.vocab_size * 4) for s in range(1, M))
  return Cost((prefill,) + steps)


def recompute_cost(config: decoder.DecoderConfig, workload: Workload) -> Cost:
  """`sample_rollouts_recompute`: a forward over [P N, L] and then M - 1 full forwards over [P N, L + M]
  (every position's logits, dense masked attention)."""
  c, w = config, workload
  P, N, L, M = w.num_prompts, w.num_rollouts, w.prompt_len, w.max_new_tokens
  rows, weights = P * N, _weight_bytes(c)
  first = (1, rows * L * _forward_flops_per_token(c, L, logits=True), weights + 2 * rows * L * c.vocab_size * 4)
  T = L + M
  step = (M - 1, rows * T * _forward_flops_per_token(c, T, logits=True), weights + 2 * rows * T * c.vocab_size * 4)
  return Cost((first, step))


def update_cost(config: decoder.DecoderConfig, workload: Workload, *,
                micro_batch: tuple[int, int] | None = None) -> Cost:
  """`policy_update` on P x N rollouts of M tokens: forward + backward (3x the forward's FLOPs) per
  micro-batch, each re-running the prompt pass of its prompts; attention over all L + M - 1 keys as
  implemented. Bytes per micro-batch: weights read twice (forward, backward), the float32 gradient
  accumulator read and written, saved activations and logits written once and read once; then one AdamW
  step (read params, grads, 2 moments; write params, 2 moments)."""
  c, w = config, workload
  P, N, L, M = w.num_prompts, w.num_rollouts, w.prompt_len, w.max_new_tokens
  mp, mn = micro_batch or (P, N)
  count = (P // mp) * (N // mn)
  elements = param_elements_per_device(c, 1)
  fwd = (mp * L * _forward_flops_per_token(c, L, logits=False)
         + mp * mn * (M - 1) * _forward_flops_per_token(c, L + M - 1, logits=False)
         + mp * mn * M * 2 * c.hidden_size * c.vocab_size)
  micro = update_bytes(c, mp, mn, L, M)
  bytes_ = 2 * _weight_bytes(c) + 2 * 4 * elements + 2 * (micro["activations"] + micro["logits"])
  adamw = (1, 10.0 * elements, 7 * 4 * elements)
  return Cost(((count, 3 * fwd, bytes_), adamw))


# ------------------------------------------------------------------------------------------------ settings


# The paper's LLM settings (P prompts x N rollouts, prompt L, responses up to M tokens).
SETTINGS = {
    "gsm8k-smollm2-360m": ("smollm2-360m", Workload(256, 128, 512, 2048)),
    "qwen3-1.7b": ("qwen3-1.7b", Workload(256, 16, 512, 4096)),
    "qwen3-4b": ("qwen3-4b", Workload(256, 16, 512, 4096)),
}


def plan_setting(model: str, workload: Workload, card: Card, chips: int, *, usable_fraction: float = 0.9,
                 fsdp: int | None = None, keep_scores: bool = True) -> dict:
  """Memory plan and roofline of one RL step of `workload` on `chips` cards of one kind.

  The mesh is data x fsdp with fsdp = `fsdp` or the smallest power of two whose plan fits; prompts are split
  over all chips. The step's bound: sampling (as implemented, and with only the filled suffix slots read)
  plus the update at the chosen micro-batch, each for the P / chips prompts of one chip (the chips work in
  parallel; collectives are not counted). `keep_scores=False`: the update's attention scores recomputed in
  the backward pass instead of kept (not implemented; see `update_bytes`).
  """
  config = MODELS[model]()
  budget = int(card.memory_bytes * usable_fraction)
  candidates = [fsdp] if fsdp else [f for f in (1, 2, 4, 8, 16, 32, 64) if chips % f == 0]
  plan, errors = None, []
  for f in candidates:
    try:
      plan = choose(config, workload, device_bytes=budget, mesh=(chips // f, f), keep_scores=keep_scores)
      break
    except ValueError as e:
      errors.append(str(e))
  out: dict[str, Any] = {"model": model, "params_b": round(param_elements_per_device(config) / 1e9, 3),
                         "workload": dataclasses.asdict(workload), "card": card.name, "chips": chips,
                         "usable_gib_per_chip": round(budget / GiB, 1),
                         "attention_scores": "kept (as implemented)" if keep_scores else "recomputed (not implemented)"}
  if plan is None:
    out["fits"] = False
    out["error"] = errors[-1]
    return out
  local = Workload(workload.num_prompts // chips, workload.num_rollouts, workload.prompt_len,
                   workload.max_new_tokens)
  chunk = max(1, plan.sample_chunk[0] // chips)
  mb = (max(1, plan.micro_batch[0] // chips), plan.micro_batch[1])
  sample_impl = sampling_cost(config, local, chunk_prompts=chunk)
  sample_filled = sampling_cost(config, local, chunk_prompts=chunk, suffix="filled")
  update = update_cost(config, local, micro_batch=mb)
  out.update(fits=True, plan=plan.summary(), roofline={
      "sampling_implemented": sample_impl.summary(card), "sampling_filled": sample_filled.summary(card),
      "update": update.summary(card),
      "step_bound_s_implemented": round(sample_impl.bound_s(card) + update.bound_s(card), 2),
      "step_bound_s_filled": round(sample_filled.bound_s(card) + update.bound_s(card), 2)})
  return out


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--setting", action="append", choices=sorted(SETTINGS), help="default: all")
  parser.add_argument("--card", action="append", choices=sorted(CARDS), help="default: all")
  parser.add_argument("--chips", type=int, action="append", help="default: 1 and 8")
  parser.add_argument("--usable_fraction", type=float, default=0.9,
                      help="share of each card's memory the plan may use (JAX's default preallocation is 0.75: "
                           "set XLA_PYTHON_CLIENT_MEM_FRACTION to match)")
  args = parser.parse_args(argv)
  rows = []
  for setting in args.setting or sorted(SETTINGS):
    model, workload = SETTINGS[setting]
    for card in args.card or sorted(CARDS):
      for chips in args.chips or (1, 8):
        for keep_scores in (True, False):
          rows.append({"setting": setting, **plan_setting(model, workload, CARDS[card], chips,
                                                          usable_fraction=args.usable_fraction,
                                                          keep_scores=keep_scores)})
  print(json.dumps(rows, indent=1))


if __name__ == "__main__":
  main()
