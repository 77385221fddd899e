#!/usr/bin/env bash
# The long-horizon maze objective comparison on one GPU in one go (configs/maze_objectives.py:gpu: MaxRL,
# GRPO and RLOO, 2000 RL steps at 9x9, one SFT policy per seed, 512 held-out mazes x 32 samples every 250
# steps). The seeds run side by side, one process each holding a share of the card (the policy is small and
# a single run leaves most of an H100/H200 idle); a last call aggregates the finished runs into
# results.{json,md} and the plots. Budget on one H200: three default-preset runs of 2000 RL steps side by side
# took 148 s in all (measured); here each process runs three such runs one after another, plus its SFT and
# larger evaluations: an estimated 8-10 minutes, not yet measured. Finished runs are skipped on a rerun, so a
# call cut short by its time limit continues where it stopped when given the same OUT_DIR again.
#
#   bash scripts/gpu_objectives.sh [OUT_DIR]                 # OUT_DIR defaults to $OUT, else workdirs/gpu_objectives
#   WHEELS=dir bash scripts/gpu_objectives.sh OUT            # first installs the wheels in dir (--no-deps) under
#                                                            # /tmp/site, for an image without ml_collections/tfds
#   PRESET=long_tiny SEEDS="0 1" bash scripts/gpu_objectives.sh /tmp/o   # a dry run at toy size, any machine
#
# Writes into OUT_DIR: results.md, results.json, pass_at_k.png, training_curves.png, heldout_curves.png, log.txt
# and objectives.tar.gz
# (every run's config, metrics.jsonl and summary.json, without checkpoints). Exit status: the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-workdirs/gpu_objectives}}"
preset="${PRESET:-gpu}"
seeds="${SEEDS:-0 1 2}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="${WORKDIR:-$out/objectives}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install --quiet --no-deps --target /tmp/site "$WHEELS"/*.whl >>"$out/log.txt" 2>&1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
num_seeds=$(echo "$seeds" | wc -w)
# Each process may hold this share of the accelerator's memory (JAX preallocates 75% by default).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-$(python3 -c "print(round(0.9 / $num_seeds, 2))")}"
status=0
start=$(date +%s)
pids=()
for seed in $seeds; do
  python3 -m experiments.maze_objectives --config="configs/maze_objectives.py:$preset" --workdir="$work" \
    --config.seeds="($seed,)" >"$out/seed$seed.log" 2>&1 &
  pids+=("$!")
done
for pid in "${pids[@]}"; do
  wait "$pid" || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
done
echo "seeds done after $(( $(date +%s) - start )) s (status $status)" | tee -a "$out/log.txt"
seed_tuple="($(echo "$seeds" | tr ' ' ','),)"
python3 -m experiments.maze_objectives --config="configs/maze_objectives.py:$preset" --workdir="$work" \
  --config.seeds="$seed_tuple" >>"$out/log.txt" 2>&1 || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
echo "aggregated after $(( $(date +%s) - start )) s (status $status)" | tee -a "$out/log.txt"
for seed in $seeds; do tail -n 20 "$out/seed$seed.log" >>"$out/log.txt"; rm -f "$out/seed$seed.log"; done
for name in results.md results.json pass_at_k.png training_curves.png heldout_curves.png; do
  [ -f "$work/$name" ] && cp "$work/$name" "$out/"
done
(cd "$work" && find . -name checkpoints -prune -o -name tfds -prune -o -name .jax_cache -prune -o \
  \( -name config.json -o -name metrics.jsonl -o -name summary.json \) -print | tar -czf "$out/objectives.tar.gz" -T -)
[ -z "${WORKDIR:-}" ] && [ "$status" -eq 0 ] && rm -rf "$work"
exit "$status"
