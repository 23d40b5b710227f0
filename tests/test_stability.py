"""Stability metrics on hand-made masks and curves, where every answer can be counted by hand."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcil_jax import refresh
from experiments import statistics

T, F = True, False


def masks(a, b):
  """Two prunable layers (4 and 6 entries) and an unpruned bias (None), like masks_like."""
  return {
    "conv0": {"kernel": jnp.array(a, bool).reshape(2, 2), "bias": None},
    "conv1": {"kernel": jnp.array(b, bool).reshape(2, 3)},
  }


OLD = masks([T, F, F, T], [T, T, F, F, F, T])
NEW = masks([T, T, F, F], [T, T, F, F, F, T])  # conv0: one revived, one pruned; conv1: same


def test_layer_flip_rates_count_changed_bits_per_layer():
  rates = refresh.layer_flip_rates(OLD, NEW)
  assert list(rates) == ["['conv0']['kernel']", "['conv1']['kernel']"]
  assert float(rates["['conv0']['kernel']"]) == pytest.approx(2 / 4)
  assert float(rates["['conv1']['kernel']"]) == 0.0


def test_revived_marks_pruned_then_kept_bits_only():
  revived = refresh.revived(OLD, NEW)
  np.testing.assert_array_equal(revived["conv0"]["kernel"], [[F, T], [F, F]])
  assert not revived["conv1"]["kernel"].any()
  assert revived["conv0"]["bias"] is None
  record = refresh.RefreshRecord.create(OLD).after(OLD, NEW)
  assert float(record.revived) == pytest.approx(1 / 10)
  assert float(record.flip_rate) == pytest.approx(2 / 10)


def test_the_refresh_record_remembers_every_weight_ever_revived_under_jit():
  third = masks([F, T, T, F], [F, T, T, F, F, T])  # revives conv0[2] and conv1[2]; conv0[1] kept
  update = jax.jit(lambda t, a, b: t.after(a, b))
  tracker = refresh.RefreshRecord.create(OLD, track_revivals=True)
  assert refresh.RefreshRecord.create(OLD).ever_revived_fraction is None  # not tracked
  tracker = update(tracker, OLD, NEW)
  assert float(tracker.ever_revived_fraction) == pytest.approx(1 / 10)
  tracker = update(tracker, NEW, third)
  assert float(tracker.revived) == pytest.approx(2 / 10)
  np.testing.assert_array_equal(tracker.ever_revived["conv0"]["kernel"], [[F, T], [T, F]])
  np.testing.assert_array_equal(tracker.ever_revived["conv1"]["kernel"], [[F, F, T], [F, F, F]])
  assert float(tracker.ever_revived_fraction) == pytest.approx(3 / 10)


def test_masks_of_different_shapes_are_refused():
  with pytest.raises(ValueError, match="same structure"):
    refresh.layer_flip_rates(OLD, masks([T, T, T, T], [T] * 6) | {"extra": jnp.ones(2, bool)})


def test_accuracy_variability_is_about_jumps_not_trends():
  flat = [0.5, 0.9, 0.9, 0.9, 0.9]
  rising = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]  # steady: every change is +0.1
  jumpy = [0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.9, 0.5]
  assert statistics.accuracy_variability(flat, 0.5)["step_std"] == 0.0
  steady = statistics.accuracy_variability(rising, 0.5)
  assert steady["step_std"] == pytest.approx(0.0, abs=1e-12) and steady["evals"] == 4
  assert steady["std"] == pytest.approx(np.std([0.5, 0.6, 0.7, 0.8]))
  window = statistics.accuracy_variability(jumpy, 0.5)  # last 4: 0.9 0.5 0.9 0.5
  assert window["step_std"] == pytest.approx(np.std([-0.4, 0.4, -0.4]))
  assert window["min"] == 0.5
  with pytest.raises(ValueError, match="at least 2"):
    statistics.accuracy_variability([0.9])


def test_largest_drop_finds_the_deepest_dip_after_warm_up():
  curve = [0.1, 0.9, 0.95, 0.6, 0.9, 0.85, 0.95, 0.9, 0.95, 0.95]
  assert statistics.largest_drop(curve) == pytest.approx(0.35)
  assert statistics.largest_drop([0.1, 0.2, 0.5, 0.9]) == 0.0  # never falls
  assert statistics.largest_drop([0.9, 0.1, 0.2, 0.3], skip_fraction=0.5) == 0.0  # dip skipped


def test_seed_spread_is_the_sample_sd():
  spread = statistics.seed_spread([0.90, 0.92, 0.94])
  assert spread["mean"] == pytest.approx(0.92) and spread["sd"] == pytest.approx(0.02)
  assert statistics.seed_spread([0.9]) == {"mean": 0.9, "sd": 0.0, "n": 1}
