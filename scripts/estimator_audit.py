r"""Audits every registered advantage estimator by exact enumeration and plots its implied weight w(p).

    python scripts/estimator_audit.py --num_samples=16 --out_dir=docs/audit

Writes `<out_dir>/estimator_audit.png` (population weights w(p) on log axes: RL, GRPO, MaxRL of order
T in {2, 4, 16, 64, 256}, ML, with each estimator's exact `expected_weight` at N overlaid as markers),
`<out_dir>/estimator_audit.md` (a table of the order T each rule is unbiased for, found by matching its
exact weight against w_T for T = 1..N) and `<out_dir>/estimator_audit.json`.
"""

from __future__ import annotations

import json
import os
import sys

# The audit is exact enumeration on the host: run JAX on the CPU (and skip probing for TPU / GPU backends,
# which logs "Unable to initialize backend 'tpu'" on machines without one) unless JAX_PLATFORMS says otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a clone too.

from maxrl_jax import estimators as est  # noqa: E402

_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 16, "Group size N at which estimators are audited.")
_OUT_DIR = flags.DEFINE_string("out_dir", "docs/audit", "Where to write the PNG, markdown and JSON.")
_TOL = flags.DEFINE_float("tol", 1e-6, "Max relative deviation from w_T to call a rule unbiased for J_T.")


def audited_rules(n: int) -> list[tuple[str, str, dict]]:
  """(label, registry name, kwargs) of every rule audited at group size n."""
  return [
      ("reinforce", "reinforce", {}),
      ("rloo", "rloo", {}),
      ("dr_grpo", "dr_grpo", {}),
      ("grpo", "grpo", {}),
      ("maxrl", "maxrl", {}),
      ("maxrl (zero_failed_groups=False)", "maxrl", {"zero_failed_groups": False}),
      (f"maclaurin T={max(n // 4, 1)}", "maclaurin", {"order": max(n // 4, 1)}),
      (f"maclaurin T={n}", "maclaurin", {"order": n}),
      ("pkpo k=4", "pkpo", {"k": min(4, n)}),
  ]


def implied_order(weights: np.ndarray, p: np.ndarray, n: int, tol: float) -> tuple[int | None, float]:
  """The T in 1..n whose w_T matches `weights` best, with the max relative error (None if > tol)."""
  errors = []
  for order in range(1, n + 1):
    target = -np.expm1(order * np.log1p(-p)) / p
    errors.append(np.max(np.abs(weights / target - 1.0)))
  best = int(np.argmin(errors))
  return (best + 1 if errors[best] <= tol else None), float(errors[best])


def run_audit(n: int, out_dir: str, tol: float = 1e-6) -> dict:
  os.makedirs(out_dir, exist_ok=True)
  p_curve = np.logspace(-3, np.log10(0.999), 400)
  p_marks = np.array([0.002, 0.005, 0.01, 0.03, 0.1, 0.3, 0.5, 0.7, 0.9, 0.97, 0.99])
  p_check = np.concatenate([p_marks, np.linspace(0.05, 0.95, 19)])

  fig, ax = plt.subplots(figsize=(12, 6.5))
  ax.plot(p_curve, np.ones_like(p_curve), "k-", lw=1.5, label="RL: w = 1")
  ax.plot(p_curve, 1 / np.sqrt(p_curve * (1 - p_curve)), "k--", lw=1.5, label="GRPO (large N): 1/sqrt(p(1-p))")
  cmap = plt.get_cmap("viridis")
  for i, order in enumerate((2, 4, 16, 64, 256)):
    ax.plot(p_curve, -np.expm1(order * np.log1p(-p_curve)) / p_curve, color=cmap(i / 5), lw=1.3,
            label=f"MaxRL T={order}")
  ax.plot(p_curve, 1 / p_curve, "r-", lw=1.5, label="ML: 1/p")
  k_plot = min(4, n)
  ax.plot(p_curve, k_plot * (1 - p_curve) ** (k_plot - 1), ":", color="tab:olive", lw=1.5,
          label=f"pass@{k_plot}: k (1-p)^(k-1)")

  rows = []
  markers = iter("osD^v<>px*h")
  for label, name, kwargs in audited_rules(n):
    w_marks = est.expected_weight(name, n, p_marks, **kwargs)
    w_check = est.expected_weight(name, n, p_check, **kwargs)
    order, err = implied_order(w_check, p_check, n, tol)
    if name == "pkpo":
      k = kwargs["k"]
      pk_err = float(np.max(np.abs(w_check / (k * (1 - p_check) ** (k - 1)) - 1)))
      verdict = f"grad pass@{k} (max rel. error {pk_err:.1e})" if pk_err <= tol else "none"
    elif order is not None:
      verdict = f"grad J_{order} (max rel. error {err:.1e})"
    elif np.allclose(w_check, w_check[0], rtol=tol):
      verdict = f"{w_check[0]:.4f} x grad J_1 (a scaled RL gradient)"
    else:
      verdict = "none of J_1..J_N"
    rows.append({"rule": label, "name": name, "kwargs": kwargs, "implied_order": order,
                 "closest_order_error": err, "unbiased_for": verdict,
                 "weight_at": {f"{q:g}": float(w) for q, w in zip(p_marks, w_marks)}})
    ax.plot(p_marks, w_marks, linestyle="none", marker=next(markers), ms=7, mfc="none", mew=1.4,
            label=f"{label} at N={n}")

  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("pass rate p")
  ax.set_ylabel("population weight w(p)   (E[grad] = w(p) grad p)")
  ax.set_title(f"Exact implied weights of advantage estimators, N = {n}")
  ax.grid(True, which="both", alpha=0.25)
  ax.set_ylim(1e-2, 2e3)
  ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
  fig.tight_layout()
  png = os.path.join(out_dir, "estimator_audit.png")
  fig.savefig(png, dpi=120)
  plt.close(fig)

  lines = [f"# Estimator audit at N = {n}", "",
           "Exact expected weight by enumerating K ~ Binomial(N, p) (`maxrl_jax.estimators.expected_weight`), "
           f"matched against w_T(p) = (1-(1-p)^T)/p for T = 1..N at {len(p_check)} pass rates in [0.002, 0.99].",
           "", "| rule | unbiased for | w(0.01) | w(0.5) | w(0.99) |", "|---|---|---|---|---|"]
  for row in rows:
    w = row["weight_at"]
    lines.append(f"| {row['rule']} | {row['unbiased_for']} | {w['0.01']:.4g} | {w['0.5']:.4g} | {w['0.99']:.4g} |")
  lines += ["", f"Reference: w_N(0.01) = {-np.expm1(n * np.log1p(-0.01)) / 0.01:.4g}, "
                f"w_(N-1)(0.01) = {-np.expm1((n - 1) * np.log1p(-0.01)) / 0.01:.4g}, ML 1/p = 100.", ""]
  md = os.path.join(out_dir, "estimator_audit.md")
  with open(md, "w") as f:
    f.write("\n".join(lines))
  with open(os.path.join(out_dir, "estimator_audit.json"), "w") as f:
    json.dump({"num_samples": n, "rules": rows}, f, indent=1)
  print("\n".join(lines))
  print(f"wrote {png} and {md}")
  return {"png": png, "markdown": md, "rows": rows}


def main(argv):
  del argv
  if _NUM_SAMPLES.value < 2:
    sys.exit(f"--num_samples={_NUM_SAMPLES.value}: the audit needs N >= 2 (MaxRL is 0 at N = 1).")
  run_audit(_NUM_SAMPLES.value, _OUT_DIR.value, _TOL.value)


if __name__ == "__main__":
  app.run(main)
