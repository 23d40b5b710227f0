"""A small conv net for the offline quickstart (8x8 digits) and fast tests."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from dcil_jax.models.resnet_cifar import Conv, batch_norm


class SmallCNN(nn.Module):
  """Three 3x3 conv + BN + ReLU layers (the last one strided), global pooling, a dense head."""

  num_classes: int = 10
  widths: tuple[int, ...] = (32, 64, 128)
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for i, width in enumerate(self.widths):
      strides = 2 if i == len(self.widths) - 1 else 1
      x = Conv(width, (3, 3), strides, padding=1, dtype=self.dtype)(x)
      x = nn.relu(batch_norm(train, self.dtype)(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))
