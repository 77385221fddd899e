r"""Maze objective comparison: maxrl, grpo, grpo+entropy, rloo, pkpo, differential smoothing, SELF, maclaurin.

    python -m experiments.maze_objectives --config=configs/maze_objectives.py:cpu --workdir=/tmp/abl/objectives

Writes <workdir>/results.{json,md} (held-out pass@k, mean ± std over seeds) and plots: pass@k against k
(log axis) and the training curves (train pass rate, fraction of prompts solved).
"""

from __future__ import annotations

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from maxrl_jax import config_fields  # noqa: E402

# Paper's maze table (17x17, 32 prompts x 128 rollouts, 20K steps): pass@1 / pass@128 / pass@256.
PAPER_MAZE_TABLE = {
    "grpo": (39.6, 42.4, 43.0), "grpo_entropy": (47.2, 53.4, 54.0), "pkpo": (74.5, 77.6, 77.9),
    "self": (46.1, 86.3, 87.5), "diff_smoothing": (50.0, 57.8, 58.7), "maxrl": (84.4, 92.0, 94.3),
}


def plot_pass_at_k(summaries, seeds_of, ks, path, title):
  """Final held-out pass@k against k (log axis), mean over each variant's seeds, with the SFT policy."""
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name, seeds in seeds_of.items():
    means = [np.mean([summaries[f"{name}/seed{s}"]["eval"][f"pass@{k}"] for s in seeds]) for k in ks]
    ax.plot(ks, means, marker="o", label=f"{name} ({common.count(len(seeds), 'seed')})")
  first = next(iter(seeds_of))
  sft = np.mean([[summaries[f"{first}/seed{s}"]["initial_eval"][f"pass@{k}"] for k in ks] for s in seeds_of[first]], 0)
  ax.plot(ks, sft, "k--", label="SFT policy")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("held-out pass@k")
  ax.set_title(title, fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_training(workdir, seeds_of, path, keys=("pass_rate", "fraction_solved")):
  """Training pass rate and fraction of prompts solved against RL step, mean over each variant's seeds."""
  fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4))
  for ax, key in zip(np.atleast_1d(axes), keys):
    for name, seeds in seeds_of.items():
      curves = [common.train_curves(f"{workdir}/runs/{name}/seed{s}", key) for s in seeds]
      steps = curves[0][0]
      ax.plot(steps, np.mean([c[1] for c in curves], 0), label=name)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"train {key} (mean over seeds)")
    ax.grid(alpha=0.3)
  np.atleast_1d(axes)[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def heldout_curves(workdir, seeds_of, key):
  """{variant: (steps [E], values [seeds, E])} of a held-out metric along training (the eval records)."""
  curves = {}
  for name, seeds in seeds_of.items():
    per_seed = [common.eval_curves(f"{workdir}/runs/{name}/seed{s}", key) for s in seeds]
    steps = per_seed[0][0]
    if any(not np.array_equal(s, steps) for s, _ in per_seed):
      raise ValueError(f"{name}: the seeds were evaluated at different steps; rerun with one config.")
    curves[name] = (steps, np.stack([v for _, v in per_seed]))
  return curves


def plot_heldout_curves(workdir, seeds_of, ks, path, title):
  """Held-out pass@k against RL step, one panel per k: mean over seeds with a band of ± one sample std."""
  fig, axes = plt.subplots(1, len(ks), figsize=(4.6 * len(ks), 3.8), squeeze=False)
  for ax, k in zip(axes[0], ks):
    for name, (steps, values) in heldout_curves(workdir, seeds_of, f"pass@{k}").items():
      mean = values.mean(0)
      std = values.std(0, ddof=1) if len(values) > 1 else np.zeros_like(mean)
      (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{name} ({len(values)})")
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"held-out pass@{k}")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8, title="variant (seeds)", title_fontsize=8)
  fig.suptitle(title + "; band: ± 1 std over seeds", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _cell(agg):
  return f"{agg['mean']:.3f} ± {agg['std']:.3f}"


def final_table(summaries, seeds_of, keys):
  """Rows {variant, seeds, key: aggregate over seeds} of the final evaluation, and the markdown table."""
  rows = []
  lines = ["| variant | seeds | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
  for name, seeds in seeds_of.items():
    row = {"variant": name, "seeds": list(seeds)}
    for key in keys:
      row[key] = common.aggregate([summaries[f"{name}/seed{s}"]["eval"][key] for s in seeds])
    rows.append(row)
    lines.append(f"| {name} | {len(seeds)} | " + " | ".join(_cell(row[k]) for k in keys) + " |")
  return rows, "\n".join(lines)


def best_step_table(workdir, seeds_of, ks, select="pass@1"):
  """Each variant at its best step (the eval step with the highest mean `select` over seeds).

  Returns (rows, markdown). Choosing the step on the held-out mazes flatters every variant a little (it is
  a maximum over noisy evaluations); it shows what each objective reaches, not an unbiased final score.
  """
  rows = []
  lines = ["| variant | seeds | best step | " + " | ".join(f"pass@{k}" for k in ks) + " |",
           "|" + "---|" * (len(ks) + 3)]
  for name, seeds in seeds_of.items():
    steps, chosen = heldout_curves(workdir, {name: seeds}, select)[name]
    best = int(np.argmax(chosen.mean(0)))
    row = {"variant": name, "seeds": list(seeds), "step": int(steps[best])}
    for k in ks:
      _, values = heldout_curves(workdir, {name: seeds}, f"pass@{k}")[name]
      row[f"pass@{k}"] = common.aggregate(list(values[:, best]))
    rows.append(row)
    lines.append(f"| {name} | {len(seeds)} | {row['step']} | " + " | ".join(_cell(row[f'pass@{k}']) for k in ks)
                 + " |")
  return rows, "\n".join(lines)


def run_variants(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{variant: dotted overrides of config.base} in config.variant_order."""
  order = list(config.variant_order)
  if sorted(order) != sorted(config.variants.keys()):
    raise ValueError(f"config.variant_order={tuple(order)} must list each of config.variants once: "
                     f"{sorted(config.variants.keys())}.")
  return {name: config_fields.flatten(config.variants[name]) for name in order}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  planned = run_variants(config)
  runs = common.seed_runs(planned, list(config.seeds))
  summaries = common.run_all(config.base, workdir, runs, population=config.get("as_population", True))
  return report(config, workdir, summaries)


def finished_summaries(config: ml_collections.ConfigDict, workdir: str) -> dict[str, dict]:
  """{variant/seed<s>: summary} of the runs of `config` that have finished in `workdir` (others are left out)."""
  summaries = {}
  for name in run_variants(config):
    for seed in config.seeds:
      run_dir = os.path.join(workdir, "runs", name, f"seed{seed}")
      if common.is_finished(run_dir, config.base.rl.steps):
        summaries[f"{name}/seed{seed}"] = common.read_summary(run_dir)
  return summaries


def report(config: ml_collections.ConfigDict, workdir: str, summaries: dict[str, dict]) -> dict:
  """results.{json,md} and the plots, from finished runs (a variant may have fewer seeds than configured)."""
  seeds_of = {}
  for name in run_variants(config):
    seeds = [s for s in config.seeds if f"{name}/seed{s}" in summaries]
    if seeds:
      seeds_of[name] = seeds
  if not seeds_of:
    raise ValueError(f"{workdir} holds no finished run of this ablation yet.")
  ks = list(config.base.eval.ks)
  keys = [f"pass@{k}" for k in ks] + ["fraction_solved"]
  rows, table = final_table(summaries, seeds_of, keys)
  all_seeds = sorted({s for seeds in seeds_of.values() for s in seeds})
  first = next(iter(seeds_of))
  sft = common.aggregate([summaries[f"{first}/seed{s}"]["initial_eval"]["pass@1"] for s in seeds_of[first]])
  base = config.base
  title = (f"Maze objectives: {base.maze.size}x{base.maze.size}, {base.rollout.num_prompts} prompts x "
           f"{base.rollout.num_samples} rollouts, {base.rl.steps} RL steps, "
           f"{common.count(len(all_seeds), 'seed')}")
  plot_pass_at_k(summaries, seeds_of, ks, f"{workdir}/pass_at_k.png", title)
  plot_training(workdir, seeds_of, f"{workdir}/training_curves.png")
  plots = ["pass_at_k.png", "training_curves.png"]
  best_rows, best_table = best_step_table(workdir, seeds_of, ks)
  curve_ks = [ks[0], ks[-1]] if len(ks) > 1 else ks
  if base.rl.steps > base.eval.every_steps:  # Evaluated along the way: held-out curves with seed bands.
    plot_heldout_curves(workdir, seeds_of, curve_ks, f"{workdir}/heldout_curves.png", title)
    plots.append("heldout_curves.png")
  overlap = max(s.get("training_mazes", {}).get("all", {}).get("overlap_with_heldout", -1)
                for s in summaries.values())
  distinct = [s["training_mazes"]["all"]["distinct"] for s in summaries.values() if "training_mazes" in s]
  se = common.aggregate([s["eval"].get("pass@1_se", float("nan")) for s in summaries.values()])
  missing = [f"{n}/seed{s}" for n in run_variants(config) for s in config.seeds if f"{n}/seed{s}" not in summaries]
  markdown = "\n".join([
      f"### {title}", "",
      f"Held-out: {base.eval.num_mazes} mazes x {base.eval.num_samples} samples, never trained on (the most "
      f"held-out mazes any run trained on: {overlap}; distinct training mazes per run: "
      f"{min(distinct, default=0)}-{max(distinct, default=0)}). Mean ± std over seeds; the standard error "
      f"of one run's pass@1 over the held-out mazes is about {se['mean']:.3f}. SFT policy pass@1 = "
      f"{sft['mean']:.3f} ± {sft['std']:.3f}." + (f" Not finished yet: {', '.join(missing)}." if missing else ""),
      "", f"At the last step ({base.rl.steps}):", "", table, "",
      "At each variant's best step (highest mean held-out pass@1 over the evaluations; chosen on the "
      "held-out mazes, so slightly optimistic):", "", best_table, ""])
  payload = {"title": title, "rows": rows, "best_step_rows": best_rows, "sft_pass@1": sft,
             "max_heldout_overlap": overlap, "unfinished_runs": missing, "variants": config.variants.to_dict(),
             "paper_maze_table": PAPER_MAZE_TABLE, "plots": plots}
  common.write_results(workdir, payload, markdown)
  return payload


if __name__ == "__main__":
  common.launch(run, "configs/maze_objectives.py:cpu")
