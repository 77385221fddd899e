"""The trainer of token tasks: SFT -> on-policy RL -> held-out pass@k, for one run or a population.

    python -m maxrl_jax.main --config=configs/maze.py --workdir=DIR        # any config whose task is a TokenTask

Phases (each through the harness's step loop, checkpointed and resumed):

    sft        config.sft.steps supervised steps on the task's reference responses (skipped when 0, or
               when config.sft.init_from names another run whose final SFT policy RL starts from)
    eval       held-out pass@k of the policy RL starts from (RL step 0)
    rl         config.rl.steps on-policy steps: sample N rollouts per prompt -> verify -> advantages of the
               configured estimator (with Differential Smoothing, SELF, entropy bonus) -> one AdamW update
               (maxrl_jax/rl/step.py), held-out evaluations every config.eval.every_steps and at the end;
               optionally several clipped updates per step, TIS, a KL penalty to the policy RL starts from,
               LoRA adapters on it (`validate_knobs`; their frozen weights beside the state, re-derived on
               resume and checked against the fingerprint in every RL checkpoint)

A task with an on-device verifier (maze, countdown) runs the whole RL step as one jitted function; a task
verified on the host (language models) samples on the device in prompt chunks, verifies each chunk on the
host while the next one samples, and runs the same jitted update.

A config with a `population` block trains the table of its members (objectives x sweep x seeds) as one
program: their states stacked on a member axis, the same step functions vmapped (maxrl_jax/rl/population.py),
one SFT policy per seed. Each member reproduces its single run.

Keys: from config.seed, the streams init, sft_data, rl_data, rl_sampling, eval and lora (`seed_keys`); a step's
data and sampling keys are `fold_in(stream, step)`, so a resumed run draws what an uninterrupted one does.

Outputs (besides the harness's config.json, metrics.jsonl, checkpoints/, summary.json):
    single run   curves_*.png; the held-out table after SFT and after RL
    population   records carry {"member", "objective", "seed"}; summary.json has "members" and a
                 per-objective "table" (mean ± std over seeds); members/<label>/seed<s>/ is each member as a
                 single run's workdir; population.png
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxrl_jax import checkpoints
from maxrl_jax import estimators
from maxrl_jax import inflight_sampling
from maxrl_jax import plots
from maxrl_jax import run_logging
from maxrl_jax import sampling
from maxrl_jax import sharding
from maxrl_jax import workdir as workdir_lib
from maxrl_jax.models import decoder
from maxrl_jax.models import lora as lora_lib
from maxrl_jax.rl import population as population_lib
from maxrl_jax.rl import sft as sft_lib
from maxrl_jax.rl import step as step_lib
from maxrl_jax.rl import surrogates
from maxrl_jax.tasks import base as tasks_base
from maxrl_jax.trainers import harness
from maxrl_jax.trainers import sizes as sizes_lib

# The key streams of a seed, in the order they are folded from jax.random.key(seed) ("lora": the adapters' A).
STREAMS = ("init", "sft_data", "rl_data", "rl_sampling", "eval", "lora")
# Records fields of a population member.
MEMBER_RECORD_FIELDS = ("member", "objective", "seed", "sweep")


def seed_keys(seed: int) -> dict[str, jax.Array]:
  """{stream: fold_in(key(seed), index)} for the STREAMS."""
  root = jax.random.key(seed)
  return {name: jax.random.fold_in(root, i) for i, name in enumerate(STREAMS)}


# ------------------------------------------------------------------------------------------------ config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the trainer's fields (sft, rollout, rl, objective, eval); raises ValueError naming the field."""

  def fail(field, message):
    raise ValueError(f"config.{field}: {message}")

  def get(field):
    node = config
    for part in field.split("."):
      node = node[part]
    return node

  for field in ("sft.steps", "rl.steps", "sft.warmup_steps", "rl.warmup_steps"):
    value = get(field)
    if isinstance(value, bool) or int(value) != value or value < 0:
      fail(field, f"{value!r} must be an integer >= 0.")
  positive = ["rollout.num_prompts", "rollout.num_samples", "rollout.max_new_tokens", "eval.num_samples",
              "eval.every_steps"]
  if config.sft.steps and not config.sft.init_from:
    positive.append("sft.batch_size")
  for field in positive:
    value = get(field)
    if isinstance(value, bool) or int(value) != value or value < 1:
      fail(field, f"{value!r} must be an integer >= 1.")
  for field in ("rl.learning_rate", "rollout.temperature"):
    if not get(field) > 0:
      fail(field, f"{get(field)!r} must be > 0.")
  if config.sft.steps and not config.sft.learning_rate > 0:
    fail("sft.learning_rate", f"{config.sft.learning_rate!r} must be > 0.")
  if not config.eval.temperature >= 0:
    fail("eval.temperature", f"{config.eval.temperature!r} must be >= 0 (0 is greedy).")
  for k in config.eval.ks:
    if isinstance(k, bool) or int(k) != k or not 1 <= k <= config.eval.num_samples:
      fail("eval.ks", f"k={k} must be in [1, eval.num_samples={config.eval.num_samples}].")
  validate_objective(config)
  validate_knobs(config)
  if config.sft.init_from and not os.path.isdir(os.path.join(config.sft.init_from, "checkpoints", "sft")):
    fail("sft.init_from", f"{config.sft.init_from!r} holds no SFT checkpoints (expected "
         f"{os.path.join(config.sft.init_from, 'checkpoints', 'sft')}); run its SFT first or set it to ''.")


def validate_objective(config: ml_collections.ConfigDict) -> None:
  """The objective block: a registered estimator whose constraints hold at this group size N, a reduction,
  and non-negative entropy bonus and smoothing strength."""
  objective = config.objective
  kwargs = estimators.kwargs_from_config(objective)
  try:
    estimators.get_advantage_fn(objective.name, **kwargs)(jnp.zeros((1, config.rollout.num_samples), jnp.float32))
  except ValueError as e:
    raise ValueError(f"config.objective / config.rollout.num_samples: {e}") from e
  if objective.reduction not in estimators.REDUCTIONS:
    raise ValueError(f"config.objective.reduction: {objective.reduction!r}; allowed: {list(estimators.REDUCTIONS)}.")
  for field in ("entropy_coef", "smoothing_gamma"):
    if not objective[field] >= 0:
      raise ValueError(f"config.objective.{field}: {objective[field]!r} must be >= 0.")
  if not isinstance(objective.self_filter, bool):
    raise ValueError(f"config.objective.self_filter: {objective.self_filter!r} must be True or False.")


