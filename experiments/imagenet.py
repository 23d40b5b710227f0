"""Train and evaluate ResNet-50 on ImageNet (config: ``experiments/configs/imagenet.py``).

  python -m experiments.imagenet --accelerator=tpu --workdir=gs://bucket/rn50 \
      --config.run.data_dir=gs://bucket/tensorflow_datasets
"""

import os

from experiments import launch

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "imagenet.py")

if __name__ == "__main__":
  launch.run(CONFIG)
