"""The maze job for a population: every member's SFT and RL in one jitted program (maxrl_jax/population.py).

`train_maze.train_and_evaluate` hands a config with a `population` block here. The run writes

    <workdir>/config.json, metrics.jsonl    records carry the member: {"member", "objective", "seed", ...}
    <workdir>/checkpoints/sft_seed<s>/       the SFT policy of each distinct seed
    <workdir>/checkpoints/rl/               the stacked RL state of every member
    <workdir>/summary.json                  {"members": [{objective, seed, overrides, eval, sft_eval}, ...],
                                             "table": mean ± std over seeds per objective, ...}
    <workdir>/members/<objective>/seed<s>/  each member as a single run's workdir (metrics.jsonl, summary.json,
                                            config.json, curves), for tools written for single runs
    <workdir>/population.png                held-out pass@k along training, mean ± std over seeds

and re-running it on the same workdir resumes from the latest checkpoint (as a single run does).
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from maxrl_jax import checkpoints
from maxrl_jax import estimators
from maxrl_jax import memory_plan
from maxrl_jax import plots
from maxrl_jax import population as population_lib
from maxrl_jax import run_logging
from maxrl_jax import sharding
from maxrl_jax import train_maze
from maxrl_jax import train_steps
from maxrl_jax import training_loop
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.models import decoder
from maxrl_jax.tasks import maze
from maxrl_jax.tasks import maze_dataset

# The streams derived from a seed, exactly as a single run derives them.
_KEY_INIT, _KEY_SFT_DATA, _KEY_RL_DATA, _KEY_RL_SAMPLING, _KEY_EVAL = (  # pylint: disable=protected-access
    train_maze._KEY_INIT, train_maze._KEY_SFT_DATA, train_maze._KEY_RL_DATA, train_maze._KEY_RL_SAMPLING,
    train_maze._KEY_EVAL)


def validate(config: ml_collections.ConfigDict) -> list[population_lib.Member]:
  """The members, each member's config checked like a single run's; errors name the member."""
  members = population_lib.members(config)
  if config.sft.init_from:
    raise ValueError("config.sft.init_from: a population trains one SFT policy per seed itself; set it to ''.")
  for member in members:
    try:
      train_maze.validate_config(member.config)
    except ValueError as e:
      raise ValueError(f"population member {member.name}: {e}") from e
  return members


def _seed_keys(seed: int) -> list[jax.Array]:
  root = jax.random.key(seed)
  return [jax.random.fold_in(root, i) for i in range(5)]


def _check_memory(config, model_config, mesh, members_per_group: int) -> None:
  """Prints the plan (one member's, times the members a device group holds) and refuses an over-budget run."""
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  plan = memory_plan.estimate(
      model_config, memory_plan.Workload(config.rollout.num_prompts, config.rollout.num_samples,
                                         maze.prompt_length(config.maze.size), config.rollout.max_new_tokens),
      mesh=(mesh.shape["data"], mesh.shape["fsdp"]))
  if not limit:
    return
  need = plan.total * members_per_group + memory_plan.GiB
  if sharding.is_chief():
    print(f"memory plan: {members_per_group} members per device group x ({plan.describe()}) = "
          f"{need / memory_plan.GiB:.2f} GiB per device with 1 GiB reserve, budget "
          f"{limit / memory_plan.GiB:.2f} GiB", flush=True)
  if need > limit:
    raise ValueError(
        f"The population needs about {need / memory_plan.GiB:.2f} GiB per device ({members_per_group} members "
        f"per device group), more than the {limit / memory_plan.GiB:.2f} GiB available: use more devices, "
        "fewer members per run, or set config.population.member_devices so that each member group spans more "
        "devices.")


def eval_population(eval_fn, params, grids: jax.Array, chunk: int, keys: jax.Array, num_samples: int, ks,
                    temperature: float, num_members: int) -> list[dict]:
  """Held-out metrics of every member ([K] stacked `params`, eval keys [K]); see train_maze.evaluate."""
  counts = [eval_fn(params, grids[i:i + chunk], keys, jnp.int32(i), jnp.float32(temperature))
            for i in range(0, grids.shape[0], chunk)]  # Dispatched back to back, fetched once.
  counts = np.asarray(jnp.concatenate(counts, axis=1))  # [K, M]
  return [train_maze.eval_metrics(counts[k], num_samples, ks) for k in range(num_members)]


class _TensorBoardPerMember:
  """A metrics sink that keeps one TensorBoard run per member (<logdir>/<objective>/seed<s>) and one for SFT."""

  def __init__(self, logdir: str, names: dict[int, str]):
    self.logdir, self.names, self.sinks = logdir, names, {}

  def _sink(self, record):
    if "member" in record:
      name = self.names[record["member"]]
    else:
      name = f"sft/seed{record.get('seed', 0)}"
    if name not in self.sinks:
      self.sinks[name] = run_logging.TensorBoardSink(os.path.join(self.logdir, name))
    return self.sinks[name]

  def write(self, record):
    self._sink(record).write({k: v for k, v in record.items() if k not in ("member", "seed")})

  def reset(self, records):
    groups = {}
    for record in records:
      groups.setdefault(id(self._sink(record)), (self._sink(record), []))[1].append(record)
    for sink in self.sinks.values():
      sink.reset([r for r in groups.get(id(sink), (sink, []))[1]])

  def close(self):
    for sink in self.sinks.values():
      sink.close()


def _sinks(config, workdir, members):
  if not sharding.is_chief():
    return []
  sinks = run_logging.sinks_from_config(config, workdir)
  out = []
  for sink in sinks:
    if isinstance(sink, run_logging.TensorBoardSink):
      out.append(_TensorBoardPerMember(sink.logdir, {m.index: m.name for m in members}))
    else:
      out.append(sink)
  return out


class PopulationProgram:
  """The stacked RL state and the one jitted RL step of a population (what the trainer and benchmarks run).

  Attributes:
    hyper: per-member values {"branch": [K] int32, <varying field>: [K]} placed on the member axis.
    shared: {field: Python value} of the hyperparameters every member shares.
    rl_like, rl_sharding: the stacked RL TrainState's shapes and shardings.
  """

  def __init__(self, config, members, model_fns, mesh, param_rules):
    self.config, self.members, self.model_fns, self.mesh = config, members, model_fns, mesh
    self.member_values = population_lib.stacked_sharding(mesh, len(members))
    self.shared, varying = population_lib.member_hyperparameters(members)
    branches, branch_index = population_lib.advantage_branches(members)
    self.advantage = population_lib.make_advantage_fn(branches)
    self.hyper = jax.device_put(
        {"branch": jnp.asarray(branch_index), **{k: jnp.asarray(v) for k, v in varying.items()}},
        self.member_values)
    seeds = population_lib.distinct_seeds(members)
    self.seed_index = np.asarray([seeds.index(m.seed) for m in members], np.int32)
    params_like = jax.eval_shape(model_fns.init, jax.random.key(0))
    stacked = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((len(seeds),) + x.shape, x.dtype), params_like)
    self.rl_like = jax.eval_shape(self._init_rl, stacked, self.hyper)
    self.rl_sharding = population_lib.stacked_shardings(self.rl_like, mesh, param_rules)

  def _get(self, hp, field):
    return hp[field] if field in hp else self.shared[field]

  def member_tx(self, hp):
    """The member's RL optimizer (AdamW with its learning rate, betas and weight decay)."""
    return train_steps.adamw(self._get(hp, "rl.learning_rate"), self._get(hp, "rl.b1"), self._get(hp, "rl.b2"),
                             self._get(hp, "rl.weight_decay"), self.config.rl.grad_clip)

  def _init_rl(self, sft_params, hp):
    params = jax.tree_util.tree_map(lambda x: x[self.seed_index], sft_params)  # Each member's seed's policy.
    return jax.vmap(lambda p, h: train_steps.init_state(p, self.member_tx(h)))(params, hp)

  def init_rl(self, sft_params):
    """The stacked RL state from the SFT parameters stacked over distinct seeds [S, ...]."""
    return jax.jit(self._init_rl, out_shardings=self.rl_sharding)(sft_params, self.hyper)

  def make_rl_step(self, heldout_table, pool_grids=None):
    """Jitted `rl_step(state, data_keys [K], sampling_keys [K], hyper, step, temperature)` (state donated).

    Member k draws its mazes from `data_keys[k]` (fresh draws excluding `heldout_table`, or batches of the
    fixed pool `pool_grids` in the epoch order of train_maze's pool) and samples with
    `fold_in(sampling_keys[k], step)`, exactly as its single run does.
    """
    config, num_prompts, size = self.config, self.config.rollout.num_prompts, self.config.maze.size
    rep = sharding.replicated(self.mesh)
    if pool_grids is not None:
      pool = jax.device_put(jnp.asarray(pool_grids), rep)
      steps_per_epoch = len(pool_grids) // num_prompts

      def draw(key, step):  # As train_maze._FixedTrainPool.batch.
        epoch, within = (step - 1) // steps_per_epoch, (step - 1) % steps_per_epoch
        perm = jax.random.permutation(jax.random.fold_in(key, epoch), pool.shape[0])
        return pool[jax.lax.dynamic_slice_in_dim(perm, within * num_prompts, num_prompts)]
    else:
      def draw(key, step):
        return maze.draw_training_mazes(jax.random.fold_in(key, step), num_prompts, size, heldout_table)[0]

    def member_step(state, data_key, sampling_key, hp, step, temperature):
      return train_steps.rl_step(
          state, draw(data_key, step), jax.random.fold_in(sampling_key, step), temperature,
          model_fns=self.model_fns, tx=self.member_tx(hp), prompt_fn=maze.encode_prompts,
          verifier=maze.verify_groups, advantage_fn=lambda rewards: self.advantage(rewards, hp["branch"]),
          num_samples=config.rollout.num_samples, max_new_tokens=config.rollout.max_new_tokens,
          stop_tokens=train_maze.STOP_TOKENS, reduction=config.objective.reduction,
          entropy_coef=self._get(hp, "objective.entropy_coef"),
          smoothing_gamma=self._get(hp, "objective.smoothing_gamma"),
          self_filter=self._get(hp, "objective.self_filter"), lockstep_axis=population_lib.MEMBER_AXIS)

    values = self.member_values
    vmapped = jax.vmap(member_step, in_axes=(0, 0, 0, 0, None, None), axis_name=population_lib.MEMBER_AXIS)
    groups = self.mesh.shape[population_lib.MEMBER_AXIS]
    per_group = len(self.members) // groups
    chunk = population_lib.vmap_chunk(self.config, per_group, self.mesh.devices.flat[0].platform)

    def step(state, data_keys, sampling_keys, hp, step_index, temperature):
      if chunk == per_group:
        return vmapped(state, data_keys, sampling_keys, hp, step_index, temperature)
      # Each device group loops (lax.map) over its members in chunks of `chunk`, vmapped over the groups and
      # the chunk: members k = g * per_group + i * chunk + j, i looped, (g, j) vmapped.
      loops = per_group // chunk
      split = lambda x: jnp.swapaxes(x.reshape((groups, loops, chunk) + x.shape[1:]), 0, 1).reshape(
          (loops, groups * chunk) + x.shape[1:])
      merge = lambda x: jnp.swapaxes(x.reshape((loops, groups, chunk) + x.shape[2:]), 0, 1).reshape(
          (groups * loops * chunk,) + x.shape[2:])
      inputs = jax.tree_util.tree_map(split, (state, data_keys, sampling_keys, hp))
      outputs = jax.lax.map(lambda xs: vmapped(*xs, step_index, temperature), inputs)
      return jax.tree_util.tree_map(merge, outputs)

    return jax.jit(step, donate_argnums=0,
                   in_shardings=(self.rl_sharding, values, values, values, rep, rep),
                   out_shardings=(self.rl_sharding, rep))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) the population's SFT and RL; returns the summary written to <workdir>/summary.json."""
  sharding.initialize_distributed(config.get("mesh"))
  members = validate(config)
  mesh = population_lib.make_mesh(config, len(members))
  sharding.check_batch_sizes(mesh, {"rollout.num_prompts": config.rollout.num_prompts,
                                    "sft.batch_size": config.sft.batch_size,
                                    "eval.prompt_chunk": config.eval.prompt_chunk})
  workdir = workdir_lib.prepare_workdir(workdir)
  with workdir_lib.WorkdirLock(workdir, enabled=sharding.is_chief()):
    finished = train_maze.finished_summary(config, workdir)
    if finished is not None:
      print(f"{workdir} already holds this population, finished ({finished['rl_steps']} RL steps); nothing "
            f"was changed. Its results: {os.path.join(workdir, 'summary.json')}", flush=True)
      return finished
    return _train_and_evaluate(config, workdir, members, mesh)


