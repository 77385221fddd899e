"""docs/integrations.md's Tunix example, run as printed: MaxRL and Maclaurin-T advantages registered in Tunix's
advantage-estimator registry and used by its GRPO learner, on a tiny random Qwen2 on the CPU.

Tunix pins versions of its own, so this runs in a virtual environment with google-tunix and maxrl_jax (.ci/run
creates it after the main suite); elsewhere it is skipped.
"""

import contextlib
import io

import numpy as np
import pytest

pytest.importorskip("tunix", reason="Tunix is not installed here; .ci/run runs this test in a virtual "
                    "environment of its own with google-tunix (docs/integrations.md)")

import jax  # noqa: E402
from doc_examples import run_example  # noqa: E402
from flax import nnx  # noqa: E402
from tunix.rl import function_registry  # noqa: E402

from maxrl_jax import estimators  # noqa: E402


@pytest.fixture(scope="module")
def example():
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    namespace = run_example("tunix")
  return namespace, out.getvalue()


def test_the_grpo_learner_uses_maxrl_and_maclaurin_advantages(example):
  namespace, printed = example
  seen = namespace["seen"]
  assert set(seen) == {"maxrl", "maclaurin_4"}
  rules = {"maxrl": estimators.get_advantage_fn("maxrl"),
           "maclaurin_4": estimators.get_advantage_fn("maclaurin", order=4)}
  for name, steps in seen.items():
    assert len(steps) == 2, name  # two GRPO steps, each through the registered estimator
    for rewards, advantages in steps:
      rewards = np.asarray(rewards)
      assert rewards.shape == (8,) and set(np.unique(rewards)) <= {0.0, 1.0}
      expected = np.asarray(rules[name](rewards.reshape(2, 4))).reshape(-1)  # 2 prompts x G = 4
      np.testing.assert_allclose(np.asarray(advantages), expected, rtol=1e-6)
  assert printed.count("rewards [") == 4


def test_the_policy_was_updated(example):
  namespace, _ = example  # the last run's policy (its initial weights) and the learner's trained copy
  initial = jax.tree.leaves(nnx.state(namespace["policy"], nnx.Param))
  trained = jax.tree.leaves(nnx.state(namespace["cluster"].actor_trainer.model, nnx.Param))
  assert len(initial) == len(trained)
  assert max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(initial, trained)) > 0


def test_registered_rules_refuse_rewards_they_do_not_take(example):
  del example  # the example registered them
  maxrl = function_registry.get_advantage_estimator("maxrl")
  np.testing.assert_allclose(maxrl(rewards=np.array([1.0, 0.0, 0.0, 0.0]), num_generations=4), [3, -1, -1, -1])
  with pytest.raises(ValueError, match="maxrl"):
    maxrl(rewards=np.array([0.5, 0.0, 1.0, 0.0]), num_generations=4)  # the sum of two 0/1 reward functions
  with pytest.raises(ValueError, match="exceeds the group size"):
    function_registry.get_advantage_estimator("maclaurin_4")(rewards=np.zeros(2), num_generations=2)
