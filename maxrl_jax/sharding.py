"""Device meshes, parameter partitioning and multi-host setup: data parallelism plus FSDP, on any backend.

Nothing here is GPU- or TPU-specific: a mesh is built from `jax.devices()` and a config block, parameters and
optimizer state are created already sharded, batches are split over prompts, and every jitted step names its
input and output shardings. The same config runs on one CPU, 8 GPUs or a multi-host TPU pod slice.

The config block (`cfg.mesh`, see configs/maze.py):

    cfg.mesh.axes = ("data", "fsdp")    # mesh axis names, a subset of MESH_AXES
    cfg.mesh.shape = (-1, 1)            # devices per axis; one -1 = all remaining devices
    cfg.mesh.param_rules = ((".*", "fsdp"),)   # (regex on the leaf path, placement); first match wins
    cfg.mesh.distributed = False        # True: jax.distributed.initialize before anything else
    cfg.mesh.coordinator_address = ""   # "" = $JAX_COORDINATOR_ADDRESS, else auto-detect (TPU pods, SLURM)
    cfg.mesh.num_processes = -1         # -1 = $JAX_NUM_PROCESSES, else auto-detect
    cfg.mesh.process_id = -1            # -1 = $JAX_PROCESS_ID, else auto-detect

Layout:

- Batches (prompts, SFT sequences, rollouts `[P, N, M]`) are split on their leading axis over every mesh
  axis: `PartitionSpec(("data", "fsdp"))`. Each device holds P / (data * fsdp) prompts with all their
  rollouts, so the sampler's per-prompt KV cache never crosses devices.
- Parameters and optimizer state (Adam's mu / nu mirror the parameter paths) follow `param_rules`. A rule
  maps a regex, searched in the leaf's path ("params/layers_0/mlp/up_proj/kernel",
  "opt_state/1/0/mu/layers_0/mlp/up_proj/kernel"), to a placement:
    "fsdp"       split the largest dimension that the fsdp axis size divides over "fsdp" (ZeRO-3 style;
                 replicated when no dimension divides, or when the mesh has no fsdp axis or it has size 1);
    "replicate"  a full copy on every device;
    a tuple      an explicit PartitionSpec, one entry (axis name, tuple of names, or None) per dimension.
  Scalars (the step, Adam's count) are always replicated. Leaves no rule matches are replicated.
- Keys, temperatures and metrics are replicated.

Multi-host: every host runs the same command; `initialize_distributed` connects them (from the config or
the environment); `make_mesh` then spans all hosts' devices. Data needs no per-host loading code: batches
are produced by jitted functions whose `out_shardings` is the batch sharding, so each host computes only
the prompts its devices hold. Host-side arrays that every host holds in full go through
`shard_global_array`; arrays each host holds its slice of go through `shard_host_local_array`. Orbax
checkpoints of sharded arrays are written once (each host writes its own shards, process 0 the metadata)
and restored straight into the target shardings.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxrl_jax import sampling

PyTree = Any

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
MESH_AXES = (DATA_AXIS, FSDP_AXIS)  # Batches are split over both; parameters over "fsdp".
DEFAULT_PARAM_RULES = ((".*", "fsdp"),)


# ------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The parsed `cfg.mesh` block (see the module docstring for every field)."""

  axes: tuple[str, ...] = MESH_AXES
  shape: tuple[int, ...] = (-1, 1)
  param_rules: tuple[tuple[str, Any], ...] = DEFAULT_PARAM_RULES
  distributed: bool = False
  coordinator_address: str = ""
  num_processes: int = -1
  process_id: int = -1

  @classmethod
  def from_config(cls, config: Any | None) -> "MeshConfig":
    """From an `ml_collections.ConfigDict`, a mapping, a MeshConfig or None (the defaults).

    Raises a ValueError naming the field on unknown keys, unknown axis names, a shape of the wrong length
    or with more than one -1, and malformed rules.
    """
    if config is None:
      return cls()
    if isinstance(config, MeshConfig):
      return config
    values = dict(config.to_dict()) if hasattr(config, "to_dict") else dict(config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"config.mesh: unknown keys {unknown}; known keys are {sorted(names)}.")
    out = cls(**values)
    axes, shape = tuple(out.axes), tuple(int(s) for s in out.shape)
    if not axes or len(set(axes)) != len(axes) or not set(axes) <= set(MESH_AXES):
      raise ValueError(f"config.mesh.axes={axes!r}: use distinct names from {MESH_AXES}.")
    if len(shape) != len(axes):
      raise ValueError(f"config.mesh.shape={shape!r} needs one entry per axis of config.mesh.axes={axes!r}.")
    if any(s == 0 or s < -1 for s in shape) or shape.count(-1) > 1:
      raise ValueError(f"config.mesh.shape={shape!r}: entries must be >= 1, with at most one -1 "
                       "(all remaining devices).")
    rules = tuple((str(regex), _canonical_placement(placement)) for regex, placement in out.param_rules)
    for regex, _ in rules:
      try:
        re.compile(regex)
      except re.error as e:
        raise ValueError(f"config.mesh.param_rules: bad regex {regex!r}: {e}") from e
    return dataclasses.replace(out, axes=axes, shape=shape, param_rules=rules,
                               distributed=bool(out.distributed))


