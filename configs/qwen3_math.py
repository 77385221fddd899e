r"""Qwen3-1.7B-Base / Qwen3-4B-Base on POLARIS-53K math (the paper's large-model runs).

For accelerators, with local weights and data (or Hugging Face Hub ids: docs/integrations.md).

    python -m maxrl_jax.main --config=configs/qwen3_math.py --workdir=/ckpt/qwen3_1p7b_maxrl \
        --config.model.path=/models/Qwen3-1.7B-Base \
        --config.data.train_path=/data/polaris53k.jsonl --config.data.eval_path=/data/math500.jsonl
    python -m maxrl_jax.main --config=configs/qwen3_math.py:4b --workdir=... --config.model.path=/models/Qwen3-4B-Base
    python -m maxrl_jax.main --config=configs/qwen3_math.py:tiny --workdir=/tmp/tiny_qwen3   # CPU, seconds

Presets: `paper` (default; 256 prompts x 16 rollouts, lr 1e-6, 1000 steps, responses up to 4096 tokens, and
the official script's (qwen3_experiments/run_qwen3_training.sh of tajwarfahim/maxrl) other settings: prompt
suffix, prompts up to 1024 tokens, gradient clip 0.3, token-mean loss, AdamW betas (0.9, 0.999) and weight
decay 0.01, 32 samples per problem at the evaluations every 50 steps, no reward change at the length cap),
`4b` (the same for Qwen3-4B-Base, smaller micro-batches), `tiny` (a tiny random Qwen3 checkpoint: q/k norm,
untied embeddings; synthetic arithmetic; CPU seconds; used by the tests). Every field is documented in
configs/gsm8k_smollm2.py (same trainer). The paper evaluates on AIME 2025, BeyondAIME, MATH-500 and Minerva:
run one job per held-out set with --config.data.eval_path, or evaluate checkpoints separately.
"""

import ml_collections

from configs import gsm8k_smollm2

# Appended to the problem as the official POLARIS / AIME / MATH-500 / Minerva preprocessing does
# (examples/maxrl_data_preprocess/polaris.py). That code writes "\\boxed{{}}" in a plain (not format) string,
# so its prompts end in a literal "\boxed{{}}." (two brace pairs); this keeps that text. Set
# --config.data.prompt_suffix to the single-brace form for the evidently intended prompt.
QWEN3_PROMPT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "paper"
  cfg = gsm8k_smollm2.base_config()
  cfg.preset = preset

  cfg.model.path = ""  # e.g. /models/Qwen3-1.7B-Base
  # POLARIS-53K rows hold "problem" and "answer" (a final answer, compared as is).
  cfg.data.answer_format = "auto"
  cfg.data.eval_split = "test"
  cfg.data.chat_template = "auto"  # Qwen3's template (it ships with the base models' tokenizers too).
  cfg.data.prompt_suffix = QWEN3_PROMPT_SUFFIX
  cfg.data.max_prompt_tokens = 1024  # Official: 1024 (longer prompts dropped).
  cfg.data.prompt_bucket = 128
  cfg.verifier.zero_truncated = False  # The official Qwen3 script keeps the reward of capped responses.

  cfg.rollout.num_prompts = 256
  cfg.rollout.num_samples = 16
  cfg.rollout.max_new_tokens = 4096
  cfg.rollout.temperature = 1.0
  cfg.rollout.prompt_chunk = 0  # The most prompts per call that fit (memory plan; see docs/language_models.md).
  cfg.rollout.length_bucket = 512

  cfg.rl.steps = 1000
  cfg.rl.learning_rate = 1e-6
  cfg.rl.micro_batch_prompts = 0  # The most rollouts per micro-batch that fit (memory plan).
  cfg.rl.micro_batch_rollouts = 0
  cfg.rl.grad_clip = 0.3  # Official: actor_rollout_ref.actor.grad_clip=0.3.

  cfg.eval.num_problems = 0
  cfg.eval.num_samples = 256
  cfg.eval.samples_per_call = 32
  cfg.eval.prompt_chunk = 2
  cfg.eval.ks = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  cfg.eval.periodic_num_samples = 32  # Official: val_kwargs.n=32 every 50 steps (test_freq=50).
  cfg.eval.temperature = 0.6
  cfg.eval.top_p = 0.95
  cfg.eval.max_new_tokens = 4096
  cfg.eval.every_steps = 50
  cfg.checkpoint_every_steps = 50

  if preset == "paper":
    pass
  elif preset == "4b":
    cfg.eval.samples_per_call = 16
  elif preset == "tiny":
    gsm8k_smollm2.apply_tiny(cfg, "qwen3")
    cfg.rl.learning_rate = 1e-4
  else:
    raise ValueError(f"Unknown qwen3_math preset {preset!r}; allowed: paper, 4b, tiny.")
  return cfg
