"""Numbers a deployer reads: kept parameters and multiply-accumulates (MACs) of a pruned model.

Counted from a trace, not measured: every convolution and dot product of the forward pass of
one example is read from its jaxpr (:mod:`dcil_jax.deploy.graph`; nothing is computed), so any
model counts, the compact programs of :func:`dcil_jax.deploy.compaction` included. A layer's MACs
per example are ``output elements x contracted size`` (a conv's: output positions x kernel
entries; padding taps are counted, as is usual); with a mask, ``kept_macs`` scale by the kept
fraction of its kernel (a masked weight costs nothing on hardware that skips it). BatchNorm,
activations, pooling, additions and a compact model's folded constants are not counted, as is
usual for MACs.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcil_jax.deploy import graph as graph_lib
from dcil_jax.deploy.compaction import CompactModel, as_function, plain_masks


def _leaf_names(variables: Any, model: Any) -> list[str]:
  names = []
  for path, _ in jax.tree_util.tree_flatten_with_path(variables)[0]:
    keys = [str(getattr(k, "key", k)) for k in path]
    if isinstance(model, CompactModel) and keys[0] == "constants":
      names.append(model.names.get(int(keys[1]), f"constant {keys[1]}"))
    else:
      names.append("/".join(keys[1:]))
  return names


def layer_stats(
  model: Any, variables: dict[str, Any], input_shape: tuple[int, ...], masks: Any = None
) -> list[dict[str, Any]]:
  """Per conv / dense layer: name, kernel and output shape, parameters, kept, MACs per example.

  Args:
    model: a Flax Linen model (eval mode), a function ``fn(variables, x)``, or the ``module`` of
      a :class:`dcil_jax.deploy.Compacted`.
    variables: its variables.
    input_shape: one example's shape, e.g. ``(32, 32, 3)``.
    masks: optional masks over ``variables["params"]`` (``None`` at unpruned leaves), or
      ``state.trained_masks`` as it is (its sparse path is counted).

  Returns:
    One dict per layer in call order: ``name``, ``kernel``, ``output``, ``params`` (kernel
    entries), ``kept`` (unmasked entries), ``macs`` (dense), ``kept_macs`` (masked).
  """
  fn = model.apply if isinstance(model, CompactModel) else as_function(model)
  if masks is not None:
    masks = plain_masks(masks, variables["params"])
  mask_leaves = (
    jax.tree.leaves(
      {
        k: (
          jax.tree.map(lambda p, m: m, v, masks, is_leaf=lambda m: m is None)
          if k == "params"
          else jax.tree.map(lambda _: None, v)
        )
        for k, v in variables.items()
      },
      is_leaf=lambda m: m is None,
    )
    if masks is not None
    else [None] * len(jax.tree.leaves(variables))
  )
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), jnp.result_type(a)), variables)
  g, _ = graph_lib.trace(fn, shapes, jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  leaf_ids = g.inputs[:-1]
  names = dict(zip(leaf_ids, _leaf_names(variables, model)))
  mask_of = dict(zip(leaf_ids, mask_leaves))
  for eqn in g.eqns:  # a kernel cast or reshaped keeps its name
    ins = [i for i in eqn.ins if i not in g.consts]
    if eqn.prim.name in ("convert_element_type", "reshape", "copy") and len(ins) == 1:
      if ins[0] in names:
        names[eqn.outs[0]] = names[ins[0]]
        mask_of[eqn.outs[0]] = mask_of.get(ins[0])
  layers = []
  for eqn in g.eqns:
    name = eqn.prim.name
    if name not in ("conv_general_dilated", "dot_general"):
      continue
    out_shape = g.avals[eqn.outs[0]][0]
    if name == "conv_general_dilated":
      kernel = eqn.ins[1]
      dn = eqn.params["dimension_numbers"]
      positions = int(np.prod([out_shape[a] for a in dn.out_spec[2:]]))
    else:
      (lc, rc), _ = eqn.params["dimension_numbers"]
      kernel = next((i for i in eqn.ins[::-1] if i in names), eqn.ins[1])
      kshape = g.avals[kernel][0]
      contracted = rc if kernel == eqn.ins[1] else lc
      per_out = int(np.prod([kshape[a] for a in contracted]))
      positions = int(np.prod(out_shape[1:])) * per_out // max(int(np.prod(kshape)), 1)
    kshape = g.avals[kernel][0]
    size = int(np.prod(kshape))
    mask = mask_of.get(kernel)
    kept = size if mask is None else int(np.sum(np.asarray(mask)))
    layers.append(
      {
        "name": names.get(kernel, f"equation {len(layers)}").removesuffix("/kernel"),
        "kernel": tuple(kshape),
        "output": tuple(out_shape[1:]),
        "params": size,
        "kept": kept,
        "macs": positions * size,
        "kept_macs": positions * kept,
      }
    )
  return layers


def deploy_stats(
  model: Any, variables: dict[str, Any], input_shape: tuple[int, ...], masks: Any = None
) -> dict[str, int]:
  """Totals: ``params`` (every parameter), ``kept_params`` (less the masked entries), ``macs``
  and ``kept_macs`` per example (conv and dense layers, see :func:`layer_stats`).

  ``masks`` may be ``state.trained_masks`` as it is, or masks over ``variables["params"]``.
  """
  layers = layer_stats(model, variables, input_shape, masks)
  params = variables.get("params", variables.get("constants"))
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
  masks = plain_masks(masks, variables["params"]) if masks is not None else None
  masked = sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks)) if masks else 0
  return {
    "params": total,
    "kept_params": total - masked,
    "macs": sum(x["macs"] for x in layers),
    "kept_macs": sum(x["kept_macs"] for x in layers),
  }
