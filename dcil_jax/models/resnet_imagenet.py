"""ImageNet ResNets v1.5 (He et al. 2016; torchvision's and Flax's examples/imagenet layout).

A 7x7/2 conv to 64 channels + BN + ReLU and a 3x3/2 max-pool (padding 1, as torchvision), four
stages of widths 64/128/256/512 with stride 2 at the start of stages 2-4, global average pooling
and a dense head in float32. The blocks are the CIFAR ResNets' (:mod:`resnet_cifar`): basic blocks
for ResNet-18, and bottlenecks with expansion 4 that stride in the 3x3 conv (the "v1.5" change)
for ResNet-50; the shortcut is a 1x1 conv + BN wherever the shape changes. Convs use
Kaiming-normal (fan-out) init and, as torchvision's default (``zero_init_residual=False``), the
last BN scale of each block starts at one: zero-init is a training-recipe choice, not part of
the architecture. Parameter counts match torchvision: ResNet-50 on 1000 classes 25,557,032,
ResNet-18 11,689,512.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dcil_jax.models.resnet_cifar import BasicBlock, Bottleneck, Conv, batch_norm


class ResNet(nn.Module):
  """An ImageNet ResNet; ``block_cls`` is :class:`BasicBlock` or :class:`Bottleneck`."""

  stage_sizes: Sequence[int]
  block_cls: type[nn.Module] = Bottleneck
  num_classes: int = 1000
  width: int = 64
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = Conv(self.width, (7, 7), 2, padding=3, dtype=self.dtype)(x)
    x = nn.relu(batch_norm(train, self.dtype)(x))
    # Explicit padding 1 (not "SAME", which pads 0/1 on even sizes) keeps torchvision's alignment.
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for b in range(blocks):
        strides = 2 if stage > 0 and b == 0 else 1
        x = self.block_cls(self.width * 2**stage, strides, dtype=self.dtype)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
resnet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
# Two basic blocks of width 8/16: a train step compiles in seconds on CPU (tests, smoke runs).
resnet_tiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock, width=8)
