"""Language-model RL on verifiable math (GSM8K, MATH-style) from a local Hugging Face checkpoint.

`train_and_evaluate(config, workdir)` is the whole job (configs/gsm8k_smollm2.py documents every field):

    load the checkpoint (maxrl_jax.models.load_pretrained) and its tokenizer / chat template
    -> tokenise the prompts (question + the paper's suffix, through the chat template), left-padded
    -> [optional SFT warm-up on reference solutions]
    -> RL steps: sample N rollouts per prompt (prefix-shared KV cache, jitted, in prompt chunks)
                 -> decode and verify on the host (cheap checks in-process, sympy in worker processes
                    killed at the per-item timeout), overlapped with the device sampling the next chunk
                 -> [reward 0 for responses that reach the length cap (verifier.zero_truncated)]
                 -> advantages from the estimator registry -> one AdamW update (jitted, donated state,
                    optionally accumulated over micro-batches of prompts x rollouts)
    -> held-out evaluation: pass@k (unbiased, from eval.num_samples samples per problem; the ones between
       the first and the last use eval.periodic_num_samples when set), majority vote.

Outputs, as the maze trainer's:

    <workdir>/config.json      the config (a resumed run must use the same one)
    <workdir>/metrics.jsonl    {"phase": "sft" | "rl" | "eval", "step", "pass_rate", ...} per logged interval
    <workdir>/checkpoints/     orbax checkpoints of each phase (params, optimizer state, step, and the run's
                               records so far), verified by digest when restored (maxrl_jax/checkpoints.py)
    <workdir>/summary.json     {"objective", "eval": {"pass@1", "pass@k", ...}, "initial_eval", ...,
                               "config_sha256"}
    <workdir>/tensorboard/     event files of the same records (config.logging); curves_*.png at the end

Re-running on the same workdir resumes from the newest good checkpoint (a corrupt one is moved aside and the
previous one used), and metrics.jsonl is rebuilt from that checkpoint's records; a workdir holding a finished
run of the same config is left untouched. One process at a time holds a workdir. A non-finite loss, gradient
norm or parameter stops the run (training_loop.NonFiniteError) before it is saved. Every step's key is
`fold_in(<phase key>, step)` and the data order is a function of (config.seed, epoch), so a resumed run draws
the same prompts and keys as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from maxrl_jax import checkpoints
from maxrl_jax import estimators
from maxrl_jax import inflight_sampling
from maxrl_jax import memory_plan
from maxrl_jax import metrics as metrics_lib
from maxrl_jax import plots
from maxrl_jax import run_logging
from maxrl_jax import sampling
from maxrl_jax import sharding
from maxrl_jax import train_steps
from maxrl_jax import training_loop
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.models import decoder
from maxrl_jax.models import hf_loading
from maxrl_jax.text import data as data_lib
from maxrl_jax.text import math_verifier
from maxrl_jax.text import synthetic
from maxrl_jax.text import tokenizer as tokenizer_lib

# Independent key streams derived from config.seed.
_KEY_SFT, _KEY_RL_SAMPLING, _KEY_EVAL = range(3)

# Batch sizes that may be 0 in a config: then chosen from the memory plan (`plan_memory`).
AUTO_SIZES = ("rollout.prompt_chunk", "rl.micro_batch_prompts", "rl.micro_batch_rollouts")


# ------------------------------------------------------------------------------------------------ config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the field and the allowed values, on any invalid setting."""

  def fail(field, message):
    raise ValueError(f"config.{field}: {message}")

  def get(field):
    node = config
    for part in field.split("."):
      node = node[part]
    return node

  if not config.model.path and not config.model.synthetic:
    fail("model.path", "set the local Hugging Face checkpoint directory (or model.synthetic for a tiny "
         "random one).")
  if config.model.synthetic and config.model.synthetic not in hf_loading.ARCHITECTURES.values():
    fail("model.synthetic", f"{config.model.synthetic!r}; allowed: '', "
         f"{sorted(hf_loading.ARCHITECTURES.values())}.")
  if not config.data.train_path and not config.data.synthetic:
    fail("data.train_path", "set a GSM8K / MATH-style file or directory (or data.synthetic).")
  if config.data.chat_template not in tokenizer_lib.TEMPLATE_NAMES:
    fail("data.chat_template", f"{config.data.chat_template!r}; allowed: {list(tokenizer_lib.TEMPLATE_NAMES)}.")
  if config.data.answer_format not in data_lib.ANSWER_FORMATS:
    fail("data.answer_format", f"{config.data.answer_format!r}; allowed: {list(data_lib.ANSWER_FORMATS)}.")
  if config.verifier.answer_mode not in math_verifier.ANSWER_MODES:
    fail("verifier.answer_mode", f"{config.verifier.answer_mode!r}; allowed: {list(math_verifier.ANSWER_MODES)}.")
  positive_ints = ["rollout.num_prompts", "rollout.num_samples", "rollout.max_new_tokens",
                   "rollout.length_bucket",
                   "data.max_prompt_tokens", "data.prompt_bucket", "eval.num_samples", "eval.samples_per_call",
                   "eval.prompt_chunk", "eval.max_new_tokens", "eval.every_steps", "log_every_steps",
                   "checkpoint_every_steps", "keep_checkpoints", "verifier.num_threads"]
  if config.sft.steps:
    positive_ints += ["sft.batch_size", "sft.max_response_tokens"]
  for field in positive_ints:
    value = get(field)
    if isinstance(value, bool) or int(value) != value or value < 1:
      fail(field, f"{value!r} must be an integer >= 1.")
  for field in ("sft.steps", "rl.steps", "eval.num_problems", "data.train_limit",
                # 0: chosen from the memory plan (see plan_memory).
                *AUTO_SIZES, "memory.device_bytes", "memory.reserve_bytes", "rollout.inflight_slots"):
    value = get(field)
    if isinstance(value, bool) or int(value) != value or value < 0:
      fail(field, f"{value!r} must be an integer >= 0.")
  for field in ("rl.learning_rate", "rollout.temperature", "verifier.timeout_s"):
    if not get(field) > 0:
      fail(field, f"{get(field)!r} must be > 0.")
  if not config.eval.temperature >= 0:
    fail("eval.temperature", f"{config.eval.temperature!r} must be >= 0 (0 is greedy).")
  if not 0 < config.eval.top_p <= 1:
    fail("eval.top_p", f"{config.eval.top_p!r} must be in (0, 1].")
  divisible = [("rollout.prompt_chunk", "rollout.num_prompts"), ("rl.micro_batch_prompts", "rollout.num_prompts"),
               ("rl.micro_batch_rollouts", "rollout.num_samples"), ("eval.samples_per_call", "eval.num_samples"),
               ("log_every_steps", "checkpoint_every_steps")]
  for small, large in divisible:
    if get(small) and get(large) % get(small):
      fail(small, f"{get(small)} must divide {large}={get(large)}.")
  for k in config.eval.ks:
    if not 1 <= k <= config.eval.num_samples:
      fail("eval.ks", f"k={k} must be in [1, eval.num_samples={config.eval.num_samples}].")
  periodic = config.eval.periodic_num_samples
  if isinstance(periodic, bool) or int(periodic) != periodic or not 0 <= periodic <= config.eval.num_samples:
    fail("eval.periodic_num_samples", f"{periodic!r} must be an integer in [0, eval.num_samples].")
  if periodic and periodic % min(periodic, config.eval.samples_per_call):
    fail("eval.periodic_num_samples", f"{periodic} must be a multiple of eval.samples_per_call="
         f"{config.eval.samples_per_call} (or smaller than it).")
  if config.verifier.memory_limit_mb < 0:
    fail("verifier.memory_limit_mb", f"{config.verifier.memory_limit_mb!r} must be >= 0 (0: no limit).")
  kwargs = estimators.kwargs_from_config(config.objective)
  try:
    estimators.get_advantage_fn(config.objective.name, **kwargs)(
        jnp.zeros((1, config.rollout.num_samples), jnp.float32))
  except ValueError as e:
    fail("objective / config.rollout.num_samples", str(e))
  if config.objective.reduction not in estimators.REDUCTIONS:
    fail("objective.reduction", f"{config.objective.reduction!r}; allowed: {list(estimators.REDUCTIONS)}.")
  if config.objective.entropy_coef < 0:
    fail("objective.entropy_coef", f"{config.objective.entropy_coef!r} must be >= 0.")


