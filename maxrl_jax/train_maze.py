"""Maze experiment: SFT on BFS shortest paths, then on-policy RL, with held-out pass@k evaluation.

`train_and_evaluate(config, workdir)` is the whole job (configs/maze.py documents every field). It writes

    <workdir>/config.json       the config (a resumed run must use the same one)
    <workdir>/metrics.jsonl     one JSON object per logged interval: {"phase": "sft" | "rl" | "eval", "step", ...}
    <workdir>/checkpoints/      orbax checkpoints of each phase (params, optimizer state, step)
    <workdir>/summary.json      {"objective", "eval": {"pass@1", "pass@k", ...}, "sft_eval", ...}

and re-running it on the same workdir resumes from the latest checkpoint. Every step's key is
`fold_in(<phase key>, step)` of keys derived from `config.seed`, so a resumed run is the same computation as
an uninterrupted one.
"""

from __future__ import annotations

import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tensorflow_datasets as tfds
import tqdm

from maxrl_jax import checkpoints
from maxrl_jax import estimators
from maxrl_jax import memory_plan
from maxrl_jax import metrics as metrics_lib
from maxrl_jax import plots
from maxrl_jax import population as population_lib
from maxrl_jax import run_logging
from maxrl_jax import sharding
from maxrl_jax import train_steps
from maxrl_jax import training_loop
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.models import decoder
from maxrl_jax.tasks import maze
from maxrl_jax.tasks import maze_dataset

# Independent streams derived from config.seed.
_KEY_INIT, _KEY_SFT_DATA, _KEY_RL_DATA, _KEY_RL_SAMPLING, _KEY_EVAL = range(5)
STOP_TOKENS = (maze.DONE, maze.EOS)


