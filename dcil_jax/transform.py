"""``masked_update``: an optax transform that owns the masks and refreshes them inside ``jit``."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dcil_jax import masks as masks_lib
from dcil_jax.schedules import SparsitySchedule


class MaskedUpdateState(NamedTuple):
  """State of :func:`masked_update`.

  Attributes:
    count: optimizer steps taken so far (``t``).
    masks: the masks for the forward pass of step ``t`` (``None`` at leaves that are not pruned).
    trained_masks: the masks step ``t - 1`` trained with. They differ from ``masks`` right after
      a refresh; evaluation and export use them, as the official code evaluates the masks the
      network (and its BatchNorm statistics) has trained with, not the ones it refreshes next.
    target_sparsity: the schedule's sparsity at the last refresh.
    flip_rate: fraction of prunable entries whose bit changed at the last refresh.
    last_refresh: the ``count`` at which the masks were last computed.
  """

  count: jax.Array
  masks: Any
  trained_masks: Any
  target_sparsity: jax.Array
  flip_rate: jax.Array
  last_refresh: jax.Array


def masked_update(
  sparsity_schedule: SparsitySchedule,
  update_every: int = 16,
  *,
  distribution: masks_lib.Distribution = "global",
  is_prunable: masks_lib.IsPrunable = masks_lib.is_conv_kernel,
) -> optax.GradientTransformation:
  """Keeps magnitude masks in the optimizer state and refreshes them every ``update_every`` steps.

  DCIL (and DPF) prune dynamically: every ``k`` iterations, *before* the forward pass, the masks
  are recomputed from the magnitudes of the dense weights ``W_t`` at the scheduled sparsity, also
  after the target is reached, so pruned weights that grew back are revived. This transform does
  exactly that inside a jitted step: ``init`` computes the masks of step 0 from ``W_0``, and the
  update of step ``t`` computes those of step ``t + 1`` from ``W_{t+1} = params + updates`` when
  ``(t + 1) % k == 0`` (a ``lax.cond``), so the forward pass of step ``t`` always uses masks
  computed from ``W_t`` when ``t % k == 0`` — the official timing.

  The updates pass through untouched: pruned weights keep training (that is the method), and
  momentum is never reset. Because it reads the next weights as ``params + updates``, put it
  **last** in the chain, after the optimizer; the whole chain may be wrapped in
  ``optax.MultiSteps`` (then it counts optimizer steps) or use ``optax.inject_hyperparams``.

  Args:
    sparsity_schedule: ``step -> sparsity`` (see :mod:`dcil_jax.schedules`).
    update_every: refresh period ``k`` in optimizer steps (official: 16).
    distribution: ``"global"`` (official), ``"layerwise"`` or ``"erk"``.
    is_prunable: ``(key_path, leaf) -> bool``; default: every convolution kernel.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`MaskedUpdateState`; read the
    masks from any optimizer state with :func:`get_masks`.
  """
  if int(update_every) != update_every or update_every < 1:
    raise ValueError(f"update_every must be a positive integer, got {update_every!r}.")
  if distribution not in masks_lib.DISTRIBUTIONS:
    raise ValueError(
      f"Unknown mask distribution {distribution!r}; expected one of {masks_lib.DISTRIBUTIONS}."
    )

  def refresh(params, old_masks, count):
    target = sparsity_schedule(count)
    new = masks_lib.magnitude_masks(params, old_masks, target, distribution)
    return new, target, masks_lib.flip_rate(old_masks, new)

  def init_fn(params):
    template = masks_lib.masks_like(params, is_prunable)
    count = jnp.zeros([], jnp.int32)
    masks, target, _ = refresh(params, template, count)
    trained = jax.tree.map(jnp.copy, masks)  # distinct buffers: the state may be donated
    return MaskedUpdateState(
      count, masks, trained, target, jnp.zeros([], jnp.float32), jnp.zeros([], jnp.int32)
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("masked_update needs `params`: call tx.update(grads, state, params).")
    count = optax.safe_increment(state.count)
    masks, target, flips, last = jax.lax.cond(
      count % update_every == 0,
      # W_{t+1} = params + updates, computed only on refresh steps.
      lambda: (*refresh(optax.apply_updates(params, updates), state.masks, count), count),
      lambda: (state.masks, state.target_sparsity, state.flip_rate, state.last_refresh),
    )
    return updates, MaskedUpdateState(count, masks, state.masks, target, flips, last)

  return optax.GradientTransformation(init_fn, update_fn)


def find_masked_state(opt_state: Any) -> MaskedUpdateState:
  """The :class:`MaskedUpdateState` inside any (nested) optimizer state.

  Raises:
    ValueError: if there is none, or more than one.
  """
  found = [
    s
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, MaskedUpdateState))
    if isinstance(s, MaskedUpdateState)
  ]
  if len(found) != 1:
    raise ValueError(
      f"Expected exactly one dcil_jax.masked_update in the optimizer, found {len(found)}."
    )
  return found[0]


def get_masks(opt_state: Any) -> Any:
  """The masks of the next forward pass, from any optimizer state that holds them."""
  return find_masked_state(opt_state).masks


def get_trained_masks(opt_state: Any) -> Any:
  """The masks the last optimizer step trained with: those to evaluate and export."""
  return find_masked_state(opt_state).trained_masks
