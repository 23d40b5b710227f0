"""Cost-aware filter allocation: prune the channels that compaction removes and that pay most.

Why: a global mean-|w| threshold (``dcil_jax.granularity.filter_masks``, ``distribution=
"global"``) ranks filters of all layers on one scale, so the pruned ones crowd into the layers
with the smallest weights, often the late, wide ones that write a residual stream. There a
pruned filter is removed only if every writer of its stream prunes it too, and a late layer's
channel costs few MACs at its small spatial size: many pruned filters, little speed.

The allocation works on *channel groups* instead of single filters, from the same trace as
:func:`dcil_jax.deploy.compact`:

- a group is one channel of a channel space: the filter ``k`` of every conv or dense layer that
  writes the space (a block's inner conv alone; for a residual stream the stem or shortcut conv
  and the last conv of every block of the stage), so a pruned group is always removed;
- its *score* is the mean over those writers of the filter's mean ``|w|`` divided by that
  layer's mean (per-layer normalised: every layer's filters on the same scale);
- its *cost* is the MACs per example that removing it saves (its filters' outputs and the
  next layers' inputs), from the traced shapes;
- groups are pruned in order of ``score / (cost / mean cost) ** cost_weight`` until the
  pruned filters reach ``fraction`` of all prunable filters (``target="filters"``, comparable
  with ``filter_masks``' count) or the MACs fall to ``1 - fraction`` of the dense model's
  (``target="macs"``, one-shot only). At most ``max_group_fraction`` of a space's channels go
  (and never all of them).

Two ways to use it:

- **While training** (DCIL, DPF): :func:`group_allocation` traces the model *once*, outside
  ``jit``, and returns a static :class:`GroupAllocation` (which filters form a group, what each
  channel costs); ``dcil_jax.masked_update(..., granularity="filter", allocation=...)`` then
  scores and prunes the groups at every refresh inside the jitted step, with ``jnp`` ops on
  fixed shapes (no trace there: the structure does not change while the weights train).
- **One-shot**: :func:`cost_aware_filter_masks` gives masks once, e.g. for pruning before
  fine-tuning or for deployment studies (``benchmarks/inference.py``); it is the reference the
  training refresh is tested against (same masks on the same params, ``target="filters"``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dcil_jax import rules
from dcil_jax.deploy import compaction

__all__ = [
  "ChannelGroup",
  "GroupAllocation",
  "channel_groups",
  "cost_aware_filter_masks",
  "group_allocation",
]

# Slack when turning ``fraction * filters`` into a count: float32 (inside jit) and float64 (one
# shot) products land on both sides of an integer (0.4 * 100 = 40.000000000000007).
_COUNT_SLACK = 1e-3


def _filters_needed(fraction: float, total: int) -> int:
  """The smallest filter count that reaches ``fraction`` of ``total``."""
  return max(0, math.ceil(fraction * total - _COUNT_SLACK))


def _macs(g: Any, eqn: Any) -> int:
  out = g.avals[eqn.outs[0]][0]
  if eqn.prim.name == "conv_general_dilated":
    return (
      int(np.prod(out))
      * int(np.prod(g.avals[eqn.ins[1]][0]))
      // out[eqn.params["dimension_numbers"].out_spec[1]]
    )
  (lc, _), _ = eqn.params["dimension_numbers"]
  lhs = g.avals[eqn.ins[0]][0]
  return int(np.prod(out)) * int(np.prod([lhs[a] for a in lc]))


def channel_groups(
  model: Any,
  variables: dict[str, Any],
  template: Any,
  input_shape: tuple[int, ...],
  dtype: Any = jnp.float32,
) -> list[dict[str, Any]]:
  """The prunable channel spaces of ``model``: for each, its writers and per-channel numbers.

  Args:
    model, variables, input_shape, dtype: as for :func:`dcil_jax.deploy.compact`.
    template: which params are prunable (``True``; ``None`` or ``False`` elsewhere), e.g.
      ``dcil_jax.masks_like(params, rule)``.

  Returns:
    One dict per space that compaction could shrink: ``writers`` (kernel param paths),
    ``axes`` (each kernel's output-channel axis), ``removable`` (channels no op needs),
    ``score`` (per-layer-normalised mean ``|w|``, averaged over writers) and ``cost`` (MACs per
    example saved by removing each channel).
  """
  return _groups(model, variables, template, input_shape, dtype)[0]


def _groups(model, variables, template, input_shape, dtype):
  """The groups of :func:`channel_groups`, and per conv / dense layer ``(macs, out group, out
  size, in group, in size)`` (group indices or ``None``)."""
  t = compaction._trace(model, variables, None, input_shape, dtype)
  g, an = t.g, t.an
  uf = an.uf
  prunable = {
    "/".join(str(getattr(k, "key", k)) for k in path)
    for path, leaf in jax.tree_util.tree_flatten_with_path(template)[0]
    if leaf is not None and np.all(np.asarray(leaf))
  }
  for w in an.writers:
    w.zero = np.ones_like(w.zero)  # which channels could go if every writer pruned them
  allowed, derived = compaction._allowed(g, an)
  by_root: dict[Any, list] = {}
  for w in an.writers:
    by_root.setdefault(uf.find(w.node), []).append(w)
  cost: dict[Any, np.ndarray] = {}
  layer_axes = []
  for eqn in g.eqns:
    if eqn.prim.name not in ("conv_general_dilated", "dot_general") or eqn.outs[0] not in t.dep:
      continue
    macs = _macs(g, eqn)
    axes = []
    if eqn.prim.name == "conv_general_dilated":
      dn = eqn.params["dimension_numbers"]
      axes = [(eqn.outs[0], dn.out_spec[1]), (eqn.ins[0], dn.lhs_spec[1])]
    else:
      (lc, _), _ = eqn.params["dimension_numbers"]
      axes = [(eqn.outs[0], len(g.avals[eqn.outs[0]][0]) - 1)] + [(eqn.ins[0], a) for a in lc]
    layer_axes.append((macs, [(uf.find(n), g.avals[n[0]][0][n[1]]) for n in axes[:2]]))
    for node in axes:
      r = uf.find(node)
      if r in by_root and r not in derived:
        n = g.avals[node[0]][0][node[1]]
        cost[r] = cost.get(r, np.zeros(n)) + macs / n
  groups = []
  index: dict[Any, int] = {}
  for r, writers in by_root.items():
    if r in derived or not allowed.get(r, np.zeros(1, bool)).any():
      continue
    if any(w.name not in prunable for w in writers):
      continue  # a writer that is not pruned keeps every channel
    scores = []
    for w in writers:
      k = np.moveaxis(np.abs(np.asarray(t.values[w.kernel], np.float64)), w.axis, 0)
      per = k.reshape(k.shape[0], -1).mean(axis=1)
      scores.append(per / max(per.mean(), 1e-12))
    index[r] = len(groups)
    groups.append(
      {
        "writers": [w.name for w in writers],
        "axes": [w.axis for w in writers],
        "removable": allowed[r],
        "score": np.mean(scores, axis=0),
        "cost": cost.get(r, np.zeros(allowed[r].size)),
      }
    )
  layers = [(macs, index.get(o), no, index.get(i), ni) for macs, ((o, no), (i, ni)) in layer_axes]
  return groups, layers


def cost_aware_filter_masks(
  model: Any,
  variables: dict[str, Any],
  template: Any,
  fraction: float,
  input_shape: tuple[int, ...],
  *,
  target: str = "filters",
  cost_weight: float = 1.0,
  max_group_fraction: float = 0.75,
  dtype: Any = jnp.float32,
) -> Any:
  """Filter masks that prune whole channel groups, cheapest score per MAC first.

  Args:
    model, variables, input_shape, dtype: as for :func:`dcil_jax.deploy.compact`.
    template: prunable params (``True``), e.g. ``dcil_jax.masks_like(params, rule)``.
    fraction: with ``target="filters"``, the fraction of prunable filters to prune; with
      ``target="macs"``, the fraction of the conv and dense MACs to save.
    target: ``"filters"`` or ``"macs"``.
    cost_weight: how much the MACs saved count against the score (``0``: groups by score
      alone, per-layer normalised).
    max_group_fraction: at most this fraction of a space's channels is pruned, so that the
      cheapest layers are not emptied for their MACs alone (at least one channel always stays).

  Returns:
    Masks like ``template`` (``None`` where it has none): each pruned filter all ``False``.

  Raises:
    ValueError: a bad ``target`` or ``fraction``, or a target the removable groups cannot reach.
  """
  if target not in ("filters", "macs"):
    raise ValueError(f'target must be "filters" or "macs", got {target!r}.')
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
  groups, layers = _groups(model, variables, template, input_shape, dtype)
  kernels = {
    "/".join(str(getattr(k, "key", k)) for k in path): np.shape(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  }
  total_filters = sum(
    shape[-1]
    for path, shape in kernels.items()
    if any(path in gr["writers"] for gr in groups) or _is_prunable(template, path)
  )
  total_macs = float(sum(layer[0] for layer in layers))
  kept = [gr["score"].size for gr in groups]

  def macs_now() -> float:  # exact for the current kept widths
    width = lambda i, n: n if i is None else kept[i]
    return sum(m * width(o, no) / no * width(i, ni) / ni for m, o, no, i, ni in layers)

  mean_cost = np.mean(np.concatenate([gr["cost"] for gr in groups])) if groups else 1.0
  candidates = []
  for i, gr in enumerate(groups):
    rel = np.maximum(gr["cost"] / max(mean_cost, 1e-12), 1e-12)
    priority = gr["score"] / rel**cost_weight
    for k in np.flatnonzero(gr["removable"]):
      candidates.append((priority[k], i, int(k)))
  candidates.sort()
  pruned = [np.zeros(gr["score"].size, bool) for gr in groups]
  done_filters, saved = 0, 0.0
  goal = _filters_needed(fraction, total_filters) if target == "filters" else fraction * total_macs
  for _, i, k in candidates:
    if (done_filters if target == "filters" else saved) >= goal:
      break
    limit = min(pruned[i].size - 1, int(max_group_fraction * pruned[i].size))
    if pruned[i].sum() + 1 > limit:
      continue  # never empty a space
    pruned[i][k] = True
    kept[i] -= 1
    done_filters += len(groups[i]["writers"])
    if target == "macs":
      saved = total_macs - macs_now()
  reached = done_filters if target == "filters" else saved
  if reached < goal:
    raise ValueError(
      f"Only {reached:.0f} of the {goal:.0f} {target} asked for can be pruned in removable "
      f"channel groups with max_group_fraction={max_group_fraction}; ask for less or raise it."
    )
  out: dict[str, np.ndarray] = {}
  for gr, p in zip(groups, pruned):
    for name, axis in zip(gr["writers"], gr["axes"]):
      shape = kernels[name]
      keep = (~p).reshape([-1 if a == axis else 1 for a in range(len(shape))])
      out[name] = np.broadcast_to(keep, shape).copy()

  def make(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if leaf is None or not np.all(np.asarray(leaf)):
      return None
    return jnp.asarray(out.get(name, np.ones(kernels[name], bool)))

  return jax.tree_util.tree_map_with_path(make, template, is_leaf=lambda x: x is None)


def _is_prunable(template: Any, path: str) -> bool:
  node = template
  for key in path.split("/"):
    if not isinstance(node, dict) or key not in node:
      return False
    node = node[key]
  return node is not None and bool(np.all(np.asarray(node)))


class ChannelGroup(NamedTuple):
  """One prunable channel space (static: from the trace, never from the weights' values).

  Attributes:
    writers: the kernel param paths (``"Conv_0/kernel"``) that write the space.
    axes: each writer's output-channel axis.
    removable: ``[channels]`` bool, the channels compaction could remove.
    cost: ``[channels]`` MACs per example saved by removing each channel.
  """

  writers: tuple[str, ...]
  axes: tuple[int, ...]
  removable: np.ndarray
  cost: np.ndarray


class _Plan(NamedTuple):
  """Flat index arrays over the channels of the groups whose writers are all prunable."""

  groups: tuple[ChannelGroup, ...]
  leaf_of: dict[str, int]  # writer name -> position among the prunable leaves
  space: np.ndarray  # [N] group index of each channel
  removable: np.ndarray  # [N]
  factor: np.ndarray  # [N] 1 / (cost / mean cost) ** cost_weight
  filters: np.ndarray  # [N] filters pruned with the channel (the group's writers)
  limit: np.ndarray  # [N] at most this many channels of the channel's space are pruned
  offset: np.ndarray  # [N] index of the space's first channel
  total_filters: int  # prunable filters (the schedule's unit)
  reachable: int  # filters prunable within the limits


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class GroupAllocation:
  """The channel groups of a model, for ``dcil_jax.masked_update(..., allocation=...)``.

  Static data (no leaves) built once by :func:`group_allocation` from the model's trace; the
  refresh inside ``jit`` only scores the groups from the current weights (:meth:`masks`). The
  groups cover every conv and dense kernel; at refresh time those with a writer the mask
  transform does not prune are left out (such a channel stays), so the rule that says what is
  pruned is still given once, to the mask transform.

  Attributes:
    groups: every channel space compaction could shrink.
    cost_weight: how much the MACs a channel saves count against its score (``0``: score
      alone, per-layer normalised).
    max_group_fraction: at most this fraction of a space's channels is pruned (and never all).
  """

  groups: tuple[ChannelGroup, ...]
  cost_weight: float = 1.0
  max_group_fraction: float = 0.75

  def __post_init__(self):
    if self.cost_weight < 0:
      raise ValueError(f"cost_weight must be >= 0, got {self.cost_weight}.")
    if not 0.0 < self.max_group_fraction <= 1.0:
      raise ValueError(f"max_group_fraction must be in (0, 1], got {self.max_group_fraction}.")

  def describe(self) -> str:
    return (
      f"group_allocation(cost_weight={self.cost_weight}, "
      f"max_group_fraction={self.max_group_fraction}) over {len(self.groups)} channel spaces"
    )

  @functools.lru_cache(maxsize=8)  # noqa: B019 (static, few distinct prunable sets)
  def _plan(self, names: tuple[str, ...], sizes: tuple[int, ...]) -> _Plan:
    leaf_of = {n: i for i, n in enumerate(names)}
    groups = tuple(g for g in self.groups if all(w in leaf_of for w in g.writers))
    if not groups:
      raise ValueError(
        "No channel group has all its writers among the pruned kernels "
        f"({', '.join(names) or 'none'}): the allocation cannot prune anything. Were the "
        "groups traced from this model (dcil_jax.deploy.group_allocation)?"
      )
    costs = np.concatenate([g.cost for g in groups]).astype(np.float64)
    rel = np.maximum(costs / max(costs.mean(), 1e-12), 1e-12)
    space = np.concatenate([np.full(g.cost.size, i) for i, g in enumerate(groups)])
    sizes_g = np.array([g.cost.size for g in groups])
    limit_g = np.minimum(sizes_g - 1, (self.max_group_fraction * sizes_g).astype(int))
    filters_g = np.array([len(g.writers) for g in groups])
    removable = np.concatenate([g.removable for g in groups]).astype(bool)
    reachable = sum(
      int(min(lim, np.sum(g.removable))) * f for g, lim, f in zip(groups, limit_g, filters_g)
    )
    return _Plan(
      groups,
      leaf_of,
      space.astype(np.int32),
      removable,
      (1.0 / rel**self.cost_weight).astype(np.float32),
      filters_g[space].astype(np.int32),
      limit_g[space].astype(np.int32),
      (np.cumsum(sizes_g) - sizes_g)[space].astype(np.int32),
      int(sum(sizes)),
      reachable,
    )

  def reachable_fraction(self, template: Any) -> float:
    """The largest fraction of ``template``'s prunable filters the groups can prune."""
    names, sizes, _ = _prunable_leaves(template)
    plan = self._plan(names, sizes)
    return plan.reachable / max(plan.total_filters, 1)

  def masks(self, params: Any, masks: Any, sparsity: Any, score: str = "l1") -> Any:
    """Filter masks pruning whole groups, lowest priority first, inside ``jit``.

    The jitted form of :func:`cost_aware_filter_masks` (``target="filters"``): the same masks
    on the same params (up to float32 rounding of near-tied priorities).

    Args:
      params: the weights that rank the filters (plain or lifted, like ``masks``).
      masks: a masks tree (``None`` at leaves that are not pruned); only its structure is used.
      sparsity: fraction of prunable filters to prune (may be traced). When the groups cannot
        reach it within ``max_group_fraction`` the count falls short (as ``filter_masks``'
        floor does); :meth:`reachable_fraction` says how far they go.
      score: ``"l1"`` (mean ``|w|``) or ``"l2"`` (mean ``w**2``); always normalised by the
        layer's mean (``"l1_relative"`` / ``"l2_relative"`` mean the same here).

    Returns:
      A masks tree like ``masks``: each pruned filter all ``False``; prunable filters outside
      every group are kept.
    """
    from dcil_jax import masks as masks_lib  # dcil_jax imports the deploy package

    pairs = masks_lib.check_masks(masks, params)
    names, sizes, _ = _prunable_leaves(masks)
    plan = self._plan(names, sizes)
    square = score.startswith("l2")
    per_leaf: dict[int, jax.Array] = {}

    def leaf_scores(i: int, axis: int) -> jax.Array:
      if i not in per_leaf:
        w = pairs[i][2].astype(jnp.float32)
        w = jnp.square(w) if square else jnp.abs(w)
        w = jnp.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        per = jnp.mean(w, axis=1)
        per_leaf[i] = per / jnp.maximum(jnp.mean(per), 1e-12)
      return per_leaf[i]

    group_scores = [
      sum(leaf_scores(plan.leaf_of[w], a) for w, a in zip(g.writers, g.axes)) / len(g.writers)
      for g in plan.groups
    ]
    n = plan.space.size
    priority = jnp.concatenate(group_scores) * jnp.asarray(plan.factor)
    priority = jnp.where(jnp.asarray(plan.removable), priority, jnp.inf)
    index = jnp.arange(n, dtype=jnp.int32)
    # Rank of each channel within its space (spaces are contiguous: sort by space, priority).
    _, _, by_space = jax.lax.sort((jnp.asarray(plan.space), priority, index), num_keys=3)
    rank = jnp.zeros(n, jnp.int32).at[by_space].set(index - jnp.asarray(plan.offset))
    eligible = jnp.asarray(plan.removable) & (rank < jnp.asarray(plan.limit))
    # Greedy over all channels by (priority, index): take eligible ones until enough filters.
    _, order = jax.lax.sort((priority, index), num_keys=2)
    weight = jnp.where(eligible, jnp.asarray(plan.filters), 0)[order]
    before = jnp.cumsum(weight) - weight
    need = jnp.ceil(jnp.asarray(sparsity, jnp.float32) * plan.total_filters - _COUNT_SLACK)
    pruned = jnp.zeros(n, bool).at[order].set((weight > 0) & (before < need))
    keep = jnp.split(~pruned, np.cumsum([g.cost.size for g in plan.groups])[:-1])

    out: dict[int, jax.Array] = {}
    for g, k in zip(plan.groups, keep):
      for w, a in zip(g.writers, g.axes):
        shape = pairs[plan.leaf_of[w]][2].shape
        out[plan.leaf_of[w]] = jnp.broadcast_to(
          k.reshape([-1 if d == a else 1 for d in range(len(shape))]), shape
        )
    new = [out.get(i, jnp.ones(p.shape, bool)) for i, (_, _, p) in enumerate(pairs)]
    by_path = {path: m for (path, _, _), m in zip(pairs, new)}
    return jax.tree_util.tree_map_with_path(
      lambda path, m: None if m is None else by_path[path], masks, is_leaf=lambda x: x is None
    )


def _prunable_leaves(masks: Any) -> tuple[tuple[str, ...], tuple[int, ...], bool]:
  """Plain names (``"Conv_0/kernel"``, without a lifted tree's ``"prunable"`` key) and filter
  counts of the prunable leaves of a masks tree, and whether it is lifted."""
  from dcil_jax import paths

  lifted = paths.is_lifted(masks)
  names, sizes = [], []
  for path, leaf in jax.tree_util.tree_flatten_with_path(masks, is_leaf=lambda x: x is None)[0]:
    if leaf is None or not hasattr(leaf, "shape"):
      continue
    parts = rules.key_names(path)
    names.append("/".join(parts[1:] if lifted else parts))
    sizes.append(int(leaf.shape[-1]))
  return tuple(names), tuple(sizes), lifted


def group_allocation(
  model: Any,
  variables: dict[str, Any],
  input_shape: tuple[int, ...],
  *,
  cost_weight: float = 1.0,
  max_group_fraction: float = 0.75,
  dtype: Any = jnp.float32,
) -> GroupAllocation:
  """Traces ``model`` once and returns its channel groups, to train with cost-aware masks.

  ``dcil_jax.masked_update(schedule, granularity="filter", allocation=group_allocation(...))``
  then prunes whole groups at each refresh: the lowest ``score / (cost / mean cost) **
  cost_weight`` first (see the module docstring), so every pruned filter is one compaction
  removes. The structure is fixed by the model's shapes, so tracing at init is enough.

  Args:
    model, variables, input_shape, dtype: as for :func:`dcil_jax.deploy.compact` (plain
      variables; their values do not matter).
    cost_weight: how much the MACs a channel saves count (``0``: per-layer-normalised score
      alone; ``1``: score per relative MAC).
    max_group_fraction: at most this fraction of a space's channels is pruned (and never all).

  Returns:
    A static :class:`GroupAllocation`.
  """
  everything = jax.tree.map(lambda _: True, variables["params"])
  groups, _ = _groups(model, variables, everything, input_shape, dtype)
  return GroupAllocation(
    tuple(
      ChannelGroup(
        tuple(g["writers"]),
        tuple(int(a) for a in g["axes"]),
        np.asarray(g["removable"], bool),
        np.asarray(g["cost"], np.float64),
      )
      for g in groups
    ),
    float(cost_weight),
    float(max_group_fraction),
  )
