r"""Maze objective comparison (the paper's maze table): every objective from one shared SFT policy.

    python -m experiments.maze_objectives --config=configs/maze_objectives.py:cpu --workdir=/tmp/abl/objectives
    python -m experiments.maze_objectives --config=configs/maze_objectives.py:long --workdir=/tmp/abl/long
    python -m experiments.maze_objectives --config=configs/maze_objectives.py:paper --workdir=/tmp/abl/paper

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
  elif preset == "gpu":
    # The whole table (8 objectives x 3 seeds = 24 members) at 9 x 9 for 2000 RL steps as one population on
    # one accelerator (the `table` part of scripts/gpu_all.sh); evaluations along the way for the curves.
    cfg.base = maze.get_config("default")
    cfg.base.progress_bar = False
    cfg.base.rl.steps = 2000
    cfg.base.eval.every_steps = 250
    cfg.base.eval.num_mazes = 256
    cfg.base.eval.num_samples = 32
    cfg.base.eval.ks = (1, 4, 16, 32)
    cfg.base.eval.prompt_chunk = 32
    cfg.base.checkpoint_every_steps = 250
    cfg.seeds = (0, 1, 2)
    pkpo_k, maclaurin_order = 4, 4  # Both < N = 16.
  elif preset in ("long", "long_tiny"):
    # The long-horizon comparison of MaxRL, GRPO and RLOO at 9 x 9: one SFT policy per seed shared by the
    # three objectives, held-out mazes never trained on, evaluations along the way for the curves.
    # long: 1000 RL steps on a CPU.
    cfg.base = maze.get_config("tiny" if preset == "long_tiny" else "default")
    cfg.base.progress_bar = False
    cfg.seeds = (0, 1, 2)
    # docs/results.md was made with one run after another; a population gives the same runs up to float
    # round-off, which over 1000 steps changes individual samples.
    cfg.as_population = preset == "long_tiny"
    if preset == "long_tiny":  # The same comparison at toy size (tests, dry runs of the GPU script).
      cfg.base.rl.steps = 4
      cfg.base.eval.every_steps = 2
    else:
      cfg.base.rl.steps = 1000
      cfg.base.eval.every_steps = 100
      cfg.base.eval.num_mazes = 256
      cfg.base.eval.num_samples = 16
      cfg.base.eval.ks = (1, 4, 16)
      cfg.base.checkpoint_every_steps = 100
    cfg.variants = ml_collections.ConfigDict({
        "maxrl": {"objective": {"name": "maxrl"}},
        "grpo": {"objective": {"name": "grpo"}},
        "rloo": {"objective": {"name": "rloo"}},
    })
    cfg.variant_order = ("maxrl", "grpo", "rloo")
    return cfg
  elif preset == "paper":
    cfg.base = maze.get_config("paper")
    cfg.seeds = (0, 1, 2)
    pkpo_k, maclaurin_order = 16, 16  # Paper's PKPO used k = 16 with N = 128.
  elif preset == "tiny":  # Tests.
    cfg.base = maze.get_config("tiny")
    cfg.seeds = (0,)
    pkpo_k, maclaurin_order = 2, 2
  else:
    raise ValueError(f"Unknown preset {preset!r}; allowed: cpu, gpu, long, paper, tiny, long_tiny.")

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
  # True: the whole table trains as one population (maxrl_jax/population.py), one jitted program; False: one
  # run after another, each seed's SFT shared through sft.init_from. Both give the same results per run.
  cfg.as_population = True
  # Order of the tables and plots (a ConfigDict lists its keys alphabetically): MaxRL, then the paper's
  # baselines. Every variant appears once.
  cfg.variant_order = ("maxrl", "grpo", "grpo_entropy", "rloo", "pkpo", "diff_smoothing", "self", "maclaurin")
  return cfg
