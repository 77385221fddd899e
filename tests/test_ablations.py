"""Baselines of the paper's tables (Differential Smoothing, SELF, GRPO + entropy) and the ablation runner."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxrl_jax import estimators
from maxrl_jax import sampling
from maxrl_jax.rl import step as step_lib
from maxrl_jax.models import decoder
from maxrl_jax.tasks.maze import env as maze

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import data_scarce  # noqa: E402
from configs import maze as maze_config  # noqa: E402
from configs import maze_objectives  # noqa: E402
from configs import rollout_scaling  # noqa: E402
from experiments import common  # noqa: E402
from experiments import data_scarce as scarce_experiment  # noqa: E402
from experiments import maze_objectives as objectives_experiment  # noqa: E402
from experiments import rollout_scaling as scaling_experiment  # noqa: E402


def test_differential_smoothing_values():
  rewards = jnp.array([[1.0, 0.0, 0.0, 1.0]])
  lbar = jnp.array([[-0.5, -1.0, -2.0, -0.1]])
  grpo = estimators.grpo_advantages(rewards)
  got = estimators.apply_differential_smoothing(grpo, rewards, lbar, gamma=0.05)
  # Correct rollouts gain -gamma * lbar (> 0), wrong ones gain gamma * lbar (< 0).
  want = np.asarray(grpo) + 0.05 * np.array([[0.5, -1.0, -2.0, 0.1]])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(estimators.apply_differential_smoothing(grpo, rewards, lbar, 0.0), grpo)


def test_self_filter_zeroes_only_flagged_prompts():
  adv = jnp.arange(8.0).reshape(2, 4) - 3.0
  got = estimators.apply_self_filter(adv, jnp.array([True, False]))
  np.testing.assert_array_equal(got[0], 0.0)
  np.testing.assert_array_equal(got[1], adv[1])


@pytest.fixture(scope="module")
def tiny_model():
  config = maze_config.get_config("tiny")
  fns = decoder.DecoderFns(decoder.DecoderConfig.from_config(config.model))
  return fns, fns.init(jax.random.key(0))


def _one_step(tiny_model, self_filter=False, **hyper_fields):
  fns, params = tiny_model
  hyper = step_lib.Hyper(learning_rate=1e-3, b1=0.9, b2=0.95, weight_decay=0.0, self_filter=self_filter,
                         **hyper_fields)
  spec = step_lib.RLSpec(num_samples=4, max_new_tokens=12, stop_tokens=(maze.DONE, maze.EOS),
                         reduction="sequence_sum", use_self=self_filter, grad_clip=1.0)
  grpo = estimators.get_advantage_fn("grpo")
  step = step_lib.make_rl_step(spec, fns, hyper, prompt_fn=maze.encode_prompts, verifier=maze.verify_groups,
                               advantage_fn=lambda rewards, h: grpo(rewards))
  state = step_lib.init_state(jax.tree_util.tree_map(jnp.copy, params), step_lib.rl_optimizer(hyper, spec))
  grids = maze.generate_mazes(jax.random.key(7), 4, 5)
  return step(state, grids, jax.random.key(3), jnp.float32(1.0))


def test_self_filter_with_every_greedy_decode_correct_makes_no_update(tiny_model, monkeypatch):
  # A verifier that accepts everything: every prompt is filtered, so the gradient is exactly zero.
  def accept_all(grids, responses):
    return jnp.ones(responses.shape[:2], jnp.float32)

  monkeypatch.setattr(maze, "verify_groups", accept_all)
  _, metrics = _one_step(tiny_model, self_filter=True)
  assert float(metrics["greedy_solved_fraction"]) == 1.0
  assert float(metrics["grad_norm"]) == 0.0


def test_entropy_bonus_and_smoothing_change_the_update(tiny_model):
  _, plain = _one_step(tiny_model)
  _, entropy = _one_step(tiny_model, entropy_coef=0.1)
  _, smooth = _one_step(tiny_model, smoothing_gamma=0.05)
  assert float(entropy["loss"]) < float(plain["loss"])  # The bonus lowers the loss by coef * entropy.
  assert float(smooth["mean_abs_advantage"]) != float(plain["mean_abs_advantage"])


def test_objective_comparison_runs_and_skips_finished_runs(tmp_path, capsys):
  config = maze_objectives.get_config("tiny")
  with config.unlocked():
    config.variants = {k: config.variants[k] for k in ("maxrl", "self", "diff_smoothing")}
    config.variant_order = ("maxrl", "diff_smoothing")
  workdir = str(tmp_path)
  with pytest.raises(ValueError, match="variant_order=.* must list each of config.variants once"):
    objectives_experiment.run(config, workdir)
  config.variant_order = ("self", "maxrl", "diff_smoothing")
  payload = objectives_experiment.run(config, workdir)
  assert [r["variant"] for r in payload["rows"]] == ["self", "maxrl", "diff_smoothing"]  # the given order
  for name in ("results.json", "results.md", "pass_at_k.png", "training_curves.png"):
    assert os.path.exists(os.path.join(workdir, name))
  summary = os.path.join(workdir, "runs", "self", "seed0", "summary.json")
  stamp = os.path.getmtime(summary)
  # One population for the table; the runs of a seed share that seed's SFT policy.
  with open(os.path.join(workdir, "populations", "all", "summary.json")) as f:
    members = json.load(f)["members"]
  assert [m["name"] for m in members] == ["self/seed0", "maxrl/seed0", "diff_smoothing/seed0"]
  for name in ("maxrl", "self"):
    with open(os.path.join(workdir, "runs", name, "seed0", "summary.json")) as f:
      assert json.load(f)["initial_eval"] == members[0]["initial_eval"]
  capsys.readouterr()
  objectives_experiment.run(config, workdir)
  assert "already holds this run, finished" in capsys.readouterr().out
  assert os.path.getmtime(summary) == stamp


@pytest.mark.parametrize("preset", ["cpu", "paper", "tiny"])
def test_every_run_of_every_ablation_preset_is_a_valid_config(preset):
  # The runs run_all would launch, each checked by maxrl_jax.train.validate_config: a paper-scale sweep cannot
  # fail on its 40th run's config hours after it started.
  expected = {"cpu": (24, 27, 9), "paper": (24, 54, 9), "tiny": (8, 6, 3)}[preset]
  counts = []
  for config_module, experiment in [(maze_objectives, objectives_experiment),
                                    (rollout_scaling, scaling_experiment), (data_scarce, scarce_experiment)]:
    config = config_module.get_config(preset)
    runs = common.seed_runs(experiment.run_variants(config), config.seeds)
    configs = common.build_run_configs(config.base, runs)
    counts.append(len(configs))
  assert tuple(counts) == expected


def test_a_bad_run_override_fails_before_anything_trains(tmp_path):
  config = maze_objectives.get_config("tiny")
  config.variants.pkpo.objective.k = 64  # > N = 4
  with pytest.raises(ValueError, match="population member pkpo/seed0"):
    objectives_experiment.run(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "populations"))
  config.as_population = False  # One run after another: the same check, naming the run.
  with pytest.raises(ValueError, match="run 'pkpo/seed0'"):
    objectives_experiment.run(config, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, "sft"))


def test_overrides_name_unknown_fields():
  with pytest.raises(ValueError, match="'nme' is not a field of config.objective"):
    common.with_overrides(maze_config.get_config("tiny"), {"objective.nme": "grpo"})


@pytest.mark.parametrize("reduction", ["sequence_sum", "token_mean"])
def test_micro_batched_update_equals_one_batch_with_smoothing_and_self(tiny_model, reduction):
  # Advantages come from the full groups (Differential Smoothing and the SELF filter included), so
  # accumulating over 2 x 2 micro-batches gives the one-batch update up to float round-off.
  fns, params = tiny_model
  # Plain SGD with rate 1, so the parameter change is the gradient itself (Adam's first step is about
  # lr * sign(g), which turns round-off in near-zero gradient entries into lr-sized differences).
  tx = optax.sgd(1.0)
  grids = maze.generate_mazes(jax.random.key(7), 4, 5)
  prompts = maze.encode_prompts(grids)
  rollouts = jax.jit(lambda p: sampling.sample_rollouts(
      fns, p, prompts, jax.random.key(1), num_rollouts=4, max_new_tokens=12,
      stop_tokens=(maze.DONE, maze.EOS)))(params)
  rewards = jnp.asarray([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 0], [0, 1, 0, 0]], jnp.float32)
  grpo = estimators.get_advantage_fn("grpo")
  hyper = step_lib.Hyper(learning_rate=1.0, b1=0.9, b2=0.95, weight_decay=0.0, entropy_coef=0.01,
                         smoothing_gamma=0.05)

  def update(micro):
    spec = step_lib.RLSpec(num_samples=4, max_new_tokens=12, stop_tokens=(maze.DONE, maze.EOS),
                           reduction=reduction, **micro)
    state = step_lib.init_state(jax.tree_util.tree_map(jnp.copy, params), tx)
    return jax.jit(lambda s: step_lib.update(
        spec, fns, s, prompts, rollouts, rewards, jnp.float32(1.0), hyper, advantage_fn=lambda r, h: grpo(r),
        zero_prompts=jnp.array([False, False, True, False]), tx=tx))(state)

  state_a, metrics_a = update({})
  state_b, metrics_b = update({"micro_batch_prompts": 2, "micro_batch_rollouts": 2})
  assert float(metrics_a["grad_norm"]) > 0
  for key in ("loss", "grad_norm", "entropy", "mean_abs_advantage"):
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=2e-5, atol=1e-6, err_msg=key)
  jax.tree_util.tree_map(lambda p, a, b: np.testing.assert_allclose(a - p, b - p, rtol=2e-5, atol=1e-6),
                         params, state_a.params, state_b.params)


def test_micro_batches_must_divide_the_batch(tiny_model):
  fns, params = tiny_model
  hyper = step_lib.Hyper(learning_rate=1e-2, b1=0.9, b2=0.95, weight_decay=0.0)
  spec = step_lib.RLSpec(num_samples=4, max_new_tokens=3, stop_tokens=(), micro_batch_rollouts=3)
  tx = step_lib.rl_optimizer(hyper, spec)
  prompts = maze.encode_prompts(maze.generate_mazes(jax.random.key(7), 4, 5))
  rollouts = sampling.Rollouts(tokens=jnp.zeros((4, 4, 3), jnp.int32), logprobs=jnp.zeros((4, 4, 3)),
                               mask=jnp.ones((4, 4, 3), bool), lengths=jnp.full((4, 4), 3),
                               stopped=jnp.ones((4, 4), bool), num_steps=jnp.int32(3))
  with pytest.raises(ValueError, match="micro_batch_rollouts=3 must divide N=4"):
    grpo = estimators.get_advantage_fn("grpo")
    step_lib.update(spec, fns, step_lib.init_state(params, tx), prompts, rollouts, jnp.zeros((4, 4)),
                    jnp.float32(1.0), hyper, advantage_fn=lambda r, h: grpo(r))
