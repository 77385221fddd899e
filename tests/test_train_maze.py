"""End-to-end maze training on the tiny preset: outputs, resume after a real kill, config errors, tracing."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxrl_jax import config_fields
from maxrl_jax import estimators
from maxrl_jax import train
from maxrl_jax.models import decoder
from maxrl_jax.rl import step as step_lib
from maxrl_jax.tasks.maze import env as maze

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import maze as maze_config  # noqa: E402

# Fields that measure wall time and so differ between any two runs.
TIMING_FIELDS = ("step_time_s", "tokens_per_s")


def tiny_config(**overrides):
  config = maze_config.get_config("tiny")
  config_fields.set_fields(config, overrides)
  return config


def _deterministic(records):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def _read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_tiny_run_writes_outputs(finished_maze_run, tmp_path, capsys):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_maze_run, workdir)
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  for name in ("config.json", "metrics.jsonl", "summary.json"):
    assert os.path.exists(os.path.join(workdir, name)), name
  records = _read_metrics(workdir)
  assert {r["phase"] for r in records} == {"sft", "rl", "eval"}
  assert all("step" in r and "phase" in r for r in records)
  rl = [r for r in records if r["phase"] == "rl"]
  for key in ("pass_rate", "fraction_solved", "mean_response_length", "grad_norm", "loss", "step_time_s",
              "tokens_per_s", "entropy"):
    assert key in rl[0], key
  # On-policy: the learner's teacher-forced log-probs are the sampler's.
  assert max(r["logprob_mismatch"] for r in rl) < 1e-4
  with open(os.path.join(workdir, "summary.json")) as f:
    saved = json.load(f)
  assert saved["objective"] == "maxrl" and saved["task"] == "maze" and saved["final_step"] == 6
  assert set(saved["eval"]) >= {"pass@1", "pass@4", "pass@8", "pass@1_se", "best@8_bootstrap"}
  # Held-out mazes are never trained on; the run measures it by regenerating every training maze.
  assert saved["training_mazes"]["all"]["overlap_with_heldout"] == 0
  assert saved["training_mazes"]["sft"]["drawn"] == 6 * 8 and saved["training_mazes"]["rl"]["drawn"] == 6 * 4
  assert saved["heldout_mazes"]["num_mazes"] == 8
  assert summary["eval"] == saved["eval"]
  # Running it again without its summary resumes at the end and reproduces the summary and the table.
  os.remove(os.path.join(workdir, "summary.json"))
  again = train.train_and_evaluate(tiny_config(), workdir)
  assert "after RL" in capsys.readouterr().out
  assert again["eval"] == summary["eval"]
  assert _deterministic(_read_metrics(workdir)) == _deterministic(records)


def _launch(workdir, extra):
  cmd = [sys.executable, "-m", "maxrl_jax.main", f"--config={REPO}/configs/maze.py:tiny",
         f"--workdir={workdir}", *extra]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, path, timeout=240):
  deadline = time.time() + timeout
  while not os.path.exists(path):
    if proc.poll() is not None:
      raise AssertionError(f"run ended before {path} appeared: {proc.stderr.read().decode()[-2000:]}")
    if time.time() > deadline:
      proc.kill()
      raise AssertionError(f"{path} did not appear within {timeout} s")
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
  # Long enough phases that a kill lands mid-phase, right after a checkpoint.
  extra = ["--config.sft.steps=16", "--config.rl.steps=16", "--config.eval.every_steps=8"]
  straight = str(tmp_path / "straight")
  proc = _launch(straight, extra)
  assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]

  resumed = str(tmp_path / "resumed")
  _kill_when(_launch(resumed, extra), os.path.join(resumed, "checkpoints", "sft", "4"))
  _kill_when(_launch(resumed, extra), os.path.join(resumed, "checkpoints", "rl", "4"))
  assert not os.path.exists(os.path.join(resumed, "checkpoints", "rl", "16"))
  proc = _launch(resumed, extra)
  assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]

  want, got = _read_metrics(straight), _read_metrics(resumed)
  assert _deterministic(got) == _deterministic(want)
  with open(os.path.join(straight, "summary.json")) as f, open(os.path.join(resumed, "summary.json")) as g:
    assert json.load(f)["eval"] == json.load(g)["eval"]

  # SIGTERM (a preemption notice) mid-RL: the step it reached is saved, the run exits 143 with a message, and
  # the same command resumes to the uninterrupted records.
  stopped = str(tmp_path / "stopped")
  proc = _launch(stopped, extra)
  path = os.path.join(stopped, "checkpoints", "rl", "2")
  deadline = time.time() + 240
  while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 143
  stderr = proc.stderr.read().decode()
  assert "SIGTERM received" in stderr and "its state is saved" in stderr and "Traceback" not in stderr
  saved = sorted(int(s) for s in os.listdir(os.path.join(stopped, "checkpoints", "rl")) if s.isdigit())
  assert saved[-1] < 16 and not os.path.exists(os.path.join(stopped, "summary.json"))
  proc = _launch(stopped, extra)
  assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
  assert _deterministic(_read_metrics(stopped)) == _deterministic(want)


def test_resuming_with_another_config_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    json.dump(tiny_config().to_dict(), f)
  with pytest.raises(ValueError, match=r"different config \(objective.name: 'maxrl' -> 'grpo'"):
    train.train_and_evaluate(tiny_config(**{"objective.name": "grpo"}), workdir)


@pytest.mark.parametrize("overrides,match", [
    ({"objective.name": "ppo"}, r"config.objective.name='ppo' is not an estimator; allowed:"),
    ({"rollout.num_samples": 1}, r"config.objective / config.rollout.num_samples: .*at least 2 rollouts"),
    ({"objective.name": "maclaurin"}, r"needs the integer argument 'order'"),
    ({"objective.name": "maclaurin", "objective.order": 9}, r"exceeds the group size N = 4"),
    ({"objective.name": "pkpo", "objective.k": 5}, r"exceeds the group size"),
    ({"maze.size": 8}, r"config.maze.size: maze size must be odd"),
    ({"rollout.max_new_tokens": 5}, r"config.rollout.max_new_tokens: 5 is shorter than the longest shortest path"),
    ({"model.max_positions": 40}, r"config.model.max_positions: 40 < prompt"),
    ({"eval.ks": (1, 16)}, r"config.eval.ks: k=16 must be in \[1, eval.num_samples=8\]"),
    ({"objective.reduction": "mean"}, r"config.objective.reduction: 'mean'; allowed"),
    ({"maze.train_data": "cached"}, r"config.maze.train_data: 'cached'; allowed"),
    ({"rl.learning_rate": 0.0}, r"config.rl.learning_rate: 0.0 must be > 0"),
    ({"checkpoint_every_steps": 3}, r"must be a multiple of log_every_steps"),
    ({"model.num_kv_heads": 3}, r"config.model: num_kv_heads=3 must divide num_heads=4"),
])
def test_invalid_config_is_named(overrides, match):
  with pytest.raises(ValueError, match=match):
    train.validate_config(tiny_config(**overrides))


def test_paper_and_default_presets_validate():
  for preset in ("default", "paper"):
    train.validate_config(maze_config.get_config(preset))
  with pytest.raises(ValueError, match="Unknown maze preset"):
    maze_config.get_config("huge")


def test_rl_step_traces_once_and_learns_from_rewards():
  config = tiny_config()
  fns = decoder.DecoderFns(decoder.DecoderConfig.from_config(config.model))
  hyper = step_lib.Hyper(learning_rate=1e-3, b1=0.9, b2=0.95, weight_decay=0.0)
  spec = step_lib.RLSpec(num_samples=4, max_new_tokens=12, stop_tokens=(maze.DONE, maze.EOS))
  maxrl = estimators.get_advantage_fn("maxrl")
  rl_step = step_lib.make_rl_step(spec, fns, hyper, prompt_fn=maze.encode_prompts, verifier=maze.verify_groups,
                                  advantage_fn=lambda rewards, h: maxrl(rewards))
  state = step_lib.init_state(fns.init(jax.random.key(0)), step_lib.rl_optimizer(hyper, spec))
  for step in range(3):
    grids = maze.generate_mazes(jax.random.key(100 + step), 4, 5)
    state, metrics = rl_step(state, grids, jax.random.key(step), jnp.float32(1.0))
  assert rl_step._cache_size() == 1
  assert int(state.step) == 3
  assert np.isfinite(float(metrics["loss"]))
