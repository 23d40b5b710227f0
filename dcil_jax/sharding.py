"""Data parallelism (and DCIL's path parallelism) with ``jax.jit`` on a device mesh, not ``pmap``.

The global batch is split over a ``data`` axis; params, optimizer state and masks are replicated.
XLA then computes BatchNorm statistics, the loss and the gradients over the *global* batch, and
the mask refresh's global threshold from the same replicated weights, so every device holds the
same masks and the step equals a one-device step on the whole batch. An optional ``path`` axis of
size 2 (next to ``data``) puts DCIL's sparse and dense path on different devices
(``strategy="sharded"``): each device then runs ordinary convolutions for one path on its share
of the batch. Works unchanged on many hosts: every process feeds its own slice of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from dcil_jax.paths import NUM_PATHS, PATH_AXIS

__all__ = [
  "DATA_AXIS",
  "batch_sharding",
  "constrain_batch",
  "constrain_state",
  "data_parallelism",
  "has_axis",
  "make_mesh",
  "place_state",
  "shard_batch",
  "state_shardings",
]

DATA_AXIS = "data"


def make_mesh(*, path_parallel: bool = False, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh over all (global) devices: ``("data",)``, or ``("data", "path")`` with a path axis of 2.

  Args:
    path_parallel: add a ``path`` axis of size 2, so that DCIL runs one path per device
      (``TrainState.create(..., strategy="sharded")``); ``data`` gets the other factor.
    devices: the devices to use (default: ``jax.devices()``, every process's).

  Returns:
    A mesh whose axes are all of type ``Auto`` (XLA partitions everything not in a
    ``shard_map``).
  """
  devices = jax.devices() if devices is None else list(devices)
  if not path_parallel:
    return jax.make_mesh(
      (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )
  if len(devices) % NUM_PATHS:
    raise ValueError(
      f"A path-parallel mesh needs an even number of devices (one path per device of each "
      f"pair); got {len(devices)}."
    )
  return jax.make_mesh(
    (len(devices) // NUM_PATHS, NUM_PATHS),
    (DATA_AXIS, PATH_AXIS),
    axis_types=(AxisType.Auto,) * 2,
    devices=devices,
  )


def has_axis(mesh: Mesh | None, axis: str) -> bool:
  return mesh is not None and axis in mesh.axis_names


def data_parallelism(mesh: Mesh | None) -> int:
  """How many ways the batch is split (1 without a mesh or without a ``data`` axis)."""
  return mesh.shape[DATA_AXIS] if has_axis(mesh, DATA_AXIS) else 1


def state_shardings(tree: Any, mesh: Mesh) -> Any:
  """Shardings for a state: every leaf replicated (over ``data`` and ``path``: every device holds
  the whole model; each path's own leaves are small, and a ``path`` device slices its copy out
  locally)."""
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(lambda _: replicated, tree)


def place_state(tree: Any, mesh: Mesh) -> Any:
  """Puts a state on ``mesh`` with :func:`state_shardings`, the shardings every step returns
  (placing it this way up front spares a second compilation)."""
  return jax.device_put(tree, state_shardings(tree, mesh))


def constrain_state(tree: Any, mesh: Mesh) -> Any:
  """Inside ``jit``: keep a state on :func:`state_shardings` (XLA could pick others)."""
  return jax.lax.with_sharding_constraint(tree, state_shardings(tree, mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``; replicated over ``path``."""
  spec = PartitionSpec(DATA_AXIS) if has_axis(mesh, DATA_AXIS) else PartitionSpec()
  return NamedSharding(mesh, spec)


def constrain_batch(batch: Any, mesh: Mesh) -> Any:
  """Inside ``jit``: the batch split over ``data`` (a no-op for a batch placed that way)."""
  return jax.lax.with_sharding_constraint(batch, batch_sharding(mesh))


def shard_batch(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Global arrays from this process's slice of the batch (the whole batch on one host).

  Every process passes ``global_batch / jax.process_count()`` examples; together they form
  one global batch split over the ``data`` axis.
  """
  sharding = batch_sharding(mesh)
  return {
    key: jax.make_array_from_process_local_data(sharding, np.asarray(value))
    for key, value in local_batch.items()
  }
