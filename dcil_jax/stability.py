"""How stable is dynamic pruning? Mask-churn and accuracy-variability measures.

The paper's second claim is that DCIL's refined gradients make training *more stable* than
DPF's straight-through estimate. These functions measure that from what a run records:

- :func:`layer_flip_rates`: per layer, the fraction of mask bits that change at one refresh
  (:func:`dcil_jax.flip_rate` is the same over all layers).
- :func:`revived` / :class:`RevivalTracker`: weights pruned at one refresh and kept at the next,
  and which weights were *ever* revived over a run.
- :func:`accuracy_variability`: how much test accuracy moves from one evaluation to the next
  over the last part of training (a stable run has converged; an unstable one keeps jumping).
- :func:`largest_drop`: the deepest one-evaluation dip over the whole run (after warm-up).
- :func:`seed_spread`: mean and sample standard deviation over seeds.

Mask functions are pure ``jax.numpy`` (they work under ``jit`` on the masks pytree, ``None`` at
unpruned leaves); the accuracy functions take host arrays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

Masks = Any


def _check_same(old: Masks, new: Masks) -> None:
  a, b = jax.tree.structure(old), jax.tree.structure(new)
  if a != b or any(x.shape != y.shape for x, y in zip(jax.tree.leaves(old), jax.tree.leaves(new))):
    raise ValueError("Need two masks trees of the same structure and shapes.")


def layer_flip_rates(old: Masks, new: Masks) -> dict[str, jax.Array]:
  """Fraction of each prunable leaf's mask bits that differ between ``old`` and ``new``.

  Returns:
    ``{keystr(path): rate}`` in tree order, keyed like :func:`dcil_jax.layer_sparsities`.
  """
  _check_same(old, new)
  flat_old, _ = jax.tree_util.tree_flatten_with_path(old)
  return {
    jax.tree_util.keystr(path): jnp.mean(a != b)
    for (path, a), b in zip(flat_old, jax.tree.leaves(new))
  }


def revived(old: Masks, new: Masks) -> Masks:
  """Bits pruned in ``old`` and kept in ``new``: weights a refresh brought back."""
  _check_same(old, new)
  return jax.tree.map(lambda a, b: jnp.logical_and(jnp.logical_not(a), b), old, new)


def fraction(masks: Masks) -> jax.Array:
  """Fraction of all prunable entries that are set (e.g. of a :func:`revived` tree)."""
  leaves = jax.tree.leaves(masks)
  return sum(jnp.sum(m) for m in leaves) / sum(m.size for m in leaves)


class RevivalTracker(NamedTuple):
  """Which weights have ever been revived, and how many refreshes have been seen.

  Build with :meth:`create` from a masks tree, then ``tracker = tracker.update(old, new)`` at
  every refresh (jit-friendly; keep it next to the train state, e.g. in a checkpoint).
  """

  ever_revived: Masks
  refreshes: jax.Array

  @classmethod
  def create(cls, masks: Masks) -> RevivalTracker:
    return cls(jax.tree.map(jnp.zeros_like, masks), jnp.zeros([], jnp.int32))

  def update(self, old: Masks, new: Masks) -> RevivalTracker:
    ever = jax.tree.map(jnp.logical_or, self.ever_revived, revived(old, new))
    return RevivalTracker(ever, self.refreshes + 1)

  @property
  def ever_revived_fraction(self) -> jax.Array:
    """Fraction of prunable weights revived at least once so far."""
    return fraction(self.ever_revived)


def accuracy_variability(
  accuracies: Sequence[float], last_fraction: float = 0.25
) -> dict[str, float]:
  """Variability of a test-accuracy curve over its last ``last_fraction`` of evaluations.

  Returns:
    ``step_std``: the standard deviation of the change from one evaluation to the next (the
    step-to-step variance's square root; 0 for a flat curve, large for a jumpy one whatever its
    trend); ``std``: the standard deviation of the accuracies themselves; ``min``: the lowest
    accuracy in the window (a dip); ``evals``: how many evaluations the window holds.
  """
  if not 0 < last_fraction <= 1:
    raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}.")
  acc = np.asarray(accuracies, dtype=np.float64)
  if acc.ndim != 1 or acc.size < 2:
    raise ValueError(f"Need a 1-D curve of at least 2 accuracies, got shape {acc.shape}.")
  window = acc[-max(2, round(last_fraction * acc.size)) :]
  return {
    "step_std": float(np.std(np.diff(window))),
    "std": float(np.std(window)),
    "min": float(window.min()),
    "evals": int(window.size),
  }


def largest_drop(accuracies: Sequence[float], skip_fraction: float = 0.1) -> float:
  """The largest fall of accuracy from one evaluation to the next (0 if it never falls),
  after the first ``skip_fraction`` of the evaluations (the first epochs' noise).

  Catches the dips of an unstable run during the sparsity ramp, which a window at the end of
  training (:func:`accuracy_variability`) misses once the run has settled.
  """
  acc = np.asarray(accuracies, dtype=np.float64)
  if acc.ndim != 1 or acc.size < 2:
    raise ValueError(f"Need a 1-D curve of at least 2 accuracies, got shape {acc.shape}.")
  if not 0 <= skip_fraction < 1:
    raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}.")
  tail = acc[min(round(skip_fraction * acc.size), acc.size - 2) :]
  return float(max(0.0, np.max(tail[:-1] - tail[1:])))


def seed_spread(values: Sequence[float]) -> dict[str, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value) over seeds."""
  v = np.asarray(values, dtype=np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"Need a 1-D, non-empty list of values, got shape {v.shape}.")
  return {
    "mean": float(v.mean()),
    "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    "n": int(v.size),
  }
