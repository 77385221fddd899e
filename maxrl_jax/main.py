r"""Entry point: runs the experiment a config file describes.

    python -m maxrl_jax.main --config=configs/maze.py --workdir=/tmp/maze [--config.objective.name=grpo ...]
    python -m maxrl_jax.main --config=configs/classification.py --workdir=/tmp/cls
    python -m maxrl_jax.main --config=configs/gsm8k_smollm2.py:tiny --workdir=/tmp/gsm8k_tiny

`config.task` selects the trainer; each trainer exposes `train_and_evaluate(config, workdir)`. Re-running
the same command on the same workdir resumes from its latest checkpoint.
"""

import importlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# task name -> module with train_and_evaluate(config, workdir).
TRAINERS = {
    "maze": "maxrl_jax.train_maze",
    "classification": "maxrl_jax.classification.train",
    "text": "maxrl_jax.text.train",
}

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:preset]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json, metrics.jsonl, checkpoints, summary.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  task = config.get("task")
  if task not in TRAINERS:
    raise app.UsageError(f"config.task={task!r}; allowed: {sorted(TRAINERS)}.")
  importlib.import_module(TRAINERS[task]).train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
