"""Compressed files of unstructured or N:M sparse models; now in :mod:`dcil_jax.deploy.compression`
(this module keeps the old import path working)."""

from dcil_jax.deploy.compression import (
  FORMAT,
  compress,
  flatten_variables,
  load_compressed,
  save_compressed,
  unflatten_variables,
)

__all__ = [
  "FORMAT",
  "compress",
  "flatten_variables",
  "load_compressed",
  "save_compressed",
  "unflatten_variables",
]
