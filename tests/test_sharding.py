"""Sharding: mesh config errors, partition rules, and (on 8 fake CPU devices, in a subprocess) a sharded SFT step,
RL step and sampler that give the numbers of one device with parameters and optimizer state really split."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from maxrl_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import maze as maze_config  # noqa: E402


def _abstract_mesh(data, fsdp):
  return AbstractMesh((data, fsdp), ("data", "fsdp"))


# ------------------------------------------------------------------------------------------------ config


def test_default_mesh_config_is_one_device_data_parallel():
  config = maze_config.get_config("tiny")
  mesh = sharding.make_mesh(config.mesh)
  assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1}
  assert sharding.MeshConfig.from_config(config.mesh).param_rules == ((".*", "fsdp"),)
  assert sharding.MeshConfig.from_config(None) == sharding.MeshConfig()


def test_mesh_shape_resolution():
  resolve = lambda shape, n: sharding.resolve_mesh_shape(sharding.MeshConfig.from_config({"shape": shape}), n)
  assert resolve((-1, 1), 8) == (8, 1)
  assert resolve((2, -1), 8) == (2, 4)
  assert resolve((-1, 8), 8) == (1, 8)
  assert resolve((2, 4), 8) == (2, 4)
  with pytest.raises(ValueError, match=r"fixed axes use 3 devices, which does not divide the 8 devices"):
    resolve((3, -1), 8)
  with pytest.raises(ValueError, match=r"uses 4 devices but 8 are available"):
    resolve((2, 2), 8)


@pytest.mark.parametrize("mesh, match", [
    ({"shape": (-1, -1)}, r"at most one -1"),
    ({"shape": (0, 1)}, r"entries must be >= 1"),
    ({"shape": (-1,)}, r"one entry per axis"),
    ({"axes": ("data", "model")}, r"distinct names from \('data', 'fsdp'\)"),
    ({"param_rules": ((".*", "shard"),)}, r"placement 'shard'"),
    ({"param_rules": (("(", "fsdp"),)}, r"bad regex"),
    ({"devices": 8}, r"unknown keys \['devices'\]"),
])
def test_bad_mesh_configs_fail_with_the_field(mesh, match):
  with pytest.raises(ValueError, match=r"config\.mesh.*" + match):
    sharding.MeshConfig.from_config(mesh)


def test_bad_mesh_fails_before_training(tmp_path):
  from maxrl_jax import train

  config = maze_config.get_config("tiny")
  config.mesh.shape = (len(jax.devices()) + 1, 1)
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"config\.mesh\.shape"):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()  # Nothing written.


def test_batch_sizes_must_divide_over_the_batch_shards():
  mesh = _abstract_mesh(2, 4)
  assert sharding.num_batch_shards(mesh) == 8
  sharding.check_batch_sizes(mesh, {"rollout.num_prompts": 32, "eval.prompt_chunk": 8})
  with pytest.raises(ValueError, match=r"config\.rollout\.num_prompts=12, config\.eval\.prompt_chunk=4 not "
                                       r"divisible by the 8 batch shards of the mesh data=2 x fsdp=4"):
    sharding.check_batch_sizes(mesh, {"rollout.num_prompts": 12, "sft.batch_size": 16, "eval.prompt_chunk": 4})


def test_host_arrays_become_global_arrays():
  mesh = sharding.make_mesh(None)
  full = np.arange(12, dtype=np.int32).reshape(4, 3)
  for array in (sharding.shard_global_array(full, sharding.batch_sharding(mesh)),
                sharding.shard_host_local_array(full, sharding.batch_sharding(mesh))):  # One process: all rows.
    assert array.sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(sharding.gather_to_host(array), full)


# ------------------------------------------------------------------------------------------------ rules


def test_fsdp_rule_splits_the_largest_divisible_dimension():
  mesh = _abstract_mesh(2, 4)
  spec = lambda shape, rules=sharding.DEFAULT_PARAM_RULES: sharding.partition_spec("params/x", shape, mesh, rules)
  assert spec((256, 1024)) == PartitionSpec(None, "fsdp")
  assert spec((1024, 256)) == PartitionSpec("fsdp", None)
  assert spec((256, 256)) == PartitionSpec("fsdp", None)  # The first of equal dimensions.
  assert spec((30, 8)) == PartitionSpec(None, "fsdp")  # 30 is larger but not divisible by 4.
  assert spec((3, 5)) == PartitionSpec()  # Nothing divides: replicated.
  assert spec(()) == PartitionSpec()  # Scalars are replicated.
  assert sharding.partition_spec("x", (256, 1024), _abstract_mesh(8, 1)) == PartitionSpec()  # fsdp size 1.


def test_rules_first_match_wins_and_explicit_specs_are_checked():
  mesh = _abstract_mesh(2, 4)
  rules = (("norm", "replicate"), ("embedding$", (None, ("data", "fsdp"))), (".*", "fsdp"))
  assert sharding.partition_spec("params/norm/scale", (256,), mesh, rules) == PartitionSpec()
  assert sharding.partition_spec("opt_state/1/0/mu/embed_tokens/embedding", (32, 256), mesh, rules) == \
      PartitionSpec(None, ("data", "fsdp"))
  assert sharding.partition_spec("params/layers_0/mlp/up_proj/kernel", (256, 1024), mesh, rules) == \
      PartitionSpec(None, "fsdp")
  assert sharding.partition_spec("other", (8,), mesh, (("nomatch", "fsdp"),)) == PartitionSpec()
  with pytest.raises(ValueError, match=r"splits a dimension of 12 .* over 8 devices"):
    sharding.partition_spec("embedding", (32, 12), mesh, rules)
  with pytest.raises(ValueError, match=r"one entry per dimension"):
    sharding.partition_spec("embedding", (32,), mesh, rules)
  with pytest.raises(ValueError, match=r"names axes \['model'\]"):
    sharding.partition_spec("x", (32,), mesh, (("x", ("model",)),))


def test_tree_shardings_cover_params_and_optimizer_state():
  from maxrl_jax.models import decoder
  from maxrl_jax.rl import step as step_lib

  model_fns = decoder.DecoderFns(decoder.DecoderConfig(num_layers=1))
  tx = step_lib.adamw(1e-3, 0.9, 0.95, 0.0, 1.0)
  abstract = jax.eval_shape(lambda k: step_lib.init_state(model_fns.init(k), tx), jax.random.key(0))
  mesh = sharding.make_mesh(None)
  shardings = sharding.tree_shardings(abstract, mesh)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  paths = [sharding.path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  assert "params/layers_0/mlp/up_proj/kernel" in paths
  assert "opt_state/1/0/mu/layers_0/mlp/up_proj/kernel" in paths


# ------------------------------------------------------------------------------------------------ 8 fake devices


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory):
  """Results of tests/sharding_checks.py on 8 fake CPU devices (one subprocess for the whole module)."""
  out = tmp_path_factory.mktemp("sharding") / "compare.json"
  # Fake devices must be set before JAX starts. Optimisation level 0 of the CPU backend (LLVM) compiles 2-3x
  # faster; sharding propagation and SPMD partitioning run as usual.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "sharding_checks.py"), "compare",
                         f"--out={out}"], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  with open(out) as f:
    return json.load(f)


def test_parameters_and_optimizer_state_are_split(eight_devices):
  fsdp, single = eight_devices["fsdp"], eight_devices["single"]
  assert eight_devices["num_devices"] == 8
  assert fsdp["mesh"].startswith("data=2 x fsdp=4 (8 devices")
  assert fsdp["kernel_shape"] == [32, 64]  # up_proj [E, F]: F split over the 4 fsdp devices.
  assert fsdp["kernel_spec"] == ["None", "fsdp"] and fsdp["mu_spec"] == ["None", "fsdp"]
  assert fsdp["kernel_shard_shape"] == [32, 16]
  assert fsdp["num_distinct_kernel_shards"] == 4  # 4 distinct pieces (each on 2 data replicas).
  assert fsdp["step_spec"] == []  # Scalars replicated.
  assert fsdp["tokens_shard_shape"] == [1, 4, 8]  # 8 prompts over 8 devices, each with its 4 rollouts.
  assert single["kernel_shard_shape"] == [32, 64] and single["tokens_shard_shape"] == [8, 4, 8]


def test_state_is_donated(eight_devices):
  for run in ("fsdp", "single"):
    assert eight_devices[run]["sft_state_donated"] and eight_devices[run]["rl_state_donated"]


def _assert_metrics_close(a, b):
  assert len(a) == len(b)
  for step_a, step_b in zip(a, b):
    assert step_a.keys() == step_b.keys()
    for key in step_a:
      np.testing.assert_allclose(step_a[key], step_b[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_sharded_sft_and_rl_steps_match_one_device(eight_devices):
  fsdp, single = eight_devices["fsdp"], eight_devices["single"]
  _assert_metrics_close(fsdp["sft"], single["sft"])
  _assert_metrics_close(fsdp["rl"], single["rl"])
  # The RL steps did real work: some rollouts passed, gradients were non-zero.
  assert all(0 < step["pass_rate"] < 1 and step["grad_norm"] > 0.1 for step in single["rl"])
  for path, values in single["params"].items():
    # Adam turns round-off in near-zero gradients into up to lr-sized steps; lr = 1e-2 here.
    np.testing.assert_allclose(fsdp["params"][path], values, atol=2e-3, err_msg=path)


def test_sharded_sampler_matches_one_device(eight_devices):
  fsdp, single = eight_devices["fsdp"], eight_devices["single"]
  np.testing.assert_array_equal(fsdp["tokens"], single["tokens"])
  np.testing.assert_array_equal(fsdp["mask"], single["mask"])
  np.testing.assert_allclose(fsdp["logprobs"], single["logprobs"], atol=1e-4)


def test_trainer_fails_early_on_configs_that_do_not_fit_the_devices(eight_devices):
  errors = eight_devices["trainer_errors"]
  assert "config.rollout.num_prompts=12 not divisible by the 8 batch shards" in errors["prompts_not_divisible"]
  assert "config.mesh.shape=(3, -1)" in errors["mesh_not_dividing_devices"]
  assert "uses 4 devices but 8 are available" in errors["mesh_too_small"]
  for name in ("prompts_not_divisible", "mesh_not_dividing_devices", "mesh_too_small"):
    assert errors[name + "_wrote_files"] == []
