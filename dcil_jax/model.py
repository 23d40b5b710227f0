"""How dcil_jax calls a plain Flax model: one small adapter, so nothing DCIL-specific goes inside
the model.

The library needs three things from a model: apply it in train mode (updating its mutable
collections, e.g. BatchNorm statistics), apply it in eval mode, and say which flag switches the
two. Linen models say it in many ways (``train=True``, ``deterministic=False``, ``training=``,
or no flag at all); :func:`as_model` reads it from ``__call__``'s signature, and ``mode=`` names
any other flag.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn

ModeFn = Callable[[bool], dict[str, Any]]

# Flags people use for "training mode", and whether True means training.
_KNOWN_FLAGS = (
  ("train", True),
  ("training", True),
  ("is_training", True),
  ("deterministic", False),
)


def _flag(name: str, means_train: bool) -> ModeFn:
  return lambda train: {name: train if means_train else not train}


def _no_flag(train: bool) -> dict[str, Any]:
  del train
  return {}


def detect_mode(module: nn.Module) -> ModeFn:
  """The keyword that puts ``module`` in train/eval mode, from its ``__call__`` signature.

  Raises:
    TypeError: the signature has no known flag but requires other arguments, or takes
      ``**kwargs`` (then the flag cannot be read off it): pass ``mode=``.
  """
  params = list(inspect.signature(type(module).__call__).parameters.values())[1:]  # no self
  names = {p.name for p in params}
  for name, means_train in _KNOWN_FLAGS:
    if name in names:
      return _flag(name, means_train)
  required = [
    p.name
    for p in params[1:]  # the first is the input
    if p.default is inspect.Parameter.empty
    and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
  ]
  if required or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
    raise TypeError(
      f"{type(module).__name__}.__call__ takes no train/training/deterministic flag "
      f"({', '.join(p.name for p in params)}): say how to select train and eval mode, e.g. "
      "dcil_jax.as_model(model, mode=lambda train: {'use_dropout': train})."
    )
  return _no_flag  # a model without a mode (no BatchNorm, no dropout) runs the same in both


@dataclasses.dataclass(frozen=True)
class FlaxModel:
  """A Flax model as dcil_jax calls it.

  Attributes:
    apply_fn: ``module.apply`` (or any function with its signature).
    mode: ``train -> keyword arguments`` that select train or eval mode.
    module: the Linen module, when known (used to find its convolutions).
  """

  apply_fn: Callable[..., Any]
  mode: ModeFn
  module: nn.Module | None = None

  def apply_train(self, variables: dict, x: Any, rngs: Any = None) -> tuple[Any, dict | None]:
    """Train mode; returns ``(outputs, updated mutable collections)`` (``None`` if none)."""
    mutable = [name for name in variables if name != "params"]
    kwargs = self.mode(True)
    if not mutable:
      return self.apply_fn(variables, x, rngs=rngs, **kwargs), None
    outputs, updated = self.apply_fn(variables, x, rngs=rngs, mutable=mutable, **kwargs)
    # A collection the model never writes comes back unchanged; keep every one of them.
    return outputs, {name: updated.get(name, variables[name]) for name in mutable}

  def apply_eval(self, variables: dict, x: Any) -> Any:
    """Eval mode (running statistics, no dropout)."""
    return self.apply_fn(variables, x, **self.mode(False))


def as_model(model: Any, mode: ModeFn | None = None) -> FlaxModel:
  """A :class:`FlaxModel` from a Linen module, its bound ``apply``, or a :class:`FlaxModel`.

  Args:
    model: ``nn.Module``, ``module.apply``, or a :class:`FlaxModel` (returned as it is, unless
      ``mode`` is given).
    mode: ``train -> kwargs`` for a model whose flag is not ``train``/``training``/
      ``is_training``/``deterministic`` (default: read from ``__call__``'s signature).
  """
  if isinstance(model, FlaxModel):
    return model if mode is None else dataclasses.replace(model, mode=mode)
  module = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
  if isinstance(module, nn.Module):
    return FlaxModel(module.apply, mode or detect_mode(module), module)
  if callable(model):
    return FlaxModel(model, mode or _flag("train", True), None)
  raise TypeError(f"Expected a Flax module or its apply function, got {type(model).__name__}.")
