r"""Maze navigation: SFT on BFS shortest paths, then on-policy RL with a chosen advantage estimator.

The paper's "infinite data" regime (Tajwar et al., 2026, section on mazes): every RL step draws fresh
mazes; the policy is a small Qwen2-style decoder trained from scratch.

    python -m maxrl_jax.main --config=configs/maze.py --workdir=/tmp/maze              # CPU default
    python -m maxrl_jax.main --config=configs/maze.py:paper --workdir=/mnt/bucket/maze  # paper scale (a
                                                                   # gcsfuse mount for a bucket: docs/tpu.md)
    python -m maxrl_jax.main --config=configs/maze.py --workdir=/tmp/maze_grpo \
        --config.objective.name=grpo

Presets (the part after the colon): `default` (2 CPU cores, a few minutes), `paper` (17 x 17 mazes, the
3.9M-parameter policy, 32 prompts x 128 rollouts, bf16; for accelerators) and `tiny` (seconds; tests).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "default"
  cfg = ml_collections.ConfigDict()
  cfg.task = "maze"
  cfg.preset = preset
  cfg.seed = 0  # One seed; named keys (init, sft data, rl data, rl sampling, eval) are split from it.

  # Maze generation (randomised Prim; start (1,1), goal (S-2,S-2)).
  cfg.maze = ml_collections.ConfigDict()
  cfg.maze.size = 9  # Odd side S >= 5.
  # "fresh": new mazes every step (the paper's infinite-data regime). "fixed": a fixed TFDS train split of
  # `train_examples` mazes reused for many epochs (the data-scarce regime).
  cfg.maze.train_data = "fresh"
  cfg.maze.train_examples = 256  # Only with train_data="fixed".
  cfg.maze.data_dir = ""  # TFDS data_dir for train_data="fixed"; "" means <workdir>/tfds.

  # Policy: Qwen2-style decoder (see maxrl_jax/models/decoder.py: DecoderConfig for every field).
  cfg.model = ml_collections.ConfigDict()
  cfg.model.vocab_size = 32
  cfg.model.num_layers = 2
  cfg.model.hidden_size = 128
  cfg.model.ffn_size = 512
  cfg.model.num_heads = 4
  cfg.model.num_kv_heads = 2
  cfg.model.rope_theta = 1e6
  cfg.model.rms_norm_eps = 1e-6
  cfg.model.max_positions = 192  # >= prompt length + response cap.
  cfg.model.tie_embeddings = True
  cfg.model.qk_norm = False
  cfg.model.attention_bias = True
  cfg.model.dtype = "float32"  # Compute dtype; "bfloat16" on accelerators.
  common.add_lora_fields(cfg.model)  # LoRA for the RL phase (lora_rank 0: off).

  # Supervised warm-up on BFS shortest paths (loss on response tokens only); 600 steps reach ~25% held-out
  # pass@1 at the default size, leaving room for RL.
  cfg.sft = common.sft(steps=600, batch_size=32, learning_rate=5e-4, b1=0.9, b2=0.95, weight_decay=0.01,
                       grad_clip=1.0, warmup_steps=20)

  # Rollouts: P prompts x N rollouts per RL step (paper: response cap 180).
  cfg.rollout = common.rollout(num_prompts=16, num_samples=16, max_new_tokens=40, temperature=1.0)

  # The objective: an advantage estimator from maxrl_jax.estimators and the loss around it.
  cfg.objective = common.objective("maxrl", reduction="token_mean")

  # RL: AdamW, constant learning rate, one update per step (fully on-policy); verl's actor defaults.
  cfg.rl = common.rl(steps=200, learning_rate=1e-4, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0)

  # Held-out evaluation: pass@k from `num_samples` samples per test maze (unbiased estimator), with its
  # standard error over mazes. The test mazes are never drawn for SFT or RL training (they are excluded from
  # every training draw; summary.json reports the measured overlap, 0). 256 mazes give a pass@1 standard
  # error of about 0.02.
  cfg.eval = ml_collections.ConfigDict()
  cfg.eval.num_mazes = 256
  cfg.eval.num_samples = 32
  cfg.eval.ks = (1, 4, 16, 32)
  cfg.eval.temperature = 1.0
  cfg.eval.prompt_chunk = 16  # Test mazes sampled per compiled call.
  cfg.eval.every_steps = 50  # RL steps between evaluations (and one after SFT, one at the end).

  cfg.mesh = common.mesh()
  cfg.population = common.population()
  cfg.logging = common.logging()
  common.add_run_fields(cfg, log_every_steps=10, checkpoint_every_steps=50, keep_checkpoints=2)

  if preset == "default":
    pass
  elif preset == "tiny":  # Seconds on a CPU; used by the tests.
    # 7 x 7: the smallest side with room for held-out mazes (5 x 5 has only 4 distinct mazes).
    cfg.maze.size = 7
    cfg.model.num_layers = 1
    cfg.model.hidden_size = 32
    cfg.model.ffn_size = 64
    cfg.model.max_positions = 80
    cfg.sft.steps = 6
    cfg.sft.batch_size = 8
    cfg.sft.warmup_steps = 2
    cfg.rollout.num_prompts = 4
    cfg.rollout.num_samples = 4
    cfg.rollout.max_new_tokens = 20
    cfg.rl.steps = 6
    cfg.eval.num_mazes = 8
    cfg.eval.num_samples = 8
    cfg.eval.ks = (1, 4, 8)
    cfg.eval.prompt_chunk = 8
    cfg.eval.every_steps = 3
    cfg.log_every_steps = 2
    cfg.checkpoint_every_steps = 2
    cfg.progress_bar = False
  elif preset == "paper":  # The paper's maze table: 17 x 17, 3.9M policy, 32 x 128 rollouts, bf16.
    cfg.maze.size = 17
    cfg.model.num_layers = 4
    cfg.model.hidden_size = 256
    cfg.model.ffn_size = 1024
    cfg.model.max_positions = 512
    cfg.model.dtype = "bfloat16"
    # The official SFT (maze/sft.py): 1500 steps of 32 mazes, lr 5e-4 from the first step (its cosine over
    # ~312K steps is flat over 1500), AdamW (0.9, 0.95), weight decay 0.01, clip 1.0.
    cfg.sft.steps = 1500
    cfg.sft.batch_size = 32
    cfg.sft.warmup_steps = 0
    cfg.rollout.num_prompts = 32
    cfg.rollout.num_samples = 128
    cfg.rollout.max_new_tokens = 180
    cfg.rl.steps = 20_000
    cfg.eval.num_mazes = 256
    cfg.eval.num_samples = 2048
    cfg.eval.ks = (1, 32, 128, 256)
    cfg.eval.prompt_chunk = 8  # A multiple of the number of devices (prompts are split over them).
    cfg.eval.every_steps = 1000
    cfg.log_every_steps = 50
    cfg.checkpoint_every_steps = 1000
  else:
    raise ValueError(f"Unknown maze preset {preset!r}; allowed: default, tiny, paper.")
  return cfg
