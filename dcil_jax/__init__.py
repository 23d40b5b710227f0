"""dcil-jax: Dynamic Collective Intelligence Learning (DCIL) and DPF for JAX, Flax and optax."""

from dcil_jax import (
  clipping,
  deploy,
  granularity,
  losses,
  models,
  pool_gradient,
  refresh,
  rules,
  sharding,
)
from dcil_jax.clipping import clip_step_norm
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
from dcil_jax.paths import PRUNABLE, default_strategy, is_lifted, map_paths, path_mesh, path_params
from dcil_jax.rigl import RigLState, rigl, rigl_masks
from dcil_jax.schedules import constant_sparsity, cubic_sparsity
from dcil_jax.sharding import make_mesh, shard_batch
from dcil_jax.train import TrainState, eval_step, export_variables, lift, train_step
from dcil_jax.transform import (
  MaskedUpdateState,
  find_masked_state,
  get_masks,
  get_trained_masks,
  masked_update,
)

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
  "PRUNABLE",
  "TrainState",
  "apply_masks",
  "clip_step_norm",
  "clipping",
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
  "default_strategy",
  "dense_loss",
  "distillation_kl",
  "dpf_loss",
  "erk_sparsities",
  "eval_step",
  "export_variables",
  "find_masked_state",
  "flip_rate",
  "from_nnx",
  "get_masks",
  "get_method",
  "get_trained_masks",
  "granularity",
  "is_lifted",
  "layer_sparsities",
  "lift",
  "losses",
  "magnitude_masks",
  "make_mesh",
  "map_paths",
  "masked_update",
  "masks_like",
  "models",
  "path_mesh",
  "path_params",
  "pool_gradient",
  "refresh",
  "rigl",
  "rigl_masks",
  "rules",
  "shard_batch",
  "sharding",
  "sparsity",
  "to_nnx",
  "train_step",
]
