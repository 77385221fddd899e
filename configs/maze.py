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


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  preset = arg or "default"
  cfg = ml_collections.ConfigDict()
  cfg.task = "maze"
  cfg.preset = preset
  cfg.seed = 0  # One seed; named keys (init, sft, rl, eval) are split from it.

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

  # Supervised warm-up on BFS shortest paths (loss on response tokens only).
  cfg.sft = ml_collections.ConfigDict()
  cfg.sft.steps = 600  # Reaches ~25% held-out pass@1 at the default size, leaving room for RL.
  cfg.sft.batch_size = 32
  cfg.sft.learning_rate = 5e-4
  cfg.sft.b1 = 0.9
  cfg.sft.b2 = 0.95
  cfg.sft.weight_decay = 0.01
  cfg.sft.grad_clip = 1.0
  cfg.sft.warmup_steps = 20
  # A workdir whose final SFT checkpoint to start RL from (skipping SFT here), so that several objectives
  # share one SFT policy; "" trains SFT in this run.
  cfg.sft.init_from = ""

  # Rollouts: P prompts x N rollouts per RL step, sampled with the prefix-shared KV-cache sampler.
  cfg.rollout = ml_collections.ConfigDict()
  cfg.rollout.num_prompts = 16  # P.
  cfg.rollout.num_samples = 16  # N, rollouts per prompt.
  cfg.rollout.max_new_tokens = 40  # Response cap (truncated responses score 0); paper: 180.
  cfg.rollout.temperature = 1.0

  # The objective: an advantage estimator from maxrl_jax.estimators (maxrl, maclaurin, pkpo, grpo, rloo,
  # reinforce, dr_grpo) and the loss reduction.
  cfg.objective = ml_collections.ConfigDict()
  cfg.objective.name = "maxrl"
  cfg.objective.order = ml_collections.config_dict.placeholder(int)  # T, for maclaurin.
  cfg.objective.k = ml_collections.config_dict.placeholder(int)  # k, for pkpo.
  cfg.objective.zero_failed_groups = True  # maxrl: the paper's rule (order N-1); False keeps order N.
  # How the loss sums over tokens: "token_mean" (all tokens of the batch weighted equally) is the official
  # code's (verl's default); "sequence_sum" (sum over a rollout's tokens, mean over rollouts) is the unbiased
  # estimate of the policy gradient. Under Adam they differ by a per-batch scale (the mean response length).
  cfg.objective.reduction = "token_mean"
  cfg.objective.entropy_coef = 0.0  # > 0 adds an entropy bonus (GRPO + entropy).
  cfg.objective.smoothing_gamma = 0.0  # > 0: Differential Smoothing (paper: 0.05, with grpo).
  cfg.objective.self_filter = False  # SELF: zero the advantages of prompts whose greedy decode is correct.
  # The official code's forms, for comparisons with it (docs/fidelity.md): "official" PKPO (a baseline from the
  # other rollouts' rescaled rewards, slightly biased) instead of our unbiased one; the Maclaurin order capped
  # at N instead of refusing order > N; Differential Smoothing's std over the group as a population.
  cfg.objective.pkpo_form = "unbiased"  # or "official".
  cfg.objective.cap_order_at_n = False  # maclaurin: True caps order at N (official), False refuses order > N.
  cfg.objective.smoothing_std = "bessel"  # or "population" (official).

  # RL optimiser: AdamW, constant learning rate, one update per step (fully on-policy). Betas, weight decay
  # and clip are the official code's (verl's actor defaults).
  cfg.rl = ml_collections.ConfigDict()
  cfg.rl.steps = 200
  cfg.rl.learning_rate = 1e-4
  cfg.rl.b1 = 0.9
  cfg.rl.b2 = 0.999
  cfg.rl.weight_decay = 0.01
  cfg.rl.grad_clip = 1.0

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

  # Devices (maxrl_jax/sharding.py): a mesh of data x fsdp over every device of every process. Batches
  # (prompts with all their rollouts, SFT examples, eval chunks) are split over both axes, so
  # rollout.num_prompts, sft.batch_size and eval.prompt_chunk must be multiples of data * fsdp; parameters and
  # optimizer state are split over fsdp (ZeRO-3 style) by `param_rules`. One device: nothing changes.
  # Presets: docs/tpu.md. Multi-host (TPU pod slice, several GPU hosts): distributed=True on every host.
  cfg.mesh = ml_collections.ConfigDict()
  cfg.mesh.axes = ("data", "fsdp")
  cfg.mesh.shape = (-1, 1)  # Devices per axis; -1 = all remaining devices. E.g. (-1, 4): fsdp over 4.
  # (regex searched in a leaf's path such as "params/layers_0/mlp/up_proj/kernel", placement); first match
  # wins. "fsdp": split the largest dimension the fsdp size divides; "replicate"; or a tuple PartitionSpec.
  cfg.mesh.param_rules = ((".*", "fsdp"),)
  cfg.mesh.distributed = False  # True: jax.distributed.initialize first (multi-host).
  cfg.mesh.coordinator_address = ""  # "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS or auto.
  cfg.mesh.num_processes = -1  # -1 = $JAX_NUM_PROCESSES or auto-detected (TPU pods, SLURM).
  cfg.mesh.process_id = -1  # -1 = $JAX_PROCESS_ID or auto-detected.

  # Population training (maxrl_jax/population.py): a table of runs as ONE jitted program, members stacked on
  # a leading axis and vmapped (sharded over a "member" mesh axis). Members are the cross product
  # objectives x sweep x seeds; each reproduces the single run with its overrides and seed (same SFT policy
  # per seed, same mazes and sampling keys). Empty tuples (the default) train one run as configured above.
  cfg.population = ml_collections.ConfigDict()
  # Entries: an estimator name ("maxrl"), or "label: field=value, ..." with fields from
  # population.MEMBER_FIELDS, e.g. "grpo_entropy: objective.name=grpo, objective.entropy_coef=0.01".
  cfg.population.objectives = ()
  # Hyperparameter settings crossed with the objectives, "label: field=value, ..." (e.g.
  # "lr3e-4: rl.learning_rate=3e-4"); () = the config's own values.
  cfg.population.sweep = ()
  cfg.population.seeds = ()  # () = (config.seed,).
  # Devices along the member axis; -1 = gcd(members, devices): members side by side, and the data / fsdp
  # axes of config.mesh inside a member over the remaining devices.
  cfg.population.member_devices = -1
  # Members of a device group vmapped together in the RL step (the group loops over chunks): -1 = all on
  # accelerators, 1 on the CPU; 0 = all; n = n at a time. Results are the same up to float round-off.
  cfg.population.vmap_chunk = -1

  # Where the metrics go besides <workdir>/metrics.jsonl (and the PNG curves written at the end).
  cfg.logging = ml_collections.ConfigDict()
  cfg.logging.tensorboard = True  # Event files in <workdir>/tensorboard (`tensorboard --logdir=<workdir>`).
  # PNG curves at the end of the run (a population's: population.png and every member's). False leaves them
  # out; `python -m maxrl_jax.plots --workdir=DIR` draws a run's from its metrics.jsonl at any time.
  cfg.logging.plots = True
  cfg.logging.wandb = False  # True: also a Weights & Biases run (pip install wandb).
  cfg.logging.wandb_project = "maxrl_jax"

  cfg.log_every_steps = 10
  cfg.checkpoint_every_steps = 50
  cfg.keep_checkpoints = 2
  cfg.progress_bar = True

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
