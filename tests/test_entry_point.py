"""maxrl_jax.main: --help lists the configs, --dry_run, refused workdirs, and a quiet console in log files."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from maxrl_jax import dry_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ imports from the repository root wherever pytest runs.

# What a log file of a run must not contain: TFDS's download banner for generated data, its warning about
# configs that are not registered, cursor-movement codes of nested progress bars, an empty-folder warning.
NOISE = ("Unknown size", "Downloading and preparing", "downloaded and prepared", "Using custom data configuration",
         "\x1b[", "Variant folder", "Unable to initialize backend")


def _main(*args, timeout=300, env=None):
  return subprocess.run([sys.executable, "-m", "maxrl_jax.main", *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=env)


def test_help_lists_config_files_and_presets():
  out = _main("--help")  # absl's --help exits with status 1 after printing
  assert "Traceback" not in out.stderr, out.stderr[-2000:]
  for text in ("configs/maze.py", "default*, tiny, paper", "configs/classification.py", "imagenet",
               "configs/gsm8k_smollm2.py", "configs/qwen3_math.py", "python -m experiments.maze_objectives",
               "--dry_run", "--workdir"):
    assert text in out.stdout, text


def test_every_listed_preset_loads():
  for path in sorted(glob.glob(os.path.join(REPO, "configs", "*.py"))):
    with open(path) as f:
      if os.path.basename(path).startswith("_") or "def get_config" not in f.read():
        continue  # configs/common.py: the shared blocks, not an experiment.
    info = dry_run.describe_config_file(path)
    assert info["presets"], path
    module = importlib.import_module(f"configs.{os.path.basename(path)[:-3]}")
    for preset in info["presets"]:
      module.get_config(preset)
    with pytest.raises(ValueError):
      module.get_config("no_such_preset")
    if info["default"] is not None:
      assert info["default"] in info["presets"]
      default = module.get_config(None)
      if "preset" in default:
        assert default.preset == info["default"]


def test_dry_run_prints_the_work_and_writes_nothing(tmp_path):
  workdir = tmp_path / "never_written"
  out = _main("--config=configs/maze.py:tiny", f"--workdir={workdir}", "--dry_run", "--config.rl.steps=10")
  assert out.returncode == 0, out.stderr[-2000:]
  from configs import maze as maze_config  # pylint: disable=import-outside-toplevel

  config = maze_config.get_config("tiny")
  rollouts = 10 * config.rollout.num_prompts * config.rollout.num_samples
  assert "# Expected work" in out.stdout and "objective:" in out.stdout  # the resolved config is printed
  assert f"{rollouts:,} (10 x {config.rollout.num_prompts} x {config.rollout.num_samples})" in out.stdout
  assert f"{rollouts * config.rollout.max_new_tokens:,}" in out.stdout
  assert "a new run" in out.stdout and not workdir.exists()


def test_dry_run_of_the_classification_and_text_configs():
  out = _main("--config=configs/classification.py", "--dry_run")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "procedural_classes/c200 (20,000 train / 4,000 held-out examples)" in out.stdout
  assert "train steps" in out.stdout and "sampled classes" in out.stdout
  out = _main("--config=configs/gsm8k_smollm2.py:tiny", "--dry_run")
  assert out.returncode == 0, out.stderr[-2000:]
  assert "RL rollouts" in out.stdout


def test_dry_run_names_the_bad_field_and_refuses_a_url_workdir():
  out = _main("--config=configs/maze.py:tiny", "--dry_run", "--config.rollout.num_samples=1")
  assert out.returncode != 0 and "config.objective / config.rollout.num_samples" in out.stderr
  assert "Traceback" not in out.stderr
  out = _main("--config=configs/maze.py:tiny", "--workdir=gs://bucket/run")
  assert out.returncode != 0 and "gcsfuse" in out.stderr
  out = _main("--config=configs/maze.py:tiny")
  assert out.returncode != 0 and "--workdir is required" in out.stderr


def test_a_run_logged_to_a_file_is_quiet_and_writes_tensorboard_and_plots(tmp_path):
  """A tiny classification job whose data is generated in <workdir>/tfds, output captured (not a TTY)."""
  workdir = tmp_path / "cls"
  env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
  out = _main("--config=configs/classification.py:tiny", f"--workdir={workdir}",
              "--config.data.name=procedural_classes/c100", "--config.train.num_steps=20",
              "--config.train.steps_per_call=10", "--config.log_every_steps=10", "--config.eval.every_steps=10",
              "--config.model.hidden_sizes=(16,)", "--config.eval.num_train_examples=100", env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  for text in NOISE:
    assert text not in out.stdout + out.stderr, (text, out.stderr[-2000:])
  assert "\r" not in out.stderr  # no progress bar redrawn into the log
  assert "pass@1024" in out.stdout  # the final table
  assert (workdir / "tfds" / "procedural_classes").is_dir()  # data under <workdir>/tfds by default
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  assert (workdir / "curves_heldout.png").exists() and (workdir / "curves_train.png").exists()


def test_maze_dataset_generation_is_quiet(tmp_path):
  """Building a maze split with a config made from the run's config prints no TFDS banner or warning."""
  code = ("import tensorflow_datasets as tfds\n"
          "from maxrl_jax.tasks.maze import dataset as maze_dataset\n"
          "tfds.disable_progress_bar()  # as the trainer does\n"
          f"grids = maze_dataset.load_maze_split({str(tmp_path)!r}, 7, 'test', num_train=5, num_test=3)\n"
          "print(grids.shape)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "(3, 7, 7)"
  for text in NOISE:
    assert text not in out.stdout + out.stderr, (text, out.stderr[-2000:])
