r"""Rollout and RL-step benchmark of the maze policy: our sampler vs recompute vs transformers' `generate`.

    python scripts/bench_rollout.py                                   # CPU: 16 x 16, prompt 60, 24 new, fp32
    python scripts/bench_rollout.py --rl_step --norecompute           # + the full RL step against torch
    python scripts/bench_rollout.py --num_prompts=32 --num_rollouts=128 --prompt_len=310 \
        --new_tokens=100 --dtype=bfloat16 --rl_step                   # the paper's maze scale (GPU)
    python scripts/bench_rollout.py --norecompute --sweep_prompts=4 \
        --sweep_rollouts=1,4,16,64 --sweep_new_tokens=8,24,72         # how cost grows with N and length
    python scripts/bench_rollout.py --nomain --nohf --sweep_prompts=16 --sweep_new_tokens=24,48,96 \
        --sweep_suffix_blocks=auto,full                               # growing vs full suffix cache
    python scripts/bench_rollout.py --roofline_only --card=H100 --num_prompts=32 --num_rollouts=128 \
        --prompt_len=310 --new_tokens=100 --dtype=bfloat16             # bytes, FLOPs, bounds only

Everything runs in one process and prints one JSON object (also written to --out after every part, with
`complete` false until the last one, so a run cut short keeps what it measured). The policy is the paper's
maze decoder (4 layers, hidden 256, FFN 1024, 4 heads, 2 KV heads, tied embeddings, RoPE theta 1e6, q/k/v
biases: `DecoderConfig()`), randomly initialised; the rollouts are in the RL layout: P distinct prompts (maze
prompts when --prompt_len = S (S + 1) + 4 for an odd S, random tokens otherwise), each continued N times.
Every sampler runs exactly --new_tokens steps (no stop tokens; `generate` gets min_new_tokens = max_new_tokens)
at temperature 1 without top-k / top-p, so all do the same work.

Parts (each is timed after compilation / warm-up; the median of --repeats runs is reported):

- `sampler`: `maxrl_jax.sampling.sample_rollouts`, jitted: the P prompts are prefilled once and their KV
  caches shared by their N rollouts; `lax.while_loop`s decode, on a suffix cache that grows by blocks of
  --suffix_block slots ("auto" by default, "full": all M slots from the first step, the earlier sampler).
- `recompute`: `sample_rollouts_recompute`, no KV cache: every step is a full forward over [P*N, L+M]
  (--recompute_repeats runs; it is the slow baseline).
- `hf_generate`: `transformers.Qwen2ForCausalLM.generate(do_sample=True, temperature=1, top_k=0)` on the
  P*N repeated prompts, same architecture, weights converted from ours (checked: `conversion_max_abs_logit_diff`
  compares the two models' logits). Needs torch and transformers; skipped otherwise.
- `rl_step` (--rl_step): our whole jitted RL step (`maxrl_jax.rl.step.make_rl_step` with the maze verifier and MaxRL
  advantages: sample + verify + advantages + teacher-forced log-probs + backward + AdamW), and our update
  alone (`maxrl_jax.rl.step.update` on fixed rollouts), against torch: `generate` + a forward / backward / AdamW step
  over the same P*N x (L+M) tokens, in micro-batches sized to the free memory on CUDA (--torch_microbatches).
- `roofline` (every run; `--roofline_only --card=H200` computes it without running anything): bytes, FLOPs
  and the time bound of each part on the card (`roofline()`), and `measured_over_bound`.
- sweeps (--sweep_rollouts, --sweep_new_tokens): sampler and generate at --sweep_prompts prompts, varying N
  (at --new_tokens) or the response length (at --num_rollouts); the sampler once per --sweep_suffix_blocks
  value (`samplers`; `sampler` is the first), generate once per point.

Every timed part reports wall-clock times (`times_s`, `median_s`) and this process's CPU time over the same
runs (`process_cpu_median_s`, all threads): on a shared CPU the latter moves less with the other load.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a clone too.

from maxrl_jax import estimators  # noqa: E402
from maxrl_jax import memory_plan
from maxrl_jax import sampling
from maxrl_jax.rl import step as step_lib
from maxrl_jax.models import decoder
from maxrl_jax.tasks.maze import env as maze

_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "P, distinct prompts.")
_NUM_ROLLOUTS = flags.DEFINE_integer("num_rollouts", 16, "N, rollouts per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 60, "L; S (S + 1) + 4 for an odd S >= 5 gives maze prompts.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 24, "M, tokens generated per rollout (fixed length).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of both stacks.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per part (the median is reported).")
_MAIN = flags.DEFINE_bool("main", True, "Time sampler, generate and recompute at P x N (--nomain: sweeps only).")
_RECOMPUTE = flags.DEFINE_bool("recompute", True, "Time the no-KV-cache recompute baseline.")
_RECOMPUTE_REPEATS = flags.DEFINE_integer("recompute_repeats", 1, "Timed runs of the (slow) recompute baseline.")
_HF = flags.DEFINE_bool("hf", True, "Time transformers' generate (when torch and transformers import).")
_RL_STEP = flags.DEFINE_bool("rl_step", False, "Also time the full RL step against generate + fwd/bwd/AdamW.")
_SWEEP_PROMPTS = flags.DEFINE_integer("sweep_prompts", 4, "P of the sweeps.")
_SWEEP_ROLLOUTS = flags.DEFINE_list("sweep_rollouts", [], "N values to sweep (at --new_tokens).")
_SWEEP_NEW_TOKENS = flags.DEFINE_list("sweep_new_tokens", [], "M values to sweep (at --num_rollouts).")
_SWEEP_REPEATS = flags.DEFINE_integer("sweep_repeats", 2, "Timed runs per sweep point.")
_SUFFIX_BLOCK = flags.DEFINE_string(
    "suffix_block", "auto", "`sample_rollouts(suffix_block=...)` of the main sampler: 'auto', 'full' or an int B "
    "(the suffix cache grows by B slots; 'full': all M slots at every step).")
_SWEEP_SUFFIX_BLOCKS = flags.DEFINE_list(
    "sweep_suffix_blocks", [], "suffix_block values timed at every sweep point (default: --suffix_block).")
_TORCH_THREADS = flags.DEFINE_integer(
    "torch_threads", 0, "torch CPU threads; 0 = the faster of 1 and one per core, probed on a short generate "
    "(on a busy machine torch's OpenMP threads can lose 3x to spinning).")
_ATTN = flags.DEFINE_string("attn_implementation", "sdpa", "transformers attention implementation.")
_TORCH_MICROBATCHES = flags.DEFINE_integer(
    "torch_microbatches", 0, "Split torch's RL update into this many forward/backward passes (gradient "
    "accumulation, one AdamW step). 0: on CUDA, as few as fit in 70% of the memory left free (measured on a "
    "probe pass of 64 sequences); on the CPU, 1.")
_CARD = flags.DEFINE_enum("card", "", ["", *sorted(memory_plan.CARDS)],
                          "Card of the roofline figures; '' = from the JAX device kind (none on a CPU).")
_ROOFLINE_ONLY = flags.DEFINE_bool("roofline_only", False, "Print the roofline of the main point and the sweep "
                                   "points (needs --card) and exit: nothing is run.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the weights, prompts and sampling keys.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")


def _load() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[Any], Any] = jax.block_until_ready) -> dict:
  """Runs fn `repeats` times (already warm) and returns the run times, their median and the load."""
  times, cpu_times, load_before = [], [], _load()
  for _ in range(repeats):
    start, cpu_start = time.perf_counter(), time.process_time()
    sync(fn())
    times.append(time.perf_counter() - start)
    cpu_times.append(time.process_time() - cpu_start)
  return {"times_s": [round(t, 4) for t in times], "median_s": round(statistics.median(times), 4),
          "process_cpu_median_s": round(statistics.median(cpu_times), 4),
          "load_before": load_before, "load_after": _load()}


def parse_suffix_block(value: str) -> int | str:
  """'auto' / 'full' / an int, as `sample_rollouts(suffix_block=...)` takes it."""
  value = str(value).strip()
  if value in ("auto", "full"):
    return value
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"suffix_block must be 'auto', 'full' or an int, got {value!r}.") from None


# ------------------------------------------------------------------------------------------------ setup


def _maze_size(prompt_len: int) -> int | None:
  for size in range(5, 64, 2):
    if maze.prompt_length(size) == prompt_len:
      return size
  return None


def make_prompts(key: jax.Array, num_prompts: int, prompt_len: int) -> tuple[jax.Array, jax.Array | None]:
  """(prompts [P, L] int32, maze grids [P, S, S] or None): maze prompts when L fits a maze size."""
  size = _maze_size(prompt_len)
  if size is None:
    return jax.random.randint(key, (num_prompts, prompt_len), 4, 17, jnp.int32), None
  grids = maze.generate_mazes(key, num_prompts, size)
  return maze.encode_prompts(grids), grids


def decoder_config(dtype: str) -> decoder.DecoderConfig:
  return decoder.DecoderConfig(dtype=dtype)  # The paper's maze policy.


def _versions() -> dict:
  import flax
  import jaxlib
  import optax

  out = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
         "flax": flax.__version__, "optax": optax.__version__}
  try:
    import torch
    import transformers

    out.update(torch=torch.__version__, transformers=transformers.__version__)
  except ImportError:
    pass
  return out


def _hardware() -> dict:
  device = jax.devices()[0]
  cpu_model = platform.processor()
  try:
    with open("/proc/cpuinfo") as f:
      cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"jax_backend": jax.default_backend(), "device_kind": device.device_kind,
          "num_devices": jax.device_count(), "cpu_model": cpu_model, "cpu_count": os.cpu_count()}


# ------------------------------------------------------------------------------------------------ ours


def bench_sampler(model_fns, params, prompts, *, num_rollouts: int, new_tokens: int, repeats: int,
                  recompute: bool = False, suffix_block: int | str = "auto") -> dict:
  """Compile (timed separately), one warm-up run, then `repeats` timed runs of one of our samplers."""
  if recompute:
    sample = sampling.sample_rollouts_recompute
  else:
    sample = functools.partial(sampling.sample_rollouts, suffix_block=suffix_block)
  fn = jax.jit(lambda p, x, k: sample(model_fns, p, x, k, num_rollouts=num_rollouts, max_new_tokens=new_tokens,
                                      temperature=1.0, stop_tokens=()))
  key = jax.random.key(_SEED.value + 1)
  start = time.perf_counter()
  compiled = fn.lower(params, prompts, key).compile()
  compile_s = time.perf_counter() - start
  if not recompute:  # Warm-up (the recompute baseline is too slow to run twice).
    rollouts = jax.block_until_ready(compiled(params, prompts, key))
    assert int(rollouts.num_steps) == new_tokens and bool(jnp.all(rollouts.lengths == new_tokens))
  keys = iter(jax.random.split(key, repeats))
  result = _timed(lambda: compiled(params, prompts, next(keys)), repeats)
  num_new = prompts.shape[0] * num_rollouts * new_tokens
  result.update(compile_s=round(compile_s, 2), new_tokens_per_s=round(num_new / result["median_s"], 1))
  if not recompute:
    result.update(suffix_block=suffix_block, suffix_sizes=list(sampling.suffix_windows(new_tokens, suffix_block)))
  return result


def bench_rl_step(model_fns, params, grids, *, num_rollouts: int, new_tokens: int, repeats: int) -> dict:
  """Our full jitted RL step, and our policy update alone on fixed rollouts."""
  hyper = step_lib.Hyper(learning_rate=1e-4, b1=0.9, b2=0.95, weight_decay=0.0)
  spec = step_lib.RLSpec(num_samples=num_rollouts, max_new_tokens=new_tokens, stop_tokens=(),  # Fixed length,
                         reduction="sequence_sum", grad_clip=1.0)                              # as generate.
  tx = step_lib.rl_optimizer(hyper, spec)
  maxrl = estimators.get_advantage_fn("maxrl")
  advantage_fn = lambda rewards, h: maxrl(rewards)
  rl_step = step_lib.make_rl_step(spec, model_fns, hyper, prompt_fn=maze.encode_prompts,
                                  verifier=maze.verify_groups, advantage_fn=advantage_fn)
  init = jax.jit(lambda p: step_lib.init_state(p, tx))
  temperature = jnp.float32(1.0)
  key = jax.random.key(_SEED.value + 2)
  start = time.perf_counter()
  compiled = rl_step.lower(init(params), grids, key, temperature).compile()
  compile_s = time.perf_counter() - start
  state = [init(params)]
  keys = iter(jax.random.split(key, repeats + 1))

  def step():
    state[0], metrics = compiled(state[0], grids, next(keys), temperature)
    return metrics

  jax.block_until_ready(step())  # Warm-up.
  full = _timed(step, repeats)
  full["compile_s"] = round(compile_s, 2)

  # The update alone (teacher-forced log-probs with the shared prompt pass, backward, AdamW).
  prompts = maze.encode_prompts(grids)
  rollouts = sampling.sample_rollouts(model_fns, params, prompts, key, num_rollouts=num_rollouts,
                                      max_new_tokens=new_tokens, stop_tokens=())
  rewards = maze.verify_groups(grids, rollouts.tokens)
  update = jax.jit(lambda s, r: step_lib.update(spec, model_fns, s, prompts, rollouts, r, temperature, hyper,
                                                advantage_fn=advantage_fn), donate_argnums=0)
  update_compiled = update.lower(init(params), rewards).compile()
  ustate = [init(params)]

  def update_step():
    ustate[0], metrics = update_compiled(ustate[0], rewards)
    return metrics

  jax.block_until_ready(update_step())  # Warm-up.
  return {"full_step": full, "update_only": _timed(update_step, repeats)}


# ------------------------------------------------------------------------------------------------ transformers


def hf_state_dict(params: dict, config: decoder.DecoderConfig) -> dict:
  """Our parameter tree as a Qwen2ForCausalLM state dict (numpy): kernels transposed, names mapped."""
  p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  out = {"model.embed_tokens.weight": p["embed_tokens"]["embedding"], "model.norm.weight": p["norm"]["scale"]}
  if not config.tie_embeddings:
    out["lm_head.weight"] = p["lm_head"]["kernel"].T
  for i in range(config.num_layers):
    layer, prefix = p[f"layers_{i}"], f"model.layers.{i}."
    out[prefix + "input_layernorm.weight"] = layer["input_layernorm"]["scale"]
    out[prefix + "post_attention_layernorm.weight"] = layer["post_attention_layernorm"]["scale"]
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out[prefix + f"self_attn.{name}.weight"] = layer["self_attn"][name]["kernel"].T
      if "bias" in layer["self_attn"][name]:
        out[prefix + f"self_attn.{name}.bias"] = layer["self_attn"][name]["bias"]
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[prefix + f"mlp.{name}.weight"] = layer["mlp"][name]["kernel"].T
  return out


def make_hf_model(params: dict, config: decoder.DecoderConfig, torch_dtype, device):
  """A transformers Qwen2ForCausalLM with our architecture and weights."""
  import torch
  from transformers import Qwen2Config, Qwen2ForCausalLM

  if (not config.attention_bias or config.qk_norm or getattr(config, "rope_scaling", None) is not None
      or getattr(config, "o_proj_bias", False) or getattr(config, "mlp_bias", False)):
    raise ValueError("Qwen2 has q/k/v biases only, no q/k norm and plain RoPE; the config must match.")
  kwargs = dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.ffn_size,
                num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_kv_heads, max_position_embeddings=config.max_positions,
                rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=config.tie_embeddings,
                use_sliding_window=False, bos_token_id=maze.BOS, eos_token_id=[maze.DONE, maze.EOS],
                pad_token_id=maze.PAD)
  if "rope_parameters" in inspect.signature(Qwen2Config.__init__).parameters:  # transformers >= 5
    kwargs["rope_parameters"] = {"rope_type": "default", "rope_theta": config.rope_theta}
  else:
    kwargs["rope_theta"] = config.rope_theta
  hf_config = Qwen2Config(**kwargs)
  hf_config._attn_implementation = _ATTN.value
  model = Qwen2ForCausalLM(hf_config)
  state = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in hf_state_dict(params, config).items()}
  missing, unexpected = model.load_state_dict(state, strict=False)
  missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_embeddings)]
  if missing or unexpected:
    raise ValueError(f"weight conversion: missing {missing}, unexpected {unexpected}")
  if config.tie_embeddings:
    model.tie_weights()
  return model.to(device=device, dtype=torch_dtype).eval()


def _torch_sync(device):
  import torch

  def sync(x):
    if device.type == "cuda":
      torch.cuda.synchronize()
    return x

  return sync


def hf_generate_fn(model, prompts_np: np.ndarray, num_rollouts: int, new_tokens: int, device):
  import torch

  input_ids = torch.from_numpy(np.repeat(prompts_np, num_rollouts, axis=0)).to(device)  # [P*N, L], row p*N + n
  attention_mask = torch.ones_like(input_ids)

  def generate(max_new_tokens: int = new_tokens):
    with torch.no_grad():  # Not inference_mode: the RL step trains on the generated tensor.
      return model.generate(input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_k=0,
                            top_p=1.0, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)

  return generate


def bench_hf_generate(model, prompts_np, *, num_rollouts: int, new_tokens: int, repeats: int, device) -> dict:
  generate = hf_generate_fn(model, prompts_np, num_rollouts, new_tokens, device)
  sync = _torch_sync(device)
  sync(generate(min(new_tokens, 4)))  # Warm-up: the prefill of every sequence and a few decode steps.
  out = generate()
  assert tuple(out.shape) == (prompts_np.shape[0] * num_rollouts, prompts_np.shape[1] + new_tokens), out.shape
  result = _timed(generate, repeats, sync)
  num_new = prompts_np.shape[0] * num_rollouts * new_tokens
  result["new_tokens_per_s"] = round(num_new / result["median_s"], 1)
  return result


def torch_policy_gradient_step(model, optimizer, sequences, advantages, prompt_len: int, microbatches: int):
  """One policy-gradient step on sequences [B, L+M] (int64) with advantages [B]: forward over [b, L+M-1] for
  each of `microbatches` parts of the batch (gradients accumulated), then clip to norm 1 and one AdamW step.

  The loss is -sum_b A_b sum_t log p(token_t) / B over the M response tokens, whatever the split, so the step
  does not depend on `microbatches` (up to round-off). Returns the last part's loss.
  """
  import torch

  optimizer.zero_grad(set_to_none=True)
  loss = None
  for part, part_advantages in zip(sequences.chunk(microbatches), advantages.chunk(microbatches)):
    logits = model(part[:, :-1]).logits[:, prompt_len - 1:]  # [b, M, V]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, part[:, prompt_len:, None])[..., 0]
    loss = -(part_advantages[:, None] * logp).sum(-1).sum() / sequences.shape[0]
    loss.backward()
    del logits, logp
  torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
  optimizer.step()
  return loss


def choose_torch_microbatches(bytes_per_sequence: float, num_sequences: int, free_bytes: float,
                              fraction: float = 0.7) -> int:
  """Fewest forward/backward parts such that one part's activations (ceil(B / parts) x bytes_per_sequence)
  use at most `fraction` of `free_bytes`. At least 1; at most B (one sequence per part)."""
  budget = max(fraction * free_bytes, 1.0)
  for parts in range(1, num_sequences + 1):
    if math.ceil(num_sequences / parts) * bytes_per_sequence <= budget:
      return parts
  return num_sequences


def auto_torch_microbatches(model, optimizer, sequences, prompt_len: int, device) -> dict:
  """On CUDA: measures the peak memory of a forward/backward over a few sequences and picks the parts for
  the free memory left beside JAX (`choose_torch_microbatches`); elsewhere 1. Leaves no gradients behind."""
  import torch

  if device.type != "cuda":
    return {"microbatches": 1, "reason": "not CUDA"}
  probe = sequences[:min(64, sequences.shape[0])]
  optimizer.zero_grad(set_to_none=True)
  torch.cuda.synchronize()
  torch.cuda.empty_cache()
  base = torch.cuda.memory_allocated()
  torch.cuda.reset_peak_memory_stats()
  logits = model(probe[:, :-1]).logits[:, prompt_len - 1:]
  logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, probe[:, prompt_len:, None])[..., 0]
  logp.sum().backward()
  del logits, logp
  torch.cuda.synchronize()
  per_sequence = (torch.cuda.max_memory_allocated() - base) / probe.shape[0]
  optimizer.zero_grad(set_to_none=True)
  torch.cuda.empty_cache()
  free = torch.cuda.mem_get_info()[0]
  parts = choose_torch_microbatches(per_sequence, sequences.shape[0], free)
  return {"microbatches": parts, "probe_sequences": int(probe.shape[0]),
          "bytes_per_sequence": int(per_sequence), "free_bytes": int(free)}


def bench_torch_rl_step(model, prompts_np, *, num_rollouts: int, new_tokens: int, repeats: int, device) -> dict:
  """generate, then one policy-gradient step (`torch_policy_gradient_step`): forward over [P*N, L+M-1] in
  micro-batches (--torch_microbatches, 0 = sized to the free memory), backward, clip, AdamW."""
  import torch

  generate = hf_generate_fn(model, prompts_np, num_rollouts, new_tokens, device)
  sync = _torch_sync(device)
  prompt_len = prompts_np.shape[1]
  optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
  generator = torch.Generator().manual_seed(_SEED.value)
  num_sequences = prompts_np.shape[0] * num_rollouts
  warm_up = torch.from_numpy(
      np.random.RandomState(0).randint(4, 17, (num_sequences, prompt_len + new_tokens))).to(device)
  if _TORCH_MICROBATCHES.value > 0:
    split = {"microbatches": _TORCH_MICROBATCHES.value, "reason": "--torch_microbatches"}
  else:
    split = auto_torch_microbatches(model, optimizer, warm_up, prompt_len, device)
  microbatches = split["microbatches"]

  def update(sequences):
    advantages = torch.randn(sequences.shape[0], generator=generator).to(device)  # Cost as real advantages.
    return torch_policy_gradient_step(model, optimizer, sequences, advantages, prompt_len, microbatches)

  sync(update(warm_up))  # Warm-up of the update (generate is already warm).
  del warm_up
  gen_times, update_times, total_times = [], [], []
  load_before = _load()
  for _ in range(repeats):
    start = time.perf_counter()
    sequences = sync(generate())
    middle = time.perf_counter()
    sync(update(sequences))
    end = time.perf_counter()
    gen_times.append(middle - start)
    update_times.append(end - middle)
    total_times.append(end - start)
  med = lambda xs: round(statistics.median(xs), 4)
  result = {"generate_median_s": med(gen_times), "update_median_s": med(update_times), "median_s": med(total_times),
            "times_s": [round(t, 4) for t in total_times], "microbatches": microbatches, "split": split,
            "load_before": load_before, "load_after": _load()}
  if device.type == "cuda":
    result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
  return result


def probe_torch_threads(model, prompts_np, num_rollouts: int, device) -> dict:
  """Sets torch's CPU threads to the faster of 1 and one per core on a 4-token generate (prefill included)."""
  import torch

  generate = hf_generate_fn(model, prompts_np, num_rollouts, 4, device)
  generate()  # Warm-up.
  times = {}
  for threads in sorted({1, os.cpu_count() or 1}):
    torch.set_num_threads(threads)
    start = time.perf_counter()
    generate()
    times[threads] = round(time.perf_counter() - start, 4)
  torch.set_num_threads(min(times, key=times.get))
  return times


