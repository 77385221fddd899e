"""Classifiers for the classification testbed: an MLP, a small CNN and the ResNet family (18/34/50/101/152).

Every model maps float images `x_BxHxWxC` (already normalised) to float32 logits `[B, num_classes]` and takes
`train: bool`. Models with batch norm keep their running statistics in the `batch_stats` collection:

    logits, updates = model.apply({"params": p, "batch_stats": s}, x, train=True, mutable=["batch_stats"])
    logits = model.apply({"params": p, "batch_stats": s}, x, train=False)   # running averages, no mutation

In train mode batch norm normalises with the batch's own statistics and returns updated running averages; in
eval mode it uses the running averages, so one example's logits do not depend on the rest of the batch.

`zero_init_head=True` (the default) initialises the output layer to zero, so the initial policy is exactly
uniform and the initial pass rate is exactly 1 / num_classes: the hard regime of the paper's ImageNet study
(p ~ 0.001) is reproduced by construction rather than by the luck of a random init.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

ModuleDef = Any

# Stage sizes and block type of the standard ResNets (He et al., 2016).
RESNET_DEPTHS: dict[int, tuple[tuple[int, ...], str]] = {
    18: ((2, 2, 2, 2), "basic"),
    34: ((3, 4, 6, 3), "basic"),
    50: ((3, 4, 6, 3), "bottleneck"),
    101: ((3, 4, 23, 3), "bottleneck"),
    152: ((3, 8, 36, 3), "bottleneck"),
}

MODEL_NAMES = ("mlp", "cnn", "resnet")


def _head(num_classes: int, zero_init: bool, dtype) -> nn.Dense:
  kernel_init = nn.initializers.zeros if zero_init else nn.initializers.lecun_normal()
  return nn.Dense(num_classes, kernel_init=kernel_init, dtype=dtype, name="head")


class MLP(nn.Module):
  """Flatten, then `hidden_sizes` ReLU layers, then a linear head. No batch norm."""

  num_classes: int
  hidden_sizes: Sequence[int] = (256, 256)
  zero_init_head: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    del train  # No train/eval difference.
    x = x_BxHxWxC.reshape(x_BxHxWxC.shape[0], -1).astype(self.dtype)
    for width in self.hidden_sizes:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return _head(self.num_classes, self.zero_init_head, self.dtype)(x).astype(jnp.float32)


class SmallCNN(nn.Module):
  """Conv(3x3) blocks (each conv -> [BN] -> ReLU, then 2x2 max-pool), global average pool, dense, head."""

  num_classes: int
  channels: Sequence[int] = (32, 64, 128)
  dense_size: int = 256
  batch_norm: bool = True
  zero_init_head: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    x = x_BxHxWxC.astype(self.dtype)
    for channels in self.channels:
      x = nn.Conv(channels, (3, 3), use_bias=not self.batch_norm, dtype=self.dtype)(x)
      if self.batch_norm:
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
      x = nn.relu(x)
      if min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.relu(nn.Dense(self.dense_size, dtype=self.dtype)(x))
    return _head(self.num_classes, self.zero_init_head, self.dtype)(x).astype(jnp.float32)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), (self.strides, self.strides))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    # Zero-init of the last scale: each block starts as the identity.
    y = self.norm(scale_init=nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), (self.strides, self.strides), name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet-50/101/152, stride on the 3x3 as in v1.5)."""

  filters: int
  conv: ModuleDef
  norm: ModuleDef
  strides: int = 1
  zero_init_residual: bool = True

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), (self.strides, self.strides))(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=nn.initializers.zeros if self.zero_init_residual else nn.initializers.ones)(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), (self.strides, self.strides), name="proj_conv")(residual)
      residual = self.norm(name="proj_bn")(residual)
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet v1.5 with batch norm.

  Attributes:
    num_classes: output classes.
    depth: one of RESNET_DEPTHS (18, 34, 50, 101, 152).
    width: channels of the first stage (64 in the standard nets); stage s has width * 2^s.
    stem: "imagenet" (7x7 stride-2 conv + 3x3 stride-2 max-pool, for 224px inputs) or "cifar" (one 3x3
      stride-1 conv, no pool, for 32px inputs).
    zero_init_residual: zero the scale of each block's last batch norm (the block starts as the identity);
      False is torchvision's default.
    zero_init_head: zero the output layer (uniform initial policy).
    dtype: compute dtype (e.g. bfloat16 on accelerators); parameters and logits stay float32.
  """

  num_classes: int
  depth: int = 50
  width: int = 64
  stem: str = "imagenet"
  zero_init_residual: bool = True
  zero_init_head: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxHxWxC: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    stage_sizes, block_type = RESNET_DEPTHS[self.depth]
    block_cls = BasicBlock if block_type == "basic" else BottleneckBlock
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype, padding="SAME")
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)
    x = x_BxHxWxC.astype(self.dtype)
    if self.stem == "imagenet":
      x = conv(self.width, (7, 7), (2, 2), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    else:
      x = conv(self.width, (3, 3), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
    for stage, num_blocks in enumerate(stage_sizes):
      for block in range(num_blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = block_cls(self.width * 2**stage, conv=conv, norm=norm, strides=strides,
                      zero_init_residual=self.zero_init_residual)(x)
    x = jnp.mean(x, axis=(1, 2))
    return _head(self.num_classes, self.zero_init_head, self.dtype)(x).astype(jnp.float32)


_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def create_model(model_config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
  """Builds the classifier named by `model_config.name` (see configs/classification.py for the fields)."""
  name = model_config.name
  dtype_name = model_config.get("dtype", "float32")
  if dtype_name not in _DTYPES:
    raise ValueError(f"config.model.dtype={dtype_name!r}; allowed: {sorted(_DTYPES)}.")
  dtype = _DTYPES[dtype_name]
  zero_init_head = bool(model_config.get("zero_init_head", True))
  if name == "mlp":
    hidden = tuple(int(h) for h in model_config.hidden_sizes)
    if any(h < 1 for h in hidden):
      raise ValueError(f"config.model.hidden_sizes={hidden!r} must be positive integers.")
    return MLP(num_classes, hidden, zero_init_head, dtype)
  if name == "cnn":
    return SmallCNN(num_classes, tuple(int(c) for c in model_config.channels), int(model_config.dense_size),
                    bool(model_config.batch_norm), zero_init_head, dtype)
  if name == "resnet":
    if model_config.depth not in RESNET_DEPTHS:
      raise ValueError(f"config.model.depth={model_config.depth!r}; allowed ResNet depths: "
                       f"{sorted(RESNET_DEPTHS)}.")
    if model_config.stem not in ("imagenet", "cifar"):
      raise ValueError(f"config.model.stem={model_config.stem!r}; allowed: 'imagenet' (224px inputs) or "
                       "'cifar' (32px inputs).")
    return ResNet(num_classes, int(model_config.depth), int(model_config.width), model_config.stem,
                  bool(model_config.get("zero_init_residual", True)), zero_init_head, dtype)
  raise ValueError(f"config.model.name={name!r}; allowed: {list(MODEL_NAMES)}.")


def has_batch_norm(variables: dict) -> bool:
  """Whether initialised variables carry batch-norm running statistics."""
  return bool(variables.get("batch_stats"))


__all__ = ["MLP", "SmallCNN", "ResNet", "BasicBlock", "BottleneckBlock", "RESNET_DEPTHS", "MODEL_NAMES",
           "create_model", "has_batch_norm"]
