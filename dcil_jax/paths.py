"""The forward paths of DCIL (and DPF's single path): the parameter layout and how the path
axis executes.

A **lifted** params tree is a plain dict of the model's own sub-trees, split by role:

- ``"prunable"``: the prunable kernels (masked; both paths use them),
- ``"sparse"`` / ``"dense"``: each path's own copy of every other leaf (BatchNorm scale and
  bias, heads, biases; the official code keeps them per path),
- ``"shared"``: non-prunable leaves both paths share (only in the ``share_non_prunable``
  ablation).

Every leaf keeps the **shape and the name** (last key) it has in the plain model, so an optax
chain that keys on shapes or names (``optax.masked`` by ``ndim``, ``multi_transform`` labels from
``flax.traverse_util.path_aware_map``, Muon's 2-D rule) treats a DCIL state as it treats the
plain model. The model state (BatchNorm statistics and any other mutable collection) is lifted
to ``{"sparse": ..., "dense": ...}``: each path normalises its own activations.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, PartitionSpec

SPARSE, DENSE = 0, 1
NUM_PATHS = 2
PATH_NAMES = ("sparse", "dense")
PRUNABLE, SHARED = "prunable", "shared"
LAYOUT_KEYS = frozenset({PRUNABLE, SHARED, *PATH_NAMES})
# "sequential" picks one of its two forms by backend (see `sequential_loop`); each can be named.
SEQUENTIAL = ("sequential", "sequential_loop", "sequential_unrolled")
STRATEGIES = ("vmap", "unrolled", "sharded", *SEQUENTIAL)
PATH_AXIS = "path"


def is_lifted(tree: Any) -> bool:
  """Whether ``tree`` is a lifted params tree (a dict with ``"prunable"`` and layout keys only)."""
  return isinstance(tree, Mapping) and PRUNABLE in tree and set(tree) <= LAYOUT_KEYS


def _as_dict(tree: Any) -> dict:
  if not isinstance(tree, Mapping):
    raise TypeError(
      f"dcil_jax lifts Flax params and variable collections (nested dicts); got "
      f"{type(tree).__name__}."
    )
  return {k: _as_dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}


def partition(tree: Any, select: Callable[[tuple, Any], bool]) -> tuple[dict, dict]:
  """Splits a nested dict into ``(selected, rest)``, two nested dicts with no empty sub-dicts.

  ``select(key_path, leaf)`` sees ``jax.tree_util`` key paths (``DictKey``s).
  """

  def split(node, path):
    picked, rest = {}, {}
    for key, value in node.items():
      sub = (*path, jax.tree_util.DictKey(key))
      if isinstance(value, dict):
        a, b = split(value, sub)
        if a:
          picked[key] = a
        if b:
          rest[key] = b
      elif select(sub, value):
        picked[key] = value
      else:
        rest[key] = value
    return picked, rest

  return split(_as_dict(tree), ())


def merge(*trees: Any) -> dict:
  """The union of nested dicts with disjoint leaves (the inverse of :func:`partition`)."""
  out: dict = {}
  for tree in trees:
    for key, value in (tree or {}).items():
      if isinstance(value, Mapping) and isinstance(out.get(key), dict):
        out[key] = merge(out[key], value)
      elif key in out:
        raise ValueError(f"Leaf {key!r} is in more than one part of a lifted tree.")
      else:
        out[key] = _as_dict(value) if isinstance(value, Mapping) else value
  return out


def split_params(
  params: Any,
  prunable: Callable[[tuple, Any], bool],
  *,
  path_names: Sequence[str] = PATH_NAMES,
  share_non_prunable: bool = False,
) -> dict:
  """A plain params tree in the lifted layout (see the module docstring).

  Args:
    params: the plain Flax params.
    prunable: the rule that says which leaves are pruned (``(key_path, leaf) -> bool``).
    path_names: the paths that get their own copy of the other leaves (``("sparse",)`` for DPF).
    share_non_prunable: DCIL ablation: one copy of the other leaves for both paths
      (``"shared"``); their gradient is then the sum of both paths'.

  Returns:
    ``{"prunable": ..., "sparse": ..., ...}``; parts without leaves are left out, except
    ``"prunable"``.
  """
  kernels, rest = partition(params, prunable)
  if not kernels:
    raise ValueError(
      "The prunable rule selects no parameter: nothing would be pruned. See dcil_jax.rules "
      "(conv_kernels(model, x) is the official rule) or write your own."
    )
  lifted: dict = {PRUNABLE: kernels}
  if rest:
    if share_non_prunable:
      lifted[SHARED] = rest
    else:
      # Distinct buffers per path: the state is donated, and both copies are updated.
      lifted |= {name: jax.tree.map(jnp.array, rest) for name in path_names}
  return lifted


def split_collections(collections: Any, path_names: Sequence[str] = PATH_NAMES) -> dict | None:
  """The model state (every collection but ``params``), one copy per path (``None`` if empty)."""
  if not collections:
    return None
  return {name: jax.tree.map(jnp.array, _as_dict(collections)) for name in path_names}


def path_params(lifted: dict, name: str, kernels: Any | None = None) -> dict:
  """The plain params of one path: its own leaves, the shared ones and the (transformed)
  prunable ``kernels`` (default: ``lifted["prunable"]`` as they are)."""
  prunable = lifted[PRUNABLE] if kernels is None else kernels
  return merge(prunable, lifted.get(SHARED), lifted.get(name))


def path_mesh(devices: Any = None) -> Mesh:
  """A 1-D mesh with a ``path`` axis of size 2, for ``strategy="sharded"``."""
  devices = jax.devices() if devices is None else list(devices)
  if len(devices) < NUM_PATHS:
    raise ValueError(
      f'strategy="sharded" needs at least {NUM_PATHS} devices, found {len(devices)}.'
    )
  return jax.make_mesh(
    (NUM_PATHS,), (PATH_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:NUM_PATHS]
  )


def default_strategy(backend: str | None = None) -> str:
  """How to run the path axis when the caller does not say: ``"sequential"`` on accelerators,
  ``"unrolled"`` on CPU.

  ``"sequential"`` needs about the step memory of dense training, where ``"unrolled"`` keeps
  both paths' activations alive (about twice as much), so on an accelerator, where memory
  bounds the batch, it fits about twice unrolled's per-device batch. It costs some step time
  (with distillation on, one extra forward of the dense path). On CPU host memory rarely
  binds, so unrolled stays the default there. ``vmap`` turns the per-path kernels into grouped
  convolutions, which XLA:CPU runs far slower than a dense step; on several devices
  ``"sharded"`` runs one path per device. The measurements (CPU; GPU/TPU times are not
  measured in this project yet): ``benchmarks/results/step_time_cpu.md`` and
  ``benchmarks/results/notes_cpu.md``.

  Args:
    backend: the JAX backend to choose for (default ``jax.default_backend()``).

  Returns:
    A name in :data:`STRATEGIES`.
  """
  backend = jax.default_backend() if backend is None else backend
  return "unrolled" if backend == "cpu" else "sequential"


def sequential_loop(strategy: str = "sequential", backend: str | None = None) -> bool:
  """Whether a sequential strategy runs its two paths as a ``lax.scan`` (else unrolled).

  Both forms give the same values and gradients and run one path's forward and backward after
  the other. The loop is the form for accelerators: a loop body is a computation of its own,
  so no buffer of the second path can be allocated while the first path's activations are
  alive. Unrolled, XLA:CPU creates operand-free buffers at the start of the step, e.g. a
  max-pool gradient's index arrays, so on CPU the unrolled stages build those from the incoming
  gradient (:mod:`dcil_jax.pool_gradient`). XLA:CPU, though, runs gradient convolutions inside
  a loop body many times slower than in the entry computation (the forward ones barely slower),
  so on CPU ``"sequential"`` runs unrolled. ``"sequential_loop"`` / ``"sequential_unrolled"``
  choose. Memory of each form and the conv-in-a-loop microbenchmark:
  ``benchmarks/results/step_time_cpu.md``, ``benchmarks/results/notes_cpu.md``.
  """
  if strategy not in SEQUENTIAL:
    raise ValueError(f"{strategy!r} is not one of the sequential strategies {SEQUENTIAL}.")
  if strategy != "sequential":
    return strategy == "sequential_loop"
  return (jax.default_backend() if backend is None else backend) != "cpu"


def stack_paths(*trees: Any) -> Any:
  """Trees of the same structure stacked leaf by leaf along a new leading path axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def map_paths(
  fn: Callable[..., Any],
  per_path_args: Sequence[tuple[Any, ...]],
  shared_args: tuple[Any, ...] = (),
  *,
  strategy: str = "unrolled",
  mesh: Mesh | None = None,
) -> list[Any]:
  """``fn`` applied to each path: a mapped axis whose execution is a choice.

  All strategies compute the same function.

  Args:
    fn: ``fn(path_index, *this_paths_args, *shared_args)``; ``path_index`` is a Python int for
      ``"unrolled"`` and a traced int otherwise.
    per_path_args: one tuple of pytrees per path (sparse first); the tuples have the same
      structure.
    shared_args: pytrees used unchanged by every path (e.g. the input batch).
    strategy: ``"unrolled"`` — ``fn`` called once per path; ``"vmap"`` — one ``jax.vmap``
      over the stacked paths; ``"sharded"`` — ``jax.shard_map`` over the ``path`` axis of
      ``mesh``, so each device runs one path with ordinary convolutions; ``"sequential"`` —
      ``fn`` called once per path, each path's inputs behind an ``optimization_barrier`` with
      the previous path's outputs, so XLA runs the paths one after the other. (Under
      ``jax.grad`` the backward passes still wait for both forwards; the memory saving of
      DCIL's ``"sequential"`` comes from :func:`dcil_jax.dcil_loss`, which also splits the
      loss per path.)
    mesh: a mesh with a ``path`` axis of size 2 (``strategy="sharded"`` only).

  Returns:
    ``fn``'s output for each path, in path order.
  """
  n = len(per_path_args)
  if strategy == "unrolled":
    return [fn(i, *args, *shared_args) for i, args in enumerate(per_path_args)]
  if strategy in SEQUENTIAL:
    out: list[Any] = []
    for i, args in enumerate(per_path_args):
      shared = shared_args
      if out:  # this path's inputs exist only once the previous path's outputs do
        _, args, shared = jax.lax.optimization_barrier((out[-1], args, shared_args))
      out.append(fn(i, *args, *shared))
    return out
  if strategy not in STRATEGIES:
    raise ValueError(f"Unknown path strategy {strategy!r}; expected one of {STRATEGIES}.")
  stacked = (jnp.arange(n), *stack_paths(*per_path_args))
  if strategy == "vmap":
    in_axes = (0,) * len(stacked) + (None,) * len(shared_args)
    out = jax.vmap(fn, in_axes=in_axes)(*stacked, *shared_args)
  else:
    if mesh is None or mesh.shape.get(PATH_AXIS) != n:
      raise ValueError(
        f'strategy="sharded" needs a mesh with a "{PATH_AXIS}" axis of size {n} '
        "(see dcil_jax.path_mesh)."
      )

    # shard_map, not vmap + sharding constraints: under GSPMD the vmapped convolutions stay
    # grouped, while here each device applies `fn` to its own path with ordinary convolutions.
    def one_path(*args):
      own = jax.tree.map(lambda x: x[0], args[: len(stacked)])
      result = fn(*own, *args[len(stacked) :])
      return jax.tree.map(lambda x: x[None], result)

    # Only the path axis is manual: a ``data`` axis of the same mesh stays automatic, so the
    # batch stays split over it and BatchNorm still reduces over the global batch.
    on_path, replicated = PartitionSpec(PATH_AXIS), PartitionSpec()
    out = jax.shard_map(
      one_path,
      mesh=mesh,
      in_specs=(on_path,) * len(stacked) + (replicated,) * len(shared_args),
      out_specs=on_path,
      axis_names={PATH_AXIS},
    )(*stacked, *shared_args)
  return [jax.tree.map(lambda x, i=i: x[i], out) for i in range(n)]
