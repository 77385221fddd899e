r"""Training signal: fraction of prompts with a correct rollout during training (from the objective
comparison's runs) and per-prompt gradient norm against pass rate on the shared SFT policy.

    python -m experiments.training_signal --config=configs/training_signal.py:cpu --workdir=/tmp/abl/signal \
        --config.objectives_workdir=/tmp/abl/objectives
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "cpu"
  cfg = ml_collections.ConfigDict()
  cfg.preset = preset
  cfg.objectives_workdir = ""  # Workdir of experiments.maze_objectives (its sft/ and runs/).
  cfg.objectives = ("maxrl", "grpo", "rloo", "reinforce")  # Gradient-norm panels.
  cfg.seed = 0
  if preset == "cpu":
    cfg.num_prompts = 128
    cfg.num_samples = 16
    cfg.prompt_chunk = 32
  elif preset == "paper":
    cfg.num_prompts = 512
    cfg.num_samples = 128
    cfg.prompt_chunk = 16
  elif preset == "tiny":
    cfg.num_prompts = 4
    cfg.num_samples = 4
    cfg.prompt_chunk = 4
  else:
    raise ValueError(f"Unknown preset {preset!r}; allowed: cpu, paper, tiny.")
  return cfg
