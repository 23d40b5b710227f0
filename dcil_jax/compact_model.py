"""A plain Flax CNN described by a JSON list of ops: the runtime of a compacted (smaller) model.

This file imports only ``json``, ``numpy``, ``jax`` and ``flax``, never ``dcil_jax``:
:func:`dcil_jax.compact.save_compact` copies it next to the saved architecture (``arch.json``)
and variables (``variables.npz``), so a deployment loads the model in a fresh process with::

  import sys; sys.path.insert(0, directory)
  import compact_model
  model, variables = compact_model.load(directory)
  logits = model.apply(variables, images)  # eval mode (running BN statistics)

The architecture is data, not code: ``{"ops": [...], "output": name}``, where each op reads
named tensors and writes one (``conv``, ``bn``, ``relu``, ``add``, ``maxpool``, ``mean``,
``flatten``, ``dense``). So one module runs every pruned family, with per-layer widths.

A ``conv`` may carry two constant terms that replace removed input channels (pruned filters
whose output after BatchNorm and ReLU is a per-channel constant): ``bias`` for a 1x1 conv, and
``border``, a ``[kh, kw, 1, out]`` kernel applied to an all-ones image of the input's size. The
second keeps a padded conv exact: a constant channel contributes less at the image border, where
taps fall on the zero padding (computed from the input's size at trace time: any size works).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _padding(padding: Any) -> Any:
  return padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)


class CompactConv(nn.Module):
  """A bias-free conv (as in the source models) plus the optional constant terms above."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int]
  padding: Any
  use_bias: bool = False
  use_border: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
    kernel = self.param("kernel", init, (*self.kernel_size, x.shape[-1], self.features))
    conv = lambda lhs, rhs: jax.lax.conv_general_dilated(
      lhs, rhs, self.strides, _padding(self.padding), dimension_numbers=DIMENSIONS
    )
    y = conv(x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    if self.use_border:
      border = self.param("border", nn.initializers.zeros, (*self.kernel_size, 1, self.features))
      y = y + _ones_conv(x.shape[1:3], border, self.strides, self.padding).astype(y.dtype)
    return y


def _ones_conv(size: tuple[int, int], kernel: jax.Array, strides: Any, padding: Any) -> jax.Array:
  """``conv(ones[size], kernel)`` as ``[out_h, out_w, features]``, without a convolution.

  Which taps of each output position fall inside the image depends only on the sizes, so it is a
  host constant; the result is one small einsum (an XLA:CPU convolution over a one-channel
  all-ones image crashed inside a larger jitted graph here).
  """
  window = kernel.shape[:2]
  pads = (
    jax.lax.padtype_to_pads(size, window, strides, padding)
    if isinstance(padding, str)
    else _padding(padding)
  )
  inside = []
  for n, k, s, (lo, hi) in zip(size, window, strides, pads):
    out = (n + lo + hi - k) // s + 1
    rows = np.arange(out)[:, None] * s - lo + np.arange(k)[None, :]
    inside.append(((rows >= 0) & (rows < n)).astype(np.float32))  # [out, k]
  return jnp.einsum("ay,bx,yxo->abo", inside[0], inside[1], kernel[:, :, 0, :])


class CompactNet(nn.Module):
  """Runs the ops of ``arch`` (a JSON string, so the module stays hashable)."""

  arch: str

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    spec = json.loads(self.arch)
    t = {"input": x}
    for op in spec["ops"]:
      kind, src = op["op"], op.get("src")
      if kind == "conv":
        y = CompactConv(
          op["features"],
          tuple(op["kernel"]),
          tuple(op["strides"]),
          op["padding"],
          op.get("bias", False),
          op.get("border", False),
          name=op["name"],
        )(t[src])
      elif kind == "bn":
        y = nn.BatchNorm(
          use_running_average=not train, momentum=0.9, epsilon=op["epsilon"], name=op["name"]
        )(t[src])
      elif kind == "relu":
        y = nn.relu(t[src])
      elif kind == "add":
        y = t[src[0]] + t[src[1]]
      elif kind == "maxpool":
        y = nn.max_pool(
          t[src], tuple(op["window"]), tuple(op["strides"]), padding=_padding(op["padding"])
        )
      elif kind == "mean":
        y = jnp.mean(t[src], axis=(1, 2))
      elif kind == "flatten":
        y = t[src].reshape((t[src].shape[0], -1))
      elif kind == "dense":
        y = nn.Dense(op["features"], name=op["name"])(t[src])
      else:
        raise ValueError(f"Unknown op {kind!r} in the architecture.")
      t[op["dst"]] = y
    return t[spec["output"]]


def flatten_variables(variables: dict[str, Any]) -> dict[str, np.ndarray]:
  """``{"params/conv/kernel": array, ...}``: the nested variables as one flat npz-able dict."""
  out = {}

  def walk(prefix: str, node: Any) -> None:
    if hasattr(node, "items"):
      for k, v in node.items():
        walk(f"{prefix}/{k}" if prefix else str(k), v)
    else:
      out[prefix] = np.asarray(node)

  walk("", variables)
  return out


def unflatten_variables(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """The inverse of :func:`flatten_variables`."""
  out: dict[str, Any] = {}
  for key, value in flat.items():
    node = out
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value)
  return out


def load(directory: str | Path) -> tuple[CompactNet, dict[str, Any]]:
  """The model and its variables from ``arch.json`` and ``variables.npz`` in ``directory``."""
  directory = Path(directory)
  arch = (directory / "arch.json").read_text()
  with np.load(directory / "variables.npz") as data:
    variables = unflatten_variables({k: data[k] for k in data.files})
  return CompactNet(arch), variables
