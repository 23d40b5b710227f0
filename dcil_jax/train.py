"""Train state and jitted train / eval steps shared by DCIL, DPF and dense training."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from dcil_jax import granularity, losses, paths, rules, sharding
from dcil_jax import masks as masks_lib
from dcil_jax import refresh as refresh_lib
from dcil_jax.methods import DCIL, METHODS, Method, check_refresh, get_method
from dcil_jax.model import FlaxModel, ModeFn, NNXModel, as_model
from dcil_jax.refresh import Refresh
from dcil_jax.rigl import check_outermost
from dcil_jax.transform import MaskRefresh, find_masked_state, get_masks, get_trained_masks

__all__ = ["METHODS", "TrainState", "eval_step", "export_variables", "lift", "train_step"]

EvalParamsFn = Callable[[Any, Any], Any]


def mask_settings(tx: optax.GradientTransformation, params: Any, method: Method) -> Refresh | None:
  """The settings of ``tx``'s one mask transform (``None`` for dense training), checked against
  ``method``: the one place where what is pruned, how and how often is given."""
  declared = refresh_lib.declared_refreshes(tx, params)
  if not method.uses_masks:
    if declared:
      raise ValueError(
        "Dense training takes no mask transform (dcil_jax.masked_update or rigl); remove it "
        "from the chain."
      )
    return None
  if not declared:
    raise ValueError(
      f"method={method.name!r} needs masks: add {method.mask_transform} to the optax chain."
    )
  if len(declared) > 1:
    raise ValueError(
      f"The optimizer has {len(declared)} mask transforms (dcil_jax.masked_update / rigl); use "
      "exactly one. (It may sit inside one branch of optax.multi_transform, and then prunes "
      "that branch.)"
    )
  check_refresh(method, declared[0])
  return declared[0]


def prunable_rule(
  refresh: Refresh, model: FlaxModel | NNXModel | None = None, example_input: Any = None
) -> rules.Rule:
  """The rule that lifts the params: the mask transform's own, or, when it was given none, the
  convolution kernels of ``model`` (found by tracing it on ``example_input``; an NNX model's
  submodules are known without)."""
  if refresh.prunable is not None:
    return refresh.prunable
  if isinstance(model, NNXModel):
    return rules.conv_kernels(model)
  if example_input is None or model is None or model.module is None:
    raise ValueError(
      "Which parameters to prune is not known: pass prunable= to the mask transform, e.g. "
      "dcil_jax.rules.conv_kernels(model, example_input) (the official rule: every "
      "convolution kernel), dcil_jax.rules.dense_kernels(...), dcil_jax.rules.all_kernels or "
      "your own (key_path, leaf) -> bool; or give TrainState.create / lift the model and an "
      "example_input so they can find the convolutions themselves."
    )
  return rules.conv_kernels(model.module, example_input, **model.mode(False))


def lift(
  variables: dict[str, Any],
  tx: optax.GradientTransformation,
  method: str | Method = "dcil",
  *,
  model: Any = None,
  example_input: Any = None,
) -> tuple[Any, Any]:
  """A plain model's ``variables`` in ``method``'s layout, pruned by the rule of ``tx``'s
  ``masked_update``: ``(params, model_state)`` for your own training loop.

  Args:
    variables: ``model.init(...)``.
    tx: the optimizer (with a ``masked_update`` for DCIL/DPF).
    method: ``"dcil"``, ``"dpf"``, ``"dense"`` or a method object.
    model, example_input: only when ``masked_update`` names no rule: the model and an input
      to find its convolution kernels.

  Returns:
    ``(params, model_state)``; pass ``params`` to ``tx.init``.
  """
  method = get_method(method)
  model = None if model is None else as_model(model)
  params, collections, rule = _split_variables(variables, tx, method, model, example_input)
  return method.layout(params, collections, rule)


def _split_variables(variables, tx, method, model, example_input):
  """``(params, other collections or None, prunable rule or None)``, after the checks that
  ``lift`` and ``TrainState.create`` share."""
  if not isinstance(variables, dict) or "params" not in variables:
    raise TypeError("`variables` must be a Flax variables dict with a 'params' collection.")
  params = variables["params"]
  refresh = mask_settings(tx, params, method)
  rule = None if refresh is None else prunable_rule(refresh, model, example_input)
  collections = {k: v for k, v in variables.items() if k != "params"} or None
  return params, collections, rule


class TrainState(struct.PyTreeNode):
  """Everything a step needs; the masks live in ``opt_state`` (see :attr:`masks`).

  For DCIL and DPF ``params`` is lifted (:func:`dcil_jax.lift`): ``{"prunable": kernels,
  "sparse": ..., "dense": ...}``, every leaf with the shape and name it has in the plain model,
  and ``model_state`` holds each path's mutable collections (``{"sparse": {"batch_stats": ...},
  ...}``). For dense training both are the plain model's.
  """

  step: jax.Array
  params: Any
  model_state: Any
  opt_state: Any
  rng: jax.Array
  model: FlaxModel | NNXModel = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  method: Method = struct.field(pytree_node=False, default=DCIL())
  mesh: Mesh | None = struct.field(pytree_node=False, default=None)
  rng_names: tuple[str, ...] = struct.field(pytree_node=False, default=("dropout",))
  eval_params_fn: EvalParamsFn | None = struct.field(pytree_node=False, default=None)

  @property
  def masks(self) -> Any:
    """Masks of the next forward pass (``None`` for dense training, which uses none)."""
    return get_masks(self.opt_state, self.params) if self.method.uses_masks else None

  @property
  def trained_masks(self) -> Any:
    """Masks the last step trained with (``None`` for dense): what eval and export use."""
    return get_trained_masks(self.opt_state) if self.method.uses_masks else None

  @property
  def optimizer_step(self) -> jax.Array:
    """Optimizer steps taken (differs from ``step`` under ``optax.MultiSteps``)."""
    return find_masked_state(self.opt_state).count if self.method.uses_masks else self.step

  def export(self, path: str | None = None) -> dict[str, Any]:
    """Plain variables of the deployable model or one path; see :func:`export_variables`."""
    params = self.params
    if self.eval_params_fn is not None:
      params = self.eval_params_fn(self.opt_state, params)
    return export_variables(params, self.trained_masks, self.model_state, path=path)

  @classmethod
  def create(
    cls,
    model: Any,
    variables: dict[str, Any],
    tx: optax.GradientTransformation,
    *,
    method: str | Method = "dcil",
    example_input: Any = None,
    mode: ModeFn | None = None,
    kd_start_step: int | None = None,
    temperature: float | None = None,
    share_non_prunable: bool | None = None,
    strategy: str | None = None,
    mesh: Mesh | None = None,
    rng: jax.Array | None = None,
    rng_names: tuple[str, ...] | None = None,
    eval_params_fn: EvalParamsFn | None = None,
  ) -> TrainState:
    """Builds the state from a plain model's ``variables`` and an optax chain.

    Args:
      model: the plain Flax module (or its ``apply``, or a :class:`dcil_jax.FlaxModel`).
      variables: ``model.init(...)``: ``{"params": ..., "batch_stats": ..., ...}``; every
        collection besides ``params`` is kept (per path for DCIL).
      tx: the optimizer; for DCIL/DPF it must contain :func:`dcil_jax.masked_update` (anywhere).
      method: ``"dcil"`` (default), ``"dpf"``, ``"dense"``, or a method object
        (:class:`dcil_jax.DCIL` etc.: your own task loss, a ``kd_weight`` schedule, ...).
      example_input: an input batch (e.g. ``images[:1]``) to find the model's convolutions, when
        ``masked_update`` names no ``prunable`` rule.
      mode: ``train -> kwargs`` for a model whose train flag is not one it can read.
      kd_start_step, temperature, share_non_prunable, strategy: DCIL settings, for
        ``method="dcil"`` given by name (see :class:`dcil_jax.DCIL`).
      mesh: the device mesh the state lives on (:func:`dcil_jax.sharding.make_mesh`): a
        ``data`` axis splits each batch (data parallelism; params, optimizer state and masks
        are replicated), a ``path`` axis of size 2 runs one DCIL path per device
        (``strategy="sharded"``). Default: no mesh (one device), or a 2-device ``path`` mesh
        for ``strategy="sharded"``.
      rng: PRNG key for stochastic layers (default ``PRNGKey(0)``); each step splits it.
      rng_names: the rng streams the model draws from in training (default: ``("dropout",)``
        for Linen, the streams an NNX model holds).
      eval_params_fn: ``(opt_state, params) -> params`` to evaluate and export at, for
        optimizers that evaluate elsewhere than they train (e.g.
        ``lambda s, p: optax.contrib.schedule_free_eval_params(find_state(s), p)``).
    """
    method = _resolve_method(method, kd_start_step, temperature, share_non_prunable, strategy)
    model = as_model(model, mode)
    if rng_names is None:
      rng_names = model.rng_tags if isinstance(model, NNXModel) else ("dropout",)
    elif isinstance(model, NNXModel) and not set(model.rng_tags) <= set(rng_names):
      raise ValueError(
        f"The NNX model draws from the rng streams {model.rng_tags}; rng_names={rng_names} "
        "misses some."
      )
    path_parallel = sharding.has_axis(mesh, paths.PATH_AXIS)
    if isinstance(method, DCIL):
      strategy = method.strategy or ("sharded" if path_parallel else paths.default_strategy())
      if strategy not in paths.STRATEGIES:
        raise ValueError(f"Unknown path strategy {strategy!r}; expected one of {paths.STRATEGIES}.")
      method = dataclasses.replace(method, strategy=strategy)
      if strategy == "sharded" and mesh is None:
        mesh = paths.path_mesh()
      path_parallel = sharding.has_axis(mesh, paths.PATH_AXIS)
      if path_parallel != (strategy == "sharded"):
        raise ValueError(
          f"strategy='sharded' and a mesh with a {paths.PATH_AXIS!r} axis go together; got "
          f"strategy={strategy!r} on mesh axes {mesh.axis_names if mesh else ()}. For data "
          "parallelism alone use dcil_jax.sharding.make_mesh() (no path axis)."
        )
    elif path_parallel:
      raise ValueError(f"A mesh with a {paths.PATH_AXIS!r} axis is for DCIL, not {method.name}.")
    params, collections, rule = _split_variables(variables, tx, method, model, example_input)

    def build(params, collections):
      params, model_state = method.layout(params, collections, rule)
      return params, model_state, tx.init(params)

    # One compile instead of many small eager ops; the outputs are new buffers, so donating the
    # state to train_step never deletes `variables`.
    params, model_state, opt_state = jax.jit(build)(params, collections)
    check_outermost(opt_state)
    state = cls(
      step=jnp.zeros([], jnp.int32),
      params=params,
      model_state=model_state,
      opt_state=opt_state,
      rng=jax.random.PRNGKey(0) if rng is None else rng,
      model=model,
      tx=tx,
      method=method,
      mesh=mesh,
      rng_names=tuple(rng_names),
      eval_params_fn=eval_params_fn,
    )
    return state if mesh is None else sharding.place_state(state, mesh)


def _resolve_method(method, kd_start_step, temperature, share_non_prunable, strategy) -> Method:
  named = {
    "kd_start_step": kd_start_step,
    "temperature": temperature,
    "share_non_prunable": share_non_prunable,
    "strategy": strategy,
  }
  named = {k: v for k, v in named.items() if v is not None}
  if not named:
    return get_method(method)
  if method != "dcil" and not isinstance(method, DCIL):
    raise ValueError(f"{sorted(named)} are DCIL settings; method={method!r} takes none.")
  base = get_method(method)
  return dataclasses.replace(base, **named)


def check_batch(batch: Any, mesh: Mesh | None = None) -> None:
  """Raises ``TypeError`` unless ``batch`` has ``"image"`` ``[B, ...]`` and ``"label"`` (class
  indices ``[B]`` or distributions ``[B, C]``), and ``ValueError`` unless ``B`` splits evenly
  over the mesh's ``data`` axis."""
  if not isinstance(batch, dict) or not {"image", "label"} <= set(batch):
    raise TypeError(
      f'A batch is a dict with "image" and "label"; got {type(batch).__name__} '
      f"with keys {sorted(batch) if isinstance(batch, dict) else None}."
    )
  image, label = batch["image"], batch["label"]
  if jnp.ndim(label) not in (1, 2) or jnp.shape(image)[:1] != jnp.shape(label)[:1]:
    raise TypeError(
      f"Need labels [B] or [B, C] for images [B, ...]; got {jnp.shape(label)} and "
      f"{jnp.shape(image)}."
    )
  integer = jnp.issubdtype(jnp.result_type(label), jnp.integer)
  if jnp.ndim(label) == 1 and not integer:
    raise TypeError(
      f"Labels [B] must be integer class indices, got dtype {jnp.result_type(label)} (soft "
      "targets are [B, C])."
    )
  if jnp.ndim(label) == 2 and integer:
    raise TypeError(
      f"Integer labels of shape {jnp.shape(label)}: class indices are [B] (e.g. "
      "labels.squeeze(-1) for a [B, 1] column); target distributions [B, C] are float."
    )
  ways = sharding.data_parallelism(mesh)
  if jnp.shape(label)[0] % ways:
    raise ValueError(
      f"The batch of {jnp.shape(label)[0]} does not split over the {ways} devices of the mesh's "
      f"{sharding.DATA_AXIS!r} axis; use a global batch that is a multiple of {ways}."
    )


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step of ``state.method``; ``state`` is donated.

  A step whose loss, gradients or new parameters are not all finite (NaN/Inf), or whose batch
  has a class index outside ``[0, C)`` (``-1`` would train as the last class), changes nothing
  but ``step`` and ``rng``: parameters, model state (BatchNorm statistics) and the optimizer
  state (masks and schedules included) stay those of the last good step, so a bad batch or a
  loss spike never poisons the state. The check runs inside the step (no host sync);
  ``metrics["finite"]`` says whether the step was applied, for the training loop to skip on or
  stop at. The optimizer gets the loss as ``value=`` (for ``optax.contrib.reduce_on_plateau``
  and others that take it; transforms that do not are unaffected).

  Returns:
    ``(new_state, metrics)``: the loss and each term, per-path accuracy, and for DCIL/DPF the
    sparsity of the masks this step used, its target, whether they were refreshed for this
    step (once per refresh, also under ``MultiSteps``), the flip rate of the last refresh, and
    ``sparsity_out_of_range`` (the schedule left [0, 1); its last valid value was used);
    ``labels_in_range`` (False: the step was skipped for its labels, see above); for filter
    masks ``layers_at_floor`` (layers kept at their one last filter); and ``finite``
    (whether the step was applied: finite and with valid labels).
  """
  check_batch(batch, state.mesh)
  if state.mesh is not None:
    batch = sharding.constrain_batch(batch, state.mesh)
  rng, step_rng = jax.random.split(state.rng)
  rngs = dict(zip(state.rng_names, jax.random.split(step_rng, len(state.rng_names))))
  method = state.method
  masks = state.masks
  step = state.optimizer_step

  def loss_fn(params):
    return method.loss(state.model, params, masks, state.model_state, batch, rngs, step, state.mesh)

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  tx = optax.with_extra_args_support(state.tx)
  # The forward pass's masks go to the mask transform, which stores them: one computation.
  updates, opt_state = tx.update(grads, state.opt_state, state.params, value=loss, dcil_masks=masks)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
  labels_ok = losses.labels_in_range(jax.tree.leaves(aux["logits"])[0], batch["label"])
  applied = finite & labels_ok
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(applied, n, o), new, old)
  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    model_state=keep(aux["model_state"], state.model_state),
    opt_state=keep(opt_state, state.opt_state),
    rng=rng,
  )
  if state.mesh is not None:  # replicated, whatever XLA would pick
    new_state = sharding.constrain_state(new_state, state.mesh)
  metrics = {
    "loss": loss,
    "finite": finite & labels_ok,
    "labels_in_range": labels_ok,
    **method.metrics(aux),
  }
  if method.uses_masks:
    before, after = find_masked_state(state.opt_state), find_masked_state(new_state.opt_state)
    stepped = after.count != before.count  # False on micro-steps and skipped steps
    metrics |= {
      "sparsity": before.refresh.pruned_fraction(masks),  # in filters for filter masks
      "target_sparsity": after.target_sparsity,
      # Step 0's masks are the ones init computed from W_0: not counted as a refresh.
      "mask_refreshed": stepped & (after.last_refresh == before.count) & (before.count > 0),
      "flip_rate": after.record.flip_rate,
      "revived": after.record.revived,
      "sparsity_out_of_range": after.out_of_range,
    }
    if isinstance(before.refresh, MaskRefresh) and before.refresh.granularity == "filter":
      # Layers kept at one filter (the floor that keeps a layer from being emptied).
      metrics["layers_at_floor"] = granularity.layers_at_floor(masks)
  return new_state, metrics


def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def export_variables(
  params: Any, masks: Any = None, model_state: Any = None, *, path: str | None = None
) -> dict[str, Any]:
  """Plain variables for the unmodified model: the deployable network by default.

  Works on a ``TrainState`` (``export_variables(state)``) or on the pieces of your own loop:
  ``export_variables(params, dcil_jax.get_trained_masks(opt_state), model_state)``.

  ``path=None`` (default) gives the deployable model: the sparse path of DCIL and DPF, the
  plain model of dense training. ``path="sparse"`` gives ``W⊙M`` with the sparse path's own
  leaves and model state; ``path="dense"`` gives DCIL's dense path ``W`` with its own BatchNorm
  and head (dense training has no DCIL path: it exports its model). Pass the masks the last
  step trained with (``state.trained_masks``), not ones refreshed for a step no BN statistic has
  seen yet.
  """
  if isinstance(params, TrainState):
    if masks is not None or model_state is not None:
      raise TypeError("export_variables(state, path=...) takes no masks or model state.")
    return params.export(path)
  if path is not None and path not in paths.PATH_NAMES:
    raise ValueError(f"path must be None or one of {paths.PATH_NAMES}, got {path!r}.")
  if not paths.is_lifted(params):  # dense training: the plain model
    if path is not None:
      raise ValueError(
        f"Dense training has no {path!r} path: export_variables(...) with no path gives its model."
      )
    return {"params": params, **(model_state or {})}
  path = path or "sparse"
  other = paths.PATH_NAMES[1 - paths.PATH_NAMES.index(path)]
  if (other in params and path not in params) or (model_state and path not in model_state):
    raise ValueError(f"Only DCIL has a dense path; these params have no {path!r} part (DPF).")
  kernels = params[paths.PRUNABLE]
  if path == "sparse":
    if masks is None:
      raise ValueError("Exporting the sparse path needs the masks (the ones trained with).")
    kernels = masks_lib.apply_masks(kernels, masks[paths.PRUNABLE])
  return {
    "params": paths.path_params(params, path, kernels),
    **((model_state or {}).get(path) or {}),
  }


def _eval_sums(logits: jax.Array, batch: dict[str, Any]) -> dict[str, jax.Array]:
  labels = batch["label"]
  losses.check_targets(logits, labels)
  logits = losses.promoted(logits)
  if jnp.ndim(labels) == 2:
    loss = optax.softmax_cross_entropy(logits, labels)
    labels = jnp.argmax(labels, -1)
  else:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  weight = batch.get("mask", jnp.ones(labels.shape, bool)).astype(jnp.float32)
  _, top = jax.lax.top_k(logits, min(5, logits.shape[-1]))
  hits = top == labels[:, None]
  valid = (labels >= 0) & (labels < logits.shape[-1])
  return {
    "count": weight.sum(),
    "invalid_labels": (~valid * weight).sum(),
    "loss": (loss * weight).sum(),
    "top1": (hits[:, 0] * weight).sum(),
    "top5": (hits.any(axis=1) * weight).sum(),
  }


@functools.partial(jax.jit, static_argnames="path")
def eval_step(state: TrainState, batch: dict[str, jax.Array], path: str | None = None):
  """Sums over one batch of the exported model (``path=None``: the deployable one; or a DCIL
  path, see :func:`export_variables`) in eval mode (running BN statistics).

  ``batch["mask"]`` (optional, ``[B]`` bool) marks the real examples of a padded batch; the
  sums count only those. Divide the totals by ``count`` for means.

  Returns:
    ``{"count", "invalid_labels", "loss", "top1", "top5"}``: examples, those whose class index
    lies outside ``[0, C)`` (counted as misses; a data error to fix), summed cross-entropy, top-1
    and top-5 hits.
  """
  check_batch(batch, state.mesh)
  logits = state.model.apply_eval(state.export(path), batch["image"])
  return _eval_sums(logits, batch)
