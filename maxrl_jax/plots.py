"""PNG curves of a run, drawn from its <workdir>/metrics.jsonl.

    python -m maxrl_jax.plots --workdir=workdirs/maze          # or, in Python: plots.plot_run(workdir)

`plot_run` writes, for whatever the run logged:

  curves_heldout.png      held-out pass@k (and the pass rate) against the step, one panel per evaluation
                          phase ("eval": the held-out split; "eval_train": a fixed train subset)
  curves_<phase>.png      one per training phase ("sft", "rl", "train"): reward / pass rate, loss, entropy,
                          response length, gradient norm, ... against the step

Only the fields that exist are drawn; a run with nothing to draw writes nothing. matplotlib is imported
on first use.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

EVAL_PHASES = ("eval", "eval_train")
# Fields of training records, in the order their panels appear (at most MAX_PANELS of them).
TRAIN_FIELDS = (
    ("reward", "reward"),
    ("pass_rate", "pass rate (train batches)"),
    ("fraction_solved", "fraction of prompts solved"),
    ("frac_solved", "fraction of inputs solved"),
    ("loss", "loss"),
    ("entropy", "entropy (nats / token)"),
    ("mean_response_length", "response length (tokens)"),
    ("response_length", "response length (tokens)"),
    ("grad_norm", "gradient norm"),
    ("token_accuracy", "token accuracy"),
    ("top1", "top-1 accuracy"),
    ("nll", "NLL"),
    ("truncated_fraction", "truncated fraction"),
    ("lr", "learning rate"),
)
MAX_PANELS = 9
MAX_CURVES = 6  # pass@k curves per held-out panel (log-spaced ks when there are more)
_PASS_AT = re.compile(r"^pass@(\d+)$")


def read_metrics(workdir: str) -> list[dict]:
  """The records of <workdir>/metrics.jsonl (an unreadable last line, cut by a kill, is dropped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  records = []
  if not os.path.exists(path):
    return records
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        break
  return records


def _number(value: Any) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value)


def _series(records: Sequence[Mapping[str, Any]], phase: str, key: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `key` in the records of `phase`; the last record of a step wins."""
  by_step = {}
  for r in records:
    if r.get("phase") == phase and isinstance(r.get("step"), int):
      value = _number(r.get(key))
      if value is not None and math.isfinite(value):
        by_step[r["step"]] = value
  steps = sorted(by_step)
  return steps, [by_step[s] for s in steps]


def _pick_ks(ks: Sequence[int]) -> list[int]:
  ks = sorted(set(ks))
  if len(ks) <= MAX_CURVES:
    return ks
  stride = math.ceil((len(ks) - 1) / (MAX_CURVES - 1))
  picked = ks[::stride]
  return picked if picked[-1] == ks[-1] else picked + [ks[-1]]


def _title(workdir: str) -> str:
  config_path = os.path.join(workdir, "config.json")
  label = os.path.basename(os.path.normpath(workdir))
  try:
    with open(config_path, encoding="utf-8") as f:
      config = json.load(f)
    objective = (config.get("objective") or {}).get("name")
    parts = [config.get("task"), config.get("preset"), objective]
    label += " (" + ", ".join(str(p) for p in parts if p) + ")"
  except (OSError, ValueError, AttributeError):
    pass
  return label


def _plot_heldout(plt, ticker, records, workdir: str, title: str) -> str | None:
  phases = []
  for phase in EVAL_PHASES:
    ks = sorted({int(m.group(1)) for r in records if r.get("phase") == phase for m in
                 [_PASS_AT.match(k) for k in r] if m})
    if ks or _series(records, phase, "pass_rate")[0]:
      phases.append((phase, ks))
  if not phases:
    return None
  fig, axes = plt.subplots(1, len(phases), figsize=(6.0 * len(phases), 4.2), squeeze=False)
  for ax, (phase, ks) in zip(axes[0], phases):
    for k in _pick_ks(ks):
      steps, values = _series(records, phase, f"pass@{k}")
      ax.plot(steps, values, marker="o", markersize=3, label=f"pass@{k}")
    if not ks:
      steps, values = _series(records, phase, "pass_rate")
      ax.plot(steps, values, marker="o", markersize=3, label="pass rate")
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.set_ylabel("pass@k")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("held-out" if phase == "eval" else "train subset" if phase == "eval_train" else phase)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  path = os.path.join(workdir, "curves_heldout.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _plot_phase(plt, ticker, records, phase: str, workdir: str, title: str) -> str | None:
  panels, labels_seen = [], set()
  for key, label in TRAIN_FIELDS:
    steps, values = _series(records, phase, key)
    if steps and label not in labels_seen:
      panels.append((key, label, steps, values))
      labels_seen.add(label)
    if len(panels) == MAX_PANELS:
      break
  if not panels:
    return None
  ncols = min(3, len(panels))
  nrows = math.ceil(len(panels) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.3 * nrows), squeeze=False)
  for ax, (key, label, steps, values) in zip(axes.flat, panels):
    ax.plot(steps, values, marker="o" if len(steps) < 40 else None, markersize=3)
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.ticklabel_format(axis="y", useOffset=False, style="plain")
    if key in ("grad_norm", "lr") and min(values) > 0 and max(values) / min(values) > 100:
      ax.set_yscale("log")
    ax.grid(alpha=0.3)
  for ax in list(axes.flat)[len(panels):]:
    ax.axis("off")
  fig.suptitle(f"{title}: {phase}", fontsize=10)
  fig.tight_layout()
  path = os.path.join(workdir, f"curves_{phase}.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def plot_run(workdir: str) -> list[str]:
  """Writes the PNG curves of a run into its workdir (see the module doc) and returns their paths."""
  records = read_metrics(workdir)
  if not records:
    return []
  import matplotlib  # pylint: disable=import-outside-toplevel

  if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel

  title = _title(workdir)
  paths = [_plot_heldout(plt, ticker, records, workdir, title)]
  train_phases = list(dict.fromkeys(r.get("phase") for r in records
                                    if r.get("phase") not in EVAL_PHASES and isinstance(r.get("phase"), str)))
  paths += [_plot_phase(plt, ticker, records, phase, workdir, title) for phase in train_phases]
  return [p for p in paths if p]


def main(argv: Sequence[str] | None = None) -> None:
  import argparse  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description="Draws the PNG curves of a run from its metrics.jsonl.")
  parser.add_argument("--workdir", required=True, help="The run's workdir (holds metrics.jsonl).")
  args = parser.parse_args(argv)
  paths = plot_run(args.workdir)
  print("\n".join(paths) if paths else f"nothing to plot in {args.workdir}/metrics.jsonl")


if __name__ == "__main__":
  main()
