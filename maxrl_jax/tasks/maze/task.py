"""The maze task (configs/maze.py): SFT on BFS shortest paths, RL on fresh or fixed mazes, held-out pass@k.

Data streams (keys from the trainer, `fold_in(key, step)` here):

    SFT batch of step s     `env.sft_batch(fold_in(sft_key, s), ...)`: fresh mazes with their BFS paths
    RL batch of step s      maze.train_data="fresh": `env.draw_training_mazes(fold_in(rl_key, s), P, ...)`;
                            "fixed": the TFDS train split in epoch-shuffled batches (the data-scarce regime),
                            epoch e's order `permutation(fold_in(rl_key, e))`
    held-out set            the TFDS test split (config.eval.num_mazes mazes), never trained on

Held-out mazes are never trained on: every training draw excludes them (a sorted hash table of the test
mazes, bounded redraws in the jitted generator), the fixed train split is drawn without them, and at the end
every maze the run trained on is regenerated from its keys and compared with the held-out set bit by bit
(`overlap_report`, in summary.json; a non-zero overlap fails the run).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from maxrl_jax import metrics as metrics_lib
from maxrl_jax import sharding
from maxrl_jax.models import decoder
from maxrl_jax.tasks import base
from maxrl_jax.tasks.maze import dataset as maze_dataset
from maxrl_jax.tasks.maze import env

# A held-out set taking more than this share of the maze distribution is refused: fresh training draws
# would need many redraws (and could, with probability share^MAX_REDRAWS per maze, fail to avoid it).
MAX_HELDOUT_SHARE = 0.5


def check_heldout_room(heldout_grids: np.ndarray, size: int) -> dict:
  """Measures how much of the maze distribution the held-out set takes; stops a run where it leaves no room.

  Returns {"num_mazes", "distinct", "share_of_distribution"} for summary.json.
  """
  share = env.heldout_mass(heldout_grids, size)
  distinct = len(env.hash_table(heldout_grids))
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
    grids = jax.vmap(lambda key: env.draw_training_mazes(key, num, size, heldout_table)[0])(keys)
    return env.passage_bits(grids.reshape((-1, size, size)))

  sources = {}
  for phase, keys in draw_keys.items():
    parts = []
    for start in range(0, keys.shape[0], chunk):
      part = keys[start:start + chunk]
      count = part.shape[0]
      if count < chunk:  # Pad to one shape (one compilation); the padding is dropped below.
        part = jnp.concatenate([part, jnp.broadcast_to(part[:1], (chunk - count,) + part.shape[1:])])
      parts.append(np.asarray(draw_bits(part, batch_sizes[phase]))[:count * batch_sizes[phase]])
    sources[phase] = np.concatenate(parts) if parts else np.zeros((0, env.num_passages(size)), bool)
  if pool is not None:
    sources["fixed_pool"] = np.asarray(env.passage_bits(jnp.asarray(pool)))
  return sources


def overlap_report(sources: dict[str, np.ndarray], heldout_grids: np.ndarray) -> dict:
  """{"drawn", "distinct", "overlap_with_heldout"} per source and for "all", from passage bits [n, E].

  `overlap_with_heldout` counts distinct training mazes equal to a held-out maze, compared by passage bits
  (exactly, not by hash); the trainers guarantee 0.
  """
  heldout = {row.tobytes() for row in np.packbits(np.asarray(env.passage_bits(jnp.asarray(heldout_grids))), axis=1)}
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


class MazeTask(base.TokenTask):
  """Navigate a maze from (1, 1) to (S-2, S-2): the paper's procedural task (see the module docstring)."""

  stop_tokens = (env.DONE, env.EOS)
  pad_id = env.PAD
  seed_fields = ("training_mazes",)

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.size = config.maze.size
    self.heldout_grids = None  # Set by prepare().

  # ------------------------------------------------------------------------------ config

  def validate(self) -> None:
    config = self.config

    def fail(field, message):
      raise ValueError(f"config.{field}: {message}")

    try:
      size = env.check_maze_size(config.maze.size)
    except ValueError as e:
      fail("maze.size", str(e))
    if config.maze.train_data not in ("fresh", "fixed"):
      fail("maze.train_data", f"{config.maze.train_data!r}; allowed: 'fresh' (new mazes every step) or 'fixed'.")
    fields = ["eval.num_mazes", "eval.prompt_chunk"]
    if config.maze.train_data == "fixed":
      fields.append("maze.train_examples")
    for field in fields:
      group, name = field.split(".")
      value = config[group][name]
      if isinstance(value, bool) or int(value) != value or value < 1:
        fail(field, f"{value!r} must be an integer >= 1.")
    need = env.max_path_length(size) + 1  # Every move of the longest possible shortest path, then DONE.
    if config.rollout.max_new_tokens < need:
      fail("rollout.max_new_tokens",
           f"{config.rollout.max_new_tokens} is shorter than the longest shortest path of a {size}x{size} "
           f"maze ({need - 1} moves + DONE); use >= {need}.")
    prompt_len = env.prompt_length(size)
    longest = prompt_len + max(config.rollout.max_new_tokens, env.min_response_length(size))
    if config.model.max_positions < longest:
      fail("model.max_positions", f"{config.model.max_positions} < prompt ({prompt_len}) + response "
           f"({longest - prompt_len}) tokens; use >= {longest}.")
    if config.model.vocab_size < env.VOCAB_SIZE:
      fail("model.vocab_size", f"{config.model.vocab_size} < the maze vocabulary ({env.VOCAB_SIZE}).")
    if config.eval.num_mazes % config.eval.prompt_chunk:
      fail("eval.prompt_chunk", f"{config.eval.prompt_chunk} must divide eval.num_mazes={config.eval.num_mazes}.")
    if config.maze.train_data == "fixed" and config.maze.train_examples < config.rollout.num_prompts:
      fail("maze.train_examples", f"{config.maze.train_examples} < rollout.num_prompts="
           f"{config.rollout.num_prompts}.")
    try:
      decoder.DecoderConfig.from_config(config.model)
    except (ValueError, TypeError) as e:
      fail("model", str(e))

  def check_shared_sft(self, source: dict, path: str) -> None:
    """An SFT policy from another run (`sft.init_from`) must come from the same mazes and held-out set."""
    mine = self.config.to_dict()
    for group, field in (("maze", "size"), ("maze", "data_dir"), ("eval", "num_mazes")):
      if source.get(group, {}).get(field) != mine[group][field]:
        raise ValueError(
            f"config.sft.init_from: {path!r} was trained with {group}.{field}="
            f"{source.get(group, {}).get(field)!r}, this run uses {mine[group][field]!r}; an SFT policy is only "
            "shared between runs on the same maze size and held-out set.")

  def prompt_length(self) -> int:
    return env.prompt_length(self.size)

  def batch_sizes(self) -> dict[str, int]:
    return {"eval.prompt_chunk": self.config.eval.prompt_chunk}

  def model_config(self) -> decoder.DecoderConfig:
    return decoder.DecoderConfig.from_config(self.config.model)

  # ------------------------------------------------------------------------------ data

  def prepare(self, workdir: str) -> None:
    config = self.config
    self.data_dir = config.maze.data_dir or os.path.join(workdir, "tfds")
    num_train = config.maze.train_examples if config.maze.train_data == "fixed" else config.rollout.num_prompts
    load_split = functools.partial(maze_dataset.load_maze_split, self.data_dir, self.size, num_train=num_train,
                                   num_test=config.eval.num_mazes)
    tfds.disable_progress_bar()
    if not sharding.is_chief():
      sharding.barrier("tfds_build")  # Process 0 builds the dataset (if missing) before the others read it.
    heldout_grids = load_split("test")
    if sharding.is_chief():
      sharding.barrier("tfds_build")
    self.set_heldout(heldout_grids)
    self.heldout = check_heldout_room(self.heldout_grids, self.size)
    if config.maze.train_data == "fixed":
      pool = load_split("train")  # The TFDS train split excludes the test split's mazes.
      if int(env.count_in_table(jnp.asarray(pool), self.heldout_table)):
        raise ValueError(f"The fixed training pool under {self.data_dir} holds held-out mazes; it was written "
                         "by an older version of the dataset. Delete that directory to rebuild it.")
      self.pool = pool
      self.pool_device = jnp.asarray(pool)
      self.steps_per_epoch = len(pool) // config.rollout.num_prompts

  def set_heldout(self, grids: np.ndarray) -> None:
    """Uses `grids` [M, S, S] as the held-out set: never drawn for SFT or RL (benchmarks may pass none)."""
    self.heldout_grids = np.asarray(grids)
    self.heldout_table = (jnp.asarray(env.hash_table(self.heldout_grids)) if len(self.heldout_grids)
                          else jnp.zeros((0,), jnp.uint32))
    self.pool = None

  def sft_batch(self, key, step):
    batch = env.sft_batch(jax.random.fold_in(key, step), self.config.sft.batch_size, self.size,
                          env.min_response_length(self.size), self.heldout_table)
    return {"inputs": batch["inputs"], "loss_mask": batch["loss_mask"]}

  def rl_batch(self, key, step):
    num_prompts = self.config.rollout.num_prompts
    if self.pool is None:
      return env.draw_training_mazes(jax.random.fold_in(key, step), num_prompts, self.size, self.heldout_table)[0]
    epoch, within = (step - 1) // self.steps_per_epoch, (step - 1) % self.steps_per_epoch
    perm = jax.random.permutation(jax.random.fold_in(key, epoch), self.pool_device.shape[0])
    return self.pool_device[jax.lax.dynamic_slice_in_dim(perm, within * num_prompts, num_prompts)]

  def prompts(self, batch):
    return env.encode_prompts(batch)

  def verify(self, batch, responses):
    return env.verify_groups(batch, responses)

  def record_fields(self, step: int) -> dict:
    return {} if self.pool is None else {"epoch": (step - 1) // self.steps_per_epoch}

  # ------------------------------------------------------------------------------ held-out evaluation

  def heldout_batches(self):
    grids, chunk = jnp.asarray(self.heldout_grids), self.config.eval.prompt_chunk
    return [(i, grids[i:i + chunk]) for i in range(0, grids.shape[0], chunk)]

  def heldout_metrics(self, counts, num_samples):
    return metrics_lib.heldout_summary(counts, num_samples, tuple(self.config.eval.ks))

  # ------------------------------------------------------------------------------ results

  def training_mazes(self, sft: tuple[jax.Array, int, int], rl: tuple[jax.Array, int]) -> dict:
    """The overlap report of every maze one seed trained on (SFT and RL), regenerated from its keys.

    Args:
      sft: (the SFT data key, SFT steps, SFT batch size) of the policy RL started from.
      rl: (the RL data key, RL steps).
    """
    sft_key, sft_steps, sft_batch = sft
    draw_keys = {"sft": jax.vmap(lambda s: jax.random.fold_in(sft_key, s))(jnp.arange(1, sft_steps + 1))}
    batch_sizes = {"sft": sft_batch}
    if self.pool is None:
      rl_key, rl_steps = rl
      draw_keys["rl"] = jax.vmap(lambda s: jax.random.fold_in(rl_key, s))(jnp.arange(1, rl_steps + 1))
      batch_sizes["rl"] = self.config.rollout.num_prompts
    report = overlap_report(training_maze_bits(draw_keys, batch_sizes, self.size, self.heldout_table,
                                               pool=self.pool), self.heldout_grids)
    if report["all"]["overlap_with_heldout"]:
      raise RuntimeError(f"{report['all']['overlap_with_heldout']} held-out mazes were drawn for training "
                         f"({report}); the held-out results are not valid.")
    return report

  def summary_fields(self, runs: list[dict], per_seed: bool = False) -> dict:
    """heldout_mazes, and training_mazes (one report, or with `per_seed` one per seed "seed<s>")."""
    reports = {f"seed{r['seed']}": self.training_mazes(r["sft"], r["rl"]) for r in runs}
    fields = {"heldout_mazes": self.heldout, "eval_num_mazes": self.config.eval.num_mazes,
              "eval_num_samples": self.config.eval.num_samples}
    fields["training_mazes"] = reports if per_seed else reports[f"seed{runs[0]['seed']}"]
    return fields

  def table_title(self) -> str:
    config = self.config
    return (f"Held-out mazes ({config.eval.num_mazes} mazes {self.size}x{self.size}, never trained on; "
            f"{config.eval.num_samples} samples each, temperature {config.eval.temperature}; ± standard error "
            "over mazes)")

  def table_note(self, summary: dict) -> str:
    training = summary["training_mazes"]["all"]
    return f" Trained on {training['distinct']} distinct mazes, {training['overlap_with_heldout']} of them held out."

  def expected_work(self) -> dict[str, str]:
    config = self.config
    work = {"mazes": f"{self.size}x{self.size}; prompt {env.prompt_length(self.size)} tokens, responses up to "
                     f"{config.rollout.max_new_tokens} tokens"}
    if config.maze.train_data == "fixed":
      work["training mazes"] = f"a fixed pool of {config.maze.train_examples:,} (TFDS train split)"
    else:
      work["training mazes"] = "fresh ones every step"
    work["held-out set"] = f"{config.eval.num_mazes} mazes (TFDS test split), never trained on"
    return work

  def sft_sequence_length(self) -> int:
    return env.prompt_length(self.size) + env.min_response_length(self.size)

