"""Runnable experiments built only on the public dcil_jax API (see ``experiments.quickstart``)."""
