"""Compaction of filter-pruned models; now in :mod:`dcil_jax.deploy` (this module keeps the old
import path working)."""

from dcil_jax.deploy.compaction import Compacted, CompactModel, compact, plain_masks
from dcil_jax.deploy.files import save_compact

__all__ = ["CompactModel", "Compacted", "compact", "plain_masks", "save_compact"]
