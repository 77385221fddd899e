r"""Maze objective comparison (the paper's maze table): every objective from one shared SFT policy.

    python -m experiments.maze_objectives --config=configs/maze_objectives.py:cpu --workdir=/tmp/abl/objectives
    python -m experiments.maze_objectives --config=configs/maze_objectives.py:paper --workdir=gs://.../objectives

Same hyperparameters for every objective (as in the paper); only the advantage rule changes.
"""

import ml_collections

from configs import maze


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "cpu"
  cfg = ml_collections.ConfigDict()
  cfg.preset = preset
  if preset == "cpu":
    cfg.base = maze.get_config("default")
    cfg.base.rl.steps = 100
    cfg.base.eval.every_steps = 50
    cfg.base.progress_bar = False
    cfg.seeds = (0, 1, 2)
    pkpo_k, maclaurin_order = 4, 4  # Both < N = 16.
  elif preset == "paper":
    cfg.base = maze.get_config("paper")
    cfg.seeds = (0, 1, 2)
    pkpo_k, maclaurin_order = 16, 16  # Paper's PKPO used k = 16 with N = 128.
  elif preset == "tiny":  # Tests.
    cfg.base = maze.get_config("tiny")
    cfg.seeds = (0,)
    pkpo_k, maclaurin_order = 2, 2
  else:
    raise ValueError(f"Unknown preset {preset!r}; allowed: cpu, paper, tiny.")

  # name -> nested overrides of cfg.base. Baselines of the paper's table included.
  cfg.variants = ml_collections.ConfigDict({
      "maxrl": {"objective": {"name": "maxrl"}},
      "grpo": {"objective": {"name": "grpo"}},
      "grpo_entropy": {"objective": {"name": "grpo", "entropy_coef": 0.01}},
      "rloo": {"objective": {"name": "rloo"}},
      "pkpo": {"objective": {"name": "pkpo", "k": pkpo_k}},
      "diff_smoothing": {"objective": {"name": "grpo", "smoothing_gamma": 0.05}},
      "self": {"objective": {"name": "grpo", "self_filter": True}},
      "maclaurin": {"objective": {"name": "maclaurin", "order": maclaurin_order}},
  })
  # Order of the tables and plots (a ConfigDict lists its keys alphabetically): MaxRL, then the paper's
  # baselines. Every variant appears once.
  cfg.variant_order = ("maxrl", "grpo", "grpo_entropy", "rloo", "pkpo", "diff_smoothing", "self", "maclaurin")
  return cfg
