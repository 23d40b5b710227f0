"""Benchmarks for dcil_jax (run as modules, e.g. ``python -m benchmarks.step_time``)."""
