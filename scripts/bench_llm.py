r"""Our sampler and micro-batched RL update against transformers / torch on LLM-sized policies (random weights).

    python scripts/bench_llm.py --model=smollm2-360m          # 64 prompts x 16 rollouts x (256 + 1024), bf16
    python scripts/bench_llm.py --model=qwen3-1.7b --sample_calls=1 --update_prompts=4 --generate_calls=1
    python scripts/bench_llm.py --model=tiny --num_prompts=2 --num_rollouts=2 --prompt_len=8 --new_tokens=8

Models (random weights, nothing downloaded; architectures from `maxrl_jax.memory_plan`, which checks them
against `hf_loading.decoder_config_from_hf` of the published config.json values): `smollm2-360m` (Llama,
361.8M), `qwen3-1.7b` (Qwen3, 1.72B), `tiny` (a 2-layer Llama of 0.09M parameters for tests). Compute in
--dtype (bf16) with float32 master weights (--param_dtype), as the trainers; logits float32.

Two stacks, each in a process of its own so that each has the whole accelerator (--stack=both runs them one
after the other and merges their JSON):

- jax: `maxrl_jax.sampling.sample_rollouts` over calls of `sample_chunk` prompts x N rollouts (the largest
  call `memory_plan.choose` fits in the device memory, or --sample_chunk_prompts), every rollout exactly M
  tokens (no stop tokens); then `maxrl_jax.rl.step.update` with micro-batches (from the plan, or
  --micro_batch_prompts / --micro_batch_rollouts) on fixed random rollouts of --update_prompts prompts.
- torch: transformers `generate(do_sample=True, temperature=1, top_k=0, min_new_tokens=max_new_tokens=M)` on
  the repeated prompts in calls of --generate_rows rows (default: as many rows as our sampling call), fp32
  weights under bf16 autocast; then forward / backward over [rows, L+M-1] in parts of
  --torch_microbatch_rows rows (default: our micro-batch's rows), clip, AdamW.

Timing: each jitted function is compiled ahead of time (compile_s) and each torch part warmed up on a short
call; then --repeats timed runs, the median reported. Sampling calls run one after another, as do
micro-batches, so a step's time is linear in their number: --sample_calls / --generate_calls time that many
calls and --update_prompts that many prompts, and `step_s` extrapolates to all P prompts
(`step_s_measured_part` says which share was run). Memory: JAX's peak bytes in use and XLA's compiled sizes;
torch's max_memory_allocated. The roofline of each part (`maxrl_jax.memory_plan`) is given for the card
(--card, or the device kind). Prints one JSON object (also written to --out, after every part); `targets`
states the target (our sampler >= 3x `generate` for SmolLM2-360M at the default sizes on an accelerator) and
whether it was met.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Runs as a script.

_MODEL = flags.DEFINE_enum("model", "tiny", ["tiny", "smollm2-360m", "qwen3-1.7b"], "Policy architecture.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 64, "P, distinct prompts of one RL step.")
_NUM_ROLLOUTS = flags.DEFINE_integer("num_rollouts", 16, "N, rollouts per prompt.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 256, "L, prompt tokens.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 1024, "M, tokens generated per rollout (fixed length).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype (both stacks).")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16"], "Weight storage (both stacks).")
_STACK = flags.DEFINE_enum("stack", "both", ["both", "jax", "torch"], "both: each stack in its own process.")
_PARTS = flags.DEFINE_list("parts", ["sample", "update"], "sample and/or update (both stacks).")
_SAMPLE_CHUNK = flags.DEFINE_integer("sample_chunk_prompts", 0, "Prompts per sampling call; 0: the plan's.")
_SAMPLE_CALLS = flags.DEFINE_integer("sample_calls", 0, "Sampling calls timed (0: all P / chunk).")
_MB_PROMPTS = flags.DEFINE_integer("micro_batch_prompts", 0, "Update micro-batch prompts; 0: the plan's.")
_MB_ROLLOUTS = flags.DEFINE_integer("micro_batch_rollouts", 0, "Update micro-batch rollouts; 0: the plan's.")
_UPDATE_PROMPTS = flags.DEFINE_integer("update_prompts", 0, "Prompts the update is timed on (0: all P).")
_GENERATE_ROWS = flags.DEFINE_integer("generate_rows", 0, "Rows per generate call; 0: our sampling call's rows.")
_GENERATE_CALLS = flags.DEFINE_integer("generate_calls", 0, "generate calls timed (0: all).")
_TORCH_MB_ROWS = flags.DEFINE_integer("torch_microbatch_rows", 0, "Rows per torch forward/backward; 0: ours.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed runs per part (the median is reported).")
_DEVICE_GIB = flags.DEFINE_float("device_memory_gib", 0.0, "Memory budget per device for the plan; 0: JAX's "
                                 "bytes_limit on an accelerator, 8 GiB on a CPU.")
_JAX_MEM_FRACTION = flags.DEFINE_float("jax_mem_fraction", 0.9, "XLA_PYTHON_CLIENT_MEM_FRACTION of the jax process "
                                       "(unless already set).")
_CARD = flags.DEFINE_string("card", "", "H100 or H200 for the roofline; '': from the device kind.")
_ATTN = flags.DEFINE_string("attn_implementation", "sdpa", "transformers attention implementation.")
_CHILD_TIMEOUT = flags.DEFINE_integer("child_timeout_s", 0, "Kill the jax process after this long (0: never).")
_TORCH_TIMEOUT = flags.DEFINE_integer("torch_timeout_s", 0, "Kill the torch process after this long (0: "
                                      "--child_timeout_s).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of weights, prompts and keys.")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here (rewritten after every part).")

GiB = 2**30


def _log(message: str) -> None:
  print(f"[bench_llm] {message}", file=sys.stderr, flush=True)


def _median(xs: list[float]) -> float:
  return round(statistics.median(xs), 4)


def _write(report: dict) -> None:
  if _OUT.value:
    tmp = _OUT.value + ".tmp"
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1)
      f.write("\n")
    os.replace(tmp, _OUT.value)


def _attempt(report: dict, name: str, fn: Callable[[], dict]) -> None:
  """report[name] = fn(), or {"error": ...}; the JSON is written after every part."""
  try:
    report[name] = fn()
  except Exception as e:  # noqa: BLE001 - recorded; the other parts still run.
    _log(f"{name} failed: {type(e).__name__}: {e}")
    report[name] = {"error": f"{type(e).__name__}: {str(e)[:800]}"}
  _write(report)


# ------------------------------------------------------------------------------------------------ model


def model_config(name: str, dtype: str, param_dtype: str, max_positions: int):
  """The DecoderConfig of --model at --dtype / --param_dtype, long enough for L + M."""
  from maxrl_jax import memory_plan
  from maxrl_jax.models import decoder

  common = {"dtype": dtype, "param_dtype": param_dtype, "max_positions": max_positions}
  if name == "tiny":
    return decoder.DecoderConfig(vocab_size=256, num_layers=2, hidden_size=64, ffn_size=128, num_heads=4,
                                 num_kv_heads=2, head_dim=16, rope_theta=10000.0, rms_norm_eps=1e-5,
                                 tie_embeddings=True, attention_bias=False, **common)
  return memory_plan.MODELS[name](**common)


def architecture(name: str) -> str:
  return "qwen3" if name.startswith("qwen3") else "llama"


class Sizes:
  """The step's sizes and how they are split into sampling calls and micro-batches."""

  def __init__(self, plan: dict | None = None):
    self.P, self.N, self.L, self.M = (_NUM_PROMPTS.value, _NUM_ROLLOUTS.value, _PROMPT_LEN.value,
                                      _NEW_TOKENS.value)
    plan = plan or {}
    self.chunk = _SAMPLE_CHUNK.value or plan.get("sample_chunk", {}).get("prompts") or self.P
    self.chunk_rollouts = self.N if _SAMPLE_CHUNK.value else plan.get("sample_chunk", {}).get("rollouts", self.N)
    self.mb = (_MB_PROMPTS.value or plan.get("micro_batch", {}).get("prompts") or self.P,
               _MB_ROLLOUTS.value or plan.get("micro_batch", {}).get("rollouts") or self.N)
    self.update_prompts = _UPDATE_PROMPTS.value or self.P
    if self.P % self.chunk or self.N % self.chunk_rollouts or self.update_prompts % self.mb[0] or self.N % self.mb[1]:
      raise ValueError(f"sizes do not divide: P={self.P}, sampling call {self.chunk} x {self.chunk_rollouts}, "
                       f"update on {self.update_prompts} prompts in micro-batches {self.mb}.")
    self.calls = (self.P // self.chunk) * (self.N // self.chunk_rollouts)
    self.sample_calls = min(_SAMPLE_CALLS.value or self.calls, self.calls)
    self.call_rows = self.chunk * self.chunk_rollouts

  def as_dict(self) -> dict:
    return {"num_prompts": self.P, "num_rollouts": self.N, "prompt_len": self.L, "new_tokens": self.M,
            "sample_call": {"prompts": self.chunk, "rollouts": self.chunk_rollouts}, "sample_calls": self.calls,
            "sample_calls_timed": self.sample_calls, "micro_batch": {"prompts": self.mb[0], "rollouts": self.mb[1]},
            "update_prompts_timed": self.update_prompts}


# ------------------------------------------------------------------------------------------------ jax


def _device_budget() -> tuple[int, str]:
  import jax

  if _DEVICE_GIB.value:
    return int(_DEVICE_GIB.value * GiB), "--device_memory_gib"
  stats = jax.devices()[0].memory_stats() or {}
  if stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), "jax bytes_limit"
  return 8 * GiB, "CPU default"


