"""Runs a tiny SFT + RL problem on a device mesh, in a process of its own; used by test_sharding.py and
test_distributed.py (fake CPU devices must be configured before JAX starts, so this runs as a subprocess).

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_checks.py compare --out=r.json
        the problem on a data=2 x fsdp=4 mesh and on one device, with placement checks.
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python tests/sharding_checks.py distributed \
        --num_processes=2 --process_id=I --port=P --workdir=DIR --out=r.json
        one process of a jax.distributed job (CPU collectives), data=2 x fsdp=2 over all processes' devices;
        with --num_processes=1 and 4 devices, the same mesh in one process (the reference).

Each writes a JSON file of metrics, parameter checksums, rollouts and placement facts (process 0 only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Runs as a script: make the repository importable without installing.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

NUM_PROMPTS, NUM_ROLLOUTS, PROMPT_LEN, MAX_NEW_TOKENS = 8, 4, 10, 8
SFT_LEN = 16
EOS = 2
NUM_STEPS = 2


def _args():
  parser = argparse.ArgumentParser()
  parser.add_argument("mode", choices=["compare", "distributed"])
  parser.add_argument("--out", required=True)
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--port", type=int, default=0)
  parser.add_argument("--workdir", default="")
  return parser.parse_args()


def main():
  args = _args()
  import jax  # After the XLA flags of the environment are in place.

  if args.mode == "distributed":
    # CPU devices per process come from XLA_FLAGS=--xla_force_host_platform_device_count (set by the test).
    if "jax_cpu_collectives_implementation" in jax.config.values:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")  # Cross-process CPU collectives.
    from maxrl_jax import sharding

    if args.num_processes > 1:
      sharding.initialize_distributed({"distributed": True, "coordinator_address": f"localhost:{args.port}",
                                       "num_processes": args.num_processes, "process_id": args.process_id})
    result = run_distributed(args.workdir)
  else:
    result = run_compare()
  if jax.process_index() == 0:
    with open(args.out, "w") as f:
      json.dump(result, f)


# ------------------------------------------------------------------------------------------------ the problem


def _problem():
  import jax.numpy as jnp
  import numpy as np

  from maxrl_jax.models import decoder

  config = decoder.DecoderConfig(num_layers=1, hidden_size=32, ffn_size=64, num_heads=4, num_kv_heads=2,
                                 max_positions=64)
  rng = np.random.RandomState(0)
  sft_batches = []
  for _ in range(NUM_STEPS):
    inputs = rng.randint(3, 32, size=(NUM_PROMPTS, SFT_LEN)).astype(np.int32)
    loss_mask = np.broadcast_to(np.arange(SFT_LEN) >= PROMPT_LEN, inputs.shape).copy()
    sft_batches.append({"inputs": inputs, "loss_mask": loss_mask})
  prompts = [rng.randint(3, 32, size=(NUM_PROMPTS, PROMPT_LEN)).astype(np.int32) for _ in range(NUM_STEPS + 1)]

  def verifier(tasks, responses):
    """A fake pass/fail verifier with a pass rate near 1/3, so that the advantages are not all zero."""
    del tasks
    return ((responses[..., 0] + responses[..., 1]) % 3 == 0).astype(jnp.float32)

  return decoder.DecoderFns(config), sft_batches, prompts, verifier


def run_problem(mesh, *, with_checkpoint_dir: str = ""):
  """SFT steps, RL steps and one sampler call on `mesh`; returns (host results, final RL state, shardings)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from maxrl_jax import estimators
  from maxrl_jax import sharding
  from maxrl_jax.rl import sft as sft_lib
  from maxrl_jax.rl import step as step_lib

  model_fns, sft_batches, prompts, verifier = _problem()
  rules = sharding.DEFAULT_PARAM_RULES
  batch = sharding.batch_sharding(mesh)
  key = jax.random.key(0)

  sft_tx = step_lib.adamw(1e-2, 0.9, 0.95, 0.01, 1.0)
  state, state_sharding = sharding.init_sharded(
      lambda k: step_lib.init_state(model_fns.init(k), sft_tx), jax.random.fold_in(key, 0), mesh=mesh,
      rules=rules)
  sft_step = sft_lib.make_sft_step(model_fns, sft_tx, state_sharding=state_sharding, batch_sharding=batch)
  result = {"sft": [], "rl": []}
  for step_batch in sft_batches:
    old_leaf = state.params["embed_tokens"]["embedding"]
    state, metrics = sft_step(state, jax.tree.map(lambda x: sharding.shard_global_array(x, batch), step_batch))
    result["sft"].append({k: float(v) for k, v in metrics.items()})
  result["sft_state_donated"] = bool(old_leaf.is_deleted())

  hyper = step_lib.Hyper(learning_rate=1e-2, b1=0.9, b2=0.95, weight_decay=0.0)
  spec = step_lib.RLSpec(num_samples=NUM_ROLLOUTS, max_new_tokens=MAX_NEW_TOKENS, stop_tokens=(EOS,),
                         reduction="sequence_sum", grad_clip=1.0)
  rl_tx = step_lib.rl_optimizer(hyper, spec)
  rl_state, rl_sharding = sharding.init_sharded(
      lambda params: step_lib.init_state(params, rl_tx), state.params, mesh=mesh, rules=rules)
  maxrl = estimators.get_advantage_fn("maxrl")
  rl_step = step_lib.make_rl_step(spec, model_fns, hyper, prompt_fn=lambda tasks: tasks, verifier=verifier,
                                  advantage_fn=lambda rewards, h: maxrl(rewards), state_sharding=rl_sharding,
                                  batch_sharding=batch)
  for step in range(NUM_STEPS):
    old_leaf = rl_state.params["embed_tokens"]["embedding"]
    rl_state, metrics = rl_step(rl_state, sharding.shard_global_array(prompts[step], batch),
                                jax.random.fold_in(key, 100 + step), jnp.float32(1.0))
    result["rl"].append({k: float(v) for k, v in metrics.items()})
  result["rl_state_donated"] = bool(old_leaf.is_deleted())

  sampler = sharding.make_sharded_sampler(model_fns, mesh, rl_sharding.params, num_rollouts=NUM_ROLLOUTS,
                                          max_new_tokens=MAX_NEW_TOKENS, stop_tokens=(EOS,))
  rollouts = sampler(rl_state.params, sharding.shard_global_array(prompts[-1], batch), jax.random.fold_in(key, 7),
                     jnp.float32(1.0))
  host = sharding.gather_to_host({"tokens": rollouts.tokens, "logprobs": rollouts.logprobs,
                                  "mask": rollouts.mask, "params": rl_state.params})
  result["tokens"] = np.asarray(host["tokens"]).tolist()
  result["logprobs"] = np.asarray(host["logprobs"]).tolist()
  result["mask"] = np.asarray(host["mask"]).tolist()
  result["params"] = {sharding.path_string(p): np.asarray(v).ravel().tolist()
                      for p, v in jax.tree_util.tree_flatten_with_path(host["params"])[0]}
  result["tokens_shard_shape"] = list(rollouts.tokens.addressable_shards[0].data.shape)

  # Placement facts about the final RL state.
  kernel = rl_state.params["layers_0"]["mlp"]["up_proj"]["kernel"]
  mu = rl_state.opt_state[1][0].mu["layers_0"]["mlp"]["up_proj"]["kernel"]
  result["kernel_shape"] = list(kernel.shape)
  result["kernel_spec"] = [str(a) for a in kernel.sharding.spec]
  result["kernel_shard_shape"] = list(kernel.addressable_shards[0].data.shape)
  result["mu_spec"] = [str(a) for a in mu.sharding.spec]
  result["num_distinct_kernel_shards"] = len({str(s.index) for s in kernel.addressable_shards})
  result["step_spec"] = [str(a) for a in rl_state.step.sharding.spec]
  result["mesh"] = sharding.describe(mesh)
  return result, rl_state, rl_sharding


