"""Train and evaluate on scikit-learn's digits, offline (config: ``experiments/configs/digits.py``).

python -m experiments.digits --workdir=runs/digits --config.method=dcil --config.sparsity=0.9
"""

import os

from experiments import launch

CONFIG = os.path.join(os.path.dirname(__file__), "configs", "digits.py")

if __name__ == "__main__":
  launch.run(CONFIG)
