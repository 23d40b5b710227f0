"""The training recipes: the official DCIL scripts' for CIFAR, the standard one for ImageNet.

A config names a recipe (or ``"auto"``: the recipe of its model's family) and may override any
field of it; :func:`experiments.resolve.resolve_config` merges the two when a run starts.
Epoch-valued fields are in (possibly fractional) epochs of the training split.
"""

from __future__ import annotations

from typing import Any

# Fields every recipe sets (and a config may override).
RECIPE_FIELDS = (
  "num_epochs",
  "batch_size",
  "learning_rate",
  "lr_reference_batch",
  "lr_schedule",
  "warmup_epochs",
  "warmup_init_lr",
  "lr_boundaries",
  "lr_decay",
  "weight_decay",
  "ramp_end_epoch",
  "kd_start_epoch",
)

RECIPES: dict[str, dict[str, Any]] = {
  # ResNet-20/32/56: SGD Nesterov 0.9, lr 0.2 after a linear warm-up from 0.1 over 5 epochs,
  # x0.1 at 150 and 225 of 300. The official code has no VGG; VGG-16 is trained the same way.
  "cifar_resnet": dict(
    num_epochs=300,
    batch_size=128,
    learning_rate=0.2,
    lr_reference_batch=0,  # 0: the learning rate does not scale with the batch
    lr_schedule="step",
    warmup_epochs=5.0,
    warmup_init_lr=0.1,
    lr_boundaries=(150, 225),
    lr_decay=0.1,
    weight_decay=1e-4,
    ramp_end_epoch=225.0,
    kd_start_epoch=70.0,
  ),
  # WRN-28-2: lr 0.1, x0.2 at 60, 120 and 160 of 195, weight decay 5e-4, ramp end 120.
  "cifar_wrn": dict(
    num_epochs=195,
    batch_size=128,
    learning_rate=0.1,
    lr_reference_batch=0,
    lr_schedule="step",
    warmup_epochs=0.0,
    warmup_init_lr=0.1,
    lr_boundaries=(60, 120, 160),
    lr_decay=0.2,
    weight_decay=5e-4,
    ramp_end_epoch=120.0,
    kd_start_epoch=70.0,
  ),
  # No official ImageNet recipe exists; this is the standard ResNet-50 one (Goyal et al.):
  # batch 1024, lr 0.1 x batch/256, 5 warm-up epochs from 0 then cosine to 0, 100 epochs,
  # weight decay 1e-4; the sparsity ramp ends at 75 % of training, distillation starts at 25 %.
  "imagenet_resnet": dict(
    num_epochs=100,
    batch_size=1024,
    learning_rate=0.1,
    lr_reference_batch=256,
    lr_schedule="cosine",
    warmup_epochs=5.0,
    warmup_init_lr=0.0,
    lr_boundaries=(),
    lr_decay=0.1,
    weight_decay=1e-4,
    ramp_end_epoch=75.0,
    kd_start_epoch=25.0,
  ),
  # The offline study on scikit-learn's digits (experiments/configs/digits.py): the official
  # CIFAR recipe with every epoch count scaled from 300 to 60 epochs (warm-up 1, lr x0.1 at 30
  # and 45, ramp end 45, distillation from 14); 11 steps of 128 per epoch.
  "digits": dict(
    num_epochs=60,
    batch_size=128,
    learning_rate=0.2,
    lr_reference_batch=0,
    lr_schedule="step",
    warmup_epochs=1.0,
    warmup_init_lr=0.1,
    lr_boundaries=(30, 45),
    lr_decay=0.1,
    weight_decay=1e-4,
    ramp_end_epoch=45.0,
    kd_start_epoch=14.0,
  ),
  # MNIST-1D (experiments/configs/mnist1d.py): the same official recipe scaled to 30 epochs
  # (warm-up 1, lr x0.1 at 15 and 22, ramp end 22, distillation from 7); 31 steps of 128 per
  # epoch. RigL's mask updates end at 75 % of training, as in its paper.
  "mnist1d": dict(
    num_epochs=30,
    batch_size=128,
    learning_rate=0.2,
    lr_reference_batch=0,
    lr_schedule="step",
    warmup_epochs=1.0,
    warmup_init_lr=0.1,
    lr_boundaries=(15, 22),
    lr_decay=0.1,
    weight_decay=1e-4,
    ramp_end_epoch=22.0,
    kd_start_epoch=7.0,
  ),
}

# The recipe of each model for "auto".
MODEL_RECIPES = {
  "resnet8": "cifar_resnet",
  "resnet20": "cifar_resnet",
  "resnet32": "cifar_resnet",
  "resnet56": "cifar_resnet",
  "vgg16": "cifar_resnet",
  "small_cnn": "cifar_resnet",
  "wrn28_2": "cifar_wrn",
  "resnet18": "imagenet_resnet",
  "resnet50": "imagenet_resnet",
  "resnet_tiny": "imagenet_resnet",
  "mnist1d_cnn": "mnist1d",
  "resnet1d": "mnist1d",
}


def recipe_for(name: str, model: str) -> dict[str, Any]:
  """The recipe called ``name``, or the model's own for ``name="auto"``."""
  if name == "auto":
    if model not in MODEL_RECIPES:
      raise ValueError(
        f"No default recipe for model {model!r}; set --config.recipe to one of {sorted(RECIPES)}."
      )
    name = MODEL_RECIPES[model]
  if name not in RECIPES:
    raise ValueError(f"Unknown recipe {name!r}; expected 'auto' or one of {sorted(RECIPES)}.")
  return dict(RECIPES[name])