# ------------------------------------------------------------------------------------------------ memory


@dataclasses.dataclass(frozen=True)
class MemoryChoice:
  """The batch sizes an RL run uses and their memory plan (`plan_memory`).

  Attributes:
    prompt_chunk: prompts per sampling call (with all their N rollouts): rollout.prompt_chunk, or chosen.
    micro_batch: (prompts, rollouts) per update micro-batch: rl.micro_batch_prompts / _rollouts, or chosen.
    chosen: the config fields that were 0 and were chosen from the plan.
    plan: `memory_plan.MemoryPlan` of one RL step per device (sampling, then the update).
    eval_bytes: peak bytes per device of one evaluation call (state, reserve, the caches of eval.prompt_chunk
      x eval.samples_per_call rollouts of eval.max_new_tokens).
    over_budget: "" when everything fits the budget, else what does not and the fix (the ValueError's text).
  """

  prompt_chunk: int
  micro_batch: tuple[int, int]
  chosen: tuple[str, ...]
  plan: memory_plan.MemoryPlan
  eval_bytes: int
  over_budget: str = ""

  def describe(self) -> str:
    chosen = f" (chosen: {', '.join(self.chosen)})" if self.chosen else ""
    return (f"rollout.prompt_chunk={self.prompt_chunk}, rl.micro_batch_prompts={self.micro_batch[0]}, "
            f"rl.micro_batch_rollouts={self.micro_batch[1]}{chosen}. RL step: {self.plan.describe()}. "
            f"Evaluation call: {_gib(self.eval_bytes)} per device.")


