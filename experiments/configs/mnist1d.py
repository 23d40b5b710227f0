"""MNIST-1D (Greydanus 2020), generated offline: the evidence study's data.

  python -m experiments.mnist1d --workdir=runs/m1d --config.method=rigl --config.sparsity=0.9
  python -m experiments.mnist1d --workdir=runs/r1d --config=experiments/configs/mnist1d.py:resnet1d

The recipe is the official CIFAR one scaled to 30 epochs (``recipes.RECIPES["mnist1d"]``); the
paper's CNN (no BatchNorm) trains at a tenth of its learning rate, the highest at which every
method trained in the first study's trial runs (results/NOTES.md, "MNIST-1D: what was run, and
how it was sized").
That lr was chosen on the test split; ``--config.dataset=mnist1d_val`` trains on 3,500 train
signals and evaluates on the other 500 (a validation split, ``input_pipeline.MNIST1D_SPLITS``),
and ``experiments.fast_sweep`` chooses each method's lr on it (results/NOTES.md, tuned study).
"""

from __future__ import annotations

from ml_collections import ConfigDict

from experiments.configs import common

MODELS = {"cnn": "mnist1d_cnn", "resnet1d": "resnet1d", "local": "mnist1d_cnn"}


def get_config(arg: str | None = None) -> ConfigDict:
  """``arg``: ``cnn`` (the paper's CNN, default), ``resnet1d`` (a small 1-D ResNet) or
  ``local`` (the CNN for a few epochs)."""
  arg = arg or "cnn"
  if arg not in MODELS:
    raise ValueError(f"Unknown mnist1d config {arg!r}; expected one of {sorted(MODELS)}.")
  config = common.base_config()
  config.dataset = "mnist1d"
  config.model = MODELS[arg]
  config.recipe = "mnist1d"
  config.log_every_steps = 31  # once per epoch
  config.run.eval_every_epochs = 1
  if config.model == "mnist1d_cnn":
    config.learning_rate = 0.02
    config.warmup_init_lr = 0.01
  if arg == "local":
    config.num_epochs = 4
  return config
