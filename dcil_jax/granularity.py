"""Masks at coarser granularities than single weights: whole filters, and N:M groups.

Both return a masks tree in the convention of :mod:`dcil_jax.masks` (a boolean array of the
parameter's full shape at prunable leaves, ``None`` elsewhere), so they drop in wherever
:func:`dcil_jax.magnitude_masks` is used; they are pure functions of plain pytrees.

- **Filter** masks (the official code's structured mode, ``st_dcil``): an output filter (the last
  axis of a Flax conv kernel ``[..., in, out]``) is scored by the mean ``|w|`` (``"l1"``) or mean
  ``w**2`` (``"l2"``) over the rest of its kernel, one global threshold ranks all filters of all
  prunable kernels, and the mask broadcasts over the filter. The count is exact and ties are
  broken as in :func:`dcil_jax.magnitude_masks` (the lower index, in tree order, is pruned first);
  the sparsity may be traced. **No layer is ever emptied**: at most ``n − 1`` of a layer's ``n``
  filters are pruned (its best-scored filter is kept), as weight masks never prune a whole group;
  a layer with every filter pruned would make the sparse path's output a constant while the loss
  stays finite, a failure nothing else reports. (The official code has no such floor.) When the
  target asks for more filters than that leaves, the floor wins and the count falls short;
  :func:`layers_at_floor` reports the layers that keep a single filter.
- **Layer-relative** filter scores (``"l1_relative"``, ``"l2_relative"``): each filter's score
  divided by the mean score of its layer. A global threshold on raw mean ``|w|`` compares layers
  whose weights have different scales: the usual initialisations scale a kernel by
  ``1/sqrt(fan_in)``, so wide, deep layers score lower and lose most of their filters (on a
  trained ResNet-20 every filter it pruned was in the last stage). Relative scores rank each
  filter against its own layer's, and the one global threshold then prunes the weakest filters
  relative to their peers.
- **N:M** masks: in every group of ``m`` consecutive weights along the input-channel axis (axis
  -2), the ``n`` largest ``|w|`` are kept: the pattern sparse tensor cores run faster. Its
  sparsity is fixed at ``1 - n/m`` by construction, so a sparsity schedule does not apply to it.

The counting helpers count *filters* (:func:`filter_view` reduces a mask to one bit per filter),
so flip rates, revival and per-layer statistics can be measured in the unit that was pruned.
"""

from __future__ import annotations

from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from dcil_jax.masks import _keep_top, _num_pruned, check_masks, check_sparsity

Params = Any
Masks = Any
FilterScore = Literal["l1", "l2", "l1_relative", "l2_relative"]
FILTER_SCORES = ("l1", "l2", "l1_relative", "l2_relative")
FilterDistribution = Literal["global", "layerwise"]


def _is_none(x: Any) -> bool:
  return x is None


def _name(path: Any) -> str:
  return jax.tree_util.keystr(path)


def _replace_leaves(masks: Masks, pairs: list, new: list) -> Masks:
  by_path = {path: m for (path, _, _), m in zip(pairs, new)}
  return jax.tree_util.tree_map_with_path(
    lambda path, m: None if m is None else by_path[path], masks, is_leaf=_is_none
  )


def filter_scores(params: Params, masks: Masks, score: FilterScore = "l1") -> Masks:
  """Per-filter scores: a ``[out]`` vector at every prunable leaf, ``None`` elsewhere.

  Args:
    params: the weights that rank the filters (the dense ``W``, as for weight masks).
    masks: a masks tree; only its structure (which leaves are prunable) is used.
    score: ``"l1"`` (mean ``|w|``) or ``"l2"`` (mean ``w**2``) over each filter's kernel;
      ``"l1_relative"`` / ``"l2_relative"``: the same divided by its layer's mean filter score
      (see the module docstring).

  Returns:
    A tree like ``masks`` with float32 ``[out]`` scores at prunable leaves.
  """
  if score not in FILTER_SCORES:
    raise ValueError(f"Unknown filter score {score!r}; expected one of {FILTER_SCORES}.")
  pairs = check_masks(masks, params)
  new = []
  for path, _, p in pairs:
    if jnp.ndim(p) < 2:
      raise ValueError(f"Filter masks need kernels with ndim >= 2; {_name(path)} has {p.shape}.")
    w = p.astype(jnp.float32)
    w = jnp.abs(w) if score.startswith("l1") else jnp.square(w)
    per_filter = jnp.mean(w.reshape(-1, w.shape[-1]), axis=0)
    if score.endswith("_relative"):
      mean = jnp.mean(per_filter)
      per_filter = per_filter / jnp.where(mean > 0, mean, 1.0)
    new.append(per_filter)
  return _replace_leaves(masks, pairs, new)


