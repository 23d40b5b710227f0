"""WideResNet (Zagoruyko & Komodakis 2016) as in the official DCIL code (from DPF's code base).

Follows ``models/wideresnet.py`` of Jangho-Kim/DCIL-pytorch: a 3x3 conv to 16 channels, three
stages of (depth - 4) / 6 pre-activation basic blocks (BN-ReLU-conv3x3-BN-ReLU-conv3x3) of widths
16k/32k/64k with stride 2 at the start of stages 2 and 3, no dropout, a final BN-ReLU, global
average pooling and a dense head. Where the shape changes (the first block of every stage, stage 1
included since 16 != 16k) the shortcut is a 1x1 conv *without* BN applied to the *pre-activated*
input, and that block's main path starts from the same pre-activated tensor. Convs use
Kaiming-normal (fan-out) init as in the official code. WRN-28-2 on 10 classes has 1,467,610
parameters (DPF quotes 1.47M).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax.numpy as jnp

from dcil_jax.models.resnet_cifar import Conv, batch_norm


class PreActBlock(nn.Module):
  """A pre-activation basic block; ``x`` is the *raw* output of the previous block."""

  features: int
  strides: int = 1
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    bn = functools.partial(batch_norm, train, self.dtype)
    conv = functools.partial(Conv, dtype=self.dtype)
    y = nn.relu(bn()(x))
    out = conv(self.features, (3, 3), self.strides, padding=1)(y)
    out = conv(self.features, (3, 3), padding=1)(nn.relu(bn()(out)))
    if self.strides == 1 and x.shape[-1] == self.features:
      return x + out
    # A projection block projects the *pre-activated* input, as the official code does.
    return conv(self.features, (1, 1), self.strides)(y) + out


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` for 32x32 inputs (any size works: the pooling is global)."""

  depth: int = 28
  widen_factor: int = 2
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
    blocks = (self.depth - 4) // 6
    x = Conv(16, (3, 3), padding=1, dtype=self.dtype)(x)
    for stage in range(3):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = PreActBlock(16 * self.widen_factor * 2**stage, strides, self.dtype)(x, train)
    x = nn.relu(batch_norm(train, self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


wrn28_2 = functools.partial(WideResNet, depth=28, widen_factor=2)
