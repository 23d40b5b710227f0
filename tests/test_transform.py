import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcil_jax

UPDATE_EVERY = 3
SCHEDULE = dcil_jax.cubic_sparsity(0.8, ramp_steps=12)


def make_params():
  k1, k2 = jax.random.split(jax.random.PRNGKey(1))
  return {
    "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
    "head": {"kernel": jax.random.normal(k2, (4, 3)), "bias": jnp.zeros(3)},
  }


def grads_at(step):
  key = jax.random.PRNGKey(100 + step)
  return jax.tree.map(lambda p: jax.random.normal(key, p.shape), make_params())


OPTIMIZERS = {
  "sgd": lambda: optax.chain(
    optax.add_decayed_weights(1e-4), optax.sgd(0.5, momentum=0.9, nesterov=True)
  ),
  "adamw": lambda: optax.adamw(0.3, weight_decay=1e-4),
  "inject_hyperparams": lambda: optax.inject_hyperparams(optax.sgd)(
    learning_rate=0.5, momentum=0.9
  ),
}


def with_masks(name):
  return optax.chain(OPTIMIZERS[name](), dcil_jax.masked_update(SCHEDULE, UPDATE_EVERY))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_refreshes_on_schedule_with_official_timing(name):
  tx = with_masks(name)
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  n = 3 * 3 * 2 * 4
  masks = dcil_jax.get_masks(state)
  assert float(dcil_jax.sparsity(masks)) == 0.0  # schedule(0) = 0, computed from W_0
  for t in range(14):
    updates, state = update(grads_at(t), state, params)
    params = optax.apply_updates(params, updates)
    new_masks = dcil_jax.get_masks(state)
    count = t + 1
    # Evaluation and export use the masks this step trained with.
    jax.tree.map(np.testing.assert_array_equal, dcil_jax.get_trained_masks(state), masks)
    if count % UPDATE_EVERY == 0:
      # The masks for the forward pass of step `count` come from W_count at schedule(count).
      expected = dcil_jax.magnitude_masks(params, new_masks, SCHEDULE(count))
      jax.tree.map(np.testing.assert_array_equal, new_masks, expected)
      assert int(jnp.sum(~new_masks["conv"]["kernel"])) == round(float(SCHEDULE(count)) * n)
    else:
      jax.tree.map(np.testing.assert_array_equal, new_masks, masks)
    masks = new_masks
  assert float(dcil_jax.sparsity(masks)) == pytest.approx(0.8, abs=1 / n)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_updates_and_momentum_are_untouched(name):
  """masked_update passes updates through: the chain without it produces the same updates."""
  tx, plain = with_masks(name), OPTIMIZERS[name]()
  params_a = params_b = make_params()
  state_a, state_b = tx.init(params_a), plain.init(params_b)
  for t in range(2 * UPDATE_EVERY + 1):  # crosses refreshes that change the masks
    ua, state_a = tx.update(grads_at(t), state_a, params_a)
    ub, state_b = plain.update(grads_at(t), state_b, params_b)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    params_a, params_b = optax.apply_updates(params_a, ua), optax.apply_updates(params_b, ub)
  jax.tree.map(np.testing.assert_array_equal, state_a[0], state_b)  # momentum etc.


def test_inside_multisteps_counts_optimizer_steps():
  inner = optax.chain(optax.sgd(0.5, momentum=0.9), dcil_jax.masked_update(SCHEDULE, UPDATE_EVERY))
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  refreshed_at = []
  masks = dcil_jax.get_masks(state)
  for micro in range(4 * UPDATE_EVERY):
    updates, state = update(grads_at(micro), state, params)
    params = optax.apply_updates(params, updates)
    new_masks = dcil_jax.get_masks(state)
    if any(jax.tree.leaves(jax.tree.map(lambda a, b: bool(jnp.any(a != b)), masks, new_masks))):
      refreshed_at.append(micro + 1)
    masks = new_masks
  inner_state = dcil_jax.transform.find_masked_state(state)
  assert int(inner_state.count) == 2 * UPDATE_EVERY  # optimizer steps, not micro-steps
  # Refreshes happen at optimizer steps 3 and 6, i.e. after micro-steps 6 and 12.
  assert refreshed_at == [6, 12]


def test_get_masks_needs_exactly_one_masked_update():
  with pytest.raises(ValueError, match="found 0"):
    dcil_jax.get_masks(optax.sgd(0.1).init(make_params()))


def test_update_without_params_is_a_clear_error():
  tx = dcil_jax.masked_update(SCHEDULE, UPDATE_EVERY)
  state = tx.init(make_params())
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(grads_at(0), state)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_update_every_is_rejected(bad):
  with pytest.raises(ValueError, match="update_every"):
    dcil_jax.masked_update(SCHEDULE, bad)
