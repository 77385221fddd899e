r"""Static vs in-flight batching of rollouts on this machine: decode steps, row-steps and wall time.

    python scripts/bench_inflight.py                       # 16 prompts x 16 rollouts, lengths uniform in [100, 2048]
    python scripts/bench_inflight.py --prompts=8 --low=25 --high=512 --chunk_prompts=1 --repeats=1

The policy is a small random decoder (`--layers`, `--hidden`, ...; float32). Response lengths follow a set
distribution rather than what a random model emits: `UniformLengthModel` wraps the decoder and rewrites the
stop token's logit so that, at temperature 1, the probability of stopping at generated token i given no stop
before is h(i) = 1 / (high - i) for low - 1 <= i < high and 0 before (the discrete hazard of a uniform length
in [low, high]; h = 1 at i = high - 1, so no rollout reaches the cap unstopped). Every other logit, and all
the attention and matmul work, is the decoder's. The lengths are drawn by the samplers' own keys, so the
static sampler and the in-flight one with the same key schedule produce identical rollouts.

Three samplers over the same P x N rollouts of M = high slots:

- `static`: `maxrl_jax.sampling.sample_rollouts` in calls of `--chunk_prompts` prompts (as the text trainer
  samples, rollout.prompt_chunk): each call decodes chunk x N rows until its longest rollout stops;
- `static_same_keys`: `inflight_sampling.sample_rollouts_static` in the same calls (the in-flight sampler's
  key schedule, global prompt ids);
- `inflight`: `inflight_sampling.sample_rollouts_inflight` with S = chunk x N slots (the same rows per decode
  step, hence about the same suffix-cache memory) over all P x N rollouts in one call.

Per sampler: `decode_steps` (batched decode calls), `row_steps` (decode_steps x rows), `waste` (1 - generated
tokens / row_steps), the median wall time of `--repeats` runs after a compile run, and tokens per second;
the 1/5/15-minute load averages at the start and the end (wall times on a shared machine vary with them).
`identical` says whether in-flight and static_same_keys returned the same tokens. Prints one JSON object
(also written to --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Runs as a script.

from maxrl_jax import inflight_sampling  # noqa: E402
from maxrl_jax import sampling  # noqa: E402
from maxrl_jax.models import decoder  # noqa: E402


@dataclasses.dataclass(frozen=True)
class UniformLengthModel:
  """A `sampling.ModelFns` whose rollouts, sampled at temperature 1, have lengths uniform in [low, high].

  The base model's logits are kept except the stop token's: with lse the log-sum-exp of the other logits,
  the stop logit becomes lse + log(h / (1 - h)), so that its probability is h(i) for generated token i
  (prefill predicts token 0; `decode` at suffix slot `step` with R tokens predicts tokens step + 1 ..
  step + R). At h = 1 the other logits are pushed to -1e30.
  """

  base: decoder.DecoderFns
  stop_token: int
  low: int
  high: int

  def _rewrite(self, logits, index):
    """logits [..., V] predicting generated token `index` (broadcastable to logits[..., 0])."""
    i = jnp.asarray(index, jnp.float32)
    hazard = jnp.where(i + 1 >= self.low, 1.0 / jnp.maximum(self.high - i, 1.0), 0.0)
    is_stop = jnp.arange(logits.shape[-1]) == self.stop_token
    others = jnp.where(is_stop, -jnp.inf, logits)
    lse = jax.nn.logsumexp(others, axis=-1)
    odds = hazard / (1.0 - jnp.where(hazard >= 1.0, 0.0, hazard))
    stop_logit = jnp.where(hazard >= 1.0, 0.0, jnp.where(hazard > 0.0, lse + jnp.log(odds), -1e30))
    others = jnp.where((hazard >= 1.0)[..., None], -1e30, others)
    return jnp.where(is_stop, stop_logit[..., None], others)

  def prefill(self, params, prompts, attention_mask=None):
    logits, cache = self.base.prefill(params, prompts, attention_mask)
    return self._rewrite(logits, 0), cache

  def init_suffix_cache(self, prefix_cache, num_rollouts, max_len):
    return self.base.init_suffix_cache(prefix_cache, num_rollouts, max_len)

  def decode(self, params, tokens, prefix_cache, suffix_cache, step):
    logits, suffix_cache = self.base.decode(params, tokens, prefix_cache, suffix_cache, step)
    index = step + 1 + jnp.arange(tokens.shape[-1])  # [R]
    return self._rewrite(logits, index), suffix_cache

  def forward(self, params, tokens, attention_mask=None):
    return self.base.forward(params, tokens, attention_mask)


def _timed(run, repeats):
  """(result of the compile run, seconds of the compile run, wall seconds of `repeats` further runs)."""
  start = time.perf_counter()
  result = jax.block_until_ready(run())
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return result, first, times


def _summary(decode_steps, rows, tokens, first, times):
  median = float(np.median(times)) if times else first
  return {"decode_steps": int(decode_steps), "rows": rows, "row_steps": int(decode_steps) * rows,
          "waste": round(1 - tokens / (int(decode_steps) * rows), 4), "first_run_s": round(first, 2),
          "times_s": [round(t, 3) for t in times], "median_s": round(median, 3),
          "tokens_per_s": round(tokens / median, 1)}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--prompts", type=int, default=16, help="P")
  parser.add_argument("--rollouts", type=int, default=16, help="N per prompt")
  parser.add_argument("--prompt_len", type=int, default=32, help="L")
  parser.add_argument("--low", type=int, default=100, help="shortest response (tokens)")
  parser.add_argument("--high", type=int, default=2048, help="longest response = the cap M")
  parser.add_argument("--chunk_prompts", type=int, default=2, help="prompts per static call; slots = this x N")
  parser.add_argument("--layers", type=int, default=2)
  parser.add_argument("--hidden", type=int, default=64)
  parser.add_argument("--ffn", type=int, default=256)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--kv_heads", type=int, default=2)
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=1, help="timed runs after the compile run")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="")
  args = parser.parse_args(argv)
  if args.prompts % args.chunk_prompts:
    raise ValueError(f"--chunk_prompts={args.chunk_prompts} must divide --prompts={args.prompts}.")
  config = decoder.DecoderConfig(vocab_size=args.vocab, num_layers=args.layers, hidden_size=args.hidden,
                                 ffn_size=args.ffn, num_heads=args.heads, num_kv_heads=args.kv_heads,
                                 max_positions=args.prompt_len + args.high)
  base = decoder.DecoderFns(config)
  stop = 1
  fns = UniformLengthModel(base, stop_token=stop, low=args.low, high=args.high)
  params_key, prompt_key, sample_key = jax.random.split(jax.random.key(args.seed), 3)
  params = base.init(params_key)
  prompts = jax.random.randint(prompt_key, (args.prompts, args.prompt_len), 2, args.vocab, jnp.int32)
  P, N, M, chunk = args.prompts, args.rollouts, args.high, args.chunk_prompts
  rows = chunk * N
  calls = range(P // chunk)
  options = dict(num_rollouts=N, max_new_tokens=M, stop_tokens=(stop,))

  def static():
    return [sampling.sample_rollouts(fns, params, prompts[c * chunk:(c + 1) * chunk],
                                     jax.random.fold_in(sample_key, c), **options) for c in calls]

  def static_same_keys():
    return [inflight_sampling.sample_rollouts_static(
        fns, params, prompts[c * chunk:(c + 1) * chunk], sample_key,
        prompt_ids=jnp.arange(c * chunk, (c + 1) * chunk), **options) for c in calls]

  def inflight():
    return inflight_sampling.sample_rollouts_inflight_with_stats(fns, params, prompts, sample_key, num_slots=rows,
                                                                 **options)

  start = time.perf_counter()
  report = {"command": "python scripts/bench_inflight.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "setup": {"prompts": P, "rollouts": N, "prompt_len": args.prompt_len, "low": args.low,
                      "high": args.high, "chunk_prompts": chunk, "rows_per_step": rows,
                      "model_params": decoder.count_params(config), "dtype": "float32",
                      "model": {"layers": args.layers, "hidden": args.hidden, "ffn": args.ffn, "heads": args.heads,
                                "kv_heads": args.kv_heads, "vocab": args.vocab}, "repeats": args.repeats},
            "hardware": {"backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                         "cpu_count": os.cpu_count(), "machine": platform.machine()},
            "versions": {"python": platform.python_version(), "jax": jax.__version__}}
  report["load_at_start"] = [round(x, 2) for x in os.getloadavg()]  # The machine may be shared.
  parts, first, times = _timed(static, args.repeats)
  lengths = np.concatenate([np.asarray(p.lengths) for p in parts])
  report["static"] = _summary(sum(int(p.num_steps) for p in parts), rows, int(lengths.sum()), first, times)
  report["static"]["mean_length"] = round(float(lengths.mean()), 1)
  keyed, first, times = _timed(static_same_keys, args.repeats)
  keyed_lengths = np.concatenate([np.asarray(p.lengths) for p in keyed])
  report["static_same_keys"] = _summary(sum(int(p.num_steps) for p in keyed), rows, int(keyed_lengths.sum()),
                                        first, times)
  (rollouts, stats), first, times = _timed(inflight, args.repeats)
  report["inflight"] = _summary(int(stats.iterations), rows, int(np.asarray(rollouts.lengths).sum()), first, times)
  report["inflight"]["mean_length"] = round(float(np.asarray(rollouts.lengths).mean()), 1)
  report["identical"] = bool(
      np.array_equal(np.concatenate([np.asarray(p.tokens) for p in keyed]), np.asarray(rollouts.tokens))
      and np.array_equal(keyed_lengths, np.asarray(rollouts.lengths).reshape(keyed_lengths.shape)))
  for name in ("static", "static_same_keys"):
    report[f"inflight_vs_{name}"] = {
        "decode_step_ratio": round(report["inflight"]["decode_steps"] / report[name]["decode_steps"], 3),
        "time_ratio": round(report["inflight"]["median_s"] / report[name]["median_s"], 3)}
  report["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
  report["wall_time_s"] = round(time.perf_counter() - start, 1)
  text = json.dumps(report, indent=1)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main()
