"""Shared machinery of the ablations: named runs under one workdir, resumed by name, aggregated over seeds.

A run is `<workdir>/runs/<name>`; a finished run (its summary.json reports the configured number of RL
steps) is never redone, an unfinished one resumes from its checkpoints. The RL runs of an ablation with the
same seed start from one SFT policy, trained once per seed in `<workdir>/sft/seed<s>` (so objectives are
compared from the same start, and seeds differ in their SFT as well as their RL).
"""

from __future__ import annotations

import copy
import json
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import ml_collections
import numpy as np

from maxrl_jax import config_fields
from maxrl_jax import run_logging
from maxrl_jax import train
from maxrl_jax.rl import population as population_lib


def enable_compilation_cache(workdir: str) -> None:
  """Reuse compiled step functions across the runs of an ablation (same shapes, new closures): in
  <workdir>/.jax_cache, or in the cache that JAX_COMPILATION_CACHE_DIR names."""
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_compilation_cache_dir", os.path.join(workdir, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def with_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides ({"objective.name": "grpo", "seed": 1})."""
  return config_fields.with_overrides(config, overrides)


def count(n: int, noun: str) -> str:
  """count(1, "seed") -> "1 seed"; count(3, "seed") -> "3 seeds"."""
  return f"{n} {noun}" + ("" if n == 1 else "s")


def is_finished(run_dir: str, rl_steps: int) -> bool:
  path = os.path.join(run_dir, "summary.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return json.load(f).get("rl_steps") == rl_steps


def read_summary(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "summary.json")) as f:
    return json.load(f)


def read_metrics(run_dir: str) -> list[dict]:
  return run_logging.MetricsWriter(run_dir).read()


def train_shared_sft(base: ml_collections.ConfigDict, workdir: str, seed: int) -> str:
  """Trains (or finds) the SFT policy of one seed, shared by every run of that seed; returns its workdir."""
  sft_dir = os.path.join(workdir, "sft", f"seed{seed}")
  if not is_finished(sft_dir, 0):
    print(f"[sft seed {seed}] {base.sft.steps} SFT steps -> {sft_dir}", flush=True)
    train.train_and_evaluate(with_overrides(base, {"rl.steps": 0, "seed": seed}), sft_dir)
  return sft_dir


def build_run_configs(base: ml_collections.ConfigDict,
                      runs: Mapping[str, Mapping[str, Any]]) -> dict[str, ml_collections.ConfigDict]:
  """{name: base with the run's overrides}, every one checked by train.validate_config.

  Called before anything trains, so a bad override in run 40 of a sweep fails at once, naming the run.
  """
  configs = {}
  for name, overrides in runs.items():
    config = with_overrides(base, overrides)
    try:
      train.validate_config(config)
    except ValueError as e:
      raise ValueError(f"run {name!r}: {e}") from e
    configs[name] = config
  return configs


def population_groups(runs: Mapping[str, Mapping[str, Any]]) -> list[tuple[dict, dict[str, dict], list[int]]]:
  """Splits `seed_runs` output into populations: [(shared overrides, {variant: member overrides}, seeds)].

  Runs whose overrides outside population.MEMBER_FIELDS (and the seed) are equal form one population, whose
  members are its variants x seeds (e.g. the rollout-scaling study: one population per N). Raises a
  ValueError when a group is not a full variants x seeds table.
  """
  groups: dict[str, tuple[dict, dict[str, dict], list[int]]] = {}
  for name, overrides in runs.items():
    variant, _, _ = name.rpartition("/")
    if not variant or "seed" not in overrides:
      raise ValueError(f"run {name!r}: populations need runs named <variant>/seed<s> with a seed (seed_runs).")
    member = {k: v for k, v in overrides.items() if k in population_lib.MEMBER_FIELDS}
    shared = {k: v for k, v in overrides.items() if k not in population_lib.MEMBER_FIELDS and k != "seed"}
    group = groups.setdefault(json.dumps(shared, sort_keys=True), (shared, {}, []))
    if group[1].setdefault(variant, member) != member:
      raise ValueError(f"run {name!r}: the seeds of variant {variant!r} have different overrides.")
    if overrides["seed"] not in group[2]:
      group[2].append(overrides["seed"])
  for shared, variants, seeds in groups.values():
    expected = {f"{v}/seed{s}" for v in variants for s in seeds}
    if not expected <= set(runs):
      raise ValueError(f"the runs with {shared or 'no other overrides'} are not every variant x seed "
                       f"({sorted(expected - set(runs))[:3]} missing); run them with population=False.")
  return list(groups.values())


def population_config(base: ml_collections.ConfigDict, shared: Mapping[str, Any], variants: Mapping[str, dict],
                      seeds: Iterable[int]) -> ml_collections.ConfigDict:
  """`base` with the shared overrides and a population block of the variants (labels) x seeds."""
  config = with_overrides(base, shared)
  entries = []
  for variant, member in variants.items():
    fields = ", ".join(f"{k}={v!r}" for k, v in member.items())
    entries.append(f"{variant}: {fields}" if fields else variant)
  config.population.objectives = tuple(entries)
  config.population.seeds = tuple(seeds)
  return config


