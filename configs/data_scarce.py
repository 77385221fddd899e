r"""Data-scarce regime: a fixed small set of training mazes trained for many epochs.

    python -m experiments.data_scarce --config=configs/data_scarce.py:cpu --workdir=/tmp/abl/data_scarce

Tests the paper's finding (GSM8K) that GRPO/RLOO peak early in pass@1 and then lose pass@k, while MaxRL
keeps improving. Held-out pass@k is measured every `eval_every_epochs`.
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
    cfg.base.maze.train_data = "fixed"
    cfg.base.maze.train_examples = 64  # 4 RL steps per epoch at 16 prompts.
    cfg.base.rl.steps = 80  # 20 epochs.
    cfg.base.eval.every_steps = 8  # Every 2 epochs.
    cfg.base.checkpoint_every_steps = 40
    cfg.base.eval.num_mazes = 32
    cfg.base.eval.num_samples = 16
    cfg.base.eval.ks = (1, 4, 16)
    cfg.base.progress_bar = False
    cfg.seeds = (0, 1, 2)
  elif preset == "paper":
    cfg.base = maze.get_config("paper")
    cfg.base.maze.train_data = "fixed"
    cfg.base.maze.train_examples = 1024
    cfg.base.rl.steps = 1600  # 50 epochs at 32 prompts per step.
    cfg.base.eval.every_steps = 64
    cfg.seeds = (0, 1, 2)
  elif preset == "tiny":
    cfg.base = maze.get_config("tiny")
    cfg.base.maze.train_data = "fixed"
    cfg.base.maze.train_examples = 8
    cfg.seeds = (0,)
  else:
    raise ValueError(f"Unknown preset {preset!r}; allowed: cpu, paper, tiny.")
  # True: each table trains as populations (maxrl_jax/population.py), one per distinct shape; False: one run
  # after another.
  cfg.as_population = True
  return cfg
