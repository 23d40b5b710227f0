"""GMP and RigL, the baselines of the evidence study: each one's defining rule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcil_jax
from dcil_jax.rigl import RigLRefresh, rigl_masks

STEPS = 12


def _kernels(tree):
  return jax.tree.leaves(tree["prunable"])


def _mask_leaves(masks):
  return jax.tree.leaves(masks["prunable"])


@pytest.fixture(scope="module")
def step_fn():
  return jax.jit(dcil_jax.train_step)


def _train(state, batch, step_fn, steps=STEPS):
  """Runs ``steps`` steps; returns the final state and, per step, the trained masks and params."""
  history = []
  for _ in range(steps):
    state, metrics = step_fn(state, batch)
    history.append((jax.device_get(state.trained_masks), jax.device_get(state.params), metrics))
  return state, history


# --------------------------------------------------------------------------------------------
# GMP


def test_regrow_false_keeps_pruned_weights_pruned():
  params = {"w": jnp.arange(1.0, 11.0)}  # |w| = 1..10
  tx = dcil_jax.masked_update(
    dcil_jax.constant_sparsity(0.3), update_every=1, prunable=lambda p, x: True, regrow=False
  )
  state = tx.init(params)
  np.testing.assert_array_equal(state.masks["w"], np.arange(10) >= 3)
  # The pruned weights grow largest: with regrowth they would come back, here they stay out.
  grown = {"w": params["w"].at[:3].set(100.0)}
  _, state = tx.update(grown, state, grown)
  np.testing.assert_array_equal(state.masks["w"], np.arange(10) >= 3)
  regrow = dcil_jax.masked_update(
    dcil_jax.constant_sparsity(0.3), update_every=1, prunable=lambda p, x: True
  )
  _, revived = regrow.update(grown, regrow.init(params), grown)
  assert revived.masks["w"][:3].all()


def test_gmp_masks_only_shrink_and_reach_the_target(
  tiny_model, tiny_variables, tiny_batch, step_fn
):
  tx = optax.chain(
    optax.sgd(0.1, momentum=0.9),
    dcil_jax.masked_update(dcil_jax.cubic_sparsity(0.8, 8), update_every=2, regrow=False),
  )
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method="gmp", example_input=tiny_batch["image"][:1]
  )
  _, history = _train(state, tiny_batch, step_fn)
  for (old, _, _), (new, _, _) in zip(history, history[1:]):
    for a, b in zip(_mask_leaves(old), _mask_leaves(new)):
      assert not (b & ~a).any()  # nothing pruned comes back
  final = history[-1][0]
  assert float(dcil_jax.sparsity(final)) == pytest.approx(0.8, abs=1e-3)
  assert any(bool(metrics["mask_refreshed"]) for _, _, metrics in history)


def test_methods_refuse_the_other_methods_masks(tiny_model, tiny_variables, tiny_batch):
  x = tiny_batch["image"][:1]
  schedule = dcil_jax.constant_sparsity(0.5)
  dynamic = optax.chain(optax.sgd(0.1), dcil_jax.masked_update(schedule))
  no_regrow = optax.chain(optax.sgd(0.1), dcil_jax.masked_update(schedule, regrow=False))
  rigl = dcil_jax.rigl(optax.sgd(0.1), 0.5, update_every=5, end_step=10)
  cases = [("gmp", dynamic), ("dpf", no_regrow), ("dcil", rigl), ("rigl", dynamic)]
  for method, tx in cases:
    with pytest.raises(ValueError, match=f"method='{method}' trains with"):
      dcil_jax.TrainState.create(tiny_model, tiny_variables, tx, method=method, example_input=x)


def test_regrow_false_takes_weight_granularity_only():
  with pytest.raises(ValueError, match="regrow=False"):
    dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5), granularity="filter", regrow=False)


# --------------------------------------------------------------------------------------------
# RigL


def test_rigl_masks_drop_the_weakest_and_grow_the_largest_gradients():
  w = jnp.asarray([5.0, 4.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0])
  m = jnp.asarray([True, True, True, True, False, False, False, False])
  g = jnp.asarray([0.0, 0.0, 0.0, 0.0, 0.1, 9.0, 0.2, 7.0])
  new = rigl_masks({"w": w}, {"w": g}, {"w": m}, jnp.float32(0.5))["w"]
  # k = round(0.5 * 4) = 2: drop |w| = 3 and 2, grow the gradients 9 and 7.
  np.testing.assert_array_equal(new, [True, True, False, False, False, True, False, True])
  same = rigl_masks({"w": w}, {"w": g}, {"w": m}, jnp.float32(0.0))["w"]
  np.testing.assert_array_equal(same, m)


def test_rigl_drop_fraction_is_cosine_decayed_to_the_end_step():
  refresh = RigLRefresh(0.9, 10, 100, 0.3, "erk")
  values = [float(refresh.drop_fraction_at(t)) for t in (0, 50, 100, 150)]
  np.testing.assert_allclose(values, [0.3, 0.15, 0.0, 0.0], atol=1e-6)


@pytest.fixture(scope="module")
def rigl_run(tiny_model, tiny_variables, tiny_batch, step_fn):
  inner = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
  tx = dcil_jax.rigl(inner, 0.7, update_every=3, end_step=STEPS, drop_fraction=0.5)
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method="rigl", example_input=tiny_batch["image"][:1]
  )
  initial = jax.device_get(state.trained_masks)
  return initial, _train(state, tiny_batch, step_fn)[1]


def test_rigl_keeps_every_layer_at_a_constant_sparsity(rigl_run):
  initial, history = rigl_run
  counts = [int(m.sum()) for m in _mask_leaves(initial)]
  assert float(dcil_jax.sparsity(initial)) == pytest.approx(0.7, abs=0.01)
  for masks, _, metrics in history:
    assert [int(m.sum()) for m in _mask_leaves(masks)] == counts
    assert float(metrics["sparsity"]) == pytest.approx(float(dcil_jax.sparsity(initial)))


def test_rigl_pruned_weights_are_zero_and_grown_weights_start_at_zero(rigl_run):
  _, history = rigl_run
  refreshed = 0
  for i, (masks, params, _) in enumerate(history):
    # After step i the stored kernels are zero wherever the next forward's masks prune.
    next_masks = history[i + 1][0] if i + 1 < len(history) else None
    for m, w in zip(_mask_leaves(masks), _kernels(params)):
      assert (w[~m] == 0).all()
    if next_masks is not None:
      for old, new, w in zip(_mask_leaves(masks), _mask_leaves(next_masks), _kernels(params)):
        grown = new & ~old
        assert (w[grown] == 0).all()  # grown at the step after: still exactly zero now
        refreshed += int(grown.sum())
  assert refreshed > 0  # some weights were grown


def test_rigl_drop_and_grow_counts_follow_the_schedule(rigl_run):
  initial, history = rigl_run
  refresh = RigLRefresh(0.7, 3, STEPS, 0.5, "erk")
  masks = [initial] + [h[0] for h in history]
  # masks[t] (t >= 1) = what step t-1 trained with; a refresh at step t changes masks[t+2].
  for t in range(1, STEPS - 1):
    old, new = masks[t + 1], masks[t + 2] if t + 2 < len(masks) else None
    if new is None:
      continue
    changed = [int((a & ~b).sum()) for a, b in zip(_mask_leaves(old), _mask_leaves(new))]
    due = t % 3 == 0
    if not due:
      assert changed == [0] * len(changed), t
    else:
      frac = float(refresh.drop_fraction_at(t))
      kept = [int(a.sum()) for a in _mask_leaves(old)]
      # Dropped weights that were re-grown at once are not a change: at most k per layer.
      assert all(c <= round(frac * k) for c, k in zip(changed, kept)), (t, changed)
  assert any(int(h[2]["mask_refreshed"]) for h in history)


def test_rigl_needs_params_and_valid_settings():
  tx = dcil_jax.rigl(optax.sgd(0.1), 0.5, 5, end_step=10, prunable=lambda p, x: True)
  params = {"w": jnp.ones(4)}
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="end_step"):
    dcil_jax.rigl(optax.sgd(0.1), 0.5, end_step=0)
  with pytest.raises(ValueError, match="drop_fraction"):
    dcil_jax.rigl(optax.sgd(0.1), 0.5, 5, end_step=10, drop_fraction=1.5)
  with pytest.raises(ValueError, match="Sparsity"):
    dcil_jax.rigl(optax.sgd(0.1), 1.0, 5, end_step=10)
  # Issue 23: with update_every >= end_step the masks would never move.
  with pytest.raises(ValueError, match="would never be updated"):
    dcil_jax.rigl(optax.sgd(0.1), 0.5, update_every=100, end_step=100)