def _train_and_evaluate(config, workdir, members, mesh) -> dict:
  num_members = len(members)
  seeds = population_lib.distinct_seeds(members)
  param_rules = sharding.MeshConfig.from_config(config.get("mesh")).param_rules
  if sharding.is_chief():
    run_logging.check_or_write_config(workdir, config.to_dict())
    print(f"population: {population_lib.describe(members, mesh)}", flush=True)
  identity = workdir_lib.config_identity(config.to_dict())
  start_time = time.time()
  model_fns = decoder.DecoderFns(decoder.DecoderConfig.from_config(config.model))
  _check_memory(config, model_fns.config, mesh, num_members // mesh.shape[population_lib.MEMBER_AXIS])

  keys = {s: _seed_keys(s) for s in seeds}
  stack = lambda which, seed_list: jnp.stack([keys[s][which] for s in seed_list])
  member_seeds = [m.seed for m in members]
  rep = sharding.replicated(mesh)
  batch_sharding = sharding.batch_sharding(mesh)
  member_values = population_lib.stacked_sharding(mesh, num_members)

  writer = sharding.ChiefOnlyWriter(run_logging.MetricsWriter(workdir, sinks=_sinks(config, workdir, members)))
  size = config.maze.size
  data_dir = config.maze.data_dir or os.path.join(workdir, "tfds")
  tfds.disable_progress_bar()
  num_train = config.maze.train_examples if config.maze.train_data == "fixed" else config.rollout.num_prompts
  load_split = functools.partial(maze_dataset.load_maze_split, data_dir, size, num_train=num_train,
                                 num_test=config.eval.num_mazes)
  if not sharding.is_chief():
    sharding.barrier("tfds_build")
  eval_grids_np = load_split("test")
  if sharding.is_chief():
    sharding.barrier("tfds_build")
  heldout = train_maze.check_heldout_room(eval_grids_np, size)
  eval_grids = jnp.asarray(eval_grids_np)
  heldout_table = jnp.asarray(maze.hash_table(eval_grids_np))

  sft_ckpts = {s: checkpoints.PhaseCheckpointer(workdir, f"sft_seed{s}", config.keep_checkpoints, identity=identity)
               for s in seeds}
  rl_ckpt = checkpoints.PhaseCheckpointer(workdir, "rl", config.keep_checkpoints, identity=identity)
  bar = functools.partial(tqdm.tqdm, disable=not (config.progress_bar and sharding.is_chief()),
                          dynamic_ncols=True)

  # ---------------------------------------------------------------- states
  # SFT: one policy per distinct seed, trained by the single run's own jitted step (so it is the very policy
  # `--config.seed=<s>` trains); RL: every member stacked on the leading axis.
  sft_tx = train_maze.sft_optimizer(config)
  init_sft = lambda key: train_steps.init_state(model_fns.init(key), sft_tx)
  sft_like = jax.eval_shape(init_sft, keys[seeds[0]][_KEY_INIT])
  sft_sharding = sharding.tree_shardings(sft_like, mesh, param_rules)

  program = PopulationProgram(config, members, model_fns, mesh, param_rules)
  hyper, rl_sharding = program.hyper, program.rl_sharding
  rl_abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                       program.rl_like, rl_sharding)

  # ---------------------------------------------------------------- eval
  eval_body = functools.partial(
      train_steps.eval_counts, model_fns=model_fns, prompt_fn=maze.encode_prompts, verifier=maze.verify_groups,
      num_samples=config.eval.num_samples, max_new_tokens=config.rollout.max_new_tokens,
      stop_tokens=train_maze.STOP_TOKENS, lockstep_axis=population_lib.MEMBER_AXIS)
  eval_fn = jax.jit(
      lambda params, grids, member_keys, offset, temperature: jax.vmap(
          lambda p, k: eval_body(p, grids, jax.random.fold_in(k, offset), temperature),
          axis_name=population_lib.MEMBER_AXIS)(params, member_keys),
      in_shardings=(rl_sharding.params, batch_sharding, member_values, rep, rep), out_shardings=rep)
  eval_keys = jax.device_put(stack(_KEY_EVAL, member_seeds), member_values)
  run_eval = functools.partial(
      eval_population, eval_fn, grids=eval_grids, chunk=config.eval.prompt_chunk, keys=eval_keys,
      num_samples=config.eval.num_samples, ks=tuple(config.eval.ks), temperature=config.eval.temperature,
      num_members=num_members)
  member_fields = [m.fields() for m in members]

  # ---------------------------------------------------------------- SFT (one policy per seed)
  rl_found = rl_ckpt.restore_latest(rl_abstract)
  if rl_found is not None:
    rl_resume, rl_state, extra = rl_found
    records = training_loop.RecordKeeper.resume(writer, extra.get("records"), f"RL step {rl_resume}")
  else:
    rl_resume = None
    sft_abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                          sft_like, sft_sharding)
    found = {s: sft_ckpts[s].restore_latest(sft_abstract) for s in seeds}
    started = [s for s in seeds if found[s] is not None]
    last = started[-1] if started else None  # Its checkpoint holds the records of every earlier seed too.
    records = training_loop.RecordKeeper.resume(
        writer, found[last][2].get("records") if last is not None else [],
        f"SFT step {found[last][0]} of seed {last}" if last is not None else "the start")
    sft_step = train_steps.make_sft_step(model_fns, sft_tx, state_sharding=sft_sharding,
                                         batch_sharding=batch_sharding)
    sft_batch = train_maze._sft_batch_fn(config, batch_sharding, heldout_table)  # pylint: disable=protected-access
    init_state = jax.jit(init_sft, out_shardings=sft_sharding)
    sft_params = []
    for seed in seeds:
      ckpt = sft_ckpts[seed]
      start, state = (found[seed][0], found[seed][1]) if found[seed] is not None else (0, None)
      if start < config.sft.steps or state is None:
        state = init_state(keys[seed][_KEY_INIT]) if state is None else state
        data_key = keys[seed][_KEY_SFT_DATA]
        state = training_loop.run_phase(
            "sft", state, lambda s, step, data_key=data_key: sft_step(s, sft_batch(jax.random.fold_in(data_key, step))),
            start=start, end=config.sft.steps, writer=records,
            save=lambda step, s, ckpt=ckpt: ckpt.save(step, s, records.records),
            log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
            progress=functools.partial(bar, desc=f"SFT (seed {seed})"),
            annotate=lambda record, step, seed=seed: record.update(seed=seed))
      sft_params.append(state.params)
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *sft_params)
    rl_state = program.init_rl(stacked)
    del sft_params, stacked

  # ---------------------------------------------------------------- RL
  pool_grids = None
  if config.maze.train_data == "fixed":
    pool_grids = load_split("train")
    if int(maze.count_in_table(jnp.asarray(pool_grids), heldout_table)):
      raise ValueError(f"The fixed training pool under {data_dir} holds held-out mazes; it was written by an "
                       "older version of the dataset. Delete that directory to rebuild it.")
    steps_per_epoch = len(pool_grids) // config.rollout.num_prompts
  rl_step = program.make_rl_step(heldout_table, pool_grids)
  data_keys = jax.device_put(stack(_KEY_RL_DATA, member_seeds), member_values)
  sampling_keys = jax.device_put(stack(_KEY_RL_SAMPLING, member_seeds), member_values)
  temperature = jnp.float32(config.rollout.temperature)

  evals = {}
  for r in records.records:
    if r.get("phase") == "eval" and "member" in r:
      evals.setdefault(r["step"], []).append(r)
  if 0 not in evals:
    evals[0] = [{"phase": "eval", "step": 0, **fields, **result}
                for fields, result in zip(member_fields, run_eval(rl_state.params))]
    for record in evals[0]:
      records.write(record)

  def annotate(record, step):
    if pool_grids is not None:
      record["epoch"] = (step - 1) // steps_per_epoch

  rl_state = training_loop.run_phase(
      "rl", rl_state,
      lambda s, step: rl_step(s, data_keys, sampling_keys, hyper, jnp.int32(step), temperature),
      start=rl_resume or 0, end=config.rl.steps, writer=records,
      save=lambda step, s: rl_ckpt.save(step, s, records.records),
      log_every=config.log_every_steps, checkpoint_every=config.checkpoint_every_steps,
      progress=functools.partial(bar, desc=f"RL ({num_members} members)"), evaluate=run_eval,
      eval_every=config.eval.every_steps, evals=evals, tokens_key="generated_tokens", annotate=annotate,
      members=member_fields)
  for ckpt in sft_ckpts.values():
    ckpt.close()
  rl_ckpt.close()
  return _finish(config, workdir, members, seeds, keys, evals, records.records, heldout, eval_grids_np,
                 heldout_table, pool_grids, mesh, start_time)


