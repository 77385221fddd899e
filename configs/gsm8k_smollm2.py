r"""GSM8K with SmolLM2-360M-Instruct: the paper's data-scarce regime (Tajwar et al., 2026, GSM8K table).

Point the config at local copies of the weights and data, or at Hugging Face Hub ids, which are fetched once into
huggingface_hub's cache (HF_HUB_OFFLINE=1: the cache only; docs/integrations.md):

    python -m maxrl_jax.main --config=configs/gsm8k_smollm2.py --workdir=/ckpt/gsm8k_maxrl \
        --config.model.path=/models/SmolLM2-360M-Instruct \
        --config.data.train_path=/data/gsm8k --config.data.eval_path=/data/gsm8k_platinum
    python -m maxrl_jax.main --config=configs/gsm8k_smollm2.py --workdir=/ckpt/gsm8k_maxrl \
        --config.model.path=HuggingFaceTB/SmolLM2-360M-Instruct --config.data.train_path=hf:openai/gsm8k/main
    python -m maxrl_jax.main --config=configs/gsm8k_smollm2.py --workdir=... --config.objective.name=grpo
    python -m maxrl_jax.main --config=configs/gsm8k_smollm2.py:smoke --workdir=/tmp/smoke \
        --config.model.path=... --config.data.train_path=...        # one accelerator, minutes
    python -m maxrl_jax.main --config=configs/gsm8k_smollm2.py:tiny --workdir=/tmp/tiny   # CPU, seconds

Presets (after the colon): `paper` (default; 256 prompts x 128 rollouts, lr 1e-5, 1500 steps, responses up
to 2048 tokens, pass@k up to 1024 on the held-out set, and the official script's (smollm/smollm.sh of
tajwarfahim/maxrl) other settings: token-mean loss, AdamW betas (0.9, 0.999) and weight decay 0.01, prompts
up to 512 tokens, reward 0 at the length cap, 32 samples per problem at the evaluations during training),
`smoke` (the paper's settings shrunk to run in minutes on one accelerator with real weights) and `tiny` (a
tiny random Llama checkpoint and synthetic "What is a + b?" problems written into the workdir: the whole path
end to end on a CPU; used by the tests; without the length-cap rule).
docs/language_models.md gives the memory each preset needs.
"""

import ml_collections

from configs import common

# The question + " " + this, as the official GSM8K preprocessing (examples/maxrl_data_preprocess/gsm8k.py).
PAPER_PROMPT_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."


