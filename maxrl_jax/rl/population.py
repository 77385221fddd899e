"""Population training: a whole table of runs (objectives x hyperparameters x seeds) as one program.

A config's `population` block (any token task: maze, text, countdown) names the members:

    population.objectives = ("maxrl", "grpo", "grpo_entropy: objective.name=grpo, objective.entropy_coef=0.01")
    population.sweep = ("lr1e-4: rl.learning_rate=1e-4", "lr3e-4: rl.learning_rate=3e-4")   # optional
    population.seeds = (0, 1, 2)

and a run trains their cross product (here 3 x 2 x 3 = 18 members). Each member reproduces the single run
of its config: `member.config` is the run's config with the member's overrides and seed, and training it
alone (`python -m maxrl_jax.main --config=configs/maze.py --config.objective.name=grpo --config.seed=1`)
gives the same SFT policy, the same RL batches and sampling keys and, up to float round-off, the same
rollouts, losses and held-out results.

How one program trains them all:

- Parameters, optimizer states, PRNG keys and the per-member hyperparameters are stacked on a leading
  member axis [K, ...]; the RL step (maxrl_jax/rl/step.py) is vmapped over it and jitted once (for a
  task verified on the host: sampling and the update are, with the verifier between them).
- The objective is chosen inside the program: the distinct (estimator, options) pairs of the population are
  the branches of a `lax.switch` on the member's branch index (under vmap every branch's advantages are
  computed and the member's selected: they are [P, N] elementwise rules, negligible next to sampling).
- Hyperparameters shared by every member stay Python constants (the single run's exact arithmetic); those
  that differ (learning rate, Adam betas, weight decay, entropy bonus, smoothing strength, SELF, the KL
  coefficient) are per-member arrays. SELF's greedy decode runs only when some member uses it.
- SFT runs once per distinct seed, with the single run's own jitted step; a member starts RL from its
  seed's SFT policy.

Devices: the member axis is a mesh axis ("member") in front of the usual (data, fsdp) axes. With K members
on D devices the default puts gcd(K, D) member groups side by side, each member whole on its devices when
that uses every device, and the data / fsdp axes split a member's batch and parameters over the remaining
devices otherwise (e.g. 2 members on 8 devices: member=2 x data=4). `population.member_devices` fixes the
member axis instead.

Only fields that keep every array shape equal may differ between members (`MEMBER_FIELDS`); the model,
P, N, response cap, task and evaluation are shared. A table whose members differ in N (the
rollout-scaling study) is one population per N.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxrl_jax import config_fields
from maxrl_jax import estimators
from maxrl_jax import sharding
from maxrl_jax.rl import step as step_lib

MEMBER_AXIS = "member"

# Config fields a member may set (the array shapes stay the same as the base config's).
MEMBER_FIELDS = (
    "objective.name", "objective.order", "objective.k", "objective.zero_failed_groups", "objective.pkpo_form",
    "objective.cap_order_at_n", "objective.smoothing_std", "objective.reward_type", "objective.entropy_coef",
    "objective.smoothing_gamma", "objective.self_filter",
    "rl.learning_rate", "rl.b1", "rl.b2", "rl.weight_decay", "rl.kl_coef",
)
# Of those, the ones that become per-member arrays in the RL step when members differ in them.
TRACED_FIELDS = tuple(step_lib.HYPER_FIELDS)


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of the population.

  Attributes:
    index: position on the member axis.
    objective: the label of its `population.objectives` entry (e.g. "grpo_entropy").
    sweep: the label of its `population.sweep` entry ("" without a sweep).
    seed: its config.seed.
    overrides: {dotted field: value} it sets on the base config (objective and sweep entries).
    config: the single-run config it reproduces (no population block, its overrides and seed applied).
  """

  index: int
  objective: str
  sweep: str
  seed: int
  overrides: dict
  config: ml_collections.ConfigDict

  @property
  def label(self) -> str:
    """What the member trains, without the seed: "grpo", or "grpo/lr3e-4" with a sweep."""
    return f"{self.objective}/{self.sweep}" if self.sweep else self.objective

  @property
  def name(self) -> str:
    """Unique within the population: "<label>/seed<s>" (also its TensorBoard run and exported folder)."""
    return f"{self.label}/seed{self.seed}"

  def fields(self) -> dict:
    """The fields every record of this member carries."""
    out = {"member": self.index, "objective": self.objective, "seed": self.seed}
    if self.sweep:
      out["sweep"] = self.sweep
    return out


def is_population(config: ml_collections.ConfigDict) -> bool:
  """True when the config asks for a population (any of objectives, sweep, seeds set)."""
  block = config.get("population")
  return bool(block) and any(len(block.get(f, ()) or ()) for f in ("objectives", "sweep", "seeds"))


