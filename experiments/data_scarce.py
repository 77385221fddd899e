r"""Data-scarce maze regime: maxrl, grpo, rloo on a fixed training set for many epochs.

    python -m experiments.data_scarce --config=configs/data_scarce.py:cpu --workdir=/tmp/abl/data_scarce

Writes <workdir>/results.{json,md} (final and best held-out pass@k, mean ± std over seeds) and
epochs.png (held-out pass@1 and the largest pass@k against the epoch).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402


def run_variants(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{objective: overrides of config.base}, in table order."""
  return {obj: {"objective.name": obj} for obj in config.objectives}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  seeds = list(config.seeds)
  variants = run_variants(config)
  objectives = list(variants)
  summaries = common.run_all(config.base, workdir, common.seed_runs(variants, seeds),
                             population=config.get("as_population", True))
  base = config.base
  steps_per_epoch = base.maze.train_examples // base.rollout.num_prompts
  k_max = max(base.eval.ks)
  keys = ["pass@1", f"pass@{k_max}"]
  rows, table = common.seed_table(summaries, objectives, seeds, keys + ["fraction_solved"])
  # Peak (over evaluations) of each seed's curve, then mean over seeds: where each objective peaks.
  peaks = []
  for obj in objectives:
    row = {"variant": obj}
    for key in keys:
      curves = [common.eval_curves(f"{workdir}/runs/{obj}/seed{s}", key) for s in seeds]
      best = [c[1].max() for c in curves]
      at = [c[0][c[1].argmax()] / steps_per_epoch for c in curves]
      row[f"best {key}"] = common.aggregate(best)
      row[f"epoch of best {key}"] = common.aggregate(at)
    peaks.append(row)
  peak_lines = ["| variant | " + " | ".join(k for k in peaks[0] if k != "variant") + " |",
                "|" + "---|" * len(peaks[0])]
  for row in peaks:
    peak_lines.append(f"| {row['variant']} | " + " | ".join(
        f"{v['mean']:.1f} ± {v['std']:.1f}" if k.startswith("epoch") else f"{v['mean']:.3f} ± {v['std']:.3f}"
        for k, v in row.items() if k != "variant") + " |")
  title = (f"Data-scarce: {base.maze.train_examples} fixed training mazes {base.maze.size}x{base.maze.size}, "
           f"{base.rollout.num_prompts} prompts x {base.rollout.num_samples} rollouts, "
           f"{base.rl.steps // steps_per_epoch} epochs, {common.count(len(seeds), 'seed')}")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, keys):
    for obj in objectives:
      curves = [common.eval_curves(f"{workdir}/runs/{obj}/seed{s}", key) for s in seeds]
      mean = np.mean([c[1] for c in curves], 0)
      std = np.std([c[1] for c in curves], 0, ddof=1) if len(curves) > 1 else np.zeros_like(mean)  # as the tables
      epochs = curves[0][0] / steps_per_epoch
      ax.plot(epochs, mean, marker=".", label=obj)
      ax.fill_between(epochs, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"held-out {key}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(f"{workdir}/epochs.png", dpi=110)
  plt.close(fig)
  markdown = "\n".join([f"### {title}", "", "Final evaluation, mean ± std over seeds:", "", table, "",
                        "Best evaluation over training and the epoch where it happened:", "",
                        "\n".join(peak_lines), ""])
  payload = {"title": title, "rows": rows, "peaks": peaks, "plots": ["epochs.png"]}
  common.write_results(workdir, payload, markdown)
  return payload


if __name__ == "__main__":
  common.launch(run, "configs/data_scarce.py:cpu")
