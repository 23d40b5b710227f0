"""The MNIST-1D models: the paper's CNN and a small 1-D ResNet (plain Flax, 1-D kernels).

Inputs are ``[batch, length, channels]`` signals (MNIST-1D: length 40, one channel).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from dcil_jax.models.resnet_cifar import Conv, batch_norm


class MNIST1DCNN(nn.Module):
  """The CNN of the MNIST-1D paper (Greydanus 2020, ``ConvBase``): three conv + ReLU layers of
  25 channels (kernel 5, 3, 3; stride 2; padding 1), flatten, a linear head. About 5,000
  parameters, 3,875 of them in the convolutions; ~94 % test accuracy in the paper."""

  num_classes: int = 10
  channels: int = 25
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm or dropout
    for kernel in (5, 3, 3):
      x = nn.Conv(self.channels, (kernel,), 2, padding=1, dtype=self.dtype)(x)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


class _Block1D(nn.Module):
  planes: int
  strides: int
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(batch_norm, train, self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    y = nn.relu(bn()(conv(self.planes, (3,), self.strides, padding=1)(x)))
    y = bn()(conv(self.planes, (3,), padding=1)(y))
    if self.strides != 1 or x.shape[-1] != self.planes:
      x = bn()(conv(self.planes, (1,), self.strides)(x))
    return nn.relu(y + x)


class ResNet1D(nn.Module):
  """A small 1-D ResNet: a 3-tap stem conv, one basic block per stage (widths ``widths``, stride 2
  from the second stage, 1x1 conv shortcuts), global average pooling, a linear head."""

  num_classes: int = 10
  widths: tuple[int, ...] = (16, 32, 64)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.widths[0], (3,), padding=1, dtype=self.dtype)(x)
    x = nn.relu(batch_norm(train, self.dtype)(x))
    for i, width in enumerate(self.widths):
      x = _Block1D(width, 1 if i == 0 else 2, self.dtype)(x, train)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))
