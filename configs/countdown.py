r"""Countdown: reach a target with +, -, *, / over 3 or 4 given numbers, each used once (maxrl_jax/tasks/countdown.py).

SFT on canonical solutions of random solvable problems, then on-policy RL with the exact on-device verifier,
then held-out pass@k on problems that are never trained on.

    python -m maxrl_jax.main --config=configs/countdown.py --workdir=/tmp/countdown             # CPU, minutes
    python -m maxrl_jax.main --config=configs/countdown.py --workdir=/tmp/cd_grpo --config.objective.name=grpo
    python -m maxrl_jax.main --config=configs/countdown.py:tiny --workdir=/tmp/cd_tiny          # seconds (tests)
    python -m maxrl_jax.main --config=configs/countdown.py --workdir=/tmp/cd_table \
        --config.population.objectives="('maxrl','grpo','rloo')" --config.population.seeds="(0,1,2)"

Presets (after the colon): `default` (2 CPU cores, a few minutes) and `tiny` (seconds; tests).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "default"
  cfg = ml_collections.ConfigDict()
  cfg.task = "countdown"
  cfg.preset = preset
  cfg.seed = 0  # One seed; named keys (init, sft data, rl data, rl sampling, eval) are split from it.

  # The problems: K numbers drawn from 1..max_number, a target in 1..max_target reachable by some expression.
  cfg.countdown = ml_collections.ConfigDict()
  cfg.countdown.num_numbers = 4  # 3 or 4.
  cfg.countdown.max_number = 25  # <= 99.
  cfg.countdown.max_target = 100  # In [max_number, 1000].
  cfg.countdown.heldout_seed = 0  # The held-out set is a function of the spec and this seed only.

  # Policy: Qwen2-style decoder (maxrl_jax/models/decoder.py: DecoderConfig).
  cfg.model = ml_collections.ConfigDict()
  cfg.model.vocab_size = 32
  cfg.model.num_layers = 2
  cfg.model.hidden_size = 128
  cfg.model.ffn_size = 512
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 2
  cfg.model.rope_theta = 1e4
  cfg.model.rms_norm_eps = 1e-6
  cfg.model.max_positions = 48  # >= prompt (17) + response cap (16).
  cfg.model.tie_embeddings = True
  cfg.model.qk_norm = False
  cfg.model.attention_bias = True
  cfg.model.dtype = "float32"
  common.add_lora_fields(cfg.model)  # LoRA for the RL phase (lora_rank 0: off).

  # Supervised warm-up on canonical solutions (loss on response tokens only).
  cfg.sft = common.sft(steps=1200, batch_size=32, learning_rate=1e-3, b1=0.9, b2=0.95, weight_decay=0.01,
                       grad_clip=1.0, warmup_steps=20)
  cfg.rollout = common.rollout(num_prompts=16, num_samples=16, max_new_tokens=16, temperature=1.0)
  cfg.objective = common.objective("maxrl", reduction="token_mean")
  cfg.rl = common.rl(steps=200, learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0)

  # Held-out evaluation: pass@k from num_samples samples per held-out problem, ± standard error over problems.
  cfg.eval = ml_collections.ConfigDict()
  cfg.eval.num_problems = 256
  cfg.eval.num_samples = 32
  cfg.eval.ks = (1, 4, 16, 32)
  cfg.eval.temperature = 1.0
  cfg.eval.prompt_chunk = 32  # Held-out problems sampled per compiled call.
  cfg.eval.every_steps = 50

  cfg.mesh = common.mesh()
  cfg.population = common.population()
  cfg.logging = common.logging()
  common.add_run_fields(cfg, log_every_steps=10, checkpoint_every_steps=50, keep_checkpoints=2)

  if preset == "default":
    pass
  elif preset == "tiny":  # Seconds on a CPU; used by the tests.
    cfg.countdown.num_numbers = 3
    cfg.countdown.max_number = 9
    cfg.countdown.max_target = 20
    cfg.model.num_layers = 1
    cfg.model.hidden_size = 32
    cfg.model.ffn_size = 64
    cfg.model.max_positions = 32
    cfg.sft.steps = 6
    cfg.sft.batch_size = 8
    cfg.sft.warmup_steps = 2
    cfg.rollout.num_prompts = 4
    cfg.rollout.num_samples = 4
    cfg.rollout.max_new_tokens = 12
    cfg.rl.steps = 6
    cfg.eval.num_problems = 8
    cfg.eval.num_samples = 8
    cfg.eval.ks = (1, 4, 8)
    cfg.eval.prompt_chunk = 8
    cfg.eval.every_steps = 3
    cfg.log_every_steps = 2
    cfg.checkpoint_every_steps = 2
    cfg.progress_bar = False
  else:
    raise ValueError(f"Unknown countdown preset {preset!r}; allowed: default, tiny.")
  return cfg
