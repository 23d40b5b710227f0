"""ImageNet (ILSVRC-2012) with ResNet-50: the standard recipe (``experiments/recipes.py``).

  python -m experiments.imagenet --accelerator=tpu --workdir=gs://bucket/rn50 \
      --config.run.data_dir=gs://bucket/tensorflow_datasets
  python -m experiments.imagenet --accelerator=cpu --workdir=runs/in-local \
      --config=experiments/configs/imagenet.py:local

ImageNet needs a manual download and a one-time ``tfds build`` (docs/imagenet_tpu.md).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import common


def get_config(arg: str | None = None) -> ConfigDict:
  """``arg="local"``: a small ResNet on 64-pixel crops for a quick CPU run."""
  config = common.base_config()
  config.dataset = "imagenet2012"
  config.model = "resnet50"
  config.image_size = 224
  config.log_every_steps = 100
  if arg == "local":
    config.model = "resnet18"
    config.image_size = 64
    config.batch_size = 16
    config.num_epochs = 1
    config.steps_per_epoch = 50
    config.run.max_eval_steps = 10
    config.ramp_end_epoch = 0.75
    config.kd_start_epoch = 0.25
    config.warmup_epochs = 0.1
    config.run.worker_count = 0
    config.log_every_steps = 10
  elif arg:
    raise ValueError(f"Unknown ImageNet config {arg!r}; expected none or 'local'.")
  return config
