r"""Rollout scaling: held-out pass@k against N (rollouts per prompt) for maxrl, grpo and rloo.

    python -m experiments.rollout_scaling --config=configs/rollout_scaling.py:cpu --workdir=/tmp/abl/scaling

The prompt batch is fixed; only N changes. The paper: 256 prompts x N for N in {4, ..., 128}, >= 9K steps,
with MaxRL > GRPO > RLOO at every N.
"""

import ml_collections

from configs import maze


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "cpu"
  cfg = ml_collections.ConfigDict()
  cfg.preset = preset
  cfg.objectives = ("maxrl", "grpo", "rloo")
  if preset == "cpu":
    cfg.base = maze.get_config("default")
    cfg.base.rollout.num_prompts = 8
    cfg.base.rl.steps = 60
    cfg.base.eval.every_steps = 30
    cfg.base.checkpoint_every_steps = 30
    cfg.base.progress_bar = False
    cfg.num_samples = (4, 16, 64)
    cfg.seeds = (0, 1, 2)
  elif preset == "paper":
    cfg.base = maze.get_config("paper")
    cfg.base.rollout.num_prompts = 256
    cfg.base.rl.steps = 9000
    cfg.num_samples = (4, 8, 16, 32, 64, 128)
    cfg.seeds = (0, 1, 2)
  elif preset == "tiny":
    cfg.base = maze.get_config("tiny")
    cfg.num_samples = (2, 4)
    cfg.seeds = (0,)
  else:
    raise ValueError(f"Unknown preset {preset!r}; allowed: cpu, paper, tiny.")
  # True: each table trains as populations (maxrl_jax/population.py), one per distinct shape; False: one run
  # after another.
  cfg.as_population = True
  return cfg