def _strip(record: dict) -> dict:
  drop = ("phase", "step", "member", "objective", "seed", "sweep")
  return {k: v for k, v in record.items() if k not in drop}


def _finish(config, workdir, members, seeds, keys, evals, records, heldout, eval_grids_np, heldout_table,
            pool_grids, mesh, start_time) -> dict:
  final_step = max(evals)
  if final_step != config.rl.steps:
    raise RuntimeError(f"{workdir}: the last held-out evaluation is at RL step {final_step}, not "
                       f"rl.steps={config.rl.steps}; the records are incomplete. Re-run to resume.")
  ks = list(config.eval.ks)
  # Every maze each seed's SFT and RL trained on, regenerated from its keys (RL draws depend on the seed).
  training_mazes = {}
  for seed in seeds:
    seed_config = ml_collections.ConfigDict(config.to_dict())
    seed_config.seed = seed
    draw_keys, batch_sizes = train_maze._training_draw_keys(seed_config, keys[seed], final_step)  # pylint: disable=protected-access
    training_mazes[f"seed{seed}"] = train_maze.overlap_report(
        train_maze.training_maze_bits(draw_keys, batch_sizes, config.maze.size, heldout_table, pool=pool_grids),
        eval_grids_np)
  overlap = max(r["all"]["overlap_with_heldout"] for r in training_mazes.values())
  if overlap:
    raise RuntimeError(f"{overlap} held-out mazes were drawn for training ({training_mazes}); the held-out "
                       f"results of {workdir} are not valid.")
  by_member = {i: {} for i in range(len(members))}
  for step, step_records in evals.items():
    for r in step_records:
      by_member[r["member"]][step] = r
  member_summaries = []
  for m in members:
    final, after_sft = _strip(by_member[m.index][final_step]), _strip(by_member[m.index][0])
    member_summaries.append({
        **m.fields(), "name": m.name, "overrides": m.overrides,
        "objective_name": m.config.objective.name,
        "objective_kwargs": estimators.kwargs_from_config(m.config.objective),
        "eval": final, "sft_eval": after_sft,
        "improvement": {f"pass@{k}": final[f"pass@{k}"] - after_sft[f"pass@{k}"] for k in ks}})
  table = _objective_table(members, member_summaries, ks)
  summary = {
      "population": True,
      "members": member_summaries,
      "table": table,
      "rl_steps": final_step,
      "eval_num_mazes": config.eval.num_mazes,
      "eval_num_samples": config.eval.num_samples,
      "heldout_mazes": heldout,
      "training_mazes": training_mazes,
      "mesh": {name: int(size) for name, size in mesh.shape.items()},
      "wall_time_s_this_launch": time.time() - start_time,
      "config_sha256": workdir_lib.config_digest(config.to_dict()),
  }
  if sharding.is_chief():
    curves = run_logging.curves_wanted(config)
    exported = export_members(workdir, members, member_summaries, records, summary, curves=curves)
    run_logging.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    figure = plot_population(workdir, members, evals, ks) if curves else "not drawn (logging.plots=False)"
  _print_tables(config, members, member_summaries, table, ks, training_mazes)
  if sharding.is_chief():
    print(f"Per-member workdirs: {os.path.join(workdir, 'members')} ({len(exported)}); curves: {figure}",
          flush=True)
  return summary