def filter_masks(
  params: Params,
  masks: Masks,
  sparsity: Any,
  score: FilterScore = "l1",
  distribution: FilterDistribution = "global",
) -> Masks:
  """Filter masks with an exact number of pruned filters, broadcast to the kernels' shapes.

  Args:
    params: the weights that rank the filters.
    masks: a masks tree (``None`` at leaves that are not pruned); only its structure is used.
    sparsity: fraction of *filters* to prune, in [0, 1); may be traced under ``jit``.
    score: ``"l1"`` (mean ``|w|``, the official default) or ``"l2"`` (mean ``w**2``), or
      their layer-relative forms ``"l1_relative"`` / ``"l2_relative"`` (see
      :func:`filter_scores`).
    distribution: ``"global"``: one threshold over all filters of all prunable kernels (the
      official code); ``"layerwise"``: the same fraction of filters in every kernel.

  Returns:
    A masks tree like ``masks``; every prunable leaf is ``True`` or ``False`` along whole
    filters, and ``round(sparsity * filters)`` filters are pruned (overall for ``global``, per
    leaf for ``layerwise``), except that every leaf keeps at least one filter (its best
    scored: the floor may leave the count short). Ties are pruned lower index first, in tree
    order.
  """
  check_sparsity(sparsity)
  pairs = check_masks(masks, params)
  scores = jax.tree.leaves(filter_scores(params, masks, score))
  if distribution == "global":
    # Each layer's best filter (the last of tied bests, as ties prune the lower index) ranks
    # above every other filter, and at most filters - layers are pruned: no layer is emptied.
    protected = [s.size - 1 - jnp.argmax(s[::-1]) for s in scores]
    flat = jnp.concatenate(
      [jnp.where(jnp.arange(s.size) == i, jnp.inf, s) for s, i in zip(scores, protected)]
    )
    num_pruned = jnp.minimum(_num_pruned(sparsity, flat.size), flat.size - len(scores))
    keep = _keep_top(flat, num_pruned)
    keep = jnp.split(keep, np.cumsum([s.size for s in scores])[:-1])
  elif distribution == "layerwise":
    keep = [_keep_top(s, _num_pruned(sparsity, s.size)) for s in scores]
  else:
    raise ValueError(
      f"Unknown filter distribution {distribution!r}; expected 'global' or 'layerwise'."
    )
  new = [jnp.broadcast_to(k, p.shape) for k, (_, _, p) in zip(keep, pairs)]
  return _replace_leaves(masks, pairs, new)


def _check_nm(n: int, m: int) -> None:
  if not (isinstance(n, (int, np.integer)) and isinstance(m, (int, np.integer))):
    raise ValueError(f"N:M needs Python integers n and m, got n={n!r}, m={m!r}.")
  if not 0 < n <= m:
    raise ValueError(f"N:M needs 0 < n <= m, got {n}:{m}.")


