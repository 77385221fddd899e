"""Classification testbed: MaxRL against exact maximum likelihood (cross-entropy) and RL, as in the paper's
ImageNet study.

A rollout is a class sampled from the classifier's softmax, r = 1 iff it is the label, so the pass rate
p = softmax[label] is exact and cross-entropy is exact maximum likelihood. With many classes and a uniform
initial policy (p = 1/C) REINFORCE has almost no signal, while MaxRL approaches cross-entropy as N grows.

Run one configuration (the tiny default needs no download and trains in about 10 s on a 2-core CPU):

  python -m maxrl_jax.main --config=configs/classification.py --workdir=/tmp/cls/maxrl_256
  python -m maxrl_jax.main --config=configs/classification.py:tiny --workdir=/tmp/cls/grpo_64 \
      --config.objective.name=grpo --config.rollout.num_samples=64
  python -m maxrl_jax.main --config=configs/classification.py:tiny --workdir=/tmp/cls/ce \
      --config.objective.name=cross_entropy
  python -m maxrl_jax.main --config=configs/classification.py:tiny --workdir=/tmp/cls/mac \
      --config.objective.name=maclaurin --config.objective.order=16

The sweep over objectives x N with its table and plots:

  python -m experiments.classification_sweep --config=configs/classification.py:tiny --workdir=/tmp/cls_sweep

Presets (`configs/classification.py:<preset>`):
  tiny      MLP on the embedded procedural dataset (200 classes, initial pass rate 0.5%), CPU, ~10 s per run.
  mnist     small CNN with batch norm on TFDS mnist (10 classes).
  cifar10   ResNet-18 (CIFAR stem) on TFDS cifar10; cifar100 the same on cifar100 (initial pass rate 1%).
  imagenet  the paper's study: ResNet-50 on imagenet2012, SGD momentum 0.9, lr 0.1, weight decay 1e-4, batch
            256, 20 epochs, cosine schedule with a 2-epoch linear warm-up (as in the authors' script),
            random-resized-crop + flip at 224px, float32.
Real datasets must be prepared once as ArrayRecord (the error message says how); nothing needs TensorFlow
to read them. The data dir is <workdir>/tfds unless --config.data.data_dir names another one (e.g. the
~/tensorflow_datasets where a dataset was prepared).
"""

import ml_collections
from ml_collections import config_dict

from configs import common

PRESETS = ("tiny", "mnist", "cifar10", "cifar100", "imagenet")


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "classification"
  config.seed = 0  # One seed; split into named keys (init, rollouts, augmentation, data order).

  # Model. name: mlp | cnn | resnet. Fields of the other models are kept so CLI overrides can switch models.
  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"
  config.model.hidden_sizes = (256, 256)  # mlp
  config.model.channels = (32, 64, 128)  # cnn: one conv block (conv-BN-ReLU-pool) per entry
  config.model.dense_size = 256  # cnn
  config.model.batch_norm = True  # cnn
  config.model.depth = 18  # resnet: 18 | 34 | 50 | 101 | 152
  config.model.width = 64  # resnet: channels of the first stage
  config.model.stem = "cifar"  # resnet: 'imagenet' (7x7/2 conv + max-pool) or 'cifar' (3x3/1 conv)
  config.model.zero_init_residual = True  # resnet: zero the last BN scale of each block
  config.model.zero_init_head = True  # zero output layer: initial policy exactly uniform, p0 = 1/C
  config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 | float16

  # Data: any prepared TFDS image classification dataset, or the embedded procedural one.
  config.data = ml_collections.ConfigDict()
  config.data.name = "procedural_classes/c200"  # or procedural_classes/c1000, mnist, cifar10, imagenet2012
  config.data.data_dir = config_dict.placeholder(str)  # TFDS data dir; None: <workdir>/tfds
  config.data.train_split = "train"
  config.data.eval_split = "test"  # held-out split ('validation' for imagenet2012)
  config.data.image_size = config_dict.placeholder(int)  # None: stored size; set to stream and resize
  config.data.storage = "auto"  # auto | memory (read splits into host memory) | stream (read by index)
  config.data.max_in_memory_examples = 300_000  # 'auto' streams larger train splits
  config.data.augment = "none"  # none | flip | crop_flip | inception_crop
  config.data.mean = ()  # per-channel mean of [0, 1] pixels; () = the dataset's standard value
  config.data.std = ()
  config.data.num_workers = 8  # threads decoding streamed images

  # Objective: 'cross_entropy' (exact ML) or an estimator of maxrl_jax.estimators (reinforce, rloo, dr_grpo,
  # grpo, maxrl, maclaurin, pkpo) with its options (unset ones take the estimator's defaults, so e.g.
  # --config.objective.order=16 is only needed for maclaurin). The official code's forms: pkpo_form="official",
  # maclaurin cap_order_at_n=True, grpo population_std=True. The count-based losses take no entropy bonus,
  # Differential Smoothing or SELF.
  config.objective = common.objective("maxrl")

  # Rollouts: N classes drawn per input from the softmax (ignored by cross_entropy).
  config.rollout = ml_collections.ConfigDict()
  config.rollout.num_samples = 256  # N; the count-based loss costs the same for any N
  config.rollout.sampler = "auto"  # auto | categorical (inverse CDF, O(B N)) | binomial (O(B C), any N)

  # Optimiser.
  config.optim = ml_collections.ConfigDict()
  config.optim.name = "sgd"  # sgd | adamw
  config.optim.learning_rate = 0.1  # peak learning rate
  config.optim.momentum = 0.9  # sgd
  config.optim.nesterov = False  # sgd
  config.optim.b1 = 0.9  # adamw
  config.optim.b2 = 0.999  # adamw
  config.optim.weight_decay = 1e-4  # sgd: L2 added to the gradient (PyTorch SGD); adamw: decoupled
  config.optim.schedule = "cosine"  # cosine (to 0, after a linear warm-up) | constant
  config.optim.warmup_epochs = 0.0  # linear warm-up length in epochs ...
  config.optim.warmup_steps = -1  # ... or in steps (>= 0 overrides warmup_epochs)
  config.optim.grad_clip = 0.0  # global-norm clipping; 0 disables

  # Training loop.
  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128  # inputs per step (global, split over devices)
  config.train.num_epochs = 1.0
  config.train.num_steps = -1  # > 0 overrides num_epochs
  config.train.steps_per_call = 100  # steps fused in one jitted lax.scan; must divide the log, eval, checkpoint intervals

  # Evaluation (analytic pass@k from the exact p, top-1 = majority vote as the sample count grows).
  config.eval = ml_collections.ConfigDict()
  config.eval.every_steps = 500  # 0: only at the start and the end
  config.eval.batch_size = 1000
  config.eval.max_examples = -1  # held-out examples used; -1: the whole split
  config.eval.num_train_examples = 2000  # fixed random subset of the train split, evaluated the same way
  config.eval.ks = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

  config.mesh = common.mesh()
  config.logging = common.logging()
  # Checkpoints (orbax, workdir/checkpoints/train/<step>) every checkpoint_every_steps (0: only at the end;
  # the last step is always saved).
  common.add_run_fields(config, log_every_steps=100, checkpoint_every_steps=0, keep_checkpoints=2)
  return config