def run_populations(base: ml_collections.ConfigDict, workdir: str,
                    runs: Mapping[str, Mapping[str, Any]]) -> dict[str, dict]:
  """Trains `runs` as populations (one per `population_groups` group) and returns {name: member summary}.

  A group trains in <workdir>/populations/<its shared overrides, or "all">; every member's single-run view
  (maxrl_jax/trainers/rl.py: export_members) is linked as <workdir>/runs/<variant>/seed<s>, so reports
  read populations and separate runs alike.
  """
  groups = population_groups(runs)
  configs = []
  for shared, variants, seeds in groups:
    config = population_config(base, shared, variants, seeds)
    train.validate_config(config)  # Every member checked before anything trains.
    name = ",".join(f"{k}={v}" for k, v in sorted(shared.items())) or "all"
    configs.append((name, config, variants, seeds))
  enable_compilation_cache(workdir)
  start = time.time()
  summaries = {}
  for i, (name, config, variants, seeds) in enumerate(configs):
    pop_dir = os.path.join(workdir, "populations", name)
    print(f"[{i + 1}/{len(configs)}] population {name}: {len(variants)} variants x {count(len(seeds), 'seed')} "
          f"({time.time() - start:.0f} s into this launch)", flush=True)
    train.train_and_evaluate(config, pop_dir)
    for variant in variants:
      for seed in seeds:
        link = os.path.join(workdir, "runs", variant, f"seed{seed}")
        target = os.path.abspath(os.path.join(pop_dir, "members", variant, f"seed{seed}"))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        if os.path.islink(link):
          os.remove(link)
        elif os.path.exists(link):
          raise ValueError(f"{link} holds a separate run; use another workdir for the population, or run "
                           "this ablation with population=False.")
        os.symlink(target, link)
        summaries[f"{variant}/seed{seed}"] = read_summary(link)
  return {name: summaries[name] for name in runs}


def run_all(base: ml_collections.ConfigDict, workdir: str, runs: Mapping[str, Mapping[str, Any]],
            share_sft: bool = True, population: bool = False) -> dict[str, dict]:
  """Runs every named variant (overrides of `base`) unless finished; returns {name: summary}.

  population=True: as populations, one jitted program per table (`run_populations`); otherwise one run
  after another, each seed's SFT shared through `sft.init_from`.
  """
  if population:
    return run_populations(base, workdir, runs)
  configs = build_run_configs(base, runs)
  enable_compilation_cache(workdir)
  os.makedirs(workdir, exist_ok=True)
  summaries, start = {}, time.time()
  for i, (name, config) in enumerate(configs.items()):
    if share_sft:  # Trained when the first run of its seed needs it.
      sft_dir = train_shared_sft(base, workdir, config.seed)
      config = with_overrides(config, {"sft.init_from": os.path.abspath(sft_dir)})
    run_dir = os.path.join(workdir, "runs", name)
    if is_finished(run_dir, config.rl.steps):
      print(f"[{i + 1}/{len(runs)}] {name}: finished, skipped", flush=True)
    else:
      print(f"[{i + 1}/{len(runs)}] {name} ({time.time() - start:.0f} s into this launch)", flush=True)
      train.train_and_evaluate(config, run_dir)
    summaries[name] = read_summary(run_dir)
  return summaries


def seed_runs(variants: Mapping[str, Mapping[str, Any]], seeds: Iterable[int]) -> dict[str, dict]:
  """{variant/seed<s>: overrides + seed} for every variant and seed, seed by seed (so a partly finished
  ablation has every variant of its first seeds)."""
  return {f"{name}/seed{seed}": {**overrides, "seed": seed} for seed in seeds
          for name, overrides in variants.items()}


def aggregate(values: list[float]) -> dict[str, float]:
  """Mean, sample std and standard error over seeds."""
  arr = np.asarray(values, np.float64)
  std = float(arr.std(ddof=1)) if len(arr) > 1 else 0.0
  return {"mean": float(arr.mean()), "std": std, "sem": std / np.sqrt(len(arr)), "n": len(arr)}


def eval_curves(run_dir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of an eval metric over a run."""
  records = [r for r in read_metrics(run_dir) if r.get("phase") == "eval"]
  return np.array([r["step"] for r in records]), np.array([r[key] for r in records])


def train_curves(run_dir: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  records = [r for r in read_metrics(run_dir) if r.get("phase") == "rl"]
  return np.array([r["step"] for r in records]), np.array([r[key] for r in records])


def write_results(workdir: str, payload: dict, markdown: str) -> None:
  run_logging.write_json_atomic(os.path.join(workdir, "results.json"), payload)
  run_logging.write_text_atomic(os.path.join(workdir, "results.md"), markdown + "\n")
  print(markdown, flush=True)


def seed_table(summaries: Mapping[str, dict], variants: Iterable[str], seeds: Iterable[int],
               metric_keys: list[str], label: Callable[[str], str] = str) -> tuple[list[dict], str]:
  """Rows {variant, metric: mean ± std} over seeds, and the markdown table."""
  rows, seeds = [], list(seeds)
  for name in variants:
    row = {"variant": name}
    for key in metric_keys:
      vals = [summaries[f"{name}/seed{s}"]["eval"][key] for s in seeds]
      row[key] = aggregate(vals)
    rows.append(row)
  header = "| variant | " + " | ".join(metric_keys) + " |"
  lines = [header, "|" + "---|" * (len(metric_keys) + 1)]
  for row in rows:
    cells = [f"{row[k]['mean']:.3f} ± {row[k]['std']:.3f}" for k in metric_keys]
    lines.append(f"| {label(row['variant'])} | " + " | ".join(cells) + " |")
  return rows, "\n".join(lines)


def launch(run: Callable[[ml_collections.ConfigDict, str], Any], default_config: str) -> None:
  """The command line of an ablation module: --config (a config file) and --workdir, then run(config, workdir).

  Flags are defined here, when a module runs as a script, not at import, so that tests and other code can
  import several experiment modules at once.
  """
  from absl import app, flags, logging
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", default_config, "Ablation config.")
  flags.DEFINE_string("workdir", None, "Where the runs, results and plots go.", required=True)

  def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(main)
