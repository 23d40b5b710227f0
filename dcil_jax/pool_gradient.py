"""Max-pool gradients whose index arrays exist only while the gradient is computed (XLA:CPU).

XLA:CPU has no kernel for ``select-and-scatter`` (the gradient of a max-pool), so it expands it
into a window reduction over ``(value, index)`` pairs and a scatter. The index arrays are
``iota`` instructions, one per dimension of the padded input, with no operands, and its
scheduler creates them at the start of the step. For a sequential DCIL step that means the
dense path's max-pool gradient holds four arrays the size of the stem's activations while the
sparse path's activations are alive, and the step needs noticeably more memory than a dense step
(ResNet-50 before and after this module: ``benchmarks/results/notes_cpu.md``).

:func:`late_pool_indices` rewrites a function so that each max-pool (``reduce_window_max``
without dilation) gets a gradient that computes the same values — the gradient reaches the
first maximum of each window in row-major window order, as with ``select-and-scatter`` — from
one flat index array that depends on the incoming cotangent, so XLA can only create it when
the backward pass reaches the pool. The forward pass is unchanged. GPU and TPU run
``select-and-scatter`` natively and do not need this.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

__all__ = ["late_pool_indices"]

_MAX_POOL = jex_core.primitives.reduce_window_max_p
_JIT = jex_core.primitives.jit_p


def _window_argmax(
  x: jax.Array, late: jax.Array, window: Sequence[int], strides: Sequence[int]
) -> jax.Array:
  """Flat index (into ``x``) of the first maximum of each window of ``x`` (no padding).

  ``late`` is a zero that XLA cannot fold (see :func:`_late_zero`): the index array is built
  from it, so it exists only once ``late`` does.
  """
  index = lax.iota(jnp.int32, x.size).reshape(x.shape) + late

  def first_max(a, b):
    (va, ia), (vb, ib) = a, b
    take_a = (va > vb) | ((va == vb) & (ia < ib))
    return lax.select(take_a, va, vb), lax.select(take_a, ia, ib)

  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(np.iinfo(np.int32).max, jnp.int32))
  _, arg = lax.reduce_window((x, index), init, first_max, tuple(window), tuple(strides), "VALID")
  return arg


def _late_zero(g: jax.Array) -> jax.Array:
  """An int32 zero computed from ``g``: ``0·max|g|`` is NaN for a non-finite ``g``, so XLA
  keeps the dependency (it is 1 then, and the step is not finite anyway)."""
  return (0.0 * jnp.max(jnp.abs(g)).astype(jnp.float32) != 0).astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool(x: jax.Array, window: tuple, strides: tuple, padding: tuple) -> jax.Array:
  ones = (1,) * x.ndim
  return _MAX_POOL.bind(
    x,
    window_dimensions=window,
    window_strides=strides,
    padding=padding,
    base_dilation=ones,
    window_dilation=ones,
  )


def _max_pool_fwd(x, window, strides, padding):
  return _max_pool(x, window, strides, padding), x


def _max_pool_bwd(window, strides, padding, x, g):
  padded = lax.pad(x, jnp.array(-jnp.inf, x.dtype), [(lo, hi, 0) for lo, hi in padding])
  arg = _window_argmax(padded, _late_zero(g), window, strides)
  flat = jnp.zeros(padded.size, g.dtype).at[arg.reshape(-1)].add(g.reshape(-1), mode="drop")
  starts = [lo for lo, _ in padding]
  return (lax.slice(flat.reshape(padded.shape), starts, [s + d for s, d in zip(starts, x.shape)]),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def _plain(eqn: Any) -> bool:
  """Whether ``eqn`` is a max-pool this module rewrites: no dilation, floating point, and a
  padded input whose flat indices fit in int32."""
  p = eqn.params
  aval = eqn.invars[0].aval
  padded = math.prod(d + lo + hi for d, (lo, hi) in zip(aval.shape, p["padding"]))
  return (
    all(d == 1 for d in (*p["base_dilation"], *p["window_dilation"]))
    and jnp.issubdtype(aval.dtype, jnp.floating)
    and padded < np.iinfo(np.int32).max
  )


def _evaluate(jaxpr: Any, consts: Sequence[Any], args: Sequence[Any]) -> list[Any]:
  """``jaxpr`` evaluated like ``jax.core.eval_jaxpr``, with max-pools (also inside nested
  ``jit``s) rewritten to :func:`_max_pool`."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jex_core.Literal) else env[v]

  for var, value in zip(jaxpr.constvars, consts):
    env[var] = value
  for var, value in zip(jaxpr.invars, args):
    env[var] = value
  for eqn in jaxpr.eqns:
    inputs = [read(v) for v in eqn.invars]
    if eqn.primitive is _MAX_POOL and _plain(eqn):
      p = eqn.params
      outputs = [_max_pool(inputs[0], p["window_dimensions"], p["window_strides"], p["padding"])]
    elif eqn.primitive is _JIT:
      inner = eqn.params["jaxpr"]
      outputs = _evaluate(inner.jaxpr, inner.consts, inputs)
    else:
      with eqn.ctx.manager:
        result = eqn.primitive.bind(*inputs, **eqn.primitive.get_bind_params(eqn.params))
      outputs = result if eqn.primitive.multiple_results else [result]
    for var, value in zip(eqn.outvars, outputs):
      if not isinstance(var, jex_core.DropVar):
        env[var] = value
  return [read(v) for v in jaxpr.outvars]


def late_pool_indices(fn: Callable[..., Any]) -> Callable[..., Any]:
  """``fn`` with its max-pools' gradients computed from index arrays created late (see the
  module docstring); same values, gradients and output structure.

  Max-pools inside nested ``jit``s are rewritten too; those inside other higher-order
  primitives (``remat``, ``scan``, ``cond``, custom derivatives) keep JAX's gradient.

  Args:
    fn: a function of pytrees of arrays.

  Returns:
    A function of the same arguments; differentiate it as you would ``fn``.
  """

  @functools.wraps(fn)
  def rewritten(*args, **kwargs):
    # Keyword arguments stay out of the traced inputs (``jax.grad`` does not differentiate them
    # either); they enter the jaxpr as constants.
    positional = functools.partial(fn, **kwargs)
    closed, out_shape = jax.make_jaxpr(positional, return_shape=True)(*args)
    flat = _evaluate(closed.jaxpr, closed.consts, jax.tree.leaves(args))
    return jax.tree.unflatten(jax.tree.structure(out_shape), flat)

  return rewritten