def validate_knobs(config: ml_collections.ConfigDict) -> None:
  """The options from other RL libraries: rl.ppo_mini_batches / ppo_epochs, rl.importance_ratio and its clip,
  rl.tis_cap, the KL penalty (rl.kl_coef / kl_estimator / kl_in) and LoRA (model.lora_*)."""
  rl = config.rl

  def fail(field, message):
    raise ValueError(f"config.{field}: {message}")

  for field in ("ppo_mini_batches", "ppo_epochs"):
    value = rl.get(field, 1)
    if isinstance(value, bool) or int(value) != value or value < 1:
      fail(f"rl.{field}", f"{value!r} must be an integer >= 1 (1 and 1: one update per RL step).")
  mini_batches, epochs = int(rl.get("ppo_mini_batches", 1)), int(rl.get("ppo_epochs", 1))
  num_prompts = config.rollout.num_prompts
  if num_prompts % mini_batches:
    fail("rl.ppo_mini_batches", f"{mini_batches} must divide rollout.num_prompts={num_prompts} (a mini-batch "
         "holds whole prompt groups).")
  micro = rl.get("micro_batch_prompts", 0)
  if micro and mini_batches > 1 and (num_prompts // mini_batches) % micro:
    fail("rl.micro_batch_prompts", f"{micro} must divide the {num_prompts // mini_batches} prompts of a "
         "mini-batch (rollout.num_prompts / rl.ppo_mini_batches).")
  ratio = rl.get("importance_ratio", "none")
  if ratio not in surrogates.IMPORTANCE_RATIOS:
    fail("rl.importance_ratio", f"{ratio!r}; allowed: {list(surrogates.IMPORTANCE_RATIOS)}.")
  if ratio == "none" and mini_batches * epochs > 1:
    fail("rl.importance_ratio", f"'none' (the on-policy loss) makes one update per RL step, but "
         f"rl.ppo_mini_batches x rl.ppo_epochs = {mini_batches * epochs}: set it to 'token' (PPO's clipped "
         "ratio; DAPO with rl.clip_high > rl.clip_low) or 'sequence' (GSPO).")
  if ratio != "none":
    if not 0 <= rl.get("clip_low", 0.2) < 1:
      fail("rl.clip_low", f"{rl.clip_low!r} must be in [0, 1) (the ratio's lower bound is 1 - clip_low).")
    if not rl.get("clip_high", 0.2) >= 0:
      fail("rl.clip_high", f"{rl.clip_high!r} must be >= 0 (the ratio's upper bound is 1 + clip_high).")
  if not rl.get("tis_cap", 0.0) >= 0:
    fail("rl.tis_cap", f"{rl.tis_cap!r} must be >= 0 (0: no truncated importance sampling; e.g. 2).")
  if not rl.get("kl_coef", 0.0) >= 0:
    fail("rl.kl_coef", f"{rl.kl_coef!r} must be >= 0 (0: no KL penalty).")
  try:
    surrogates.canonical_kl_estimator(rl.get("kl_estimator", "k3"))
  except ValueError as e:
    fail("rl.kl_estimator", str(e))
  if rl.get("kl_in", "loss") not in surrogates.KL_PLACES:
    fail("rl.kl_in", f"{rl.kl_in!r}; allowed: {list(surrogates.KL_PLACES)}.")
  lora_lib.validate(config.model)


def read_run_config(path: str) -> dict:
  """The config.json of a run directory (`sft.init_from`), or a ValueError naming the file."""
  config_path = os.path.join(path, "config.json")
  try:
    with open(config_path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"config.sft.init_from: cannot read {config_path} ({e}); point it at a finished run's "
                     "workdir.") from e


def rl_spec(config: ml_collections.ConfigDict, task: tasks_base.TokenTask, mesh,
            micro_batch: tuple[int | None, int | None] = (None, None),
            members: Sequence[population_lib.Member] | None = None) -> step_lib.RLSpec:
  """The static settings of a run's (or a population's, with `members`) RL step on `mesh`."""
  use_self = (any(m.config.objective.self_filter for m in members) if members
              else bool(config.objective.self_filter))
  rl = config.rl
  return step_lib.RLSpec(
      num_samples=config.rollout.num_samples, max_new_tokens=config.rollout.max_new_tokens,
      stop_tokens=tuple(task.stop_tokens), pad_id=task.pad_id, reduction=config.objective.reduction,
      micro_batch_prompts=micro_batch[0], micro_batch_rollouts=micro_batch[1],
      num_shards=sharding.num_batch_shards(mesh), use_self=use_self, grad_clip=rl.grad_clip,
      warmup_steps=int(rl.get("warmup_steps", 0)),
      lockstep_axis=population_lib.MEMBER_AXIS if members else None,
      ppo_mini_batches=int(rl.get("ppo_mini_batches", 1)), ppo_epochs=int(rl.get("ppo_epochs", 1)),
      importance_ratio=rl.get("importance_ratio", "none"), clip_low=float(rl.get("clip_low", 0.2)),
      clip_high=float(rl.get("clip_high", 0.2)), tis_cap=float(rl.get("tis_cap", 0.0)),
      kl_estimator=surrogates.canonical_kl_estimator(rl.get("kl_estimator", "k3")), kl_in=rl.get("kl_in", "loss"),
      lora=lora_lib.from_config(config.model))


def uses_kl(config: ml_collections.ConfigDict, members: Sequence[population_lib.Member] | None = None) -> bool:
  """Whether some run of the program has a KL penalty (then the step needs the reference policy)."""
  configs = [m.config for m in members] if members else [config]
  return any(c.rl.get("kl_coef", 0.0) for c in configs)


# ------------------------------------------------------------------------------------------------ programs


@dataclasses.dataclass
class Policy:
  """The policy's functions and the shardings of its parameters, of the SFT state and of the RL state."""

  model_fns: Any
  params_sharding: Any
  sft_tx: Any
  sft_like: Any  # abstract SFT TrainState (restore target)
  rl_like: Any  # abstract RL TrainState (with LoRA: of the adapters); stacked [K, ...] for a population
  params_abstract: Any = None  # the policy's parameter shapes


class RLTrainer:
  """SFT -> RL -> held-out evaluation of a `TokenTask` (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, task: tasks_base.TokenTask):
    self.config = config
    self.task = task
    self.is_population = population_lib.is_population(config)
    self.members = population_lib.members(config) if self.is_population else None

  # ---------------------------------------------------------------- harness hooks

  def validate(self) -> None:
    config = self.config
    validate_config(config)
    self.task.validate()
    if self.is_population:
      if config.sft.init_from:
        raise ValueError("config.sft.init_from: a population trains one SFT policy per seed itself; set it to ''.")
      if self.task.host_verifier and config.rollout.get("inflight_slots", 0):
        raise ValueError("config.rollout.inflight_slots: in-flight sampling runs single runs only; set it to 0 "
                         "for a population.")
      for member in self.members:
        try:
          validate_config(member.config)
        except ValueError as e:
          raise ValueError(f"population member {member.name}: {e}") from e
    if config.sft.init_from:
      check = getattr(self.task, "check_shared_sft", None)
      if check is not None:
        check(read_run_config(config.sft.init_from), config.sft.init_from)

  def make_mesh(self):
    if self.is_population:
      return population_lib.make_mesh(self.config, len(self.members))
    return sharding.make_mesh(self.config.get("mesh"))

  def batch_sizes(self) -> dict[str, int]:
    sizes = {"rollout.num_prompts": self.config.rollout.num_prompts}
    if self.config.sft.steps and not self.config.sft.init_from:
      sizes["sft.batch_size"] = self.config.sft.batch_size
    return {**sizes, **self.task.batch_sizes()}

  def final_step(self, workdir: str | None = None) -> int:
    del workdir
    return int(self.config.rl.steps)

  def sinks(self, workdir: str):
    """A population keeps one TensorBoard run per member; a single run the default sinks."""
    if not self.is_population:
      return None
    if not sharding.is_chief():
      return []
    out = []
    for sink in run_logging.sinks_from_config(self.config, workdir):
      if isinstance(sink, run_logging.TensorBoardSink):
        out.append(TensorBoardPerMember(sink.logdir, {m.index: m.name for m in self.members}))
      else:
        out.append(sink)
    return out

  # ---------------------------------------------------------------- set-up

  def _policy(self, run: harness.Run) -> Policy:
    config, mesh = self.config, run.mesh
    rules = sharding.MeshConfig.from_config(config.get("mesh")).param_rules
    model_config = self.task.model_config()
    model_fns = decoder.DecoderFns(model_config)
    params_abstract = jax.eval_shape(model_fns.init, jax.random.key(0))
    # (A population's SFT runs each seed with a single run's shardings, over the member-axis mesh.)
    params_sharding = sharding.tree_shardings({"params": params_abstract}, mesh, rules)["params"]
    sft_tx = sft_lib.optimizer(config.sft)
    state_shardings = lambda abstract: sharding.tree_shardings(abstract, mesh, rules)
    sft_like = harness.abstract_state(lambda p: step_lib.init_state(p, sft_tx), params_abstract,
                                      shardings=state_shardings)
    if self.is_population:
      self.program = PopulationProgram(config, self.members, self.task, model_fns, mesh, rules, self.spec)
      rl_like = self.program.rl_abstract
    else:
      rl_tx = step_lib.rl_optimizer(step_lib.hyper_from_config(config), self.spec)
      trainable = params_abstract
      if self.spec.lora is not None:  # The RL state holds the adapters only.
        trainable = jax.eval_shape(lambda k: lora_lib.init_adapters(k, params_abstract, self.spec.lora,
                                                                    model_config.param_dtype), jax.random.key(0))
      rl_like = harness.abstract_state(lambda p: step_lib.init_state(p, rl_tx), trainable,
                                       shardings=state_shardings)
    return Policy(model_fns, params_sharding, sft_tx, sft_like, rl_like, params_abstract)

  def _spec(self, mesh, micro_batch=(None, None)) -> step_lib.RLSpec:
    return rl_spec(self.config, self.task, mesh, micro_batch, self.members)

  def _plan_memory(self, mesh, model_config) -> sizes_lib.Sizes:
    return sizes_lib.plan(self.config, self.task, model_config, mesh,
                          members_per_group=(len(self.members) // mesh.shape[population_lib.MEMBER_AXIS]
                                             if self.is_population else 1),
                          reference=uses_kl(self.config, self.members))

  # ---------------------------------------------------------------- training

  def prepare(self, workdir: str) -> None:
    self.task.prepare(workdir)

  def close(self) -> None:
    self.task.close()

  def train(self, run: harness.Run) -> None:
    config, task, mesh = self.config, self.task, run.mesh
    self.sizes = self._plan_memory(mesh, task.model_config())
    sharding.check_batch_sizes(mesh, self.sizes.batch_fields())
    self.spec = self._spec(mesh, self.sizes.micro_batch)
    if self.is_population and sharding.is_chief():
      print(f"population: {population_lib.describe(self.members, mesh)}", flush=True)
    policy = self.policy = self._policy(run)
    seeds = population_lib.distinct_seeds(self.members) if self.is_population else [config.seed]
    self.keys = {s: seed_keys(s) for s in seeds}
    sft_phases = [] if not config.sft.steps or config.sft.init_from else [
        (self._sft_checkpoint(s), policy.sft_like) for s in seeds]
    resumed = run.resume(sft_phases + [("rl", policy.rl_like)])
    self.frozen, frozen_extra = None, None
    if resumed is not None and resumed.phase == "rl":
      rl_start, rl_state, pending = resumed.step, resumed.state, resumed.pending
      if self._needs_frozen():  # Re-derived from their source, then checked against the checkpoint's record.
        self._set_frozen([self._start_params(run, s) for s in seeds])
        frozen_extra = self._frozen_record()
        self._check_frozen(resumed, frozen_extra)
    else:
      params = [self._sft(run, s, resumed) for s in seeds]
      rl_state = self._init_rl(params)
      rl_start, pending = 0, []
      if self._needs_frozen():
        self._set_frozen(params)
        frozen_extra = self._frozen_record()
      del params
    if self.task.host_verifier:
      runner = HostRunner(self, run)
    else:
      runner = DeviceRunner(self, run)
    evals = run.records.evals()
    if 0 not in evals:
      for record in runner.evaluate(rl_state, 0):
        run.records.write({**record, "step": 0})
    objective = f"{len(self.members)} members" if self.is_population else config.objective.name
    run.run_phase(
        "rl", rl_state, runner.step, start=rl_start, end=config.rl.steps, desc=f"RL ({objective})",
        pending=pending, evaluate=runner.evaluate, eval_every=config.eval.every_steps, evals=evals,
        throughput={"tokens_per_s": "generated_tokens"}, members=self._member_fields(),
        annotate=lambda record, step: record.update(task.record_fields(step)), diagnose=self._diagnose,
        checkpoint_extra=frozen_extra)

  def _diagnose(self, metrics) -> str | None:
    """Why an RL step's loss may be NaN: groups with rewards the objective refuses (its advantages are NaN)."""
    refused = int(np.asarray(metrics.get("_refused_groups", 0)))
    if not refused:
      return None
    objective = self.config.objective
    requirement = estimators.reward_requirement(objective.name, **estimators.kwargs_from_config(objective))
    return (f"{refused} prompt group(s) of that step had rewards the objective refuses, so their advantages "
            f"are NaN: {requirement} Check the task's verifier, or choose an objective for such rewards.")

  def _member_fields(self):
    return [m.fields() for m in self.members] if self.is_population else None

  def _sft_checkpoint(self, seed: int) -> str:
    return f"sft_seed{seed}" if self.is_population else "sft"

  def _sft(self, run: harness.Run, seed: int, resumed: harness.Resumed | None):
    """The final SFT parameters of `seed` (trained, resumed, restored, or the initial ones without SFT)."""
    config, task, policy = self.config, self.task, self.policy
    keys = self.keys[seed]
    if config.sft.init_from:  # RL starts from another run's final SFT policy (shared by an ablation's runs).
      return run.restore_final("sft", policy.sft_like, workdir=config.sft.init_from).params
    if not config.sft.steps:
      return task.init_params(keys["init"], policy.params_sharding)
    phase = self._sft_checkpoint(seed)
    phases = [self._sft_checkpoint(s) for s in self.keys]
    if resumed is not None and phases.index(resumed.phase) > phases.index(phase):
      return run.restore_final(phase, policy.sft_like).params  # An earlier seed, finished.
    if resumed is not None and resumed.phase == phase:
      start, state, pending = resumed.step, resumed.state, resumed.pending
    else:
      state_sharding = harness.shardings_of(policy.sft_like)
      params = task.init_params(keys["init"], policy.params_sharding)
      state = jax.jit(lambda p: step_lib.init_state(p, policy.sft_tx), out_shardings=state_sharding)(params)
      start, pending = 0, []
    batch_sharding = sharding.batch_sharding(run.mesh)
    sft_step = sft_lib.make_sft_step(policy.model_fns, policy.sft_tx,
                                     state_sharding=harness.shardings_of(policy.sft_like),
                                     batch_sharding=batch_sharding)
    sft_batch = jax.jit(task.sft_batch, out_shardings=batch_sharding) if not task.host_verifier else (
        lambda key, step: jax.tree_util.tree_map(lambda x: sharding.shard_global_array(x, batch_sharding),
                                                 task.sft_batch(key, step)))
    data_key = keys["sft_data"]
    annotate = (lambda record, step: record.update(seed=seed)) if self.is_population else None
    state = run.run_phase(
        "sft", state, lambda s, step: sft_step(s, sft_batch(data_key, step)), start=start, end=config.sft.steps,
        checkpoint=phase, desc="SFT" + (f" (seed {seed})" if self.is_population else ""), pending=pending,
        annotate=annotate)
    return state.params

  def _init_rl(self, params: list):
    if self.is_population:
      stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *params)
      lora_keys = self.program.member_keys(self.keys, "lora") if self.spec.lora is not None else None
      return self.program.init_rl(stacked, lora_keys)
    rl_tx = step_lib.rl_optimizer(step_lib.hyper_from_config(self.config), self.spec)
    out_shardings = harness.shardings_of(self.policy.rl_like)
    if self.spec.lora is not None:  # Fresh adapters (B = 0: the policy RL starts from is the base itself).
      key, lora_config = self.keys[self.config.seed]["lora"], self.spec.lora
      like, dtype = self.policy.params_abstract, self.task.model_config().param_dtype
      return jax.jit(lambda k: step_lib.init_state(lora_lib.init_adapters(k, like, lora_config, dtype), rl_tx),
                     out_shardings=out_shardings)(key)
    return jax.jit(lambda p: step_lib.init_state(p, rl_tx), out_shardings=out_shardings)(params[0])

  # ---------------------------------------------------------------- frozen weights (LoRA base, KL reference)

  def _needs_frozen(self) -> bool:
    return self.spec.lora is not None or uses_kl(self.config, self.members)

  def _start_params(self, run: harness.Run, seed: int):
    """The parameters RL started from for `seed`, re-derived on resume: the final SFT checkpoint (this run's
    or sft.init_from's), or the task's initial parameters (the init key; a text task's checkpoint)."""
    config, policy = self.config, self.policy
    if config.sft.init_from:
      return run.restore_final("sft", policy.sft_like, workdir=config.sft.init_from).params
    if not config.sft.steps:
      return self.task.init_params(self.keys[seed]["init"], policy.params_sharding)
    return run.restore_final(self._sft_checkpoint(seed), policy.sft_like).params

  def _frozen_source(self) -> str:
    config = self.config
    if config.sft.init_from:
      return f"the final SFT policy of config.sft.init_from={config.sft.init_from!r}"
    if config.sft.steps:
      return "the final SFT checkpoint of this run (checkpoints/" + (
          "sft_seed<s>" if self.is_population else "sft") + ")"
    path = config.model.get("path", "")
    return f"the task's initial parameters ({'model.path=' + repr(path) if path else 'the init key of config.seed'})"

  def _set_frozen(self, params: list) -> None:
    """The frozen weights of RL from the parameters it starts from (one per seed): LoRA's base (in
    model.lora_base_dtype) or the KL reference (those parameters themselves)."""
    lora_config = self.spec.lora
    if lora_config is not None:
      cast = jax.jit(lambda p: lora_lib.cast_base(p, lora_config), out_shardings=self.policy.params_sharding)
      frozen = [step_lib.Frozen(base=cast(p)) for p in params]
    else:
      frozen = [step_lib.Frozen(reference=p) for p in params]
    if self.is_population:
      self.frozen = self.program.set_frozen(frozen)
    else:
      self.frozen = frozen[0]
    self._policy_params = None

  def _frozen_record(self) -> dict:
    return {"frozen_fingerprint": checkpoints.tree_fingerprint(self.frozen), "frozen_source": self._frozen_source()}

  def _check_frozen(self, resumed: harness.Resumed, record: dict) -> None:
    saved = resumed.extra.get("frozen_fingerprint")
    if saved is not None and saved != record["frozen_fingerprint"]:
      raise checkpoints.CheckpointError(
          f"The RL checkpoint of step {resumed.step} was trained against frozen weights (LoRA's base or the KL "
          f"reference) from {resumed.extra.get('frozen_source', record['frozen_source'])}, fingerprint "
          f"{saved[:12]}...; re-deriving them now gives {record['frozen_fingerprint'][:12]}... from "
          f"{record['frozen_source']}: that source changed since. Restore it, or start over in a new --workdir.")

  def policy_params(self, state):
    """The parameters the sampler and the evaluation use: state.params, or with LoRA the merged weights."""
    if self.spec.lora is None:
      return state.params
    if self.is_population:
      return self.program.policy_params(state.params)
    if getattr(self, "_policy_params", None) is None:
      spec, fns = self.spec, self.policy.model_fns
      self._policy_params = jax.jit(lambda a, f: step_lib.sampling_policy(spec, fns, a, f)[1],
                                    out_shardings=self.policy.params_sharding)
    return self._policy_params(state.params, self.frozen)

  # ---------------------------------------------------------------- results

  def _seed_runs(self) -> list[dict]:
    """What each seed trained on, for the task's summary (keys of its SFT and RL data draws)."""
    config = self.config
    runs = []
    for seed, keys in self.keys.items():
      if config.sft.init_from:
        source = read_run_config(config.sft.init_from)
        sft = (seed_keys(source["seed"])["sft_data"], source["sft"]["steps"], source["sft"]["batch_size"])
      else:
        sft = (keys["sft_data"], config.sft.steps, config.sft.batch_size)
      runs.append({"seed": seed, "sft": sft, "rl": (keys["rl_data"], config.rl.steps)})
    return runs

  def summary(self, run: harness.Run) -> dict:
    config = self.config
    ks = list(config.eval.ks)
    evals = run.records.evals()
    final_step = config.rl.steps
    task_fields = self.task.summary_fields(self._seed_runs(), per_seed=self.is_population)
    if not self.is_population:
      final = harness.metric_fields(evals[final_step][0])
      initial = harness.metric_fields(evals[0][0])
      return {
          "objective": config.objective.name,
          "objective_kwargs": estimators.kwargs_from_config(config.objective),
          "eval": final,
          "initial_eval": initial,
          "rl_steps": final_step,
          "improvement": {f"pass@{k}": final[f"pass@{k}"] - initial[f"pass@{k}"] for k in ks if f"pass@{k}" in final},
          **task_fields,
      }
    by_member = {m.index: {} for m in self.members}
    for step, records in evals.items():
      for r in records:
        by_member[r["member"]][step] = r
    member_summaries = []
    for m in self.members:
      final = harness.metric_fields(by_member[m.index][final_step], MEMBER_RECORD_FIELDS)
      initial = harness.metric_fields(by_member[m.index][0], MEMBER_RECORD_FIELDS)
      member_summaries.append({
          **m.fields(), "name": m.name, "overrides": m.overrides, "objective_name": m.config.objective.name,
          "objective_kwargs": estimators.kwargs_from_config(m.config.objective), "eval": final,
          "initial_eval": initial,
          "improvement": {f"pass@{k}": final[f"pass@{k}"] - initial[f"pass@{k}"] for k in ks}})
    return {
        "population": True,
        "members": member_summaries,
        "table": objective_table(self.members, member_summaries, ks),
        "rl_steps": final_step,
        "mesh": {name: int(size) for name, size in run.mesh.shape.items()},
        **task_fields,
    }

  def report(self, run: harness.Run, summary: dict) -> None:
    config = self.config
    ks = list(config.eval.ks)
    if self.is_population:
      curves = run_logging.curves_wanted(config)
      exported = export_members(run.workdir, self.members, summary, run.records.records, self.task, curves=curves)
      figure = (plot_population(run.workdir, self.members, run.records.evals(), ks) if curves
                else "not drawn (logging.plots=False)")
      print_population_tables(config, self.task, summary, ks)
      print(f"Per-member workdirs: {os.path.join(run.workdir, 'members')} ({len(exported)}); curves: {figure}",
            flush=True)
      return
    initial, final = summary["initial_eval"], summary["eval"]
    columns = [c for c in [f"pass@{k}" for k in ks] if c in final]
    extra = [c for c in final if c.startswith("maj@")] + ["fraction_solved"]

    def cells(result):
      out = {c: (f"{result[c]:.4f} ± {result[c + '_se']:.4f}" if f"{c}_se" in result else result[c])
             for c in columns}
      return {**out, **{c: result[c] for c in extra if c in result}}

    start = "after SFT" if config.sft.steps or config.sft.init_from else "initial"
    rows = [{"policy": start, **cells(initial)},
            {"policy": f"after RL ({config.objective.name}, {config.rl.steps} steps)", **cells(final)}]
    title = self.task.table_title() + "." + self.task.table_note(summary)
    print(run_logging.format_table(rows, ["policy"] + columns + extra, title=title))
    harness.plot_curves(run.workdir, config)


