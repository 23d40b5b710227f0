"""A run's training state: built from its config, compiled, checkpointed, and read.

What the training loop does with a ``dcil_jax.TrainState`` beyond ``dcil_jax.train_step`` and
``dcil_jax.eval_step`` is here: build it (model, optimizer with the recipe's schedules,
``TrainState.create`` on a mesh), compile its step, turn it into the arrays a checkpoint holds and
back, measure a mask refresh, and read the masks and the deployable model's counts for the
summary. The loop, checkpoints, sweep and report read no other ``TrainState`` field than
``method``, so a change of the library's state API is ported here.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

import dcil_jax
from dcil_jax import deploy
from dcil_jax.models import create_model
from experiments import input_pipeline

# RigL's published settings: replace 30 % of the kept weights at first (cosine-decayed), and stop
# updating the masks at 75 % of training. Its update period is the config's update_every.
RIGL_DROP_FRACTION = 0.3
RIGL_END_FRACTION = 0.75
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --------------------------------------------------------------------------------------------
# Building: schedules, optimizer, state


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
  """The recipe's learning rate per step: linear warm-up, then steps or cosine."""
  peak = config.learning_rate
  if config.lr_reference_batch:
    peak *= config.batch_size / config.lr_reference_batch  # the linear scaling rule
  warmup = round(config.warmup_epochs * steps_per_epoch)
  total = round(config.num_epochs * steps_per_epoch)
  if config.lr_schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
      config.warmup_init_lr, peak, warmup_steps=warmup, decay_steps=total, end_value=0.0
    )
  after = optax.piecewise_constant_schedule(
    peak,
    {round(b * steps_per_epoch) - warmup: config.lr_decay for b in config.lr_boundaries},
  )
  if not warmup:
    return after
  ramp = optax.linear_schedule(config.warmup_init_lr, peak, warmup)
  return optax.join_schedules([ramp, after], [warmup])


def ramp_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """The step at which the cubic sparsity ramp reaches its target."""
  return max(1, round(config.ramp_end_epoch * steps_per_epoch))


def clipping(
  config: ml_collections.ConfigDict, learning_rate: optax.Schedule
) -> list[optax.GradientTransformation]:
  """The config's gradient clips, to chain before weight decay and SGD: a fixed global norm
  (``grad_clip_norm``) and the step bound of robust DCIL (``max_step_norm``,
  :func:`dcil_jax.clip_step_norm` with the optimizer's ``learning_rate``)."""
  parts = []
  if config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.max_step_norm:
    parts.append(dcil_jax.clip_step_norm(config.max_step_norm, learning_rate))
  return parts


def make_optimizer(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  allocation: deploy.GroupAllocation | None = None,
) -> optax.GradientTransformation:
  """SGD (Nesterov) with weight decay on every parameter, as the official code; for DCIL, DPF and
  GMP (no regrowth) ``masked_update``, and for RigL the whole optimizer wrapped in ``rigl`` (no
  rule given: ``TrainState.create`` prunes the model's convolutions, found from its module
  types). ``allocation``: the model's channel groups for ``filter_allocation`` other than
  ``"global"`` (:func:`filter_allocation`)."""
  if allocation is None and config.get("filter_allocation", "global") != "global":
    raise ValueError(
      f"filter_allocation={config.filter_allocation!r} needs the model's channel groups: pass "
      "allocation=run_state.filter_allocation(config, model, variables)."
    )
  learning_rate = learning_rate_schedule(config, steps_per_epoch)
  parts = [
    *clipping(config, learning_rate),
    optax.add_decayed_weights(config.weight_decay),
    optax.sgd(learning_rate, momentum=config.momentum, nesterov=config.nesterov),
  ]
  return sparsify(config, steps_per_epoch, parts, track_revivals=True, allocation=allocation)


def sparsify(
  config: ml_collections.ConfigDict,
  steps_per_epoch: int,
  parts: list[optax.GradientTransformation],
  *,
  track_revivals: bool = False,
  allocation: deploy.GroupAllocation | None = None,
) -> optax.GradientTransformation:
  """The dense optimizer ``parts`` made sparse as ``config.method`` says: RigL (constant ERK
  sparsity) wraps the whole chain; DCIL, DPF and GMP (no regrowth) chain ``masked_update`` after
  it, on the recipe's cubic ramp; dense leaves it as it is. ``experiments.fast_sweep`` shares it."""
  if config.method == "rigl":
    total = round(config.num_epochs * steps_per_epoch)
    return dcil_jax.rigl(
      optax.chain(*parts),
      config.sparsity,
      update_every=config.update_every,
      end_step=max(1, round(RIGL_END_FRACTION * total)),
      drop_fraction=RIGL_DROP_FRACTION,
      distribution="erk",
      track_revivals=track_revivals,
    )
  if config.method != "dense":
    ramp = ramp_steps(config, steps_per_epoch)
    # Official: the ramp is evaluated at the integer epoch. A ramp shorter than an epoch (smoke
    # configs) is evaluated every step instead.
    stage = steps_per_epoch if ramp >= steps_per_epoch else 1
    schedule = dcil_jax.cubic_sparsity(config.sparsity, ramp, steps_per_stage=stage)
    parts = [
      *parts,
      dcil_jax.masked_update(
        schedule,
        update_every=config.update_every,
        distribution=config.distribution,
        granularity=config.granularity,
        score=config.filter_score,
        regrow=config.method != "gmp",
        track_revivals=track_revivals,
        allocation=allocation,
      ),
    ]
  return optax.chain(*parts)


