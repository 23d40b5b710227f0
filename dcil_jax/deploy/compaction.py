"""Turn a filter-pruned model into a physically smaller program, from a trace of its forward pass.

A filter mask zeroes whole output filters, but the masked model still computes them: same
shapes, same FLOPs, same speed. :func:`compact` removes them for any JAX model (Flax Linen, a
plain function of ``(variables, x)``), with no per-family code: it traces the eval-mode forward
pass of one example (:mod:`dcil_jax.deploy.graph`), finds which channels are coupled, removes
those it can, and folds the constants they still carried. The result is a program of the same
primitives with smaller shapes (:class:`Compacted`), which :mod:`dcil_jax.deploy.files` writes
as StableHLO or ONNX.

How it works, on the flat list of primitives:

- **Constants fold.** Every equation that does not depend on the input (BatchNorm's
  ``scale * rsqrt(var + epsilon)``, with the model's own epsilon; dtype casts of kernels) is
  evaluated once; the compact program keeps only input-dependent equations, reading constants.
- **Channel spaces.** Every axis of every array belongs to a *channel space* (union-find):
  elementwise ops, broadcasts of constants, transposes, reshapes that keep an axis, pooling over
  other axes and the contracted axes of a conv or dot join the axes they connect; a depthwise
  conv joins its input and output channels. Removing channel ``k`` of a space removes index
  ``k`` from every array and constant of the space.
- **Which channels can go.** A conv or dense layer whose filter ``k`` is all zero *writes*
  channel ``k`` as zero, whatever the input; everything elementwise after it is then an
  input-independent constant. A channel is removed when every writer of its space zeroes it (a
  residual stream is written by the stem or shortcut conv and by the last conv of each block: it
  goes only if all of them pruned it). An axis that the input reaches in another way (the input
  itself, spatial and batch axes, a broadcast of an input-dependent value such as LayerNorm's
  mean, a max over channels, the model's output) cannot lose channels; nor can a space a
  primitive does not map (a split reshape, a grouped conv that is not depthwise).
- **Flatten and concatenation.** A reshape that merges axes (a flatten before a Dense layer)
  or a concatenation makes a *derived* space: its entries go when the channel they came from
  goes, and a channel goes only if every entry it feeds may.
- **Folding.** Where a conv, a dot or a sum contracts over removed channels, their (constant)
  contribution is computed once, exactly, at the traced spatial size, and added after the
  equation: a padded conv's contribution is smaller at the border, so it is kept as a map.

An input-dependent primitive the analysis does not know raises a ``ValueError`` that names it.
The compact program is specialised to the traced example shape, at any batch size: a second
trace at another batch size marks which axes hold the batch, and the program puts the actual
batch size there (where the two traces differ it is ``vmap``-ed over examples instead, as eval
mode treats each example alone).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from dcil_jax import paths
from dcil_jax.deploy import graph as graph_lib

Node = tuple[int, int]  # (variable id, axis)

ELEMENTWISE = frozenset(
  """abs acos acosh add add_any and asin asinh atan atan2 atanh cbrt ceil clamp convert_element_type
  copy copy_p cos cosh div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow is_finite
  le log log1p logistic lt max min mul ne neg nextafter not or pow real reduce_precision rem round
  rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan tanh xor""".split()
)
KNOWN = ELEMENTWISE | {
  "broadcast_in_dim",
  "reshape",
  "transpose",
  "squeeze",
  "expand_dims",
  "reduce_sum",
  "reduce_max",
  "reduce_min",
  "reduce_prod",
  "reduce_and",
  "reduce_or",
  "argmax",
  "argmin",
  "reduce_window_sum",
  "reduce_window_max",
  "reduce_window_min",
  "conv_general_dilated",
  "dot_general",
  "concatenate",
  "pad",
  "slice",
}


@dataclasses.dataclass
class CompactModel:
  """The compact program: ``apply(variables, x)`` runs a batch ``x`` (any batch size).

  Attributes:
    graph: the flat program of one example (batch 1), input-dependent equations only.
    input_shape: one example's shape.
    out_tree: the tree structure of the model's result.
    names: ``constant id -> param path`` for the constants that are (sliced) params.
  """

  graph: graph_lib.Graph
  input_shape: tuple[int, ...]
  out_tree: Any
  names: dict[int, str] = dataclasses.field(default_factory=dict)

  def apply(self, variables: dict[str, Any], x: jax.Array) -> Any:
    """The model's eval-mode result for ``x`` of shape ``[batch, *input_shape]``."""
    consts = variables["constants"]
    g = self.graph

    def one(xi: jax.Array) -> list[jax.Array]:
      env: dict[int, Any] = {int(k): v for k, v in consts.items()}
      env[g.inputs[0]] = xi[None]
      for eqn in g.eqns:
        for o, v in zip(eqn.outs, graph_lib.bind(eqn, [env[i] for i in eqn.ins])):
          env[o] = v
      return [env[o][0] for o in g.outputs]

    if tuple(x.shape[1:]) == tuple(self.input_shape) and all(e.batch is not None for e in g.eqns):
      return jax.tree.unflatten(self.out_tree, self._batched(consts, x))
    if tuple(x.shape[1:]) != tuple(self.input_shape):
      raise ValueError(
        f"This compact model was traced for examples of shape {self.input_shape}, got a batch of "
        f"shape {tuple(x.shape)}. Compact again with input_shape={tuple(x.shape[1:])}."
      )
    return jax.tree.unflatten(self.out_tree, jax.vmap(one)(x))

  def _batched(self, consts: dict[str, Any], x: jax.Array) -> list[jax.Array]:
    """The program at batch ``len(x)``: the batch size put into shape parameters directly
    (no ``vmap``: its reshapes around every op would reach the exported graphs)."""
    g, b = self.graph, x.shape[0]
    env: dict[int, Any] = {int(k): v for k, v in consts.items()}
    env[g.inputs[0]] = x
    for eqn in g.eqns:
      params = eqn.params
      key = {"broadcast_in_dim": "shape", "reshape": "new_sizes", "slice": "limit_indices"}.get(
        eqn.prim.name
      )
      if key is not None and eqn.batch:
        size = list(params[key])
        for a, k in eqn.batch.items():
          size[a] = b * k
        params = dict(params, **{key: tuple(size)})
      args = [env[i] for i in eqn.ins]
      for o, v in zip(eqn.outs, graph_lib.bind(graph_lib.Eqn(eqn.prim, params, [], []), args)):
        env[o] = v
    return [env[o] for o in g.outputs]


