"""The config blocks every experiment shares, defined once: one vocabulary for every task.

    from configs import common
    cfg = ml_collections.ConfigDict()
    cfg.task = "maze"
    cfg.seed = 0
    cfg.objective = common.objective()
    cfg.mesh = common.mesh()
    cfg.logging = common.logging()
    common.add_run_fields(cfg, log_every_steps=10, checkpoint_every_steps=50)

Each block is validated next to the code that reads it: the run fields by maxrl_jax/trainers/harness.py
(`validate_run_fields`), the objective by maxrl_jax/trainers/rl.py (`validate_objective`, through the
estimator registry), the mesh by maxrl_jax/sharding.py (`MeshConfig.from_config`), logging by
maxrl_jax/run_logging.py (`sinks_from_config`), the population by maxrl_jax/rl/population.py.
"""

import ml_collections
from ml_collections import config_dict


def add_run_fields(cfg: ml_collections.ConfigDict, *, log_every_steps: int, checkpoint_every_steps: int,
                   keep_checkpoints: int = 2, progress_bar: bool = True) -> ml_collections.ConfigDict:
  """The loop and checkpoint fields of a run (they may change when a run resumes)."""
  cfg.log_every_steps = log_every_steps  # Steps per metrics.jsonl record (the mean over the interval).
  # Steps between checkpoints (a multiple of log_every_steps; the last step is always saved). A SIGTERM or
  # Ctrl-C saves the step it reached as well.
  cfg.checkpoint_every_steps = checkpoint_every_steps
  cfg.keep_checkpoints = keep_checkpoints  # Checkpoints kept per phase (the oldest are deleted).
  # A progress bar on a terminal (never in a log file unless MAXRL_PROGRESS_BAR=1); False: none.
  cfg.progress_bar = progress_bar
  return cfg


def objective(name: str = "maxrl", reduction: str = "token_mean") -> ml_collections.ConfigDict:
  """The objective: an advantage estimator of maxrl_jax.estimators, its options, and the loss around it."""
  block = ml_collections.ConfigDict()
  # maxrl, maclaurin, pkpo, grpo, rloo, reinforce, dr_grpo (and cross_entropy for classification).
  block.name = name
  block.order = config_dict.placeholder(int)  # T, for maclaurin.
  block.k = config_dict.placeholder(int)  # k, for pkpo.
  block.zero_failed_groups = True  # maxrl: the paper's rule (order N-1); False keeps order N.
  # How the loss sums over tokens: "token_mean" (all tokens of the batch weighted equally) is the official
  # code's (verl's default); "sequence_sum" (sum over a rollout's tokens, mean over rollouts) is the unbiased
  # estimate of the policy gradient. Under Adam they differ by a per-batch scale (the mean response length).
  block.reduction = reduction
  block.entropy_coef = 0.0  # > 0 adds an entropy bonus (GRPO + entropy).
  block.smoothing_gamma = 0.0  # > 0: Differential Smoothing (paper: 0.05, with grpo).
  block.self_filter = False  # SELF: zero the advantages of prompts whose greedy decode is correct.
  # The official code's forms, for comparisons with it (docs/fidelity.md): "official" PKPO (a baseline from the
  # other rollouts' rescaled rewards, slightly biased) instead of our unbiased one; the Maclaurin order capped
  # at N instead of refusing order > N; Differential Smoothing's std over the group as a population.
  block.pkpo_form = "unbiased"  # or "official".
  block.cap_order_at_n = False  # maclaurin: True caps order at N (official), False refuses order > N.
  block.smoothing_std = "bessel"  # or "population" (official).
  # The rewards the verifier gives: "binary" (0 or 1; the binary rules refuse others) or, for maxrl,
  # "nonnegative" (partial credit r >= 0: A = (r - mean) / mean, 0 where the mean is 0).
  block.reward_type = "binary"
  # Options other estimators take (unset: their defaults): grpo's std epsilon and population std (variance
  # over N instead of N - 1), pkpo's leave-one-out baseline.
  block.eps = config_dict.placeholder(float)
  block.population_std = config_dict.placeholder(bool)
  block.baseline = config_dict.placeholder(bool)
  return block