# config.filter_allocation -> the cost weight of dcil_jax.deploy.group_allocation (None: today's
# global threshold of dcil_jax.granularity.filter_masks).
FILTER_ALLOCATIONS = {"global": None, "groups": 0.0, "groups_macs": 0.5}


def filter_allocation(
  config: ml_collections.ConfigDict, model: Any, variables: dict[str, Any]
) -> deploy.GroupAllocation | None:
  """The channel groups the mask refresh prunes for ``config.filter_allocation`` (traced once
  from the model), or ``None`` for ``"global"`` (one threshold over all filters)."""
  cost_weight = FILTER_ALLOCATIONS[config.get("filter_allocation", "global")]
  if cost_weight is None or config.method in ("dense", "rigl"):
    return None
  shape = tuple(example_input(config).shape[1:])
  return deploy.group_allocation(
    model, variables, shape, cost_weight=cost_weight, dtype=DTYPES[config.dtype]
  )


def example_input(config: ml_collections.ConfigDict) -> jax.Array:
  """A batch of one zero input of the config's dataset, shape and dtype."""
  info = input_pipeline.DATASETS[config.dataset]
  return jnp.zeros((1, *info.input_shape(config.image_size)), DTYPES[config.dtype])


def create_train_state(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int
) -> dcil_jax.TrainState:
  """The model's variables lifted into a ``TrainState`` placed on ``mesh``."""
  info = input_pipeline.DATASETS[config.dataset]
  model = create_model(config.model, info.num_classes, dtype=DTYPES[config.dtype])
  init_rng, state_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  dummy = example_input(config)
  variables = jax.jit(functools.partial(model.init, train=False))(init_rng, dummy)
  method = dcil_jax.get_method(config.method)
  if isinstance(method, dcil_jax.DCIL):
    method = dcil_method(config, steps_per_epoch)
  return dcil_jax.TrainState.create(
    model,
    variables,
    make_optimizer(config, steps_per_epoch, filter_allocation(config, model, variables)),
    method=method,
    example_input=dummy,
    mesh=mesh,
    rng=state_rng,
  )


def dcil_method(config: ml_collections.ConfigDict, steps_per_epoch: int) -> dcil_jax.DCIL:
  """The config's DCIL: its preset (``dcil_preset``) with the schedule in steps and any option
  the config overrides (``kd_ramp_epochs``, ``kd_clip``)."""
  fields: dict[str, Any] = {
    "kd_start_step": round(config.kd_start_epoch * steps_per_epoch),
    "temperature": config.temperature,
    "strategy": config.strategy,
  }
  if config.kd_ramp_epochs is not None:
    fields["kd_ramp_steps"] = round(config.kd_ramp_epochs * steps_per_epoch)
  if config.kd_clip is not None:
    fields["kd_clip"] = config.kd_clip
  return dcil_jax.DCIL.preset(config.dcil_preset, **fields)


def _refresh(state: dcil_jax.TrainState) -> dcil_jax.refresh.Refresh:
  """The mask transform's settings in the state's optimizer: its ``view`` counts in the pruned
  unit."""
  return dcil_jax.find_masked_state(state.opt_state).refresh


def describe(state: dcil_jax.TrainState) -> dict[str, Any]:
  """``method``, ``strategy`` and the number of deployable parameters, for the run's header."""
  params = jax.eval_shape(dcil_jax.export_variables, state)["params"]  # shapes only
  return {
    "method": state.method.name,
    "strategy": getattr(state.method, "strategy", None),
    "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
  }


def compile_train_step(state: dcil_jax.TrainState, batch: dict[str, jax.Array]) -> Any:
  """``dcil_jax.train_step`` compiled for these shapes: ``(state, batch) -> (state, metrics)``,
  the state donated. Compiling up front lets a step that cannot fit fail before training."""
  return dcil_jax.train_step.lower(state, batch).compile()


# --------------------------------------------------------------------------------------------
# Checkpoints: the arrays of a state, and back


def checkpoint_tree(state: dcil_jax.TrainState) -> dict[str, Any]:
  """The arrays a checkpoint holds (the static parts of the state come from the config)."""
  tree = {
    "step": state.step,
    "params": state.params,
    "model_state": state.model_state,
    "opt_state": state.opt_state,
    "rng": state.rng,
  }
  return tree


def from_checkpoint_tree(state: dcil_jax.TrainState, tree: dict[str, Any]) -> Any:
  """``state`` with the arrays of a restored :func:`checkpoint_tree`."""
  return state.replace(**tree)


# --------------------------------------------------------------------------------------------
# Evaluation, refresh measurements, the final masks


