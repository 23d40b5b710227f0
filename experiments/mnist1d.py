"""Train and evaluate on MNIST-1D, generated offline (config: ``experiments/configs/mnist1d.py``).

python -m experiments.mnist1d --workdir=runs/m1d --config.method=rigl --config.sparsity=0.9
"""

import os

from experiments import launch

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "mnist1d.py")

if __name__ == "__main__":
  launch.run(CONFIG)
