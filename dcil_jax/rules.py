"""Which parameters are prunable: rules ``(key_path, leaf) -> bool`` over a plain params tree.

A key path is what ``jax.tree_util.tree_flatten_with_path`` gives for a plain Flax params dict:
a tuple of ``jax.tree_util.DictKey``; ``key.key`` is the name, e.g.
``(DictKey('Conv_0'), DictKey('kernel'))``. A rule sees the path and the leaf (an array, or a
``jax.ShapeDtypeStruct`` when masks are built abstractly) and returns whether to prune it.

"Convolution kernel" is a fact about the module that owns the leaf, not about its shape (a
``DenseGeneral`` kernel can be 3-D like a 1-D convolution's), so the rules that name module types
are built from the model: they trace ``model.init`` once, abstractly, and record which module
type owns each parameter. Write your own rule as a plain function::

  def no_first_conv(path, leaf):
    names = [k.key for k in path]
    return names[-1] == "kernel" and names[0] != "conv_init" and leaf.ndim == 4
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from dcil_jax.model import NNXModel

__all__ = [
  "Rule",
  "all_kernels",
  "conv_and_dense_kernels",
  "conv_kernels",
  "dense_kernels",
  "kernels_of",
  "key_names",
  "module_types",
]


KeyPath = tuple[Any, ...]
Rule = Callable[[KeyPath, Any], bool]

CONV_TYPES: tuple[type, ...] = (
  nn.Conv,
  nn.ConvTranspose,
  nn.ConvLocal,
  nnx.Conv,
  nnx.ConvTranspose,
)
DENSE_TYPES: tuple[type, ...] = (
  nn.Dense,
  nn.DenseGeneral,
  nn.Einsum,
  nnx.Linear,
  nnx.LinearGeneral,
  nnx.Einsum,
)


def key_names(key_path: KeyPath) -> tuple[str, ...]:
  """The names in a key path (``DictKey.key``, ``GetAttrKey.name``, ``SequenceKey.idx``)."""
  out = []
  for key in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        out.append(str(getattr(key, attr)))
        break
    else:
      out.append(str(key))
  return tuple(out)


def module_types(model: Any, *example_args: Any, **example_kwargs: Any) -> dict:
  """``{module path: module type}`` of every submodule.

  A Linen module is traced abstractly through ``module.init(rng, *example_args)``
  (``jax.eval_shape``: nothing is allocated or computed); an NNX module (or
  ``dcil_jax.from_nnx``'s model) holds its submodules and needs no example.
  """
  if isinstance(model, NNXModel):
    return model.module_paths
  if isinstance(model, nnx.Module):
    return {tuple(str(k) for k in key_path): type(m) for key_path, m in nnx.iter_modules(model)}
  module = getattr(model, "module", None) or model  # a dcil_jax.FlaxModel, or the module
  seen: dict[tuple[str, ...], type] = {}

  def record(next_fn, args, kwargs, context):
    seen.setdefault(tuple(context.module.path), type(context.module))
    return next_fn(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *example_args, **example_kwargs))
  return seen


def _module_rule(types_by_path: dict, types: tuple[type, ...], leaf_names: Iterable[str]) -> Rule:
  owners = {key_path for key_path, t in types_by_path.items() if issubclass(t, types)}
  names = frozenset(leaf_names)

  def rule(key_path: KeyPath, leaf: Any) -> bool:
    del leaf
    keys = key_names(key_path)
    return bool(keys) and keys[-1] in names and keys[:-1] in owners

  return rule


def kernels_of(
  module: Any,
  *example_args: Any,
  types: tuple[type, ...],
  leaf_names: Iterable[str] = ("kernel",),
  **example_kwargs: Any,
) -> Rule:
  """The leaves named ``leaf_names`` of every submodule that is an instance of ``types``.

  Args:
    module: the plain Flax model (Linen or NNX, or its ``dcil_jax`` adapter).
    example_args: for Linen, an input for ``module.init`` (e.g. ``images[:1]``); only its
      shape matters. NNX modules need none.
    types: module classes whose parameters to prune (subclasses count).
    leaf_names: which of their parameters (default: ``kernel``, never ``bias``).

  Returns:
    A rule ``(key_path, leaf) -> bool``.
  """
  return _module_rule(module_types(module, *example_args, **example_kwargs), types, leaf_names)


def conv_kernels(module: Any, *example_args: Any, **example_kwargs: Any) -> Rule:
  """Kernels of every convolution (``nn.Conv``, ``ConvTranspose``, ``ConvLocal``, ``nnx.Conv``,
  ``nnx.ConvTranspose``): the official rule of DCIL and DPF (first conv and 1x1 shortcuts
  included; heads, BatchNorm, biases dense)."""
  return kernels_of(module, *example_args, types=CONV_TYPES, **example_kwargs)


def dense_kernels(module: Any, *example_args: Any, **example_kwargs: Any) -> Rule:
  """Kernels of every ``nn.Dense``, ``DenseGeneral``, ``Einsum`` (and NNX ``Linear``,
  ``LinearGeneral``, ``Einsum``): e.g. a ViT's projections and MLPs; the classifier head too
  (exclude it with your own rule if it should stay dense)."""
  return kernels_of(module, *example_args, types=DENSE_TYPES, **example_kwargs)


def conv_and_dense_kernels(module: Any, *example_args: Any, **example_kwargs: Any) -> Rule:
  """Kernels of every convolution and every dense layer."""
  return kernels_of(module, *example_args, types=CONV_TYPES + DENSE_TYPES, **example_kwargs)


def all_kernels(key_path: KeyPath, leaf: Any) -> bool:
  """Every leaf named ``kernel``, whatever its module (needs no model)."""
  del leaf
  keys = key_names(key_path)
  return bool(keys) and keys[-1] == "kernel"
