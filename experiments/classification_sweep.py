r"""Sweep objectives x rollout budget N on the classification testbed; writes a table, plots and grad norms.

    python -m experiments.classification_sweep --config=configs/classification.py:tiny --workdir=/tmp/cls_sweep

Every (objective, N) pair runs `train_and_evaluate` in this process (workdir/runs/<objective>_N<N>/);
cross_entropy does not sample, so it runs once and is drawn as a horizontal line. Pairs an estimator does not
allow are skipped and listed with the reason (N = 1 for rloo, grpo and maxrl: a group of one has no baseline,
and MaxRL's advantage is identically 0). Finished runs (summary.json present) are reused unless --rerun.

Outputs in --workdir:
  results.json        one row per pair: status, held-out and train metrics, timings.
  results.md          markdown tables of held-out pass@1 and pass@128 (objective x N) and the run list.
  pass_vs_N.png       held-out pass@1 and pass@128 against N per objective, cross-entropy as a line.
  training_curves.png held-out pass@1 against training step, one panel per objective.
  grad_norms.png/json per-input gradient norm against pass rate for CE, MaxRL, GRPO and REINFORCE on the
                      checkpoint of --grad_norm_run (see maxrl_jax/classification/grad_norms.py).
Any config field can be overridden as in maxrl_jax.main, e.g. --config.train.num_steps=1000.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/classification.py:tiny", "Base config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory of the sweep.", required=True)
_OBJECTIVES = flags.DEFINE_list("objectives", ["cross_entropy", "reinforce", "rloo", "grpo", "maxrl"],
                                "Objectives; 'name:key=value' passes estimator kwargs, e.g. maclaurin:order=16.")
_NUM_SAMPLES = flags.DEFINE_list("num_samples", ["1", "4", "16", "64", "256", "1024"], "Rollouts per input N.")
_GRAD_NORM_RUN = flags.DEFINE_string(
    "grad_norm_run", "cross_entropy", "Objective whose finished checkpoint the gradient-norm analysis uses "
    "(its largest N); empty to skip the analysis.")
_GRAD_NORM_SAMPLES = flags.DEFINE_integer("grad_norm_samples", 1024, "N for the sampled objectives in the "
                                          "gradient-norm analysis.")
_RERUN = flags.DEFINE_bool("rerun", False, "Rerun pairs whose summary.json already exists.")

PLOT_KS = (1, 128)


def parse_objective(spec: str) -> tuple[str, dict]:
  """'maclaurin:order=16' -> ('maclaurin', {'order': 16})."""
  name, _, rest = spec.partition(":")
  kwargs = {}
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    for cast in (int, float):
      try:
        value = cast(value)
        break
      except ValueError:
        continue
    if value in ("True", "False"):
      value = value == "True"
    kwargs[key.strip()] = value
  return name.strip(), kwargs


def run_label(name: str, kwargs: dict) -> str:
  return name + "".join(f"_{k}{v}" for k, v in sorted(kwargs.items()))


def plan_runs(objective_specs, num_samples_list):
  """[(label, name, kwargs, N, skip_reason or None)] for the sweep, cross_entropy once."""
  from maxrl_jax.classification import objectives  # pylint: disable=g-import-not-at-top

  plan = []
  for spec in objective_specs:
    name, kwargs = parse_objective(spec)
    if name == objectives.CROSS_ENTROPY:
      plan.append((name, name, {}, None, None))
      continue
    for n in num_samples_list:
      reason = None
      try:
        objectives.make_objective(name, kwargs, n)
      except ValueError as e:
        reason = f"N = 1 is not allowed for {name} (it needs N >= 2)" if n == 1 else str(e)
      plan.append((run_label(name, kwargs), name, kwargs, n, reason))
  return plan


def _read_curve(run_dir: str, phase: str = "eval", key: str = "pass@1"):
  steps, values = [], []
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return steps, values
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if record.get("phase") == phase and key in record:
        steps.append(record["step"])
        values.append(record[key])
  return steps, values


def write_tables(rows, workdir, header_lines):
  """results.json and results.md."""
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"header": header_lines, "runs": rows}, f, indent=2)
  labels = list(dict.fromkeys(r["label"] for r in rows))
  ns = sorted({r["num_samples"] for r in rows if r["num_samples"] is not None})
  lines = ["# Classification sweep", ""] + [f"- {h}" for h in header_lines] + [""]
  for metric, title in (("pass@1", "Held-out pass@1"), ("pass@128", "Held-out pass@128"),
                        ("train_pass_rate", "Train-subset pass rate")):
    lines += [f"## {title}", "", "| objective | " + " | ".join(f"N={n}" for n in ns) + " |",
              "|---|" + "---:|" * len(ns)]
    for label in labels:
      mine = {r["num_samples"]: r for r in rows if r["label"] == label}
      if None in mine:  # cross_entropy: the same value in every column.
        value = mine[None].get(metric)
        cells = [f"{value:.4f}" if value is not None else "-"] * len(ns)
      else:
        cells = []
        for n in ns:
          r = mine.get(n)
          if r is None:
            cells.append("")
          elif r["status"] != "ok":
            cells.append("n/a")
          else:
            cells.append(f"{r[metric]:.4f}")
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
  lines += ["## Runs", "", "| run | status | pass@1 | pass@128 | top-1 | train pass rate | init pass rate | "
            "train time (s) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if r["status"] == "ok":
      lines.append(f"| {r['run']} | ok | {r['pass@1']:.4f} | {r['pass@128']:.4f} | {r['top1']:.4f} | "
                   f"{r['train_pass_rate']:.4f} | {r['initial_pass_rate']:.4f} | {r['train_time_s']:.1f} |")
    else:
      lines.append(f"| {r['run']} | {r['status']} | | | | | | |")
  with open(os.path.join(workdir, "results.md"), "w", encoding="utf-8") as f:
    f.write("\n".join(lines) + "\n")


def plot_pass_vs_n(rows, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, axes = plt.subplots(1, len(PLOT_KS), figsize=(6 * len(PLOT_KS), 4.2))
  labels = [l for l in dict.fromkeys(r["label"] for r in rows) if l != "cross_entropy"]
  colors = dict(zip(labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
  ce = next((r for r in rows if r["label"] == "cross_entropy" and r["status"] == "ok"), None)
  for ax, k in zip(axes, PLOT_KS):
    for label in labels:
      pts = sorted((r["num_samples"], r[f"pass@{k}"]) for r in rows if r["label"] == label and r["status"] == "ok")
      if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label, color=colors[label])
    if ce is not None:
      ax.axhline(ce[f"pass@{k}"], color="black", ls="--", label="cross-entropy (exact ML)")
    init = next((r["initial_eval"].get(f"pass@{k}") for r in rows if r["status"] == "ok"
                 and r.get("initial_eval")), None)
    if init is not None:
      ax.axhline(init, color="gray", ls=":", label="initial policy")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rollouts per input N")
    ax.set_ylabel(f"held-out pass@{k}")
    ax.set_title(f"held-out pass@{k} vs N")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_training_curves(rows, workdir, path):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  labels = [l for l in dict.fromkeys(r["label"] for r in rows) if l != "cross_entropy"]
  ce = next((r for r in rows if r["label"] == "cross_entropy" and r["status"] == "ok"), None)
  fig, axes = plt.subplots(1, max(len(labels), 1), figsize=(4.2 * max(len(labels), 1), 3.8), sharey=True)
  axes = [axes] if not hasattr(axes, "__len__") else list(axes)
  cmap = plt.get_cmap("viridis")
  all_ns = sorted({r["num_samples"] for r in rows if r["num_samples"]})
  for ax, label in zip(axes, labels):
    for r in rows:
      if r["label"] != label or r["status"] != "ok":
        continue
      steps, values = _read_curve(os.path.join(workdir, "runs", r["run"]))
      color = cmap(all_ns.index(r["num_samples"]) / max(len(all_ns) - 1, 1))
      ax.plot(steps, values, color=color, label=f"N={r['num_samples']}")
    if ce is not None:
      steps, values = _read_curve(os.path.join(workdir, "runs", ce["run"]))
      ax.plot(steps, values, color="black", ls="--", label="cross-entropy")
    ax.set_title(label)
    ax.set_xlabel("training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("held-out pass@1")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Keep orbax/TFDS INFO lines out of the sweep log.
  import jax  # pylint: disable=g-import-not-at-top
  from maxrl_jax.classification import grad_norms  # pylint: disable=g-import-not-at-top
  from maxrl_jax import train as train_lib  # pylint: disable=g-import-not-at-top

  base = _CONFIG.value
  workdir = os.path.abspath(os.path.expanduser(_WORKDIR.value))
  os.makedirs(os.path.join(workdir, "runs"), exist_ok=True)
  num_samples_list = [int(n) for n in _NUM_SAMPLES.value]
  plan = plan_runs(_OBJECTIVES.value, num_samples_list)
  runnable = [p for p in plan if p[4] is None]
  print(f"Sweep: {len(runnable)} runs ({len(plan) - len(runnable)} skipped pairs) -> {workdir}", flush=True)
  for label, _, _, n, reason in plan:
    if reason:
      print(f"  skip {label} N={n}: {reason}", flush=True)

  rows = []
  sweep_start = time.time()
  done = trained = 0
  for label, name, kwargs, n, reason in plan:
    run = label if n is None else f"{label}_N{n}"
    row = {"run": run, "label": label, "objective": name, "kwargs": kwargs, "num_samples": n}
    if reason:
      rows.append({**row, "status": f"skipped: {reason}"})
      continue
    run_dir = os.path.join(workdir, "runs", run)
    summary_path = os.path.join(run_dir, "summary.json")
    if _RERUN.value or not os.path.exists(summary_path):
      if _RERUN.value and os.path.exists(run_dir):
        for leftover in ("metrics.jsonl", "summary.json"):
          if os.path.exists(os.path.join(run_dir, leftover)):
            os.remove(os.path.join(run_dir, leftover))
        for leftover in ("checkpoints", "tensorboard"):  # Otherwise the run would resume from its checkpoint.
          shutil.rmtree(os.path.join(run_dir, leftover), ignore_errors=True)
      config = copy.deepcopy(base)
      config.objective.name = name
      for key, value in kwargs.items():
        config.objective["pkpo_form" if key == "form" else key] = value
      if n is not None:
        config.rollout.num_samples = n
      config.progress_bar = False
      train_lib.train_and_evaluate(config, run_dir)
      trained += 1
    with open(summary_path, encoding="utf-8") as f:
      summary = json.load(f)
    done += 1
    elapsed = time.time() - sweep_start
    eta = elapsed / done * (len(runnable) - done)
    print(f"[{done}/{len(runnable)}] {run}: held-out pass@1 {summary['eval']['pass@1']:.4f}, pass@128 "
          f"{summary['eval']['pass@128']:.4f} ({summary['train_time_s']:.1f} s train) | sweep "
          f"{elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
    rows.append({**row, "status": "ok", **{f"pass@{k}": summary["eval"].get(f"pass@{k}") for k in (
        1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)}, "top1": summary["eval"]["top1"],
                 "pass_rate": summary["eval"]["pass_rate"],
                 "train_pass_rate": (summary.get("eval_train") or {}).get("pass_rate"),
                 "initial_pass_rate": (summary.get("initial_eval") or {}).get("pass_rate"),
                 "initial_eval": summary.get("initial_eval") or {},
                 "train_time_s": summary["train_time_s"], "total_time_s": summary["wall_time_s_this_launch"],
                 "steps": summary["steps"], "hardware": summary["hardware"]})

  if _GRAD_NORM_RUN.value:
    candidates = [r for r in rows if r["label"] == _GRAD_NORM_RUN.value and r["status"] == "ok"]
    if candidates:
      source = max(candidates, key=lambda r: r["num_samples"] or 0)
      grad_norms.analyze(os.path.join(workdir, "runs", source["run"]), out_dir=workdir,
                         num_samples=_GRAD_NORM_SAMPLES.value, data_dir=base.data.get("data_dir"))
      print(f"gradient norms of {source['run']}'s checkpoint -> {workdir}/grad_norms.png", flush=True)
  hw = next((r["hardware"] for r in rows if r["status"] == "ok"), {})
  header = [
      f"config: {base.get('preset', '?')} preset, dataset {base.data.name}, model {base.model.name}, "
      f"{base.train.num_steps if base.train.num_steps > 0 else base.train.num_epochs} "
      f"{'steps' if base.train.num_steps > 0 else 'epochs'}, batch {base.train.batch_size}, "
      f"{base.optim.name} lr {base.optim.learning_rate}",
      f"hardware: {hw.get('num_devices', '?')} x {hw.get('device_kind', '?')} ({os.cpu_count()} CPU cores, "
      f"{_cpu_name()}), jax {jax.__version__}, python {platform.python_version()}",
      f"sweep wall time: {(time.time() - sweep_start) / 60:.1f} min for {trained} runs trained now and "
      f"{done - trained} reused from earlier launches, tables, plots and gradient norms",
  ]
  write_tables(rows, workdir, header)
  plot_pass_vs_n(rows, os.path.join(workdir, "pass_vs_N.png"))
  plot_training_curves(rows, workdir, os.path.join(workdir, "training_curves.png"))

  print(open(os.path.join(workdir, "results.md"), encoding="utf-8").read())
  print(f"Sweep finished in {(time.time() - sweep_start) / 60:.1f} min.")


if __name__ == "__main__":
  app.run(main)
