"""Sparsity schedules: plain callables ``step -> sparsity``, like optax schedules."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from dcil_jax.masks import check_sparsity

SparsitySchedule = Callable[[jnp.ndarray], jnp.ndarray]


def constant_sparsity(sparsity: float) -> SparsitySchedule:
  """The same sparsity at every step."""
  check_sparsity(sparsity)
  return lambda step: jnp.asarray(sparsity, jnp.float32)


def cubic_sparsity(
  final_sparsity: float,
  ramp_steps: int,
  *,
  initial_sparsity: float = 0.0,
  begin_step: int = 0,
  steps_per_stage: int = 1,
) -> SparsitySchedule:
  """The cubic ramp of Zhu & Gupta (2017): ``s_f + (s_i - s_f) (1 - t/T)^3``, then ``s_f``.

  With ``initial_sparsity = 0`` this is ``s_f - s_f (1 - t/T)^3``, the schedule of DPF and DCIL.

  Args:
    final_sparsity: ``s_f`` in [0, 1), reached at ``begin_step + ramp_steps`` and kept.
    ramp_steps: ``T``, the length of the ramp in steps (> 0).
    initial_sparsity: ``s_i`` in [0, 1), the sparsity up to ``begin_step``.
    begin_step: the step at which the ramp starts.
    steps_per_stage: evaluate the ramp only at multiples of this many steps. The official code
      evaluates it at the integer epoch: pass ``steps_per_stage=steps_per_epoch`` and
      ``ramp_steps=ramp_epochs * steps_per_epoch`` to match it exactly.

  Returns:
    A function from step (int or traced) to a float32 sparsity.
  """
  check_sparsity(final_sparsity)
  check_sparsity(initial_sparsity)
  if ramp_steps <= 0 or steps_per_stage <= 0 or begin_step < 0:
    raise ValueError(
      f"Need ramp_steps > 0, steps_per_stage > 0 and begin_step >= 0; got {ramp_steps}, "
      f"{steps_per_stage}, {begin_step}."
    )

  def schedule(step):
    t = jnp.asarray(step) - begin_step
    t = (t // steps_per_stage) * steps_per_stage
    frac = jnp.clip(t / ramp_steps, 0.0, 1.0)
    s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** 3
    return s.astype(jnp.float32)

  return schedule
