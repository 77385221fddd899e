"""Population training: members parsed from the config, each member equal to its single run, a resumed
population equal to an uninterrupted one, and the member axis sharded over 8 fake CPU devices."""

import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from configs import maze as maze_config
from maxrl_jax import estimators
from maxrl_jax import config_fields
from maxrl_jax import run_logging
from maxrl_jax import train
from maxrl_jax.rl import population

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))
import population_checks  # noqa: E402  pylint: disable=wrong-import-position

# Every per-member hyperparameter differs between the two objectives (entropy bonus, smoothing, SELF,
# learning rate), so the traced-hyperparameter path and the objective switch are both exercised.
GRPO_ALL = ("grpo_all: objective.name=grpo, objective.entropy_coef=0.01, objective.smoothing_gamma=0.05, "
            "objective.self_filter=True, rl.learning_rate=3e-4")
# Rollout statistics are integer counts: equal exactly. Losses and gradient norms come from the same
# arithmetic batched differently (vmap): equal to float32 round-off.
EXACT_KEYS = ("pass_rate", "fraction_solved", "generated_tokens", "decode_steps", "mean_response_length",
              "truncated_fraction", "greedy_solved_fraction")
CLOSE_KEYS = ("loss", "grad_norm", "entropy", "mean_abs_advantage")
TIMING_KEYS = ("step_time_s", "tokens_per_s")


def tiny(**overrides):
  config = maze_config.get_config("tiny")
  config.logging.tensorboard = False
  config.logging.plots = False  # Turned on where the PNGs are checked.
  config_fields.set_fields(config, overrides)
  return config


# ------------------------------------------------------------------------------------------------ parsing


def test_members_are_the_cross_product_with_labels_and_configs():
  config = tiny()
  config.population.objectives = ("maxrl", "grpo_ent: objective.name=grpo, objective.entropy_coef=0.01")
  config.population.sweep = ("lr1e-4: rl.learning_rate=1e-4", "rl.learning_rate=3e-4")
  config.population.seeds = (3, 5)
  members = population.members(config)
  assert [m.name for m in members] == [
      "maxrl/lr1e-4/seed3", "maxrl/lr1e-4/seed5", "maxrl/rl.learning_rate=3e-4/seed3",
      "maxrl/rl.learning_rate=3e-4/seed5", "grpo_ent/lr1e-4/seed3", "grpo_ent/lr1e-4/seed5",
      "grpo_ent/rl.learning_rate=3e-4/seed3", "grpo_ent/rl.learning_rate=3e-4/seed5"]
  m = members[6]
  assert m.index == 6 and m.objective == "grpo_ent" and m.seed == 3
  assert m.overrides == {"objective.name": "grpo", "objective.entropy_coef": 0.01, "rl.learning_rate": 3e-4}
  # The member's config is the single run's: the base with its overrides and seed, no population.
  single = tiny(**{"objective.name": "grpo", "objective.entropy_coef": 0.01, "rl.learning_rate": 3e-4})
  single.seed = 3
  assert m.config.to_dict() == single.to_dict()
  assert not population.is_population(m.config) and population.is_population(config)
  assert population.distinct_seeds(members) == [3, 5]
  assert m.fields() == {"member": 6, "objective": "grpo_ent", "seed": 3, "sweep": "rl.learning_rate=3e-4"}


def test_shared_hyperparameters_stay_constants_and_objectives_become_branches():
  config = tiny()
  config.population.objectives = ("maxrl", "grpo", "pkpo4: objective.name=pkpo, objective.k=4", GRPO_ALL)
  members = population.members(config)
  shared, varying = population.member_hyperparameters(members)
  assert shared == {"b1": 0.9, "b2": 0.999, "weight_decay": 0.01, "kl_coef": 0.0}
  np.testing.assert_allclose(varying["learning_rate"], [1e-4, 1e-4, 1e-4, 3e-4])
  np.testing.assert_array_equal(varying["self_filter"], [False, False, False, True])
  branches, index = population.advantage_branches(members)
  # grpo_all shares grpo's estimator (smoothing and SELF act on top of the advantages).
  assert [name for name, _ in branches] == ["maxrl", "grpo", "pkpo"]
  np.testing.assert_array_equal(index, [0, 1, 2, 1])
  advantage = population.make_advantage_fn(branches)
  rewards = jax.numpy.array([[1.0, 0.0, 0.0, 1.0]])
  for i, (name, kwargs) in enumerate(branches):
    expected = estimators.get_advantage_fn(name, **kwargs)(rewards)
    member = lambda j: advantage(rewards, types.SimpleNamespace(objective=j))  # The member's branch index.
    np.testing.assert_array_equal(jax.vmap(member)(jax.numpy.array([i]))[0], expected)