# ------------------------------------------------------------------------------------------------ device tasks


class DeviceRunner:
  """The RL step and evaluation of a task whose verifier runs on the device (one or many runs)."""

  def __init__(self, trainer: RLTrainer, run: harness.Run):
    self.trainer, self.config, self.task = trainer, trainer.config, trainer.task
    config, task, policy, mesh = self.config, self.task, trainer.policy, run.mesh
    self.temperature = jnp.float32(config.rollout.temperature)
    self.eval_temperature = jnp.float32(config.eval.temperature)
    batch_sharding = sharding.batch_sharding(mesh)
    if trainer.is_population:
      program = trainer.program
      self.step_fn = program.make_device_step()
      self.counts_fn = program.make_device_eval()
      self._eval_keys = program.member_keys(trainer.keys, "eval")
      self._data_keys = program.member_keys(trainer.keys, "rl_data")
      self._sampling_keys = program.member_keys(trainer.keys, "rl_sampling")
      return
    keys = trainer.keys[config.seed]
    self._keys = keys
    hyper = step_lib.hyper_from_config(config)
    rl_sharding = harness.shardings_of(policy.rl_like)
    self.rl_step = step_lib.make_rl_step(
        trainer.spec, policy.model_fns, hyper, prompt_fn=task.prompts, verifier=task.verify,
        advantage_fn=step_lib.single_advantage_fn(config.objective), state_sharding=rl_sharding,
        batch_sharding=batch_sharding, frozen=trainer.frozen)
    self.rl_batch = jax.jit(task.rl_batch, out_shardings=batch_sharding)
    self.counts_fn = step_lib.make_eval_counts(
        trainer.spec, policy.model_fns, num_samples=config.eval.num_samples, prompt_fn=task.prompts,
        verifier=task.verify, batch_sharding=batch_sharding,
        params_sharding=rl_sharding.params if trainer.spec.lora is None else policy.params_sharding)

  def step(self, state, step: int):
    if self.trainer.is_population:
      return self.step_fn(state, self._data_keys, self._sampling_keys, jnp.int32(step), self.temperature)
    batch = self.rl_batch(self._keys["rl_data"], step)
    return self.rl_step(state, batch, jax.random.fold_in(self._keys["rl_sampling"], step), self.temperature)

  def evaluate(self, state, step: int) -> list[dict]:
    del step
    params = self.trainer.policy_params(state)
    task, num_samples = self.task, self.config.eval.num_samples
    if self.trainer.is_population:
      counts = [self.counts_fn(params, batch, self._eval_keys, jnp.int32(offset), self.eval_temperature)
                for offset, batch in task.heldout_batches()]  # Dispatched back to back, fetched once.
      counts = np.asarray(jnp.concatenate(counts, axis=1))  # [K, M]
      return [{"phase": "eval", **m.fields(), **task.heldout_metrics(counts[m.index], num_samples)}
              for m in self.trainer.members]
    key = self._keys["eval"]
    counts = [self.counts_fn(params, batch, jax.random.fold_in(key, offset), self.eval_temperature)
              for offset, batch in task.heldout_batches()]
    return [{"phase": "eval", **task.heldout_metrics(jnp.concatenate(counts), num_samples)}]


