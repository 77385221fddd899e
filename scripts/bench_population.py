r"""Population training cost: one jitted program for K members against K separate single runs.

    python scripts/bench_population.py                          # default maze preset, K = 1, 2, 8, 24
    python scripts/bench_population.py --preset=tiny --sizes=1,2 --steps=1    # seconds (the tests' dry run)

Members are the paper's maze table in order (maxrl, grpo, grpo_entropy, rloo, pkpo, diff_smoothing, self,
maclaurin; configs/maze_objectives.py), then the next seed: K = 1 is maxrl, 2 adds grpo, 8 is the table,
24 the table x 3 seeds. Each population's RL step is the trainer's (maxrl_jax/trainers/rl.py:
PopulationProgram), from randomly initialised policies (speed does not depend on the SFT); each distinct
objective's single-run step is the single run's (maxrl_jax.rl.step.make_rl_step with the task's maze draw),
timed the same way. "Separate runs"
for K members is the sum of their single-run step times: what running them one after another costs.

Every figure is the median over --steps timed steps after one compiled warm-up step (jax.block_until_ready
on the step's outputs). Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from configs import maze as maze_config  # noqa: E402
from configs import maze_objectives  # noqa: E402
from maxrl_jax import sharding  # noqa: E402
from maxrl_jax import train  # noqa: E402
from maxrl_jax.models import decoder  # noqa: E402
from maxrl_jax.rl import population  # noqa: E402
from maxrl_jax.rl import step as step_lib  # noqa: E402
from maxrl_jax.tasks.maze import task as maze_task  # noqa: E402
from maxrl_jax.trainers import rl as rl_trainer  # noqa: E402


def benchmark_task(config) -> maze_task.MazeTask:
  """The maze task with no held-out set (nothing is excluded from the draws; no dataset is built)."""
  task = maze_task.MazeTask(config)
  task.set_heldout(np.zeros((0, config.maze.size, config.maze.size), np.int8))
  return task


def table_entries(preset: str) -> list[str]:
  """The objective table as population entries ("label: field=value, ...")."""
  table = maze_objectives.get_config("cpu" if preset != "tiny" else "tiny")
  entries = []
  for name in table.variant_order:
    fields = ", ".join(f"objective.{k}={v!r}" for k, v in table.variants[name].objective.items())
    entries.append(f"{name}: {fields}")
  return entries


def population_config(preset: str, size: int):
  config = maze_config.get_config(preset)
  entries = table_entries(preset)
  seeds = -(-size // len(entries))
  config.population.objectives = tuple(entries[:min(size, len(entries))])
  config.population.seeds = tuple(range(seeds))
  if len(population.members(config)) != size:
    raise ValueError(f"--sizes: {size} is not 1..8 or a multiple of 8 (the table x seeds).")
  return config


def timed(fn, state, steps):
  """(median seconds per call over `steps` timed calls after one warm-up call, compile + first call s)."""
  start = time.perf_counter()
  state, out = fn(state, 0)
  jax.block_until_ready(out)
  first = time.perf_counter() - start
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, out = fn(state, i + 1)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return statistics.median(times), first


def bench_population(preset: str, size: int, steps: int, vmap_chunk: int = -1) -> dict:
  config = population_config(preset, size)
  config.population.vmap_chunk = vmap_chunk
  members = population.members(config)
  task = benchmark_task(config)
  model_fns = decoder.DecoderFns(task.model_config())
  mesh = population.make_mesh(config, len(members))
  rules = sharding.MeshConfig.from_config(config.mesh).param_rules
  spec = rl_trainer.rl_spec(config, task, mesh, members=members)
  program = rl_trainer.PopulationProgram(config, members, task, model_fns, mesh, rules, spec)
  seeds = population.distinct_seeds(members)
  sft_params = jax.vmap(model_fns.init)(jnp.stack([jax.random.key(s) for s in seeds]))
  state = program.init_rl(sft_params)
  step = program.make_device_step()
  data_keys = jnp.stack([jax.random.key(100 + m.index) for m in members])
  sampling_keys = jnp.stack([jax.random.key(200 + m.index) for m in members])
  temperature = jnp.float32(config.rollout.temperature)
  seconds, first = timed(lambda s, i: step(s, data_keys, sampling_keys, jnp.int32(i + 1), temperature), state,
                         steps)
  return {"members": size, "labels": [m.name for m in members], "mesh": sharding.describe(mesh),
          "vmap_chunk": program.chunk,
          "step_s": seconds, "per_member_s": seconds / size, "compile_and_first_step_s": first}


def bench_single(preset: str, entry: str, steps: int) -> dict:
  config = maze_config.get_config(preset)
  label, overrides = population.parse_entry(entry, "bench")
  for field, value in overrides.items():
    group, name = field.split(".")
    config[group][name] = value
  train.validate_config(config)
  task = benchmark_task(config)
  model_fns = decoder.DecoderFns(task.model_config())
  spec = rl_trainer.rl_spec(config, task, sharding.make_mesh(config.mesh))
  hyper = step_lib.hyper_from_config(config)
  rl_step = step_lib.make_rl_step(spec, model_fns, hyper, prompt_fn=task.prompts, verifier=task.verify,
                                  advantage_fn=step_lib.single_advantage_fn(config.objective))
  draw = jax.jit(task.rl_batch)
  state = step_lib.init_state(model_fns.init(jax.random.key(0)), step_lib.rl_optimizer(hyper, spec))
  temperature = jnp.float32(config.rollout.temperature)
  seconds, first = timed(lambda s, i: rl_step(s, draw(jax.random.key(100), i + 1), jax.random.key(200 + i),
                                              temperature), state, steps)
  return {"label": label, "step_s": seconds, "compile_and_first_step_s": first}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="default", help="configs/maze.py preset of every member.")
  parser.add_argument("--sizes", default="1,2,8,24", help="Population sizes K.")
  parser.add_argument("--steps", type=int, default=3, help="Timed steps per measurement (after a warm-up).")
  parser.add_argument("--out", default="", help="Also write the JSON here.")
  parser.add_argument("--vmap_chunk", type=int, default=-1,
                      help="config.population.vmap_chunk: -1 auto (all on accelerators, 1 on CPU), 0 all.")
  args = parser.parse_args(argv)
  sizes = [int(s) for s in args.sizes.split(",")]
  entries = table_entries(args.preset)
  needed = entries[:min(max(sizes), len(entries))]
  singles = {}
  for entry in needed:
    result = bench_single(args.preset, entry, args.steps)
    singles[result["label"]] = result
    print(f"[bench_population] single {result['label']}: {result['step_s']:.4f} s/step", file=sys.stderr)
  rows = []
  for size in sizes:
    row = bench_population(args.preset, size, args.steps, args.vmap_chunk)
    labels = [name.split("/")[0] for name in row["labels"]]
    row["separate_runs_step_s"] = sum(singles[label]["step_s"] for label in labels)
    row["separate_over_population"] = row["separate_runs_step_s"] / row["step_s"]
    rows.append(row)
    print(f"[bench_population] K={size}: {row['step_s']:.4f} s/step vs separate {row['separate_runs_step_s']:.4f} s",
          file=sys.stderr)
  config = maze_config.get_config(args.preset)
  device = jax.devices()[0]
  report = {
      "command": "python " + " ".join([os.path.relpath(__file__)] + list(argv if argv is not None else sys.argv[1:])),
      "setup": {"preset": args.preset, "maze_size": config.maze.size, "num_prompts": config.rollout.num_prompts,
                "num_samples": config.rollout.num_samples, "max_new_tokens": config.rollout.max_new_tokens,
                "model": {k: config.model[k] for k in ("num_layers", "hidden_size", "ffn_size", "dtype")},
                "timed_steps": args.steps},
      "device": {"platform": device.platform, "kind": device.device_kind, "count": jax.device_count()},
      "versions": {"python": platform.python_version(), "jax": jax.__version__},
      "single_runs": singles,
      "populations": rows,
  }
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return report


if __name__ == "__main__":
  main()
