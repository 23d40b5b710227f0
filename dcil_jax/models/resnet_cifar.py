"""CIFAR ResNets in the DPF / DCIL convention (He et al. 2016, as in the official code).

Stages of 16/32/64 planes; depth < 44 uses basic blocks (ResNet-20 = [3,3,3], ResNet-32 =
[5,5,5]), depth >= 44 bottleneck blocks with expansion 4 (ResNet-56 = [9,9,9]); the shortcut is
a 1x1 conv + BN wherever the shape changes; Kaiming-normal (fan-out) init. BatchNorm follows
PyTorch's defaults (momentum 0.1, eps 1e-5); note that Flax tracks the *biased* batch variance
in its running statistics where PyTorch uses the unbiased one.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
Conv = functools.partial(nn.Conv, use_bias=False, kernel_init=kaiming_fan_out)


def batch_norm(train: bool, dtype) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype)


class BasicBlock(nn.Module):
  planes: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(batch_norm, train, self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    y = nn.relu(bn()(conv(self.planes, (3, 3), self.strides, padding=1)(x)))
    y = bn()(conv(self.planes, (3, 3), padding=1)(y))
    return nn.relu(y + shortcut(x, self.planes, self.strides, train, self.dtype))


class Bottleneck(nn.Module):
  planes: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(batch_norm, train, self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    y = nn.relu(bn()(conv(self.planes, (1, 1))(x)))
    y = nn.relu(bn()(conv(self.planes, (3, 3), self.strides, padding=1)(y)))
    y = bn()(conv(self.planes * 4, (1, 1))(y))
    return nn.relu(y + shortcut(x, self.planes * 4, self.strides, train, self.dtype))


def shortcut(x, features: int, strides: int, train: bool, dtype):
  if strides == 1 and x.shape[-1] == features:
    return x
  y = Conv(features, (1, 1), strides, dtype=dtype)(x)
  return batch_norm(train, dtype)(y)


class ResNetCifar(nn.Module):
  """A CIFAR ResNet; ``block_cls`` is :class:`BasicBlock` or :class:`Bottleneck`."""

  stage_sizes: Sequence[int]
  block_cls: type[nn.Module] = BasicBlock
  num_classes: int = 10
  width: int = 16
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.width, (3, 3), padding=1, dtype=self.dtype)(x)
    x = nn.relu(batch_norm(train, self.dtype)(x))
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = self.block_cls(self.width * 2**stage, strides, dtype=self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


resnet8 = functools.partial(ResNetCifar, stage_sizes=(1, 1, 1))  # small data (8x8 digits)
resnet20 = functools.partial(ResNetCifar, stage_sizes=(3, 3, 3))
resnet32 = functools.partial(ResNetCifar, stage_sizes=(5, 5, 5))
resnet56 = functools.partial(ResNetCifar, stage_sizes=(9, 9, 9), block_cls=Bottleneck)
