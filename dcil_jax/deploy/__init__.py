"""Deployment of a pruned model: compact it, export it, count it, compress it.

- :func:`compact`: a filter-pruned model as a smaller program with equal logits, for any model
  (traced; :mod:`dcil_jax.deploy.compaction`).
- :func:`export`, :func:`save_compact`, :func:`to_stablehlo`, :func:`to_onnx`: StableHLO and
  ONNX files that load without ``dcil_jax`` (:mod:`dcil_jax.deploy.files`).
- :func:`deploy_stats`, :func:`layer_stats`: kept parameters and MACs (:mod:`.stats`).
- :func:`group_allocation`: the coupled channel groups of a model, traced once, so that
  ``masked_update(..., granularity="filter", allocation=...)`` trains with filter masks that
  compaction removes (optionally where they save MACs); :func:`cost_aware_filter_masks`: the
  same masks once (:mod:`dcil_jax.deploy.allocation`).
- :func:`compress`, :func:`save_compressed`, :func:`load_compressed`: bit-packed masks plus kept
  values for unstructured or N:M sparsity (:mod:`dcil_jax.deploy.compression`).
"""

from dcil_jax.deploy.allocation import (
  ChannelGroup,
  GroupAllocation,
  channel_groups,
  cost_aware_filter_masks,
  group_allocation,
)
from dcil_jax.deploy.compaction import Compacted, CompactModel, compact, plain_masks
from dcil_jax.deploy.compression import compress, load_compressed, save_compressed
from dcil_jax.deploy.files import export, masked_function, save_compact, to_stablehlo
from dcil_jax.deploy.onnx_export import to_onnx
from dcil_jax.deploy.stats import deploy_stats, layer_stats

__all__ = [
  "ChannelGroup",
  "CompactModel",
  "GroupAllocation",
  "group_allocation",
  "channel_groups",
  "cost_aware_filter_masks",
  "Compacted",
  "compact",
  "compress",
  "deploy_stats",
  "export",
  "layer_stats",
  "load_compressed",
  "masked_function",
  "plain_masks",
  "save_compact",
  "save_compressed",
  "to_onnx",
  "to_stablehlo",
]