def _canonical_placement(placement: Any) -> Any:
  if isinstance(placement, str):
    if placement not in ("fsdp", "replicate"):
      raise ValueError(f"config.mesh.param_rules: placement {placement!r}; allowed: 'fsdp', 'replicate' or "
                       "a tuple (one axis name, tuple of names or None per dimension).")
    return placement
  if isinstance(placement, (list, tuple)):
    return tuple(tuple(p) if isinstance(p, (list, tuple)) else p for p in placement)
  raise ValueError(f"config.mesh.param_rules: placement {placement!r} is not a string or a tuple.")


def resolve_mesh_shape(mesh_config: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """The mesh shape with -1 filled in; a ValueError when it does not use exactly `num_devices` devices."""
  shape = mesh_config.shape
  fixed = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh.shape={shape} (axes {mesh_config.axes}): the fixed axes use {fixed} devices, which "
          f"does not divide the {num_devices} devices available; pick sizes whose product divides "
          f"{num_devices}.")
    shape = tuple(num_devices // fixed if s == -1 else s for s in shape)
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh.shape={shape} (axes {mesh_config.axes}) uses {fixed} devices but {num_devices} are "
        "available; the product must equal the device count (or use -1 for one axis).")
  return shape


# ------------------------------------------------------------------------------------------------ multi-host


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "")
  return int(value) if value.strip() else None


def initialize_distributed(config: Any | None) -> bool:
  """Connects the processes of a multi-host job if `config.distributed` (call before any JAX computation).

  Arguments come from the config, else from $JAX_COORDINATOR_ADDRESS / $JAX_NUM_PROCESSES /
  $JAX_PROCESS_ID, else JAX's auto-detection (TPU pod slices, SLURM, Open MPI), which needs none of them.
  Idempotent. Returns True when running distributed.
  """
  mesh_config = MeshConfig.from_config(config)
  if not mesh_config.distributed:
    return False
  is_initialized = getattr(jax.distributed, "is_initialized", None)
  if is_initialized is not None and is_initialized():
    return True
  address = mesh_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = mesh_config.num_processes if mesh_config.num_processes >= 0 else _env_int("JAX_NUM_PROCESSES")
  process_id = mesh_config.process_id if mesh_config.process_id >= 0 else _env_int("JAX_PROCESS_ID")
  jax.distributed.initialize(coordinator_address=address, num_processes=num_processes, process_id=process_id)
  return True