class PopulationProgram:
  """The stacked RL state and the jitted, vmapped step functions of a population (trainer and benchmarks).

  Attributes:
    hyper: per-member values {Hyper field: [K]} (with "objective", the member's advantage branch) on the
      member axis. shared: {Hyper field: Python value} of the hyperparameters every member shares.
    rl_abstract: the stacked RL TrainState's shapes and shardings.
  """

  def __init__(self, config, members, task, model_fns, mesh, param_rules, spec: step_lib.RLSpec):
    self.config, self.members, self.task, self.model_fns, self.mesh = config, members, task, model_fns, mesh
    self.spec = spec
    self.member_values = population_lib.stacked_sharding(mesh, len(members))
    self.shared, varying = population_lib.member_hyperparameters(members)
    branches, branch_index = population_lib.advantage_branches(members)
    self.advantage = population_lib.make_advantage_fn(branches)
    self.hyper = jax.device_put({"objective": jnp.asarray(branch_index), **{k: jnp.asarray(v) for k, v in
                                                                             varying.items()}}, self.member_values)
    seeds = population_lib.distinct_seeds(members)
    self.seed_index = np.asarray([seeds.index(m.seed) for m in members], np.int32)
    params_like = jax.eval_shape(model_fns.init, jax.random.key(0))
    stacked = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((len(seeds),) + x.shape, x.dtype), params_like)
    self.params_like = params_like
    lora_keys = None if spec.lora is None else jnp.stack([jax.random.key(0)] * len(members))
    rl_like = jax.eval_shape(self._init_rl, stacked, self.hyper, lora_keys)
    self.rl_sharding = population_lib.stacked_shardings(rl_like, mesh, param_rules)
    self.param_rules = param_rules
    self.frozen_member = self.frozen_shared = None  # set_frozen
    # The members' policies as the sampler takes them [K, ...] (with LoRA: merged weights, not the state's).
    self.policy_sharding = self.rl_sharding.params if spec.lora is None else population_lib.stacked_shardings(
        jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct((len(members),) + x.shape, x.dtype), params_like),
        mesh, param_rules)
    self.rl_abstract = jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                              rl_like, self.rl_sharding)
    groups = mesh.shape[population_lib.MEMBER_AXIS]
    self.groups = groups
    self.per_group = len(members) // groups
    self.chunk = population_lib.vmap_chunk(config, self.per_group, mesh.devices.flat[0].platform)

  def member_hyper(self, hp) -> step_lib.Hyper:
    return population_lib.member_hyper(self.shared, hp)

  def member_keys(self, keys: dict, stream: str) -> jax.Array:
    """[K] keys of a stream, each member's from its seed, on the member axis."""
    return jax.device_put(jnp.stack([keys[m.seed][stream] for m in self.members]), self.member_values)

  def _init_rl(self, sft_params, hp, lora_keys=None):
    spec = self.spec
    optimizer = lambda h: step_lib.rl_optimizer(self.member_hyper(h), spec)
    if spec.lora is not None:  # Each member's adapters from its seed's "lora" key, as its single run's.
      dtype = self.model_fns.config.param_dtype
      return jax.vmap(lambda k, h: step_lib.init_state(
          lora_lib.init_adapters(k, self.params_like, spec.lora, dtype), optimizer(h)))(lora_keys, hp)
    params = jax.tree_util.tree_map(lambda x: x[self.seed_index], sft_params)  # Each member's seed's policy.
    return jax.vmap(lambda p, h: step_lib.init_state(p, optimizer(h)))(params, hp)

  def init_rl(self, sft_params, lora_keys=None):
    """The stacked RL state from the SFT parameters stacked over distinct seeds [S, ...] (with LoRA: fresh
    adapters from the members' keys [K], `member_keys(keys, "lora")`)."""
    return jax.jit(self._init_rl, out_shardings=self.rl_sharding)(sft_params, self.hyper, lora_keys)

  def set_frozen(self, per_seed: Sequence[step_lib.Frozen]) -> Any:
    """Places the frozen weights (one `step_lib.Frozen` per distinct seed): shared by every member (not
    batched) with one seed, else one copy per member [K, ...] on the member axis. Returns what was placed."""
    if len(per_seed) == 1:
      self.frozen_shared, self.frozen_member = per_seed[0], None
      return self.frozen_shared
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs)[self.seed_index], *per_seed)
    shardings = population_lib.stacked_shardings(stacked, self.mesh, self.param_rules)
    self.frozen_shared, self.frozen_member = None, jax.device_put(stacked, shardings)
    return self.frozen_member

  def _frozen_of(self, member_part, shared_part):
    return shared_part if member_part is None else member_part

  def policy_params(self, adapters):
    """[K] policies the sampler and the evaluation use (with LoRA: each member's merged weights)."""
    spec, fns = self.spec, self.model_fns
    if not hasattr(self, "_merge"):
      merge = lambda a, f: step_lib.sampling_policy(spec, fns, a, f)[1]
      self._merge = jax.jit(lambda a, fm, fs: jax.vmap(merge, in_axes=(0, 0 if fm is not None else None))(
          a, self._frozen_of(fm, fs)), out_shardings=self.policy_sharding)
    return self._merge(adapters, self.frozen_member, self.frozen_shared)

  def _vmapped(self, member_fn, num_member_args: int):
    """member_fn vmapped over members (the first `num_member_args` arguments), in chunks of `self.chunk`
    members per device group (lax.map over the chunks) when the group holds more."""
    in_axes = (0,) * num_member_args
    vmapped = lambda *args: jax.vmap(member_fn, in_axes=in_axes + (None,) * (len(args) - num_member_args),
                                     axis_name=population_lib.MEMBER_AXIS)(*args)
    groups, per_group, chunk = self.groups, self.per_group, self.chunk

    def fn(*args):
      if chunk == per_group:
        return vmapped(*args)
      # Members k = g * per_group + i * chunk + j: i looped (lax.map), (g, j) vmapped.
      loops = per_group // chunk
      split = lambda x: jnp.swapaxes(x.reshape((groups, loops, chunk) + x.shape[1:]), 0, 1).reshape(
          (loops, groups * chunk) + x.shape[1:])
      merge = lambda x: jnp.swapaxes(x.reshape((loops, groups, chunk) + x.shape[2:]), 0, 1).reshape(
          (groups * loops * chunk,) + x.shape[2:])
      member_args = jax.tree_util.tree_map(split, args[:num_member_args])
      rest = args[num_member_args:]
      outputs = jax.lax.map(lambda xs: vmapped(*xs, *rest), member_args)
      return jax.tree_util.tree_map(merge, outputs)

    return fn

  def make_device_step(self):
    """Jitted `step(state, data_keys [K], sampling_keys [K], step, temperature)` (state donated).

    Member k draws its batch with `task.rl_batch(data_keys[k], step)` and samples with
    `fold_in(sampling_keys[k], step)`, exactly as its single run does.
    """
    task, spec, model_fns = self.task, self.spec, self.model_fns
    rep = sharding.replicated(self.mesh)

    def member_step(state, data_key, sampling_key, hp, frozen_member, step, temperature, frozen_shared):
      return step_lib.rl_step(spec, model_fns, state, task.rl_batch(data_key, step),
                              jax.random.fold_in(sampling_key, step), temperature, self.member_hyper(hp),
                              prompt_fn=task.prompts, verifier=task.verify, advantage_fn=self.advantage,
                              frozen=self._frozen_of(frozen_member, frozen_shared))

    fn = self._vmapped(member_step, 5)
    values = self.member_values
    frozen_member, frozen_shared = self.frozen_member, self.frozen_shared
    jitted = jax.jit(fn, donate_argnums=0,
                     in_shardings=(self.rl_sharding, values, values, values, _shardings(frozen_member), rep, rep,
                                   _shardings(frozen_shared)),
                     out_shardings=(self.rl_sharding, rep))
    return lambda state, data_keys, sampling_keys, step, temperature: jitted(
        state, data_keys, sampling_keys, self.hyper, frozen_member, step, temperature, frozen_shared)

  def make_device_eval(self):
    """Jitted `counts(params [K], batch, eval_keys [K], offset, temperature) -> [K, P]` correct counts."""
    task, spec, model_fns = self.task, self.spec, self.model_fns
    num_samples = self.config.eval.num_samples
    rep = sharding.replicated(self.mesh)
    batch_sharding = sharding.batch_sharding(self.mesh)

    def counts(params, batch, member_keys, offset, temperature):
      return jax.vmap(
          lambda p, k: step_lib.eval_counts(spec, model_fns, p, batch, jax.random.fold_in(k, offset), temperature,
                                            num_samples=num_samples, prompt_fn=task.prompts,
                                            verifier=task.verify),
          axis_name=population_lib.MEMBER_AXIS)(params, member_keys)

    return jax.jit(counts, in_shardings=(self.policy_sharding, batch_sharding, self.member_values, rep, rep),
                   out_shardings=rep)

  # -------------------------------------------------------------- host-verified tasks

  def make_host_sample(self, greedy: bool = False):
    """Jitted `sample(params [K], prompts [K, P, L], keys [K], temperature) -> Rollouts [K, P, N, M]`."""
    spec, model_fns = self.spec, self.model_fns

    member_spec = dataclasses.replace(spec, num_samples=1) if greedy else spec

    def member_sample(params, prompts, key, temperature):
      temperature = jnp.float32(0.0) if greedy else temperature
      return step_lib.sample(member_spec, model_fns, params, prompts, key, temperature, greedy=False).rollouts

    return jax.jit(self._vmapped(member_sample, 3))

  def make_host_update(self):
    """Jitted `update(state [K], prompts, rollouts, rewards, greedy_correct | None, temperature)`."""
    spec, model_fns = self.spec, self.model_fns

    def member_update(state, prompts, rollouts, rewards, greedy_correct, hp, frozen_member, temperature,
                      frozen_shared):
      hyper = self.member_hyper(hp)
      zero = step_lib.self_zero_prompts(hyper, greedy_correct)
      new_state, metrics = step_lib.update(spec, model_fns, state, prompts, rollouts, rewards, temperature, hyper,
                                           advantage_fn=self.advantage, zero_prompts=zero,
                                           frozen=self._frozen_of(frozen_member, frozen_shared))
      if zero is not None:
        metrics["greedy_solved_fraction"] = jnp.mean(zero.astype(jnp.float32))
      return new_state, metrics

    fn = self._vmapped(member_update, 7)
    jitted = jax.jit(fn, donate_argnums=0)
    frozen_member, frozen_shared = self.frozen_member, self.frozen_shared
    return lambda state, prompts, rollouts, rewards, greedy_correct, temperature: jitted(
        state, prompts, rollouts, rewards, greedy_correct, self.hyper, frozen_member, temperature, frozen_shared)


