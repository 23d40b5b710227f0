"""CIFAR-10/100 with the official DCIL recipes (``experiments/recipes.py``).

  python -m experiments.cifar --workdir=runs/r32 --config.model=resnet32 --config.sparsity=0.9
  python -m experiments.cifar --workdir=runs/wrn --config.model=wrn28_2 --config.dataset=cifar100
  python -m experiments.cifar --workdir=runs/smoke --config=experiments/configs/cifar.py:local

``--config.model`` picks the recipe of its family (ResNet/VGG or WRN); any recipe field can be
overridden, e.g. ``--config.num_epochs=200 --config.lr_boundaries="(100,150)"``.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import common


def get_config(arg: str | None = None) -> ConfigDict:
  """``arg="local"``: a few hundred steps of ResNet-20 that run on a laptop CPU."""
  config = common.base_config()
  config.dataset = "cifar10"  # or cifar100
  config.model = "resnet32"
  config.log_every_steps = 50
  if arg == "local":
    config.model = "resnet20"
    config.batch_size = 32
    config.num_epochs = 2
    config.steps_per_epoch = 100
    config.run.max_eval_steps = 20
    config.ramp_end_epoch = 1.0
    config.kd_start_epoch = 1.0
    config.lr_boundaries = (1,)
    config.warmup_epochs = 0.2
    config.log_every_steps = 10
  elif arg:
    raise ValueError(f"Unknown CIFAR config {arg!r}; expected none or 'local'.")
  return config
