"""dcil-jax: Dynamic Collective Intelligence Learning (DCIL) and DPF for JAX, Flax and optax."""

from dcil_jax.losses import dcil_loss, dense_loss, distillation_kl, dpf_loss
from dcil_jax.masks import (
  apply_masks,
  erk_sparsities,
  flip_rate,
  is_conv_kernel,
  layer_sparsities,
  magnitude_masks,
  masks_like,
  sparsity,
)
from dcil_jax.paths import PerPath, map_paths, path_mesh, select_path, to_dual_path
from dcil_jax.schedules import constant_sparsity, cubic_sparsity
from dcil_jax.sharding import make_mesh, shard_batch
from dcil_jax.train import METHODS, TrainState, eval_step, export_variables, train_step
from dcil_jax.transform import MaskedUpdateState, get_masks, get_trained_masks, masked_update

__all__ = [
  "METHODS",
  "MaskedUpdateState",
  "PerPath",
  "TrainState",
  "apply_masks",
  "constant_sparsity",
  "cubic_sparsity",
  "dcil_loss",
  "dense_loss",
  "distillation_kl",
  "dpf_loss",
  "erk_sparsities",
  "eval_step",
  "export_variables",
  "flip_rate",
  "get_masks",
  "get_trained_masks",
  "is_conv_kernel",
  "layer_sparsities",
  "magnitude_masks",
  "make_mesh",
  "map_paths",
  "masked_update",
  "masks_like",
  "path_mesh",
  "select_path",
  "shard_batch",
  "sparsity",
  "to_dual_path",
  "train_step",
]