def sft(steps: int, batch_size: int, learning_rate: float, *, b1: float = 0.9, b2: float = 0.95,
        weight_decay: float = 0.01, grad_clip: float = 1.0, warmup_steps: int = 0) -> ml_collections.ConfigDict:
  """Supervised warm-up on the task's reference responses (loss on response tokens only): AdamW."""
  block = ml_collections.ConfigDict()
  block.steps = steps  # 0: no SFT (RL starts from the initial policy).
  block.batch_size = batch_size
  block.learning_rate = learning_rate
  block.b1 = b1
  block.b2 = b2
  block.weight_decay = weight_decay
  block.grad_clip = grad_clip  # Global-norm clip; 0 disables it.
  block.warmup_steps = warmup_steps  # Linear warm-up, then constant.
  # A workdir whose final SFT checkpoint to start RL from (skipping SFT here), so that several objectives
  # share one SFT policy; "" trains SFT in this run.
  block.init_from = ""
  return block


def rollout(num_prompts: int, num_samples: int, max_new_tokens: int, temperature: float = 1.0
            ) -> ml_collections.ConfigDict:
  """Rollouts: P prompts x N rollouts per RL step, sampled with the prefix-shared KV-cache sampler."""
  block = ml_collections.ConfigDict()
  block.num_prompts = num_prompts  # P.
  block.num_samples = num_samples  # N, rollouts per prompt.
  block.max_new_tokens = max_new_tokens  # Response cap M (truncated responses score 0).
  block.temperature = temperature
  return block


def rl(steps: int, learning_rate: float, *, b1: float = 0.9, b2: float = 0.999, weight_decay: float = 0.01,
       grad_clip: float = 1.0, warmup_steps: int = 0) -> ml_collections.ConfigDict:
  """The RL phase: AdamW, one update per step (fully on-policy) by default. Betas, weight decay and clip default
  to the official code's (verl's actor defaults). Validated by maxrl_jax/trainers/rl.py (`validate_config`)."""
  block = ml_collections.ConfigDict()
  block.steps = steps
  block.learning_rate = learning_rate
  block.warmup_steps = warmup_steps  # Linear learning-rate warm-up; 0: constant from the first step.
  block.b1 = b1
  block.b2 = b2
  block.weight_decay = weight_decay
  block.grad_clip = grad_clip  # Global-norm clip; 0 disables it.
  # Gradient accumulation: prompts x rollouts per micro-batch. 0 and 0: the whole batch at once for tasks
  # verified on the device; the most that fit the device's memory for language models (the memory plan).
  block.micro_batch_prompts = 0
  block.micro_batch_rollouts = 0
  # Options from other RL libraries (docs/language_models.md: their names in TRL, verl and Tunix); each is
  # off by default, and then the step is the plain on-policy update above.
  # Several optimizer updates per sampled batch: the P prompts split into ppo_mini_batches mini-batches of
  # whole prompt groups (micro-batching inside each), visited ppo_epochs times in a fixed order. One RL step
  # stays one sampled batch; the records' optimizer_updates says how many updates it made.
  block.ppo_mini_batches = 1
  block.ppo_epochs = 1
  # The importance ratio pi_theta / pi_sampling in the loss: "none" (-A log pi, on-policy; needs one update
  # per step), "token" (PPO's clipped surrogate; DAPO with clip_high > clip_low) or "sequence" (GSPO: the
  # length-normalised sequence ratio). Clipped to [1 - clip_low, 1 + clip_high]; records: clip_fraction.
  block.importance_ratio = "none"
  block.clip_low = 0.2
  block.clip_high = 0.2  # DAPO's clip-higher: 0.28.
  # Truncated importance sampling: each token's policy-gradient term times min(pi_learner / pi_sampler,
  # tis_cap), for a sampler in lower precision or with stale weights (verl's tis_imp_ratio_cap, e.g. 2);
  # 0: off. Records: tis_capped_fraction.
  block.tis_cap = 0.0
  # KL penalty to the frozen policy RL starts from (the SFT policy or the loaded checkpoint): 0: off (no
  # reference pass). Estimator k1, k2 or k3 ("low_var_kl"); "loss": kl_coef x the estimate added to the loss
  # (TRL's beta, verl's use_kl_loss), "reward": subtracted from each rollout's advantage (verl's
  # use_kl_in_reward). Records: kl. Population members may differ in kl_coef.
  block.kl_coef = 0.0
  block.kl_estimator = "k3"
  block.kl_in = "loss"
  return block