def _shardings(tree):
  """The shardings of a tree of device arrays (None for None)."""
  return None if tree is None else jax.tree_util.tree_map(lambda x: x.sharding, tree)


# ------------------------------------------------------------------------------------------------ host tasks


def _pipelined(calls: Iterable[Callable[[], Any]], consume: Callable[[Any], None]) -> None:
  """Dispatches call i+1 (asynchronously, on the device) before consuming result i on the host."""
  pending = None
  for call in calls:
    result = call()
    if pending is not None:
      consume(pending)
    pending = result
  if pending is not None:
    consume(pending)


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def _concat(parts: Sequence[sampling.Rollouts], axis: int) -> sampling.Rollouts:
  if len(parts) == 1:
    return parts[0]
  cat = lambda name: jnp.concatenate([getattr(p, name) for p in parts], axis=axis)
  return sampling.Rollouts(tokens=cat("tokens"), logprobs=cat("logprobs"), mask=cat("mask"), lengths=cat("lengths"),
                           stopped=cat("stopped"), num_steps=jnp.max(jnp.stack([p.num_steps for p in parts]), axis=0))


def _pad_to(prompts: sampling.PaddedPrompts, width: int, pad_id: int) -> sampling.PaddedPrompts:
  """Left-pads host prompts [P, L] to [P, width] (the members of a population share one width)."""
  tokens = np.asarray(prompts.tokens)
  if tokens.shape[1] == width:
    return prompts
  pad = np.full((tokens.shape[0], width - tokens.shape[1]), pad_id, tokens.dtype)
  return sampling.PaddedPrompts(tokens=np.concatenate([pad, tokens], axis=1), lengths=prompts.lengths)


