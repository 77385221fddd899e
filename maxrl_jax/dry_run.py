"""What `python -m maxrl_jax.main --config=... --dry_run` says besides the work (maxrl_jax.train.expected_work):
what a run would do with its workdir, and the list of config files and presets that `--help` prints."""

from __future__ import annotations

import ast
import glob
import json
import os
import re

import ml_collections


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

  diff = run_logging.config_differences(saved, config.to_dict())
  if diff:
    details = ", ".join(diff[:6])
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
    with open(path, encoding="utf-8") as f:
      if os.path.basename(path).startswith("_") or "def get_config" not in f.read():
        continue  # Not an experiment (e.g. configs/common.py, the shared blocks).
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