def _parse_value(text: str) -> Any:
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def parse_entry(entry: str, where: str) -> tuple[str, dict]:
  """"label: field=value, field=value" (or a bare label) -> (label, {field: value}).

  Raises a ValueError naming `where` (e.g. "config.population.objectives[2]") on a malformed entry or a field
  a member may not set.
  """
  if not isinstance(entry, str) or not entry.strip():
    raise ValueError(f"{where}: {entry!r} is not a non-empty string such as \"grpo\" or "
                     "\"grpo_entropy: objective.name=grpo, objective.entropy_coef=0.01\".")
  label, _, rest = entry.partition(":")
  label = label.strip()
  overrides = {}
  if not rest.strip() and "=" in label:  # A bare "field=value[, ...]": the text is its own label.
    label, rest = entry.strip().replace(" ", ""), entry
  for part in filter(None, (p.strip() for p in rest.split(","))):
    field, eq, value = part.partition("=")
    field = field.strip()
    if not eq or not field:
      raise ValueError(f"{where}: {part!r} in {entry!r} is not field=value.")
    if field not in MEMBER_FIELDS:
      raise ValueError(f"{where}: {field!r} cannot differ between members (shapes must stay equal); "
                       f"members may set {list(MEMBER_FIELDS)}. Run other settings as separate populations.")
    overrides[field] = _parse_value(value.strip())
  if not label or any(c in label for c in " \t\n"):
    raise ValueError(f"{where}: the label of {entry!r} must be a non-empty word (it names the member's "
                     "records, folder and TensorBoard run).")
  return label, overrides


def members(config: ml_collections.ConfigDict) -> list[Member]:
  """The members of a population config (objectives x sweep x seeds, in that nesting order).

  An objectives entry without `objective.name` must be a registered estimator's name, which it then sets.
  Labels must be distinct within objectives and within sweep, seeds distinct.
  """
  block = config.population
  objectives = tuple(block.objectives) or (config.objective.name,)
  sweep = tuple(block.sweep) or ("",)
  seeds = tuple(block.seeds) or (config.seed,)
  if len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
    raise ValueError(f"config.population.seeds={seeds!r}: use distinct integers.")
  parsed_objectives = []
  for i, entry in enumerate(objectives):
    label, overrides = parse_entry(entry, f"config.population.objectives[{i}]")
    if "objective.name" not in overrides:
      if label not in estimators.ADVANTAGE_ESTIMATORS:
        raise ValueError(f"config.population.objectives[{i}]: {entry!r} is neither an estimator "
                         f"({sorted(estimators.ADVANTAGE_ESTIMATORS)}) nor \"label: objective.name=..., ...\".")
      overrides = {"objective.name": label, **overrides}
    parsed_objectives.append((label, overrides))
  parsed_sweep = []
  for i, entry in enumerate(sweep):
    if entry == "":
      parsed_sweep.append(("", {}))
      continue
    parsed_sweep.append(parse_entry(entry, f"config.population.sweep[{i}]"))
  for what, parsed in (("objectives", parsed_objectives), ("sweep", parsed_sweep)):
    labels = [label for label, _ in parsed]
    if len(set(labels)) != len(labels):
      raise ValueError(f"config.population.{what}: labels {labels} repeat; give each entry its own label.")

  base = ml_collections.ConfigDict(config.to_dict())
  base.population.objectives = ()
  base.population.sweep = ()
  base.population.seeds = ()
  out = []
  for (objective, o_over), (sweep_label, s_over), seed in itertools.product(parsed_objectives, parsed_sweep,
                                                                            seeds):
    member_config = ml_collections.ConfigDict(base.to_dict())
    overrides = {**o_over, **s_over}
    where = f"population member {objective}{'/' + sweep_label if sweep_label else ''}/seed{seed}"
    config_fields.set_fields(member_config, overrides, where)
    member_config.seed = seed
    out.append(Member(len(out), objective, sweep_label, seed, overrides, member_config))
  return out


def distinct_seeds(population: Sequence[Member]) -> list[int]:
  """The seeds in first-appearance order (one SFT policy each)."""
  return list(dict.fromkeys(m.seed for m in population))


# ------------------------------------------------------------------------------------------------ hyperparameters


def _value(config: ml_collections.ConfigDict, field: str) -> Any:
  group, name = field.split(".")
  hyper_name = step_lib.HYPER_FIELDS.get(field)
  default = step_lib.Hyper.__dataclass_fields__[hyper_name].default if hyper_name else None
  return config[group].get(name, default)


def advantage_branches(population: Sequence[Member]) -> tuple[list[tuple[str, dict]], np.ndarray]:
  """([(estimator name, kwargs)] of the distinct objectives, branch index [K] int32 of each member)."""
  branches, index = [], []
  for m in population:
    key = (m.config.objective.name, estimators.kwargs_from_config(m.config.objective))
    if key not in branches:
      branches.append(key)
    index.append(branches.index(key))
  return branches, np.asarray(index, np.int32)


def member_hyperparameters(population: Sequence[Member]) -> tuple[dict, dict]:
  """(shared, varying) Hyper fields: {name: Python value} equal for every member, {name: [K] array} of the
  others (step.HYPER_FIELDS names them)."""
  shared, varying = {}, {}
  for field in TRACED_FIELDS:
    name = step_lib.HYPER_FIELDS[field]
    values = [_value(m.config, field) for m in population]
    if all(v == values[0] for v in values):
      shared[name] = values[0]
    else:
      dtype = np.bool_ if isinstance(values[0], bool) else np.float32
      varying[name] = np.asarray(values, dtype)
  return shared, varying


