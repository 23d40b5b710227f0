"""Cost-aware filter allocation: prune the channels that compaction removes and that pay most.

Why: a global mean-|w| threshold (``dcil_jax.granularity.filter_masks``, ``distribution=
"global"``) ranks filters of all layers on one scale, so the pruned ones crowd into the layers
with the smallest weights, often the late, wide ones that write a residual stream. There a
pruned filter is removed only if every writer of its stream prunes it too, and a late layer's
channel costs few MACs at its small spatial size: many pruned filters, little speed.

:func:`cost_aware_filter_masks` works on *channel groups* instead of single filters, from the
same trace as :func:`dcil_jax.deploy.compact`:

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
  (``target="macs"``). At most ``max_group_fraction`` of a space's channels go (and never
  all of them).

This is a separate function, not a mode of ``filter_masks``: it needs the model's trace (which
the mask refresh inside the optimizer does not have), so it gives masks once, e.g. for one-shot
pruning before fine-tuning or for deployment studies (``benchmarks/inference.py``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcil_jax.deploy import compaction


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
  goal = fraction * (total_filters if target == "filters" else total_macs)
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
