"""Numbers a deployer reads: kept parameters and multiply-accumulates (MACs) of a pruned model.

Counted from shapes and masks, not measured: each conv and dense layer is recorded while the
model is traced abstractly (``jax.eval_shape``, nothing is computed), and a layer's MACs per
example are ``output positions x kept kernel entries`` (a masked weight costs nothing on
hardware that skips it; padding taps are counted, as is usual). For a compact model
(:mod:`dcil_jax.compact`) the same count runs on its smaller shapes; its constant ``border``
terms (one small einsum per batch, not per example) are not counted. BatchNorm, activations,
pooling and additions are not counted either, as is usual for MACs.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dcil_jax.compact_model import CompactConv


def _get(tree: Any, path: tuple[str, ...]) -> Any:
  for key in path:
    if tree is None:
      return None
    tree = tree[key]
  return tree


def layer_stats(
  model: nn.Module, variables: dict[str, Any], input_shape: tuple[int, ...], masks: Any = None
) -> list[dict[str, Any]]:
  """Per conv / dense layer: name, kernel and output shape, parameters, kept, MACs per example.

  Args:
    model: a Flax model whose ``apply(variables, x)`` runs in eval mode.
    variables: its variables (only shapes are used, and ``params`` to find the kernels).
    input_shape: one example's shape, e.g. ``(32, 32, 3)``.
    masks: optional masks tree over ``variables["params"]`` (``None`` at unpruned leaves).

  Returns:
    One dict per layer in call order: ``name``, ``kernel``, ``output``, ``params`` (kernel
    entries), ``kept`` (unmasked entries), ``macs`` (dense), ``kept_macs`` (masked).
  """
  records: list[tuple[tuple[str, ...], tuple[int, ...]]] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__" and isinstance(
      context.module, (nn.Conv, nn.Dense, CompactConv)
    ):
      records.append((tuple(context.module.path), tuple(out.shape)))
    return out

  def run(v):
    with nn.intercept_methods(interceptor):
      return model.apply(v, jnp.zeros((1, *input_shape), jnp.float32))

  jax.eval_shape(run, variables)
  layers = []
  for path, out_shape in records:
    kernel = _get(variables["params"], (*path, "kernel"))
    mask = _get(masks, (*path, "kernel"))
    size = int(np.prod(kernel.shape))
    kept = size if mask is None else int(np.sum(np.asarray(mask)))
    positions = int(np.prod(out_shape[1:-1]))  # 1 for a dense layer on [batch, features]
    layers.append(
      {
        "name": "/".join(path),
        "kernel": tuple(kernel.shape),
        "output": out_shape[1:],
        "params": size,
        "kept": kept,
        "macs": positions * size,
        "kept_macs": positions * kept,
      }
    )
  return layers


def deploy_stats(
  model: nn.Module, variables: dict[str, Any], input_shape: tuple[int, ...], masks: Any = None
) -> dict[str, int]:
  """Totals: ``params`` (every parameter), ``kept_params`` (less the masked entries), ``macs``
  and ``kept_macs`` per example (conv and dense layers, see :func:`layer_stats`)."""
  layers = layer_stats(model, variables, input_shape, masks)
  total = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(variables["params"]))
  masked = sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks)) if masks else 0
  return {
    "params": total,
    "kept_params": total - masked,
    "macs": sum(x["macs"] for x in layers),
    "kept_macs": sum(x["kept_macs"] for x in layers),
  }