@dataclasses.dataclass
class Compacted:
  """A compact model: ``module.apply(variables, x)`` runs it; ``report`` says what was removed.

  Attributes:
    module: a :class:`CompactModel`.
    variables: ``{"constants": {id: array}}``: every constant the program reads (sliced
      kernels, folded BatchNorm terms, folded contributions of removed channels).
    report: ``{"filters", "pruned", "removed", "layers": [...], "params", "compact_params",
      "folded_constants"}`` (parameter counts: the model's; the compact program's constants
      less the folded contributions of removed channels, which are counted alone);
      each layer entry has the kernel's ``name``, ``filters``, ``pruned``, ``removed``, ``kept``
      and ``not_removed``: a list of ``{"channels": [...], "reason": ...}`` for pruned filters
      that stayed.
  """

  module: CompactModel
  variables: dict[str, Any]
  report: dict[str, Any]

  def apply(self, x: jax.Array) -> Any:
    """``module.apply(variables, x)``."""
    return self.module.apply(self.variables, x)


class _UnionFind:
  def __init__(self):
    self.parent: dict[Node, Node] = {}

  def find(self, n: Node) -> Node:
    self.parent.setdefault(n, n)
    while self.parent[n] != n:
      self.parent[n] = self.parent[self.parent[n]]
      n = self.parent[n]
    return n

  def union(self, a: Node, b: Node) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra != rb:
      self.parent[ra] = rb


@dataclasses.dataclass
class _Writer:
  node: Node  # the output channel axis
  zero: np.ndarray  # which output channels the (constant) kernel writes as zero
  name: str | None  # the kernel's param path
  eqn: int
  kernel: int  # the kernel's variable id
  axis: int  # the kernel's output-channel axis


@dataclasses.dataclass
class _Analysis:
  uf: _UnionFind = dataclasses.field(default_factory=_UnionFind)
  fixed: set[Node] = dataclasses.field(default_factory=set)
  writers: list[_Writer] = dataclasses.field(default_factory=list)
  derived: list[tuple[Node, str, list[Node], list[int]]] = dataclasses.field(default_factory=list)
  folds: dict[int, list[tuple[int, tuple[int, ...]]]] = dataclasses.field(default_factory=dict)


