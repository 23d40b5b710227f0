"""ONNX from a trace: any JAX function of one batch ``x`` as an ONNX model with a free batch size.

The function (a :class:`dcil_jax.deploy.compaction.Compacted` model, or a masked model closed over
its variables) is traced at a sentinel batch size (a prime no layer uses), so the batch axis can
be told from the other axes after ``vmap`` and reshapes: the ONNX graph gets a symbolic
``batch`` dimension and ``-1`` where a reshape carries it. Equations that do not depend on the
input are evaluated once and written as initializers (so BatchNorm is folded, with the model's
own epsilon). Each input-dependent primitive maps to one or a few ONNX operators; convolutions
and pooling are transposed to ONNX's channels-first layout and back, and onnxruntime's graph
optimiser removes the transposes between consecutive convs. A primitive without a mapping
raises a ``ValueError`` that names it.

Only ``onnx`` is needed to write the file; running it needs ``onnxruntime`` (and no ``jax`` or
``dcil_jax``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dcil_jax.deploy import graph as graph_lib

SENTINEL = 7919  # the batch size of the trace: a prime that no layer width is a multiple of
OPSET = 18

_SIMPLE = {
  "add": "Add",
  "add_any": "Add",
  "sub": "Sub",
  "mul": "Mul",
  "div": "Div",
  "max": "Max",
  "min": "Min",
  "pow": "Pow",
  "neg": "Neg",
  "exp": "Exp",
  "log": "Log",
  "tanh": "Tanh",
  "logistic": "Sigmoid",
  "sqrt": "Sqrt",
  "abs": "Abs",
  "erf": "Erf",
  "sign": "Sign",
  "floor": "Floor",
  "ceil": "Ceil",
  "sin": "Sin",
  "cos": "Cos",
  "stop_gradient": "Identity",
  "copy": "Identity",
  "copy_p": "Identity",
  "eq": "Equal",
  "lt": "Less",
  "le": "LessOrEqual",
  "gt": "Greater",
  "ge": "GreaterOrEqual",
  "and": "And",
  "or": "Or",
  "not": "Not",
}


def _is_batch(n: int) -> bool:
  return n != 0 and n % SENTINEL == 0


def to_onnx(
  fn: Callable[[jax.Array], Any], input_shape: tuple[int, ...], dtype: Any = np.float32
) -> Any:
  """An ``onnx.ModelProto`` computing ``fn(x)`` for ``x`` of shape ``[batch, *input_shape]``.

  Args:
    fn: a function of one batch, e.g. ``compacted.apply`` or
      ``lambda x: model.apply(variables, x)``.
    input_shape: one example's shape.
    dtype: the input's dtype.

  Raises:
    ValueError: for an input-dependent primitive that has no ONNX mapping here (named).
  """
  import onnx
  from onnx import TensorProto, helper, numpy_helper

  g, _ = graph_lib.trace(fn, jax.ShapeDtypeStruct((SENTINEL, *input_shape), dtype))
  dep = graph_lib.depends(g, {g.inputs[0]})
  values = dict(g.consts)
  for eqn in g.eqns:  # fold what does not depend on the input
    if not any(o in dep for o in eqn.outs):
      for o, v in zip(eqn.outs, graph_lib.bind(eqn, [values[i] for i in eqn.ins])):
        values[o] = np.asarray(v)

  nodes: list[Any] = []
  inits: dict[str, Any] = {}
  count = [0]

  def name(v: int) -> str:
    if v in dep or v == g.inputs[0]:
      return "x" if v == g.inputs[0] else f"v{v}"
    key = f"c{v}"
    if key not in inits:
      inits[key] = numpy_helper.from_array(np.asarray(values[v]), key)
    return key

  def const(array: Any, dt: Any = np.int64) -> str:
    count[0] += 1
    key = f"k{count[0]}"
    inits[key] = numpy_helper.from_array(np.asarray(array, dt), key)
    return key

  def tmp() -> str:
    count[0] += 1
    return f"t{count[0]}"

  def node(op: str, ins: list[str], out: str, **attrs: Any) -> str:
    nodes.append(helper.make_node(op, ins, [out], **attrs))
    return out

  def shape_arg(shape: tuple[int, ...]) -> list[int]:
    return [-1 if _is_batch(s) else s for s in shape]

  def transpose(x: str, perm: list[int]) -> str:
    if list(perm) == sorted(perm):
      return x
    return node("Transpose", [x], tmp(), perm=list(perm))

  for eqn in g.eqns:
    if not any(o in dep for o in eqn.outs):
      continue
    p, prim = eqn.params, eqn.prim.name
    ins = [name(i) for i in eqn.ins]
    out = name(eqn.outs[0])
    shape = lambda v: g.avals[v][0]
    if prim in _SIMPLE:
      node(_SIMPLE[prim], ins, out)
    elif prim == "ne":
      node("Not", [node("Equal", ins, tmp())], out)
    elif prim == "rsqrt":
      node("Reciprocal", [node("Sqrt", ins, tmp())], out)
    elif prim == "square":
      node("Mul", [ins[0], ins[0]], out)
    elif prim == "integer_pow":
      node("Pow", [ins[0], const(float(p["y"]), g.avals[eqn.ins[0]][1])], out)
    elif prim == "convert_element_type":
      to = helper.np_dtype_to_tensor_dtype(np.dtype(p["new_dtype"]))
      node("Cast", ins, out, to=to)
    elif prim == "select_n" and len(ins) == 3:
      pred = ins[0]
      if g.avals[eqn.ins[0]][1] != np.bool_:
        pred = node("Cast", [pred], tmp(), to=TensorProto.BOOL)
      node("Where", [pred, ins[2], ins[1]], out)
    elif prim == "clamp":
      node("Max", [node("Min", [ins[1], ins[2]], tmp()), ins[0]], out)
    elif prim == "broadcast_in_dim":
      src = shape(eqn.ins[0])
      target = p["shape"]
      mid = [1] * len(target)
      for j, d in enumerate(p["broadcast_dimensions"]):
        mid[d] = src[j]
      x = node("Reshape", [ins[0], const(shape_arg(tuple(mid)))], tmp())
      node("Expand", [x, const([1 if _is_batch(s) else s for s in target])], out)
    elif prim == "reshape":
      node("Reshape", [ins[0], const(shape_arg(p["new_sizes"]))], out)
    elif prim == "transpose":
      node("Transpose", ins, out, perm=list(p["permutation"]))
    elif prim == "squeeze":
      node("Squeeze", [ins[0], const(list(p["dimensions"]))], out)
    elif prim == "expand_dims":
      node("Unsqueeze", [ins[0], const(list(p["dimensions"]))], out)
    elif prim in ("reduce_sum", "reduce_max", "reduce_min"):
      op = {"reduce_sum": "ReduceSum", "reduce_max": "ReduceMax", "reduce_min": "ReduceMin"}[prim]
      node(op, [ins[0], const(list(p["axes"]))], out, keepdims=0)
    elif prim in ("argmax", "argmin"):
      (axis,) = p["axes"]
      x = node("ArgMax" if prim == "argmax" else "ArgMin", ins[:1], tmp(), axis=axis, keepdims=0)
      node("Cast", [x], out, to=helper.np_dtype_to_tensor_dtype(np.dtype(p["index_dtype"])))
    elif prim in ("reduce_window_max", "reduce_window_sum"):
      rank = len(shape(eqn.ins[0]))
      window = [
        a
        for a in range(rank)
        if p["window_dimensions"][a] != 1 or p["window_strides"][a] != 1 or any(p["padding"][a])
      ]
      rest = [a for a in range(rank) if a not in window]
      src, dst = shape(eqn.ins[0]), shape(eqn.outs[0])
      if len(rest) < 2 or any(d != 1 for d in p["base_dilation"]) or _is_batch(src[rest[-1]]):
        raise ValueError(f"No ONNX mapping for {prim} with these windows ({p}).")
      perm = rest + window
      attrs = {
        "kernel_shape": [p["window_dimensions"][a] for a in window],
        "strides": [p["window_strides"][a] for a in window],
        "pads": [p["padding"][a][0] for a in window] + [p["padding"][a][1] for a in window],
      }
      x = transpose(ins[0], perm)
      if len(rest) > 2:  # ONNX pools [N, C, spatial...]: merge the leading axes into N
        x = node("Reshape", [x, const([-1, src[rest[-1]], *[src[a] for a in window]])], tmp())
      if prim == "reduce_window_max":
        y = node(
          "MaxPool", [x], tmp(), dilations=[p["window_dilation"][a] for a in window], **attrs
        )
      else:
        y = node("AveragePool", [x], tmp(), count_include_pad=1, **attrs)
        size = float(np.prod(attrs["kernel_shape"]))
        y = node("Mul", [y, const(size, g.avals[eqn.ins[0]][1])], tmp())
      if len(rest) > 2:
        y = node("Reshape", [y, const(shape_arg(tuple(dst[a] for a in perm)))], tmp())
      node("Transpose", [y], out, perm=[int(i) for i in np.argsort(perm)])
    elif prim == "conv_general_dilated":
      dn = p["dimension_numbers"]
      if eqn.ins[1] in dep or any(d != 1 for d in p["lhs_dilation"]) or p["batch_group_count"] != 1:
        raise ValueError(
          "No ONNX mapping for a conv with an input-dependent kernel, input dilation or batch "
          "groups."
        )
      kernel = np.transpose(np.asarray(values[eqn.ins[1]]), dn.rhs_spec)
      x = transpose(ins[0], list(dn.lhs_spec))
      y = node(
        "Conv",
        [x, const(kernel, kernel.dtype)],
        tmp(),
        group=p["feature_group_count"],
        strides=list(p["window_strides"]),
        dilations=list(p["rhs_dilation"]),
        pads=[lo for lo, _ in p["padding"]] + [hi for _, hi in p["padding"]],
      )
      perm = [int(i) for i in np.argsort(dn.out_spec)]
      if perm == sorted(perm):
        node("Identity", [y], out)
      else:
        node("Transpose", [y], out, perm=perm)
    elif prim == "dot_general":
      (lc, rc), (lb, rb) = p["dimension_numbers"]
      ls, rs = shape(eqn.ins[0]), shape(eqn.ins[1])
      if not lb and len(ls) == 2 and len(rs) == 2 and tuple(lc) == (1,) and tuple(rc) == (0,):
        node("MatMul", ins, out)
      else:
        letters = iter("abcdefghijklmnopqrstuvwxyz")
        lab_l = [next(letters) for _ in ls]
        lab_r = [next(letters) for _ in rs]
        for a, b in list(zip(lc, rc)) + list(zip(lb, rb)):
          lab_r[b] = lab_l[a]
        lfree = [lab_l[a] for a in range(len(ls)) if a not in lc and a not in lb]
        rfree = [lab_r[a] for a in range(len(rs)) if a not in rc and a not in rb]
        eq = f"{''.join(lab_l)},{''.join(lab_r)}->{''.join([lab_l[a] for a in lb] + lfree + rfree)}"
        node("Einsum", ins, out, equation=eq)
    elif prim == "concatenate":
      node("Concat", ins, out, axis=p["dimension"])
    elif prim == "pad":
      cfg = p["padding_config"]
      if any(i != 0 for _, _, i in cfg) or any(lo < 0 or hi < 0 for lo, hi, _ in cfg):
        raise ValueError("No ONNX mapping for interior or negative padding.")
      pads = [lo for lo, _, _ in cfg] + [hi for _, hi, _ in cfg]
      node("Pad", [ins[0], const(pads), ins[1]], out, mode="constant")
    elif prim == "slice":
      src = shape(eqn.ins[0])
      ends = [
        np.iinfo(np.int64).max if _is_batch(n) and lim == n else lim
        for n, lim in zip(src, p["limit_indices"])
      ]
      steps = p["strides"] or [1] * len(src)
      node(
        "Slice",
        [
          ins[0],
          const(list(p["start_indices"])),
          const(ends),
          const(list(range(len(src)))),
          const(list(steps)),
        ],
        out,
      )
    else:
      raise ValueError(
        f"No ONNX mapping for the primitive {prim!r} (on the input's path); the mapped ones are "
        f"{sorted(set(_SIMPLE) | _OTHER)}."
      )

  def value_info(v: int, label: str) -> Any:
    shp, dt = g.avals[v]
    dims = ["batch" if _is_batch(s) else s for s in shp]
    return helper.make_tensor_value_info(label, helper.np_dtype_to_tensor_dtype(dt), dims)

  outputs = []
  for k, v in enumerate(g.outputs):
    label = "output" if len(g.outputs) == 1 else f"output_{k}"
    nodes.append(helper.make_node("Identity", [name(v)], [label]))
    outputs.append(value_info(v, label))
  used = {i for n in nodes for i in n.input}
  graph = helper.make_graph(
    nodes,
    "dcil_jax_export",
    [value_info(g.inputs[0], "x")],
    outputs,
    [t for k, t in inits.items() if k in used],
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  return model


_OTHER = {
  "ne",
  "rsqrt",
  "square",
  "integer_pow",
  "convert_element_type",
  "select_n",
  "clamp",
  "broadcast_in_dim",
  "reshape",
  "transpose",
  "squeeze",
  "expand_dims",
  "reduce_sum",
  "reduce_max",
  "reduce_min",
  "argmax",
  "argmin",
  "reduce_window_max",
  "reduce_window_sum",
  "conv_general_dilated",
  "dot_general",
  "concatenate",
  "pad",
  "slice",
}
