"""A model's forward pass as one flat list of primitive equations: traced, evaluated, re-run.

:func:`trace` records ``fn(variables, x)`` with :func:`jax.make_jaxpr` and inlines the nested
calls a Flax model produces (``jit`` around activations, ``custom_jvp_call`` around ``relu``), so
the compaction (:mod:`dcil_jax.deploy.compaction`), the ONNX writer
(:mod:`dcil_jax.deploy.onnx_export`) and the MAC counter (:mod:`dcil_jax.deploy.stats`) each
read one list of primitives instead of a tree of jaxprs. Literals become constants, so every
operand is a variable id.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.extend import core

# Primitives whose body is one inner jaxpr that runs once: they are inlined. A parameter name per
# primitive says where the jaxpr is.
_INLINE = {
  "jit": "jaxpr",
  "pjit": "jaxpr",
  "closed_call": "call_jaxpr",
  "core_call": "call_jaxpr",
  "custom_jvp_call": "call_jaxpr",
  "custom_vjp_call": "call_jaxpr",
  "custom_vjp_call_jaxpr": "fun_jaxpr",
  "remat": "jaxpr",
  "checkpoint": "jaxpr",
}


@dataclasses.dataclass
class Eqn:
  """One primitive application: ``outs = prim.bind(*ins, **params)`` (ids into the graph)."""

  prim: Any
  params: dict[str, Any]
  ins: list[int]
  outs: list[int]
  batch: dict[int, int] | None = None  # output axis -> multiple of the batch size it holds


@dataclasses.dataclass
class Graph:
  """A flat program: ``inputs`` and ``consts`` feed ``eqns`` in order; ``outputs`` are read.

  Attributes:
    eqns: the equations in execution order.
    avals: ``id -> (shape, dtype)`` of every variable.
    inputs: the ids of the traced function's flat arguments.
    outputs: the ids of its flat results.
    consts: ``id -> value`` of the constants (literals and closed-over arrays).
  """

  eqns: list[Eqn]
  avals: dict[int, tuple[tuple[int, ...], np.dtype]]
  inputs: list[int]
  outputs: list[int]
  consts: dict[int, np.ndarray]

  def new_var(self, shape: tuple[int, ...], dtype: Any) -> int:
    vid = max(self.avals, default=-1) + 1
    self.avals[vid] = (tuple(int(s) for s in shape), np.dtype(dtype))
    return vid


def trace(fn: Callable[..., Any], *args: Any) -> tuple[Graph, Any]:
  """The flat graph of ``fn(*args)`` and the tree structure of its result.

  Args:
    fn: a JAX-traceable function.
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``); the graph's ``inputs`` are their
      leaves in ``jax.tree.leaves`` order.
  """
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  g = Graph([], {}, [], [], {})
  counter = [0]

  def new(aval: Any) -> int:
    vid = counter[0]
    counter[0] += 1
    g.avals[vid] = (tuple(int(s) for s in aval.shape), np.dtype(aval.dtype))
    return vid

  def const(value: Any, aval: Any) -> int:
    vid = new(aval)
    g.consts[vid] = np.asarray(value, dtype=aval.dtype)
    return vid

  def walk(jaxpr: core.Jaxpr, consts: list[Any], ins: list[int]) -> list[int]:
    env: dict[Any, int] = {}
    for v, c in zip(jaxpr.constvars, consts):
      env[v] = const(c, v.aval)
    for v, i in zip(jaxpr.invars, ins):
      env[v] = i

    def read(a: Any) -> int:
      if isinstance(a, core.Literal):
        return const(a.val, a.aval)
      return env[a]

    for eqn in jaxpr.eqns:
      args = [read(a) for a in eqn.invars]
      key = _INLINE.get(eqn.primitive.name)
      if key is not None and key in eqn.params:
        inner = eqn.params[key]
        if isinstance(inner, core.ClosedJaxpr):
          outs = walk(inner.jaxpr, list(inner.consts), args)
        else:
          outs = walk(inner, [], args)
        for v, o in zip(eqn.outvars, outs):
          env[v] = o
        continue
      outs = [new(v.aval) for v in eqn.outvars]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
      g.eqns.append(Eqn(eqn.primitive, dict(eqn.params), args, outs))
    return [read(v) for v in jaxpr.outvars]

  g.inputs = [new(v.aval) for v in closed.jaxpr.invars]
  g.outputs = walk(closed.jaxpr, list(closed.consts), g.inputs)
  return g, jax.tree.structure(out_shape)


def bind(eqn: Eqn, values: list[Any]) -> list[Any]:
  """Runs one equation on values (arrays or tracers); always a list of results."""
  out = eqn.prim.bind(*values, **eqn.params)
  return list(out) if eqn.prim.multiple_results else [out]


def run(g: Graph, inputs: list[Any], keep: Callable[[int], bool] | None = None) -> dict[int, Any]:
  """Evaluates ``g`` on ``inputs``; returns the values of every variable (or those ``keep``
  selects, plus the outputs)."""
  env: dict[int, Any] = dict(g.consts)
  env.update(zip(g.inputs, inputs))
  for eqn in g.eqns:
    for o, v in zip(eqn.outs, bind(eqn, [env[i] for i in eqn.ins])):
      env[o] = v
  if keep is None:
    return env
  return {k: v for k, v in env.items() if keep(k) or k in g.outputs}


def depends(g: Graph, on: set[int]) -> set[int]:
  """The ids whose value depends on any of ``on`` (the others are constants of the program)."""
  dep = set(on)
  for eqn in g.eqns:
    if any(i in dep for i in eqn.ins):
      dep.update(eqn.outs)
  return dep