def is_chief() -> bool:
  """True on the process that writes run files (metrics, config, summary): process 0."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class ChiefOnlyWriter:
  """Wraps a metrics writer (read / write / truncate) so that only process 0 writes; every process reads.

  `truncate` is followed by a barrier, so no process reads the file while process 0 rewrites it. The run
  directory must be on a filesystem all hosts see (NFS, a gcsfuse mount) for a multi-host run to resume.
  """

  def __init__(self, writer: Any):
    self._writer = writer
    self.path = getattr(writer, "path", None)

  def read(self) -> list[dict]:
    return self._writer.read()

  def write(self, record: Mapping[str, Any]) -> None:
    if is_chief():
      self._writer.write(record)

  def truncate(self, keep: Callable[[dict], bool]) -> None:
    if is_chief():
      self._writer.truncate(keep)
    barrier("metrics_truncate")

  def replace_all(self, records: list[dict]) -> None:
    if is_chief():
      self._writer.replace_all(records)
    barrier("metrics_replace")

  def close(self) -> None:
    if is_chief():
      self._writer.close()


# ------------------------------------------------------------------------------------------------ mesh


def make_mesh(config: Any | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over `devices` (default: every device of every process) shaped by `config` (cfg.mesh or None).

  On accelerators `jax.make_mesh` orders the devices to follow the physical topology (the later axis, fsdp,
  varies fastest, so its all-gathers stay within a host or ICI ring). Raises a ValueError when the shape
  does not fit the device count.
  """
  mesh_config = MeshConfig.from_config(config)
  devices = list(jax.devices() if devices is None else devices)
  shape = resolve_mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, mesh_config.axes, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), mesh_config.axes, axis_types=axis_types)


def describe(mesh: Mesh) -> str:
  """e.g. "data=2 x fsdp=4 (8 devices, 2 processes, cpu)"."""
  axes = " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
  num_devices = math.prod(mesh.shape.values())
  if not isinstance(mesh, Mesh):  # An AbstractMesh has no devices.
    return f"{axes} ({num_devices} devices)"
  platform = mesh.devices.flat[0].platform
  return f"{axes} ({num_devices} devices, {jax.process_count()} processes, {platform})"


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over (all of data and fsdp that the mesh has)."""
  return tuple(a for a in mesh.axis_names if a in MESH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (prompt / example) axis split over every batch axis; other axes whole."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def check_batch_sizes(mesh: Mesh, sizes: Mapping[str, int]) -> None:
  """Raises a ValueError listing every `sizes` entry (config field -> size) the batch shards do not divide."""
  shards = num_batch_shards(mesh)
  bad = {name: size for name, size in sizes.items() if size % shards}
  if bad:
    listed = ", ".join(f"config.{name}={size}" for name, size in bad.items())
    raise ValueError(
        f"{listed} not divisible by the {shards} batch shards of the mesh {describe(mesh)}: every device "
        f"must hold a whole number of prompts / examples. Use multiples of {shards}, or change "
        "config.mesh.shape.")


# ------------------------------------------------------------------------------------------------ partitioning


def path_string(path: Sequence[Any]) -> str:
  """A tree path as "params/layers_0/mlp/up_proj/kernel" (dict keys, attribute names, sequence indices)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return "/".join(parts)


def _fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> PartitionSpec:
  if fsdp_size <= 1:
    return PartitionSpec()
  candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not candidates:
    return PartitionSpec()
  dim = max(candidates, key=lambda i: (shape[i], -i))  # Largest; the first of equals.
  return PartitionSpec(*[FSDP_AXIS if i == dim else None for i in range(len(shape))])


