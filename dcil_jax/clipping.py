"""A gradient clip that scales with the learning rate: the optimizer half of robust DCIL.

At a high learning rate, a model without BatchNorm trains near the edge of stability; DCIL's
distillation onset raises the loss's sharpness there and the step runs away (docs/method.md,
"When DCIL is unstable"). Bounding the *step* ``learning_rate · ‖g‖`` rather than the gradient
prevents that, and leaves a run at a small learning rate (or after the decay) unclipped: a fixed
``optax.clip_by_global_norm`` that rescues the high rate also slows the low one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

__all__ = ["ClipStepNormState", "clip_step_norm"]


class ClipStepNormState(NamedTuple):
  """The optimizer step count, to evaluate the learning-rate schedule at."""

  count: jax.Array


def clip_step_norm(
  max_step: float, learning_rate: float | optax.Schedule
) -> optax.GradientTransformation:
  """Clips the gradient's global norm to ``max_step / learning_rate(count)``.

  Chain it before the optimizer, with the optimizer's own learning rate (schedule): the plain
  SGD step ``learning_rate · ‖g‖`` then never exceeds ``max_step``. At a constant learning rate
  ``lr`` it is ``optax.clip_by_global_norm(max_step / lr)``; under a schedule the bound loosens
  as the rate decays. ``max_step`` is a numeric hyperparameter, so
  ``optax.inject_hyperparams(clip_step_norm, static_args="learning_rate")`` can set it per run.

  Args:
    max_step: the largest global norm of ``learning_rate · g`` (> 0).
    learning_rate: the optimizer's learning rate, a number or a schedule ``count -> rate``.

  Returns:
    An ``optax.GradientTransformation`` with a :class:`ClipStepNormState`.
  """
  if not callable(learning_rate) and not learning_rate > 0:
    raise ValueError(f"clip_step_norm needs a learning rate > 0, got {learning_rate!r}.")

  def init_fn(params: optax.Params) -> ClipStepNormState:
    del params
    return ClipStepNormState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    rate = learning_rate(state.count) if callable(learning_rate) else learning_rate
    max_norm = jnp.asarray(max_step, jnp.float32) / jnp.asarray(rate, jnp.float32)
    g_norm = optax.tree.norm(updates)
    # A rate of 0 (or a zero gradient) gives an infinite bound: nothing is clipped.
    factor = jnp.where(g_norm > max_norm, max_norm / g_norm, 1.0)
    clipped = jax.tree.map(lambda u: (u * factor).astype(u.dtype), updates)
    return clipped, ClipStepNormState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)
