"""Language-model RL on verifiable math (GSM8K, MATH-style) from a local Hugging Face checkpoint.

configs/gsm8k_smollm2.py and configs/qwen3_math.py document every field. The task:

    the policy        a local Llama / SmolLM2, Qwen2 / Qwen2.5, Qwen3 checkpoint (maxrl_jax.models.hf_loading),
                      its tokenizer and chat template (maxrl_jax.text.tokenizer); model.synthetic writes a tiny
                      random one into the workdir instead (tests)
    prompts           question + the paper's suffix through the chat template, left-padded to a width rounded up
                      to data.prompt_bucket; prompts longer than data.max_prompt_tokens are dropped (counted)
    SFT data          the reference solutions (optional warm-up; the paper runs none)
    RL batches        epoch-shuffled prompts: epoch e's order is `permutation(fold_in(rl_key, e))`
    the verifier      on the host: decode each response and compare its last \\boxed{...} (or final answer) with
                      the reference, numbers exactly and sympy otherwise in killed-at-timeout worker processes
                      (maxrl_jax.text.math_verifier); reward 0 at the length cap with verifier.zero_truncated
    held-out set      data.eval_path (or train_path's eval_split): pass@k (unbiased) from eval.num_samples
                      samples per problem, majority vote, response lengths
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from maxrl_jax import metrics as metrics_lib
from maxrl_jax import sampling
from maxrl_jax import sharding
from maxrl_jax.models import hf_loading
from maxrl_jax.tasks import base
from maxrl_jax.text import data as data_lib
from maxrl_jax.text import hub
from maxrl_jax.text import math_verifier
from maxrl_jax.text import synthetic
from maxrl_jax.text import tokenizer as tokenizer_lib


def _round_up(value: int, multiple: int) -> int:
  return -(-value // multiple) * multiple


def pad_prompts(token_lists: Sequence[Sequence[int]], bucket: int, max_tokens: int,
                pad_id: int) -> sampling.PaddedPrompts:
  """Left-pads to the longest prompt rounded up to `bucket` (at most max_tokens): few distinct shapes."""
  width = min(max_tokens, _round_up(max(len(t) for t in token_lists), bucket))
  return sampling.left_pad(token_lists, width, pad_id)


def decode_responses(tokenizer: tokenizer_lib.TextTokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
  """tokens [R, M], lengths [R] -> R strings (special tokens such as the stop token dropped)."""
  return tokenizer.decode_batch([row[:n] for row, n in zip(tokens.tolist(), lengths.tolist())])


def eval_sizes(config: ml_collections.ConfigDict, full: bool) -> dict:
  """num_samples, samples_per_call and ks of one held-out evaluation.

  The first (step 0) and the last evaluation use eval.num_samples (the paper's pass@k curves); those in
  between use eval.periodic_num_samples when it is set (the official scripts validate with 32 samples),
  with the ks that fit.
  """
  num_samples = config.eval.num_samples
  if not full and config.eval.periodic_num_samples:
    num_samples = config.eval.periodic_num_samples
  return {"num_samples": num_samples, "samples_per_call": min(config.eval.samples_per_call, num_samples),
          "ks": tuple(k for k in config.eval.ks if k <= num_samples)}


def _pipelined(calls, consume) -> None:
  """Dispatches call i+1 (asynchronously, on the device) before consuming result i on the host."""
  pending = None
  for call in calls:
    result = call()
    if pending is not None:
      consume(pending)
    pending = result
  if pending is not None:
    consume(pending)


class TextTask(base.TokenTask):
  """Math word problems answered by a language model (see the module docstring)."""

  host_verifier = True

  # ------------------------------------------------------------------------------ config

  def validate(self) -> None:
    config = self.config

    def fail(field, message):
      raise ValueError(f"config.{field}: {message}")

    def get(field):
      node = config
      for part in field.split("."):
        node = node[part]
      return node

    if not config.model.path and not config.model.synthetic:
      fail("model.path", "set the local Hugging Face checkpoint directory (or model.synthetic for a tiny "
           "random one).")
    if config.model.synthetic and config.model.synthetic not in hf_loading.ARCHITECTURES.values():
      fail("model.synthetic", f"{config.model.synthetic!r}; allowed: '', "
           f"{sorted(hf_loading.ARCHITECTURES.values())}.")
    if not config.data.train_path and not config.data.synthetic:
      fail("data.train_path", "set a GSM8K / MATH-style file or directory (or data.synthetic).")
    if config.data.chat_template not in tokenizer_lib.TEMPLATE_NAMES:
      fail("data.chat_template", f"{config.data.chat_template!r}; allowed: {list(tokenizer_lib.TEMPLATE_NAMES)}.")
    if config.data.answer_format not in data_lib.ANSWER_FORMATS:
      fail("data.answer_format", f"{config.data.answer_format!r}; allowed: {list(data_lib.ANSWER_FORMATS)}.")
    if config.verifier.answer_mode not in math_verifier.ANSWER_MODES:
      fail("verifier.answer_mode", f"{config.verifier.answer_mode!r}; allowed: {list(math_verifier.ANSWER_MODES)}.")
    positive_ints = ["rollout.length_bucket", "data.max_prompt_tokens", "data.prompt_bucket",
                     "eval.samples_per_call", "eval.prompt_chunk", "eval.max_new_tokens", "verifier.num_threads"]
    if config.sft.steps:
      positive_ints.append("sft.max_response_tokens")
    for field in positive_ints:
      value = get(field)
      if isinstance(value, bool) or int(value) != value or value < 1:
        fail(field, f"{value!r} must be an integer >= 1.")
    for field in ("eval.num_problems", "data.train_limit", "rollout.prompt_chunk", "rl.micro_batch_prompts",
                  "rl.micro_batch_rollouts", "memory.device_bytes", "memory.reserve_bytes", "rollout.inflight_slots"):
      value = get(field)
      if isinstance(value, bool) or int(value) != value or value < 0:
        fail(field, f"{value!r} must be an integer >= 0.")
    if not config.verifier.timeout_s > 0:
      fail("verifier.timeout_s", f"{config.verifier.timeout_s!r} must be > 0.")
    if not 0 < config.eval.top_p <= 1:
      fail("eval.top_p", f"{config.eval.top_p!r} must be in (0, 1].")
    divisible = [("rollout.prompt_chunk", "rollout.num_prompts"), ("rl.micro_batch_prompts", "rollout.num_prompts"),
                 ("rl.micro_batch_rollouts", "rollout.num_samples"), ("eval.samples_per_call", "eval.num_samples")]
    for small, large in divisible:
      if get(small) and get(large) % get(small):
        fail(small, f"{get(small)} must divide {large}={get(large)}.")
    periodic = config.eval.periodic_num_samples
    if isinstance(periodic, bool) or int(periodic) != periodic or not 0 <= periodic <= config.eval.num_samples:
      fail("eval.periodic_num_samples", f"{periodic!r} must be an integer in [0, eval.num_samples].")
    if periodic and periodic % min(periodic, config.eval.samples_per_call):
      fail("eval.periodic_num_samples", f"{periodic} must be a multiple of eval.samples_per_call="
           f"{config.eval.samples_per_call} (or smaller than it).")
    if config.verifier.memory_limit_mb < 0:
      fail("verifier.memory_limit_mb", f"{config.verifier.memory_limit_mb!r} must be >= 0 (0: no limit).")
    if config.rollout.inflight_slots and config.objective.self_filter:
      fail("objective.self_filter", "SELF's greedy decodes use static batching; set rollout.inflight_slots=0.")

  def prompt_length(self) -> int:
    return int(self.config.data.max_prompt_tokens)

  def batch_sizes(self) -> dict[str, int]:
    sizes = {"eval.prompt_chunk": self.config.eval.prompt_chunk}
    if self.config.rollout.prompt_chunk:
      sizes["rollout.prompt_chunk"] = self.config.rollout.prompt_chunk
    if self.config.rl.micro_batch_prompts:
      sizes["rl.micro_batch_prompts"] = self.config.rl.micro_batch_prompts
    return sizes

  # ------------------------------------------------------------------------------ set-up

  def _model_path(self, workdir: str) -> str:
    config = self.config
    if not config.model.synthetic:
      return hub.resolve_model(config.model.path)  # a Hub id: its cached snapshot
    path = os.path.join(workdir, "synthetic_model")
    if not os.path.exists(os.path.join(path, "config.json")):
      synthetic.write_tiny_checkpoint(path, architecture=config.model.synthetic, seed=config.seed,
                                      **dict(config.model.synthetic_overrides))
    return path

  def _problems(self, workdir: str):
    """(train problems, eval problems) from the configured files, or synthetic arithmetic written as JSONL."""
    config, d = self.config, self.config.data
    train_path, eval_path = d.train_path, d.eval_path
    if d.synthetic:
      directory = os.path.join(workdir, "synthetic_data")
      train_path, eval_path = os.path.join(directory, "train.jsonl"), os.path.join(directory, "test.jsonl")
      if not os.path.exists(eval_path):
        data_lib.write_jsonl(train_path, data_lib.problems_to_rows(data_lib.synthetic_arithmetic(
            d.synthetic_train_size, seed=config.seed, max_operand=d.synthetic_max_operand)))
        data_lib.write_jsonl(eval_path, data_lib.problems_to_rows(data_lib.synthetic_arithmetic(
            config.eval.num_problems or 16, seed=config.seed + 1, max_operand=d.synthetic_max_operand)))
    train_path, eval_path = hub.resolve_data(train_path), hub.resolve_data(eval_path)  # hf:OWNER/NAME[/SUBSET]
    load = functools.partial(data_lib.load_problems, question_key=d.question_key or None,
                             answer_key=d.answer_key or None, answer_format=d.answer_format,
                             data_dir=d.tfds_data_dir or None)
    train = load(train_path, split=d.train_split, limit=d.train_limit or None)
    eval_problems = load(eval_path or train_path, split=d.eval_split, limit=config.eval.num_problems or None)
    return train, eval_problems

  def prepare(self, workdir: str) -> None:
    config, d = self.config, self.config.data
    if not sharding.is_chief():
      sharding.barrier("synthetic_files")  # Process 0 writes synthetic checkpoints / data (if asked) first.
    self.model_path = self._model_path(workdir)
    train_problems, eval_problems = self._problems(workdir)
    if sharding.is_chief():
      sharding.barrier("synthetic_files")
    max_new = max(config.rollout.max_new_tokens, config.eval.max_new_tokens)
    max_positions = config.model.max_positions or d.max_prompt_tokens + max(
        max_new, config.sft.max_response_tokens if config.sft.steps else 0)
    self.load_kwargs = dict(dtype=config.model.dtype, param_dtype=config.model.param_dtype or None,
                            max_positions=max_positions)
    self._model_config = hf_loading.load_pretrained_config(self.model_path, **self.load_kwargs)
    self.tokenizer = tokenizer_lib.TextTokenizer.from_pretrained(self.model_path, tuple(d.extra_stop_tokens))
    self.template = tokenizer_lib.ChatTemplate.from_pretrained(self.model_path, d.chat_template)
    self.stop_tokens = tokenizer_lib.stop_token_ids(self.tokenizer, self.template)
    self.pad_id = self.tokenizer.pad_id
    encode = functools.partial(data_lib.encode_prompts, tokenizer=self.tokenizer, template=self.template,
                               suffix=d.prompt_suffix, system_prompt=d.system_prompt, max_tokens=d.max_prompt_tokens,
                               **dict(d.template_kwargs))
    train_tokens, kept = encode(train_problems)
    self.train_problems = [train_problems[i] for i in kept]
    self.train_tokens = train_tokens
    eval_tokens, kept_eval = encode(eval_problems)
    self.dropped = {"train": len(train_problems) - len(self.train_problems),
                    "eval": len(eval_problems) - len(kept_eval)}
    self.eval_problems = [eval_problems[i] for i in kept_eval]
    self.eval_tokens = eval_tokens
    if not self.eval_problems:
      raise ValueError(f"No evaluation prompt fits data.max_prompt_tokens={d.max_prompt_tokens}.")
    if len(self.train_problems) < config.rollout.num_prompts:
      raise ValueError(f"{len(self.train_problems)} usable training prompts < rollout.num_prompts="
                       f"{config.rollout.num_prompts}.")
    self.steps_per_epoch = len(self.train_problems) // config.rollout.num_prompts
    self.verifier = math_verifier.MathVerifier(
        answer_mode=config.verifier.answer_mode, timeout_s=config.verifier.timeout_s,
        num_threads=config.verifier.num_threads, symbolic=config.verifier.symbolic,
        memory_limit_mb=config.verifier.memory_limit_mb)
    if config.sft.steps:
      self._prepare_sft()

  def close(self) -> None:
    """Stops the verifier's sympy worker processes."""
    verifier = getattr(self, "verifier", None)
    if verifier is not None:
      verifier.close()

  def model_config(self):
    return self._model_config

  def init_params(self, key, shardings):
    del key  # The checkpoint's weights, read straight into their shards.
    _, params = hf_loading.load_pretrained(self.model_path, shardings=shardings, **self.load_kwargs)
    return params

  # ------------------------------------------------------------------------------ data

  def _prepare_sft(self) -> None:
    config, tokenizer, template = self.config, self.tokenizer, self.template
    end_id = tokenizer.token_to_id(template.end_of_turn) if template.end_of_turn else None
    end_id = tokenizer.eos_token_ids[0] if end_id is None else end_id
    inputs, prompt_lengths = [], []
    for problem, prompt in zip(self.train_problems, self.train_tokens):
      if not problem.solution:
        continue
      response = tokenizer.encode(problem.solution)[: config.sft.max_response_tokens - 1] + [end_id]
      inputs.append(list(prompt) + response)
      prompt_lengths.append(len(prompt))
    if not inputs:
      raise ValueError("config.sft.steps > 0 but no training problem has a reference solution.")
    width = _round_up(max(len(x) for x in inputs), config.data.prompt_bucket)
    self.sft_inputs = np.full((len(inputs), width), tokenizer.pad_id, np.int32)
    self.sft_mask = np.zeros((len(inputs), width), bool)
    for row, (sequence, prompt_len) in enumerate(zip(inputs, prompt_lengths)):
      self.sft_inputs[row, :len(sequence)] = sequence
      self.sft_mask[row, prompt_len:len(sequence)] = True

  def sft_batch(self, key, step):
    rows = np.asarray(jax.random.randint(jax.random.fold_in(key, step), (self.config.sft.batch_size,), 0,
                                         len(self.sft_inputs)))
    return {"inputs": self.sft_inputs[rows], "loss_mask": self.sft_mask[rows]}

  def rl_batch(self, key, step):
    """{"rows": train problem indices [P], "answers": their references} of RL step `step` (host)."""
    num_prompts = self.config.rollout.num_prompts
    epoch, within = divmod(step - 1, self.steps_per_epoch)
    order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), len(self.train_problems)))
    rows = order[within * num_prompts:(within + 1) * num_prompts]
    return {"rows": rows, "answers": [self.train_problems[i].answer for i in rows]}

  def batch_rows(self, batch, rows: slice):
    return {"rows": batch["rows"][rows], "answers": batch["answers"][rows]}

  def prompts(self, batch):
    return self.pad([self.train_tokens[i] for i in batch["rows"]])

  def pad(self, token_lists) -> sampling.PaddedPrompts:
    d = self.config.data
    return pad_prompts(token_lists, d.prompt_bucket, d.max_prompt_tokens, self.pad_id)

  def record_fields(self, step: int) -> dict:
    return {"epoch": (step - 1) // self.steps_per_epoch}

  def verify_host(self, batch, tokens, lengths, stopped):
    rewards, result = self.score(batch["answers"], tokens, lengths)
    return rewards, {"verify_s": result["verify_seconds"], "verify_timeouts": result["verify_timeouts"],
                     "zeroed_at_cap": float(np.mean(result["zeroed_at_cap"]))}

  def score(self, answers: Sequence[str], tokens: np.ndarray, lengths: np.ndarray):
    """(rewards [P, N], details) of host rollouts tokens [P, N, M] with lengths [P, N] against the P answers.

    Details: the decoded texts, `zeroed_at_cap` [P, N] (responses that reached the cap M and scored 0 under
    verifier.zero_truncated, as verl's zero_reward_on_max_response_length) and the verifier's statistics.
    """
    num_prompts, num_samples = lengths.shape
    texts = decode_responses(self.tokenizer, tokens.reshape(num_prompts * num_samples, -1), lengths.reshape(-1))
    references = [a for a in answers for _ in range(num_samples)]
    rewards = self.verifier(texts, references).reshape(num_prompts, num_samples)
    at_cap = lengths >= tokens.shape[-1]
    if self.config.verifier.zero_truncated:
      rewards = np.where(at_cap, np.float32(0), rewards)
    return rewards.astype(np.float32), {
        "texts": texts, "zeroed_at_cap": at_cap if self.config.verifier.zero_truncated else np.zeros_like(at_cap),
        **{k: float(v) for k, v in self.verifier.last_stats.items()}}

  # ------------------------------------------------------------------------------ held-out evaluation

  def evaluate_host(self, sample, params, key, *, final: bool) -> dict[str, float]:
    """Held-out pass@k (unbiased, from the evaluation's samples per problem), majority vote, lengths.

    `sample(params, prompts, key, num_samples=, max_new_tokens=, temperature=, top_p=)` dispatches one
    sampling call (device Rollouts). Prompt chunks keep one shape: the last chunk is filled with copies of its
    first prompt (ignored). Call c of chunk starting at problem s uses key fold_in(fold_in(key, s), c).
    """
    config, e = self.config, self.config.eval
    sizes = eval_sizes(config, final)
    num_samples, samples_per_call, ks = sizes["num_samples"], sizes["samples_per_call"], sizes["ks"]
    prompt_chunk = e.prompt_chunk
    num_problems = len(self.eval_tokens)
    answers = [p.answer for p in self.eval_problems]
    counts = np.zeros(num_problems, np.int64)
    votes = [Counter() for _ in range(num_problems)]
    correct_answers = [set() for _ in range(num_problems)]
    lengths, stopped, timeouts = [], [], 0.0
    calls = []
    prompts_all = self.pad(self.eval_tokens)
    for start in range(0, num_problems, prompt_chunk):
      rows = list(range(start, min(start + prompt_chunk, num_problems)))
      rows_padded = rows + [rows[0]] * (prompt_chunk - len(rows))
      chunk = sampling.PaddedPrompts(tokens=prompts_all.tokens[rows_padded], lengths=prompts_all.lengths[rows_padded])
      for repeat in range(num_samples // samples_per_call):
        calls.append((rows, chunk, jax.random.fold_in(jax.random.fold_in(key, start), repeat)))

    def dispatch(rows, chunk, call_key):
      return rows, sample(params, chunk, call_key, num_samples=samples_per_call, max_new_tokens=e.max_new_tokens,
                          temperature=e.temperature, top_p=e.top_p)

    def consume(item):
      nonlocal timeouts
      rows, rollouts = item
      tokens, lens, stops = sharding.gather_to_host((rollouts.tokens, rollouts.lengths, rollouts.stopped))
      padded_answers = [answers[r] for r in rows] + [answers[rows[0]]] * (prompt_chunk - len(rows))
      rewards, result = self.score(padded_answers, tokens, lens)
      timeouts += float(result["verify_timeouts"])
      for i, row in enumerate(rows):
        counts[row] += int(rewards[i].sum())
        for j in range(samples_per_call):
          if result["zeroed_at_cap"][i, j]:
            continue  # scored 0 at the length cap: no vote either
          vote = math_verifier.canonical_answer(result["texts"][i * samples_per_call + j], config.verifier.answer_mode)
          if vote is not None:
            votes[row][vote] += 1
            if rewards[i, j]:
              correct_answers[row].add(vote)
      lengths.append(lens[: len(rows)])
      stopped.append(stops[: len(rows)])

    _pipelined((functools.partial(dispatch, *call) for call in calls), consume)
    pass_at = np.asarray(jnp.mean(metrics_lib.pass_at_k(num_samples, jnp.asarray(counts), list(ks)), axis=0))
    majority = [bool(v) and v.most_common(1)[0][0] in good for v, good in zip(votes, correct_answers)]
    result = {f"pass@{k}": float(v) for k, v in zip(ks, pass_at)}
    result.update({
        "pass_rate": float(counts.mean() / num_samples),
        "fraction_solved": float(np.mean(counts > 0)),
        f"maj@{num_samples}": float(np.mean(majority)),
        "mean_response_length": float(np.mean(np.concatenate(lengths))),
        "truncated_fraction": float(1.0 - np.mean(np.concatenate(stopped))),
        "verify_timeouts": timeouts,
    })
    return result

  # ------------------------------------------------------------------------------ results

  def summary_fields(self, runs, per_seed: bool = False) -> dict:
    del runs, per_seed
    return {"model_path": self.model_path, "num_train_problems": len(self.train_problems),
            "eval_num_problems": len(self.eval_problems), "eval_num_samples": self.config.eval.num_samples,
            "dropped_long_prompts": self.dropped}

  def table_title(self) -> str:
    e = self.config.eval
    return (f"Held-out problems ({len(self.eval_problems)} problems, {e.num_samples} samples each, "
            f"temperature {e.temperature}, top-p {e.top_p})")

  def expected_work(self) -> dict[str, str]:
    config = self.config
    model = config.model.path or f"a tiny random {config.model.synthetic} checkpoint written to the workdir"
    data = config.data.train_path or "synthetic arithmetic problems written to the workdir"
    problems = (f"{config.eval.num_problems} held-out problems" if config.eval.num_problems
                else "every held-out problem")
    return {"model": model, "training data": data,
            "held-out set": f"{problems} x {config.eval.num_samples} samples, up to {config.eval.max_new_tokens} "
                            "tokens each"}


def make_task(config: ml_collections.ConfigDict) -> TextTask:
  return TextTask(config)
