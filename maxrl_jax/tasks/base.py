"""The Task interface: what a task provides to its trainer, and nothing else.

A task is a module `maxrl_jax/tasks/<name>.py` (or package) with `make_task(config) -> Task`;
`config.task = "<name>"` selects it, so a new task needs no change to the trainers, the RL step or main.py
(maxrl_jax/tasks/countdown.py is the worked example; docs/architecture.md walks through it).

`TokenTask` is the interface of pass/fail tasks on token sequences, trained by maxrl_jax/trainers/rl.py:

    SFT on reference responses  ->  on-policy RL (N rollouts per prompt, verifier, estimator, update)
                                ->  held-out pass@k after SFT, during RL and at the end.

The trainer owns the policy, the keys, the RL step, populations, checkpoints and records; the task owns:

    its config checks                  validate()
    its token facts                    stop_tokens, pad_id, prompt_length(), response_cap()
    its data, made ready once          prepare(workdir)   (files are written by process 0)
    the policy's architecture          model_config(), init_params(key, shardings)
    SFT batches                        sft_batch(key, step) -> {"inputs" [B, T], "loss_mask" [B, T]}
    RL prompts from (key, step)        rl_batch(key, step) -> a batch pytree [P, ...]
                                       prompts(batch) -> prompts [P, L] (or left-padded PaddedPrompts)
    a verifier                         verify(batch, responses [P, N, M]) -> rewards [P, N] (jittable), or
                                       for `host_verifier` tasks verify_host(batch, rollouts) on numpy
    the held-out set and its metrics   heldout_batches(), heldout_metrics(counts, num_samples) (device
                                       verifiers), or evaluate_host(...) (host verifiers)
    its own summary fields             summary_fields(...), table_title()

Key streams: the trainer passes each data function a key derived from the seed (`fold_in(stream, step)`
inside the function or before it, as documented there), so a resumed run draws exactly the data of an
uninterrupted one. A device task's `rl_batch`, `prompts` and `verify` must be pure and jittable: a
population vmaps them over its members.
"""

from __future__ import annotations

import abc
import importlib
import pkgutil
from typing import Any, ClassVar

import jax
import ml_collections
import numpy as np

Array = jax.Array


class Task(abc.ABC):
  """Base of every task: a config, its checks, and what a dry run reports about the data."""

  # The trainer module (maxrl_jax/trainers/<trainer>.py) that runs the task.
  trainer: ClassVar[str] = "rl"

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  @abc.abstractmethod
  def validate(self) -> None:
    """Raises ValueError naming `config.<field>` and the allowed values on any invalid task setting."""

  def expected_work(self) -> dict[str, str]:
    """Lines of `main --dry_run` about the task's data ({what: how much}); no data is read."""
    return {}


