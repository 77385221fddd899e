#!/usr/bin/env bash
# Population training on one accelerator, in one device call: (1) scripts/bench_population.py times the
# population RL step for 1, 2, 8 and 24 members of the maze objective table against the same members as
# separate single runs; (2) scripts/gpu_objectives.sh trains the whole table (8 objectives x 3 seeds, 2000
# RL steps at 9x9) as one population and writes its results. Each part has its own time limit so that the
# call ends within about 10 minutes; a cut-short table resumes from its checkpoints when run again with the
# same WORKDIR.
#
#   bash scripts/gpu_population.sh OUT                    # on the GPU
#   WHEELS=dir bash scripts/gpu_population.sh OUT         # installs the wheels in dir first (gpu_objectives.sh)
#   DRY=1 bash scripts/gpu_population.sh /tmp/o           # the benchmark at toy size, any machine
#   DRY=1 TABLE=1 bash scripts/gpu_population.sh /tmp/o   # and the table at toy size (PRESET=tiny)
#
# Writes into OUT: population_bench.json, log.txt, and gpu_objectives.sh's files (results.md, results.json,
# population.png, objectives.tar.gz, ...). Exit status: the first failure's.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-workdirs/gpu_population}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then
  python3 -m pip install --quiet --no-deps --target /tmp/site "$WHEELS"/*.whl >>"$out/log.txt" 2>&1
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ -n "${DRY:-}" ]; then
  bench_args="--preset=tiny --sizes=1,2 --steps=1"; preset=tiny; bench_limit=300; table_limit=300
else
  bench_args="--sizes=1,2,8,24 --steps=5"; preset=gpu; bench_limit="${BENCH_LIMIT:-200}"; table_limit="${TABLE_LIMIT:-360}"
fi
status=0
start=$(date +%s)
echo "== bench_population: python3 scripts/bench_population.py $bench_args" | tee -a "$out/log.txt"
timeout "$bench_limit" python3 scripts/bench_population.py $bench_args --out="$out/population_bench.json" \
  >>"$out/log.txt" 2>&1 || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
echo "== bench_population: exit $status after $(( $(date +%s) - start )) s" | tee -a "$out/log.txt"
if [ -z "${DRY:-}" ] || [ -n "${TABLE:-}" ]; then
  PRESET="$preset" timeout "$table_limit" bash scripts/gpu_objectives.sh "$out" \
    || { rc=$?; [ "$status" -eq 0 ] && status=$rc; }
fi
echo "== done after $(( $(date +%s) - start )) s (status $status)" | tee -a "$out/log.txt"
exit "$status"
