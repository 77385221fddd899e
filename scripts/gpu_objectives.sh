#!/usr/bin/env bash
# The maze objective table on one accelerator in one go: configs/maze_objectives.py:gpu trains 8 objectives
# x 3 seeds (24 members) at 9x9 for 2000 RL steps as ONE population (maxrl_jax/population.py: one jitted
# program, members stacked and vmapped), one SFT policy per seed, 256 held-out mazes x 32 samples every 250
# steps, then aggregates results.{json,md} and the plots. A call cut short by its time limit continues where
# it stopped (from the population's checkpoints) when given the same WORKDIR again.
#
#   bash scripts/gpu_objectives.sh [OUT_DIR]                 # OUT_DIR defaults to $OUT, else workdirs/gpu_objectives
#   WHEELS=dir bash scripts/gpu_objectives.sh OUT            # first installs the wheels in dir (--no-deps) under
#                                                            # /tmp/site, for an image without ml_collections/tfds
#   PRESET=tiny bash scripts/gpu_objectives.sh /tmp/o        # a dry run at toy size, any machine
#
# Writes into OUT_DIR: results.md, results.json, pass_at_k.png, training_curves.png, heldout_curves.png,
# population.png, log.txt and objectives.tar.gz (the population's and every member's config, metrics.jsonl
# and summary.json, without checkpoints). Exit status: the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-workdirs/gpu_objectives}}"
preset="${PRESET:-gpu}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
work="${WORKDIR:-$out/objectives}"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install --quiet --no-deps --target /tmp/site "$WHEELS"/*.whl >>"$out/log.txt" 2>&1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
status=0
start=$(date +%s)
python3 -m experiments.maze_objectives --config="configs/maze_objectives.py:$preset" --workdir="$work" \
  >>"$out/log.txt" 2>&1 || status=$?
echo "population trained and aggregated after $(( $(date +%s) - start )) s (status $status)" | tee -a "$out/log.txt"
for name in results.md results.json pass_at_k.png training_curves.png heldout_curves.png; do
  [ -f "$work/$name" ] && cp "$work/$name" "$out/"
done
[ -f "$work/populations/all/population.png" ] && cp "$work/populations/all/population.png" "$out/"
(cd "$work" && find . -name checkpoints -prune -o -name tfds -prune -o -name .jax_cache -prune -o \
  \( -name config.json -o -name metrics.jsonl -o -name summary.json \) -print | tar -czf "$out/objectives.tar.gz" -T -)
[ -z "${WORKDIR:-}" ] && [ "$status" -eq 0 ] && rm -rf "$work"
exit "$status"
