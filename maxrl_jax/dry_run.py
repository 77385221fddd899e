"""What a run will do, without running it (`python -m maxrl_jax.main --config=... --dry_run`), and the list
of config files and presets that `--help` prints.

A trainer module may define `expected_work(config, workdir) -> dict` (the classification trainer does);
for the maze and text trainers the work is computed here from the config. Each function validates the
config first (the trainer's own `validate_config`, so a dry run fails exactly where the run would) and
returns {what: how much}, in the order it is printed.
"""

from __future__ import annotations

import ast
import glob
import json
import os
import re
from typing import Any, Callable, Mapping

import ml_collections


def _count(value: int) -> str:
  return f"{int(value):,}"


def _eval_steps(steps: int, every: int) -> int:
  """Evaluations of a phase of `steps` steps: at step 0, every `every` steps, and at the end."""
  return len({0, int(steps)} | (set(range(every, steps + 1, every)) if every else set()))


def maze_work(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """SFT examples and tokens, RL rollouts and generated tokens, evaluations of a maze run."""
  del workdir
  from maxrl_jax import train_maze  # pylint: disable=import-outside-toplevel
  from maxrl_jax.tasks import maze  # pylint: disable=import-outside-toplevel

  train_maze.validate_config(config)
  train_maze.check_sft_source(config)
  size = config.maze.size
  prompt_len = maze.prompt_length(size)
  max_new = int(config.rollout.max_new_tokens)
  prompts, samples = int(config.rollout.num_prompts), int(config.rollout.num_samples)
  rl_steps = int(config.rl.steps)
  work = {"mazes": f"{size}x{size}; prompt {prompt_len} tokens, responses up to {max_new} tokens"}
  if config.maze.train_data == "fixed":
    work["training mazes"] = f"a fixed pool of {_count(config.maze.train_examples)} (TFDS train split)"
  else:
    work["training mazes"] = "fresh ones every step"
  if config.sft.init_from:
    work["SFT"] = f"none: RL starts from the SFT policy of {config.sft.init_from}"
  else:
    sft_examples = int(config.sft.steps) * int(config.sft.batch_size)
    sft_len = prompt_len + maze.min_response_length(size)
    work["SFT steps"] = _count(config.sft.steps)
    work["SFT examples (steps x batch)"] = _count(sft_examples)
    work["SFT tokens (examples x sequence length)"] = f"{_count(sft_examples * sft_len)} ({sft_len} per example)"
  rollouts = rl_steps * prompts * samples
  work["RL steps"] = _count(rl_steps)
  work["RL rollouts (steps x prompts x N)"] = f"{_count(rollouts)} ({rl_steps} x {prompts} x {samples})"
  work["RL generated tokens, at most (rollouts x max_new_tokens)"] = _count(rollouts * max_new)
  evals = _eval_steps(rl_steps, int(config.eval.every_steps))
  work["evaluations"] = f"{evals} (after SFT, every {config.eval.every_steps} RL steps and at the end)"
  per_eval = int(config.eval.num_mazes) * int(config.eval.num_samples)
  work["samples per evaluation"] = (f"{_count(per_eval)} ({config.eval.num_mazes} held-out mazes x "
                                    f"{config.eval.num_samples}), up to {max_new} tokens each")
  from maxrl_jax import population  # pylint: disable=import-outside-toplevel
  if population.is_population(config):
    members = population.members(config)
    seeds = population.distinct_seeds(members)
    work["population"] = (f"{len(members)} members, one jitted program: "
                          + ", ".join(m.name for m in members[:6]) + (", ..." if len(members) > 6 else ""))
    work["population work"] = (f"SFT above once per seed ({len(seeds)}); RL rollouts, tokens and evaluations "
                               f"above for each of the {len(members)} members")
  return work


def text_work(config: ml_collections.ConfigDict, workdir: str | None = None) -> dict:
  """SFT examples, RL rollouts and generated tokens, evaluations of a language-model run."""
  del workdir
  from maxrl_jax.text import train as text_train  # pylint: disable=import-outside-toplevel

  text_train.validate_config(config)
  prompts, samples = int(config.rollout.num_prompts), int(config.rollout.num_samples)
  rl_steps = int(config.rl.steps)
  max_new = int(config.rollout.max_new_tokens)
  model = config.model.path or f"a tiny random {config.model.synthetic} checkpoint written to the workdir"
  data = config.data.train_path or "synthetic arithmetic problems written to the workdir"
  work = {"model": model, "training data": data}
  if config.sft.steps:
    work["SFT steps"] = _count(config.sft.steps)
    work["SFT examples (steps x batch)"] = _count(int(config.sft.steps) * int(config.sft.batch_size))
  rollouts = rl_steps * prompts * samples
  work["RL steps"] = _count(rl_steps)
  work["RL rollouts (steps x prompts x N)"] = f"{_count(rollouts)} ({rl_steps} x {prompts} x {samples})"
  work["RL generated tokens, at most (rollouts x max_new_tokens)"] = _count(rollouts * max_new)
  evals = _eval_steps(rl_steps, int(config.eval.every_steps))
  work["evaluations"] = f"{evals} (before RL, every {config.eval.every_steps} RL steps and at the end)"
  problems = (f"{config.eval.num_problems} held-out problems" if config.eval.num_problems
              else "every held-out problem")
  work["samples per evaluation"] = (f"{problems} x {config.eval.num_samples}, up to "
                                    f"{config.eval.max_new_tokens} tokens each")
  return work


WORK: dict[str, Callable[..., dict]] = {"maze": maze_work, "text": text_work}


def expected_work(task: str, trainer: Any, config: ml_collections.ConfigDict, workdir: str | None) -> dict:
  """The trainer module's own `expected_work` if it has one, else the function of WORK for the task."""
  fn = getattr(trainer, "expected_work", None) or WORK.get(task)
  if fn is None:
    return {"work": "not known for this task without running it"}
  return fn(config, workdir)


def workdir_state(workdir: str | None, config: ml_collections.ConfigDict) -> str:
  """What the run would do with the workdir: start, resume, or be refused (and why)."""
  if not workdir:
    return "not given (pass --workdir to check it)"
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return f"{workdir}: a new run"
  from maxrl_jax import run_logging  # pylint: disable=import-outside-toplevel

  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    return f"{workdir}: refused ({path} is not readable JSON: {e})"

  def flat(d: Mapping[str, Any], prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
      if isinstance(v, Mapping):
        out.update(flat(v, f"{prefix}{k}."))
      else:
        out[f"{prefix}{k}"] = v
    return out

  a = flat(saved)
  b = flat(run_logging._jsonable(config.to_dict()))  # pylint: disable=protected-access
  diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k not in run_logging.RESUMABLE_FIELDS
                and not k.startswith(run_logging.RESUMABLE_PREFIXES))
  if diff:
    details = ", ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:6])
    return f"{workdir}: refused, it holds a run with another config ({details})"
  return f"{workdir}: resumes the run it holds (same config)"


# ------------------------------------------------------------------------------------------------ --help


def _configs_dir() -> str | None:
  for root in (os.getcwd(), os.path.dirname(os.path.dirname(os.path.abspath(__file__)))):
    path = os.path.join(root, "configs")
    if os.path.isdir(path):
      return path
  return None


def describe_config_file(path: str) -> dict:
  """{"presets", "default", "summary", "runner"} of a config file, read from its source (not imported)."""
  with open(path, encoding="utf-8") as f:
    source = f.read()
  module = ast.parse(source)
  doc = ast.get_docstring(module) or ""
  presets = None
  for node in module.body:
    if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PRESETS" for t in node.targets):
      presets = list(ast.literal_eval(node.value))
  if presets is None:
    found = re.search(r"allowed: ([\w, ]+)\.", source)
    presets = [p.strip() for p in found.group(1).split(",")] if found else []
  default = re.search(r"\b(?:arg|preset)\s+or\s+\"(\w+)\"", source)
  runner = re.search(r"python -m ([\w.]+)", doc)
  return {"presets": presets, "default": default.group(1) if default else None,
          "summary": doc.strip().split("\n\n")[0].replace("\n", " "),
          "runner": runner.group(1) if runner else "maxrl_jax.main"}


def configs_help() -> str:
  """The config files of configs/ with their presets, for --help."""
  directory = _configs_dir()
  if directory is None:
    return "No configs/ directory found: run from the repository root.\n"
  main_lines, other_lines = [], []
  for path in sorted(glob.glob(os.path.join(directory, "*.py"))):
    if os.path.basename(path).startswith("_"):
      continue
    info = describe_config_file(path)
    presets = ", ".join(f"{p}*" if p == info["default"] else p for p in info["presets"]) or "-"
    summary = info["summary"]
    summary = summary if len(summary) <= 100 else summary[:97].rsplit(" ", 1)[0] + " ..."
    line = f"  configs/{os.path.basename(path)}   presets: {presets}\n      {summary}"
    if info["runner"] == "maxrl_jax.main":
      main_lines.append(line)
    else:
      other_lines.append(line + f"\n      run with: python -m {info['runner']}")
  text = ("Config files (--config=configs/NAME.py or configs/NAME.py:PRESET; * marks the preset used without "
          ":PRESET):\n" + "\n".join(main_lines) + "\n")
  if other_lines:
    text += ("\nConfigs of the ablations (several runs each; their own entry points, not this one):\n"
             + "\n".join(other_lines) + "\n")
  return text + ("\nAny field can be overridden: --config.FIELD=VALUE (e.g. --config.rl.steps=50). "
                 "Docs: README.md and docs/.\n")