def _objective_table(members, member_summaries, ks) -> list[dict]:
  """Rows {objective (label), seeds, pass@k: {mean, std}} over each label's seeds, in member order."""
  rows = {}
  for m, s in zip(members, member_summaries):
    rows.setdefault(m.label, []).append(s)
  table = []
  for label, group in rows.items():
    row = {"objective": label, "seeds": [s["seed"] for s in group]}
    for key in [f"pass@{k}" for k in ks] + ["fraction_solved"]:
      mean, std = population_lib.mean_std([s["eval"][key] for s in group])
      row[key] = {"mean": mean, "std": std}
    sft_mean, sft_std = population_lib.mean_std([s["sft_eval"][f"pass@{ks[0]}"] for s in group])
    row[f"sft_pass@{ks[0]}"] = {"mean": sft_mean, "std": sft_std}
    table.append(row)
  return table


def _print_tables(config, members, member_summaries, table, ks, training_mazes):
  size = config.maze.size
  rows = []
  for m, s in zip(members, member_summaries):
    cells = {f"pass@{k}": f"{s['eval'][f'pass@{k}']:.4f} ± {s['eval'].get(f'pass@{k}_se', 0.0):.4f}" for k in ks}
    rows.append({"member": m.name, f"after SFT pass@{ks[0]}": s["sft_eval"][f"pass@{ks[0]}"], **cells})
  print(run_logging.format_table(
      rows, ["member", f"after SFT pass@{ks[0]}"] + [f"pass@{k}" for k in ks],
      title=f"Held-out mazes after {config.rl.steps} RL steps, per member ({config.eval.num_mazes} mazes "
            f"{size}x{size}, never trained on; {config.eval.num_samples} samples each; ± standard error over "
            "mazes)"))
  summary_rows = [{"objective": r["objective"], "seeds": len(r["seeds"]),
                   **{f"pass@{k}": f"{r[f'pass@{k}']['mean']:.4f} ± {r[f'pass@{k}']['std']:.4f}" for k in ks}}
                  for r in table]
  distinct = [r["all"]["distinct"] for r in training_mazes.values()]
  print(run_logging.format_table(
      summary_rows, ["objective", "seeds"] + [f"pass@{k}" for k in ks],
      title=f"Per objective: mean ± std over seeds. Each seed trained on {min(distinct)}-{max(distinct)} "
            "distinct mazes, none of them held out."))


