"""VGG-16 with BatchNorm for CIFAR (configuration "D" of Simonyan & Zisserman 2015).

DPF released no official code and DCIL's official code (Jangho-Kim/DCIL-pytorch) has no VGG, so
this follows the common CIFAR form used in pruning work: every conv is 3x3, padding 1, + BN +
ReLU, a 2x2 max-pool at each "M", then the 1x1x512 map (at 32x32 input) is flattened into a
single dense head. Convs use Kaiming-normal (fan-out) init, as the DPF authors' own VGG
(``pcode/models/vgg.py`` in Tao Lin's code base, e.g. LINs-lab/FedTHE) does. Two deliberate
differences from that code: its head is Dropout-Dense(512)-ReLU-Dropout-Dense(512)-ReLU-Dense
(+0.53M parameters; the single dense head is what gives the field's "VGG16 14.7M"), and its convs
carry biases, which are redundant before BN (4,224 parameters; dropped as in every conv here).
VGG-16 on 10 classes has 14,724,042 parameters.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp

from dcil_jax.models.resnet_cifar import Conv, batch_norm

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M") + (512, 512, 512, "M") * 2


class VGG(nn.Module):
  """A VGG with BN; ``config`` lists conv widths and "M" (max-pool) as in the PyTorch code."""

  config: Sequence[int | str] = VGG16_CONFIG
  num_classes: int = 10
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    for v in self.config:
      if v == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = Conv(v, (3, 3), padding=1, dtype=self.dtype)(x)
        x = nn.relu(batch_norm(train, self.dtype)(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=jnp.float32)(x.astype(jnp.float32))


vgg16 = functools.partial(VGG, config=VGG16_CONFIG)