def conversion_error(model_fns, params, model, tokens: np.ndarray, device) -> float:
  """Max |logits_ours - logits_hf| on `tokens` [B, T] (same dtype in both stacks)."""
  import torch

  ours = np.asarray(model_fns.forward(params, jnp.asarray(tokens)), np.float32)
  with torch.inference_mode():
    theirs = model(torch.from_numpy(tokens).to(device)).logits.float().cpu().numpy()
  return float(np.max(np.abs(ours - theirs)))


# ------------------------------------------------------------------------------------------------ roofline


def sampler_blocks_cost(config: decoder.DecoderConfig, workload: memory_plan.Workload,
                        suffix_block: int | str = "auto") -> memory_plan.Cost:
  """The sampler with its growing suffix cache: at step s the attention reads the W(s) slots of the cache
  of that segment (`sampling.suffix_windows`) instead of the s filled ones; built from the "filled" cost,
  whose steps s = 1 .. M - 1 grow linearly in s (bytes and FLOPs per slot read from two consecutive steps).
  The copies that grow the cache (once per segment) are not counted."""
  filled = memory_plan.sampling_cost(config, workload, suffix="filled")
  prefill, steps = filled.steps[0], filled.steps[1:]
  M = workload.max_new_tokens
  if len(steps) < 2 or len(steps) != M - 1 or any(count != 1 for count, _, _ in steps):
    return filled
  (_, flops_1, bytes_1), (_, flops_2, bytes_2) = steps[0], steps[1]
  windows = sampling.suffix_windows(M, suffix_block)
  out = [prefill]
  for s, (count, flops, bytes_) in zip(range(1, M), steps):
    extra = next(w for w in windows if w >= s) - s
    out.append((count, flops + extra * (flops_2 - flops_1), bytes_ + extra * (bytes_2 - bytes_1)))
  return memory_plan.Cost(tuple(out))


