"""Train state and jitted train / eval steps shared by DCIL, DPF and dense training."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from dcil_jax import losses, paths, sharding
from dcil_jax import masks as masks_lib
from dcil_jax.transform import find_masked_state, get_masks, get_trained_masks

METHODS = ("dcil", "dpf", "dense")


def check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {METHODS}.")


class TrainState(struct.PyTreeNode):
  """Everything a step needs; the masks live in ``opt_state`` (see :attr:`masks`).

  For ``method="dcil"`` ``params`` and ``batch_stats`` are dual-path trees: shared prunable
  kernels, and ``PerPath`` copies (sparse, dense) of everything else.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  method: str = struct.field(pytree_node=False, default="dcil")
  kd_start_step: int = struct.field(pytree_node=False, default=0)
  temperature: float = struct.field(pytree_node=False, default=2.0)
  strategy: str = struct.field(pytree_node=False, default="unrolled")
  mesh: Mesh | None = struct.field(pytree_node=False, default=None)

  @property
  def masks(self) -> Any:
    """Masks of the next forward pass (``None`` for dense training, which uses none)."""
    return None if self.method == "dense" else get_masks(self.opt_state)

  @property
  def trained_masks(self) -> Any:
    """Masks the last step trained with (``None`` for dense): what eval and export use."""
    return None if self.method == "dense" else get_trained_masks(self.opt_state)

  @classmethod
  def create(
    cls,
    apply_fn: Callable[..., Any],
    variables: Any,
    tx: optax.GradientTransformation,
    *,
    method: str = "dcil",
    kd_start_step: int = 0,
    share_non_prunable: bool = False,
    temperature: float = 2.0,
    strategy: str | None = None,
    mesh: Mesh | None = None,
    rng: jax.Array | None = None,
  ) -> TrainState:
    """Builds the state from a plain model's ``variables`` and an optax chain.

    Args:
      apply_fn: the plain model's ``apply``.
      variables: ``model.init(...)``: ``{"params": ..., "batch_stats": ...}``.
      tx: the optimizer; for ``dcil``/``dpf`` it must contain :func:`dcil_jax.masked_update`.
      method: ``"dcil"`` (default), ``"dpf"`` or ``"dense"``.
      kd_start_step: first step with the mutual-distillation terms (official: epoch 70).
      temperature: distillation temperature (official: 2).
      share_non_prunable: DCIL ablation: one BatchNorm/head for both paths (default: per path,
        as the official code).
      strategy: how DCIL runs its path axis: ``"unrolled"``, ``"vmap"`` or ``"sharded"``
        (default: ``"sharded"`` on a mesh with a ``path`` axis, else
        :func:`dcil_jax.paths.default_strategy`).
      mesh: the device mesh the state lives on (:func:`dcil_jax.sharding.make_mesh`): a
        ``data`` axis splits each batch (data parallelism; params, optimizer state and masks
        are replicated), a ``path`` axis of size 2 runs one DCIL path per device
        (``strategy="sharded"``). Default: no mesh (one device), or a 2-device ``path`` mesh
        for ``strategy="sharded"``.
      rng: PRNG key for stochastic layers (default ``PRNGKey(0)``).
    """
    check_method(method)
    path_parallel = sharding.has_axis(mesh, paths.PATH_AXIS)
    if strategy is None:
      strategy = "sharded" if path_parallel else paths.default_strategy(jax.default_backend())
    if strategy not in paths.STRATEGIES:
      raise ValueError(f"Unknown path strategy {strategy!r}; expected one of {paths.STRATEGIES}.")
    if strategy == "sharded" and mesh is None:
      mesh = paths.path_mesh()
    elif path_parallel != (strategy == "sharded"):
      raise ValueError(
        f"strategy='sharded' and a mesh with a {paths.PATH_AXIS!r} axis go together; got "
        f"strategy={strategy!r} on mesh axes {mesh.axis_names}. For data parallelism alone use "
        "dcil_jax.sharding.make_mesh() (no path axis)."
      )
    if "params" not in variables:
      raise TypeError("`variables` must be a Flax variables dict with a 'params' collection.")
    abstract_opt_state = jax.eval_shape(tx.init, variables["params"])  # which leaves are masked
    if method != "dense" and not _has_masks(abstract_opt_state):
      raise ValueError(
        f"method={method!r} needs masks: add dcil_jax.masked_update(...) at the end of the "
        "optax chain."
      )

    def build(params, batch_stats):
      if method == "dcil":
        params, batch_stats = paths.to_dual_path(
          params,
          get_masks(abstract_opt_state),
          batch_stats,
          share_non_prunable=share_non_prunable,
        )
      return params, batch_stats, tx.init(params)

    # One compile instead of many small eager ops; the outputs are new buffers, so donating the
    # state to train_step never deletes `variables`.
    params, batch_stats, opt_state = jax.jit(build)(
      variables["params"], variables.get("batch_stats")
    )
    state = cls(
      step=jnp.zeros([], jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=opt_state,
      rng=jax.random.PRNGKey(0) if rng is None else rng,
      apply_fn=apply_fn,
      tx=tx,
      method=method,
      kd_start_step=kd_start_step,
      temperature=temperature,
      strategy=strategy,
      mesh=mesh,
    )
    return state if mesh is None else sharding.place_state(state, mesh)


def _has_masks(opt_state: Any) -> bool:
  try:
    find_masked_state(opt_state)
  except ValueError:
    return False
  return True


def loss_and_aux(state: TrainState, params: Any, batch: dict[str, jax.Array], rngs=None):
  """The loss of ``state.method`` at ``params`` (``state.params`` supplies nothing else)."""
  masks = state.masks
  if state.method == "dcil":
    kd_weight = (state.step >= state.kd_start_step).astype(jnp.float32)
    return losses.dcil_loss(
      state.apply_fn,
      params,
      masks,
      batch,
      state.batch_stats,
      kd_weight=kd_weight,
      temperature=state.temperature,
      strategy=state.strategy,
      mesh=state.mesh,
      rngs=rngs,
    )
  loss_fn = losses.dpf_loss if state.method == "dpf" else losses.dense_loss
  return loss_fn(state.apply_fn, params, masks, batch, state.batch_stats, rngs=rngs)


def check_batch(batch: Any, mesh: Mesh | None = None) -> None:
  """Raises ``TypeError`` unless ``batch`` is ``{"image": [B, ...], "label": [B] int}``, and
  ``ValueError`` unless ``B`` splits evenly over the mesh's ``data`` axis."""
  if not isinstance(batch, dict) or not {"image", "label"} <= set(batch):
    raise TypeError(
      f'A batch is a dict with "image" and "label"; got {type(batch).__name__} '
      f"with keys {sorted(batch) if isinstance(batch, dict) else None}."
    )
  image, label = batch["image"], batch["label"]
  if jnp.ndim(label) != 1 or jnp.shape(image)[:1] != jnp.shape(label):
    raise TypeError(
      f"Need labels [B] for images [B, ...]; got {jnp.shape(label)} and {jnp.shape(image)}."
    )
  if not jnp.issubdtype(jnp.result_type(label), jnp.integer):
    raise TypeError(f"Labels must be integer class indices, got dtype {jnp.result_type(label)}.")
  ways = sharding.data_parallelism(mesh)
  if jnp.shape(label)[0] % ways:
    raise ValueError(
      f"The batch of {jnp.shape(label)[0]} does not split over the {ways} devices of the mesh's "
      f"{sharding.DATA_AXIS!r} axis; use a global batch that is a multiple of {ways}."
    )


@functools.partial(jax.jit, donate_argnums=0)
def train_step(state: TrainState, batch: dict[str, jax.Array]) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step of ``state.method``; ``state`` is donated.

  A step whose loss, gradients or new parameters are not all finite (NaN/Inf) changes nothing
  but ``step`` and ``rng``: parameters, BatchNorm statistics and the optimizer state (masks and
  schedules included) stay those of the last good step, so a bad batch or a loss spike never
  poisons the state. The check runs inside the step (no host sync); ``metrics["finite"]`` says
  whether the step was applied, for the training loop to skip on or stop at.

  Returns:
    ``(new_state, metrics)``: the loss and each term, per-path accuracy, the actual sparsity of
    the masks used in this step, whether the masks were refreshed for the next step (with
    the flip rate of that refresh), and ``finite``.
  """
  check_batch(batch, state.mesh)
  if state.mesh is not None:
    batch = sharding.constrain_batch(batch, state.mesh)
  rng, dropout_rng = jax.random.split(state.rng)
  rngs = {"dropout": dropout_rng}
  masks = state.masks
  (loss, aux), grads = jax.value_and_grad(
    lambda p: loss_and_aux(state, p, batch, rngs), has_aux=True
  )(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
    step=state.step + 1,
    params=keep(params, state.params),
    batch_stats=keep(aux["batch_stats"], state.batch_stats),
    opt_state=keep(opt_state, state.opt_state),
    rng=rng,
  )
  if state.mesh is not None:  # replicated (or one path per device), whatever XLA would pick
    new_state = sharding.constrain_state(new_state, state.mesh)
  metrics = {"loss": loss, "finite": finite}
  if state.method == "dcil":
    metrics |= {
      "ce_sparse": aux["ce"][paths.SPARSE],
      "ce_dense": aux["ce"][paths.DENSE],
      "kl_sparse": aux["kl"][paths.SPARSE],
      "kl_dense": aux["kl"][paths.DENSE],
      "accuracy_sparse": aux["accuracy"][paths.SPARSE],
      "accuracy_dense": aux["accuracy"][paths.DENSE],
    }
  else:
    metrics |= {"ce_sparse": aux["ce"], "accuracy_sparse": aux["accuracy"]}
  if masks is not None:
    before, after = find_masked_state(state.opt_state), find_masked_state(new_state.opt_state)
    metrics |= {
      "sparsity": masks_lib.sparsity(masks),
      "target_sparsity": before.target_sparsity,
      "mask_refreshed": finite & (after.last_refresh == after.count),
      "flip_rate": after.flip_rate,
    }
  return new_state, metrics


def _all_finite(tree: Any) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves])) if leaves else jnp.bool_(True)


def export_variables(state: TrainState, path: str = "sparse") -> dict[str, Any]:
  """Plain variables for the unmodified model: the deployable sparse network by default.

  ``path="sparse"`` gives ``W⊙M`` with the sparse path's BatchNorm and head (for DPF: ``W⊙M``;
  for dense training: ``W``); ``path="dense"`` gives DCIL's dense path ``W`` with its own
  BatchNorm and head. ``M`` is the mask the last step trained with (``state.trained_masks``),
  not one refreshed for the next step that no step and no BN statistic has seen yet.
  """
  if path not in ("sparse", "dense"):
    raise ValueError(f"path must be 'sparse' or 'dense', got {path!r}.")
  if path == "dense" and state.method != "dcil":
    raise ValueError(f"Only DCIL has a dense path; this state was trained with {state.method!r}.")
  index = paths.SPARSE if path == "sparse" else paths.DENSE
  params = state.params
  if path == "sparse" and state.method != "dense":
    params = masks_lib.apply_masks(params, state.trained_masks)
  variables = {"params": paths.select_path(params, index)}
  if state.batch_stats is not None:
    variables["batch_stats"] = paths.select_path(state.batch_stats, index)
  return variables


@functools.partial(jax.jit, static_argnames="path")
def eval_step(state: TrainState, batch: dict[str, jax.Array], path: str = "sparse"):
  """Cross-entropy and accuracy of one exported path in eval mode (running BN statistics)."""
  check_batch(batch, state.mesh)
  logits = state.apply_fn(export_variables(state, path), batch["image"], train=False)
  return {
    "loss": losses.cross_entropy(logits, batch["label"]),
    "accuracy": losses.accuracy(logits, batch["label"]),
  }
