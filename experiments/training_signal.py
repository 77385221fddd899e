r"""Training signal of each objective on mazes.

    python -m experiments.training_signal --config=configs/training_signal.py:cpu --workdir=/tmp/abl/signal \
        --config.objectives_workdir=/tmp/abl/objectives

1. Fraction of training prompts with at least one correct rollout (prompts with K = 0 give MaxRL and GRPO
   no gradient), per objective, from the objective comparison's metrics.
2. Per-prompt gradient L2 norm against the prompt's pass rate K/N, on the shared SFT policy, for each
   objective's advantages on the same rollouts (`estimators.per_prompt_gradient_norms`).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from experiments import common  # noqa: E402
from maxrl_jax import estimators  # noqa: E402
from maxrl_jax import sampling  # noqa: E402
from maxrl_jax.tasks.maze import env as maze  # noqa: E402
from maxrl_jax.trainers import rl as rl_trainer  # noqa: E402


def gradient_norms(base, sft_dir, objectives, num_prompts, num_samples, chunk, seed, sft_phase="sft"):
  """{objective: (pass rates [P], gradient norms [P])} on fresh mazes, same rollouts for every objective."""
  model_fns, params = rl_trainer.load_sft_params(base, sft_dir, sft_phase)
  key = jax.random.key(seed)
  grids = maze.generate_mazes(jax.random.fold_in(key, 0), num_prompts, base.maze.size)
  prompts = maze.encode_prompts(grids)
  rollouts = sampling.sample_rollouts(
      model_fns, params, prompts, jax.random.fold_in(key, 1), num_rollouts=num_samples,
      max_new_tokens=base.rollout.max_new_tokens, stop_tokens=(maze.DONE, maze.EOS))
  rewards = maze.verify_groups(grids, rollouts.tokens)  # [P, N]

  def loss_fn(params, example):
    logprobs = sampling.sequence_logprobs_shared_prefix(
        model_fns, params, example["prompt"][None], example["tokens"][None])
    return estimators.policy_gradient_loss(logprobs, example["mask"][None], example["advantages"][None])

  norms_fn = jax.jit(lambda params, batch: estimators.per_prompt_gradient_norms(loss_fn, params, batch))
  out = {}
  for name in objectives:
    advantages = estimators.get_advantage_fn(name)(rewards)
    norms = []
    for i in range(0, num_prompts, chunk):
      batch = {"prompt": prompts[i:i + chunk], "tokens": rollouts.tokens[i:i + chunk],
               "mask": rollouts.mask[i:i + chunk], "advantages": advantages[i:i + chunk]}
      norms.append(norms_fn(params, batch))
    out[name] = (np.asarray(jnp.mean(rewards, -1)), np.asarray(jnp.concatenate(norms)))
  return out


def sft_source(src: str, seed: int) -> tuple[str, str, str]:
  """(workdir, checkpoint phase, config.json) of the SFT policy of `seed` in an objective ablation `src`.

  One run after another keeps it in <src>/sft/seed<s>; a population in checkpoints/sft_seed<s> of the
  population that trained the seed (found through a member's summary).
  """
  sft_dir = os.path.join(src, "sft", f"seed{seed}")
  if os.path.exists(os.path.join(sft_dir, "config.json")):
    return sft_dir, "sft", os.path.join(sft_dir, "config.json")
  runs_dir = os.path.join(src, "runs")
  for variant in sorted(os.listdir(runs_dir)) if os.path.isdir(runs_dir) else []:
    member_dir = os.path.join(runs_dir, variant, f"seed{seed}")
    if os.path.exists(os.path.join(member_dir, "summary.json")):
      member = common.read_summary(member_dir).get("population_member")
      if member:
        return member["population_workdir"], f"sft_seed{seed}", os.path.join(member_dir, "config.json")
  raise ValueError(f"{src} holds no SFT policy of seed {seed}: config.seed={seed} must be one of the seeds of "
                   f"the objective ablation in {src}.")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  src = config.objectives_workdir
  if not src or not os.path.exists(os.path.join(src, "results.json")):
    raise ValueError(f"config.objectives_workdir={src!r} must be a finished experiments.maze_objectives "
                     "workdir (with results.json); run that ablation first.")
  os.makedirs(workdir, exist_ok=True)
  sft_dir, sft_phase, base_config = sft_source(src, config.seed)
  with open(base_config) as f:
    base = ml_collections.ConfigDict(json.load(f))
  base.eval.ks = tuple(base.eval.ks)
  base.population.objectives, base.population.seeds, base.population.sweep = (), (), ()

  # 1. Fraction solved during training, per objective (mean over seeds).
  runs_dir = os.path.join(src, "runs")
  with open(os.path.join(src, "results.json")) as f:
    listed = [row["variant"] for row in json.load(f)["rows"]]  # the objective table's order
  variants = [v for v in listed if os.path.isdir(os.path.join(runs_dir, v))]
  fig, ax = plt.subplots(figsize=(7, 4.2))
  solved = {}
  for name in variants:
    seeds = sorted(os.listdir(os.path.join(runs_dir, name)))
    curves = [common.train_curves(os.path.join(runs_dir, name, s), "fraction_solved") for s in seeds]
    mean = np.mean([c[1] for c in curves], 0)
    solved[name] = {"mean_over_training": float(mean.mean()), "final_interval": float(mean[-1])}
    ax.plot(curves[0][0], mean, label=name)
  ax.set_xlabel("RL step")
  ax.set_ylabel("fraction of prompts with >= 1 correct rollout")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "fraction_solved.png"), dpi=110)
  plt.close(fig)

  # 2. Per-prompt gradient norm against pass rate.
  objectives = list(config.objectives)
  norms = gradient_norms(base, sft_dir, objectives, config.num_prompts, config.num_samples,
                         config.prompt_chunk, config.seed, sft_phase)
  fig, axes = plt.subplots(1, len(objectives), figsize=(3.6 * len(objectives), 3.4), sharex=True)
  binned = {}
  for ax, name in zip(np.atleast_1d(axes), objectives):
    p, g = norms[name]
    ax.scatter(p, g, s=9, alpha=0.6)
    ax.set_title(name)
    ax.set_xlabel("prompt pass rate K/N")
    ax.grid(alpha=0.3)
    edges = [0.0, 1e-9, 0.25, 0.5, 0.75, 1.0 - 1e-9, 1.0]
    labels = ["0", "(0,.25)", "[.25,.5)", "[.5,.75)", "[.75,1)", "1"]
    idx = np.digitize(p, edges[1:-1], right=False)
    binned[name] = {lab: (float(g[idx == i].mean()) if np.any(idx == i) else None) for i, lab in enumerate(labels)}
  np.atleast_1d(axes)[0].set_ylabel("per-prompt gradient L2 norm")
  fig.suptitle(f"Gradient norm vs pass rate on the SFT policy ({config.num_prompts} mazes x "
               f"{config.num_samples} rollouts)", fontsize=10)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "grad_norm_vs_pass_rate.png"), dpi=110)
  plt.close(fig)

  lines = ["### Training signal", "", "Fraction of training prompts with at least one correct rollout "
           "(mean over seeds):", "", "| objective | mean over training | last interval |", "|---|---|---|"]
  lines += [f"| {n} | {v['mean_over_training']:.3f} | {v['final_interval']:.3f} |" for n, v in solved.items()]
  labels = list(next(iter(binned.values())).keys())
  lines += ["", "Mean per-prompt gradient norm by pass-rate bin (SFT policy, same rollouts):", "",
            "| objective | " + " | ".join(f"p={l}" for l in labels) + " |", "|" + "---|" * (len(labels) + 1)]
  for name, bins in binned.items():
    lines.append(f"| {name} | " + " | ".join("-" if v is None else f"{v:.3g}" for v in bins.values()) + " |")
  payload = {"fraction_solved": solved, "grad_norm_by_pass_rate": binned,
             "plots": ["fraction_solved.png", "grad_norm_vs_pass_rate.png"]}
  common.write_results(workdir, payload, "\n".join(lines) + "\n")
  return payload


if __name__ == "__main__":
  common.launch(run, "configs/training_signal.py:cpu")
