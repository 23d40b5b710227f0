"""The two forward paths of DCIL: the dual-path parameter tree and how the path axis executes.

A dual-path tree is the model's own tree in which every leaf that is not a shared (prunable)
kernel is boxed in :class:`PerPath` and stacked on a leading axis of size 2: index 0 belongs to
the sparse path (``W⊙M``), index 1 to the dense path (``W``). Nothing in the model changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import AxisType, Mesh, PartitionSpec

SPARSE, DENSE = 0, 1
NUM_PATHS = 2
STRATEGIES = ("vmap", "unrolled", "sharded")
PATH_AXIS = "path"


@struct.dataclass
class PerPath:
  """A leaf that exists once per forward path, stacked on axis 0 (0 = sparse, 1 = dense).

  DCIL shares the prunable kernels between the paths but keeps separate BatchNorm parameters,
  statistics and heads. Boxing those leaves makes a dual-path tree self-describing: they are
  never prunable, whatever their shape.
  """

  value: Any


def is_per_path(x: Any) -> bool:
  return isinstance(x, PerPath)


def to_dual_path(
  params: Any, masks: Any, batch_stats: Any = None, *, share_non_prunable: bool = False
) -> tuple[Any, Any]:
  """Lifts a plain model's params and BN statistics into the dual-path layout.

  Args:
    params: the plain Flax params tree.
    masks: a masks tree for ``params``; leaves with a mask stay shared, every other leaf
      (BatchNorm scale/bias, heads, biases) is copied once per path.
    batch_stats: the plain BN statistics (or ``None``); every leaf is copied once per path.
    share_non_prunable: ablation — share BatchNorm parameters and heads between the paths too
      (their gradient is then the sum of both paths'). BN statistics stay per path: each path
      normalises its own activations.

  Returns:
    ``(dual_params, dual_batch_stats)``.
  """
  stack = lambda x: PerPath(jnp.stack([x] * NUM_PATHS))  # noqa: E731
  if not share_non_prunable:
    params = jax.tree.map(
      lambda m, p: stack(p) if m is None else p, masks, params, is_leaf=lambda x: x is None
    )
  return params, jax.tree.map(stack, batch_stats)


def select_path(tree: Any, path: int) -> Any:
  """Unboxes every :class:`PerPath` leaf at ``path``; shared leaves are returned as they are."""
  return jax.tree.map(lambda x: x.value[path] if is_per_path(x) else x, tree, is_leaf=is_per_path)


def unbox(tree: Any) -> Any:
  """Replaces every :class:`PerPath` box by its stacked value."""
  return jax.tree.map(lambda x: x.value if is_per_path(x) else x, tree, is_leaf=is_per_path)


def box(tree: Any) -> Any:
  """Boxes every leaf of a stacked tree as :class:`PerPath`."""
  return jax.tree.map(PerPath, tree)


def split_per_path(tree: Any) -> tuple[Any, Any]:
  """``(own, shared)``: the stacked values of the :class:`PerPath` leaves (``None`` elsewhere),
  and the shared leaves (``None`` where a leaf is per path)."""
  own = jax.tree.map(lambda x: x.value if is_per_path(x) else None, tree, is_leaf=is_per_path)
  shared = jax.tree.map(lambda x: None if is_per_path(x) else x, tree, is_leaf=is_per_path)
  return own, shared


def merge_per_path(own: Any, shared: Any) -> Any:
  """Inverse of :func:`split_per_path` for one path: its own leaves where it has them."""
  return jax.tree.map(lambda o, s: s if o is None else o, own, shared, is_leaf=lambda x: x is None)


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
  """How to run the path axis when the caller does not say: ``"unrolled"``.

  Measured on CPU (``benchmarks/results/step_time_cpu.md``): unrolled costs 1.6-1.9x a dense
  step, while ``vmap`` turns the per-path kernels into grouped convolutions and costs 10-19x.
  GPU/TPU are not measured here yet; unrolled runs two ordinary applies, the floor of the method
  on one device. On several devices ``"sharded"`` runs one path per device.
  """
  del backend
  return "unrolled"


def map_paths(
  fn: Callable[..., Any],
  per_path_args: tuple[Any, ...],
  shared_args: tuple[Any, ...] = (),
  *,
  strategy: str = "unrolled",
  mesh: Mesh | None = None,
) -> Any:
  """``fn`` applied to each path: a mapped axis whose execution is a choice.

  All strategies compute the same function; outputs are stacked on a leading path axis.

  Args:
    fn: ``fn(*per_path_slices, *shared_args)`` for one path.
    per_path_args: pytrees whose leaves all have a leading axis of size 2.
    shared_args: pytrees used unchanged by both paths (e.g. the input batch).
    strategy: ``"vmap"`` — one ``jax.vmap`` over the path axis; ``"unrolled"`` — ``fn`` called
      once per path; ``"sharded"`` — ``jax.shard_map`` over the ``path`` axis of ``mesh``, so
      each device runs one path with ordinary convolutions.
    mesh: a mesh with a ``path`` axis of size 2 (``strategy="sharded"`` only).

  Returns:
    ``fn``'s outputs stacked on axis 0.
  """
  if strategy == "unrolled":
    outs = [
      fn(*jax.tree.map(lambda x, i=i: x[i], per_path_args), *shared_args) for i in range(NUM_PATHS)
    ]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)
  if strategy == "vmap":
    in_axes = (0,) * len(per_path_args) + (None,) * len(shared_args)
    return jax.vmap(fn, in_axes=in_axes)(*per_path_args, *shared_args)
  if strategy == "sharded":
    if mesh is None or mesh.shape.get(PATH_AXIS) != NUM_PATHS:
      raise ValueError(
        f'strategy="sharded" needs a mesh with a "{PATH_AXIS}" axis of size {NUM_PATHS} '
        "(see dcil_jax.path_mesh)."
      )

    # shard_map, not vmap + sharding constraints: under GSPMD the vmapped convolutions stay
    # grouped, while here each device applies `fn` to its own path with ordinary convolutions.
    def one_path(*args):
      own = jax.tree.map(lambda x: x[0], args[: len(per_path_args)])
      out = fn(*own, *args[len(per_path_args) :])
      return jax.tree.map(lambda x: x[None], out)

    # Only the path axis is manual: a ``data`` axis of the same mesh stays automatic, so the
    # batch stays split over it and BatchNorm still reduces over the global batch.
    on_path, replicated = PartitionSpec(PATH_AXIS), PartitionSpec()
    return jax.shard_map(
      one_path,
      mesh=mesh,
      in_specs=(on_path,) * len(per_path_args) + (replicated,) * len(shared_args),
      out_specs=on_path,
      axis_names={PATH_AXIS},
    )(*per_path_args, *shared_args)
  raise ValueError(f"Unknown path strategy {strategy!r}; expected one of {STRATEGIES}.")
