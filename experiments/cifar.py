"""Train and evaluate on CIFAR-10/100 (config: ``experiments/configs/cifar.py``).

  python -m experiments.cifar --workdir=runs/r32 --config.model=resnet32 --config.method=dcil \
      --config.sparsity=0.9
"""

import os

from experiments import launch

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "cifar.py")

if __name__ == "__main__":
  launch.run(CONFIG)
