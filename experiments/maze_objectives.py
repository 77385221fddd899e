r"""Maze objective comparison: maxrl, grpo, grpo+entropy, rloo, pkpo, differential smoothing, SELF, maclaurin.

    python -m experiments.maze_objectives --config=configs/maze_objectives.py:cpu --workdir=/tmp/abl/objectives

Writes <workdir>/results.{json,md} (held-out pass@k, mean ± std over seeds) and plots: pass@k against k
(log axis) and the training curves (train pass rate, fraction of prompts solved).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402

# Paper's maze table (17x17, 32 prompts x 128 rollouts, 20K steps): pass@1 / pass@128 / pass@256.
PAPER_MAZE_TABLE = {
    "grpo": (39.6, 42.4, 43.0), "grpo_entropy": (47.2, 53.4, 54.0), "pkpo": (74.5, 77.6, 77.9),
    "self": (46.1, 86.3, 87.5), "diff_smoothing": (50.0, 57.8, 58.7), "maxrl": (84.4, 92.0, 94.3),
}


def plot_pass_at_k(summaries, variants, seeds, ks, path, title):
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for name in variants:
    means = [np.mean([summaries[f"{name}/seed{s}"]["eval"][f"pass@{k}"] for s in seeds]) for k in ks]
    ax.plot(ks, means, marker="o", label=name)
  sft = np.mean([[summaries[f"{variants[0]}/seed{s}"]["sft_eval"][f"pass@{k}"] for k in ks] for s in seeds], 0)
  ax.plot(ks, sft, "k--", label="SFT policy")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("k")
  ax.set_ylabel("held-out pass@k")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_training(workdir, variants, seeds, path, keys=("pass_rate", "fraction_solved")):
  fig, axes = plt.subplots(1, len(keys), figsize=(6 * len(keys), 4))
  for ax, key in zip(np.atleast_1d(axes), keys):
    for name in variants:
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


def run_variants(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{variant: dotted overrides of config.base} in config.variant_order."""
  order = list(config.variant_order)
  if sorted(order) != sorted(config.variants.keys()):
    raise ValueError(f"config.variant_order={tuple(order)} must list each of config.variants once: "
                     f"{sorted(config.variants.keys())}.")
  return {name: common.flatten(config.variants[name]) for name in order}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  planned = run_variants(config)
  variants = list(planned)
  seeds = list(config.seeds)
  runs = common.seed_runs(planned, seeds)
  summaries = common.run_all(config.base, workdir, runs)
  ks = list(config.base.eval.ks)
  keys = [f"pass@{k}" for k in ks] + ["fraction_solved"]
  rows, table = common.seed_table(summaries, variants, seeds, keys)
  sft = common.aggregate([summaries[f"{variants[0]}/seed{s}"]["sft_eval"]["pass@1"] for s in seeds])
  base = config.base
  title = (f"Maze objectives: {base.maze.size}x{base.maze.size}, {base.rollout.num_prompts} prompts x "
           f"{base.rollout.num_samples} rollouts, {base.rl.steps} RL steps, {common.count(len(seeds), 'seed')}")
  plot_pass_at_k(summaries, variants, seeds, ks, f"{workdir}/pass_at_k.png", title)
  plot_training(workdir, variants, seeds, f"{workdir}/training_curves.png")
  markdown = "\n".join([
      f"### {title}", "",
      f"Held-out: {base.eval.num_mazes} mazes x {base.eval.num_samples} samples; mean ± std over seeds. "
      f"SFT policy pass@1 = {sft['mean']:.3f}.", "", table, ""])
  payload = {"title": title, "rows": rows, "sft_pass@1": sft, "variants": config.variants.to_dict(),
             "paper_maze_table": PAPER_MAZE_TABLE, "plots": ["pass_at_k.png", "training_curves.png"]}
  common.write_results(workdir, payload, markdown)
  return payload


if __name__ == "__main__":
  common.launch(run, "configs/maze_objectives.py:cpu")
