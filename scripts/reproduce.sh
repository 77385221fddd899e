#!/usr/bin/env bash
# Reproduces the paper's ablations and writes docs/results.md.
#
#   bash scripts/reproduce.sh cpu  [ROOT]   # everything at CPU scale (2 cores: about an hour), 3 seeds
#   bash scripts/reproduce.sh paper [ROOT]  # the paper's sizes, for TPU/GPU (days on one accelerator)
#
# Each ablation writes its runs under ROOT/<ablation>/runs/<name>; re-running skips finished runs and
# resumes unfinished ones, so an interrupted reproduction continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-cpu}"
case "$preset" in
  cpu) cls_preset=tiny ;;
  paper) cls_preset=imagenet ;;
  *) echo "usage: bash scripts/reproduce.sh {cpu|paper} [ROOT]" >&2; exit 2 ;;
esac
root="${2:-workdirs/reproduce_${preset}}"
mkdir -p "$root"
start=$(date +%s)

python -m experiments.maze_objectives --config="configs/maze_objectives.py:${preset}" --workdir="$root/objectives"
python -m experiments.rollout_scaling --config="configs/rollout_scaling.py:${preset}" --workdir="$root/scaling"
python -m experiments.data_scarce --config="configs/data_scarce.py:${preset}" --workdir="$root/data_scarce"
python -m experiments.training_signal --config="configs/training_signal.py:${preset}" --workdir="$root/signal" \
  --config.objectives_workdir="$root/objectives"
for seed in 0 1 2; do
  python -m experiments.classification_sweep --config="configs/classification.py:${cls_preset}" \
    --workdir="$root/classification/seed${seed}" --config.seed="$seed"
done

end=$(date +%s)
python scripts/report.py --root="$root" --preset="$preset" --wall_time_s=$((end - start))
