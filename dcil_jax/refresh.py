"""The mask-refresh protocol that :func:`dcil_jax.masked_update` and :func:`dcil_jax.rigl` share,
the record each refresh leaves in the optimizer state, and how ``TrainState`` reads an
optimizer's mask settings.

One owner: what is pruned (the ``prunable`` rule), by which schedule and how often are given
once, to the mask transform. Its settings travel in its state as a static :class:`Refresh`
(no leaves); everything else (the methods, ``TrainState``, the experiments) reads them from
there. :func:`declared_refreshes` finds them in an optax chain without building any masks.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from dcil_jax import masks as masks_lib
from dcil_jax import rules

__all__ = ["Refresh", "RefreshRecord", "declared_refreshes", "layer_flip_rates", "revived"]

Masks = Any


@runtime_checkable
class Refresh(Protocol):
  """Static settings of a mask transform, stored in its state (``MaskedUpdateState.refresh``).

  Attributes:
    update_every: steps between refreshes.
    prunable: the rule given to the transform (``None``: the model's convolutions, found by
      ``TrainState.create`` / :func:`dcil_jax.lift` from the model).
  """

  update_every: int
  prunable: rules.Rule | None

  def due(self, count: jax.Array) -> jax.Array:
    """Whether the forward pass of optimizer step ``count`` uses newly computed masks."""
    ...

  def view(self, masks: Masks) -> Masks:
    """``masks`` in the unit that is pruned (one bit per filter for filter masks)."""
    ...

  def pruned_fraction(self, masks: Masks) -> jax.Array:
    """The pruned fraction in the unit the schedule counts."""
    ...

  def describe(self) -> str:
    """How to build this transform, for error messages."""
    ...


def layer_flip_rates(old: Masks, new: Masks) -> dict[str, jax.Array]:
  """Fraction of each prunable leaf's mask bits that differ between ``old`` and ``new``, keyed
  like :func:`dcil_jax.layer_sparsities` (``keystr`` of the key path)."""
  _check_same(old, new)
  flat_old, _ = jax.tree_util.tree_flatten_with_path(old)
  return {
    jax.tree_util.keystr(key_path): jnp.mean(a != b)
    for (key_path, a), b in zip(flat_old, jax.tree.leaves(new))
  }


def revived(old: Masks, new: Masks) -> Masks:
  """Bits pruned in ``old`` and kept in ``new``: weights a refresh brought back."""
  _check_same(old, new)
  return jax.tree.map(lambda a, b: jnp.logical_and(jnp.logical_not(a), b), old, new)


def _check_same(old: Masks, new: Masks) -> None:
  a, b = jax.tree.structure(old), jax.tree.structure(new)
  if a != b or any(x.shape != y.shape for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(new))):
    raise ValueError("Need two masks trees of the same structure and shapes.")


def _fraction(masks: Masks) -> jax.Array:
  leaves = jax.tree.leaves(masks)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return sum(jnp.sum(m, dtype=jnp.float32) for m in leaves) / sum(m.size for m in leaves)


class RefreshRecord(NamedTuple):
  """What the last refresh changed, counted in the pruned unit (filters for filter masks).

  Kept in the transform's state, computed once, in the update that stores the new masks: the
  train step's metrics and the experiments read it from there.

  Attributes:
    flip_rate: fraction of entries whose bit changed.
    revived: fraction of entries pruned before and kept after (regrown).
    layer_flip_rate: ``{keystr(key path): flip rate}`` per prunable leaf.
    ever_revived: a masks tree of the entries revived at least once (``None`` unless the
      transform was built with ``track_revivals=True``: it costs one bool per weight).
  """

  flip_rate: jax.Array
  revived: jax.Array
  layer_flip_rate: dict[str, jax.Array]
  ever_revived: Masks = None

  @classmethod
  def create(cls, view: Masks, track_revivals: bool = False) -> RefreshRecord:
    """The record before any refresh, for masks whose pruned-unit view is ``view``."""
    zero = jnp.zeros([], jnp.float32)
    layers = {k: zero for k in layer_flip_rates(view, view)}
    ever = jax.tree.map(jnp.zeros_like, view) if track_revivals else None
    return cls(zero, zero, layers, ever)

  def after(self, old_view: Masks, new_view: Masks) -> RefreshRecord:
    """The record of a refresh from ``old_view`` to ``new_view`` (pruned-unit views)."""
    back = revived(old_view, new_view)
    ever = self.ever_revived
    if ever is not None:
      ever = jax.tree.map(jnp.logical_or, ever, back)
    return RefreshRecord(
      masks_lib.flip_rate(old_view, new_view),
      _fraction(back),
      layer_flip_rates(old_view, new_view),
      ever,
    )

  @property
  def ever_revived_fraction(self) -> jax.Array | None:
    """Fraction of prunable entries revived at least once (``None`` when not tracked)."""
    return None if self.ever_revived is None else _fraction(self.ever_revived)


_DECLARED: contextvars.ContextVar[list[Refresh] | None] = contextvars.ContextVar(
  "dcil_jax_declared_refreshes", default=None
)


@contextlib.contextmanager
def _declaring() -> Iterator[list[Refresh]]:
  found: list[Refresh] = []
  token = _DECLARED.set(found)
  try:
    yield found
  finally:
    _DECLARED.reset(token)


def declare(refresh: Refresh) -> bool:
  """Called by a mask transform's ``init``: records ``refresh`` when :func:`declared_refreshes`
  is reading an optimizer, and says whether it is (then ``init`` builds no masks)."""
  found = _DECLARED.get()
  if found is None:
    return False
  found.append(refresh)
  return True


def declared_refreshes(tx: Any, params: Any) -> tuple[Refresh, ...]:
  """The mask settings of every mask transform in ``tx``, read without building any masks.

  Traces ``tx.init(params)`` abstractly (nothing is computed); each :func:`masked_update` or
  :func:`rigl` in the chain declares its :class:`Refresh` instead of building masks, so this
  works on a plain params tree whatever the transforms' ``prunable`` rules are.

  Args:
    tx: an optax transform (any chain or wrapper).
    params: the params ``tx`` will be initialised with (plain or lifted).

  Returns:
    The declared settings, in the order ``tx.init`` met them (empty for a plain optimizer).
  """
  with _declaring() as found:
    # A new function each time: a traced ``tx.init`` that jax has cached would not run again.
    jax.eval_shape(lambda p: tx.init(p), params)
  return tuple(found)