def _truncate(rollouts: sampling.Rollouts, length: int) -> sampling.Rollouts:
  """Keeps the first `length` slots (all tokens of every rollout must fit)."""
  return rollouts.replace(tokens=rollouts.tokens[..., :length], logprobs=rollouts.logprobs[..., :length],
                          mask=rollouts.mask[..., :length])


class HostRunner:
  """The RL step and evaluation of a task verified on the host (one run, or a population).

  A step: the task's batch and prompts (host) -> sampling in prompt chunks of `rollout.prompt_chunk`, chunk c
  keyed `fold_in(fold_in(sampling_key, step), c)`, each chunk verified on the host while the next samples
  -> with SELF, the greedy decodes, verified the same way -> the rollouts cut to the longest response
  (rounded up to rollout.length_bucket) -> the jitted update.
  """

  def __init__(self, trainer: RLTrainer, run: harness.Run):
    self.trainer, self.config, self.task = trainer, trainer.config, trainer.task
    config, policy, mesh = self.config, trainer.policy, run.mesh
    self.mesh = mesh
    self.temperature = jnp.float32(config.rollout.temperature)
    self.chunk = trainer.sizes.prompt_chunk
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.inflight_slots = int(config.rollout.get("inflight_slots", 0) or 0)
    self._samplers = {}
    if trainer.is_population:
      program = trainer.program
      self.sample_fn = program.make_host_sample()
      self.greedy_fn = program.make_host_sample(greedy=True) if trainer.spec.use_self else None
      self.update_fn = program.make_host_update()
      return
    hyper = step_lib.hyper_from_config(config)
    rl_sharding = harness.shardings_of(policy.rl_like)
    self.params_sharding = rl_sharding.params if trainer.spec.lora is None else policy.params_sharding
    self.update_fn = step_lib.make_update(
        trainer.spec, policy.model_fns, hyper, advantage_fn=step_lib.single_advantage_fn(config.objective),
        state_sharding=rl_sharding, batch_sharding=self.batch_sharding, frozen=trainer.frozen)

  # -------------------------------------------------------------- sampling

  def sample(self, params, prompts: sampling.PaddedPrompts, key, *, num_samples: int, max_new_tokens: int,
             temperature, top_p: float | None = None, prompt_ids=None) -> sampling.Rollouts:
    """Dispatches (asynchronously) one sampling call of a single run on host prompts; device Rollouts.

    In-flight sampling (rollout.inflight_slots) draws rollout n of prompt p with
    fold_in(fold_in(key, prompt_ids[p]), n); static sampling uses `key` for the whole call.
    """
    top_p = None if top_p in (None, 1.0) else float(top_p)
    model_fns = self.trainer.policy.model_fns
    placed = self.place(prompts)
    if self.inflight_slots:
      return inflight_sampling.sample_rollouts_inflight(
          model_fns, params, placed, key, num_rollouts=num_samples, max_new_tokens=max_new_tokens,
          num_slots=self.inflight_slots, temperature=temperature, stop_tokens=self.trainer.spec.stop_tokens,
          top_p=top_p, pad_id=self.task.pad_id,
          prompt_ids=None if prompt_ids is None else jnp.asarray(prompt_ids, jnp.int32))
    options = (num_samples, max_new_tokens, top_p)
    if options not in self._samplers:
      self._samplers[options] = sharding.make_sharded_sampler(
          model_fns, self.mesh, self.params_sharding, num_rollouts=num_samples, max_new_tokens=max_new_tokens,
          stop_tokens=self.trainer.spec.stop_tokens, top_p=top_p, pad_id=self.task.pad_id)
    return self._samplers[options](params, placed, key, jnp.asarray(temperature, jnp.float32))

  def place(self, prompts):
    return jax.tree_util.tree_map(lambda x: sharding.shard_global_array(x, self.batch_sharding), prompts)

  def _rows(self, tree, start, stop, axis=0):
    return jax.tree_util.tree_map(lambda x: x[(slice(None),) * axis + (slice(start, stop),)], tree)

  def verify(self, batch, rollouts, rows: slice, member: int | None = None):
    """Host rewards [c, N] and statistics of one chunk's rollouts (a member's, in a population)."""
    tokens, lengths, stopped = sharding.gather_to_host((rollouts.tokens, rollouts.lengths, rollouts.stopped))
    if member is not None:
      tokens, lengths, stopped = tokens[member], lengths[member], stopped[member]
    return self.task.verify_host(self.task.batch_rows(batch, rows), tokens, lengths, stopped)

  # -------------------------------------------------------------- the step

  def step(self, state, step: int):
    config, task, trainer = self.config, self.task, self.trainer
    start = time.time()
    members = trainer.members if trainer.is_population else [None]
    keys = [trainer.keys[m.seed if m is not None else config.seed] for m in members]
    batches = [task.rl_batch(k["rl_data"], step) for k in keys]
    prompts = [task.prompts(b) for b in batches]
    width = max(p.tokens.shape[1] for p in prompts)
    prompts = [_pad_to(p, width, task.pad_id) for p in prompts]
    step_keys = [jax.random.fold_in(k["rl_sampling"], step) for k in keys]
    num_prompts, chunk = config.rollout.num_prompts, self.chunk
    rewards = [[] for _ in members]
    stats = []
    parts = []
    params = trainer.policy_params(state)

    def dispatch(c, greedy):
      rows = slice(c * chunk, (c + 1) * chunk)
      if trainer.is_population:
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[self._rows(p, rows.start, rows.stop)
                                                                      for p in prompts])
        chunk_keys = jnp.stack([jax.random.fold_in(k, c) for k in step_keys])
        fn = self.greedy_fn if greedy else self.sample_fn
        return c, rows, fn(params, stacked, chunk_keys, self.temperature)
      prompt_ids = np.arange(rows.start, rows.stop)
      key = step_keys[0] if self.inflight_slots and not greedy else jax.random.fold_in(step_keys[0], c)
      out = self.sample(params, self._rows(prompts[0], rows.start, rows.stop), key,
                        num_samples=1 if greedy else config.rollout.num_samples,
                        max_new_tokens=config.rollout.max_new_tokens,
                        temperature=jnp.float32(0.0) if greedy else self.temperature, prompt_ids=prompt_ids)
      return c, rows, out

    def consume(item, into, keep):
      c, rows, out = item
      if keep:
        parts.append(out)
      for i, m in enumerate(members):
        r, s = self.verify(batches[i], out, rows, None if m is None else i)
        into[i].append(r)
        stats.append(s)

    num_chunks = num_prompts // chunk
    _pipelined((functools.partial(dispatch, c, False) for c in range(num_chunks)),
               lambda item: consume(item, rewards, True))
    greedy_correct = None
    if trainer.spec.use_self:
      greedy = [[] for _ in members]
      _pipelined((functools.partial(dispatch, c, True) for c in range(num_chunks)),
                 lambda item: consume(item, greedy, False))
      greedy_correct = np.stack([np.concatenate(g)[:, 0] for g in greedy])  # [K, P]
    axis = 1 if trainer.is_population else 0
    rollouts = _concat(parts, axis)
    longest = int(np.max(np.asarray(rollouts.lengths)))
    bucket = int(config.rollout.get("length_bucket", 1) or 1)
    rollouts = _truncate(rollouts, min(config.rollout.max_new_tokens, _round_up(max(longest, 1), bucket)))
    reward_arrays = np.stack([np.concatenate(r) for r in rewards])  # [K, P, N]
    sample_seconds = time.time() - start
    if trainer.is_population:
      stacked_prompts = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *prompts)
      state, metrics = self.update_fn(state, stacked_prompts, rollouts, jnp.asarray(reward_arrays),
                                      None if greedy_correct is None else jnp.asarray(greedy_correct),
                                      self.temperature)
    else:
      zero = None if greedy_correct is None else sharding.shard_global_array(greedy_correct[0], self.batch_sharding)
      state, metrics = self.update_fn(state, self.place(prompts[0]), rollouts,
                                      sharding.shard_global_array(reward_arrays[0], self.batch_sharding), zero,
                                      self.temperature)
    host = {key: sum(float(s[key]) for s in stats) for key in (stats[0] if stats else {}) if key != "zeroed_at_cap"}
    host["sample_verify_s"] = sample_seconds
    if stats and "zeroed_at_cap" in stats[0]:
      host["zeroed_at_cap"] = float(np.mean([s["zeroed_at_cap"] for s in stats]))
    if trainer.is_population:
      num = len(members)
      host = {k: np.full((num,), v, np.float32) for k, v in host.items()}
    return state, {**metrics, **host}

  # -------------------------------------------------------------- evaluation

  def evaluate(self, state, step: int) -> list[dict]:
    params = self.trainer.policy_params(state)
    trainer, task = self.trainer, self.task
    final = step in (0, self.config.rl.steps)
    if not trainer.is_population:
      key = trainer.keys[self.config.seed]["eval"]
      return [{"phase": "eval", **task.evaluate_host(self.sample, params, key, final=final)}]
    records = []
    single = SingleMemberSampler(self, trainer)
    for m in trainer.members:
      member_params = jax.tree_util.tree_map(lambda x: x[m.index], params)
      key = trainer.keys[m.seed]["eval"]
      records.append({"phase": "eval", **m.fields(),
                      **task.evaluate_host(single.sample, member_params, key, final=final)})
    return records


