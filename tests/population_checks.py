"""Trains one tiny maze population in a process of its own (fake CPU devices must be set before JAX starts).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/population_checks.py \
        --workdir=DIR --member_devices=8 --out=r.json

Writes {"num_devices", "mesh" (summary.json's), "records" (metrics.jsonl), "members"} to --out. Used by
test_population.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

OBJECTIVES = ("maxrl", "grpo", "rloo",
              "grpo_all: objective.name=grpo, objective.entropy_coef=0.01, objective.smoothing_gamma=0.05, "
              "objective.self_filter=True, rl.learning_rate=3e-4")


def sharding_config():
  """8 members (4 objectives x 2 seeds) of the tiny preset, 2 RL steps; prompts divide over 2 data shards."""
  from configs import maze as maze_config  # pylint: disable=import-outside-toplevel

  config = maze_config.get_config("tiny")
  config.population.objectives = OBJECTIVES
  config.population.seeds = (0, 1)
  config.rl.steps = 2
  config.eval.every_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  config.logging.tensorboard = False
  config.logging.plots = False  # Nothing here looks at PNG curves (drawing them is seconds per member).
  return config


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--member_devices", type=int, default=-1)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()

  import jax  # pylint: disable=import-outside-toplevel

  from maxrl_jax import run_logging, train  # pylint: disable=import-outside-toplevel

  config = sharding_config()
  config.population.member_devices = args.member_devices
  summary = train.train_and_evaluate(config, args.workdir)
  result = {"num_devices": jax.device_count(), "mesh": summary["mesh"],
            "records": run_logging.MetricsWriter(args.workdir).read(),
            "members": [m["name"] for m in summary["members"]]}
  with open(args.out, "w") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main()
