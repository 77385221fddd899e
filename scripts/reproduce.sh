#!/usr/bin/env bash
# Reproduces the paper's ablations and writes the results report.
#
#   bash scripts/reproduce.sh cpu  [ROOT]   # everything at CPU scale, 3 seeds (63 min on 2 cores, docs/results.md)
#   bash scripts/reproduce.sh paper [ROOT]  # the paper's sizes, for TPU/GPU (days on one accelerator)
#   bash scripts/reproduce.sh tiny [ROOT]   # every step at test size (minutes); checks the pipeline only
#
# Each ablation writes its runs under ROOT/<ablation>/runs/<name>; re-running skips finished runs and
# resumes unfinished ones, so an interrupted reproduction continues where it stopped. The cpu and paper
# presets write docs/results.md (with docs/results_analysis.md, the hand-written reading, included);
# tiny writes ROOT/report/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-cpu}"
seeds=(0 1 2)
cls_args=()
report_args=()
case "$preset" in
  cpu) cls_preset=tiny ;;
  paper) cls_preset=imagenet ;;
  tiny)
    cls_preset=tiny
    seeds=(0 1)
    cls_args=(--objectives=cross_entropy,maxrl --num_samples=4 --grad_norm_samples=8
              --config.data.name=procedural_classes/c100 --config.model.hidden_sizes="(32,)"
              --config.train.batch_size=32 --config.train.num_steps=20 --config.train.steps_per_call=10
              --config.log_every_steps=10 --config.optim.warmup_steps=0 --config.eval.every_steps=10
              --config.eval.batch_size=500 --config.eval.num_train_examples=200) ;;
  *) echo "usage: bash scripts/reproduce.sh {cpu|paper|tiny} [ROOT]" >&2; exit 2 ;;
esac
root="${2:-workdirs/reproduce_${preset}}"
if [ "$preset" = tiny ]; then
  report_args=(--out="$root/report/results.md" --figures="$root/report/figures" --notes="")
fi
mkdir -p "$root"
start=$(date +%s)

python -m experiments.maze_objectives --config="configs/maze_objectives.py:${preset}" --workdir="$root/objectives"
python -m experiments.rollout_scaling --config="configs/rollout_scaling.py:${preset}" --workdir="$root/scaling"
python -m experiments.data_scarce --config="configs/data_scarce.py:${preset}" --workdir="$root/data_scarce"
python -m experiments.training_signal --config="configs/training_signal.py:${preset}" --workdir="$root/signal" \
  --config.objectives_workdir="$root/objectives"
for seed in "${seeds[@]}"; do
  python -m experiments.classification_sweep --config="configs/classification.py:${cls_preset}" \
    --workdir="$root/classification/seed${seed}" --config.seed="$seed" ${cls_args[@]+"${cls_args[@]}"}
done

end=$(date +%s)
python scripts/report.py --root="$root" --preset="$preset" --wall_time_s=$((end - start)) \
  ${report_args[@]+"${report_args[@]}"}