class SingleMemberSampler:
  """Sampling calls of one population member's parameters (held-out evaluation, one member at a time)."""

  def __init__(self, runner: HostRunner, trainer: RLTrainer):
    self.runner, self.trainer = runner, trainer
    self._samplers = {}

  def sample(self, params, prompts, key, *, num_samples, max_new_tokens, temperature, top_p=None, prompt_ids=None):
    del prompt_ids
    top_p = None if top_p in (None, 1.0) else float(top_p)
    options = (num_samples, max_new_tokens, top_p)
    if options not in self._samplers:
      fns = self.trainer.policy.model_fns
      self._samplers[options] = jax.jit(functools.partial(
          sampling.sample_rollouts, fns, num_rollouts=num_samples, max_new_tokens=max_new_tokens,
          stop_tokens=self.trainer.spec.stop_tokens, top_p=top_p, pad_id=self.trainer.task.pad_id))
    return self._samplers[options](params, prompts, key, temperature=jnp.asarray(temperature, jnp.float32))


# ------------------------------------------------------------------------------------------------ population outputs


class TensorBoardPerMember:
  """A metrics sink that keeps one TensorBoard run per member (<logdir>/<objective>/seed<s>) and one per SFT seed."""

  def __init__(self, logdir: str, names: dict[int, str]):
    self.logdir, self.names, self.sinks = logdir, names, {}

  def _sink(self, record):
    name = self.names[record["member"]] if "member" in record else f"sft/seed{record.get('seed', 0)}"
    if name not in self.sinks:
      self.sinks[name] = run_logging.TensorBoardSink(os.path.join(self.logdir, name))
    return self.sinks[name]

  def write(self, record):
    self._sink(record).write({k: v for k, v in record.items() if k not in ("member", "seed")})

  def reset(self, records):
    groups = {}
    for record in records:
      groups.setdefault(id(self._sink(record)), []).append(record)
    for sink in self.sinks.values():
      sink.reset(groups.get(id(sink), []))

  def close(self):
    for sink in self.sinks.values():
      sink.close()


def objective_table(members, member_summaries, ks) -> list[dict]:
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
    initial_mean, initial_std = population_lib.mean_std([s["initial_eval"][f"pass@{ks[0]}"] for s in group])
    row[f"initial_pass@{ks[0]}"] = {"mean": initial_mean, "std": initial_std}
    table.append(row)
  return table


def print_population_tables(config, task, summary, ks):
  rows = []
  for s in summary["members"]:
    cells = {f"pass@{k}": (f"{s['eval'][f'pass@{k}']:.4f} ± {s['eval'][f'pass@{k}_se']:.4f}"
                           if f"pass@{k}_se" in s["eval"] else s["eval"][f"pass@{k}"]) for k in ks}
    rows.append({"member": s["name"], f"initial pass@{ks[0]}": s["initial_eval"][f"pass@{ks[0]}"], **cells})
  print(run_logging.format_table(
      rows, ["member", f"initial pass@{ks[0]}"] + [f"pass@{k}" for k in ks],
      title=f"{task.table_title()}, after {config.rl.steps} RL steps, per member"))
  summary_rows = [{"objective": r["objective"], "seeds": len(r["seeds"]),
                   **{f"pass@{k}": f"{r[f'pass@{k}']['mean']:.4f} ± {r[f'pass@{k}']['std']:.4f}" for k in ks}}
                  for r in summary["table"]]
  print(run_logging.format_table(summary_rows, ["objective", "seeds"] + [f"pass@{k}" for k in ks],
                                 title="Per objective: mean ± std over seeds."))


def export_members(workdir, members, summary, records, task, curves: bool = True) -> list[str]:
  """Writes each member as a single run's workdir under <workdir>/members/<label>/seed<s>/ and returns them.

  Each holds config.json (the member's single-run config), metrics.jsonl (its seed's SFT records and its own
  eval and RL records, without the member fields), summary.json (the fields a single run's summary has) and,
  with `curves`, the PNG curves of maxrl_jax.plots. They are views, rewritten at the end of every launch.
  """
  paths = []
  per_seed = tuple(task.seed_fields)
  task_fields = {k: v for k, v in summary.items() if k not in ("population", "members", "table", "mesh") + per_seed}
  for m, s in zip(members, summary["members"]):
    path = os.path.join(workdir, "members", m.label, f"seed{m.seed}")
    os.makedirs(path, exist_ok=True)
    own = [{k: v for k, v in r.items() if k not in MEMBER_RECORD_FIELDS} for r in records
           if r.get("member") == m.index or ("member" not in r and r.get("seed") == m.seed)]
    run_logging.MetricsWriter(path).replace_all(own)
    run_logging.write_json_atomic(os.path.join(path, "config.json"), run_logging.jsonable_record(m.config.to_dict()))
    member_summary = {
        **task_fields, "objective": m.config.objective.name, "objective_kwargs": s["objective_kwargs"],
        "eval": s["eval"], "initial_eval": s["initial_eval"], "improvement": s["improvement"],
        "population_member": {**m.fields(), "population_workdir": os.path.abspath(workdir)},
        "config_sha256": workdir_lib.config_digest(m.config.to_dict()),
    }
    for key in per_seed:  # The task's per-seed fields, as its single run has them.
      if key in summary:
        member_summary[key] = summary[key][f"seed{m.seed}"]
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