def run_compare():
  import jax

  from maxrl_jax import sharding

  devices = jax.devices()
  out = {"num_devices": len(devices)}
  out["fsdp"], _, _ = run_problem(sharding.make_mesh({"shape": (2, 4)}))
  out["single"], _, _ = run_problem(sharding.make_mesh({"shape": (1, 1)}, devices=devices[:1]))
  out["trainer_errors"] = trainer_config_errors()
  return out


def trainer_config_errors():
  """The messages train_and_evaluate fails with, before any training, on configs that do not fit 8 devices."""
  import tempfile

  from configs import maze as maze_config
  from maxrl_jax import train

  errors = {}
  for name, overrides in {"prompts_not_divisible": {"rollout.num_prompts": 12},
                          "mesh_not_dividing_devices": {"mesh.shape": (3, -1)},
                          "mesh_too_small": {"mesh.shape": (2, 2)}}.items():
    config = maze_config.get_config("tiny")
    config.sft.batch_size = config.eval.prompt_chunk = 8
    config.rollout.num_prompts = 8
    for key, value in overrides.items():
      group, field = key.split(".")
      config[group][field] = value
    with tempfile.TemporaryDirectory() as workdir:
      try:
        train.train_and_evaluate(config, workdir)
        errors[name] = None
      except ValueError as e:
        errors[name] = str(e)
      errors[name + "_wrote_files"] = sorted(os.listdir(workdir))
  return errors


