"""RigL (Evci et al. 2020): sparse from the first step; every ``ΔT`` steps the weakest kept
weights are dropped and as many pruned ones with the largest dense gradient are grown, at zero.

RigL is the sparse-to-sparse baseline that DCIL and DPF (dense-to-sparse, with regrowth by
magnitude) are compared with. Unlike :func:`dcil_jax.masked_update`, its mask update needs the
step's gradient, and it must keep pruned weights at exactly zero (a grown weight starts at 0):
so it is a **wrapper** around the user's optimizer, as ``optax.MultiSteps`` is, and sees both the
raw gradient and the final update. Its state holds a :class:`dcil_jax.MaskedUpdateState`, so
``get_masks``, ``TrainState`` and the experiments read it like any other.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import serialization

from dcil_jax import masks as masks_lib
from dcil_jax import refresh as refresh_lib
from dcil_jax.transform import MaskedUpdateState, refresh_input


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class RigLRefresh:
  """RigL's static settings (no leaves), stored in the state like ``MaskRefresh``."""

  sparsity: float
  update_every: int
  end_step: int
  drop_fraction: float
  distribution: masks_lib.Distribution
  granularity: str = "weight"
  prunable: masks_lib.IsPrunable | None = None

  def describe(self) -> str:
    return "dcil_jax.rigl(optimizer, sparsity, ..., end_step=...) around the whole optimizer"

  def due(self, count: jax.Array) -> jax.Array:
    """Whether the forward pass of step ``count`` is the first with new masks (the update of
    step ``count - 1`` changed them)."""
    t = count - 1
    return (t > 0) & (t % self.update_every == 0) & (t < self.end_step)

  def drop_fraction_at(self, step: jax.Array) -> jax.Array:
    """The cosine-decayed fraction ``α/2 (1 + cos(π t / T_end))`` of kept weights to replace."""
    t = jnp.minimum(jnp.asarray(step, jnp.float32), self.end_step)
    return 0.5 * self.drop_fraction * (1.0 + jnp.cos(math.pi * t / self.end_step))

  def view(self, masks: Any) -> Any:
    return masks

  def pruned_fraction(self, masks: Any) -> jax.Array:
    return masks_lib.sparsity(masks)


def rigl_masks(params: Any, grads: Any, masks: Any, drop_fraction: jax.Array) -> Any:
  """One RigL mask update, per prunable leaf (layer sparsities stay exactly constant).

  ``k = round(drop_fraction * kept)`` kept weights with the smallest ``|w|`` are dropped; then
  the ``k`` entries with the largest ``|g|`` among all the others (just-dropped ones included,
  as in RigL) are grown.

  Args:
    params: the weights ``W_t``.
    grads: the dense gradient at ``W_t ⊙ M`` (every entry, pruned ones included).
    masks: the current masks (``True`` = kept).
    drop_fraction: the fraction of kept weights to replace (traced is fine).

  Returns:
    The new masks, with as many kept entries per leaf as ``masks``.
  """
  pairs = masks_lib.check_masks(masks, params)
  grad_of = {key_path: g for key_path, _, g in masks_lib.check_masks(masks, grads)}
  new = {}
  for key_path, m, w in pairs:
    g = grad_of[key_path]
    size = m.size
    kept = jnp.sum(m, dtype=jnp.int32)
    k = jnp.round(drop_fraction * kept).astype(jnp.int32)
    # Negative scores rank first (see masks._keep_top): pruned entries stay pruned in the drop,
    # and entries that survived the drop are not "grown" again.
    w2, g2 = jnp.square(w.astype(jnp.float32)), jnp.square(g.astype(jnp.float32))
    survive = masks_lib._keep_top(jnp.where(m, w2, -1.0), size - kept + k) & m
    grow = masks_lib._keep_top(jnp.where(survive, -1.0, g2), size - k)
    new[key_path] = survive | grow
  return jax.tree_util.tree_map_with_path(
    lambda key_path, m: None if m is None else new[key_path], masks, is_leaf=lambda x: x is None
  )


class RigLState(NamedTuple):
  """State of :func:`rigl`: the wrapped optimizer's state and the masks."""

  inner: Any
  masked: MaskedUpdateState