def partition_spec(path: str, shape: tuple[int, ...], mesh: Mesh,
                   rules: Sequence[tuple[str, Any]] = DEFAULT_PARAM_RULES) -> PartitionSpec:
  """The PartitionSpec of one leaf from the first rule whose regex is found in `path` (see the module doc)."""
  if not shape:
    return PartitionSpec()
  for regex, placement in rules:
    if not re.search(regex, path):
      continue
    if placement == "replicate":
      return PartitionSpec()
    if placement == "fsdp":
      return _fsdp_spec(shape, mesh.shape.get(FSDP_AXIS, 1))
    spec = tuple(placement)
    if len(spec) != len(shape):
      raise ValueError(f"config.mesh.param_rules: {regex!r} gives {spec} for {path} of shape {shape}; "
                       "it needs one entry per dimension.")
    for dim, axes in zip(shape, spec):
      names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      unknown = [a for a in names if a not in mesh.shape]
      if unknown:
        raise ValueError(f"config.mesh.param_rules: {regex!r} names axes {unknown} the mesh "
                         f"{describe(mesh)} does not have.")
      size = math.prod(mesh.shape[a] for a in names)
      if dim % size:
        raise ValueError(f"config.mesh.param_rules: {regex!r} splits a dimension of {dim} of {path} "
                         f"(shape {shape}) over {size} devices, which does not divide it.")
    return PartitionSpec(*spec)
  return PartitionSpec()


def tree_shardings(tree: PyTree, mesh: Mesh, rules: Sequence[tuple[str, Any]] = DEFAULT_PARAM_RULES) -> PyTree:
  """NamedShardings for every leaf of `tree` (arrays or jax.ShapeDtypeStruct), from the partition rules."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: NamedSharding(mesh, partition_spec(path_string(path), tuple(leaf.shape), mesh, rules)),
      tree)


def init_sharded(init_fn: Callable[..., PyTree], *args: Any, mesh: Mesh,
                 rules: Sequence[tuple[str, Any]] = DEFAULT_PARAM_RULES) -> tuple[PyTree, PyTree]:
  """Runs `init_fn(*args)` so that its outputs are created already sharded; returns (outputs, shardings).

  `jax.eval_shape(init_fn)` gives the shapes without allocating, `tree_shardings` the placements, and
  `jax.jit(init_fn, out_shardings=...)` materialises every leaf directly on its devices: a model larger
  than one device's memory never exists unsharded. `args` (e.g. a key, or parameters to build an
  optimizer state from) may be anything jit accepts.
  """
  abstract = jax.eval_shape(init_fn, *args)
  shardings = tree_shardings(abstract, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(*args), shardings


def shard_global_array(array: Any, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from a host array that every process holds in full (each keeps its own shards)."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def shard_host_local_array(local_array: Any, sharding: NamedSharding) -> jax.Array:
  """A global jax.Array from the slice of the batch this process holds (its rows, in process order)."""
  return jax.make_array_from_process_local_data(sharding, np.asarray(local_array))


def gather_to_host(tree: PyTree) -> PyTree:
  """numpy copies of (possibly sharded, multi-host) arrays, identical on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


# ------------------------------------------------------------------------------------------------ sampler


def make_sharded_sampler(model_fns: Any, mesh: Mesh, params_sharding: PyTree, **sample_kwargs: Any):
  """Jitted `sample(params, prompts [P, L], rng, temperature) -> Rollouts`, prompts and rollouts split over
  the batch axes and parameters in `params_sharding`.

  `sample_kwargs` are the static options of `maxrl_jax.sampling.sample_rollouts` (num_rollouts,
  max_new_tokens, stop_tokens, top_k, top_p, pad_id). P must be divisible by `num_batch_shards(mesh)`.
  """
  batch, rep = batch_sharding(mesh), replicated(mesh)
  rollout_shardings = sampling.Rollouts(tokens=batch, logprobs=batch, mask=batch, lengths=batch,
                                        stopped=batch, num_steps=rep)

  def sample(params, prompts, rng, temperature):
    return sampling.sample_rollouts(model_fns, params, prompts, rng, temperature=temperature, **sample_kwargs)

  return jax.jit(sample, in_shardings=(params_sharding, batch, rep, rep), out_shardings=rollout_shardings)
