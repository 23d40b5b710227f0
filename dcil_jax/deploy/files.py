"""Deployable files: a compact or masked model as StableHLO (``jax.export``) and as ONNX.

Both load without ``dcil_jax``:

- StableHLO (``model.stablehlo``), for any PJRT runtime or IREE; in Python with ``jax`` only::

    exported = jax.export.deserialize(bytearray(open("model.stablehlo", "rb").read()))
    logits = exported.call(images)  # any batch size

- ONNX (``model.onnx``), for onnxruntime or any ONNX runtime; with ``onnxruntime`` only::

    session = onnxruntime.InferenceSession("model.onnx")
    (logits,) = session.run(None, {"x": images})

The batch size is symbolic in both (``batch``); the example shape is the traced one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dcil_jax.deploy.compaction import Compacted, as_function, plain_masks
from dcil_jax.deploy.onnx_export import to_onnx

FORMATS = ("stablehlo", "onnx")


def masked_function(model: Any, variables: dict[str, Any], masks: Any = None) -> Callable:
  """``x -> logits`` of the masked model (``W⊙M``, eval mode), its variables closed over.

  Args:
    model: a Flax Linen module or a function ``fn(variables, x)``.
    variables: plain variables, e.g. :func:`dcil_jax.export_variables`.
    masks: optional masks over ``variables["params"]`` or ``state.trained_masks``.
  """
  fn = as_function(model)
  if masks is not None:
    masks = plain_masks(masks, variables["params"])
    params = jax.tree.map(
      lambda p, m: p if m is None else p * jnp.asarray(m, jnp.result_type(p)),
      variables["params"],
      masks,
      is_leaf=lambda m: m is None,
    )
    variables = dict(variables, params=params)
  return lambda x: fn(variables, x)


def _function(model: Compacted | Callable, input_shape: tuple[int, ...] | None):
  if isinstance(model, Compacted):
    return model.apply, tuple(input_shape or model.module.input_shape)
  if input_shape is None:
    raise ValueError("Pass input_shape (one example's shape) for a function.")
  return model, tuple(input_shape)


def to_stablehlo(
  model: Compacted | Callable, input_shape: tuple[int, ...] | None = None, dtype: Any = np.float32
) -> bytes:
  """The serialized ``jax.export`` artifact (StableHLO) of ``model`` with a symbolic batch.

  Args:
    model: a :class:`Compacted`, or a function of one batch (e.g. :func:`masked_function`).
    input_shape: one example's shape (a :class:`Compacted` knows its own).
    dtype: the input's dtype.
  """
  fn, shape = _function(model, input_shape)
  (batch,) = jax.export.symbolic_shape("batch")
  exported = jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct((batch, *shape), dtype))
  return bytes(exported.serialize())


def _write(path: Path, data: bytes) -> int:
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    Path(tmp).unlink(missing_ok=True)
    raise
  return path.stat().st_size


def export(
  model: Compacted | Callable,
  path: str | Path,
  format: str,
  input_shape: tuple[int, ...] | None = None,
  dtype: Any = np.float32,
) -> int:
  """Writes ``model`` as ``format`` (``"stablehlo"`` or ``"onnx"``) to ``path``; returns bytes.

  The file is written atomically: an error leaves nothing behind.
  """
  fn, shape = _function(model, input_shape)
  if format == "stablehlo":
    data = to_stablehlo(fn, shape, dtype)
  elif format == "onnx":
    data = to_onnx(fn, shape, dtype).SerializeToString()
  else:
    raise ValueError(f"format must be one of {FORMATS}, got {format!r}.")
  return _write(Path(path), data)


def save_compact(
  compacted: Compacted, directory: str | Path, formats: tuple[str, ...] = FORMATS
) -> dict[str, int]:
  """Writes ``model.stablehlo``, ``model.onnx`` (those of ``formats``) and ``report.json``.

  Everything is written to a temporary directory first and moved into place at the end, so a
  failure leaves nothing behind; an existing non-empty ``directory`` is refused.

  Returns:
    Bytes of each file written.
  """
  directory = Path(directory)
  if directory.exists() and any(directory.iterdir()):
    raise ValueError(f"{directory} exists and is not empty; nothing was written.")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(prefix=".compact-", dir=directory.parent))
  try:
    for fmt in formats:
      export(compacted, tmp / f"model.{fmt}", fmt)
    report = dict(compacted.report, input_shape=list(compacted.module.input_shape))
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    if directory.exists():
      directory.rmdir()
    tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {p.name: p.stat().st_size for p in sorted(directory.iterdir())}
