r"""Collects the ablation workdirs of scripts/reproduce.sh into docs/results.md and docs/figures/results/.

    python scripts/report.py --root=workdirs/reproduce_cpu --preset=cpu --wall_time_s=3600

Reads <root>/{objectives,scaling,data_scarce,signal}/results.{json,md} and <root>/classification/seed*/
results.json, copies every plot into --figures, and writes --out with the tables, the plots, the paper's
numbers where they exist, the command, the hardware and the wall time. A hand-written analysis in --notes
(if the file exists) is included verbatim, so regenerating the report keeps it.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import shutil
import subprocess
import sys

from absl import app, flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a clone too.

from maxrl_jax import run_logging  # noqa: E402

_ROOT = flags.DEFINE_string("root", "workdirs/reproduce_cpu", "Root workdir of scripts/reproduce.sh.")
_PRESET = flags.DEFINE_string("preset", "cpu", "Preset the root was produced with.")
_WALL = flags.DEFINE_float("wall_time_s", None, "Wall time of the reproduce run, in seconds.")
_OUT = flags.DEFINE_string("out", "docs/results.md", "Markdown report to write.")
_FIGURES = flags.DEFINE_string("figures", "docs/figures/results", "Where the plots are copied.")
_COMMIT = flags.DEFINE_string("commit", None, "Commit the runs were produced at (default: this checkout's HEAD, "
                              "as when reproduce.sh calls the report at the end of its run).")
_NOTES = flags.DEFINE_string("notes", "docs/results_analysis.md", "Hand-written analysis to include.")

PAPER_MAZE = ("Paper (17x17 mazes, 3.9M policy, 32 prompts x 128 rollouts, 20K steps), pass@1 / pass@128 / "
              "pass@256: GRPO 39.6/42.4/43.0; GRPO + entropy 47.2/53.4/54.0; PKPO (T=16) 74.5/77.6/77.9; "
              "SELF 46.1/86.3/87.5; Differential Smoothing 50.0/57.8/58.7; MaxRL 84.4/92.0/94.3.")
PAPER_SCALING = "Paper (256 prompts x N, >= 9K steps): MaxRL > GRPO > RLOO at every N in {4, ..., 128}."
PAPER_SCARCE = ("Paper (GSM8K, SmolLM2-360M, ~50 epochs): GRPO and RLOO peak in pass@1 around epoch 10 and "
                "then lose pass@k; MaxRL rises more slowly, overtakes around epoch 30 and keeps pass@k above "
                "the base model.")
PAPER_SIGNAL = ("Paper (ImageNet): CE and MaxRL have the largest gradient norms on hard inputs (p -> 0), GRPO "
                "around p = 0.5, REINFORCE near zero.")
PAPER_CLS = ("Paper (ImageNet, ResNet-50): REINFORCE stays flat; GRPO improves with N but stays below; "
             "MaxRL approaches cross-entropy once N >= 1024.")


PRESET_SCOPE = {
    "cpu": ("The CPU preset is far smaller than the paper's runs (9x9 mazes, a 0.5M-parameter policy, "
            "60-100 RL steps instead of 20K): it tests the direction of each effect, not the paper's "
            "magnitudes."),
    "paper": "The paper preset uses the paper's sizes (configs/*.py, preset `paper`).",
    "tiny": ("The tiny preset only checks that every step runs and reports (test-size models and a few "
             "steps): its numbers mean nothing."),
}


def git_commit() -> str:
  """Short hash of HEAD, with "+ uncommitted changes" when the code differs from it (docs/, where the report
  and its notes live, is not counted)."""
  run = lambda *args: subprocess.run(["git", *args], capture_output=True, text=True, check=False)
  head = run("rev-parse", "--short", "HEAD").stdout.strip()
  if not head:
    return "unknown (not a git checkout)"
  dirty = run("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)docs").stdout.strip()
  return f"`{head}`" + (" + uncommitted changes" if dirty else "")


def hardware() -> str:
  model = "unknown CPU"
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith("Model name"):
        model = line.split(":", 1)[1].strip()
  except OSError:
    pass
  import jax
  import flax
  return (f"{os.cpu_count()} CPU cores ({model}), no accelerator; Python {platform.python_version()}, "
          f"jax {jax.__version__}, flax {flax.__version__}")


def partial_table(root, name):
  """Mean ± std over the seeds finished so far, for an ablation whose run is not complete."""
  summaries = sorted(glob.glob(os.path.join(root, name, "runs", "*", "seed*", "summary.json")))
  by_variant = {}
  for path in summaries:
    variant = os.path.basename(os.path.dirname(os.path.dirname(path)))
    with open(path) as f:
      by_variant.setdefault(variant, []).append(json.load(f))
  if not by_variant:
    return []
  ks = sorted({int(k.split("@")[1]) for runs in by_variant.values() for k in runs[0]["eval"] if "@" in k})
  keys = [f"pass@{k}" for k in (ks[0], ks[1], ks[-1])]
  lines = ["| variant | seeds | " + " | ".join(keys) + " | SFT pass@1 |", "|" + "---|" * (len(keys) + 3)]
  for variant, runs in sorted(by_variant.items()):
    cells = []
    for key in keys + ["sft"]:
      vals = np.array([r["initial_eval"]["pass@1"] if key == "sft" else r["eval"][key] for r in runs])
      cells.append(f"{vals.mean():.3f} ± {vals.std(ddof=1) if len(vals) > 1 else 0.0:.3f}")
    lines.append(f"| {variant} | {len(runs)} | " + " | ".join(cells) + " |")
  return [f"**Partial**: the run did not finish; {len(summaries)} runs are done. Mean ± std over the "
          "finished seeds:", ""] + lines + [""]


def section(root, name, heading, paper, figures_dir, rel_figures):
  path = os.path.join(root, name, "results.md")
  if not os.path.exists(path):
    partial = partial_table(root, name)
    return [f"## {heading}", ""] + (partial or [f"Not run (no {path})."]) + ["", paper, ""]
  with open(os.path.join(root, name, "results.json")) as f:
    payload = json.load(f)
  lines = [f"## {heading}", "", open(path).read().strip(), "", paper, ""]
  for plot in payload.get("plots", []):
    target = f"{name}_{plot}"
    shutil.copy(os.path.join(root, name, plot), os.path.join(figures_dir, target))
    lines += [f"![{name} {plot}]({rel_figures}/{target})", ""]
  return lines


def classification_section(root, figures_dir, rel_figures):
  seeds = sorted(glob.glob(os.path.join(root, "classification", "seed*", "results.json")))
  if not seeds:
    return ["## Classification: MaxRL against exact maximum likelihood", "", "Not run.", ""]
  table = {}
  for path in seeds:
    with open(path) as f:
      for run in json.load(f)["runs"]:
        if run.get("status") != "ok":
          continue
        key = (run["objective"], run["num_samples"] or 0)
        table.setdefault(key, []).append((run["pass@1"], run["pass@128"]))
  objectives = sorted({k[0] for k in table}, key=lambda o: (o != "cross_entropy", o))
  ns = sorted({k[1] for k in table if k[1]})
  with open(seeds[0]) as f:
    header = json.load(f).get("header") or ["the classification preset of the reproduce script"]
  described = header[0].removeprefix("config: ")  # e.g. "tiny preset, dataset ..., model mlp, ..."
  described = described[:1].upper() + described[1:]
  lines = ["## Classification: MaxRL against exact maximum likelihood", "",
           f"{described}, {len(seeds)} seeds; "
           "held-out pass@1 / pass@128, mean ± std over seeds (`experiments.classification_sweep`).", "",
           "| objective | " + " | ".join(f"N={n}" for n in ns) + " |", "|" + "---|" * (len(ns) + 1)]
  for obj in objectives:
    cells = []
    for n in ns:
      vals = table.get((obj, n)) or table.get((obj, 0)) if obj == "cross_entropy" else table.get((obj, n))
      if not vals:
        cells.append("-")
        continue
      arr = np.asarray(vals)
      cells.append(f"{arr[:, 0].mean():.3f} ± {arr[:, 0].std(ddof=1) if len(arr) > 1 else 0:.3f} / "
                   f"{arr[:, 1].mean():.3f}")
    lines.append(f"| {obj} | " + " | ".join(cells) + " |")
  lines += ["", "(cross-entropy does not sample: the same value in every column.)", "", PAPER_CLS, ""]
  seed0 = os.path.dirname(seeds[0])
  lines += [f"Plots of the first seed ({os.path.basename(seed0)}):", ""]
  for plot in ("pass_vs_N.png", "training_curves.png", "grad_norms.png"):
    if os.path.exists(os.path.join(seed0, plot)):
      target = f"classification_{plot}"
      shutil.copy(os.path.join(seed0, plot), os.path.join(figures_dir, target))
      lines += [f"![classification {plot}]({rel_figures}/{target})", ""]
  return lines


def main(argv):
  del argv
  root, out = _ROOT.value, _OUT.value
  os.makedirs(_FIGURES.value, exist_ok=True)
  rel = os.path.relpath(_FIGURES.value, os.path.dirname(out) or ".")
  wall = f"{_WALL.value / 60:.1f} min" if _WALL.value else "not recorded"
  if _PRESET.value not in PRESET_SCOPE:
    raise app.UsageError(f"--preset={_PRESET.value!r}; allowed: {sorted(PRESET_SCOPE)}.")
  head = git_commit()
  produced = f"`{_COMMIT.value}`" if _COMMIT.value else head
  written = "" if produced == head else f" This report was written at commit {head}."
  lines = [f"# Results: the paper's ablations ({_PRESET.value} preset)", "",
           f"Produced by `bash scripts/reproduce.sh {_PRESET.value}` (workdirs under `{root}`) at commit "
           f"{produced}, which ends with `python scripts/report.py --root={root} --preset={_PRESET.value}`."
           f"{written}", "", f"Hardware: {hardware()}. Wall time of the whole run: {wall}.", "",
           "Every number below was measured in that run. Hyperparameters are the same for every objective "
           "(only the advantage rule changes), as in the paper. " + PRESET_SCOPE[_PRESET.value], ""]
  if _NOTES.value and os.path.exists(_NOTES.value):
    lines += [open(_NOTES.value).read().strip(), ""]
  lines += section(root, "objectives", "Maze: objective comparison", PAPER_MAZE, _FIGURES.value, rel)
  lines += section(root, "scaling", "Maze: rollout scaling", PAPER_SCALING, _FIGURES.value, rel)
  lines += section(root, "data_scarce", "Maze: data-scarce regime", PAPER_SCARCE, _FIGURES.value, rel)
  lines += section(root, "signal", "Maze: training signal", PAPER_SIGNAL, _FIGURES.value, rel)
  lines += classification_section(root, _FIGURES.value, rel)
  run_logging.write_text_atomic(out, "\n".join(lines) + "\n")  # A reader never sees half a report.
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