def expected_work(config: ml_collections.ConfigDict, task: tasks_base.TokenTask) -> dict[str, str]:
  """What a run does, without training (`main --dry_run`): SFT, RL rollouts and tokens, evaluations."""
  count = lambda n: f"{int(n):,}"
  work = dict(task.expected_work())
  if config.sft.init_from:
    work["SFT"] = f"none: RL starts from the SFT policy of {config.sft.init_from}"
  elif config.sft.steps:
    examples = int(config.sft.steps) * int(config.sft.batch_size)
    work["SFT steps"] = count(config.sft.steps)
    work["SFT examples (steps x batch)"] = count(examples)
    length = getattr(task, "sft_sequence_length", lambda: None)()
    if length:
      work["SFT tokens (examples x sequence length)"] = f"{count(examples * length)} ({length} per example)"
  rl_steps, prompts, samples = int(config.rl.steps), int(config.rollout.num_prompts), int(config.rollout.num_samples)
  rollouts = rl_steps * prompts * samples
  work["RL steps"] = count(rl_steps)
  work["RL rollouts (steps x prompts x N)"] = f"{count(rollouts)} ({rl_steps} x {prompts} x {samples})"
  work["RL generated tokens, at most (rollouts x max_new_tokens)"] = count(rollouts * int(config.rollout.max_new_tokens))
  mini_batches, epochs = int(config.rl.get("ppo_mini_batches", 1)), int(config.rl.get("ppo_epochs", 1))
  if mini_batches * epochs > 1:
    work["RL optimizer updates (steps x mini-batches x epochs)"] = (
        f"{count(rl_steps * mini_batches * epochs)} ({rl_steps} x {mini_batches} x {epochs})")
  options = [name for name, on in (
      (f"{config.rl.get('importance_ratio', 'none')} ratio clipped to [1 - {config.rl.get('clip_low', 0.2)}, "
       f"1 + {config.rl.get('clip_high', 0.2)}]", config.rl.get("importance_ratio", "none") != "none"),
      (f"TIS cap {config.rl.get('tis_cap', 0.0)}", config.rl.get("tis_cap", 0.0)),
      (f"KL {config.rl.get('kl_estimator', 'k3')} x {config.rl.get('kl_coef', 0.0)} in the "
       f"{config.rl.get('kl_in', 'loss')} (one reference pass per step)", config.rl.get("kl_coef", 0.0)),
      (f"LoRA rank {config.model.get('lora_rank', 0)} on {', '.join(config.model.get('lora_targets', ()))}",
       config.model.get("lora_rank", 0))) if on]
  if options:
    work["RL options"] = "; ".join(options)
  every = int(config.eval.every_steps)
  evals = len({0, rl_steps} | (set(range(every, rl_steps + 1, every)) if every else set()))
  work["evaluations"] = f"{evals} (before RL, every {every} RL steps and at the end)"
  if population_lib.is_population(config):
    members = population_lib.members(config)
    seeds = population_lib.distinct_seeds(members)
    work["population"] = (f"{len(members)} members, one jitted program: "
                          + ", ".join(m.name for m in members[:6]) + (", ..." if len(members) > 6 else ""))
    work["population work"] = (f"SFT above once per seed ({len(seeds)}); RL rollouts, tokens and evaluations "
                               f"above for each of the {len(members)} members")
  return work


def load_sft_params(config: ml_collections.ConfigDict, workdir: str, phase: str = "sft"):
  """(model functions, parameters) of the latest SFT checkpoint of a run in `workdir` (for analyses).

  `phase` names the checkpoint folder: "sft" for a single run, "sft_seed<s>" for seed s of a population.
  The policy's architecture comes from `config` (its task's model_config()).
  """
  from maxrl_jax import checkpoints  # pylint: disable=import-outside-toplevel

  model_fns = decoder.DecoderFns(tasks_base.make_task(config).model_config())
  tx = sft_lib.optimizer(config.sft)
  like = jax.eval_shape(lambda: step_lib.init_state(model_fns.init(jax.random.key(0)), tx))
  source = checkpoints.PhaseCheckpointer(workdir, phase)
  try:
    found = source.restore_latest(like)
  finally:
    source.close()
  if found is None:
    raise ValueError(f"{workdir} holds no {phase!r} checkpoint; run its SFT phase first.")
  return model_fns, found[1].params


def export_merged_policy(config: ml_collections.ConfigDict, workdir: str, path: str, *,
                         architecture: str | None = None) -> str:
  """Writes the newest RL policy of a single run in `workdir` as a Hugging Face checkpoint at `path`.

  With LoRA (config.model.lora_rank > 0) the adapters of the RL checkpoint are merged into the base they were
  trained on (W + (alpha / r) A B, `models/lora.merge`), which is re-derived as the trainer does (the final SFT
  checkpoint, sft.init_from's, or the task's initial parameters) and checked against the checkpoint's
  fingerprint. Tensors are written in model.param_dtype through `hf_loading.save_pretrained`; the text task's
  tokenizer and chat-template files are copied beside them. `architecture`: "llama" | "qwen2" | "qwen3"
  (default: the text task's checkpoint's; "qwen2" otherwise). Returns `path`.
  """
  import shutil  # pylint: disable=import-outside-toplevel

  from maxrl_jax.models import hf_loading  # pylint: disable=import-outside-toplevel

  task = tasks_base.make_task(config)
  task.prepare(workdir)
  try:
    model_config = task.model_config()
    fns = decoder.DecoderFns(model_config)
    spec = step_lib.RLSpec(num_samples=1, max_new_tokens=1, stop_tokens=(), lora=lora_lib.from_config(config.model))
    params_like = jax.eval_shape(fns.init, jax.random.key(0))
    trainable = params_like if spec.lora is None else jax.eval_shape(
        lambda k: lora_lib.init_adapters(k, params_like, spec.lora, model_config.param_dtype), jax.random.key(0))
    tx = step_lib.rl_optimizer(step_lib.hyper_from_config(config), spec)
    like = jax.eval_shape(lambda p: step_lib.init_state(p, tx), trainable)
    found = _restore_latest(workdir, "rl", like)
    if found is None:
      raise ValueError(f"{workdir} holds no RL checkpoint to export; train it first.")
    _, state, extra = found
    params = state.params
    if spec.lora is not None:
      if config.sft.init_from or config.sft.steps:
        source = config.sft.init_from or workdir
        sft_like = jax.eval_shape(lambda p: step_lib.init_state(p, sft_lib.optimizer(config.sft)), params_like)
        start = _restore_latest(source, "sft", sft_like)[1].params
      else:
        start = task.init_params(seed_keys(config.seed)["init"], None)
      base = lora_lib.cast_base(start, spec.lora)
      saved = extra.get("frozen_fingerprint")
      if saved is not None and saved != checkpoints.tree_fingerprint(step_lib.Frozen(base=base)):
        raise checkpoints.CheckpointError(f"The base re-derived for {workdir} is not the one its adapters were "
                                          f"trained on ({extra.get('frozen_source')} changed since).")
      params = lora_lib.merge(base, params, spec.lora)
    params = jax.tree_util.tree_map(lambda x: x.astype(model_config.param_dtype), params)
    model_path = getattr(task, "model_path", "")
    if architecture is None:
      architecture = (hf_loading.architecture_of(hf_loading.read_hf_config(model_path)) if model_path else "qwen2")
    hf_loading.save_pretrained(path, model_config, params, architecture=architecture)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
      if model_path and os.path.exists(os.path.join(model_path, name)):
        shutil.copy(os.path.join(model_path, name), os.path.join(path, name))
  finally:
    task.close()
  return path


def _restore_latest(workdir: str, phase: str, like):
  source = checkpoints.PhaseCheckpointer(workdir, phase)
  try:
    return source.restore_latest(like)
  finally:
    source.close()


def make_trainer(config: ml_collections.ConfigDict, task: tasks_base.TokenTask) -> RLTrainer:
  return RLTrainer(config, task)