# ------------------------------------------------------------------------------------------------ config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Fails at start, naming the field and the allowed values, on any invalid setting."""

  def fail(field, message):
    raise ValueError(f"config.{field}: {message}")

  if population_lib.is_population(config):  # Each member is checked as the single run it reproduces.
    from maxrl_jax import train_population  # pylint: disable=import-outside-toplevel
    train_population.validate(config)
    return

  try:
    size = maze.check_maze_size(config.maze.size)
  except ValueError as e:
    fail("maze.size", str(e))
  if config.maze.train_data not in ("fresh", "fixed"):
    fail("maze.train_data", f"{config.maze.train_data!r}; allowed: 'fresh' (new mazes every step) or 'fixed'.")
  for field in ("sft.steps", "rl.steps", "sft.warmup_steps"):
    group, name = field.split(".")
    if int(config[group][name]) != config[group][name] or config[group][name] < 0:
      fail(field, f"{config[group][name]!r} must be an integer >= 0.")
  positive_ints = ["sft.batch_size", "rollout.num_prompts", "rollout.num_samples", "rollout.max_new_tokens",
                   "eval.num_mazes", "eval.num_samples", "eval.prompt_chunk", "eval.every_steps",
                   "log_every_steps", "checkpoint_every_steps", "keep_checkpoints"]
  if config.maze.train_data == "fixed":
    positive_ints.append("maze.train_examples")
  for field in positive_ints:
    node = config
    for part in field.split("."):
      node = node[part]
    if isinstance(node, bool) or int(node) != node or node < 1:
      fail(field, f"{node!r} must be an integer >= 1.")
  for field in ("sft.learning_rate", "rl.learning_rate", "rollout.temperature", "eval.temperature"):
    group, name = field.split(".")
    if not config[group][name] > 0:
      fail(field, f"{config[group][name]!r} must be > 0.")

  # The objective: a registered estimator whose constraints hold at this group size.
  kwargs = estimators.kwargs_from_config(config.objective)
  try:
    estimators.get_advantage_fn(config.objective.name, **kwargs)(
        jnp.zeros((1, config.rollout.num_samples), jnp.float32))
  except ValueError as e:
    fail("objective / config.rollout.num_samples", str(e))
  if config.objective.reduction not in estimators.REDUCTIONS:
    fail("objective.reduction", f"{config.objective.reduction!r}; allowed: {list(estimators.REDUCTIONS)}.")
  if config.objective.entropy_coef < 0:
    fail("objective.entropy_coef", f"{config.objective.entropy_coef!r} must be >= 0.")
  if config.objective.smoothing_gamma < 0:
    fail("objective.smoothing_gamma", f"{config.objective.smoothing_gamma!r} must be >= 0.")
  if config.sft.init_from and not os.path.isdir(os.path.join(config.sft.init_from, "checkpoints", "sft")):
    fail("sft.init_from", f"{config.sft.init_from!r} holds no SFT checkpoints (expected "
         f"{os.path.join(config.sft.init_from, 'checkpoints', 'sft')}); run its SFT first or set it to ''.")

  # Sizes that must fit the task.
  need = maze.max_path_length(size) + 1  # Every move of the longest possible shortest path, then DONE.
  if config.rollout.max_new_tokens < need:
    fail("rollout.max_new_tokens",
         f"{config.rollout.max_new_tokens} is shorter than the longest shortest path of a {size}x{size} "
         f"maze ({need - 1} moves + DONE); use >= {need}.")
  prompt_len = maze.prompt_length(size)
  longest = prompt_len + max(config.rollout.max_new_tokens, maze.min_response_length(size))
  if config.model.max_positions < longest:
    fail("model.max_positions", f"{config.model.max_positions} < prompt ({prompt_len}) + response "
         f"({longest - prompt_len}) tokens; use >= {longest}.")
  if config.model.vocab_size < maze.VOCAB_SIZE:
    fail("model.vocab_size", f"{config.model.vocab_size} < the maze vocabulary ({maze.VOCAB_SIZE}).")
  for k in config.eval.ks:
    if not 1 <= k <= config.eval.num_samples:
      fail("eval.ks", f"k={k} must be in [1, eval.num_samples={config.eval.num_samples}].")
  if config.eval.num_mazes % config.eval.prompt_chunk:
    fail("eval.prompt_chunk", f"{config.eval.prompt_chunk} must divide eval.num_mazes={config.eval.num_mazes}.")
  if config.checkpoint_every_steps % config.log_every_steps:
    fail("checkpoint_every_steps", f"{config.checkpoint_every_steps} must be a multiple of log_every_steps="
         f"{config.log_every_steps} (so a resumed run logs the same intervals).")
  if config.maze.train_data == "fixed" and config.maze.train_examples < config.rollout.num_prompts:
    fail("maze.train_examples", f"{config.maze.train_examples} < rollout.num_prompts="
         f"{config.rollout.num_prompts}.")
  try:
    decoder.DecoderConfig.from_config(config.model)
  except (ValueError, TypeError) as e:
    fail("model", str(e))


# ------------------------------------------------------------------------------------------------ data


def _sft_batch_fn(config, batch_sharding=None, heldout_table=None):
  size, batch, response_len = config.maze.size, config.sft.batch_size, maze.min_response_length(config.maze.size)
  return jax.jit(lambda key: maze.sft_batch(key, batch, size, response_len, heldout_table),
                 out_shardings=batch_sharding)


# A held-out set taking more than this share of the maze distribution is refused: fresh training draws
# would need many redraws (and could, with probability share^MAX_REDRAWS per maze, fail to avoid it).
MAX_HELDOUT_SHARE = 0.5


def check_heldout_room(heldout_grids: np.ndarray, size: int) -> dict:
  """Measures how much of the maze distribution the held-out set takes; stops a run where it leaves no room.

  Returns {"num_mazes", "distinct", "share_of_distribution"} for summary.json.
  """
  share = maze.heldout_mass(heldout_grids, size)
  distinct = len(maze.hash_table(heldout_grids))
  if share > MAX_HELDOUT_SHARE:
    raise ValueError(
        f"config.eval.num_mazes / config.maze.size: the {len(heldout_grids)} held-out {size}x{size} mazes "
        f"({distinct} distinct) make up {share:.0%} of all randomly drawn {size}x{size} mazes, so training "
        f"mazes cannot be drawn without them (held-out mazes are never trained on). Use a larger "
        f"config.maze.size (7 has room for a few held-out mazes, 9 for hundreds) or fewer eval.num_mazes.")
  return {"num_mazes": int(len(heldout_grids)), "distinct": distinct, "share_of_distribution": share}