def add_lora_fields(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """LoRA fields of a model block (maxrl_jax/models/lora.py), for the RL phase; off with lora_rank = 0."""
  # Rank r of the adapters W + (alpha / r) A B on the target projections; 0: train all weights. The base
  # stays frozen (stored once; optimizer state and checkpoints hold the adapters only); SFT, when it runs,
  # trains all weights and its final policy is the base.
  model.lora_rank = 0
  model.lora_alpha = 16.0
  model.lora_targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
  model.lora_base_dtype = ""  # "" keeps the parameters' dtype; "bfloat16" stores the frozen base in half.
  # How the learner computes the adapted model: "merged" (W' formed once per update) or "factorized"
  # (x W + (x A) B); sampling always uses merged weights. docs/benchmarks.md: which is faster.
  model.lora_update = "merged"
  return model


def mesh() -> ml_collections.ConfigDict:
  """Devices (maxrl_jax/sharding.py): a mesh of data x fsdp over every device of every process.

  Batches (prompts with all their rollouts, SFT examples, eval chunks) are split over both axes, so they must
  be multiples of data * fsdp; parameters and optimizer state are split over fsdp (ZeRO-3 style) by
  `param_rules`. One device: nothing changes. Presets: docs/tpu.md. Multi-host (TPU pod slice, several GPU
  hosts): distributed=True on every host.
  """
  block = ml_collections.ConfigDict()
  block.axes = ("data", "fsdp")
  block.shape = (-1, 1)  # Devices per axis; -1 = all remaining devices. E.g. (-1, 4): fsdp over 4.
  # (regex searched in a leaf's path such as "params/layers_0/mlp/up_proj/kernel", placement); first match
  # wins. "fsdp": split the largest dimension the fsdp size divides; "replicate"; or a tuple PartitionSpec.
  block.param_rules = ((".*", "fsdp"),)
  block.distributed = False  # True: jax.distributed.initialize first (multi-host).
  block.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS or auto.
  block.num_processes = -1  # -1 = $JAX_NUM_PROCESSES or auto-detected (TPU pods, SLURM).
  block.process_id = -1  # -1 = $JAX_PROCESS_ID or auto-detected.
  return block


def logging() -> ml_collections.ConfigDict:
  """Where the metrics go besides <workdir>/metrics.jsonl (and the PNG curves written at the end)."""
  block = ml_collections.ConfigDict()
  block.tensorboard = True  # Event files in <workdir>/tensorboard (`tensorboard --logdir=<workdir>`).
  # PNG curves at the end of the run (a population's: population.png and every member's). False leaves them
  # out; `python -m maxrl_jax.plots --workdir=DIR` draws a run's from its metrics.jsonl at any time.
  block.plots = True
  block.wandb = False  # True: also a Weights & Biases run (pip install wandb).
  block.wandb_project = "maxrl_jax"
  return block


def population() -> ml_collections.ConfigDict:
  """Population training (maxrl_jax/rl/population.py): a table of runs as ONE jitted program.

  Members are the cross product objectives x sweep x seeds, stacked on a leading axis and vmapped (sharded
  over a "member" mesh axis); each reproduces the single run with its overrides and seed (same SFT policy per
  seed, same data and sampling keys). Empty tuples (the default) train one run.
  """
  block = ml_collections.ConfigDict()
  # Entries: an estimator name ("maxrl"), or "label: field=value, ..." with fields from
  # population.MEMBER_FIELDS, e.g. "grpo_entropy: objective.name=grpo, objective.entropy_coef=0.01".
  block.objectives = ()
  # Hyperparameter settings crossed with the objectives, "label: field=value, ..." (e.g.
  # "lr3e-4: rl.learning_rate=3e-4"); () = the config's own values.
  block.sweep = ()
  block.seeds = ()  # () = (config.seed,).
  # Devices along the member axis; -1 = gcd(members, devices): members side by side, and the data / fsdp
  # axes of config.mesh inside a member over the remaining devices.
  block.member_devices = -1
  # Members of a device group vmapped together in the RL step (the group loops over chunks): -1 = all on
  # accelerators, 1 on the CPU; 0 = all; n = n at a time. Results are the same up to float round-off.
  block.vmap_chunk = -1
  return block
