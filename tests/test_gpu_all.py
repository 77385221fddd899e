"""scripts/gpu_all.sh at toy size (DRY=1): every part runs and writes its file, the index is complete, the
outputs fit what one device call brings back, a small budget cuts a part short and the index is still
written, and the objective table's state goes out and comes back in.

A GPU session has minutes of device time; this makes sure the script it runs works before then. The parts
run as three calls at the same time, of about the same CPU time (much of a toy run is single-threaded
compiling); once the table part has shipped its state, a call with a budget of 14 s takes it back in.
(The opt-in `population` part runs scripts/bench_population.py, tested at toy size in tests/test_population.py.)
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "gpu_all.sh")
HAVE_TORCH = importlib.util.find_spec("torch") is not None and importlib.util.find_spec("transformers") is not None
# The calls that run the parts at the same time, of about the same CPU time each on this machine.
CALLS = {"a": ["paper_scale"], "b": ["sweep", "llm"], "c": ["table", "paper"]}
CALL_OF = {part: call for call, parts in CALLS.items() for part in parts}


def _start(out, **env):
  env = dict(os.environ, DRY="1", JAX_PLATFORMS="cpu",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""), **env)
  return subprocess.Popen(["bash", SCRIPT, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)


def _finish(proc, out, timeout=900):
  stdout, _ = proc.communicate(timeout=timeout)
  log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
  return proc.returncode, stdout[-3000:] + log[-6000:]


def _index(out):
  return json.loads((out / "gpu_all.json").read_text())


def _parts(out):
  return {part["name"]: part for part in _index(out)["parts"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("gpu_all")
  workdirs = {"WORKDIR": str(root / "objectives"), "PAPER_WORKDIR": str(root / "paper")}
  procs = {call: (_start(root / call, PARTS=" ".join(parts), **(workdirs if "table" in parts else {})), root / call)
           for call, parts in CALLS.items()}
  table = root / CALL_OF["table"]
  deadline = time.time() + 900
  while not (table / "gpu_all.json").exists() or "table" not in _parts(table):  # The table's state is out.
    assert procs[CALL_OF["table"]][0].poll() is None and time.time() < deadline, _finish(*procs[CALL_OF["table"]])[1]
    time.sleep(1)
  cut = root / "cut"  # While the other parts run on.
  cut_proc = _start(cut, TOTAL_S="14", STATE_IN=str(table / "objectives.tar.gz"), WORKDIR=str(root / "cut_objectives"))
  for proc, out in procs.values():
    rc, tail = _finish(proc, out)
    assert rc == 0, tail
  cut_rc, cut_tail = _finish(cut_proc, cut, timeout=120)
  return {**{part: root / call for part, call in CALL_OF.items()}, "calls": [root / call for call in CALLS],
          "cut": cut, "cut_rc": cut_rc, "cut_tail": cut_tail, "root": root}


def _part(runs, name):
  return _parts(runs[name])[name]


def test_every_part_ran_within_its_limit_and_wrote_its_file(runs):
  for call, parts in CALLS.items():
    index = _index(runs["root"] / call)
    assert index["finished"] and index["mode"] == "dry" and index["parts_selected"] == parts
    assert [p["name"] for p in index["parts"]] == parts
    for part in index["parts"]:
      assert part["status"] == "ok" and part["exit_code"] == 0 and not part["cut_short"], part
      assert 0 <= part["wall_s"] <= part["limit_s"] <= part["cap_s"], part
      assert part["command"].startswith(("env ", "python3 ")) and "{" not in part["command"], part
      assert part["files"] and all(size for size in part["files"].values()), part
    log = (runs["root"] / call / "log.txt").read_text()
    for part in parts:
      assert f"== {part}: exit 0 after" in log


def test_benchmark_jsons_have_their_measurements_and_targets(runs):
  report = json.loads((runs["paper_scale"] / "paper_scale.json").read_text())
  assert report["complete"] and report["setup"]["num_prompts"] == 2 and report["setup"]["dtype"] == "bfloat16"
  assert report["sampler"]["median_s"] > 0 and report["ratios"]["recompute_s_over_sampler_s"] > 0
  assert report["rl_step"]["ours"]["full_step"]["median_s"] > 0
  assert report["targets"]["setup_matches_paper_scale"] is False  # Toy size.
  assert _part(runs, "paper_scale")["targets"] == report["targets"] and _part(runs, "paper_scale")["complete"]
  sweep = json.loads((runs["sweep"] / "sweep.json").read_text())
  assert {(p["num_rollouts"], p["new_tokens"]) for p in sweep["sweeps"]} == {(4, 4), (4, 6)}
  for point in sweep["sweeps"]:
    assert set(point["samplers"]) == {"2", "full"} and all(s["median_s"] > 0 for s in point["samplers"].values())
  assert set(sweep["length_growth"]) == {"2", "full"} and sweep["length_growth"]["2"]["6/4"] > 0
  assert "targets" in sweep and _part(runs, "sweep")["targets"] == sweep["targets"]
  llm = json.loads((runs["llm"] / "llm_tiny.json").read_text())
  assert llm["jax"]["sampler"]["median_s"] > 0 and llm["jax"]["update"]["loss_is_finite"]
  assert llm["targets"]["setup_matches_benchmark"] is False and _part(runs, "llm")["targets"] == llm["targets"]
  # The comparisons with transformers run only where torch and transformers are installed.
  if not HAVE_TORCH:
    assert "skipped" in llm["torch"] and "sampler_vs_generate" not in llm["targets"]
    assert report["hf_generate"]["skipped"] and "torch" not in report["rl_step"]
    pytest.skip("torch / transformers are not installed: the torch halves are skipped (and say so)")
  assert report["ratios"]["generate_s_over_sampler_s"] > 0 and "sampler_vs_generate" in report["targets"]
  assert report["conversion_max_abs_logit_diff"] < 0.1  # bf16 logits of the same weights in both stacks
  assert report["rl_step"]["torch"]["median_s"] > 0 and report["rl_step"]["torch_s_over_ours_s"] > 0
  assert all(p["generate_s_over_sampler_s"] > 0 for p in sweep["sweeps"])
  assert llm["torch"]["process"]["exit_code"] == 0 and llm["torch"]["generate"]["median_s"] > 0
  assert llm["targets"]["sampler_vs_generate"]["at_least"] == 3.0


def test_table_and_paper_runs_come_back(runs):
  out, parts = runs["table"], _parts(runs["table"])
  table = parts["table"]
  assert table["progress"] == {"rl_steps_recorded": 2, "sft_steps_recorded": 6, "finished": True}
  with tarfile.open(out / "objectives.tar.gz") as tar:
    names = set(tar.getnames())
    results = json.load(tar.extractfile("./results.json"))
  assert {"./results.md", "./pass_at_k.png", "./populations/all/metrics.jsonl",
          "./populations/all/members/maxrl/seed0/summary.json"} <= names
  assert not any("/tensorboard/" in n or ".jax_cache" in n or ("/members/" in n and n.endswith(".png"))
                 for n in names)
  assert [row["variant"] for row in results["rows"]][:2] == ["maxrl", "grpo"] and not results["unfinished_runs"]
  state = _index(out)["table_state"]  # The tiny table's checkpoints fit: they are shipped.
  assert state["shipped"] and 0 < state["state_bytes"] <= state["limit_bytes"] and "all/rl/2" in state["checkpoints"]
  assert "./populations/all/checkpoints/rl/2/commit_success.txt" in names
  # What would not come back is not drawn or written (logging.plots / logging.tensorboard = False).
  work, paper = runs["root"] / "objectives", runs["root"] / "paper"
  assert not list(work.glob("**/*curves_*.png")) and not (work / "populations" / "all" / "population.png").exists()
  assert not list(work.glob("**/tensorboard")) and not (paper / "tensorboard").exists()
  assert not list(paper.glob("*.png"))
  records = [json.loads(line) for line in (out / "paper_metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in records if r.get("phase") == "rl") == 2
  assert parts["paper"]["progress"] == {"rl_steps_recorded": 2, "sft_steps_recorded": 6}


def test_outputs_fit_one_device_call(runs):
  for out in runs["calls"] + [runs["cut"]]:
    entries = sorted(os.listdir(out))
    assert len(entries) <= 8, entries
    for entry in entries:
      path = out / entry
      assert path.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", entry), entry
      assert path.stat().st_size < 16 * 2**20, entry
    index = _index(out)
    assert sorted(index["files"]) == entries
    assert {"jax", "jaxlib", "flax", "torch", "transformers"} <= set(index["versions"])
    assert re.fullmatch(r"[0-9a-f]{40}", index["git_commit"]) and index["card"] is None  # No nvidia-smi here.


def test_a_small_budget_cuts_a_part_short_and_still_writes_the_index(runs):
  index, parts = _index(runs["cut"]), _parts(runs["cut"])
  assert runs["cut_rc"] == 124, runs["cut_tail"]  # A benchmark cut short is a failure.
  assert index["finished"] and index["total_budget_s"] == 14 and index["elapsed_s"] <= 14 + 5
  assert list(parts) == ["paper_scale", "sweep", "llm", "table", "paper"]  # The default parts.
  first = parts["paper_scale"]
  assert first["status"] == "cut_short" and first["cut_short"] and first["exit_code"] in (124, 137), first
  assert first["wall_s"] <= first["limit_s"] + 3 and first["limit_s"] <= 14 - 3 - 4, first  # Needs kept.
  assert all(p["status"] in ("cut_short", "skipped") for p in parts.values()), parts
  skipped = [p for p in parts.values() if p["status"] == "skipped"]
  assert skipped and all(p["reason"].startswith("no time left") for p in skipped), parts


def test_the_table_state_comes_back_in_and_goes_out_again(runs):
  # The cut call unpacked STATE_IN (the train call's tarball) into its empty workdir and shipped it back.
  work = runs["root"] / "cut_objectives" / "populations" / "all" / "checkpoints" / "rl"
  first = runs["root"] / "objectives" / "populations" / "all" / "checkpoints" / "rl"
  assert (work / "digests.json").read_text() == (first / "digests.json").read_text()
  assert "unpacked" in (runs["cut"] / "log.txt").read_text()
  state = _index(runs["cut"])["table_state"]
  assert state["shipped"] and state["checkpoints"] == _index(runs["table"])["table_state"]["checkpoints"]
  with tarfile.open(runs["cut"] / "objectives.tar.gz") as tar:
    assert "./populations/all/checkpoints/rl/digests.json" in tar.getnames()