def training_maze_bits(draw_keys: dict[str, jax.Array], batch_sizes: dict[str, int], size: int,
                       heldout_table: jax.Array, pool: np.ndarray | None = None, chunk: int = 256
                       ) -> dict[str, np.ndarray]:
  """Regenerates every training maze of a run from its keys: {source: passage bits bool [n, E]}.

  Args:
    draw_keys: {phase: keys [steps]} of the fresh draws (the key each step passed to `draw_training_mazes`).
    batch_sizes: {phase: mazes per step}.
    size: maze side.
    heldout_table: the sorted hash table of the held-out mazes.
    pool: a fixed training pool [T, S, S] (the data-scarce regime) counted as one more source, or None.

  The mazes are drawn again exactly as the trainer drew them (same keys, same held-out table), so
  `overlap_report` of the result measures what the run trained on.
  """
  @functools.partial(jax.jit, static_argnums=(1,))
  def draw_bits(keys, num):
    grids = jax.vmap(lambda key: maze.draw_training_mazes(key, num, size, heldout_table)[0])(keys)
    return maze.passage_bits(grids.reshape((-1, size, size)))

  sources = {}
  for phase, keys in draw_keys.items():
    parts = []
    for start in range(0, keys.shape[0], chunk):
      part = keys[start:start + chunk]
      count = part.shape[0]
      if count < chunk:  # Pad to one shape (one compilation); the padding is dropped below.
        part = jnp.concatenate([part, jnp.broadcast_to(part[:1], (chunk - count,) + part.shape[1:])])
      parts.append(np.asarray(draw_bits(part, batch_sizes[phase]))[:count * batch_sizes[phase]])
    sources[phase] = np.concatenate(parts) if parts else np.zeros((0, maze.num_passages(size)), bool)
  if pool is not None:
    sources["fixed_pool"] = np.asarray(maze.passage_bits(jnp.asarray(pool)))
  return sources


def overlap_report(sources: dict[str, np.ndarray], heldout_grids: np.ndarray) -> dict:
  """{"drawn", "distinct", "overlap_with_heldout"} per source and for "all", from passage bits [n, E].

  `overlap_with_heldout` counts distinct training mazes equal to a held-out maze, compared by passage bits
  (exactly, not by hash); the trainers guarantee 0.
  """
  heldout = {row.tobytes() for row in np.packbits(np.asarray(maze.passage_bits(jnp.asarray(heldout_grids))), axis=1)}
  report = {}
  everything = []
  for name, bits in list(sources.items()) + [("all", None)]:
    if bits is None:
      bits = np.concatenate(everything) if everything else np.zeros((0, 1), bool)
    else:
      everything.append(bits)
    packed = {row.tobytes() for row in np.packbits(bits, axis=1)}
    report[name] = {"drawn": int(bits.shape[0]), "distinct": len(packed),
                    "overlap_with_heldout": len(packed & heldout)}
  return report


class _FixedTrainPool:
  """Epoch-shuffled batches of a fixed TFDS train split (the data-scarce regime)."""

  def __init__(self, grids: np.ndarray, batch_size: int, key: jax.Array):
    self.grids = jnp.asarray(grids)
    self.batch_size = batch_size
    self.steps_per_epoch = len(grids) // batch_size
    self.key = key

  def epoch(self, step: int) -> int:
    return (step - 1) // self.steps_per_epoch

  def batch(self, step: int) -> jax.Array:
    epoch, within = divmod(step - 1, self.steps_per_epoch)
    perm = jax.random.permutation(jax.random.fold_in(self.key, epoch), len(self.grids))
    return self.grids[perm[within * self.batch_size:(within + 1) * self.batch_size]]