def eval_paths(state: dcil_jax.TrainState) -> tuple[str | None, ...]:
  """What an evaluation reports: the deployable model (``None``), and DCIL's dense path."""
  return (None, *(p for p in state.method.path_names if p != "sparse"))


@jax.jit
def refresh_record(state: dcil_jax.TrainState, refreshed: jax.Array) -> dict[str, Any]:
  """The last refresh's record in the state's mask transform (device values: the loop fetches
  them when it logs, and keeps those of the steps whose ``refreshed`` is set): the flip rate,
  the fraction revived, the fraction ever revived and the per-layer flip rates, counted in the
  pruned unit (filters for filter masks). Nothing is recomputed: the step's update made it.
  Jitted: it runs on the devices, so the loop transfers nothing between steps."""
  record = dcil_jax.find_masked_state(state.opt_state).record
  return {
    "flip_rate": record.flip_rate,
    "revived": record.revived,
    "ever_revived": record.ever_revived_fraction,
    "layer_flip_rate": record.layer_flip_rate,
    "refreshed": refreshed,
  }


def ever_revived(state: dcil_jax.TrainState) -> float:
  """The fraction of weights revived at least once so far (one explicit host transfer)."""
  record = dcil_jax.find_masked_state(state.opt_state).record
  return float(jax.device_get(record.ever_revived_fraction))


def trained_sparsity(state: dcil_jax.TrainState) -> float:
  """The pruned fraction of the masks the last step trained with (what evaluation uses), in
  the pruned unit (filters for filter masks)."""
  return float(jax.device_get(_refresh(state).pruned_fraction(state.trained_masks)))


def mask_report(state: dcil_jax.TrainState) -> dict[str, Any]:
  """The final masks: overall and per-layer sparsity in the pruned unit (filters for filter
  masks; then also the fraction of weights), and the fraction of exact zeros in the exported
  (deployable) conv kernels, which is what the masks promise."""
  refresh = _refresh(state)
  weights = jax.device_get(state.trained_masks)
  masks = jax.device_get(refresh.view(state.trained_masks))
  exported = jax.device_get(dcil_jax.export_variables(state)["params"])
  flat = jax.tree_util.tree_flatten_with_path(exported)[0]
  pruned = {
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(weights[dcil_jax.PRUNABLE])[0]
  }
  conv = [np.asarray(x) for path, x in flat if jax.tree_util.keystr(path) in pruned]
  return {
    "sparsity_unit": refresh.granularity if refresh.granularity == "filter" else "weight",
    "weight_sparsity": float(dcil_jax.sparsity(weights)),
    "sparsity": float(dcil_jax.sparsity(masks)),
    "layer_sparsity": {k: float(v) for k, v in dcil_jax.layer_sparsities(masks).items()},
    "exported_zero_fraction": float(sum((x == 0).sum() for x in conv) / sum(x.size for x in conv)),
  }


def _plain_masks(params: Any, prunable_masks: Any) -> Any:
  """The masks of the prunable kernels (a sub-tree of the plain params, as in the lifted
  layout) as a tree over all of ``params``, ``None`` at the leaves that are not pruned."""

  def find(path: tuple[Any, ...]) -> Any:
    node = prunable_masks
    for key in path:
      if not isinstance(node, dict) or key.key not in node:
        return None
      node = node[key.key]
    return node

  return jax.tree_util.tree_map_with_path(lambda path, _: find(path), params)


def deploy_report(state: dcil_jax.TrainState, example_input: Any) -> dict[str, int | None]:
  """The deployable (exported sparse-path) model's size and cost, from its shapes and masks:
  ``params`` (every parameter) and ``kept_params`` (less the masked kernel entries), ``macs``
  and ``kept_macs`` per example (conv and dense layers, ``dcil_jax.deploy.deploy_stats``; the
  model is traced abstractly, nothing is run), and ``dense_bytes`` (every variable as stored)
  and ``compressed_bytes`` (bit-packed masks plus kept values, ``dcil_jax.deploy.compress``;
  array bytes, nothing is written). For dense training the two of each pair are equal.

  Args:
    example_input: an input batch (its shape after the batch axis is one example's).
  """
  variables = jax.device_get(dcil_jax.export_variables(state))
  masks = None
  if state.method.uses_masks:
    prunable = jax.device_get(state.trained_masks[dcil_jax.PRUNABLE])
    masks = _plain_masks(variables["params"], prunable)
  module = getattr(state.model, "module", None)
  if module is not None:
    shape = tuple(np.shape(example_input)[1:])
    counts = deploy.deploy_stats(module, variables, shape, masks)
  else:  # an apply function alone cannot be traced layer by layer
    total = sum(int(np.size(x)) for x in jax.tree.leaves(variables["params"]))
    masked = sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks)) if masks else 0
    counts = {"params": total, "kept_params": total - masked, "macs": None, "kept_macs": None}
  _, sizes = deploy.compress(variables, masks)
  return counts | {k: int(sizes[k]) for k in ("dense_bytes", "compressed_bytes")}
