"""scikit-learn's 8x8 digits, the real images that ship offline: the reproduction study's data.

  python -m experiments.digits --workdir=runs/digits --config.method=dpf --config.sparsity=0.95
  python -m experiments.digits --workdir=runs/d8 --config=experiments/configs/digits.py:resnet8

The recipe is the official CIFAR one scaled to 60 epochs (``recipes.RECIPES["digits"]``).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import common

MODELS = {
  "small_cnn": "small_cnn",
  "resnet8": "resnet8",
  "local": "small_cnn",
  "quickstart": "small_cnn",
}


def get_config(arg: str | None = None) -> ConfigDict:
  """``arg``: the model (``small_cnn``, default, or ``resnet8``), ``local`` (a few epochs), or
  ``quickstart`` (``experiments.quickstart``: the small CNN exactly as in the study, so the
  quickstart's numbers are the study's seed-0 numbers)."""
  arg = arg or "small_cnn"
  if arg not in MODELS:
    raise ValueError(f"Unknown digits config {arg!r}; expected one of {sorted(MODELS)}.")
  config = common.base_config()
  config.dataset = "digits"
  config.model = MODELS[arg]
  config.recipe = "digits"
  config.log_every_steps = 11  # once per epoch
  config.run.eval_every_epochs = 1
  if arg == "local":
    config.num_epochs = 6
    config.lr_boundaries = (3,)
    config.ramp_end_epoch = 4.0
    config.kd_start_epoch = 2.0
    config.update_every = 4
  return config