def run_distributed(workdir: str):
  import jax
  import numpy as np

  from maxrl_jax import checkpoints
  from maxrl_jax import run_logging
  from maxrl_jax import sharding

  mesh = sharding.make_mesh({"shape": (2, 2)})
  result, rl_state, rl_sharding = run_problem(mesh)
  result["process_count"] = jax.process_count()
  result["local_devices"] = len(jax.local_devices())

  # Checkpoints: every process calls save / restore; orbax writes each shard once.
  ckpt = checkpoints.PhaseCheckpointer(workdir, "rl", max_to_keep=2)
  ckpt.save(NUM_STEPS, rl_state)
  restored = ckpt.restore(NUM_STEPS, rl_state)
  ckpt.close()
  same = jax.tree.map(lambda a, b: bool(np.array_equal(*sharding.gather_to_host((a, b)))), restored, rl_state)
  result["restore_equal"] = all(jax.tree.leaves(same))
  result["restore_sharding_equal"] = all(jax.tree.leaves(jax.tree.map(
      lambda a, s: a.sharding == s, restored, rl_sharding)))
  result["checkpoint_steps"] = sorted(os.listdir(ckpt.directory))

  # Per-host data: each process holds its rows of a global batch; the global array equals the full batch.
  full = np.arange(NUM_PROMPTS * 3, dtype=np.int32).reshape(NUM_PROMPTS, 3)
  rows = NUM_PROMPTS // jax.process_count()
  local = full[jax.process_index() * rows:(jax.process_index() + 1) * rows]
  assembled = sharding.shard_host_local_array(local, sharding.batch_sharding(mesh))
  result["host_local_batch_equal"] = bool(np.array_equal(sharding.gather_to_host(assembled), full))
  result["host_local_batch_shape"] = list(assembled.shape)

  # Run files: written by process 0 only, read by every process.
  writer = sharding.ChiefOnlyWriter(run_logging.MetricsWriter(workdir))
  writer.truncate(lambda r: False)
  writer.write({"phase": "rl", "step": 1, "process": jax.process_index()})
  sharding.barrier("after_write")
  result["metrics_records"] = writer.read()
  return result


if __name__ == "__main__":
  main()