# ------------------------------------------------------------------------------------------------ eval


def evaluate(eval_fn, params, grids: jax.Array, chunk: int, key: jax.Array, num_samples: int,
             ks, temperature: float) -> dict[str, float]:
  """Held-out metrics from `num_samples` samples per maze of `grids` [M, S, S].

  Returns {"pass@k": unbiased pass@k averaged over mazes, "pass@k_se": its standard error over mazes,
  "best@k_bootstrap": the expectation of the official bootstrap best@k (with replacement; biased low),
  "pass_rate": mean fraction of correct samples, "fraction_solved": fraction of mazes with one correct sample}.
  """
  counts = []
  for i in range(0, grids.shape[0], chunk):
    counts.append(eval_fn(params, grids[i:i + chunk], jax.random.fold_in(key, i), jnp.float32(temperature)))
  return eval_metrics(jnp.concatenate(counts), num_samples, ks)


def eval_metrics(counts: np.ndarray, num_samples: int, ks) -> dict[str, float]:
  """The held-out metrics of `evaluate` from correct counts [M] out of `num_samples` per maze."""
  counts = jnp.asarray(counts)
  per_maze = np.asarray(metrics_lib.pass_at_k(num_samples, counts, list(ks)), np.float64)  # [M, len(ks)]
  num_mazes = per_maze.shape[0]
  # Standard error over mazes of the per-maze unbiased estimates: it covers both the choice of held-out mazes
  # and the sampling noise within each maze.
  se = per_maze.std(axis=0, ddof=1) / np.sqrt(num_mazes) if num_mazes > 1 else np.zeros(len(ks))
  result = {}
  for i, k in enumerate(ks):
    result[f"pass@{k}"] = float(per_maze[:, i].mean())
    result[f"pass@{k}_se"] = float(se[i])
  # The official code's log metric: the best of k samples drawn WITH replacement from the n (a bootstrap);
  # this is its exact expectation, 1 - (1 - c/n)^k, which is below the unbiased pass@k (docs/fidelity.md).
  fail_rate = 1.0 - np.asarray(counts, np.float64) / num_samples  # metrics.best_at_k_with_replacement, in
  for k in ks:                                                     # float64 on the host.
    result[f"best@{k}_bootstrap"] = float(np.mean(1.0 - fail_rate ** k))
  result["pass_rate"] = float(jnp.mean(counts) / num_samples)
  result["fraction_solved"] = float(jnp.mean(counts > 0))
  return result


# ------------------------------------------------------------------------------------------------ main job


