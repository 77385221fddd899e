r"""Entry point: runs the experiment a config file describes.

    python -m maxrl_jax.main --config=configs/maze.py --workdir=workdirs/maze [--config.objective.name=grpo ...]
    python -m maxrl_jax.main --config=configs/classification.py --workdir=workdirs/cls
    python -m maxrl_jax.main --config=configs/gsm8k_smollm2.py:tiny --workdir=workdirs/gsm8k_tiny
    python -m maxrl_jax.main --config=configs/maze.py:paper --dry_run     # check a config, see its work

`config.task` selects the task (maxrl_jax/tasks/<task>), which selects its trainer; the whole job is
`maxrl_jax.train.train_and_evaluate(config, workdir)`. Re-running the same command on the same workdir
resumes from its latest checkpoint. `--dry_run` validates the config, prints it resolved and the work it asks
for (steps, rollouts, tokens, evaluations), and trains nothing. SIGTERM or Ctrl-C saves the current step and
exits with status 143 (130 for Ctrl-C); the same command resumes.
"""

import os
import sys

if not sys.stderr.isatty():
  # Progress bars written to a file or pipe are carriage returns and cursor codes, not progress: off unless
  # TQDM_DISABLE is set (read by tqdm when it is imported). metrics.jsonl records the progress instead.
  os.environ.setdefault("TQDM_DISABLE", "1")

import logging as std_logging  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from maxrl_jax import dry_run as dry_run_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, configs/NAME.py[:PRESET] (the list is above).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config.json, metrics.jsonl, checkpoints, summary (a local or mounted path).")
_DRY_RUN = flags.DEFINE_bool(
    "dry_run", False, "Validate the config, print it resolved and the work it asks for, and exit without "
    "training (--workdir is optional; given, says whether the run would start, resume or be refused).")
flags.mark_flag_as_required("config")

# absl warnings that describe TFDS's internals rather than the run ("Using custom data configuration: ..."
# for every dataset config that is made from the run's config instead of being registered).
_QUIET_ABSL_PREFIXES = ("Using custom data configuration",)


def _drop_tfds_noise(record: std_logging.LogRecord) -> bool:
  return not str(record.msg).startswith(_QUIET_ABSL_PREFIXES)


# ------------------------------------------------------------------------------------------------ main


def dry_run(config, workdir: str | None) -> None:
  """Prints the resolved config and the work it asks for; trains nothing and writes nothing."""
  from maxrl_jax import train  # pylint: disable=import-outside-toplevel

  try:
    work = train.expected_work(config)
  except ValueError as e:
    print(config)
    print(f"The config is not valid: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"# Resolved config (task {config.get('task')!r})\n")
  print(config)
  print("# Expected work\n")
  width = max(len(k) for k in work)
  for key, value in work.items():
    print(f"  {key:<{width}}  {value}")
  print(f"\n  {'workdir':<{width}}  {dry_run_lib.workdir_state(workdir, config)}")
  print("\nThe config is valid. Nothing was trained or written (dry run).", flush=True)


def _check_overrides(argv) -> None:
  """Names the new field of an override of a field that earlier versions of the configs had."""
  from maxrl_jax.trainers import harness  # pylint: disable=import-outside-toplevel

  for arg in argv[1:]:
    if arg.startswith("--config."):
      message = harness.renamed_field_message(arg[len("--config."):].split("=", 1)[0])
      if message:
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def _config_root_on_path(argv) -> None:
  """Config files import their shared blocks (`from configs import common`): put the directory above the
  config file's on the path, so that `--config=/elsewhere/configs/maze.py` works from any directory."""
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg[len("--config="):].split(":", 1)[0]
      root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
      if os.path.exists(os.path.join(root, "configs", "__init__.py")) and root not in sys.path:
        sys.path.insert(0, root)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  logging.get_absl_logger().addFilter(_drop_tfds_noise)
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if workdir and "://" in workdir:
    raise app.UsageError(
        f"--workdir={workdir}: run files are written with plain file I/O, so the workdir must be a path on a "
        "file system. For a bucket, mount it (e.g. gcsfuse --implicit-dirs BUCKET /mnt/bucket) and pass the "
        "mount path; see docs/tpu.md.")
  if _DRY_RUN.value:
    dry_run(config, workdir)
    return
  if workdir is None:
    raise app.UsageError("--workdir is required (a directory for the run's files), unless --dry_run.")
  # pylint: disable=g-import-not-at-top
  from maxrl_jax import checkpoints
  from maxrl_jax import train
  from maxrl_jax import workdir as workdir_lib
  from maxrl_jax.trainers import loop
  try:
    train.train_and_evaluate(config, workdir)
  except (ValueError, workdir_lib.WorkdirBusyError, loop.NonFiniteError, loop.Preempted,
          checkpoints.CheckpointSaveError) as e:
    # Bad input (config, workdir, files), a busy workdir, a diverged or stopped run, a full disk at a checkpoint:
    # the message says what and how to fix it; a traceback would only bury it. MAXRL_TRACEBACK=1 shows it too.
    if os.environ.get("MAXRL_TRACEBACK"):
      raise
    if isinstance(e, loop.Preempted):  # Saved and stopped on request: the shell's status for that signal.
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(128 + e.signum)
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  __doc__ += "\n" + dry_run_lib.configs_help()  # What absl's --help prints above the flags.
  _config_root_on_path(sys.argv)
  _check_overrides(sys.argv)
  app.run(main)
