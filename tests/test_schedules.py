import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcil_jax


def test_cubic_matches_formula_and_holds_after_ramp():
  schedule = dcil_jax.cubic_sparsity(0.9, ramp_steps=100)
  for t in [0, 1, 37, 50, 99, 100, 101, 5000]:
    expected = 0.9 - 0.9 * (1 - min(t, 100) / 100) ** 3
    assert float(schedule(t)) == pytest.approx(expected, rel=1e-6, abs=1e-7)
  assert float(schedule(0)) == 0.0


def test_cubic_with_initial_sparsity_and_begin_step():
  schedule = dcil_jax.cubic_sparsity(0.8, ramp_steps=10, initial_sparsity=0.5, begin_step=20)
  assert float(schedule(0)) == pytest.approx(0.5)
  assert float(schedule(20)) == pytest.approx(0.5)
  assert float(schedule(25)) == pytest.approx(0.8 - 0.3 * 0.5**3)
  assert float(schedule(30)) == pytest.approx(0.8)


def test_cubic_stepped_per_epoch_matches_official():
  steps_per_epoch, ramp_epochs = 391, 225
  schedule = dcil_jax.cubic_sparsity(
    0.95, ramp_steps=ramp_epochs * steps_per_epoch, steps_per_stage=steps_per_epoch
  )
  for step in [0, 390, 391, 1000, 70 * 391 + 5, 224 * 391 + 390, 300 * 391]:
    epoch = min(step // steps_per_epoch, ramp_epochs)
    official = 0.95 - 0.95 * (1 - epoch / ramp_epochs) ** 3
    assert float(schedule(step)) == pytest.approx(official, rel=1e-6, abs=1e-7)


def test_schedules_are_jittable_and_monotone():
  schedule = dcil_jax.cubic_sparsity(0.95, ramp_steps=1000)
  values = jax.jit(jax.vmap(schedule))(jnp.arange(0, 1500, 10))
  assert np.all(np.diff(np.asarray(values)) >= 0)
  assert float(jax.jit(dcil_jax.constant_sparsity(0.3))(7)) == pytest.approx(0.3)


@pytest.mark.parametrize("bad", [-0.5, 1.0, 2.0])
def test_bad_sparsity_is_rejected(bad):
  with pytest.raises(ValueError, match="Sparsity must be"):
    dcil_jax.cubic_sparsity(bad, ramp_steps=10)
  with pytest.raises(ValueError, match="Sparsity must be"):
    dcil_jax.constant_sparsity(bad)


def test_bad_ramp_is_rejected():
  with pytest.raises(ValueError, match="ramp_steps"):
    dcil_jax.cubic_sparsity(0.9, ramp_steps=0)