def nm_masks(params: Params, masks: Masks, n: int, m: int) -> Masks:
  """N:M masks: ``n`` of every ``m`` consecutive weights along the input-channel axis are kept.

  The groups run along axis -2 (the input channels of a Flax conv ``[..., in, out]`` or dense
  ``[in, out]`` kernel), the axis sparse tensor cores compress. The sparsity is ``1 - n/m`` in
  every layer whatever a schedule says. Ties within a group are pruned lower index first, like
  the weight masks'.

  Args:
    params: the weights whose ``|w|`` rank each group.
    masks: a masks tree; only its structure is used.
    n: kept weights per group.
    m: group size.

  Returns:
    A masks tree like ``masks`` with exactly ``n`` kept entries in every group.

  Raises:
    ValueError: if a prunable layer's input channels do not divide by ``m`` (the message names
      it; :func:`nm_compatible` drops such layers from a template), or ``n``/``m`` are invalid.
  """
  _check_nm(n, m)
  pairs = check_masks(masks, params)
  bad = [
    f"{_name(path)} (shape {tuple(p.shape)})"
    for path, _, p in pairs
    if jnp.ndim(p) < 2 or p.shape[-2] % m
  ]
  if bad:
    raise ValueError(
      f"N:M sparsity {n}:{m} needs the input channels (axis -2) of every prunable kernel to "
      f"divide by {m}; these do not: {', '.join(bad)}. Leave them dense (None in the masks "
      "template, e.g. with dcil_jax.granularity.nm_compatible)."
    )
  new = []
  for _, _, p in pairs:
    w = jnp.abs(jnp.moveaxis(p.astype(jnp.float32), -2, -1))  # [..., out, in]
    g = w.reshape(*w.shape[:-1], w.shape[-1] // m, m)  # [..., out, groups, m]
    idx = jnp.arange(m)
    a, b = g[..., :, None], g[..., None, :]  # a: entry i, b: entry j
    # j beats i when larger, or equal with a higher index (so ties prune the lower index).
    beaten_by = jnp.sum((b > a) | ((b == a) & (idx[None, :] > idx[:, None])), axis=-1)
    keep = (beaten_by < n).reshape(w.shape)
    new.append(jnp.moveaxis(keep, -1, -2))
  return _replace_leaves(masks, pairs, new)


def nm_compatible(params: Params, masks: Masks, m: int) -> tuple[Masks, list[str]]:
  """A masks template without the prunable leaves whose input channels do not divide by ``m``.

  The first conv of an image model (3 input channels) is the usual case; the official
  structured code has no N:M mode, so which layers to leave dense is a choice this makes visible.

  Returns:
    ``(template, dropped)``: the template with ``None`` at those leaves, and their names.
  """
  pairs = check_masks(masks, params)
  drop = {path for path, _, p in pairs if jnp.ndim(p) < 2 or p.shape[-2] % m}
  template = jax.tree_util.tree_map_with_path(
    lambda path, x: None if x is None or path in drop else x, masks, is_leaf=_is_none
  )
  return template, [_name(p) for p, _, _ in pairs if p in drop]


def filter_view(masks: Masks) -> Masks:
  """One bit per output filter (``[out]``): ``True`` where any weight of the filter is kept.

  For filter masks this loses nothing; pass the result to :func:`dcil_jax.flip_rate`,
  :mod:`dcil_jax.stability` or :func:`dcil_jax.layer_sparsities` to count filters, not weights.
  """
  return jax.tree.map(lambda x: jnp.any(x.reshape(-1, x.shape[-1]), axis=0), masks)


def is_filter_structured(masks: Masks) -> bool:
  """Whether every mask is constant along each filter (all kept or all pruned); host-side."""
  for x in jax.tree.leaves(masks):
    flat = np.asarray(x).reshape(-1, x.shape[-1])
    if not (flat.all(axis=0) | ~flat.any(axis=0)).all():
      return False
  return True


def filter_sparsity(masks: Masks) -> jax.Array:
  """Fraction of pruned filters (no weight kept) among all filters of all prunable leaves."""
  view = jax.tree.leaves(filter_view(masks))
  if not view:
    raise ValueError("filter_sparsity() needs a masks tree with at least one mask (got none).")
  return sum(jnp.sum(~v) for v in view) / sum(v.size for v in view)


def layers_at_floor(masks: Masks) -> jax.Array:
  """How many prunable leaves keep exactly one filter: the floor of :func:`filter_masks`, where
  the sparse path's width is 1 and the schedule's target may not be met. A number to log next
  to the sparsity (jit-friendly, int32); :func:`layer_filter_counts` says which leaves."""
  view = jax.tree.leaves(filter_view(masks))
  return sum((jnp.sum(v) == 1).astype(jnp.int32) for v in view) + jnp.int32(0)


def layer_filter_counts(masks: Masks) -> dict[str, dict[str, jax.Array]]:
  """Per prunable leaf: ``{"kept": filters kept, "total": filters}``, keyed like
  :func:`dcil_jax.layer_sparsities` (``keystr`` of the path)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(filter_view(masks))
  return {_name(path): {"kept": jnp.sum(v), "total": v.size} for path, v in flat}