def _jax_peak_gib() -> float | None:
  import jax

  stats = jax.devices()[0].memory_stats() or {}
  return round(stats["peak_bytes_in_use"] / GiB, 3) if "peak_bytes_in_use" in stats else None


def _card():
  import jax

  from maxrl_jax import memory_plan

  if _CARD.value:
    return memory_plan.CARDS[_CARD.value]
  return memory_plan.card_for_device_kind(jax.devices()[0].device_kind)


def _memory(compiled) -> dict:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return {}
  return {"xla_argument_gib": round(analysis.argument_size_in_bytes / GiB, 3),
          "xla_temp_gib": round(analysis.temp_size_in_bytes / GiB, 3)}


def run_jax(report: dict) -> None:
  """Sampler and micro-batched update of our stack; fills report (written after every part)."""
  import jax
  import jax.numpy as jnp

  from maxrl_jax import estimators
  from maxrl_jax import memory_plan
  from maxrl_jax import sampling
  from maxrl_jax.rl import step as step_lib
  from maxrl_jax.models import decoder

  P, N, L, M = _NUM_PROMPTS.value, _NUM_ROLLOUTS.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  config = model_config(_MODEL.value, _DTYPE.value, _PARAM_DTYPE.value, L + M)
  workload = memory_plan.Workload(P, N, L, M)
  budget, budget_source = _device_budget()
  device = jax.devices()[0]
  report.update(backend=jax.default_backend(), device_kind=device.device_kind, jax=jax.__version__,
                model_params=decoder.count_params(config),
                budget={"gib": round(budget / GiB, 2), "source": budget_source})
  try:
    plan = memory_plan.choose(config, workload, device_bytes=budget).summary()
  except ValueError as e:
    plan = {"error": str(e)}
  report["plan"] = plan
  sizes = Sizes(plan if "error" not in plan else None)
  report["sizes"] = sizes.as_dict()
  card = _card()
  _write(report)

  fns = decoder.DecoderFns(config)
  params = jax.jit(fns.init)(jax.random.key(_SEED.value))
  prompts = jax.random.randint(jax.random.key(_SEED.value + 1), (P, L), 0, config.vocab_size, jnp.int32)

  if "sample" in _PARTS.value:
    def sample_part():
      chunk, rollouts = sizes.chunk, sizes.chunk_rollouts
      sample = jax.jit(lambda p, x, k: sampling.sample_rollouts(
          fns, p, x, k, num_rollouts=rollouts, max_new_tokens=M, temperature=1.0, stop_tokens=()))
      start = time.perf_counter()
      compiled = sample.lower(params, prompts[:chunk], jax.random.key(0)).compile()
      compile_s = time.perf_counter() - start
      calls = [(c % (P // chunk)) * chunk for c in range(sizes.sample_calls)]
      times = []
      for repeat in range(_REPEATS.value):
        start = time.perf_counter()
        for i, first in enumerate(calls):
          out = compiled(params, prompts[first:first + chunk], jax.random.key(1000 * repeat + i))
          jax.block_until_ready(out.tokens)
        times.append(time.perf_counter() - start)
      assert int(out.num_steps) == M
      measured = _median(times)
      step_s = measured * sizes.calls / sizes.sample_calls
      cost = memory_plan.sampling_cost(config, workload, chunk_prompts=chunk)
      filled = memory_plan.sampling_cost(config, workload, chunk_prompts=chunk, suffix="filled")
      result = {"compile_s": round(compile_s, 2), "times_s": [round(t, 4) for t in times], "median_s": measured,
                "calls_timed": sizes.sample_calls, "step_s": round(step_s, 4),
                "step_s_measured_part": f"{sizes.sample_calls} of {sizes.calls} calls",
                "new_tokens_per_s": round(P * N * M / step_s, 1), "jax_peak_gib": _jax_peak_gib(),
                **_memory(compiled),
                "plan_sampling_gib": None if "error" in plan else plan["gib_per_device"]["sampling_peak"]}
      if card is not None:
        result["roofline"] = {"implemented": cost.summary(card), "filled": filled.summary(card),
                              "step_s_over_bound": round(step_s / cost.bound_s(card), 2)}
      return result

    _log(f"sampler: {sizes.calls} calls of {sizes.chunk} x {sizes.chunk_rollouts}, timing {sizes.sample_calls}")
    _attempt(report, "sampler", sample_part)

  if "update" in _PARTS.value:
    def update_part():
      Pu = sizes.update_prompts
      hyper = step_lib.Hyper(learning_rate=1e-6, b1=0.9, b2=0.999, weight_decay=0.01)
      spec = step_lib.RLSpec(num_samples=N, max_new_tokens=M, stop_tokens=(), reduction="sequence_sum",
                             micro_batch_prompts=sizes.mb[0], micro_batch_rollouts=sizes.mb[1], grad_clip=1.0)
      tx = step_lib.rl_optimizer(hyper, spec)
      key = jax.random.key(_SEED.value + 2)
      tokens = jax.random.randint(key, (Pu, N, M), 0, config.vocab_size, jnp.int32)
      rollouts = sampling.Rollouts(tokens=tokens, logprobs=jnp.zeros((Pu, N, M), jnp.float32),
                                   mask=jnp.ones((Pu, N, M), bool), lengths=jnp.full((Pu, N), M, jnp.int32),
                                   stopped=jnp.zeros((Pu, N), bool), num_steps=jnp.asarray(M, jnp.int32))
      rewards = jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (Pu, N)).astype(jnp.float32)
      maxrl = estimators.get_advantage_fn("maxrl")
      update = jax.jit(lambda s, x, r, w: step_lib.update(
          spec, fns, s, x, r, w, jnp.float32(1.0), hyper, advantage_fn=lambda rewards, h: maxrl(rewards)),
          donate_argnums=0)
      state = jax.jit(lambda p: step_lib.init_state(p, tx))(params)
      start = time.perf_counter()
      compiled = update.lower(state, prompts[:Pu], rollouts, rewards).compile()
      compile_s = time.perf_counter() - start
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        state, metrics = compiled(state, prompts[:Pu], rollouts, rewards)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
      measured = _median(times)
      step_s = measured * P / Pu
      cost = memory_plan.update_cost(config, workload, micro_batch=sizes.mb)
      result = {"compile_s": round(compile_s, 2), "times_s": [round(t, 4) for t in times], "median_s": measured,
                "step_s": round(step_s, 4), "step_s_measured_part": f"{Pu} of {P} prompts",
                "micro_batches_per_step": (P // sizes.mb[0]) * (N // sizes.mb[1]),
                "tokens_per_s": round(P * N * (L + M) / step_s, 1), "jax_peak_gib": _jax_peak_gib(),
                "loss_is_finite": bool(jnp.isfinite(metrics["loss"])), **_memory(compiled),
                "plan_update_gib": None if "error" in plan else plan["gib_per_device"]["update_peak"]}
      if card is not None:
        result["roofline"] = {**cost.summary(card), "step_s_over_bound": round(step_s / cost.bound_s(card), 2)}
      return result

    _log(f"update: {sizes.update_prompts} prompts in micro-batches {sizes.mb}")
    _attempt(report, "update", update_part)


# ------------------------------------------------------------------------------------------------ torch


def make_torch_model(config, device):
  """A transformers LlamaForCausalLM / Qwen3ForCausalLM of `config`'s architecture, random weights."""
  import torch
  import transformers

  from maxrl_jax.models import hf_loading

  arch = architecture(_MODEL.value)
  values = hf_loading.hf_config_dict(config, arch)
  values.pop("torch_dtype", None)
  config_class = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}[arch]
  if "rope_parameters" in inspect.signature(config_class.__init__).parameters:  # transformers >= 5
    values.pop("rope_scaling", None)
    values["rope_parameters"] = {"rope_type": "default", "rope_theta": values.pop("rope_theta")}
  hf_config = config_class(**values)
  hf_config._attn_implementation = _ATTN.value
  model_class = {"llama": transformers.LlamaForCausalLM, "qwen3": transformers.Qwen3ForCausalLM}[arch]
  torch.manual_seed(_SEED.value)
  with torch.device(device):
    model = model_class(hf_config)
  param_dtype = torch.float32 if _PARAM_DTYPE.value == "float32" else torch.bfloat16
  return model.to(dtype=param_dtype)


def run_torch(report: dict) -> None:
  """transformers generate and a micro-batched torch fwd/bwd/AdamW step; fills report."""
  import numpy as np
  import torch
  import transformers

  P, N, L, M = _NUM_PROMPTS.value, _NUM_ROLLOUTS.value, _PROMPT_LEN.value, _NEW_TOKENS.value
  config = model_config(_MODEL.value, _DTYPE.value, _PARAM_DTYPE.value, L + M)
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  report.update(torch=torch.__version__, transformers=transformers.__version__, device=str(device),
                attn_implementation=_ATTN.value, torch_threads=torch.get_num_threads())
  sizes = Sizes(report.get("plan"))
  model = make_torch_model(config, device)
  report["model_params"] = sum(p.numel() for p in model.parameters())
  autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16")
  prompts = torch.from_numpy(np.random.RandomState(_SEED.value).randint(0, config.vocab_size, (P, L))).to(device)
  sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)

  def peak_gib():
    return round(torch.cuda.max_memory_allocated() / GiB, 3) if device.type == "cuda" else None

  def reset_peak():
    if device.type == "cuda":
      torch.cuda.empty_cache()
      torch.cuda.reset_peak_memory_stats()

  if "sample" in _PARTS.value:
    def generate_part():
      rows = _GENERATE_ROWS.value or sizes.call_rows
      all_rows = prompts.repeat_interleave(N, dim=0)  # [P*N, L], row p*N + n
      if (P * N) % rows:
        raise ValueError(f"--generate_rows={rows} does not divide the {P * N} rows.")
      calls = P * N // rows
      timed = min(_GENERATE_CALLS.value or calls, calls)
      model.eval()

      def generate(part, new_tokens):
        with torch.no_grad(), autocast:
          return model.generate(part, attention_mask=torch.ones_like(part), do_sample=True, temperature=1.0,
                                top_k=0, top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                pad_token_id=0)

      reset_peak()
      generate(all_rows[:rows], min(M, 4))  # Warm-up: kernels, the prefill, a few steps.
      sync()
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        for c in range(timed):
          out = generate(all_rows[c * rows:(c + 1) * rows], M)
        sync()
        times.append(time.perf_counter() - start)
      assert tuple(out.shape) == (rows, L + M), out.shape
      measured = _median(times)
      step_s = measured * calls / timed
      return {"rows_per_call": rows, "calls": calls, "calls_timed": timed, "times_s": [round(t, 4) for t in times],
              "median_s": measured, "step_s": round(step_s, 4), "step_s_measured_part": f"{timed} of {calls} calls",
              "new_tokens_per_s": round(P * N * M / step_s, 1), "torch_peak_gib": peak_gib()}

    _log("transformers generate")
    _attempt(report, "generate", generate_part)

  if "update" in _PARTS.value:
    def update_part():
      Pu = sizes.update_prompts
      rows = Pu * N
      part_rows = _TORCH_MB_ROWS.value or sizes.mb[0] * sizes.mb[1]
      model.train()
      optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.01)
      generator = np.random.RandomState(_SEED.value + 2)
      responses = torch.from_numpy(generator.randint(0, config.vocab_size, (rows, M))).to(device)
      sequences = torch.cat([prompts[:Pu].repeat_interleave(N, dim=0), responses], dim=1)  # [rows, L+M]
      advantages = torch.from_numpy(generator.randn(rows).astype(np.float32)).to(device)

      def step(parts_to_run=None):
        optimizer.zero_grad(set_to_none=True)
        for i, start in enumerate(range(0, rows, part_rows)):
          if parts_to_run is not None and i >= parts_to_run:
            break
          part = sequences[start:start + part_rows]
          with autocast:
            logits = model(part[:, :-1]).logits[:, L - 1:]  # [b, M, V]
          logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, part[:, L:, None])[..., 0]
          loss = -(advantages[start:start + part_rows, None] * logp).sum() / rows
          loss.backward()
          del logits, logp
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss

      reset_peak()
      step(parts_to_run=1)  # Warm-up: kernels and the AdamW state.
      sync()
      times = []
      for _ in range(_REPEATS.value):
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
      measured = _median(times)
      step_s = measured * P / Pu
      return {"rows_per_microbatch": part_rows, "microbatches_per_step": math.ceil(P * N / part_rows),
              "times_s": [round(t, 4) for t in times], "median_s": measured, "step_s": round(step_s, 4),
              "step_s_measured_part": f"{Pu} of {P} prompts", "tokens_per_s": round(P * N * (L + M) / step_s, 1),
              "loss_is_finite": bool(torch.isfinite(loss)), "torch_peak_gib": peak_gib()}

    _log("torch update")
    _attempt(report, "update", update_part)