def member_hyper(shared: dict, varying: dict) -> step_lib.Hyper:
  """A member's Hyper inside the vmapped step: shared Python values and its elements of the varying arrays
  (including "objective", its advantage branch)."""
  return step_lib.Hyper(**shared, **varying)


def make_advantage_fn(branches: Sequence[tuple[str, dict]]) -> step_lib.AdvantageFn:
  """(rewards [P, N], hyper) -> advantages [P, N] by the member's estimator (lax.switch on hyper.objective)."""
  fns = [estimators.get_advantage_fn(name, **kwargs) for name, kwargs in branches]
  if len(fns) == 1:
    return lambda rewards, hyper: fns[0](rewards)
  return lambda rewards, hyper: jax.lax.switch(hyper.objective, fns, rewards)


# ------------------------------------------------------------------------------------------------ devices


def make_mesh(config: ml_collections.ConfigDict, num_members: int,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ("member", *config.mesh.axes) mesh for `num_members` members (see the module doc for the layout)."""
  devices = list(jax.devices() if devices is None else devices)
  mesh_config = sharding.MeshConfig.from_config(config.get("mesh"))
  requested = int(config.population.get("member_devices", -1))
  fixed_inner = math.prod(s for s in mesh_config.shape if s != -1)
  if requested == -1:
    if len(devices) % fixed_inner:
      raise ValueError(f"config.mesh.shape={mesh_config.shape} needs a multiple of {fixed_inner} devices; "
                       f"{len(devices)} are available.")
    member_size = math.gcd(num_members, len(devices) // fixed_inner) if -1 in mesh_config.shape else 1
  else:
    member_size = requested
  if member_size < 1 or len(devices) % member_size or num_members % member_size:
    raise ValueError(f"config.population.member_devices={requested}: the member axis ({member_size}) must "
                     f"divide both the {num_members} members and the {len(devices)} devices; use -1 (auto) or "
                     "a common divisor.")
  inner = sharding.resolve_mesh_shape(mesh_config, len(devices) // member_size)
  shape = (member_size,) + tuple(inner)
  axes = (MEMBER_AXIS,) + tuple(mesh_config.axes)
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, axes, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), axes, axis_types=axis_types)


def _member_axis(mesh: Mesh, size: int) -> str | None:
  """The member axis name when it divides `size` stacked entries, else None (replicated)."""
  return MEMBER_AXIS if size % mesh.shape[MEMBER_AXIS] == 0 else None


def stacked_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
  """Shardings of a stacked tree [S, ...]: S over the member axis (when it divides), the rest by `rules`."""

  def one(path, leaf):
    inner = sharding.partition_spec(sharding.path_string(path), tuple(leaf.shape[1:]), mesh, rules)
    return NamedSharding(mesh, PartitionSpec(_member_axis(mesh, leaf.shape[0]), *inner))

  return jax.tree_util.tree_map_with_path(one, tree)


def stacked_batch_sharding(mesh: Mesh, size: int) -> NamedSharding:
  """[S, B, ...]: S over the member axis, each member's batch B over data x fsdp."""
  return NamedSharding(mesh, PartitionSpec(_member_axis(mesh, size), sharding.batch_axes(mesh)))


def stacked_sharding(mesh: Mesh, size: int) -> NamedSharding:
  """[S, ...] per-member values (keys, hyperparameters): S over the member axis, the rest whole."""
  return NamedSharding(mesh, PartitionSpec(_member_axis(mesh, size)))


def vmap_chunk(config: ml_collections.ConfigDict, per_group: int, platform: str) -> int:
  """Members of a device group computed together (vmapped) in the RL step; the group loops over chunks.

  `population.vmap_chunk`: 0 = all of the group's members at once; -1 (auto) = all on accelerators, one at
  a time on the CPU, where batching members only multiplies the working set (the update's activations) while
  the cores are already busy with one member; n = n at a time (must divide the group's members).
  """
  requested = int(config.population.get("vmap_chunk", -1))
  if requested == -1:
    return per_group if platform != "cpu" else 1
  if requested == 0:
    return per_group
  if requested < 0 or per_group % requested:
    raise ValueError(f"config.population.vmap_chunk={requested} must divide the {per_group} members of each "
                     "device group; use -1 (auto), 0 (all) or a divisor.")
  return requested


def describe(population: Sequence[Member], mesh: Mesh) -> str:
  per_device = len(population) // mesh.shape[MEMBER_AXIS]
  return (f"{len(population)} members ({len({m.label for m in population})} settings x "
          f"{len(distinct_seeds(population))} seeds) on {sharding.describe(mesh)}: {per_device} per member "
          f"group, each split over {sharding.num_batch_shards(mesh)} device(s)")


def take(tree: Any, index: int) -> Any:
  """Member `index` of a stacked tree (on the host)."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[index]), tree)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0