def roofline(config: decoder.DecoderConfig, num_prompts: int, num_rollouts: int, prompt_len: int, new_tokens: int,
             card: memory_plan.Card | None, suffix_block: int | str = "auto") -> dict:
  """Bytes, FLOPs and the time bound of each timed part at P x N x (L + M) (`maxrl_jax.memory_plan`).

  - `sampler_implemented`: our sampler with `suffix_block="full"`: per decode step the weights (float32
    storage), the shared prefix cache [P, L] once, the suffix cache over ALL M preallocated slots of every
    row, one new slot and the [P N, V] float32 logits; FLOPs of every projection, attention over L + M keys
    and the lm head.
  - `sampler_filled`: the same, reading only the suffix slots written so far (L + s keys at step s).
  - `sampler_blocks`: the sampler with its growing suffix cache (`suffix_block`, "auto" by default): L + W(s)
    keys at step s, W(s) the cache size of that step's segment (`sampler_blocks_cost`).
  - `generate_ideal`: a per-sequence KV cache (transformers' layout) at its minimum: prefill of all P N
    prompts, then every row reads its own L + s cached tokens per step (no copies of the cache).
  - `recompute`: M full forwards over [P N, L + M].
  - `update`: our update (prompt pass once per prompt, teacher-forced pass over [P, N, M - 1], backward = 2x
    forward, AdamW); `rl_step` = sampler_implemented + update.

  With a `card`, each part also gets its bound in seconds: the sum over steps of max(FLOPs / peak, bytes /
  bandwidth) at the card's dense bf16 peak and HBM bandwidth.
  """
  w = memory_plan.Workload(num_prompts, num_rollouts, prompt_len, new_tokens)
  costs = {
      "sampler_implemented": memory_plan.sampling_cost(config, w),
      "sampler_filled": memory_plan.sampling_cost(config, w, suffix="filled"),
      "sampler_blocks": sampler_blocks_cost(config, w, suffix_block),
      "generate_ideal": memory_plan.generate_cost(config, w),
      "recompute": memory_plan.recompute_cost(config, w),
      "update": memory_plan.update_cost(config, w),
  }
  costs["rl_step"] = costs["sampler_implemented"] + costs["update"]
  out: dict[str, Any] = {"card": None if card is None else {
      "name": card.name, "hbm_tb_s": card.bandwidth / 1e12, "bf16_dense_tflop_s": card.flops / 1e12}}
  out.update({name: cost.summary(card) for name, cost in costs.items()})
  return out