def base_config() -> ml_collections.ConfigDict:
  """Every field of the text task (maxrl_jax/tasks/text.py), at the paper's GSM8K settings."""
  cfg = ml_collections.ConfigDict()
  cfg.task = "text"
  cfg.preset = "paper"
  cfg.seed = 0  # One seed; named keys (init, sft data, rl data order, rl sampling, eval) derive from it.

  # Policy: a local Hugging Face checkpoint (Llama / SmolLM2, Qwen2 / Qwen2.5, Qwen3; safetensors).
  cfg.model = ml_collections.ConfigDict()
  cfg.model.path = ""  # e.g. /models/SmolLM2-360M-Instruct (config.json, model.safetensors, tokenizer.json).
  cfg.model.dtype = "bfloat16"  # Compute dtype; logits and losses are float32 regardless.
  cfg.model.param_dtype = "float32"  # Master weights and AdamW state.
  cfg.model.max_positions = 0  # 0: data.max_prompt_tokens + the longest response.
  cfg.model.synthetic = ""  # "llama" | "qwen2" | "qwen3": write a tiny random checkpoint instead (tests).
  cfg.model.synthetic_overrides = ml_collections.ConfigDict()  # DecoderConfig fields of that checkpoint.
  # LoRA for the RL phase (lora_rank 0: off): adapters on the checkpoint's frozen weights; export the merged
  # policy with maxrl_jax.trainers.rl.export_merged_policy.
  common.add_lora_fields(cfg.model)

  # Data: GSM8K-style JSONL / JSON / parquet files or directories, or "tfds:NAME" (prepared locally).
  cfg.data = ml_collections.ConfigDict()
  cfg.data.train_path = ""  # GSM8K train (7,473 problems): a file, or a directory with train*.jsonl/parquet.
  cfg.data.eval_path = ""  # Held-out set (the paper: GSM8K-Platinum test); "" uses train_path's eval_split.
  cfg.data.train_split = "train"
  cfg.data.eval_split = "test"
  cfg.data.tfds_data_dir = ""
  cfg.data.question_key = ""  # "" detects question / problem / prompt.
  cfg.data.answer_key = ""  # "" detects answer / final_answer / solution ...
  cfg.data.answer_format = "auto"  # gsm8k ("#### 72", commas removed) | boxed | plain | auto.
  cfg.data.train_limit = 0  # 0: all problems.
  cfg.data.prompt_suffix = PAPER_PROMPT_SUFFIX  # Appended to the question (the paper's prompt).
  cfg.data.system_prompt = ""  # "" lets the chat template add its default (SmolLM2's does).
  cfg.data.chat_template = "auto"  # The checkpoint's jinja template; or chatml | smollm2 | qwen2.5 | qwen3 | none.
  cfg.data.template_kwargs = ml_collections.ConfigDict()  # Extra jinja variables, e.g. enable_thinking.
  cfg.data.extra_stop_tokens = ()  # Token strings that also end a rollout.
  cfg.data.max_prompt_tokens = 512  # Longer prompts are dropped (counted in summary.json); official: 512.
  cfg.data.prompt_bucket = 64  # Prompt widths are multiples of this (fewer compilations).
  cfg.data.synthetic = False  # True: synthetic "What is a + b?" train / test JSONL written to the workdir.
  cfg.data.synthetic_train_size = 64
  cfg.data.synthetic_max_operand = 4

  # Optional supervised warm-up on the reference solutions (0 steps in the paper; tiny presets use it so
  # that a random model reaches a non-zero pass rate). AdamW with the RL phase's betas, decay and clip.
  cfg.sft = common.sft(steps=0, batch_size=16, learning_rate=1e-5, b1=0.9, b2=0.999, weight_decay=0.01,
                       grad_clip=1.0)
  cfg.sft.max_response_tokens = 512

  # Rollouts: P prompts x N samples per RL step, prefix-shared KV-cache sampler.
  cfg.rollout = common.rollout(num_prompts=256, num_samples=128, max_new_tokens=2048, temperature=1.0)
  # Prompts per sampling call (KV cache: chunk x N x max_new_tokens tokens); 0: the most that fit the device's
  # memory (the memory plan, cfg.memory). Call c of a step uses fold_in(step key, c), so the rollouts drawn
  # depend on the chunk size.
  cfg.rollout.prompt_chunk = 0
  cfg.rollout.length_bucket = 256  # The update runs on responses cut to the longest, rounded up to this.
  # 0: static batching, each call decodes prompt_chunk x N rows until its longest rollout stops. S > 0:
  # in-flight batching (maxrl_jax/inflight_sampling.py), S rows per call, each refilled with the call's next
  # rollout as soon as its rollout finishes (one device only; rollouts keyed by their prompt's row in the step).
  cfg.rollout.inflight_slots = 0

  # Verifier: the last \boxed{...} compared with the reference (numbers exactly, sympy otherwise).
  cfg.verifier = ml_collections.ConfigDict()
  cfg.verifier.answer_mode = "boxed"
  cfg.verifier.timeout_s = 5.0  # sympy time per response; slower ones score 0 (their worker is killed).
  cfg.verifier.num_threads = 8  # Threads, and at most this many sympy worker processes.
  cfg.verifier.symbolic = True
  cfg.verifier.memory_limit_mb = 1024  # Address-space cap of each sympy worker (0: none).
  # Reward 0 for responses whose length reaches the token cap (max_new_tokens), stopped or not, in training
  # and evaluation (and no majority vote from them): the official GSM8K script's
  # zero_reward_on_max_response_length=True. False scores them like any other response.
  cfg.verifier.zero_truncated = True

  # The objective: an estimator of maxrl_jax.estimators and the loss around it. "token_mean" is verl's
  # default and the official scripts' (the paper's appendix writes the 1/T form); it weights each rollout by
  # its length, so it is not an unbiased estimate of the objective's gradient, "sequence_sum" is.
  cfg.objective = common.objective("maxrl", reduction="token_mean")

  # RL: AdamW, one update per step (on-policy). Betas / weight decay / clip: verl's defaults, which the
  # official GSM8K script keeps (fsdp_workers.py: betas (0.9, 0.999); ppo_trainer.yaml: 0.01, clip 1.0).
  # 1500 steps are ~51 epochs of GSM8K train at 256 prompts per step. Micro-batches 0: the most rollouts that
  # fit (memory plan).
  cfg.rl = common.rl(steps=1500, learning_rate=1e-5, b1=0.9, b2=0.999, weight_decay=0.01, grad_clip=1.0)

  # Held-out evaluation: pass@k from num_samples samples per problem (unbiased), majority vote.
  cfg.eval = ml_collections.ConfigDict()
  cfg.eval.num_problems = 0  # 0: all.
  cfg.eval.num_samples = 1024
  cfg.eval.samples_per_call = 128
  cfg.eval.prompt_chunk = 2
  cfg.eval.ks = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
  # Samples per problem at the evaluations between the first and the last (0: eval.num_samples): the official
  # scripts validate with 32 every 100 steps; the first and last use num_samples for pass@k up to 1024.
  cfg.eval.periodic_num_samples = 32
  cfg.eval.temperature = 0.6  # The paper's validation sampling.
  cfg.eval.top_p = 0.95
  cfg.eval.max_new_tokens = 2048
  cfg.eval.every_steps = 100

  cfg.mesh = common.mesh()

  # Memory plan (maxrl_jax/memory_plan.py), before any weight is read or anything compiled: the bytes per
  # device of an RL step (parameters, AdamW state, the step's rollouts, the sampler's KV caches per call, the
  # update's activations per micro-batch) and of an evaluation call, printed; a config over the budget is
  # refused with the numbers and the fields to change. Batch sizes left at 0 (rollout.prompt_chunk,
  # rl.micro_batch_prompts, rl.micro_batch_rollouts) are chosen from it: the largest that fit.
  cfg.memory = ml_collections.ConfigDict()
  cfg.memory.device_bytes = 0  # Budget per device; 0: the device's limit (a CPU reports none: no check).
  cfg.memory.reserve_bytes = 2**30  # Set aside per device for the runtime, libraries and fragmentation.
  cfg.memory.enforce = True  # False: print what does not fit, and run anyway (the plan is an estimate).

  cfg.population = common.population()
  cfg.logging = common.logging()
  common.add_run_fields(cfg, log_every_steps=1, checkpoint_every_steps=50, keep_checkpoints=2)
  return cfg