def _gib(num_bytes: int) -> str:
  return f"{num_bytes / memory_plan.GiB:.2f} GiB"


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _by_size(options: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
  """(prompts, rollouts) pairs, most rollouts first, fewest prompts among equals."""
  return sorted(options, key=lambda pn: (-pn[0] * pn[1], pn[0]))


def plan_memory(config: ml_collections.ConfigDict, model_config: decoder.DecoderConfig, *,
                mesh_shape: tuple[int, int] = (1, 1), device_bytes: int | None = None,
                enforce: bool = True) -> MemoryChoice:
  """Chooses or checks the sampling call and update micro-batch sizes against a per-device memory budget.

  The workload is the config's worst case: P = rollout.num_prompts prompts x N = rollout.num_samples
  rollouts, prompts of L = data.max_prompt_tokens tokens, responses of M = rollout.max_new_tokens
  (`maxrl_jax.memory_plan.estimate` says what is counted, with config.memory.reserve_bytes set aside). Per
  device, the step holds state + rollouts + reserve throughout, plus the sampler's caches while sampling and
  the micro-batch's activations while updating; an evaluation call holds state + reserve + its caches.

  Sizes set in the config are checked; sizes set to 0 (`AUTO_SIZES`) are chosen: the most prompts per
  sampling call (a multiple of the devices dividing P), then the most rollouts per micro-batch (fewest
  prompts among equals) that fit `device_bytes`. Without a budget (None: a CPU) nothing is checked and the
  sizes left to choose are the smallest (one prompt per device per call, one rollout per micro-batch).

  Args:
    config: the text trainer's config. model_config: the policy (from the checkpoint's config.json).
    mesh_shape: (data, fsdp) devices; prompts are split over both, parameters over fsdp.
    device_bytes: the budget per device in bytes, or None.
    enforce: raise when over the budget (else the result's `over_budget` says what does not fit).

  Returns:
    `MemoryChoice`. With `enforce`, raises a ValueError naming each part that does not fit, its bytes, and
    the config fields to change, with values that fit.
  """
  data, fsdp = mesh_shape
  shards = data * fsdp
  r, e = config.rollout, config.eval
  num_prompts, num_samples, prompt_len = r.num_prompts, r.num_samples, config.data.max_prompt_tokens
  workload = memory_plan.Workload(num_prompts, num_samples, prompt_len, r.max_new_tokens)
  reserve = int(config.memory.reserve_bytes) if device_bytes else 0
  prompt_options = [p for p in _divisors(num_prompts) if p % shards == 0]
  if not prompt_options:
    raise ValueError(f"config.rollout.num_prompts={num_prompts} does not split over the {shards} devices of the "
                     f"mesh (data {data} x fsdp {fsdp}): use a multiple of {shards}.")

  def with_sampler(plan, prompts, rollouts, max_new_tokens):
    """The plan with in-flight sampling's caches when rollout.inflight_slots is set (one device)."""
    if not r.inflight_slots:
      return plan
    return dataclasses.replace(plan, **memory_plan.inflight_sampling_bytes(
        model_config, prompts // shards, rollouts, r.inflight_slots, prompt_len, max_new_tokens))

  def estimate(chunk, micro_batch):
    return with_sampler(memory_plan.estimate(
        model_config, workload, sample_chunk=(chunk, num_samples), micro_batch=micro_batch, mesh=mesh_shape,
        device_bytes=device_bytes, reserve_bytes=reserve), chunk, num_samples, r.max_new_tokens)

  def held(plan):  # Held through the whole step.
    return plan.state + plan.rollouts + plan.reserve

  def sampling_fits(chunk, micro_batch):
    plan = estimate(chunk, micro_batch)
    return held(plan) + plan.sampling_peak <= device_bytes

  def update_fits(chunk, micro_batch):
    plan = estimate(chunk, micro_batch)
    return held(plan) + plan.update_peak <= device_bytes

  all_micro = _by_size((p, n) for p in prompt_options for n in _divisors(num_samples))
  chunks = [r.prompt_chunk] if r.prompt_chunk else prompt_options[::-1]  # largest first
  micro_options = [(p, n) for p, n in all_micro
                   if p == (config.rl.micro_batch_prompts or p) and n == (config.rl.micro_batch_rollouts or n)]
  if not micro_options:  # A fixed size the mesh does not divide: validate_config / check_batch_sizes name it.
    micro_options = [(config.rl.micro_batch_prompts or shards, config.rl.micro_batch_rollouts or 1)]
  if device_bytes is None:
    chunk, micro_batch = chunks[-1], micro_options[-1]
  else:
    chunk = next((c for c in chunks if sampling_fits(c, micro_options[-1])), chunks[-1])
    micro_batch = next((mb for mb in micro_options if update_fits(chunk, mb)), micro_options[-1])
  plan = estimate(chunk, micro_batch)
  chosen = tuple(field for field, value in zip(AUTO_SIZES, (r.prompt_chunk, config.rl.micro_batch_prompts,
                                                            config.rl.micro_batch_rollouts)) if not value)
  eval_samples = min(e.samples_per_call, e.num_samples)

  def eval_total(samples_per_call):
    prompts = _round_up(e.prompt_chunk, shards)  # check_batch_sizes refuses a chunk the devices do not divide.
    eval_plan = with_sampler(memory_plan.estimate(
        model_config, memory_plan.Workload(prompts, samples_per_call, prompt_len, e.max_new_tokens),
        mesh=mesh_shape, reserve_bytes=reserve), prompts, samples_per_call, e.max_new_tokens)
    return eval_plan.state + eval_plan.reserve + eval_plan.sampling_peak

  choice = MemoryChoice(prompt_chunk=chunk, micro_batch=micro_batch, chosen=chosen, plan=plan,
                        eval_bytes=eval_total(eval_samples))
  if device_bytes is None:
    return choice

  problems, fixes = [], []
  if held(plan) > device_bytes:
    problems.append(f"parameters, AdamW state and the step's rollouts alone take {_gib(held(plan))}")
  if held(plan) + plan.sampling_peak > device_bytes:
    problems.append(f"sampling {chunk} prompts x {num_samples} rollouts of up to {r.max_new_tokens} tokens per call "
                    f"(rollout.prompt_chunk={chunk}) needs {_gib(held(plan) + plan.sampling_peak)}")
    smaller = [c for c in prompt_options if c < chunk and sampling_fits(c, micro_batch)]
    if smaller:
      fixes.append(f"--config.rollout.prompt_chunk={smaller[-1]}")
  if held(plan) + plan.update_peak > device_bytes:
    problems.append(f"the update's micro-batch of {micro_batch[0]} prompts x {micro_batch[1]} rollouts "
                    f"(rl.micro_batch_prompts x rl.micro_batch_rollouts) needs {_gib(held(plan) + plan.update_peak)}")
    smaller = [mb for mb in all_micro if mb[0] * mb[1] < micro_batch[0] * micro_batch[1] and update_fits(chunk, mb)]
    if smaller:
      fixes.append(f"--config.rl.micro_batch_prompts={smaller[0][0]} --config.rl.micro_batch_rollouts={smaller[0][1]}")
  if choice.eval_bytes > device_bytes:
    problems.append(f"an evaluation call of eval.prompt_chunk={e.prompt_chunk} prompts x eval.samples_per_call="
                    f"{eval_samples} rollouts of up to {e.max_new_tokens} tokens needs {_gib(choice.eval_bytes)}")
    smaller = [n for n in _divisors(e.num_samples) if n < eval_samples and eval_total(n) <= device_bytes]
    if smaller:
      fixes.append(f"--config.eval.samples_per_call={smaller[-1]}")
  if not problems:
    return choice
  if len(fixes) < len(problems):  # Something does not fit even at its smallest size.
    fixes.append("split the parameters over more devices (fsdp: --config.mesh.shape, e.g. \"(-1,2)\") or the "
                 "prompts over more devices, shorten --config.rollout.max_new_tokens / --config.eval.max_new_tokens, "
                 "or use a card with more memory")
  message = (f"Over the device memory budget of {_gib(device_bytes)} per device (config.memory.device_bytes, 0: the "
             f"device's own limit): {'; '.join(problems)}. Fix: {'; '.join(fixes)} (0 for rollout.prompt_chunk, "
             f"rl.micro_batch_prompts or rl.micro_batch_rollouts chooses the largest that fits; "
             f"--config.memory.enforce=False runs anyway). Plan: {plan.describe()}")
  if enforce:
    raise ValueError(message)
  return dataclasses.replace(choice, over_budget=message)


def device_memory_budget(config: ml_collections.ConfigDict) -> int | None:
  """config.memory.device_bytes, or else the first device's limit (`memory_stats()["bytes_limit"]`); None
  when neither is known (a CPU reports none)."""
  if config.memory.device_bytes:
    return int(config.memory.device_bytes)
  stats = jax.devices()[0].memory_stats() or {}
  return int(stats["bytes_limit"]) if stats.get("bytes_limit") else None


def check_memory(config: ml_collections.ConfigDict, model_config: decoder.DecoderConfig,
                 mesh_shape: tuple[int, int]) -> MemoryChoice:
  """`plan_memory` with the device's budget, before anything is compiled: prints the plan when there is a
  budget (nothing on a CPU), refuses a config over it (ValueError) unless config.memory.enforce is False
  (then prints why), and returns the sizes to use."""
  budget = device_memory_budget(config)
  choice = plan_memory(config, model_config, mesh_shape=mesh_shape, device_bytes=budget,
                       enforce=config.memory.enforce)
  if budget is not None and sharding.is_chief():
    print(f"memory plan: {choice.describe()}", flush=True)
    if choice.over_budget:
      print(f"memory plan (config.memory.enforce=False, running anyway): {choice.over_budget}", flush=True)
  return choice


# ------------------------------------------------------------------------------------------------ setup


def resolve_model_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The checkpoint directory: config.model.path, or a tiny random one written under the workdir."""
  if not config.model.synthetic:
    return config.model.path
  path = os.path.join(workdir, "synthetic_model")
  if not os.path.exists(os.path.join(path, "config.json")):
    synthetic.write_tiny_checkpoint(path, architecture=config.model.synthetic, seed=config.seed,
                                    **dict(config.model.synthetic_overrides))
  return path


def resolve_data(config: ml_collections.ConfigDict, workdir: str):
  """(train problems, eval problems) from the configured files, or synthetic arithmetic written as JSONL."""
  d = config.data
  train_path, eval_path = d.train_path, d.eval_path
  if d.synthetic:
    directory = os.path.join(workdir, "synthetic_data")
    train_path, eval_path = os.path.join(directory, "train.jsonl"), os.path.join(directory, "test.jsonl")
    if not os.path.exists(eval_path):
      data_lib.write_jsonl(train_path, data_lib.problems_to_rows(
          data_lib.synthetic_arithmetic(d.synthetic_train_size, seed=config.seed, max_operand=d.synthetic_max_operand)))
      data_lib.write_jsonl(eval_path, data_lib.problems_to_rows(
          data_lib.synthetic_arithmetic(config.eval.num_problems or 16, seed=config.seed + 1,
                                        max_operand=d.synthetic_max_operand)))
  load = functools.partial(data_lib.load_problems, question_key=d.question_key or None,
                           answer_key=d.answer_key or None, answer_format=d.answer_format,
                           data_dir=d.tfds_data_dir or None)
  train = load(train_path, split=d.train_split, limit=d.train_limit or None)
  eval_problems = load(eval_path or train_path, split=d.eval_split, limit=config.eval.num_problems or None)
  return train, eval_problems


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def pad_prompts(token_lists: Sequence[Sequence[int]], bucket: int, max_tokens: int,
                pad_id: int) -> sampling.PaddedPrompts:
  """Left-pads to the longest prompt rounded up to `bucket` (at most max_tokens): few distinct shapes."""
  width = min(max_tokens, _round_up(max(len(t) for t in token_lists), bucket))
  return sampling.left_pad(token_lists, width, pad_id)


def _slice_prompts(prompts: sampling.PaddedPrompts, start: int, stop: int) -> sampling.PaddedPrompts:
  return sampling.PaddedPrompts(tokens=prompts.tokens[start:stop], lengths=prompts.lengths[start:stop])


def _concat_rollouts(parts: Sequence[sampling.Rollouts]) -> sampling.Rollouts:
  if len(parts) == 1:
    return parts[0]
  return sampling.Rollouts(
      tokens=jnp.concatenate([p.tokens for p in parts]), logprobs=jnp.concatenate([p.logprobs for p in parts]),
      mask=jnp.concatenate([p.mask for p in parts]), lengths=jnp.concatenate([p.lengths for p in parts]),
      stopped=jnp.concatenate([p.stopped for p in parts]),
      num_steps=jnp.max(jnp.stack([p.num_steps for p in parts])))


def _truncate_rollouts(rollouts: sampling.Rollouts, length: int) -> sampling.Rollouts:
  """Keeps the first `length` slots (all tokens of every rollout must fit)."""
  return rollouts.replace(tokens=rollouts.tokens[..., :length], logprobs=rollouts.logprobs[..., :length],
                          mask=rollouts.mask[..., :length])


def _pipelined(calls: Iterable[Callable[[], Any]], consume: Callable[[Any], None]) -> None:
  """Dispatches call i+1 (asynchronously, on the device) before consuming result i on the host."""
  pending = None
  for call in calls:
    result = call()
    if pending is not None:
      consume(pending)
    pending = result
  if pending is not None:
    consume(pending)


def decode_responses(tokenizer: tokenizer_lib.TextTokenizer, tokens: np.ndarray,
                     lengths: np.ndarray) -> list[str]:
  """tokens [R, M], lengths [R] -> R strings (special tokens such as the stop token dropped)."""
  return tokenizer.decode_batch([row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())])


# ------------------------------------------------------------------------------------------------ update


def make_policy_update(model_fns, tx: optax.GradientTransformation, *, advantage_fn, reduction: str,
                       entropy_coef: float, micro_batch_prompts: int | None = None,
                       micro_batch_rollouts: int | None = None, num_shards: int = 1,
                       state_sharding: Any = None, batch_sharding: Any = None):
  """Jitted `update(state, prompts, rollouts, rewards, temperature) -> (state, metrics)` (state donated).

  It is `train_steps.policy_update` for rollouts verified on the host, with its gradient accumulation over
  micro-batches of `micro_batch_prompts` prompts x `micro_batch_rollouts` rollouts (None: one batch) and
  `num_shards` batch shards. With `state_sharding` and `batch_sharding` the update is jitted with those
  in/out shardings (prompts, rollouts and rewards split over prompts; temperature and metrics replicated).
  """

  def update(state, prompts, rollouts, rewards, temperature):
    return train_steps.policy_update(
        model_fns, tx, state, prompts, rollouts, rewards, temperature, advantage_fn=advantage_fn,
        reduction=reduction, entropy_coef=entropy_coef, micro_batch_prompts=micro_batch_prompts,
        micro_batch_rollouts=micro_batch_rollouts, num_shards=num_shards)

  if state_sharding is None:
    return jax.jit(update, donate_argnums=0)
  rep = sharding.replicated(batch_sharding.mesh)
  rollouts_sharding = sampling.Rollouts(tokens=batch_sharding, logprobs=batch_sharding, mask=batch_sharding,
                                        lengths=batch_sharding, stopped=batch_sharding, num_steps=rep)
  return jax.jit(update, donate_argnums=0, in_shardings=(state_sharding, batch_sharding, rollouts_sharding,
                                                         batch_sharding, rep),
                 out_shardings=(state_sharding, rep))


# ------------------------------------------------------------------------------------------------ rollouts


class Sampler:
  """Samples and verifies rollouts of token-list prompts in prompt chunks, overlapping host and device.

  Args:
    model_fns: DecoderFns. tokenizer: TextTokenizer. verifier: MathVerifier.
    mesh, params_sharding: prompts (with their rollouts) are split over the mesh's batch axes, parameters
      placed as `params_sharding` (see maxrl_jax.sharding.make_sharded_sampler).
    stop_tokens: sampler stop ids. pad_id: left padding and filler id.
    prompt_bucket, max_prompt_tokens: prompt widths are multiples of the bucket, capped.
    zero_truncated: score 0 for responses whose length reaches the call's token cap (max_new_tokens),
      stopped or not, as the official GSM8K runs do (verl: valid response length >= max response length).
    inflight_slots: 0: static batching (`sampling.sample_rollouts`: a call's prompts x N rows decode together
      until the longest rollout stops); S > 0: in-flight batching (`inflight_sampling.sample_rollouts_inflight`:
      S rows, each refilled with the call's next rollout as soon as its rollout finishes; one device).
  """

  def __init__(self, model_fns, tokenizer, verifier, *, mesh, params_sharding, stop_tokens, pad_id, prompt_bucket,
               max_prompt_tokens, zero_truncated: bool, inflight_slots: int = 0):
    self.model_fns = model_fns
    self.mesh = mesh
    self.params_sharding = params_sharding
    self._samplers = {}
    self.tokenizer = tokenizer
    self.verifier = verifier
    self.stop_tokens = tuple(stop_tokens)
    self.pad_id = pad_id
    self.prompt_bucket = prompt_bucket
    self.max_prompt_tokens = max_prompt_tokens
    self.zero_truncated = zero_truncated
    self.inflight_slots = inflight_slots
    if inflight_slots and sharding.num_batch_shards(mesh) > 1:
      raise ValueError(f"config.rollout.inflight_slots={inflight_slots}: in-flight sampling runs on one device, and "
                       f"the mesh has {sharding.num_batch_shards(mesh)} batch shards ({sharding.describe(mesh)}). "
                       "Set config.rollout.inflight_slots=0 (static batching) or run on one device.")

  def pad(self, token_lists):
    return pad_prompts(token_lists, self.prompt_bucket, self.max_prompt_tokens, self.pad_id)

  def place(self, prompts: sampling.PaddedPrompts) -> sampling.PaddedPrompts:
    """Host prompts -> global arrays split over the batch axes."""
    batch = sharding.batch_sharding(self.mesh)
    return jax.tree_util.tree_map(lambda x: sharding.shard_global_array(x, batch), prompts)

  def sample(self, params, prompts, key, *, num_samples, max_new_tokens, temperature, top_p=None, prompt_ids=None):
    """Dispatches (asynchronously) one sampling call on host prompts; returns device Rollouts.

    In-flight sampling draws rollout n of prompt p with fold_in(fold_in(key, prompt_ids[p]), n) (prompt_ids
    default 0..P-1); static sampling uses `key` for the whole call and ignores prompt_ids.
    """
    top_p = None if top_p in (None, 1.0) else float(top_p)
    if self.inflight_slots:
      return inflight_sampling.sample_rollouts_inflight(
          self.model_fns, params, self.place(prompts), key, num_rollouts=num_samples,
          max_new_tokens=max_new_tokens, num_slots=self.inflight_slots, temperature=temperature,
          stop_tokens=self.stop_tokens, top_p=top_p, pad_id=self.pad_id,
          prompt_ids=None if prompt_ids is None else jnp.asarray(prompt_ids, jnp.int32))
    options = (num_samples, max_new_tokens, top_p)
    if options not in self._samplers:
      self._samplers[options] = sharding.make_sharded_sampler(
          self.model_fns, self.mesh, self.params_sharding, num_rollouts=num_samples,
          max_new_tokens=max_new_tokens, stop_tokens=self.stop_tokens, top_p=top_p, pad_id=self.pad_id)
    return self._samplers[options](params, self.place(prompts), key, jnp.asarray(temperature, jnp.float32))

  def host_results(self, rollouts: sampling.Rollouts, answers: Sequence[str]) -> dict[str, np.ndarray]:
    """Fetches one call's rollouts [P, N, M] and verifies them -> rewards [P, N] and host statistics."""
    tokens, lengths, stopped = sharding.gather_to_host((rollouts.tokens, rollouts.lengths, rollouts.stopped))
    num_prompts, num_samples = lengths.shape
    texts = decode_responses(self.tokenizer, tokens.reshape(num_prompts * num_samples, -1), lengths.reshape(-1))
    references = [a for a in answers for _ in range(num_samples)]
    rewards = self.verifier(texts, references).reshape(num_prompts, num_samples)
    at_cap = lengths >= tokens.shape[-1]
    if self.zero_truncated:
      rewards = np.where(at_cap, np.float32(0), rewards)
    return {"rewards": rewards, "texts": texts, "lengths": lengths, "stopped": stopped,
            "zeroed_at_cap": at_cap if self.zero_truncated else np.zeros_like(at_cap),
            **{k: np.float32(v) for k, v in self.verifier.last_stats.items()}}


# ------------------------------------------------------------------------------------------------ eval


def evaluate(sampler: Sampler, params, prompt_tokens: Sequence[Sequence[int]], answers: Sequence[str], *,
             key, num_samples: int, samples_per_call: int, prompt_chunk: int, max_new_tokens: int,
             temperature: float, top_p: float, ks: Sequence[int], answer_mode: str) -> dict[str, float]:
  """Held-out pass@k (unbiased, from num_samples samples per problem), majority vote, lengths.

  Prompt chunks keep one shape: the last chunk is filled with copies of its first prompt (ignored).
  """
  num_problems = len(prompt_tokens)
  counts = np.zeros(num_problems, np.int64)
  votes = [Counter() for _ in range(num_problems)]
  correct_answers = [set() for _ in range(num_problems)]
  lengths, stopped, timeouts = [], [], 0.0
  calls = []
  prompts_all = sampler.pad(prompt_tokens)
  for start in range(0, num_problems, prompt_chunk):
    rows = list(range(start, min(start + prompt_chunk, num_problems)))
    rows_padded = rows + [rows[0]] * (prompt_chunk - len(rows))
    chunk = sampling.PaddedPrompts(tokens=prompts_all.tokens[rows_padded], lengths=prompts_all.lengths[rows_padded])
    for repeat in range(num_samples // samples_per_call):
      call_key = jax.random.fold_in(jax.random.fold_in(key, start), repeat)
      calls.append((rows, chunk, call_key))

  def dispatch(rows, chunk, call_key):
    return rows, sampler.sample(params, chunk, call_key, num_samples=samples_per_call,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p)

  def consume(item):
    nonlocal timeouts
    rows, rollouts = item
    padded_answers = [answers[r] for r in rows] + [answers[rows[0]]] * (prompt_chunk - len(rows))
    result = sampler.host_results(rollouts, padded_answers)
    timeouts += float(result["verify_timeouts"])
    for i, row in enumerate(rows):
      counts[row] += int(result["rewards"][i].sum())
      for j in range(samples_per_call):
        if result["zeroed_at_cap"][i, j]:
          continue  # scored 0 at the length cap: no vote either
        text = result["texts"][i * samples_per_call + j]
        vote = math_verifier.canonical_answer(text, answer_mode)
        if vote is not None:
          votes[row][vote] += 1
          if result["rewards"][i, j]:
            correct_answers[row].add(vote)
    lengths.append(result["lengths"][: len(rows)])
    stopped.append(result["stopped"][: len(rows)])

  _pipelined((functools.partial(dispatch, *call) for call in calls), consume)
  pass_at = np.asarray(jnp.mean(metrics_lib.pass_at_k(num_samples, jnp.asarray(counts), list(ks)), axis=0))
  majority = [bool(v) and v.most_common(1)[0][0] in good for v, good in zip(votes, correct_answers)]
  result = {f"pass@{k}": float(v) for k, v in zip(ks, pass_at)}
  result.update({
      "pass_rate": float(counts.mean() / num_samples),
      "fraction_solved": float(np.mean(counts > 0)),
      f"maj@{num_samples}": float(np.mean(majority)),
      "mean_response_length": float(np.mean(np.concatenate(lengths))),
      "truncated_fraction": float(1.0 - np.mean(np.concatenate(stopped))),
      "verify_timeouts": timeouts,
  })
  return result


# ------------------------------------------------------------------------------------------------ main job


class _EpochOrder:
  """Epoch-shuffled batches of prompt indices; the permutation of epoch e depends on (seed, e) only."""

  def __init__(self, num_items: int, batch_size: int, seed: int):
    if num_items < batch_size:
      raise ValueError(f"{num_items} usable training prompts < rollout.num_prompts={batch_size}.")
    self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
    self.steps_per_epoch = num_items // batch_size

  def epoch(self, step: int) -> int:
    return (step - 1) // self.steps_per_epoch

  def batch(self, step: int) -> np.ndarray:
    epoch, within = divmod(step - 1, self.steps_per_epoch)
    order = np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
    return order[within * self.batch_size:(within + 1) * self.batch_size]


def eval_sizes(config: ml_collections.ConfigDict, full: bool) -> dict:
  """num_samples, samples_per_call and ks of one held-out evaluation.

  The first (step 0) and the last evaluation use eval.num_samples (the paper's pass@k curves); those in
  between use eval.periodic_num_samples when it is set (the official scripts validate with 32 samples),
  with the ks that fit.
  """
  num_samples = config.eval.num_samples
  if not full and config.eval.periodic_num_samples:
    num_samples = config.eval.periodic_num_samples
  return {"num_samples": num_samples, "samples_per_call": min(config.eval.samples_per_call, num_samples),
          "ks": tuple(k for k in config.eval.ks if k <= num_samples)}


def _sft_examples(problems, prompt_tokens, tokenizer, end_id, max_response_tokens):
  """(input token lists, number of prompt tokens) for problems with a solution."""
  inputs, prompt_lengths = [], []
  for problem, prompt in zip(problems, prompt_tokens):
    if not problem.solution:
      continue
    response = tokenizer.encode(problem.solution)[: max_response_tokens - 1] + [end_id]
    inputs.append(list(prompt) + response)
    prompt_lengths.append(len(prompt))
  if not inputs:
    raise ValueError("config.sft.steps > 0 but no training problem has a reference solution.")
  return inputs, prompt_lengths


def _abstract_state(init_fn, *args, mesh, rules):
  """(ShapeDtypeStructs with shardings, shardings) of `init_fn(*args)`: a restore target that allocates nothing."""
  abstract = jax.eval_shape(init_fn, *args)
  shardings = sharding.tree_shardings(abstract, mesh, rules)
  like = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract,
                                shardings)
  return like, shardings


def finished_summary(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The summary of a finished run of exactly this config in `workdir`, else None."""
  summary = workdir_lib.read_finished_summary(workdir, config.to_dict())
  if summary is not None and summary.get("rl_steps") == config.rl.steps:
    return summary
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) [SFT then] RL on math problems and returns the summary written to summary.json.

  One process at a time per workdir (a second one stops at once, naming the holder). A workdir that holds a
  finished run of the same config is left untouched: its summary is returned.
  """
  sharding.initialize_distributed(config.get("mesh"))  # Multi-host: before any JAX computation.
  validate_config(config)
  workdir = workdir_lib.prepare_workdir(workdir)
  with workdir_lib.WorkdirLock(workdir, enabled=sharding.is_chief()):
    finished = finished_summary(config, workdir)
    if finished is not None:
      print(f"{workdir} already holds this run, finished ({finished['rl_steps']} RL steps); nothing was "
            f"changed. Its results: {os.path.join(workdir, 'summary.json')}", flush=True)
      return finished
    with contextlib.ExitStack() as cleanup:
      return _train_and_evaluate(config, workdir, cleanup)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, cleanup: contextlib.ExitStack) -> dict:
  # Prompts split over every device; parameters and optimizer state by config.mesh.param_rules.
  mesh = sharding.make_mesh(config.get("mesh"))
  param_rules = sharding.MeshConfig.from_config(config.get("mesh")).param_rules
  batch_sizes = {"rollout.prompt_chunk": config.rollout.prompt_chunk, "eval.prompt_chunk": config.eval.prompt_chunk,
                 "rl.micro_batch_prompts": config.rl.micro_batch_prompts}
  if config.sft.steps:
    batch_sizes["sft.batch_size"] = config.sft.batch_size
  sharding.check_batch_sizes(mesh, batch_sizes)
  if config.rollout.inflight_slots and sharding.num_batch_shards(mesh) > 1:
    raise ValueError(f"config.rollout.inflight_slots={config.rollout.inflight_slots}: in-flight sampling runs on one "
                     f"device, and the mesh is {sharding.describe(mesh)}. Set config.rollout.inflight_slots=0 "
                     "(static batching) or run on one device.")
  batch_sharding = sharding.batch_sharding(mesh)
  if sharding.is_chief():  # Run files are written once; orbax coordinates the checkpoints itself.
    run_logging.check_or_write_config(workdir, config.to_dict())
  identity = workdir_lib.config_identity(config.to_dict())
  start_time = time.time()
  bar = functools.partial(tqdm.tqdm, disable=not (config.progress_bar and sharding.is_chief()),
                          dynamic_ncols=True)

  # ---------------------------------------------------------------- model, tokenizer, data
  if not sharding.is_chief():
    sharding.barrier("synthetic_files")  # Process 0 writes synthetic checkpoints / data (if asked) first.
  model_path = resolve_model_path(config, workdir)
  train_problems, eval_problems = resolve_data(config, workdir)
  if sharding.is_chief():
    sharding.barrier("synthetic_files")
  max_new = max(config.rollout.max_new_tokens, config.eval.max_new_tokens)
  max_positions = config.model.max_positions or config.data.max_prompt_tokens + max(
      max_new, config.sft.max_response_tokens if config.sft.steps else 0)
  load_kwargs = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype or None,
                     max_positions=max_positions)
  # The parameters' shardings come from the rules (paths as in the TrainState, "params/..."), and every
  # tensor is read from the checkpoint straight into its shards.
  model_config = hf_loading.load_pretrained_config(model_path, **load_kwargs)
  # The memory plan, before any weight is read or anything compiled: refuses a config over the budget and
  # fills in the batch sizes left at 0.
  memory = check_memory(config, model_config, (mesh.shape.get("data", 1), mesh.shape.get("fsdp", 1)))
  sharding.check_batch_sizes(mesh, {"rollout.prompt_chunk": memory.prompt_chunk,
                                    "rl.micro_batch_prompts": memory.micro_batch[0]})
  params_sharding = sharding.tree_shardings(
      {"params": decoder.param_shapes(model_config)}, mesh, param_rules)["params"]
  model, params = hf_loading.load_pretrained(model_path, shardings=params_sharding, **load_kwargs)
  model_fns = decoder.DecoderFns(model.config)
  tokenizer = tokenizer_lib.TextTokenizer.from_pretrained(model_path, tuple(config.data.extra_stop_tokens))
  template = tokenizer_lib.ChatTemplate.from_pretrained(model_path, config.data.chat_template)
  stop_tokens = tokenizer_lib.stop_token_ids(tokenizer, template)
  template_kwargs = dict(config.data.template_kwargs)
  encode = functools.partial(data_lib.encode_prompts, tokenizer=tokenizer, template=template,
                             suffix=config.data.prompt_suffix, system_prompt=config.data.system_prompt,
                             max_tokens=config.data.max_prompt_tokens, **template_kwargs)
  train_tokens, kept = encode(train_problems)
  train_problems = [train_problems[i] for i in kept]
  eval_tokens, kept_eval = encode(eval_problems)
  dropped = {"train": len(kept) - len(train_problems), "eval": len(eval_problems) - len(kept_eval)}
  eval_problems = [eval_problems[i] for i in kept_eval]
  if not eval_problems:
    raise ValueError(f"No evaluation prompt fits data.max_prompt_tokens={config.data.max_prompt_tokens}.")

  root = jax.random.key(config.seed)
  keys = {i: jax.random.fold_in(root, i) for i in range(3)}
  writer = sharding.ChiefOnlyWriter(run_logging.MetricsWriter(
      workdir, sinks=run_logging.sinks_from_config(config, workdir) if sharding.is_chief() else ()))
  verifier = math_verifier.MathVerifier(
      answer_mode=config.verifier.answer_mode, timeout_s=config.verifier.timeout_s,
      num_threads=config.verifier.num_threads, symbolic=config.verifier.symbolic,
      memory_limit_mb=config.verifier.memory_limit_mb)
  cleanup.callback(verifier.close)  # Its sympy worker processes stop however the run ends.
  # Checkpoints carry the run's records and its config identity; they are verified when restored.
  sft_ckpt = checkpoints.PhaseCheckpointer(workdir, "sft", config.keep_checkpoints, identity=identity)
  cleanup.callback(sft_ckpt.close)
  rl_ckpt = checkpoints.PhaseCheckpointer(workdir, "rl", config.keep_checkpoints, identity=identity)
  cleanup.callback(rl_ckpt.close)
  sampler = Sampler(model_fns, tokenizer, verifier, mesh=mesh, params_sharding=params_sharding,
                    stop_tokens=stop_tokens, pad_id=tokenizer.pad_id,
                    prompt_bucket=config.data.prompt_bucket, max_prompt_tokens=config.data.max_prompt_tokens,
                    zero_truncated=config.verifier.zero_truncated, inflight_slots=config.rollout.inflight_slots)
  evaluate_with = functools.partial(
      evaluate, sampler, prompt_tokens=eval_tokens, answers=[p.answer for p in eval_problems],
      key=keys[_KEY_EVAL], prompt_chunk=config.eval.prompt_chunk, max_new_tokens=config.eval.max_new_tokens,
      temperature=config.eval.temperature, top_p=config.eval.top_p, answer_mode=config.verifier.answer_mode)
  last_rl_step = [0]  # The RL step just run: the evaluation after the last one uses every sample.

  def run_eval(params, full=None):
    full = last_rl_step[0] in (0, config.rl.steps) if full is None else full
    return evaluate_with(params, **eval_sizes(config, full))

  objective = config.objective
  rl_schedule = optax.join_schedules(
      [optax.linear_schedule(0.0, config.rl.learning_rate, max(config.rl.warmup_steps, 1)),
       optax.constant_schedule(config.rl.learning_rate)], [max(config.rl.warmup_steps, 1)])
  rl_tx = train_steps.adamw(rl_schedule if config.rl.warmup_steps else config.rl.learning_rate,
                            config.rl.b1, config.rl.b2, config.rl.weight_decay, config.rl.grad_clip)
  rl_init = lambda p: train_steps.init_state(p, rl_tx)  # noqa: E731
  rl_like, state_sharding = _abstract_state(rl_init, params, mesh=mesh, rules=param_rules)
  rl_found = rl_ckpt.restore_latest(rl_like)
  del rl_like
  if rl_found is not None:
    # ---------------------------------------------------------------- RL resumes (SFT, if any, is done)
    rl_resume, state, extra = rl_found
    records = training_loop.RecordKeeper.resume(writer, extra.get("records"), f"RL step {rl_resume}")
  else:
    rl_resume = None
    if config.sft.steps:
      # -------------------------------------------------------------- optional SFT warm-up
      end_id = tokenizer.token_to_id(template.end_of_turn) if template.end_of_turn else None
      end_id = tokenizer.eos_token_ids[0] if end_id is None else end_id
      inputs, prompt_lengths = _sft_examples(train_problems, train_tokens, tokenizer, end_id,
                                             config.sft.max_response_tokens)
      width = _round_up(max(len(x) for x in inputs), config.data.prompt_bucket)
      sft_inputs = np.full((len(inputs), width), tokenizer.pad_id, np.int32)
      sft_mask = np.zeros((len(inputs), width), bool)
      for row, (sequence, prompt_len) in enumerate(zip(inputs, prompt_lengths)):
        sft_inputs[row, :len(sequence)] = sequence
        sft_mask[row, prompt_len:len(sequence)] = True
      sft_tx = train_steps.adamw(config.sft.learning_rate, config.rl.b1, config.rl.b2, config.rl.weight_decay,
                                 config.rl.grad_clip)
      sft_init = lambda p: train_steps.init_state(p, sft_tx)  # noqa: E731
      sft_like, sft_sharding = _abstract_state(sft_init, params, mesh=mesh, rules=param_rules)
      sft_found = sft_ckpt.restore_latest(sft_like)
      del sft_like
      sft_resume = 0
      if sft_found is not None:
        sft_resume, state, extra = sft_found
      else:
        state = jax.jit(sft_init, out_shardings=sft_sharding)(params)
      records = training_loop.RecordKeeper.resume(
          writer, extra.get("records") if sft_found else [],
          f"SFT step {sft_resume}" if sft_resume else "the start")
      sft_step = train_steps.make_sft_step(model_fns, sft_tx, state_sharding=sft_sharding,
                                           batch_sharding=batch_sharding)

      def sft_batch_step(s, step):
        rows = np.random.default_rng([config.seed, _KEY_SFT, step]).integers(0, len(inputs),
                                                                              config.sft.batch_size)
        return sft_step(s, {"inputs": sharding.shard_global_array(sft_inputs[rows], batch_sharding),
                            "loss_mask": sharding.shard_global_array(sft_mask[rows], batch_sharding)})

      state = training_loop.run_phase(
          "sft", state, sft_batch_step, start=sft_resume, end=config.sft.steps, writer=records,
          save=lambda step, s: sft_ckpt.save(step, s, records.records), log_every=config.log_every_steps,
          checkpoint_every=config.checkpoint_every_steps, progress=functools.partial(bar, desc="SFT"))
      params = state.params
      del state
    else:
      records = training_loop.RecordKeeper.resume(writer, [], "the start")
    # ---------------------------------------------------------------- RL starts
    state = jax.jit(rl_init, out_shardings=state_sharding)(params)
  del params

  update = make_policy_update(
      model_fns, rl_tx,
      advantage_fn=estimators.get_advantage_fn(objective.name, **estimators.kwargs_from_config(objective)),
      reduction=objective.reduction, entropy_coef=objective.entropy_coef,
      micro_batch_prompts=memory.micro_batch[0], micro_batch_rollouts=memory.micro_batch[1],
      num_shards=sharding.num_batch_shards(mesh), state_sharding=state_sharding, batch_sharding=batch_sharding)

  evals = {r["step"]: r for r in records.records if r.get("phase") == "eval"}
  if 0 not in evals:
    evals[0] = {"phase": "eval", "step": 0, **run_eval(state.params, full=True)}
    records.write(evals[0])

  order = _EpochOrder(len(train_problems), config.rollout.num_prompts, config.seed)
  temperature = jnp.float32(config.rollout.temperature)
  chunk = memory.prompt_chunk

  def rl_step(state, step):
    """Samples in prompt chunks (verifying chunk c on the host while chunk c+1 samples), then updates."""
    last_rl_step[0] = step
    rows = order.batch(step)
    prompts = sampler.pad([train_tokens[i] for i in rows])
    answers = [train_problems[i].answer for i in rows]
    step_key = jax.random.fold_in(keys[_KEY_RL_SAMPLING], step)
    parts, host = [], []
    sample_start = time.time()

    def dispatch(c):
      # In-flight sampling keys each rollout by its prompt's row in the step: the draws do not depend on the
      # chunk size. Static sampling draws with one key per chunk.
      rows_c = np.arange(c * chunk, (c + 1) * chunk)
      part = sampler.sample(state.params, _slice_prompts(prompts, c * chunk, (c + 1) * chunk),
                            step_key if sampler.inflight_slots else jax.random.fold_in(step_key, c),
                            num_samples=config.rollout.num_samples, max_new_tokens=config.rollout.max_new_tokens,
                            temperature=temperature, prompt_ids=rows_c)
      parts.append(part)
      return c, part

    def consume(item):
      c, part = item
      host.append(sampler.host_results(part, answers[c * chunk:(c + 1) * chunk]))

    _pipelined((functools.partial(dispatch, c) for c in range(len(rows) // chunk)), consume)
    rollouts = _concat_rollouts(parts)
    rewards = np.concatenate([h["rewards"] for h in host])
    longest = int(max(h["lengths"].max() for h in host))
    rollouts = _truncate_rollouts(
        rollouts, min(config.rollout.max_new_tokens, _round_up(max(longest, 1), config.rollout.length_bucket)))
    sample_seconds = time.time() - sample_start
    state, step_metrics = update(state, sampler.place(prompts), rollouts,
                                 sharding.shard_global_array(rewards, batch_sharding), temperature)
    return state, dict(step_metrics, sample_verify_s=sample_seconds,
                       verify_s=sum(float(h["verify_seconds"]) for h in host),
                       verify_timeouts=sum(float(h["verify_timeouts"]) for h in host),
                       zeroed_at_cap=float(np.mean(np.concatenate([h["zeroed_at_cap"].ravel() for h in host]))))

  state = training_loop.run_phase(
      "rl", state, rl_step, start=rl_resume or 0, end=config.rl.steps, writer=records,
      save=lambda step, s: rl_ckpt.save(step, s, records.records),
      log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
      progress=functools.partial(bar, desc=f"RL ({objective.name})"), evaluate=run_eval,
      eval_every=config.eval.every_steps, evals=evals, tokens_key="generated_tokens",
      annotate=lambda record, step: record.update(epoch=order.epoch(step)))
  cleanup.close()  # Checkpoints and the verifier's workers are done.
  del state

  # The results are what the records hold (the checkpoints' records, and this launch's).
  evals = {r["step"]: r for r in records.records if r.get("phase") == "eval"}
  final_step = max(evals)
  if final_step != config.rl.steps:  # Never report an evaluation the run did not make.
    raise RuntimeError(f"{workdir}: the last held-out evaluation is at RL step {final_step}, not "
                       f"rl.steps={config.rl.steps}; the records are incomplete. Re-run to resume.")
  final = {k: v for k, v in evals[final_step].items() if k not in ("phase", "step")}
  initial = {k: v for k, v in evals[0].items() if k not in ("phase", "step")}
  ks = list(config.eval.ks)
  summary = {
      "objective": objective.name,
      "objective_kwargs": estimators.kwargs_from_config(objective),
      "eval": final,
      "initial_eval": initial,
      "rl_steps": final_step,
      "model_path": model_path,
      "num_train_problems": len(train_problems),
      "eval_num_problems": len(eval_problems),
      "eval_num_samples": config.eval.num_samples,
      "dropped_long_prompts": dropped,
      "improvement": {f"pass@{k}": final[f"pass@{k}"] - initial[f"pass@{k}"] for k in ks},
      "wall_time_s_this_launch": time.time() - start_time,
      "config_sha256": workdir_lib.config_digest(config.to_dict()),
  }
  if not sharding.is_chief():
    return summary
  run_logging.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  curves = plots.plot_run(workdir)
  rows = [{"policy": "initial" + (" (after SFT)" if config.sft.steps else ""), **initial},
          {"policy": f"after RL ({objective.name}, {final_step} steps)", **final}]
  print(run_logging.format_table(
      rows, ["policy"] + [f"pass@{k}" for k in ks] + [f"maj@{config.eval.num_samples}", "fraction_solved"],
      title=f"Held-out problems ({len(eval_problems)} problems, {config.eval.num_samples} samples each, "
            f"temperature {config.eval.temperature}, top-p {config.eval.top_p})"))
  print(f"Results: {os.path.join(workdir, 'summary.json')}", flush=True)
  if curves:
    print("Curves: " + ", ".join(curves), flush=True)
  return summary