def rigl(
  inner: optax.GradientTransformation,
  sparsity: float,
  update_every: int = 100,
  *,
  end_step: int,
  drop_fraction: float = 0.3,
  distribution: masks_lib.Distribution = "erk",
  prunable: masks_lib.IsPrunable | None = None,
  track_revivals: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Wraps ``inner`` (the whole optimizer) into RigL sparse training.

  Masks start at ``sparsity`` (from the initial magnitudes, distributed by ``distribution``;
  RigL's default is ERK) and the layer sparsities never change. Each step:

  1. the gradient of pruned entries is zeroed before ``inner`` sees it (only kept weights train);
  2. at steps ``t = ΔT, 2ΔT, ... < end_step`` the masks are updated by :func:`rigl_masks` from
     ``W_t`` and the *dense* gradient (so use the RigL method's loss, which gives pruned
     weights their gradient: :class:`dcil_jax.RigL`);
  3. the update is replaced by ``-W`` on every entry that is pruned after the step or grown at
     it, so pruned weights are exactly zero and grown weights start at exactly zero.

  The next forward pass uses the new masks (``get_masks``).

  Args:
    inner: the optimizer to wrap (e.g. ``optax.chain(add_decayed_weights, sgd)``).
    sparsity: the constant overall sparsity, in [0, 1).
    update_every: ``ΔT``, steps between mask updates (RigL: 100).
    end_step: ``T_end``: no mask update from this step on (RigL: 75 % of training).
    drop_fraction: ``α``, the initial fraction of kept weights replaced, decayed by a cosine to
      0 at ``end_step`` (RigL: 0.3).
    distribution: ``"erk"`` (RigL), ``"layerwise"`` or ``"global"`` (the initial masks).
    prunable: which parameters to prune, as for :func:`dcil_jax.masked_update`.
    track_revivals: also record which weights were ever regrown, as for
      :func:`dcil_jax.masked_update`.

  Returns:
    An optax transform whose state is a :class:`RigLState`.
  """
  masks_lib.check_sparsity(sparsity)
  if int(update_every) != update_every or update_every < 1:
    raise ValueError(f"update_every must be a positive integer, got {update_every!r}.")
  if int(end_step) != end_step or end_step < 1:
    raise ValueError(f"end_step must be a positive integer, got {end_step!r}.")
  if update_every >= end_step:
    raise ValueError(
      f"update_every={update_every} >= end_step={end_step}: the masks would never be updated "
      "(updates happen at steps update_every, 2*update_every, ... below end_step). Lower "
      "update_every or raise end_step."
    )
  if not 0.0 <= drop_fraction <= 1.0:
    raise ValueError(f"drop_fraction must lie in [0, 1], got {drop_fraction!r}.")
  if distribution not in masks_lib.DISTRIBUTIONS:
    raise ValueError(
      f"Unknown mask distribution {distribution!r}; expected one of {masks_lib.DISTRIBUTIONS}."
    )
  inner = optax.with_extra_args_support(inner)
  refresh = RigLRefresh(
    float(sparsity),
    int(update_every),
    int(end_step),
    float(drop_fraction),
    distribution,
    prunable=prunable,
  )

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    target = jnp.asarray(sparsity, jnp.float32)
    no = jnp.bool_(False)
    if refresh_lib.declare(refresh):  # TrainState.create reading the settings: no masks
      declared = MaskedUpdateState(count, None, target, count, no, None, refresh)
      return RigLState(inner.init(params), declared)
    template = masks_lib.masks_like(params, prunable)
    masks = masks_lib.magnitude_masks(params, template, sparsity, distribution)
    record = refresh_lib.RefreshRecord.create(masks, track_revivals)
    masked = MaskedUpdateState(count, masks, target, count, no, record, refresh, next_masks=masks)
    return RigLState(inner.init(params), masked)

  def update_fn(grads, state, params=None, **extra_args):
    if params is None:
      raise ValueError("rigl needs `params`: call tx.update(grads, state, params).")
    s = state.masked
    current = masks_lib.plain_masks(s.next_masks)  # the masks this step's forward used
    gated = _where_masked(current, grads, lambda g, m: jnp.where(m, g, jnp.zeros_like(g)))
    updates, inner_state = inner.update(gated, state.inner, params, **extra_args)

    magnitudes = refresh_input(params, current)  # the same masks, without a copy of W

    def fresh():
      new = rigl_masks(magnitudes, grads, current, refresh.drop_fraction_at(s.count))
      return new, s.record.after(current, new), optax.safe_increment(s.count)

    # The update of step t decides the masks of step t + 1's forward pass.
    due = refresh.due(optax.safe_increment(s.count))
    new, record, last = jax.lax.cond(due, fresh, lambda: (current, s.record, s.last_refresh))
    # Keep the update where the weight was and stays kept; elsewhere land on exactly zero.
    both = jax.tree.map(
      lambda a, b: None if a is None else a & b, current, new, is_leaf=lambda x: x is None
    )
    updates = jax.tree.map(
      lambda m, u, p: u if m is None else jnp.where(m, u, -p),
      both,
      updates,
      params,
      is_leaf=lambda x: x is None,
    )
    masked = s._replace(
      count=optax.safe_increment(s.count),
      masks=current,
      record=record,
      last_refresh=last,
      next_masks=new,
    )
    return updates, RigLState(inner_state, masked)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _where_masked(masks: Any, tree: Any, fn) -> Any:
  return jax.tree.map(
    lambda m, x: x if m is None else fn(x, m), masks, tree, is_leaf=lambda x: x is None
  )


serialization.register_serialization_state(RigLRefresh, lambda _: {}, lambda target, _: target)


def check_outermost(opt_state: Any) -> None:
  """Raises unless every :class:`RigLState` in ``opt_state`` is the last member of each chain
  that holds it: a transform after ``rigl`` would rescale its ``-W`` updates, so pruned weights
  would never reach zero and grown ones would not start at zero."""
  is_rigl = lambda x: isinstance(x, RigLState)
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=is_rigl)[0]:
    if not is_rigl(leaf):
      continue
    node = opt_state
    for key in key_path:
      if isinstance(node, tuple) and not hasattr(node, "_fields"):  # an optax.chain's state
        if key.idx != len(node) - 1:
          raise ValueError(
            "dcil_jax.rigl must wrap the whole optimizer (be the last transform of the chain): "
            f"{len(node) - 1 - key.idx} transform(s) come after it, and they would change its "
            "updates, so pruned weights would not stay at zero. Put them inside: "
            "dcil_jax.rigl(optax.chain(..., optax.scale(0.5)), ...)."
          )
      node = _child(node, key)
      if node is None:  # a custom pytree node: no chain can be seen below it
        break


def _child(node: Any, key: Any) -> Any:
  if isinstance(key, jax.tree_util.GetAttrKey):
    return getattr(node, key.name)
  if isinstance(key, jax.tree_util.DictKey):
    return node[key.key]
  if isinstance(key, jax.tree_util.SequenceKey):
    return node[key.idx]
  return None