def apply_tiny(cfg: ml_collections.ConfigDict, architecture: str) -> None:
  """Seconds on a CPU: a tiny random checkpoint, synthetic arithmetic, a short SFT warm-up, 4 RL steps."""
  cfg.model.synthetic = architecture
  cfg.model.dtype = "float32"
  cfg.model.synthetic_overrides = ml_collections.ConfigDict({"num_layers": 1, "hidden_size": 64, "ffn_size": 128})
  cfg.data.synthetic = True
  cfg.data.synthetic_train_size = 64
  cfg.data.chat_template = "chatml"  # The tiny checkpoint's jinja template renders the same (tested).
  cfg.data.prompt_suffix = ""
  cfg.data.max_prompt_tokens = 48
  cfg.data.prompt_bucket = 16
  cfg.sft.steps = 40
  cfg.sft.batch_size = 16
  cfg.sft.learning_rate = 3e-3
  cfg.sft.max_response_tokens = 8
  cfg.rollout.num_prompts = 4
  cfg.rollout.num_samples = 4
  cfg.rollout.max_new_tokens = 8
  cfg.rollout.prompt_chunk = 2
  cfg.rollout.length_bucket = 8
  cfg.verifier.num_threads = 2
  cfg.verifier.zero_truncated = False  # Off: SFT targets are cut to 8 tokens, so tiny responses reach the cap.
  cfg.rl.steps = 4
  cfg.rl.learning_rate = 1e-4
  cfg.rl.micro_batch_prompts = 2
  cfg.rl.micro_batch_rollouts = 2
  cfg.eval.num_problems = 8
  cfg.eval.num_samples = 8
  cfg.eval.samples_per_call = 4
  cfg.eval.prompt_chunk = 4
  cfg.eval.ks = (1, 4, 8)
  cfg.eval.periodic_num_samples = 0
  cfg.eval.max_new_tokens = 8
  cfg.eval.every_steps = 4
  cfg.log_every_steps = 2
  cfg.checkpoint_every_steps = 2
  cfg.progress_bar = False


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "paper"
  cfg = base_config()
  cfg.preset = preset
  if preset == "paper":
    pass
  elif preset == "smoke":  # One accelerator, minutes: the pipeline with real weights, not the result.
    cfg.rollout.num_prompts = 16
    cfg.rollout.num_samples = 16
    cfg.rollout.max_new_tokens = 512
    cfg.rollout.prompt_chunk = 8
    cfg.rl.steps = 20
    cfg.rl.micro_batch_prompts = 2
    cfg.rl.micro_batch_rollouts = 8
    cfg.eval.num_problems = 64
    cfg.eval.num_samples = 16
    cfg.eval.samples_per_call = 16
    cfg.eval.prompt_chunk = 8
    cfg.eval.ks = (1, 4, 16)
    cfg.eval.periodic_num_samples = 0
    cfg.eval.max_new_tokens = 512
    cfg.eval.every_steps = 10
    cfg.checkpoint_every_steps = 10
  elif preset == "tiny":
    apply_tiny(cfg, "llama")
  else:
    raise ValueError(f"Unknown gsm8k_smollm2 preset {preset!r}; allowed: paper, smoke, tiny.")
  return cfg