@pytest.mark.parametrize("field, value, match", [
    ("objectives", ("maxrl", "model.hidden_size=64"), "cannot differ between members"),
    ("objectives", ("not_an_estimator",), "neither an estimator"),
    ("objectives", ("maxrl", "maxrl"), "repeat"),
    ("objectives", ("a b: objective.name=grpo",), "non-empty word"),
    ("objectives", ("g: objective.name=grpo, objective.entropy_coef",), "is not field=value"),
    ("seeds", (0, 0), "distinct integers"),
    ("objectives", ("pkpo9: objective.name=pkpo, objective.k=9",), "population member pkpo9/seed0"),
])
def test_bad_populations_name_the_entry_and_the_fix(field, value, match):
  config = tiny()
  config.population[field] = value
  with pytest.raises(ValueError, match=match):
    train.validate_config(config)


def test_member_axis_layouts():
  config = tiny()
  abstract = lambda shape: jax.sharding.AbstractMesh(shape, ("member", "data", "fsdp"))
  # The stacked state: members over the member axis, each leaf's own dims by the parameter rules.
  tree = {"params": {"kernel": jax.ShapeDtypeStruct((8, 32, 64), np.float32)}, "step": jax.ShapeDtypeStruct((8,), np.int32)}
  shardings = population.stacked_shardings(tree, abstract((4, 1, 2)), config.mesh.param_rules)
  assert shardings["params"]["kernel"].spec == PartitionSpec("member", None, "fsdp")
  assert shardings["step"].spec == PartitionSpec("member")
  # Three entries cannot split over 4 member groups: replicated along the member axis.
  assert population.stacked_sharding(abstract((4, 2, 1)), 3).spec == PartitionSpec(None)
  assert population.stacked_batch_sharding(abstract((4, 2, 1)), 8).spec == PartitionSpec("member", ("data", "fsdp"))


# ------------------------------------------------------------------------------------------------ equivalence