def sft_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warm-up (none when sft.warmup_steps is 0) then a constant learning rate, from config.sft."""
  if config.sft.warmup_steps > 0:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, config.sft.learning_rate, config.sft.warmup_steps),
         optax.constant_schedule(config.sft.learning_rate)], [config.sft.warmup_steps])
  else:  # The official maze SFT: the full learning rate from the first step.
    schedule = optax.constant_schedule(config.sft.learning_rate)
  return train_steps.adamw(schedule, config.sft.b1, config.sft.b2, config.sft.weight_decay,
                           config.sft.grad_clip)


def load_sft_params(config: ml_collections.ConfigDict, workdir: str, phase: str = "sft"):
  """The parameters of the latest SFT checkpoint of a maze run in `workdir` (for analyses).

  `phase` names the checkpoint folder: "sft" for a single run, "sft_seed<s>" for seed s of a population.
  """
  model_fns = decoder.DecoderFns(decoder.DecoderConfig.from_config(config.model))
  like = jax.eval_shape(lambda: train_steps.init_state(model_fns.init(jax.random.key(0)), sft_optimizer(config)))
  source = checkpoints.PhaseCheckpointer(workdir, phase)
  step = source.latest_step()
  if step is None:
    raise ValueError(f"{workdir} holds no SFT checkpoint; run its SFT phase first.")
  state = source.restore(step, like)
  source.close()
  return model_fns, state.params


def _sft_source_config(config: ml_collections.ConfigDict) -> dict:
  """The config (as a dict) that trained this run's SFT policy: this run's, or that of `sft.init_from`."""
  if not config.sft.init_from:
    return config.to_dict()
  path = os.path.join(config.sft.init_from, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"config.sft.init_from: cannot read {path} ({e}); point it at a finished maze run's "
                     "workdir.") from e


def check_sft_source(config: ml_collections.ConfigDict) -> None:
  """`sft.init_from` must hold a run on the same mazes and held-out set (so its SFT excluded the same mazes)."""
  if not config.sft.init_from:
    return
  source = _sft_source_config(config)
  mine = config.to_dict()
  for group, field in (("maze", "size"), ("maze", "data_dir"), ("eval", "num_mazes")):
    if source.get(group, {}).get(field) != mine[group][field]:
      raise ValueError(
          f"config.sft.init_from: {config.sft.init_from!r} was trained with {group}.{field}="
          f"{source.get(group, {}).get(field)!r}, this run uses {mine[group][field]!r}; an SFT policy is only "
          "shared between runs on the same maze size and held-out set.")


def _training_draw_keys(config, keys, rl_steps: int):
  """({phase: keys [steps]}, {phase: mazes per step}) of the fresh training draws of SFT and RL."""
  source = _sft_source_config(config)
  sft_key = jax.random.fold_in(jax.random.key(source["seed"]), _KEY_SFT_DATA)
  sft_steps = source["sft"]["steps"]
  draw_keys = {"sft": jax.vmap(lambda s: jax.random.fold_in(sft_key, s))(jnp.arange(1, sft_steps + 1))}
  batch_sizes = {"sft": source["sft"]["batch_size"]}
  if config.maze.train_data == "fresh":
    draw_keys["rl"] = jax.vmap(lambda s: jax.random.fold_in(keys[_KEY_RL_DATA], s))(jnp.arange(1, rl_steps + 1))
    batch_sizes["rl"] = config.rollout.num_prompts
  return draw_keys, batch_sizes


def _check_memory(config, model_config, mesh) -> None:
  """Prints the RL step's memory plan per device and refuses, before compiling, a config over the budget."""
  stats = jax.devices()[0].memory_stats() or {}
  plan = memory_plan.estimate(
      model_config, memory_plan.Workload(config.rollout.num_prompts, config.rollout.num_samples,
                                         maze.prompt_length(config.maze.size), config.rollout.max_new_tokens),
      mesh=(mesh.shape["data"], mesh.shape["fsdp"]), device_bytes=stats.get("bytes_limit"),
      reserve_bytes=memory_plan.GiB if stats.get("bytes_limit") else 0)
  if sharding.is_chief() and stats.get("bytes_limit"):
    print(f"memory plan: {plan.describe()}", flush=True)
  memory_plan.check(plan)


