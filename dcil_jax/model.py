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
import jax
import jax.numpy as jnp
from flax import nnx

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


def as_model(model: Any, mode: ModeFn | None = None) -> FlaxModel | NNXModel:
  """A :class:`FlaxModel` from a Linen module, its bound ``apply``, or a :class:`FlaxModel`.

  Args:
    model: ``nn.Module``, ``module.apply``, or a :class:`FlaxModel` (returned as it is, unless
      ``mode`` is given).
    mode: ``train -> kwargs`` for a model whose flag is not ``train``/``training``/
      ``is_training``/``deterministic`` (default: read from ``__call__``'s signature).
  """
  if isinstance(model, NNXModel):
    return model
  if isinstance(model, nnx.Module):
    raise TypeError(
      "An NNX module: use `model, variables = dcil_jax.from_nnx(module)` and pass that pair."
    )
  if isinstance(model, FlaxModel):
    return model if mode is None else dataclasses.replace(model, mode=mode)
  module = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
  if isinstance(module, nn.Module):
    return FlaxModel(module.apply, mode or detect_mode(module), module)
  if callable(model):
    return FlaxModel(model, mode or _flag("train", True), None)
  raise TypeError(f"Expected a Flax module or its apply function, got {type(model).__name__}.")


# --------------------------------------------------------------------------------------------
# Flax NNX models


def _rebuild(template: Any, pure: Any) -> Any:
  """An ``nnx.State`` like ``template`` (abstract) holding the arrays of the pure dict ``pure``."""
  state = jax.tree.map(lambda x: x, template)
  nnx.replace_by_pure_dict(state, pure)
  return state


@dataclasses.dataclass(frozen=True, eq=False)
class NNXModel:
  """A Flax NNX module as dcil_jax calls it: its graph and abstract state, applied functionally.

  The variables are plain nested dicts (``nnx.State.to_pure_dict``): ``"params"`` (every
  ``nnx.Param``), ``"batch_stats"`` (every ``nnx.BatchStat``) and ``"other"`` (any other
  variable type the model mutates). RNG streams are not variables here: every train step gives
  each stream a fresh key from the ``TrainState``'s rng (per path for DCIL), so two paths draw
  independent dropout masks, as two PyTorch forwards do.

  Attributes:
    graphdef: the module's graph (class, static attributes).
    templates: abstract ``(params, batch_stats, rng, other)`` states.
    rng_streams: ``(key path, stream tag)`` of every RNG key the model holds.
    module_paths: ``{module path: module type}``, to find convolutions without tracing.
  """

  graphdef: Any
  templates: tuple[Any, Any, Any, Any]
  rng_streams: tuple[tuple[tuple, str], ...]
  module_paths: dict

  module = None  # no Linen module: rules read `module_paths`

  @property
  def rng_tags(self) -> tuple[str, ...]:
    return tuple(sorted({tag for _, tag in self.rng_streams}))

  def _merge(self, variables: dict, rngs: Any) -> nnx.Module:
    params, stats, rng, other = self.templates
    keys = {}
    if rngs is None:  # eval: nothing draws; a fixed key keeps the module complete
      rngs = {tag: jax.random.PRNGKey(0) for _, tag in self.rng_streams}
    if self.rng_streams:
      missing = sorted({tag for _, tag in self.rng_streams} - set(rngs))
      if missing:
        raise ValueError(
          f"The NNX model draws from the rng streams {missing}: pass "
          f"TrainState.create(..., rng_names={self.rng_tags})."
        )
      for i, (path, tag) in enumerate(self.rng_streams):
        keys[path] = jax.random.wrap_key_data(jax.random.fold_in(rngs[tag], i))

    def rng_leaf(path, leaf):
      if tuple(path) in keys:
        return keys[tuple(path)]
      return jnp.zeros(leaf.shape, leaf.dtype)  # a count, or a key that eval never draws from

    pure_rng = jax.tree_util.tree_map_with_path(rng_leaf, nnx.to_pure_dict(rng))
    states = [
      _rebuild(params, variables["params"]),
      _rebuild(stats, variables.get("batch_stats", {})),
      _rebuild(rng, pure_rng),
      _rebuild(other, variables.get("other", {})),
    ]
    return nnx.merge(self.graphdef, *states)

  def apply_train(self, variables: dict, x: Any, rngs: Any = None) -> tuple[Any, dict | None]:
    model = self._merge(variables, rngs)
    model.train()
    outputs = model(x)
    _, _, stats, _, other = nnx.split(model, nnx.Param, nnx.BatchStat, nnx.RngState, ...)
    updated = {"batch_stats": nnx.to_pure_dict(stats), "other": nnx.to_pure_dict(other)}
    kept = {name: updated[name] for name in variables if name != "params"}
    return outputs, kept or None

  def apply_eval(self, variables: dict, x: Any) -> Any:
    model = self._merge(variables, None)
    model.eval()
    return model(x)


def from_nnx(module: nnx.Module) -> tuple[NNXModel, dict[str, Any]]:
  """An NNX module as ``(model, variables)``, the pair ``TrainState.create`` takes.

  The module itself is not changed (a clone is split).

  Raises:
    ValueError: the module has no ``nnx.Param``.
  """
  module = nnx.clone(module)
  module_paths = {tuple(str(k) for k in path): type(m) for path, m in nnx.iter_modules(module)}
  graphdef, params, stats, rng, other = nnx.split(
    module, nnx.Param, nnx.BatchStat, nnx.RngState, ...
  )
  if not jax.tree.leaves(params):
    raise ValueError(f"{type(module).__name__} has no nnx.Param: nothing to train or prune.")
  streams = []
  for path, var in jax.tree_util.tree_flatten_with_path(
    rng, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )[0]:
    if isinstance(var, nnx.RngKey):
      streams.append((tuple(path), str(var.tag)))
  templates = jax.eval_shape(lambda: (params, stats, rng, other))
  variables = {"params": nnx.to_pure_dict(params)}
  if jax.tree.leaves(stats):
    variables["batch_stats"] = nnx.to_pure_dict(stats)
  if jax.tree.leaves(other):
    variables["other"] = nnx.to_pure_dict(other)
  return NNXModel(graphdef, templates, tuple(streams), module_paths), variables


def to_nnx(model: NNXModel, variables: dict[str, Any]) -> nnx.Module:
  """A plain NNX module of the user's class holding ``variables`` (e.g. the exported sparse
  path), in eval mode."""
  module = model._merge(variables, None)
  module.eval()
  return module