def export_members(workdir, members, member_summaries, records, summary, curves: bool = True) -> list[str]:
  """Writes each member as a single run's workdir under <workdir>/members/<label>/seed<s>/ and returns them.

  Each holds config.json (the member's single-run config), metrics.jsonl (its SFT seed's SFT records and its
  own eval and RL records, without the member fields), summary.json (the fields a single run's summary has)
  and, with `curves`, the PNG curves of maxrl_jax.plots. They are views, rewritten at the end of every launch.
  """
  paths = []
  for m, s in zip(members, member_summaries):
    path = os.path.join(workdir, "members", m.label, f"seed{m.seed}")
    os.makedirs(path, exist_ok=True)
    own = [{k: v for k, v in r.items() if k not in ("member", "objective", "seed", "sweep")} for r in records
           if r.get("member") == m.index or ("member" not in r and r.get("seed") == m.seed)]
    run_logging.MetricsWriter(path).replace_all(own)
    run_logging.write_json_atomic(os.path.join(path, "config.json"), run_logging.jsonable_record(m.config.to_dict()))
    member_summary = {
        "objective": m.config.objective.name, "objective_kwargs": s["objective_kwargs"], "eval": s["eval"],
        "sft_eval": s["sft_eval"], "rl_steps": summary["rl_steps"], "eval_num_mazes": summary["eval_num_mazes"],
        "eval_num_samples": summary["eval_num_samples"], "improvement": s["improvement"],
        "heldout_mazes": summary["heldout_mazes"], "training_mazes": summary["training_mazes"][f"seed{m.seed}"],
        "population_member": {**m.fields(), "population_workdir": os.path.abspath(workdir)},
        "config_sha256": workdir_lib.config_digest(m.config.to_dict()),
    }
    run_logging.write_json_atomic(os.path.join(path, "summary.json"), member_summary)
    if curves:
      plots.plot_run(path)
    paths.append(path)
  return paths


def plot_population(workdir, members, evals, ks) -> str:
  """population.png: held-out pass@k (first and last k) against RL step, mean ± std over each objective's seeds."""
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  steps = sorted(evals)
  labels = list(dict.fromkeys(m.label for m in members))
  shown = [ks[0], ks[-1]] if len(ks) > 1 else ks
  fig, axes = plt.subplots(1, len(shown), figsize=(5.2 * len(shown), 4), squeeze=False)
  for ax, k in zip(axes[0], shown):
    for label in labels:
      indices = [m.index for m in members if m.label == label]
      values = np.asarray([[next(r for r in evals[s] if r["member"] == i)[f"pass@{k}"] for s in steps]
                           for i in indices])
      mean = values.mean(0)
      std = values.std(0, ddof=1) if len(indices) > 1 else np.zeros_like(mean)
      (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=f"{label} ({len(indices)})")
      ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("RL step")
    ax.set_ylabel(f"held-out pass@{k}")
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=8, title="objective (seeds)", title_fontsize=8)
  fig.suptitle(f"Population of {len(members)} members; band: ± 1 std over seeds", fontsize=9)
  fig.tight_layout()
  path = os.path.join(workdir, "population.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