def finished_summary(config: ml_collections.ConfigDict, workdir: str) -> dict | None:
  """The summary of a finished run of exactly this config in `workdir`, else None."""
  summary = workdir_lib.read_finished_summary(workdir, config.to_dict())
  if summary is not None and summary.get("rl_steps") == config.rl.steps:
    return summary
  return None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) SFT then RL on mazes and returns the summary written to <workdir>/summary.json.

  One process at a time per workdir (a second one stops at once, naming the holder). A workdir that holds a
  finished run of the same config is left untouched: its summary is returned.
  """
  if population_lib.is_population(config):  # A table of runs as one program: maxrl_jax/train_population.py.
    from maxrl_jax import train_population  # pylint: disable=import-outside-toplevel
    return train_population.train_and_evaluate(config, workdir)
  sharding.initialize_distributed(config.get("mesh"))  # Multi-host: before any JAX computation.
  validate_config(config)
  check_sft_source(config)
  # Device layout checked before anything is written.
  sharding.check_batch_sizes(sharding.make_mesh(config.get("mesh")), {
      "rollout.num_prompts": config.rollout.num_prompts, "sft.batch_size": config.sft.batch_size,
      "eval.prompt_chunk": config.eval.prompt_chunk})
  workdir = workdir_lib.prepare_workdir(workdir)
  with workdir_lib.WorkdirLock(workdir, enabled=sharding.is_chief()):
    finished = finished_summary(config, workdir)
    if finished is not None:
      print(f"{workdir} already holds this run, finished ({finished['rl_steps']} RL steps); nothing was "
            f"changed. Its results: {os.path.join(workdir, 'summary.json')}", flush=True)
      return finished
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  # Batches split over every device; parameters and optimizer state by config.mesh.param_rules.
  mesh = sharding.make_mesh(config.get("mesh"))
  param_rules = sharding.MeshConfig.from_config(config.get("mesh")).param_rules
  sharding.check_batch_sizes(mesh, {"rollout.num_prompts": config.rollout.num_prompts,
                                    "sft.batch_size": config.sft.batch_size,
                                    "eval.prompt_chunk": config.eval.prompt_chunk})
  batch_sharding = sharding.batch_sharding(mesh)
  if sharding.is_chief():  # Run files are written once; orbax coordinates the checkpoints itself.
    run_logging.check_or_write_config(workdir, config.to_dict())
  identity = workdir_lib.config_identity(config.to_dict())
  start_time = time.time()

  model_fns = decoder.DecoderFns(decoder.DecoderConfig.from_config(config.model))
  _check_memory(config, model_fns.config, mesh)
  root = jax.random.key(config.seed)
  keys = {i: jax.random.fold_in(root, i) for i in range(5)}
  writer = sharding.ChiefOnlyWriter(run_logging.MetricsWriter(
      workdir, sinks=run_logging.sinks_from_config(config, workdir) if sharding.is_chief() else ()))
  size = config.maze.size
  data_dir = config.maze.data_dir or os.path.join(workdir, "tfds")
  tfds.disable_progress_bar()
  num_train = config.maze.train_examples if config.maze.train_data == "fixed" else config.rollout.num_prompts
  load_split = functools.partial(maze_dataset.load_maze_split, data_dir, size, num_train=num_train,
                                 num_test=config.eval.num_mazes)
  if not sharding.is_chief():
    sharding.barrier("tfds_build")  # Process 0 builds the dataset (if missing) before the others read it.
  eval_grids_np = load_split("test")
  if sharding.is_chief():
    sharding.barrier("tfds_build")
  heldout = check_heldout_room(eval_grids_np, size)
  eval_grids = jnp.asarray(eval_grids_np)
  heldout_table = jnp.asarray(maze.hash_table(eval_grids_np))  # Never drawn for SFT or RL training.

  # Checkpoints carry the run's records and its config identity; they are verified when restored.
  sft_ckpt = checkpoints.PhaseCheckpointer(workdir, "sft", config.keep_checkpoints, identity=identity)
  rl_ckpt = checkpoints.PhaseCheckpointer(workdir, "rl", config.keep_checkpoints, identity=identity)
  bar = functools.partial(tqdm.tqdm, disable=not (config.progress_bar and sharding.is_chief()),
                          dynamic_ncols=True)

  # ---------------------------------------------------------------- SFT
  sft_tx = sft_optimizer(config)
  # Parameters and optimizer state are created already sharded (eval_shape -> rules -> jit out_shardings).
  state, state_sharding = sharding.init_sharded(
      lambda key: train_steps.init_state(model_fns.init(key), sft_tx), keys[_KEY_INIT], mesh=mesh,
      rules=param_rules)
  objective = config.objective
  rl_tx = train_steps.adamw(config.rl.learning_rate, config.rl.b1, config.rl.b2, config.rl.weight_decay,
                            config.rl.grad_clip)
  rl_like, rl_state_sharding = sharding.init_sharded(
      lambda params: train_steps.init_state(params, rl_tx), state.params, mesh=mesh, rules=param_rules)

  eval_fn = train_steps.make_eval_fn(
      model_fns, prompt_fn=maze.encode_prompts, verifier=maze.verify_groups,
      num_samples=config.eval.num_samples, max_new_tokens=config.rollout.max_new_tokens,
      stop_tokens=STOP_TOKENS, params_sharding=state_sharding.params, batch_sharding=batch_sharding)
  run_eval = functools.partial(
      evaluate, eval_fn, grids=eval_grids, chunk=config.eval.prompt_chunk, key=keys[_KEY_EVAL],
      num_samples=config.eval.num_samples, ks=tuple(config.eval.ks), temperature=config.eval.temperature)

  rl_found = rl_ckpt.restore_latest(rl_like)
  del rl_like
  if rl_found is not None:
    rl_resume, rl_state, extra = rl_found
    records = training_loop.RecordKeeper.resume(writer, extra.get("records"), f"RL step {rl_resume}")
  elif config.sft.init_from:
    # Start RL from another run's final SFT policy (shared by the objectives of an ablation).
    rl_resume = None
    source = checkpoints.PhaseCheckpointer(config.sft.init_from, "sft", config.keep_checkpoints)
    source_found = source.restore_latest(state)
    source.close()
    if source_found is None:
      raise ValueError(f"config.sft.init_from: {config.sft.init_from!r} holds no SFT checkpoint yet.")
    state = source_found[1]
    records = training_loop.RecordKeeper.resume(writer, [], "the start")
  else:
    rl_resume = None
    sft_found = sft_ckpt.restore_latest(state)
    sft_resume = 0
    if sft_found is not None:
      sft_resume, state, extra = sft_found
    records = training_loop.RecordKeeper.resume(
        writer, extra.get("records") if sft_found else [], f"SFT step {sft_resume}" if sft_resume else "the start")
    sft_step = train_steps.make_sft_step(model_fns, sft_tx, state_sharding=state_sharding,
                                         batch_sharding=batch_sharding)
    sft_batch = _sft_batch_fn(config, batch_sharding, heldout_table)
    state = training_loop.run_phase(
        "sft", state, lambda s, step: sft_step(s, sft_batch(jax.random.fold_in(keys[_KEY_SFT_DATA], step))),
        start=sft_resume, end=config.sft.steps, writer=records,
        save=lambda step, s: sft_ckpt.save(step, s, records.records),
        log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
        progress=functools.partial(bar, desc="SFT"))

  # ---------------------------------------------------------------- RL
  if rl_resume is None:
    rl_state, rl_state_sharding = sharding.init_sharded(
        lambda params: train_steps.init_state(params, rl_tx), state.params, mesh=mesh, rules=param_rules)
  del state
  rl_step = train_steps.make_rl_step(
      model_fns, rl_tx, prompt_fn=maze.encode_prompts, verifier=maze.verify_groups,
      advantage_fn=estimators.get_advantage_fn(objective.name, **estimators.kwargs_from_config(objective)),
      num_samples=config.rollout.num_samples, max_new_tokens=config.rollout.max_new_tokens,
      stop_tokens=STOP_TOKENS, reduction=objective.reduction, entropy_coef=objective.entropy_coef,
      smoothing_gamma=objective.smoothing_gamma, self_filter=objective.self_filter,
      state_sharding=rl_state_sharding, batch_sharding=batch_sharding)

  evals = {r["step"]: r for r in records.records if r.get("phase") == "eval"}
  if 0 not in evals:
    evals[0] = {"phase": "eval", "step": 0, **run_eval(rl_state.params)}
    records.write(evals[0])

  num_prompts = config.rollout.num_prompts
  if config.maze.train_data == "fixed":
    pool_grids = load_split("train")  # The TFDS train split excludes the test split's mazes.
    if int(maze.count_in_table(jnp.asarray(pool_grids), heldout_table)):
      raise ValueError(f"The fixed training pool under {data_dir} holds held-out mazes; it was written by an "
                       "older version of the dataset. Delete that directory to rebuild it.")
    pool = _FixedTrainPool(pool_grids, num_prompts, keys[_KEY_RL_DATA])
    next_grids = pool.batch
  else:
    fresh = jax.jit(lambda key: maze.draw_training_mazes(key, num_prompts, size, heldout_table)[0],
                    out_shardings=batch_sharding)
    pool_grids = None
    pool = None
    next_grids = lambda step: fresh(jax.random.fold_in(keys[_KEY_RL_DATA], step))

  temperature = jnp.float32(config.rollout.temperature)

  def annotate(record, step):
    if pool is not None:
      record["epoch"] = pool.epoch(step)

  rl_state = training_loop.run_phase(
      "rl", rl_state,
      lambda s, step: rl_step(s, next_grids(step), jax.random.fold_in(keys[_KEY_RL_SAMPLING], step), temperature),
      start=rl_resume or 0, end=config.rl.steps, writer=records,
      save=lambda step, s: rl_ckpt.save(step, s, records.records),
      log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
      progress=functools.partial(bar, desc=f"RL ({objective.name})"), evaluate=run_eval,
      eval_every=config.eval.every_steps, evals=evals, tokens_key="generated_tokens", annotate=annotate)
  sft_ckpt.close()
  rl_ckpt.close()

  final_step = max(evals)
  if final_step != config.rl.steps:  # Never report an evaluation the run did not make.
    raise RuntimeError(f"{workdir}: the last held-out evaluation is at RL step {final_step}, not "
                       f"rl.steps={config.rl.steps}; the records are incomplete. Re-run to resume.")
  final = {k: v for k, v in evals[final_step].items() if k not in ("phase", "step")}
  after_sft = {k: v for k, v in evals[0].items() if k not in ("phase", "step")}
  ks = list(config.eval.ks)
  draw_keys, batch_sizes = _training_draw_keys(config, keys, final_step)
  training_mazes = overlap_report(
      training_maze_bits(draw_keys, batch_sizes, size, heldout_table, pool=pool_grids), eval_grids_np)
  if training_mazes["all"]["overlap_with_heldout"]:
    raise RuntimeError(f"{training_mazes['all']['overlap_with_heldout']} held-out mazes were drawn for "
                       f"training ({training_mazes}); the held-out results of {workdir} are not valid.")
  summary = {
      "objective": objective.name,
      "objective_kwargs": estimators.kwargs_from_config(objective),
      "eval": final,
      "sft_eval": after_sft,
      "rl_steps": final_step,
      "eval_num_mazes": config.eval.num_mazes,
      "eval_num_samples": config.eval.num_samples,
      "improvement": {f"pass@{k}": final[f"pass@{k}"] - after_sft[f"pass@{k}"] for k in ks},
      # The held-out set and every maze the run trained on (SFT and RL), regenerated from their keys.
      "heldout_mazes": heldout,
      "training_mazes": training_mazes,
      "wall_time_s_this_launch": time.time() - start_time,
      "config_sha256": workdir_lib.config_digest(config.to_dict()),
  }
  if sharding.is_chief():
    run_logging.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    curves = plots.plot_run(workdir) if run_logging.curves_wanted(config) else []
  def with_se(result):
    cells = {f"pass@{k}": f"{result[f'pass@{k}']:.4f} ± {result.get(f'pass@{k}_se', 0.0):.4f}" for k in ks}
    return {**cells, "fraction_solved": result["fraction_solved"]}

  rows = [{"policy": "after SFT", **with_se(after_sft)},
          {"policy": f"after RL ({objective.name}, {final_step} steps)", **with_se(final)}]
  print(run_logging.format_table(
      rows, ["policy"] + [f"pass@{k}" for k in ks] + ["fraction_solved"],
      title=f"Held-out mazes ({config.eval.num_mazes} mazes {size}x{size}, never trained on; "
            f"{config.eval.num_samples} samples each, temperature {config.eval.temperature}; ± standard error "
            f"over mazes). Trained on {training_mazes['all']['distinct']} distinct mazes, "
            f"{training_mazes['all']['overlap_with_heldout']} of them held out."))
  if sharding.is_chief() and curves:
    print("Curves: " + ", ".join(curves), flush=True)
  return summary