# ------------------------------------------------------------------------------------------------ both


def _child(stack: str, out_path: str, extra_env: dict, timeout_s: int) -> dict:
  """Runs this script for one stack in a new process and returns its JSON (partial if it was cut short)."""
  argv = [a for a in sys.argv[1:] if not a.startswith(("--stack", "--out", "--child_timeout", "--torch_timeout"))]
  command = [sys.executable, os.path.abspath(__file__), *argv, f"--stack={stack}", f"--out={out_path}"]
  env = dict(os.environ, **extra_env)
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s or None)
    status = {"exit_code": proc.returncode, "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}
  except subprocess.TimeoutExpired as e:
    status = {"exit_code": None, "timed_out_after_s": timeout_s,
              "stderr_tail": (e.stderr or b"")[-1500:].decode(errors="replace") if isinstance(e.stderr, bytes)
              else str(e.stderr or "")[-1500:]}
  result = {}
  if os.path.exists(out_path):
    with open(out_path) as f:
      result = json.load(f)
  result["process"] = {**status, "wall_s": round(time.perf_counter() - start, 1)}
  return result


def _ratio(a: dict | None, b: dict | None) -> float | None:
  if not a or not b or "step_s" not in a or "step_s" not in b:
    return None
  return round(a["step_s"] / b["step_s"], 2)


def main(argv):
  del argv
  start = time.time()
  if _STACK.value == "jax":
    report = {"stack": "jax"}
    run_jax(report)
    _write(report)
    return
  if _STACK.value == "torch":
    report = {"stack": "torch", "plan": json.loads(os.environ.get("BENCH_LLM_PLAN", "null")) or {}}
    run_torch(report)
    report.pop("plan")
    _write(report)
    return

  out = _OUT.value or os.path.join("/tmp", f"bench_llm_{os.getpid()}.json")
  report: dict[str, Any] = {
      "command": " ".join(["python"] + sys.argv), "model": _MODEL.value,
      "setup": {"num_prompts": _NUM_PROMPTS.value, "num_rollouts": _NUM_ROLLOUTS.value,
                "prompt_len": _PROMPT_LEN.value, "new_tokens": _NEW_TOKENS.value, "dtype": _DTYPE.value,
                "param_dtype": _PARAM_DTYPE.value, "repeats": _REPEATS.value},
      "python": platform.python_version(),
  }
  env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION",
                                                          str(_JAX_MEM_FRACTION.value))}
  _log("jax stack")
  report["jax"] = _child("jax", out + ".jax", env, _CHILD_TIMEOUT.value)
  if _OUT.value:  # The jax half is kept if the torch process does not finish.
    _write(report)
  plan = report["jax"].get("plan")
  if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
    report["torch"] = {"skipped": "torch / transformers not installed"}
  else:
    _log("torch stack")
    plan_env = {"BENCH_LLM_PLAN": json.dumps(plan if plan and "error" not in plan else None)}
    report["torch"] = _child("torch", out + ".torch", plan_env, _TORCH_TIMEOUT.value or _CHILD_TIMEOUT.value)
  ours, theirs = report["jax"], report["torch"]
  sample_s = ours.get("sampler", {}).get("step_s")
  update_s = ours.get("update", {}).get("step_s")
  gen_s = theirs.get("generate", {}).get("step_s")
  torch_update_s = theirs.get("update", {}).get("step_s")
  report["comparison"] = {
      "generate_s_over_sampler_s": _ratio(theirs.get("generate"), ours.get("sampler")),
      "torch_update_s_over_our_update_s": _ratio(theirs.get("update"), ours.get("update")),
      "our_rl_step_s": round(sample_s + update_s, 3) if sample_s and update_s else None,
      "torch_rl_step_s": round(gen_s + torch_update_s, 3) if gen_s and torch_update_s else None,
  }
  # Target: our sampler >= 3x transformers' generate for SmolLM2-360M at the default sizes on an accelerator.
  ratio = report["comparison"]["generate_s_over_sampler_s"]
  setup = (_MODEL.value, _NUM_PROMPTS.value, _NUM_ROLLOUTS.value, _PROMPT_LEN.value, _NEW_TOKENS.value, _DTYPE.value)
  report["targets"] = {"setup_matches_benchmark": setup == ("smollm2-360m", 64, 16, 256, 1024, "bfloat16")
                       and ours.get("backend") in ("gpu", "tpu")}
  if ratio is not None:
    report["targets"]["sampler_vs_generate"] = {"at_least": 3.0, "measured": ratio, "met": ratio >= 3.0}
  report["wall_time_s"] = round(time.time() - start, 1)
  for suffix in (".jax", ".torch"):
    if os.path.exists(out + suffix):
      os.remove(out + suffix)
  text = json.dumps(report, indent=1)
  print(text)
  if _OUT.value:
    _write(report)
  elif os.path.exists(out):
    os.remove(out)
  processes = {name: report[name].get("process", {}) for name in ("jax", "torch")}
  crashed = [name for name, p in processes.items() if p.get("exit_code", 0) not in (0, None)]
  cut_short = [name for name, p in processes.items() if "timed_out_after_s" in p]
  if crashed or cut_short:  # The JSON says how; the exit status says that it happened: 124 (as `timeout`
    # exits) when a process ran out of its time, 1 when one crashed.
    names = crashed + cut_short
    print(f"bench_llm: the {' and '.join(names)} process{'es' if len(names) > 1 else ''} did not finish "
          "(see `process` in the JSON).", file=sys.stderr)
    sys.exit(1 if crashed else 124)


if __name__ == "__main__":
  app.run(main)
