#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one go: card and versions, our sampler against transformers'
# generate and the no-KV-cache baseline at the paper's maze scale, the full RL step against generate +
# fwd/bwd/AdamW, and how cost grows with N and with response length.
#
#   bash scripts/gpu_benchmark.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else workdirs/gpu_benchmark
#   SIZES="--num_prompts=2 --num_rollouts=4 --prompt_len=34 --new_tokens=6" \
#   SWEEP="--sweep_prompts=2 --sweep_rollouts=2,4 --sweep_new_tokens=4,6" bash scripts/gpu_benchmark.sh /tmp/b
#                                                    # (a dry run of the same steps at toy size, any machine)
#
# Writes versions.txt, paper_scale.json (with `targets`: sampler >= 5x generate, RL step <= 0.5 s), sweep.json
# and log.txt. Needs jax, flax, optax, torch and transformers (the H100 image has them all); no dataset,
# no download. Each step runs even if an earlier one failed; the exit status is the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-workdirs/gpu_benchmark}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX and torch share the card in one process: JAX takes half of its memory, not the default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
sizes="${SIZES:---num_prompts=32 --num_rollouts=128 --prompt_len=310 --new_tokens=100}"
sweep="${SWEEP:---sweep_prompts=32 --sweep_rollouts=16,64,128 --sweep_new_tokens=50,100,200}"
status=0
step() {  # step NAME COMMAND...: runs it, logs it with its wall time, keeps the first failure's status
  local name="$1"; shift
  local start; start=$(date +%s)
  echo "== $name: $*" | tee -a "$out/log.txt"
  "$@" >>"$out/log.txt" 2>&1
  local rc=$?
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

versions() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
  python3 - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "torch", "transformers"):
  try:
    print(name, importlib.import_module(name).__version__)
  except Exception as e:  # noqa: BLE001 - a missing package is reported, not fatal
    print(name, "missing:", e)
import jax
print("jax devices", jax.devices())
try:
  import torch
  print("torch cuda", torch.version.cuda, torch.cuda.is_available())
except Exception as e:  # noqa: BLE001
  print("torch:", e)
EOF
}

write_versions() { versions > "$out/versions.txt" 2>&1; }
step versions write_versions
# shellcheck disable=SC2086  # the size flags are meant to split
step paper_scale python3 scripts/bench_rollout.py $sizes --dtype=bfloat16 --rl_step --recompute_repeats=1 \
  --out="$out/paper_scale.json"
# shellcheck disable=SC2086
step sweep python3 scripts/bench_rollout.py --nomain $sizes $sweep --dtype=bfloat16 --out="$out/sweep.json"
cat "$out/versions.txt"
exit "$status"
