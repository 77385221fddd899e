r"""Rollout scaling: maxrl, grpo, rloo at N rollouts per prompt, a fixed prompt batch, shared SFT policy.

    python -m experiments.rollout_scaling --config=configs/rollout_scaling.py:cpu --workdir=/tmp/abl/scaling

Writes <workdir>/results.{json,md} and scaling.png (held-out pass@1 and the largest pass@k against N,
mean ± std over seeds).
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402


def run_variants(config: ml_collections.ConfigDict) -> dict[str, dict]:
  """{"<objective>_N<n>": overrides of config.base} for every objective and N, in table order."""
  return {f"{obj}_N{n}": {"objective.name": obj, "rollout.num_samples": n}
          for obj in config.objectives for n in config.num_samples}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  seeds = list(config.seeds)
  variants = run_variants(config)
  ns, objectives = list(config.num_samples), list(config.objectives)
  summaries = common.run_all(config.base, workdir, common.seed_runs(variants, seeds),
                             population=config.get("as_population", True))
  k_max = max(config.base.eval.ks)
  keys = ["pass@1", f"pass@{k_max}", "fraction_solved"]
  rows, table = common.seed_table(summaries, list(variants), seeds, keys)
  base = config.base
  title = (f"Rollout scaling: {base.maze.size}x{base.maze.size}, {base.rollout.num_prompts} prompts x N, "
           f"{base.rl.steps} RL steps, {common.count(len(seeds), 'seed')}")
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, keys[:2]):
    for obj in objectives:
      stats = [common.aggregate([summaries[f"{obj}_N{n}/seed{s}"]["eval"][key] for s in seeds]) for n in ns]
      ax.errorbar(ns, [x["mean"] for x in stats], yerr=[x["std"] for x in stats], marker="o", capsize=3,
                  label=obj)
    sft = np.mean([summaries[f"{objectives[0]}_N{ns[0]}/seed{s}"]["initial_eval"][key] for s in seeds])
    ax.axhline(sft, color="k", ls="--", lw=1, label="SFT policy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rollouts per prompt N")
    ax.set_ylabel(f"held-out {key}")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(f"{workdir}/scaling.png", dpi=110)
  plt.close(fig)
  markdown = "\n".join([f"### {title}", "", "Mean ± std over seeds.", "", table, ""])
  payload = {"title": title, "rows": rows, "plots": ["scaling.png"]}
  common.write_results(workdir, payload, markdown)
  return payload


if __name__ == "__main__":
  common.launch(run, "configs/rollout_scaling.py:cpu")