def _reshape_groups(
  a: tuple[int, ...], b: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
  """Splits a reshape ``a -> b`` into groups of axes with equal products (row-major)."""
  groups, i, j = [], 0, 0
  while i < len(a) or j < len(b):
    gi, gj, pa, pb = [], [], 1, 1
    if i < len(a):
      gi.append(i)
      pa *= a[i]
      i += 1
    if j < len(b):
      gj.append(j)
      pb *= b[j]
      j += 1
    while pa != pb:
      if pa < pb and i < len(a):
        gi.append(i)
        pa *= a[i]
        i += 1
      elif pb < pa and j < len(b):
        gj.append(j)
        pb *= b[j]
        j += 1
      else:
        return None
    groups.append((gi, gj))
  return groups


def _analyse(
  g: graph_lib.Graph, dep: set[int], values: dict[int, Any], names: dict[int, str]
) -> _Analysis:
  """Channel spaces, writers, derived spaces and folds of the input-dependent equations."""
  an = _Analysis()
  uf, fixed = an.uf, an.fixed
  shape = lambda v: g.avals[v][0]

  def fix_all(v: int) -> None:
    for a in range(len(shape(v))):
      fixed.add((v, a))

  for v in g.inputs:
    if v in dep:
      fix_all(v)
  for idx, eqn in enumerate(g.eqns):
    if not any(i in dep for i in eqn.outs):
      continue
    name, p = eqn.prim.name, eqn.params
    ins, out = eqn.ins, eqn.outs[0]
    handled: set[Node] = set()  # operand axes this rule maps; the rest are fixed
    touched: set[Node] = set()  # output axes this rule maps; the rest are fixed

    def join(a: Node, b: Node, out: int = out, handled=handled, touched=touched) -> None:
      uf.union(a, b)
      (handled if a[0] != out or b[0] == out else touched).add(a)
      (touched if b[0] == out else handled).add(b)

    if name not in KNOWN:
      raise ValueError(
        f"compact() does not understand the primitive {name!r} on the input's path (equation "
        f"{idx}: {eqn.prim}); it knows {sorted(KNOWN)}. Nothing was compacted."
      )
    rank = len(shape(out))
    if name in ELEMENTWISE:
      for a in range(rank):
        for v in ins:
          if len(shape(v)) == 0:
            continue
          if shape(v)[a] == shape(out)[a]:
            join((v, a), (out, a))
          elif v in dep and shape(out)[a] > 1:
            fixed.add((out, a))  # an input-dependent value broadcast along this axis
            handled.add((v, a))
          else:
            handled.add((v, a))
        touched.add((out, a))
    elif name == "broadcast_in_dim":
      (v,) = ins[:1]
      for j, d in enumerate(p["broadcast_dimensions"]):
        if shape(v)[j] == shape(out)[d]:
          join((v, j), (out, d))
        else:
          handled.add((v, j))
      if v not in dep:
        touched.update((out, a) for a in range(rank))
    elif name in ("reshape",):
      v = ins[0]
      groups = _reshape_groups(shape(v), shape(out)) if p.get("dimensions") is None else None
      for gi, go in groups or []:
        gi1 = [i for i in gi if shape(v)[i] != 1]
        go1 = [o for o in go if shape(out)[o] != 1]
        if len(gi1) == 1 and len(go1) == 1:
          join((v, gi1[0]), (out, go1[0]))
        elif len(gi1) > 1 and len(go1) == 1:
          an.derived.append(
            ((out, go1[0]), "merge", [(v, i) for i in gi1], [shape(v)[i] for i in gi1])
          )
          handled.update((v, i) for i in gi1)
          touched.add((out, go1[0]))
        handled.update((v, i) for i in gi if shape(v)[i] == 1)
        touched.update((out, o) for o in go if shape(out)[o] == 1)
    elif name == "transpose":
      for a, src in enumerate(p["permutation"]):
        join((ins[0], src), (out, a))
    elif name in ("squeeze", "expand_dims"):
      v = ins[0]
      kept = [a for a in range(len(shape(v))) if a not in set(p["dimensions"])]
      if name == "squeeze":
        for a, src in enumerate(kept):
          join((v, src), (out, a))
        handled.update((v, a) for a in p["dimensions"])
    elif name in (
      "reduce_sum",
      "reduce_max",
      "reduce_min",
      "reduce_prod",
      "reduce_and",
      "reduce_or",
      "argmax",
      "argmin",
    ):
      v, axes = ins[0], tuple(p["axes"])
      rest = [a for a in range(len(shape(v))) if a not in axes]
      for a, src in enumerate(rest):
        join((v, src), (out, a))
      if name == "reduce_sum":
        handled.update((v, a) for a in axes)
        an.folds[idx] = [(0, axes)]
    elif name.startswith("reduce_window"):
      v = ins[0]
      for a in range(rank):
        plain = (
          p["window_dimensions"][a] == 1
          and p["window_strides"][a] == 1
          and tuple(p["padding"][a]) == (0, 0)
          and p["base_dilation"][a] == 1
          and p["window_dilation"][a] == 1
        )
        if plain:
          join((v, a), (out, a))
    elif name == "conv_general_dilated":
      lhs, rhs = ins
      dn = p["dimension_numbers"]
      groups = p["feature_group_count"]
      if p["batch_group_count"] == 1 and rhs not in dep and lhs in dep:
        join((lhs, dn.lhs_spec[0]), (out, dn.out_spec[0]))
        cin, cout = shape(lhs)[dn.lhs_spec[1]], shape(out)[dn.out_spec[1]]
        if groups == 1:
          join((lhs, dn.lhs_spec[1]), (rhs, dn.rhs_spec[1]))
          join((rhs, dn.rhs_spec[0]), (out, dn.out_spec[1]))
          an.folds[idx] = [(0, (dn.lhs_spec[1],))]
          kernel = np.moveaxis(np.asarray(values[rhs]), dn.rhs_spec[0], 0)
          zero = ~kernel.reshape(kernel.shape[0], -1).any(axis=1)
          an.writers.append(
            _Writer((out, dn.out_spec[1]), zero, names.get(rhs), idx, rhs, dn.rhs_spec[0])
          )
        elif groups == cin == cout and shape(rhs)[dn.rhs_spec[1]] == 1:  # depthwise
          join((lhs, dn.lhs_spec[1]), (out, dn.out_spec[1]))
          join((rhs, dn.rhs_spec[0]), (out, dn.out_spec[1]))
    elif name == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      lhs, rhs = ins
      for a, b in zip(lc, rc):
        join((lhs, a), (rhs, b))
      an.folds[idx] = [(0, tuple(lc))]
      k = 0
      for a, b in zip(lb, rb):
        join((lhs, a), (out, k))
        join((rhs, b), (out, k))
        k += 1
      lfree = [a for a in range(len(shape(lhs))) if a not in lc and a not in lb]
      rfree = [a for a in range(len(shape(rhs))) if a not in rc and a not in rb]
      for side, frees, other in ((lhs, lfree, rhs), (rhs, rfree, lhs)):
        for a in frees:
          if other not in dep:
            join((side, a), (out, k))
            if side not in dep:  # a constant kernel writes this axis
              kernel = np.moveaxis(np.asarray(values[side]), a, 0)
              zero = ~kernel.reshape(kernel.shape[0], -1).any(axis=1)
              an.writers.append(_Writer((out, k), zero, names.get(side), idx, side, a))
          k += 1
    elif name == "concatenate":
      d = p["dimension"]
      for a in range(rank):
        if a != d:
          for v in ins:
            join((v, a), (out, a))
      an.derived.append(((out, d), "concat", [(v, d) for v in ins], [shape(v)[d] for v in ins]))
      handled.update((v, d) for v in ins)
      touched.add((out, d))
    elif name == "pad":
      for a, cfg in enumerate(p["padding_config"]):
        if tuple(cfg) == (0, 0, 0):
          join((ins[0], a), (out, a))
    elif name == "slice":
      v = ins[0]
      strides = p["strides"] or (1,) * rank
      for a in range(rank):
        if p["start_indices"][a] == 0 and p["limit_indices"][a] == shape(v)[a] and strides[a] == 1:
          join((v, a), (out, a))
    for v in ins:
      for a in range(len(shape(v))):
        if (v, a) not in handled:
          fixed.add((v, a))
    for o in eqn.outs:
      for a in range(len(shape(o))):
        if (o, a) not in touched and o in dep:
          fixed.add((o, a))
  for v in g.outputs:
    fix_all(v)
  return an


def _allowed(g: graph_lib.Graph, an: _Analysis) -> tuple[dict, dict]:
  """``root -> channels that may go`` (every writer zeroes them, no op needs them), and the
  derived spaces by root."""
  uf = an.uf
  size = lambda n: g.avals[n[0]][0][n[1]]
  derived_roots: dict[Node, list] = {}
  for d in an.derived:
    derived_roots.setdefault(uf.find(d[0]), []).append(d)
  allowed: dict[Node, np.ndarray] = {}
  for w in an.writers:
    r = uf.find(w.node)
    allowed[r] = allowed.get(r, np.ones(size(w.node), bool)) & w.zero
  for r, ds in derived_roots.items():
    if r not in allowed:
      allowed[r] = np.full(size(ds[0][0]), len(ds) == 1)
  for n in an.fixed:
    r = uf.find(n)
    allowed[r] = np.zeros(size(n), bool)
  get = lambda n: allowed.get(uf.find(n), np.zeros(size(n), bool))
  changed = True
  while changed:
    changed = False
    for node, kind, parts, sizes in an.derived:
      have = get(node)
      if kind == "merge":
        grid = have.reshape(sizes)
        cons = [
          grid.all(axis=tuple(j for j in range(len(sizes)) if j != i)) for i in range(len(parts))
        ]
      else:
        cons = np.split(have, np.cumsum(sizes)[:-1])
      for part, c in zip(parts, cons):
        r = uf.find(part)
        new = get(part) & c
        if not np.array_equal(new, get(part)):
          allowed[r] = new
          changed = True
  return allowed, derived_roots


def _removed_masks(g: graph_lib.Graph, an: _Analysis, align: int) -> tuple[dict, dict, dict]:
  """``root -> removed channels`` for every space, and why some removable ones were kept."""
  uf = an.uf
  allowed, derived_roots = _allowed(g, an)
  removed: dict[Node, np.ndarray] = {}
  extra: dict[Node, dict[int, str]] = {}
  for r, mask in allowed.items():
    if r in derived_roots:
      continue
    kept = int(mask.size - mask.sum())
    want = min(mask.size, -(-max(kept, 1) // align) * align)
    mask = mask.copy()
    if want > kept:
      add = np.flatnonzero(mask)[: want - kept]
      mask[add] = False
      extra[r] = {
        int(k): (
          "every channel of this layer is pruned; one is kept so the layer is not empty"
          if kept == 0 and i == 0
          else f"kept so that the width is a multiple of {align}"
        )
        for i, k in enumerate(add)
      }
    removed[r] = mask
  for node, kind, parts, sizes in an.derived:  # in creation order: parts come first
    r = uf.find(node)
    pm = [removed.get(uf.find(q), np.zeros(s, bool)) for q, s in zip(parts, sizes)]
    if kind == "merge":
      grid = np.zeros(sizes, bool)
      for i, m in enumerate(pm):
        grid |= m.reshape([-1 if j == i else 1 for j in range(len(sizes))])
      removed[r] = grid.reshape(-1)
    else:
      removed[r] = np.concatenate(pm)
  return removed, extra, derived_roots


def plain_masks(masks: Any, params: Any) -> Any:
  """The masks of the deployable (sparse) path as a tree over the plain ``params``.

  Accepts what the library hands out: ``state.trained_masks`` / ``get_trained_masks`` (a lifted
  tree, its sparse path is taken, like :func:`dcil_jax.export_variables`), or a masks tree over
  the plain params (``None`` at unpruned leaves).

  Raises:
    ValueError: if a mask has no parameter of its path and shape (naming it and what to pass).
  """
  if masks is None:
    return None
  if paths.is_lifted(masks):
    masks = paths.path_params(masks, "sparse")
  keystr = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
  flat_params = {keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  for key, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    where = keystr(key)
    if where not in flat_params:
      raise ValueError(
        f"The masks have a leaf at {where} that the params do not have. Pass masks over the "
        "plain model's params: state.trained_masks (as it is), "
        "dcil_jax.get_trained_masks(opt_state), or a tree like variables['params'] with None at "
        "unpruned leaves."
      )
    if np.shape(m) != np.shape(flat_params[where]):
      raise ValueError(
        f"The mask at {where} has shape {np.shape(m)}, its parameter "
        f"{np.shape(flat_params[where])}."
      )
  return masks


def _param_names(params: Any) -> list[str]:
  return [
    "/".join(str(getattr(k, "key", k)) for k in path)
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]
  ]


def as_function(model: Any) -> Callable[[Any, jax.Array], Any]:
  """``fn(variables, x)`` in eval mode: for a Flax Linen module, a model adapter of
  :func:`dcil_jax.as_model` or :func:`dcil_jax.from_nnx` (NNX), or ``model`` if a function."""
  if isinstance(model, nn.Module):
    return lambda variables, x: model.apply(variables, x)
  if hasattr(model, "apply_eval"):  # dcil_jax.as_model / from_nnx adapters (Linen or NNX)
    return model.apply_eval
  if callable(model):
    return model
  raise TypeError(f"Expected a Flax Linen module or a function (variables, x); got {type(model)}.")


@dataclasses.dataclass
class _Traced:
  g: graph_lib.Graph
  dep: set[int]
  values: dict[int, Any]
  names: dict[int, str]
  mask_of: dict[int, Any]
  an: _Analysis
  out_tree: Any


def _trace(model, variables, masks, input_shape, dtype) -> _Traced:
  """The masked model's flat graph of one example, its constants' values and its channel
  analysis."""
  fn = as_function(model)
  params = variables["params"]
  masks = plain_masks(masks, params)
  mask_leaves = jax.tree.leaves(
    jax.tree.map(lambda p, m: m, params, masks, is_leaf=lambda m: m is None)
    if masks is not None
    else jax.tree.map(lambda p: None, params),
    is_leaf=lambda m: m is None,
  )
  masked_params = (
    params
    if masks is None
    else jax.tree.map(
      lambda p, m: p if m is None else np.asarray(p) * np.asarray(m, np.asarray(p).dtype),
      params,
      masks,
      is_leaf=lambda m: m is None,
    )
  )
  run_vars = dict(variables, params=masked_params)
  x = jax.ShapeDtypeStruct((1, *input_shape), dtype)
  g, out_tree = graph_lib.trace(fn, run_vars, x)
  x_id = g.inputs[-1]
  dep = graph_lib.depends(g, {x_id})

  # Names of the params (and of constants cast or reshaped from one), and their masks.
  leaves = jax.tree.leaves(run_vars)
  names: dict[int, str] = {}
  mask_of: dict[int, Any] = {}
  param_ids = g.inputs[: len(leaves)]
  n_before = len(jax.tree.leaves({k: v for k, v in run_vars.items() if k < "params"}))
  for i, name in enumerate(_param_names(params)):
    names[param_ids[n_before + i]] = name
    mask_of[param_ids[n_before + i]] = mask_leaves[i]
  for eqn in g.eqns:
    srcs = [i for i in eqn.ins if i not in g.consts or g.avals[i][0]]
    if eqn.prim.name in ("convert_element_type", "reshape", "copy") and len(srcs) == 1:
      if srcs[0] in names:
        names[eqn.outs[0]] = names[srcs[0]]

  values = graph_lib.run(g, [np.asarray(v) for v in leaves] + [np.zeros(x.shape, dtype)])
  an = _analyse(g, dep, values, names)

  return _Traced(g, dep, values, names, mask_of, an, out_tree)


def compact(
  model: Any,
  variables: dict[str, Any],
  masks: Any,
  input_shape: tuple[int, ...],
  align: int = 1,
  dtype: Any = jnp.float32,
  remove: bool = True,
) -> Compacted:
  """A physically smaller program whose eval-mode result equals the filter-masked model's.

  Args:
    model: a Flax Linen module (run as ``model.apply(variables, x)``), the model of
      ``dcil_jax.from_nnx(nnx_module)`` (with its variables), or a function
      ``fn(variables, x)``; any architecture made of the primitives listed in ``KNOWN``.
    variables: its variables, e.g. ``{"params": ..., "batch_stats": ...}`` from
      :func:`dcil_jax.export_variables` (pruned filters zeroed or not: the mask decides).
    masks: filter masks over ``variables["params"]`` (``None`` at unpruned leaves), e.g.
      :func:`dcil_jax.granularity.filter_masks`, or ``state.trained_masks`` (its sparse path).
      A masked conv or dense kernel must be all-kept or all-pruned along each output filter.
    input_shape: one example's shape, e.g. ``(32, 32, 3)``; the compact program is specialised
      to it (any batch size).
    align: keep some removable channels so that every width is a multiple of ``align`` (or the
      full width): CPU and accelerator kernels often run faster on such widths.
    dtype: the input's dtype.
    remove: ``False`` keeps every channel (constants are still folded): the masked model as a
      program of input-dependent equations, e.g. to export it next to the compact one.

  Returns:
    A :class:`Compacted` (program, constants, report).

  Raises:
    ValueError: an input-dependent primitive the analysis does not know (named), masks that do
      not fit the params, or masks that are not filter masks (the layer is named).
  """
  if not isinstance(align, int) or align < 1:
    raise ValueError(f"align must be a positive integer, got {align!r}.")
  t = _trace(model, variables, masks, input_shape, dtype)
  g, dep, values, names, mask_of, an, out_tree = (
    t.g,
    t.dep,
    t.values,
    t.names,
    t.mask_of,
    t.an,
    t.out_tree,
  )
  params = variables["params"]
  x_id = g.inputs[-1]

  for w in an.writers:  # masked kernels must be filter masks
    kernel_id = g.eqns[w.eqn].ins[1] if g.eqns[w.eqn].prim.name == "conv_general_dilated" else None
    mask = mask_of.get(kernel_id) if kernel_id is not None else None
    if mask is not None:
      dn = g.eqns[w.eqn].params["dimension_numbers"]
      m = np.moveaxis(np.asarray(mask, bool), dn.rhs_spec[0], 0).reshape(
        mask.shape[dn.rhs_spec[0]], -1
      )
      if not (m.all(axis=1) | ~m.any(axis=1)).all():
        raise ValueError(
          f"The mask of {w.name} is not a filter mask (a filter is partly pruned); compact() "
          "removes whole filters only (dcil_jax.granularity.filter_masks)."
        )

  removed, extra, _ = _removed_masks(g, an, align)
  if not remove:
    removed = {r: np.zeros_like(m) for r, m in removed.items()}
    extra = {}
  uf = an.uf

  def keep(v: int, a: int) -> np.ndarray | None:
    r = removed.get(uf.find((v, a)))
    if r is None or not r.any():
      return None
    return np.flatnonzero(~r)

  def new_shape(v: int) -> tuple[int, ...]:
    return tuple(
      len(k) if (k := keep(v, a)) is not None else s for a, s in enumerate(g.avals[v][0])
    )

  def sliced(v: int, value: Any) -> np.ndarray:
    value = np.asarray(value)
    for a in range(value.ndim):
      k = keep(v, a)
      if k is not None:
        value = np.take(value, k, axis=a)
    return value

  # The compact program: input-dependent equations with sliced constants, new shapes, folds.
  out = graph_lib.Graph([], {}, [x_id], list(g.outputs), {})
  for v in dep:
    out.avals[v] = (new_shape(v), g.avals[v][1])

  def const_for(v: int) -> int:
    if v not in out.avals:
      out.avals[v] = (new_shape(v), g.avals[v][1])
      out.consts[v] = sliced(v, values[v])
    return v

  next_id = [max(g.avals) + 1]

  def fresh(shape: tuple[int, ...], dt: Any) -> int:
    vid = next_id[0]
    next_id[0] += 1
    out.avals[vid] = (tuple(shape), np.dtype(dt))
    return vid

  fold_ids: set[int] = set()
  origin: dict[int, int] = {}
  for idx, eqn in enumerate(g.eqns):
    if not any(o in dep for o in eqn.outs):
      continue
    ins = [i if i in dep else const_for(i) for i in eqn.ins]
    eparams = dict(eqn.params)
    name = eqn.prim.name
    o = eqn.outs[0]
    if name == "broadcast_in_dim":
      eparams["shape"] = new_shape(o)
    elif name == "reshape":
      eparams["new_sizes"] = new_shape(o)
    elif name == "slice":
      eparams["limit_indices"] = tuple(
        new_shape(o)[a] if keep(o, a) is not None else lim
        for a, lim in enumerate(eparams["limit_indices"])
      )
    elif name == "conv_general_dilated" and eparams["feature_group_count"] > 1:
      dn = eparams["dimension_numbers"]
      if eparams["feature_group_count"] == g.avals[eqn.ins[0]][0][dn.lhs_spec[1]]:  # depthwise
        eparams["feature_group_count"] = new_shape(eqn.ins[0])[dn.lhs_spec[1]]
    fold = None
    for operand, axes in an.folds.get(idx, []):
      v = eqn.ins[operand]
      kept = np.ones([g.avals[v][0][a] for a in axes], bool)
      for j, a in enumerate(axes):
        k = keep(v, a)
        if k is not None:
          m = np.zeros(g.avals[v][0][a], bool)
          m[k] = True
          kept &= m.reshape([-1 if jj == j else 1 for jj in range(len(axes))])
      if kept.all():
        continue
      full = np.ones(g.avals[v][0], bool)
      ndim = len(g.avals[v][0])
      expand = np.moveaxis(
        kept.reshape(kept.shape + (1,) * (ndim - len(axes))), list(range(len(axes))), list(axes)
      )
      zeroed = np.where(full & ~expand, np.asarray(values[v]), 0).astype(g.avals[v][1])
      args = [values[i] for i in eqn.ins]
      args[operand] = zeroed
      contrib = sliced(o, graph_lib.bind(eqn, args)[0])
      for a in range(contrib.ndim):  # store only the axes it varies along
        if contrib.shape[a] > 1 and np.all(contrib == contrib.take([0], axis=a)):
          contrib = contrib.take([0], axis=a)
      fold = contrib if fold is None else fold + contrib
    new_eqn = graph_lib.Eqn(eqn.prim, eparams, ins, list(eqn.outs))
    origin[id(new_eqn)] = idx
    out.eqns.append(new_eqn)
    if fold is not None and np.any(fold):
      tmp = fresh(new_shape(o), g.avals[o][1])
      new_eqn.outs = [tmp]
      c = fresh(fold.shape, g.avals[o][1])
      out.consts[c] = fold.astype(g.avals[o][1])
      fold_ids.add(c)
      out.eqns.append(graph_lib.Eqn(lax.add_p, {}, [tmp, c], [o], batch={}))
  for v in g.outputs:
    if v not in dep:
      const_for(v)
  _mark_batch_axes(model, variables, masks, input_shape, dtype, g, dep, out, origin)

  report = _report(g, an, removed, extra, names, mask_of)
  report["params"] = int(sum(np.size(v) for v in jax.tree.leaves(params)))
  sizes = {k: int(np.size(c)) for k, c in out.consts.items() if np.size(c) > 1}
  report["compact_params"] = sum(n for k, n in sizes.items() if k not in fold_ids)
  report["folded_constants"] = sum(n for k, n in sizes.items() if k in fold_ids)
  consts = {str(k): jnp.asarray(v) for k, v in out.consts.items()}
  module = CompactModel(
    out, tuple(input_shape), out_tree, {k: names[k] for k in out.consts if k in names}
  )
  return Compacted(module, {"constants": consts}, report)


BATCH_SENTINEL = 7919  # a batch size no layer width is a multiple of


def _mark_batch_axes(model, variables, masks, input_shape, dtype, g, dep, out, origin) -> None:
  """Which output axes of each compact equation hold the batch: the model traced again at a
  sentinel batch size, its input-dependent equations paired with these in order. Where the two
  traces differ, nothing is marked and ``apply`` falls back to ``vmap``."""
  fn = as_function(model)
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), variables)
  g2, _ = graph_lib.trace(fn, shapes, jax.ShapeDtypeStruct((BATCH_SENTINEL, *input_shape), dtype))
  dep2 = graph_lib.depends(g2, {g2.inputs[-1]})
  first = [i for i, e in enumerate(g.eqns) if any(o in dep for o in e.outs)]
  second = [e for e in g2.eqns if any(o in dep2 for o in e.outs)]
  if (
    len(first) != len(second)
    or any(g.eqns[i].prim is e.prim for i, e in zip(first, second)) is False
  ):
    return
  if any(g.eqns[i].prim is not e.prim for i, e in zip(first, second)):
    return
  pair = dict(zip(first, second))
  for eqn in out.eqns:
    if eqn.batch is not None:
      continue
    twin = pair[origin[id(eqn)]]
    shape = g2.avals[twin.outs[0]][0]
    eqn.batch = {
      a: n // BATCH_SENTINEL for a, n in enumerate(shape) if n and n % BATCH_SENTINEL == 0
    }


def _report(g, an, removed, extra, names, mask_of) -> dict[str, Any]:
  uf = an.uf
  by_root: dict[Node, list[_Writer]] = {}
  for w in an.writers:
    by_root.setdefault(uf.find(w.node), []).append(w)
  layers = []
  for w in an.writers:
    kernel = g.eqns[w.eqn].ins[1] if g.eqns[w.eqn].prim.name == "conv_general_dilated" else None
    if kernel is None:
      kernel = next((i for i in g.eqns[w.eqn].ins if names.get(i) == w.name), None)
    if mask_of.get(kernel) is None:
      continue  # an unmasked layer: nothing was pruned
    root = uf.find(w.node)
    rem = removed.get(root, np.zeros(w.zero.size, bool))
    reasons: dict[str, list[int]] = {}
    for k in np.flatnonzero(w.zero & ~rem):
      others = [
        (o.name or f"equation {o.eqn}").removesuffix("/kernel")
        for o in by_root[root]
        if o is not w and not o.zero[k]
      ]
      if others:
        reason = "residual stream channel: also written by " + ", ".join(others) + ", which keep it"
      else:
        reason = extra.get(root, {}).get(
          int(k),
          "not removable: an op that needs every channel reads it (the output, a max or a "
          "broadcast over channels, a split reshape or grouped conv)",
        )
      reasons.setdefault(reason, []).append(int(k))
    layers.append(
      {
        "name": (w.name or f"equation {w.eqn}").removesuffix("/kernel"),
        "filters": int(w.zero.size),
        "pruned": int(w.zero.sum()),
        "removed": int(rem.sum()),
        "kept": int((~rem).sum()),
        "not_removed": [{"channels": ch, "reason": r} for r, ch in reasons.items()],
      }
    )
  return {
    "filters": sum(x["filters"] for x in layers),
    "pruned": sum(x["pruned"] for x in layers),
    "removed": sum(x["removed"] for x in layers),
    "layers": layers,
  }


def describe(compacted: Compacted) -> str:
  """The report as indented JSON (for a file next to an exported model)."""
  return json.dumps(compacted.report, indent=1)