def get_config(arg=None):
  """Returns the config of a preset: tiny (default), mnist, cifar10, cifar100 or imagenet."""
  preset = (arg or "tiny").strip()
  if preset not in PRESETS:
    raise ValueError(f"Unknown classification preset {preset!r}; allowed: {list(PRESETS)}.")
  config = _base()
  config.preset = preset

  if preset == "tiny":
    # 200 procedural classes, 20k train / 4k test 16x16 images; 3000 steps of batch 128 (~19 epochs).
    config.model.name = "mlp"
    config.train.batch_size = 128
    config.train.num_steps = 3000
    config.optim.warmup_steps = 150
    config.eval.every_steps = 200

  elif preset == "mnist":
    config.model.name = "cnn"
    config.data.name = "mnist"
    config.train.batch_size = 128
    config.train.num_epochs = 5.0
    config.optim.warmup_epochs = 0.5
    config.eval.every_steps = 500

  elif preset in ("cifar10", "cifar100"):
    config.model.name = "resnet"
    config.model.depth = 18
    config.model.stem = "cifar"
    config.data.name = preset
    config.data.augment = "crop_flip"
    config.train.batch_size = 256
    config.train.num_epochs = 20.0
    config.optim.warmup_epochs = 2.0
    config.log_every_steps = 50
    config.train.steps_per_call = 50
    config.eval.every_steps = 1000
    config.eval.num_train_examples = 10_000

  elif preset == "imagenet":
    # The paper's ImageNet study (the authors' script: torchvision ResNet-50, fp32).
    config.model.name = "resnet"
    config.model.depth = 50
    config.model.stem = "imagenet"
    config.model.zero_init_residual = False  # torchvision's default init
    config.model.zero_init_head = False
    config.data.name = "imagenet2012"
    config.data.eval_split = "validation"
    config.data.image_size = 224
    config.data.storage = "stream"
    config.data.augment = "inception_crop"
    config.data.num_workers = 32
    config.rollout.num_samples = 1024
    config.train.batch_size = 256
    config.train.num_epochs = 20.0
    config.optim.learning_rate = 0.1
    config.optim.momentum = 0.9
    config.optim.weight_decay = 1e-4
    config.optim.warmup_epochs = 2.0
    config.log_every_steps = 100
    config.train.steps_per_call = 1  # streamed batches: one step per call
    config.eval.every_steps = 1000
    config.eval.batch_size = 500
    config.eval.num_train_examples = 10_000
    config.checkpoint_every_steps = 5000

  return config