def _measured_over_bound(report: dict, roof: dict) -> dict:
  """measured median / roofline bound of every part that was timed and bounded."""
  rl = report.get("rl_step", {})
  measured = {
      "sampler_vs_implemented": (report.get("sampler"), "sampler_implemented"),
      "sampler_vs_filled": (report.get("sampler"), "sampler_filled"),
      "sampler_vs_blocks": (report.get("sampler"), "sampler_blocks"),
      "generate_vs_ideal": (report.get("hf_generate"), "generate_ideal"),
      "recompute": (report.get("recompute"), "recompute"),
      "update": (rl.get("ours", {}).get("update_only"), "update"),
      "rl_step": (rl.get("ours", {}).get("full_step"), "rl_step"),
  }
  out = {}
  for name, (part, key) in measured.items():
    bound = roof.get(key, {}).get("bound_s")
    if part and "median_s" in part and bound:
      out[name] = round(part["median_s"] / bound, 2)
  return out


def _card() -> memory_plan.Card | None:
  if _CARD.value:
    return memory_plan.CARDS[_CARD.value]
  return memory_plan.card_for_device_kind(jax.devices()[0].device_kind)


# ------------------------------------------------------------------------------------------------ main


def _ratio(a: dict | None, b: dict | None, key: str = "median_s", key_b: str | None = None) -> float | None:
  key_b = key_b or key
  if not a or not b or key not in a or key_b not in b:
    return None
  return round(a[key] / b[key_b], 2)


