"""Kept parameters and MACs; now in :mod:`dcil_jax.deploy.stats` (this module keeps the old
import path working)."""

from dcil_jax.deploy.stats import deploy_stats, layer_stats

__all__ = ["deploy_stats", "layer_stats"]