class TokenTask(Task):
  """A pass/fail task on token sequences (see the module docstring for the contract)."""

  trainer = "rl"
  # True: `verify_host` runs on numpy arrays between sampling and the update (e.g. text answers).
  host_verifier: ClassVar[bool] = False
  stop_tokens: tuple[int, ...] = ()
  pad_id: int = 0

  # ------------------------------------------------------------------------------ sizes

  @abc.abstractmethod
  def prompt_length(self) -> int:
    """The longest prompt in tokens (the memory plan's L)."""

  def batch_sizes(self) -> dict[str, int]:
    """{config field: size} of the task's batches that must split over the devices (e.g. eval chunks)."""
    return {}

  # ------------------------------------------------------------------------------ set-up

  def prepare(self, workdir: str) -> None:
    """Builds or reads the task's data and held-out set (called once per launch, on every process)."""

  def close(self) -> None:
    """Releases what `prepare` started (e.g. worker processes); called however the launch ends."""

  @abc.abstractmethod
  def model_config(self):
    """The policy's `maxrl_jax.models.decoder.DecoderConfig`."""

  def init_params(self, key: Array, shardings: Any) -> Any:
    """The initial policy parameters, placed as `shardings` (default: a fresh decoder from `key`)."""
    from maxrl_jax.models import decoder  # pylint: disable=import-outside-toplevel

    fns = decoder.DecoderFns(self.model_config())
    return jax.jit(fns.init, out_shardings=shardings)(key)

  # ------------------------------------------------------------------------------ data

  @abc.abstractmethod
  def sft_batch(self, key: Array, step: int | Array) -> dict:
    """SFT batch {"inputs": [B, T] int32, "loss_mask": [B, T] bool} of `step` from the SFT data key."""

  @abc.abstractmethod
  def rl_batch(self, key: Array, step: int | Array) -> Any:
    """The batch [P, ...] of RL step `step` from the RL data key (device tasks: jittable and vmappable)."""

  @abc.abstractmethod
  def prompts(self, batch: Any) -> Any:
    """Prompts [P, L] int32 (or `sampling.PaddedPrompts`) of a batch (device tasks: jittable)."""

  def verify(self, batch: Any, responses: Array) -> Array:
    """Rewards [P, N] float32 in {0, 1} of responses [P, N, M] to the batch's prompts (jittable)."""
    raise NotImplementedError(f"{type(self).__name__} verifies on the host (verify_host).")

  def verify_host(self, batch: Any, tokens: np.ndarray, lengths: np.ndarray, stopped: np.ndarray,
                  ) -> tuple[np.ndarray, dict[str, float]]:
    """(rewards [P, N] float32, statistics) of host rollouts tokens [P, N, M] (host_verifier tasks)."""
    raise NotImplementedError(f"{type(self).__name__} verifies on the device (verify).")

  def record_fields(self, step: int) -> dict:
    """Extra fields of the RL interval record at `step` (e.g. the epoch of a fixed training set)."""
    return {}

  # ------------------------------------------------------------------------------ held-out evaluation

  def heldout_batches(self) -> list[tuple[int, Any]]:
    """[(offset, batch)] chunks of the held-out set (device tasks); offset is the chunk's first index."""
    raise NotImplementedError

  def heldout_metrics(self, counts: np.ndarray, num_samples: int) -> dict[str, float]:
    """Held-out metrics from the correct counts [M] of `num_samples` samples per held-out problem."""
    raise NotImplementedError

  # ------------------------------------------------------------------------------ results

  def summary_fields(self, runs: list[dict], per_seed: bool = False) -> dict:
    """Task fields of summary.json. `runs`: one dict per seed of the workdir (one run, or a population's
    distinct seeds) with "seed", "sft" (its SFT data key, steps, batch size) and "rl" (its RL data key,
    steps); with `per_seed` (a population) per-seed fields are keyed "seed<s>"."""
    return {}

  # Fields of `summary_fields` that are per seed (a population keys them "seed<s>").
  seed_fields: tuple[str, ...] = ()

  def table_title(self) -> str:
    """The title of the held-out table a finished run prints."""
    return "Held-out problems"

  def table_note(self, summary: dict) -> str:
    """A sentence after the title, from a single run's summary (e.g. what it trained on); may be ""."""
    del summary
    return ""


def available() -> list[str]:
  """The task names `config.task` may take: the modules of maxrl_jax/tasks with `make_task`."""
  import maxrl_jax.tasks as package  # pylint: disable=import-outside-toplevel

  names = []
  for info in pkgutil.iter_modules(package.__path__):
    if info.name != "base" and hasattr(importlib.import_module(f"{package.__name__}.{info.name}"), "make_task"):
      names.append(info.name)
  return sorted(names)


def make_task(config: ml_collections.ConfigDict) -> Task:
  """The Task of `config.task` (maxrl_jax.tasks.<name>.make_task), or a ValueError listing the tasks."""
  name = config.get("task")
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"config.task={name!r}; allowed: {available()}.")
  try:
    module = importlib.import_module(f"maxrl_jax.tasks.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"maxrl_jax.tasks.{name}":
      raise
    raise ValueError(f"config.task={name!r}; allowed: {available()}.") from None
  if not hasattr(module, "make_task"):
    raise ValueError(f"config.task={name!r}: maxrl_jax/tasks/{name} defines no make_task(config); allowed: "
                     f"{available()}.")
  return module.make_task(config)