def length_growth(sweeps: list[dict], num_rollouts: int) -> dict:
  """{suffix_block: {"M2/M1": sampler time at M2 / time at M1}} over consecutive response lengths of the
  sweep points at `num_rollouts` rollouts."""
  out = {}
  points = sorted((p for p in sweeps if p["num_rollouts"] == num_rollouts), key=lambda p: p["new_tokens"])
  for block in (points[0]["samplers"] if points else {}):
    out[block] = {f"{b['new_tokens']}/{a['new_tokens']}": _ratio(b["samplers"].get(block), a["samplers"].get(block))
                  for a, b in zip(points, points[1:])}
  return out


def _attempt(fn: Callable[[], dict]) -> dict:
  """fn(), or {"error": ...} if it fails (e.g. out of memory), so that one failed part keeps the others."""
  try:
    return fn()
  except Exception as e:  # noqa: BLE001 - reported in the JSON, the run goes on.
    print(f"[bench] failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    return {"error": f"{type(e).__name__}: {str(e)[:500]}"}


def _format_json(report: dict) -> str:
  """Indented JSON with lists of numbers kept on one line."""
  text = json.dumps(report, indent=1)
  inline = lambda match: "[" + ", ".join(match.group(1).split()).replace(",,", ",") + "]"
  return re.sub(r"\[\s*([-0-9.e,\s]*?)\s*\]", inline, text)


def _save(report: dict, complete: bool = False) -> str:
  """Writes the report to --out (atomically) and returns its text; `complete` is False until the last part."""
  report["complete"] = complete
  text = _format_json(report)
  if _OUT.value:
    with open(_OUT.value + ".tmp", "w") as f:
      f.write(text + "\n")
    os.replace(_OUT.value + ".tmp", _OUT.value)
  return text


def _setup_torch(report: dict, params, config, prompts_np: np.ndarray, num_rollouts: int):
  """(model, device) of the transformers baseline, or (None, None) when torch / transformers are missing."""
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError as e:
    report["hf_generate"] = {"skipped": f"torch / transformers not importable: {e}"}
    return None, None
  torch.manual_seed(_SEED.value)
  use_cuda = jax.default_backend() == "gpu" and torch.cuda.is_available()
  device = torch.device("cuda" if use_cuda else "cpu")
  model = make_hf_model(params, config, torch.bfloat16 if _DTYPE.value == "bfloat16" else torch.float32, device)
  if _TORCH_THREADS.value:
    torch.set_num_threads(_TORCH_THREADS.value)
  elif device.type == "cpu":
    report["torch_thread_probe_s"] = probe_torch_threads(model, prompts_np, num_rollouts, device)
  report["torch_setup"] = {"attn_implementation": _ATTN.value, "torch_threads": torch.get_num_threads(),
                           "torch_device": str(device)}
  return model, device


def main(argv):
  del argv
  start_time = time.time()
  P, N, L, M = _NUM_PROMPTS.value, _NUM_ROLLOUTS.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  config = decoder_config(_DTYPE.value)
  suffix_block = parse_suffix_block(_SUFFIX_BLOCK.value)
  sweep_blocks = list(dict.fromkeys(parse_suffix_block(b) for b in _SWEEP_SUFFIX_BLOCKS.value)) or [suffix_block]
  if L + M > config.max_positions:
    raise ValueError(f"prompt_len + new_tokens = {L + M} > max_positions = {config.max_positions}.")
  # Sweep points in order, each once: N values at --new_tokens, then M values at --num_rollouts.
  sweep_points = list(dict.fromkeys([(int(n), M) for n in _SWEEP_ROLLOUTS.value]
                                    + [(N, int(m)) for m in _SWEEP_NEW_TOKENS.value]))
  card = _card()
  if _ROOFLINE_ONLY.value:
    if card is None:
      raise ValueError("--roofline_only needs --card (or an accelerator whose kind is one of "
                       f"{sorted(memory_plan.CARDS)}).")
    rows = {"setup": {"num_prompts": P, "num_rollouts": N, "prompt_len": L, "new_tokens": M, "dtype": _DTYPE.value},
            "roofline": roofline(config, P, N, L, M, card, suffix_block),
            "sweeps": [{"num_prompts": _SWEEP_PROMPTS.value, "num_rollouts": n, "new_tokens": m,
                        "roofline": roofline(config, _SWEEP_PROMPTS.value, n, L, m, card, sweep_blocks[0])}
                       for n, m in sweep_points]}
    text = _format_json(rows)
    print(text)
    if _OUT.value:
      with open(_OUT.value, "w") as f:
        f.write(text + "\n")
    return
  model_fns = decoder.DecoderFns(config)
  params = model_fns.init(jax.random.key(_SEED.value))
  prompts, grids = make_prompts(jax.random.key(_SEED.value + 3), P, L)
  prompts_np = np.asarray(prompts, np.int64)
  log = lambda message: print(f"[bench] {message}", file=sys.stderr, flush=True)

  report: dict[str, Any] = {
      "command": " ".join(["python"] + sys.argv),
      "setup": {"num_prompts": P, "num_rollouts": N, "sequences": P * N, "prompt_len": L, "new_tokens": M,
                "new_tokens_total": P * N * M, "dtype": _DTYPE.value, "maze_size": _maze_size(L),
                "model_params": decoder.count_params(config), "repeats": _REPEATS.value,
                "suffix_block": suffix_block},
      "hardware": _hardware(), "versions": _versions(), "load_at_start": _load(),
  }
  model = device = None
  if _HF.value:
    model, device = _setup_torch(report, params, config, prompts_np, N)
  if model is not None:
    check = np.concatenate([prompts_np[:2], np.random.RandomState(0).randint(4, 17, (2, M))], axis=1)
    report["conversion_max_abs_logit_diff"] = conversion_error(model_fns, params, model, check, device)

  if _MAIN.value:
    log(f"sampler: P={P} N={N} L={L} M={M} {_DTYPE.value}")
    report["sampler"] = _attempt(lambda: bench_sampler(model_fns, params, prompts, num_rollouts=N, new_tokens=M,
                                                       repeats=_REPEATS.value, suffix_block=suffix_block))
    _save(report)
    if model is not None:
      log("transformers generate")
      report["hf_generate"] = _attempt(lambda: bench_hf_generate(model, prompts_np, num_rollouts=N, new_tokens=M,
                                                                 repeats=_REPEATS.value, device=device))
      _save(report)
    if _RECOMPUTE.value:
      log("recompute baseline")
      report["recompute"] = _attempt(lambda: bench_sampler(model_fns, params, prompts, num_rollouts=N, new_tokens=M,
                                                           repeats=_RECOMPUTE_REPEATS.value, recompute=True))
      _save(report)
    report["ratios"] = {
        "generate_s_over_sampler_s": _ratio(report.get("hf_generate"), report["sampler"]),
        "recompute_s_over_sampler_s": _ratio(report.get("recompute"), report["sampler"]),
    }

  if _RL_STEP.value:
    if grids is None:
      report["rl_step"] = {"skipped": f"--prompt_len={L} is not a maze prompt length (S (S + 1) + 4, odd S)."}
    else:
      log("RL step (ours)")
      ours = _attempt(lambda: bench_rl_step(model_fns, params, grids, num_rollouts=N, new_tokens=M,
                                            repeats=_REPEATS.value))
      report["rl_step"] = {"ours": ours}
      _save(report)
      if model is not None:
        log("RL step (torch)")
        theirs = _attempt(lambda: bench_torch_rl_step(model, prompts_np, num_rollouts=N, new_tokens=M,
                                                      repeats=_REPEATS.value, device=device))
        report["rl_step"]["torch"] = theirs
        report["rl_step"]["torch_s_over_ours_s"] = _ratio(theirs, ours.get("full_step"))
        report["rl_step"]["torch_update_s_over_our_update_s"] = _ratio(theirs, ours.get("update_only"),
                                                                       "update_median_s", "median_s")

  if sweep_points:
    sweep_prompts, _ = make_prompts(jax.random.key(_SEED.value + 4), _SWEEP_PROMPTS.value, L)
    report["sweeps"] = []
    for n, m in sweep_points:
      log(f"sweep P={_SWEEP_PROMPTS.value} N={n} M={m}")
      sizes = {"num_rollouts": n, "new_tokens": m, "repeats": _SWEEP_REPEATS.value}
      samplers = {}
      for block in sweep_blocks:
        samplers[str(block)] = _attempt(functools.partial(bench_sampler, model_fns, params, sweep_prompts,
                                                          suffix_block=block, **sizes))
      first = samplers[str(sweep_blocks[0])]
      point = {"num_prompts": _SWEEP_PROMPTS.value, "num_rollouts": n, "new_tokens": m, "sampler": first,
               "samplers": samplers,
               "sampler_s_over_first": {name: _ratio(result, first) for name, result in samplers.items()}}
      if model is not None:
        point["hf_generate"] = _attempt(functools.partial(
            bench_hf_generate, model, np.asarray(sweep_prompts, np.int64), device=device, **sizes))
        point["generate_s_over_sampler_s"] = _ratio(point["hf_generate"], point["sampler"])
      point["roofline"] = roofline(config, _SWEEP_PROMPTS.value, n, L, m, card, sweep_blocks[0])
      point["measured_over_bound"] = _measured_over_bound(point, point["roofline"])
      report["sweeps"].append(point)
      _save(report)
    report["length_growth"] = length_growth(report["sweeps"], N)

  if _MAIN.value or _RL_STEP.value:
    report["roofline"] = roofline(config, P, N, L, M, card, suffix_block)
    report["measured_over_bound"] = _measured_over_bound(report, report["roofline"])

  # Targets: sampling >= 5x generate and an RL step <= 0.5 s on a GPU at the paper's maze scale; >= 3x
  # generate on a CPU at the default size.
  on_gpu = jax.default_backend() == "gpu"
  targets = {}
  ratio = report.get("ratios", {}).get("generate_s_over_sampler_s")
  if ratio is not None:
    targets["sampler_vs_generate"] = {"at_least": 5.0 if on_gpu else 3.0, "measured": ratio,
                                      "met": ratio >= (5.0 if on_gpu else 3.0)}
  step_s = report.get("rl_step", {}).get("ours", {}).get("full_step", {}).get("median_s")
  if on_gpu and step_s is not None:
    targets["rl_step_s"] = {"at_most": 0.5, "measured": step_s, "met": step_s <= 0.5}
  # The sampler at the paper's scale (100 new tokens) within 0.04 s, and 200 tokens within 2.2x the time of 100.
  sampler_s = report.get("sampler", {}).get("median_s")
  if on_gpu and sampler_s is not None:
    targets["sampler_s"] = {"at_most": 0.04, "measured": sampler_s, "met": sampler_s <= 0.04}
  growth = report.get("length_growth", {}).get(str(sweep_blocks[0]), {}).get("200/100")
  if on_gpu and growth is not None:
    targets["sampler_200_over_100_tokens"] = {"at_most": 2.2, "measured": growth, "met": growth <= 2.2,
                                              "suffix_block": sweep_blocks[0]}
  # Whether this run is at the size the targets are stated for: the paper's maze scale (GPU), the default (CPU).
  setup = (P, N, L, M, _DTYPE.value)
  targets["setup_matches_paper_scale"] = setup == (32, 128, 310, 100, "bfloat16")
  if not on_gpu:
    targets["setup_matches_cpu_default"] = setup == (16, 16, 60, 24, "float32")
  report["targets"] = targets
  report["load_at_end"] = _load()
  report["wall_time_s"] = round(time.time() - start_time, 1)
  print(_save(report, complete=True))


if __name__ == "__main__":
  app.run(main)
