"""The batch sizes of the RL trainer, from the memory plan (maxrl_jax/memory_plan.py), before compiling.

Tasks verified on the host (language models) sample in calls of `rollout.prompt_chunk` prompts and may
accumulate the update over micro-batches of `rl.micro_batch_prompts` x `rl.micro_batch_rollouts`; sizes set
to 0 are chosen from the plan (`plan_memory`), sizes set are checked, and a config over the device's budget
(config.memory) is refused naming the fields to change. Tasks verified on the device run the step as one
jitted function on the whole batch: their plan is checked (`check_whole_batch`) and printed on accelerators.
A population's device group holds several members: the budget of each is the device's divided among them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import ml_collections

from maxrl_jax import memory_plan
from maxrl_jax import sharding
from maxrl_jax.models import decoder
from maxrl_jax.models import lora as lora_lib

# Batch sizes that may be 0 in a config: then chosen from the memory plan (`plan_memory`).
AUTO_SIZES = ("rollout.prompt_chunk", "rl.micro_batch_prompts", "rl.micro_batch_rollouts")


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


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def step_options(config: ml_collections.ConfigDict, reference: bool | None = None) -> dict:
  """`memory_plan.estimate`'s options of a run's RL step: LoRA adapters, a KL reference copy of the weights,
  the extra [P, N, M] log-prob arrays (reference; learner's own with TIS and a ratio). `reference` (default:
  config.rl.kl_coef != 0) is whether some run of the program uses KL."""
  rl = config.rl
  reference = bool(rl.get("kl_coef", 0.0)) if reference is None else reference
  learner = bool(rl.get("tis_cap", 0.0)) and rl.get("importance_ratio", "none") != "none"
  return {"lora": lora_lib.from_config(config.model), "reference": reference,
          "extra_logprobs": int(reference) + int(learner)}


def _by_size(options: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
  """(prompts, rollouts) pairs, most rollouts first, fewest prompts among equals."""
  return sorted(options, key=lambda pn: (-pn[0] * pn[1], pn[0]))


def plan_memory(config: ml_collections.ConfigDict, model_config: decoder.DecoderConfig, *, prompt_len: int,
                mesh_shape: tuple[int, int] = (1, 1), device_bytes: int | None = None,
                enforce: bool = True, reference: bool | None = None) -> MemoryChoice:
  """Chooses or checks the sampling call and update micro-batch sizes against a per-device memory budget.

  The workload is the config's worst case: P = rollout.num_prompts prompts x N = rollout.num_samples
  rollouts, prompts of L = `prompt_len` tokens (the task's longest), responses of M = rollout.max_new_tokens
  (`maxrl_jax.memory_plan.estimate` says what is counted, with config.memory.reserve_bytes set aside). Per
  device, the step holds state + rollouts + reserve throughout, plus the sampler's caches while sampling and
  the micro-batch's activations while updating; an evaluation call holds state + reserve + its caches.

  Sizes set in the config are checked; sizes set to 0 (`AUTO_SIZES`) are chosen: the most prompts per
  sampling call (a multiple of the devices dividing P), then the most rollouts per micro-batch (fewest
  prompts among equals) that fit `device_bytes`. Without a budget (None: a CPU) nothing is checked and the
  sizes left to choose are the smallest (one prompt per device per call, one rollout per micro-batch).

  Args:
    config: the run's config (rollout, rl, eval and memory blocks). model_config: the policy.
    prompt_len: the longest prompt (the task's `prompt_length()`).
    mesh_shape: (data, fsdp) devices; prompts are split over both, parameters over fsdp.
    device_bytes: the budget per device in bytes, or None.
    enforce: raise when over the budget (else the result's `over_budget` says what does not fit).
    reference: whether some run of the program holds a KL reference (default: config.rl.kl_coef != 0).

  With rl.ppo_mini_batches > 1 an update's micro-batch is chosen among the divisors of the mini-batch's
  P / ppo_mini_batches prompts; LoRA and the KL reference are counted as `step_options` says.

  Returns:
    `MemoryChoice`. With `enforce`, raises a ValueError naming each part that does not fit, its bytes, and
    the config fields to change, with values that fit.
  """
  data, fsdp = mesh_shape
  shards = data * fsdp
  r, e = config.rollout, config.eval
  num_prompts, num_samples, prompt_len = r.num_prompts, r.num_samples, prompt_len
  workload = memory_plan.Workload(num_prompts, num_samples, prompt_len, r.max_new_tokens)
  reserve = int(config.memory.reserve_bytes) if device_bytes else 0
  options = step_options(config, reference)
  prompt_options = [p for p in _divisors(num_prompts) if p % shards == 0]
  mini_prompts = num_prompts // int(config.rl.get("ppo_mini_batches", 1))
  micro_prompt_options = [p for p in prompt_options if mini_prompts % p == 0]
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
        device_bytes=device_bytes, reserve_bytes=reserve, **options), chunk, num_samples, r.max_new_tokens)

  def held(plan):  # Held through the whole step.
    return plan.state + plan.rollouts + plan.reserve

  def sampling_fits(chunk, micro_batch):
    plan = estimate(chunk, micro_batch)
    return held(plan) + plan.sampling_peak <= device_bytes

  def update_fits(chunk, micro_batch):
    plan = estimate(chunk, micro_batch)
    return held(plan) + plan.update_peak <= device_bytes

  all_micro = _by_size((p, n) for p in micro_prompt_options for n in _divisors(num_samples))
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
                 mesh_shape: tuple[int, int], prompt_len: int, reference: bool | None = None) -> MemoryChoice:
  """`plan_memory` with the device's budget, before anything is compiled: prints the plan when there is a
  budget (nothing on a CPU), refuses a config over it (ValueError) unless config.memory.enforce is False
  (then prints why), and returns the sizes to use."""
  budget = device_memory_budget(config)
  choice = plan_memory(config, model_config, prompt_len=prompt_len, mesh_shape=mesh_shape, device_bytes=budget,
                       enforce=config.memory.enforce, reference=reference)
  if budget is not None and sharding.is_chief():
    print(f"memory plan: {choice.describe()}", flush=True)
    if choice.over_budget:
      print(f"memory plan (config.memory.enforce=False, running anyway): {choice.over_budget}", flush=True)
  return choice


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The sizes a run uses: prompts per sampling call, (prompts, rollouts) per update micro-batch (None: all)."""

  prompt_chunk: int
  micro_batch: tuple[int | None, int | None]

  def batch_fields(self) -> dict[str, int]:
    """{config field: size} to check against the mesh's batch shards."""
    fields = {"rollout.prompt_chunk": self.prompt_chunk}
    if self.micro_batch[0]:
      fields["rl.micro_batch_prompts"] = self.micro_batch[0]
    return fields


def check_whole_batch(config: ml_collections.ConfigDict, model_config: decoder.DecoderConfig, mesh_shape,
                      prompt_len: int, members_per_group: int = 1, reference: bool | None = None) -> None:
  """Prints the RL step's memory plan per device on accelerators and refuses, before compiling, a config over
  the device's budget (one sampling call and one update on the whole batch; `members_per_group` copies)."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  if not limit:
    return
  micro_prompts = config.rollout.num_prompts // int(config.rl.get("ppo_mini_batches", 1))
  plan = memory_plan.estimate(
      model_config, memory_plan.Workload(config.rollout.num_prompts, config.rollout.num_samples, prompt_len,
                                         config.rollout.max_new_tokens), mesh=mesh_shape,
      micro_batch=(micro_prompts, config.rollout.num_samples), **step_options(config, reference))
  need = plan.total * members_per_group + memory_plan.GiB
  if sharding.is_chief():
    group = f"{members_per_group} members per device group x " if members_per_group > 1 else ""
    print(f"memory plan: {group}({plan.describe()}) = {need / memory_plan.GiB:.2f} GiB per device with 1 GiB "
          f"reserve, budget {limit / memory_plan.GiB:.2f} GiB", flush=True)
  if need > limit:
    raise ValueError(
        f"The RL step needs about {need / memory_plan.GiB:.2f} GiB per device"
        + (f" ({members_per_group} members per device group)" if members_per_group > 1 else "")
        + f", more than the {limit / memory_plan.GiB:.2f} GiB available: use more devices (config.mesh), fewer "
        "prompts or rollouts, a shorter rollout.max_new_tokens"
        + (", or set config.population.member_devices so that each member group spans more devices."
           if members_per_group > 1 else "."))


def plan(config: ml_collections.ConfigDict, task, model_config: decoder.DecoderConfig, mesh,
         members_per_group: int = 1, reference: bool | None = None) -> Sizes:
  """The sizes of a run of `task` on `mesh` (see the module docstring); `reference`: whether some run of the
  program has a KL penalty (default: config.rl.kl_coef != 0)."""
  mesh_shape = (mesh.shape.get("data", 1), mesh.shape.get("fsdp", 1))
  if not task.host_verifier:
    check_whole_batch(config, model_config, mesh_shape, task.prompt_length(), members_per_group, reference)
    return Sizes(config.rollout.num_prompts, (config.rl.get("micro_batch_prompts") or None,
                                              config.rl.get("micro_batch_rollouts") or None))
  if members_per_group > 1 and config.memory.device_bytes:
    config = ml_collections.ConfigDict(config.to_dict())
    config.memory.device_bytes = int(config.memory.device_bytes) // members_per_group
  choice = check_memory(config, model_config, mesh_shape, task.prompt_length(), reference)
  return Sizes(choice.prompt_chunk, choice.micro_batch)