def equivalence_config():
  """The tiny preset with an SFT long enough that some rollouts pass (so rewards and advantages are real)."""
  config = tiny()
  config.sft.steps = 300
  config.sft.learning_rate = 3e-3
  config.rl.steps = 4
  config.eval.every_steps = 2
  config.log_every_steps = 1
  config.checkpoint_every_steps = 2
  return config


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 2 x 2 population (maxrl and grpo_all x seeds 0, 1) and two of the single runs it stands for: maxrl/seed0
  and grpo_all/seed1 (each objective and each seed once)."""
  root = tmp_path_factory.mktemp("population")
  config = equivalence_config()
  config.population.objectives = ("maxrl", GRPO_ALL)
  config.population.seeds = (0, 1)
  config.logging.tensorboard = True  # One TensorBoard run per member (event files need no extra package).
  config.logging.plots = True
  summary = train.train_and_evaluate(config, str(root / "population"))
  singles = {}
  for member in population.members(config):
    if member.name in ("maxrl/seed0", "grpo_all/seed1"):  # Each trains its own SFT, as the population does.
      workdir = root / member.name.replace("/", "_")
      singles[member.index] = (train.train_and_evaluate(member.config, str(workdir)),
                               run_logging.MetricsWriter(str(workdir)).read())
  return {"root": root, "config": config, "summary": summary, "singles": singles,
          "records": run_logging.MetricsWriter(str(root / "population")).read()}


def _member_records(records, index, phases=("rl", "eval")):
  return [r for r in records if r.get("member") == index and r["phase"] in phases]


def _assert_same_run(mine, single, exact_keys=EXACT_KEYS, close_keys=CLOSE_KEYS, rtol=1e-5):
  assert [(r["phase"], r["step"]) for r in mine] == [(r["phase"], r["step"]) for r in single]
  for a, b in zip(mine, single):
    for key in b:
      if key in TIMING_KEYS or key in ("logprob_mismatch",):
        continue
      if key in close_keys:
        np.testing.assert_allclose(a[key], b[key], rtol=rtol, atol=1e-6, err_msg=f"{b['phase']} {b['step']} {key}")
      elif b["phase"] == "eval" or key in exact_keys:
        assert a[key] == b[key], (b["phase"], b["step"], key, a[key], b[key])


def test_each_member_reproduces_its_single_run(runs):
  for index, (single_summary, single_records) in runs["singles"].items():
    single = [r for r in single_records if r["phase"] in ("rl", "eval")]
    _assert_same_run(_member_records(runs["records"], index), single)
    member = runs["summary"]["members"][index]
    assert member["eval"] == single_summary["eval"] and member["initial_eval"] == single_summary["initial_eval"]
  # The RL steps did real work: rollouts passed and failed, and the policies moved.
  rl = [r for r in runs["records"] if r["phase"] == "rl"]
  assert any(0 < r["pass_rate"] < 1 for r in rl) and all(r["grad_norm"] > 0 for r in rl)


def test_sft_policy_is_shared_by_a_seeds_members(runs):
  sft = [r for r in runs["records"] if r["phase"] == "sft"]
  assert sorted({r["seed"] for r in sft}) == [0, 1]
  for index, (_, single_records) in runs["singles"].items():  # One single run of each seed.
    seed = runs["summary"]["members"][index]["seed"]
    mine = [dict(r, seed=None) for r in sft if r["seed"] == seed]
    theirs = [dict(r, seed=None) for r in single_records if r["phase"] == "sft"]
    for a, b in zip(mine, theirs, strict=True):  # The very same jitted SFT step: bit-identical.
      assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == {k: v for k, v in b.items() if k not in TIMING_KEYS}
  assert sorted(runs["summary"]["members"][i]["seed"] for i in runs["singles"]) == [0, 1]


def test_summary_table_and_member_workdirs(runs):
  summary, root = runs["summary"], runs["root"] / "population"
  assert [m["name"] for m in summary["members"]] == ["maxrl/seed0", "maxrl/seed1", "grpo_all/seed0", "grpo_all/seed1"]
  assert summary["members"][2]["overrides"]["objective.entropy_coef"] == 0.01
  assert summary["training_mazes"]["seed1"]["all"]["overlap_with_heldout"] == 0
  row = summary["table"][1]
  assert row["objective"] == "grpo_all" and row["seeds"] == [0, 1]
  values = [m["eval"]["pass@1"] for m in summary["members"][2:]]
  assert row["pass@1"]["mean"] == pytest.approx(np.mean(values))
  assert row["pass@1"]["std"] == pytest.approx(np.std(values, ddof=1))
  assert json.loads((root / "summary.json").read_text()) == json.loads(json.dumps(summary))
  assert (root / "population.png").stat().st_size > 10_000
  exported = root / "members" / "grpo_all" / "seed1"
  single_summary, single_records = runs["singles"][3]
  assert json.loads((exported / "summary.json").read_text())["eval"] == single_summary["eval"]
  assert [r["step"] for r in run_logging.MetricsWriter(str(exported)).read() if r["phase"] == "eval"] == [0, 2, 4]
  assert (exported / "curves_heldout.png").exists()
  for run in ("maxrl/seed0", "grpo_all/seed1", "sft/seed0"):
    assert list((root / "tensorboard" / run).glob("events.out.tfevents.*")), run
  # A finished population is recognised and left alone.
  again = train.train_and_evaluate(runs["config"], str(root))
  assert again == json.loads(json.dumps(summary))


def test_resumed_population_equals_the_uninterrupted_one(runs):
  source = runs["root"] / "population"
  workdir = runs["root"] / "resumed"
  shutil.copytree(source, workdir)
  # As if killed after the RL checkpoint of step 2: later checkpoints, the summary and records are gone.
  shutil.rmtree(workdir / "checkpoints" / "rl" / "4")
  (workdir / "summary.json").unlink()
  records = run_logging.MetricsWriter(str(workdir)).read()
  run_logging.MetricsWriter(str(workdir)).replace_all(records[:len(records) // 2])
  train.train_and_evaluate(runs["config"], str(workdir))
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
  assert strip(run_logging.MetricsWriter(str(workdir)).read()) == strip(runs["records"])


def test_a_population_stopped_by_a_signal_resumes_to_the_uninterrupted_records(runs, monkeypatch):
  from maxrl_jax.trainers import harness, loop  # pylint: disable=import-outside-toplevel

  workdir = runs["root"] / "stopped"
  shutil.copytree(runs["root"] / "population", workdir)
  # Back to the RL checkpoint of step 2 (as after a kill), then a SIGTERM arrives during RL step 3.
  shutil.rmtree(workdir / "checkpoints" / "rl" / "4")
  (workdir / "summary.json").unlink()
  monkeypatch.setattr(harness.StopSignals, "requested", lambda self, step: step == 3)
  with pytest.raises(loop.Preempted, match="rl: stopped at step 3"):
    train.train_and_evaluate(runs["config"], str(workdir))
  assert (workdir / "checkpoints" / "rl" / "3").is_dir()  # Saved at the step it reached (not an interval).
  monkeypatch.undo()
  train.train_and_evaluate(runs["config"], str(workdir))
  strip = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs]
  assert strip(run_logging.MetricsWriter(str(workdir)).read()) == strip(runs["records"])


# ------------------------------------------------------------------------------------------------ devices


def _run_checks(tmp_path, name, device_count, member_devices):
  out = tmp_path / f"{name}.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={device_count} --xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "population_checks.py"),
                         f"--workdir={tmp_path / name}", f"--member_devices={member_devices}", f"--out={out}"],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return json.loads(out.read_text())


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("population_devices")
  # One device, and 8 devices as 4 member groups of 2 (members and each member's batch split at once).
  return {"one": _run_checks(tmp, "one", 1, -1), "members4x2": _run_checks(tmp, "members4x2", 8, 4)}


def test_population_layouts_on_eight_devices_match_one_device(layouts):
  assert layouts["one"]["mesh"] == {"member": 1, "data": 1, "fsdp": 1}
  assert layouts["members4x2"]["mesh"] == {"member": 4, "data": 2, "fsdp": 1}  # 2 per group, batch over 2.
  reference = [r for r in layouts["one"]["records"] if r["phase"] in ("rl", "eval")]
  assert len({r["member"] for r in reference}) == 8
  for name in ("members4x2",):
    records = [r for r in layouts[name]["records"] if r["phase"] in ("rl", "eval")]
    for index in range(8):
      _assert_same_run(_member_records(records, index), _member_records(reference, index))
    sft = lambda rs: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rs if r["phase"] == "sft"]
    for a, b in zip(sft(layouts[name]["records"]), sft(layouts["one"]["records"]), strict=True):
      for key in ("loss", "grad_norm", "token_accuracy"):
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, err_msg=key)


def test_population_config_is_the_one_the_checks_use():
  config = population_checks.sharding_config()
  assert len(population.members(config)) == 8
  train.validate_config(config)


def test_dry_run_lists_the_members():
  config = tiny()
  config.population.objectives = ("maxrl", "grpo")
  config.population.seeds = (0, 1, 2)
  work = train.expected_work(config)
  assert work["population"].startswith("6 members, one jitted program: maxrl/seed0, maxrl/seed1")
  assert "once per seed (3)" in work["population work"]


def test_bench_population_at_toy_size(tmp_path):
  # scripts/bench_population.py (on an accelerator: the `population` part of scripts/gpu_all.sh) at toy size.
  out = tmp_path / "population_bench.json"
  proc = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "bench_population.py"), "--preset=tiny",
                         "--sizes=1,2", "--steps=1", f"--out={out}"], capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-5000:]
  report = json.loads(out.read_text())
  assert [row["members"] for row in report["populations"]] == [1, 2]
  assert report["populations"][1]["labels"] == ["maxrl/seed0", "grpo/seed0"]
  assert set(report["single_runs"]) == {"maxrl", "grpo"}
  for row in report["populations"]:
    assert row["step_s"] > 0 and row["separate_runs_step_s"] > 0
