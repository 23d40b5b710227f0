"""Binary weight masks that live as a pytree next to the parameters.

A masks tree mirrors the params tree: every prunable leaf has a boolean array of the same shape
(``True`` = kept), every other leaf is ``None``. ``None`` is an empty pytree node, so a masks tree
can sit inside an optax state, be jitted, donated and checkpointed like any other pytree.

Masks are magnitude masks with an **exact** number of zeros: ties at the threshold are broken by
flat index (the lower index is pruned first), so the count never drifts the way the official
code's strict ``score > quantile`` threshold does (it prunes one weight too many).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dcil_jax import paths, rules

Params = Any
Masks = Any
KeyPath = tuple[Any, ...]
IsPrunable = rules.Rule
Distribution = Literal["global", "layerwise", "erk"]
DISTRIBUTIONS = ("global", "layerwise", "erk")


class PrunableRuleNeeded(ValueError):
  """Masks for a plain params tree were asked for without a rule that says what to prune."""


def _is_masked_node(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def masks_like(params: Params, prunable: IsPrunable | None = None) -> Masks:
  """All-ones masks for the prunable leaves and ``None`` elsewhere.

  Args:
    params: a plain params tree, or a lifted one (:func:`dcil_jax.lift`), whose
      ``"prunable"`` part is exactly what is pruned. ``optax.MaskedNode`` leaves (params hidden
      by ``optax.masked`` / ``multi_transform``) stay ``MaskedNode``.
    prunable: the rule (see :mod:`dcil_jax.rules`). Required for a plain tree; for a lifted
      tree it is optional and, if given, must select exactly the ``"prunable"`` part (one
      source of truth: a tree lifted with one rule is never pruned by another).

  Returns:
    A masks tree with the structure of ``params``.

  Raises:
    PrunableRuleNeeded: a plain tree and no rule.
    ValueError: the rule selects nothing, or disagrees with the lifted layout.
  """
  lifted = paths.is_lifted(params)
  if prunable is None and not lifted:
    raise PrunableRuleNeeded(
      "Which parameters to prune is not known: pass prunable= to dcil_jax.masked_update, e.g. "
      "dcil_jax.rules.conv_kernels(model, example_input) (the official rule: every "
      "convolution kernel), dcil_jax.rules.dense_kernels(...), dcil_jax.rules.all_kernels or "
      "your own (key_path, leaf) -> bool; or give TrainState.create an example_input so it can "
      "find the convolutions itself."
    )
  disagree = []

  def make(key_path, leaf):
    if _is_masked_node(leaf):
      return leaf
    if lifted:
      part, plain_path = rules.key_names(key_path[:1])[0], key_path[1:]
      chosen = part == paths.PRUNABLE
      if prunable is not None and bool(prunable(plain_path, leaf)) != chosen:
        disagree.append(f"{part}{jax.tree_util.keystr(plain_path)}")
    else:
      chosen = bool(prunable(key_path, leaf))
    return jnp.ones(jnp.shape(leaf), dtype=bool) if chosen else None

  masks = jax.tree_util.tree_map_with_path(make, params, is_leaf=_is_masked_node)
  if disagree:
    raise ValueError(
      "These parameters were lifted with another prunable rule than masked_update's: "
      f"{disagree[:6]}{' ...' if len(disagree) > 6 else ''}. Give the rule once (to "
      "masked_update; TrainState.create and dcil_jax.lift read it from there)."
    )
  if not jax.tree.leaves(masks):
    raise ValueError(
      "The prunable rule selects no parameter: nothing would be pruned. See dcil_jax.rules "
      "for ready rules (conv_kernels is the official one) or write your own."
    )
  return masks


def plain_masks(masks: Masks) -> Masks:
  """``masks`` with ``optax.MaskedNode`` (leaves another optimizer branch owns) as ``None``."""
  return jax.tree.map(lambda m: None if _is_masked_node(m) else m, masks, is_leaf=_is_masked_node)


def check_masks(masks: Masks, params: Params) -> list[tuple[Any, Any, Any]]:
  """(key path, mask, param) for every prunable leaf; checks that the trees match."""
  flat_masks, mask_def = jax.tree_util.tree_flatten_with_path(masks, is_leaf=_is_none)
  flat_params, param_def = jax.tree_util.tree_flatten_with_path(params)
  if mask_def.num_leaves != param_def.num_leaves or [p for p, _ in flat_masks] != [
    p for p, _ in flat_params
  ]:
    raise ValueError(
      "The masks tree does not mirror the params tree. Masks must have one entry per "
      "parameter leaf (None for leaves that are not pruned); build them with "
      "dcil_jax.masks_like(params)."
    )
  out = []
  for (key_path, m), (_, p) in zip(flat_masks, flat_params):
    if m is None:
      continue
    if jnp.shape(m) != jnp.shape(p):
      raise ValueError(
        f"Mask shape {jnp.shape(m)} does not match parameter shape {jnp.shape(p)} at "
        f"{jax.tree_util.keystr(key_path)}."
      )
    out.append((key_path, m, p))
  return out


def _is_none(x: Any) -> bool:
  return x is None


def map_masked(fn: Callable[[Any, Any], Any], params: Params, masks: Masks) -> Params:
  """``fn(param, mask)`` on prunable leaves; other leaves are returned unchanged."""
  check_masks(masks, params)  # validates structure and shapes (at trace time: free under jit)
  return jax.tree.map(lambda m, p: p if m is None else fn(p, m), masks, params, is_leaf=_is_none)


def apply_masks(params: Params, masks: Masks) -> Params:
  """``W ⊙ M`` on prunable leaves."""
  return map_masked(lambda p, m: jnp.where(m, p, jnp.zeros_like(p)), params, masks)


def check_sparsity(sparsity: Any) -> None:
  """Raises ``ValueError`` unless a concrete ``sparsity`` lies in [0, 1); tracers pass."""
  if isinstance(sparsity, jax.core.Tracer):
    return
  s = np.asarray(sparsity)
  if s.ndim != 0 or not np.isfinite(s) or not 0.0 <= float(s) < 1.0:
    raise ValueError(f"Sparsity must be a number in [0, 1), got {sparsity!r}.")


def _keep_top(scores: jax.Array, num_pruned: jax.Array) -> jax.Array:
  """Boolean mask keeping all but the ``num_pruned`` lowest scores; ties pruned by lower index.

  Scores are non-negative, except that negative ones mark entries to prune first: there must be
  at most ``num_pruned`` of them.

  No sort: the pruning threshold is found by bisection on the bit patterns of the (non-negative)
  float32 scores, which order like the floats themselves — 32 counting passes, faster than an
  argsort on CPU (``benchmarks/results/step_time_cpu.md``, "Profiling") and friendly to TPUs.
  Entries tied at the threshold are pruned in index order until the count is exact.
  """
  bits = jax.lax.bitcast_convert_type(scores.reshape(-1).astype(jnp.float32), jnp.int32)

  def halve(_, bounds):  # invariant: count(bits <= hi) >= num_pruned
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    enough = jnp.sum(bits <= mid) >= num_pruned
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  inf_bits = jnp.int32(0x7F800000)
  _, threshold = jax.lax.fori_loop(0, 32, halve, (jnp.int32(0), inf_bits))
  below, tied = bits < threshold, bits == threshold
  tie_rank = jnp.cumsum(tied, dtype=jnp.int32) - 1
  pruned = below | (tied & (tie_rank < num_pruned - jnp.sum(below, dtype=jnp.int32)))
  return ~(pruned & (num_pruned > 0)).reshape(scores.shape)


def _num_pruned(sparsity: jax.Array, size: int | jax.Array) -> jax.Array:
  """``round(sparsity * size)``, at most ``size - 1``: a refresh never prunes a whole group (a
  sparsity just below 1 would otherwise round to every weight)."""
  n = jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)
  return jnp.minimum(n, jnp.maximum(jnp.int32(size) - 1, 0))


def erk_sparsities(
  shapes: list[tuple[int, ...]], sparsity: jax.Array, power: float = 1.0
) -> jax.Array:
  """Per-layer sparsities of the Erdős–Rényi-Kernel distribution (RigL, Evci et al. 2020).

  Density of layer l is ``eps * (sum(shape_l) / prod(shape_l)) ** power``, with ``eps`` chosen so
  the overall sparsity equals ``sparsity``; layers whose density would exceed 1 are kept dense and
  ``eps`` re-solved. Jittable in ``sparsity`` (a fixed number of capping rounds).
  """
  sizes = jnp.asarray([float(np.prod(s)) for s in shapes])
  raw = jnp.asarray([(sum(s) / float(np.prod(s))) ** power for s in shapes])
  density = 1.0 - jnp.asarray(sparsity, jnp.float32)

  def solve(dense):
    rhs = jnp.sum(jnp.where(dense, 0.0, sizes * density)) - jnp.sum(
      jnp.where(dense, sizes * (1.0 - density), 0.0)
    )
    divisor = jnp.sum(jnp.where(dense, 0.0, raw * sizes))
    return rhs / divisor

  dense = jnp.zeros(len(shapes), bool)
  for _ in range(len(shapes)):  # capping only grows `eps`, so each round can only add layers
    dense = dense | (solve(dense) * raw > 1.0)
  layer_density = jnp.where(dense, 1.0, jnp.clip(solve(dense) * raw, 0.0, 1.0))
  return 1.0 - layer_density


def magnitude_masks(
  params: Params,
  masks: Masks,
  sparsity: Any,
  distribution: Distribution = "global",
  *,
  keep_pruned: bool = False,
) -> Masks:
  """New masks from the magnitudes of the (dense) ``params``, at an exact ``sparsity``.

  Args:
    params: the weights ``W`` whose magnitudes rank the entries.
    masks: a masks tree; only its structure (which leaves are prunable) is used, unless
      ``keep_pruned``.
    sparsity: fraction of prunable entries to prune, in [0, 1); may be traced.
    distribution: ``"global"`` — one threshold over all prunable leaves (the official default);
      ``"layerwise"`` — the same sparsity in every leaf; ``"erk"`` — Erdős–Rényi-Kernel.
    keep_pruned: entries pruned in ``masks`` rank below every kept one, so they stay pruned
      while the sparsity does not fall (GMP: no regrowth).

  Returns:
    A masks tree like ``masks`` with ``round(sparsity * n)`` zeros (overall for ``global``, per
    leaf otherwise).
  """
  check_sparsity(sparsity)
  if distribution not in DISTRIBUTIONS:
    raise ValueError(
      f"Unknown mask distribution {distribution!r}; expected one of {DISTRIBUTIONS}."
    )
  return _magnitude_masks(params, masks, sparsity, distribution, keep_pruned)


# One compiled program, not an op-by-op run, when called outside `jit` (at set-up, in a user's
# own loop): a ResNet's ranking is hundreds of small ops, each compiled on its own otherwise.
@functools.partial(jax.jit, static_argnames=("distribution", "keep_pruned"))
def _magnitude_masks(
  params: Params, masks: Masks, sparsity: Any, distribution: Distribution, keep_pruned: bool
) -> Masks:
  pairs = check_masks(masks, params)
  scores = [jnp.square(p.astype(jnp.float32)) for _, _, p in pairs]
  if keep_pruned:
    scores = [jnp.where(m, s, -1.0) for (_, m, _), s in zip(pairs, scores)]
  if distribution == "global":
    sizes = [s.size for s in scores]
    flat = jnp.concatenate([s.reshape(-1) for s in scores])
    keep = _keep_top(flat, _num_pruned(sparsity, flat.size))
    new = jnp.split(keep, np.cumsum(sizes)[:-1])
    new = [k.reshape(s.shape) for k, s in zip(new, scores)]
  elif distribution == "layerwise":
    new = [_keep_top(s, _num_pruned(sparsity, s.size)) for s in scores]
  elif distribution == "erk":
    layer_sparsity = erk_sparsities([s.shape for s in scores], sparsity)
    new = [_keep_top(s, _num_pruned(layer_sparsity[i], s.size)) for i, s in enumerate(scores)]
  else:
    raise AssertionError(distribution)  # checked by magnitude_masks
  by_path = {key_path: m for (key_path, _, _), m in zip(pairs, new)}
  return jax.tree_util.tree_map_with_path(
    lambda key_path, m: None if m is None else by_path[key_path], masks, is_leaf=_is_none
  )


def sparsity(masks: Masks) -> jax.Array:
  """Overall fraction of pruned entries among all prunable entries."""
  leaves = jax.tree.leaves(masks)
  if not leaves:
    raise ValueError("sparsity() needs a masks tree with at least one mask (got none).")
  pruned = sum(jnp.sum(~m) for m in leaves)
  return pruned / sum(m.size for m in leaves)


def layer_sparsities(masks: Masks) -> dict[str, jax.Array]:
  """Fraction pruned per prunable leaf, keyed by its key path (e.g. ``"['Conv_0']['kernel']"``)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(masks)
  return {jax.tree_util.keystr(key_path): 1.0 - jnp.mean(m) for key_path, m in flat}


def flip_rate(old: Masks, new: Masks) -> jax.Array:
  """Fraction of prunable entries whose mask bit differs between two masks trees."""
  a, b = jax.tree.leaves(old), jax.tree.leaves(new)
  if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
    raise ValueError("flip_rate needs two masks trees of the same structure and shapes.")
  return sum(jnp.sum(x != y) for x, y in zip(a, b)) / sum(x.size for x in a)
