r"""The RL step with the options from other RL libraries against the plain step, at the same shapes.

    python scripts/bench_knobs.py                                  # CPU: the maze default preset's step
    python scripts/bench_knobs.py --model=paper --num_prompts=32 --num_samples=128 --maze_size=17 \
        --new_tokens=180 --dtype=bfloat16                          # the paper's maze scale (an accelerator)
    python scripts/bench_knobs.py --out=/tmp/knobs.json

Variants (`maxrl_jax.rl.step` with one RLSpec / Hyper / Frozen each; everything else equal):

    plain            the default step: one AdamW update on -A log pi
    ppo4             rl.ppo_mini_batches=4 with the token ratio clipped to [0.8, 1.28] (4 updates per step)
    kl               rl.kl_coef=0.05, k3 in the loss: one extra teacher-forced pass of a frozen reference
    lora_merged      model.lora_rank=--lora_rank on every projection, the learner on merged weights
    lora_factorized  the same adapters, the learner computing x W + (alpha / r) (x A) B

For each: the whole jitted RL step (sample P x N rollouts of exactly --new_tokens tokens, the maze verifier,
advantages, update) and the update alone on fixed rollouts with fixed random rewards; compile time,
XLA's temporary bytes of the compiled update (`memory_analysis()`), wall-clock and process CPU times (median of
--repeats rounds after a warm-up; each round times every variant once in turn, so that the load of a shared
machine weighs on all alike), and the ratios to `plain`. The policy is the maze decoder of configs/maze.py
(`--model=default`: 2 layers, hidden 128; `paper`: 4 layers, hidden 256), randomly initialised; the prompts
are maze prompts. One JSON object is printed (and written to --out).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from maxrl_jax import estimators  # noqa: E402
from maxrl_jax import sampling  # noqa: E402
from maxrl_jax.models import decoder  # noqa: E402
from maxrl_jax.models import lora  # noqa: E402
from maxrl_jax.rl import step as step_lib  # noqa: E402
from maxrl_jax.tasks.maze import env as maze  # noqa: E402

_MODEL = flags.DEFINE_enum("model", "default", ["default", "paper", "tiny"], "The maze policy's size.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "P.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "N, rollouts per prompt.")
_MAZE_SIZE = flags.DEFINE_integer("maze_size", 9, "Maze side S (prompt length S (S + 1) + 4).")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 40, "M, tokens generated per rollout (fixed length).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_LORA_RANK = flags.DEFINE_integer("lora_rank", 8, "Rank of the LoRA variants.")
_PPO_MINI_BATCHES = flags.DEFINE_integer("ppo_mini_batches", 4, "Mini-batches of the ppo variant.")
_VARIANTS = flags.DEFINE_list("variants", ["plain", "ppo4", "kl", "lora_merged", "lora_factorized"],
                              "Which variants to time.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per part (the median is reported).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights, mazes, rewards and keys.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")

MODELS = {
    "tiny": dict(num_layers=1, hidden_size=32, ffn_size=64),
    "default": dict(num_layers=2, hidden_size=128, ffn_size=512),
    "paper": dict(num_layers=4, hidden_size=256, ffn_size=1024),
}


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _hardware() -> dict:
  cpu_model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"jax": jax.__version__, "jax_backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
          "num_devices": jax.device_count(), "cpu_model": cpu_model, "cpu_count": os.cpu_count()}


def variant_settings(name: str, base_spec: step_lib.RLSpec, base_hyper: step_lib.Hyper, lora_rank: int,
                     mini_batches: int) -> tuple[step_lib.RLSpec, step_lib.Hyper, str]:
  """(spec, hyper, what the RL state holds: "params" or "adapters") of a variant."""
  replace = lambda **kw: dataclasses.replace(base_spec, **kw)
  if name == "plain":
    return base_spec, base_hyper, "params"
  if name == "ppo4":
    return replace(ppo_mini_batches=mini_batches, importance_ratio="token", clip_high=0.28), base_hyper, "params"
  if name == "kl":
    return base_spec, dataclasses.replace(base_hyper, kl_coef=0.05), "params"
  if name in ("lora_merged", "lora_factorized"):
    config = lora.LoraConfig(rank=lora_rank, alpha=2.0 * lora_rank, update=name.split("_")[1])
    return replace(lora=config), base_hyper, "adapters"
  raise ValueError(f"Unknown variant {name!r}.")


def prepare_variant(name, model_fns, params, grids, rewards, *, num_samples, new_tokens, lora_rank,
                    mini_batches) -> tuple[dict, Callable[[], Any], Callable[[], Any]]:
  """Compiles a variant's whole RL step and its update alone, runs each once (warm-up); returns (facts, step
  call, update call)."""
  base_spec = step_lib.RLSpec(num_samples=num_samples, max_new_tokens=new_tokens, stop_tokens=(),
                              reduction="token_mean", grad_clip=1.0)
  base_hyper = step_lib.Hyper(learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.01)
  spec, hyper, holds = variant_settings(name, base_spec, base_hyper, lora_rank, mini_batches)
  tx = step_lib.rl_optimizer(hyper, spec)
  if holds == "adapters":
    trainable = lora.init_adapters(jax.random.key(_SEED.value + 3), params, spec.lora)
    frozen = step_lib.Frozen(base=params)
  else:
    trainable = params
    frozen = step_lib.Frozen(reference=params) if name == "kl" else None
  maxrl = estimators.get_advantage_fn("maxrl")
  advantage_fn = lambda r, h: maxrl(r)
  init = jax.jit(lambda p: step_lib.init_state(p, tx))
  temperature = jnp.float32(1.0)
  key = jax.random.key(_SEED.value + 2)
  facts: dict[str, Any] = {"optimizer_updates": spec.updates_per_step,
                           "trainable_params": int(sum(x.size for x in jax.tree_util.tree_leaves(trainable)))}

  rl_step = jax.jit(lambda s, g, k, t, f: step_lib.rl_step(
      spec, model_fns, s, g, k, t, hyper, prompt_fn=maze.encode_prompts, verifier=maze.verify_groups,
      advantage_fn=advantage_fn, frozen=f), donate_argnums=0)
  start = time.perf_counter()
  compiled = rl_step.lower(init(trainable), grids, key, temperature, frozen).compile()
  facts["step_compile_s"] = round(time.perf_counter() - start, 2)
  state = [init(trainable)]
  keys = [key]

  def step():
    keys[0] = jax.random.fold_in(keys[0], 1)
    state[0], metrics = compiled(state[0], grids, keys[0], temperature, frozen)
    return metrics

  prompts = maze.encode_prompts(grids)
  policy_fns, policy = step_lib.sampling_policy(spec, model_fns, trainable, frozen)
  rollouts = jax.jit(lambda p: sampling.sample_rollouts(policy_fns, p, prompts, key, num_rollouts=num_samples,
                                                        max_new_tokens=new_tokens, stop_tokens=()))(policy)
  update = jax.jit(lambda s, r, f: step_lib.update(spec, model_fns, s, prompts, rollouts, r, temperature, hyper,
                                                   advantage_fn=advantage_fn, frozen=f), donate_argnums=0)
  start = time.perf_counter()
  update_compiled = update.lower(init(trainable), rewards, frozen).compile()
  facts["update_compile_s"] = round(time.perf_counter() - start, 2)
  analysis = update_compiled.memory_analysis()
  if analysis is not None:
    facts["update_temp_bytes"] = int(analysis.temp_size_in_bytes)
  ustate = [init(trainable)]

  def update_step():
    ustate[0], metrics = update_compiled(ustate[0], rewards, frozen)
    return metrics

  jax.block_until_ready(step())  # Warm-up.
  jax.block_until_ready(update_step())
  return facts, step, update_step


def time_round_robin(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict]:
  """`repeats` rounds, each timing every call once in turn, so that a load that drifts on a shared machine
  weighs on every variant alike; per call: times, median, process CPU time, load before and after."""
  times = {name: [] for name in calls}
  cpu_times = {name: [] for name in calls}
  load_before = _load()
  for _ in range(repeats):
    for name, fn in calls.items():
      start, cpu_start = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
      cpu_times[name].append(time.process_time() - cpu_start)
  load_after = _load()
  return {name: {"times_s": [round(t, 4) for t in times[name]], "median_s": round(statistics.median(times[name]), 4),
                 "process_cpu_median_s": round(statistics.median(cpu_times[name]), 4),
                 "load_before": load_before, "load_after": load_after} for name in calls}


def main(argv):
  del argv
  config = decoder.DecoderConfig(**MODELS[_MODEL.value], dtype=_DTYPE.value,
                                 max_positions=_MAZE_SIZE.value * (_MAZE_SIZE.value + 1) + 4 + _NEW_TOKENS.value)
  model_fns = decoder.DecoderFns(config)
  params = model_fns.init(jax.random.key(_SEED.value))
  grids = maze.generate_mazes(jax.random.key(_SEED.value + 1), _NUM_PROMPTS.value, _MAZE_SIZE.value)
  rewards = jax.random.bernoulli(jax.random.key(_SEED.value + 4), 0.3,
                                 (_NUM_PROMPTS.value, _NUM_SAMPLES.value)).astype(jnp.float32)
  report: dict[str, Any] = {
      "hardware": _hardware(),
      "setup": {"model": _MODEL.value, "params": decoder.count_params(config), "dtype": _DTYPE.value,
                "num_prompts": _NUM_PROMPTS.value, "num_samples": _NUM_SAMPLES.value,
                "prompt_len": _MAZE_SIZE.value * (_MAZE_SIZE.value + 1) + 4, "new_tokens": _NEW_TOKENS.value,
                "lora_rank": _LORA_RANK.value, "ppo_mini_batches": _PPO_MINI_BATCHES.value, "repeats": _REPEATS.value},
      "variants": {}}
  steps, updates = {}, {}
  for name in _VARIANTS.value:
    report["variants"][name], steps[name], updates[name] = prepare_variant(
        name, model_fns, params, grids, rewards, num_samples=_NUM_SAMPLES.value, new_tokens=_NEW_TOKENS.value,
        lora_rank=_LORA_RANK.value, mini_batches=_PPO_MINI_BATCHES.value)
  for part, calls in (("step", steps), ("update", updates)):
    for name, timing in time_round_robin(calls, _REPEATS.value).items():
      report["variants"][name][part] = timing
  plain = report["variants"].get("plain")
  if plain:
    for name, result in report["variants"].items():
      result["step_over_plain"] = round(result["step"]["median_s"] / plain["step"]["median_s"], 3)
      result["update_over_plain"] = round(result["update"]["median_s"] / plain["update"]["median_s"], 3)
      result["update_cpu_over_plain"] = round(
          result["update"]["process_cpu_median_s"] / plain["update"]["process_cpu_median_s"], 3)
  text = json.dumps(report, indent=1)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
