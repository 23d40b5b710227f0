"""dcil-jax: Dynamic Collective Intelligence Learning (DCIL) and DPF for JAX, Flax and optax."""

from dcil_jax import deploy, rules
from dcil_jax.deploy import (
  export,
  layer_stats,
  load_compressed,
  masked_function,
  save_compact,
  save_compressed,
)
from dcil_jax.losses import dcil_loss, dense_loss, distillation_kl, dpf_loss
from dcil_jax.masks import (
  apply_masks,
  erk_sparsities,
  flip_rate,
  layer_sparsities,
  magnitude_masks,
  masks_like,
  sparsity,
)
from dcil_jax.methods import DCIL, DPF, GMP, METHODS, Dense, RigL, get_method
from dcil_jax.model import FlaxModel, NNXModel, as_model, from_nnx, to_nnx
from dcil_jax.paths import is_lifted, map_paths, path_mesh, path_params
from dcil_jax.rigl import RigLState, rigl, rigl_masks
from dcil_jax.schedules import constant_sparsity, cubic_sparsity
from dcil_jax.sharding import make_mesh, shard_batch
from dcil_jax.train import TrainState, eval_step, export_variables, lift, train_step
from dcil_jax.transform import MaskedUpdateState, get_masks, get_trained_masks, masked_update

__all__ = [
  "DCIL",
  "DPF",
  "METHODS",
  "Dense",
  "GMP",
  "RigL",
  "RigLState",
  "FlaxModel",
  "NNXModel",
  "MaskedUpdateState",
  "TrainState",
  "apply_masks",
  "deploy",
  "export",
  "layer_stats",
  "load_compressed",
  "masked_function",
  "save_compact",
  "save_compressed",
  "as_model",
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
  "from_nnx",
  "get_masks",
  "get_method",
  "get_trained_masks",
  "is_lifted",
  "layer_sparsities",
  "lift",
  "magnitude_masks",
  "make_mesh",
  "map_paths",
  "masked_update",
  "masks_like",
  "path_mesh",
  "path_params",
  "rigl",
  "rigl_masks",
  "rules",
  "shard_batch",
  "sparsity",
  "to_nnx",
  "train_step",
]
