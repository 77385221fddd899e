r"""Per-input gradient norm against pass rate for a trained classification checkpoint.

    python scripts/grad_norm_analysis.py --workdir=/tmp/cls/ce [--num_samples=1024 --num_examples=1000 \
        --objectives=cross_entropy,maxrl,grpo,reinforce --split=eval --out_dir=DIR]

Reads WORKDIR/config.json and the latest checkpoint of a `train_and_evaluate` run, computes each input's
pass rate and, for every objective, the L2 norm of that input's own gradient (vmapped per-example gradients),
and writes grad_norms.json and grad_norms.png (one scatter panel per objective) to --out_dir (default: the
workdir). See maxrl_jax/classification/grad_norms.py.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a finished classification run.", required=True)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where to write grad_norms.{json,png}; default: workdir.")
_OBJECTIVES = flags.DEFINE_list("objectives", ["cross_entropy", "maxrl", "grpo", "reinforce"], "Objectives.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1024, "Rollouts per input N for the sampled objectives.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", 1000, "Inputs analysed (a fixed random subset).")
_SPLIT = flags.DEFINE_enum("split", "eval", ["eval", "train"], "Held-out ('eval') or training inputs.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Override the run's config.data.data_dir.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the input subset and the rollouts.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from maxrl_jax.classification import grad_norms  # pylint: disable=g-import-not-at-top

  result = grad_norms.analyze(_WORKDIR.value, out_dir=_OUT_DIR.value, objective_names=_OBJECTIVES.value,
                              num_samples=_NUM_SAMPLES.value, num_examples=_NUM_EXAMPLES.value,
                              split=_SPLIT.value, seed=_SEED.value, data_dir=_DATA_DIR.value)
  print(f"wrote {result['files']['png']} and {result['files']['json']}")


if __name__ == "__main__":
  app.run(main)
