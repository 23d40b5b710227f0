"""masked_update as an optax user composes it: any position, branches, MultiSteps, schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dcil_jax
from dcil_jax import rules

UPDATE_EVERY = 3
SCHEDULE = dcil_jax.cubic_sparsity(0.8, ramp_steps=12)
CONVS = rules.all_kernels  # hand-written params below: every "kernel" is a conv kernel


def make_params():
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
  return {
    "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4))},
    "conv2": {"kernel": jax.random.normal(k3, (1, 1, 4, 4))},
    "head": {"bias": jnp.zeros(3)},
  }


def grads_at(step):
  key = jax.random.PRNGKey(100 + step)
  return jax.tree.map(lambda p: jax.random.normal(key, p.shape), make_params())


def masked(**kwargs):
  return dcil_jax.masked_update(SCHEDULE, UPDATE_EVERY, prunable=CONVS, **kwargs)


OPTIMIZERS = {
  "sgd": lambda: optax.chain(
    optax.add_decayed_weights(1e-4), optax.sgd(0.5, momentum=0.9, nesterov=True)
  ),
  "adamw": lambda: optax.adamw(0.3, weight_decay=1e-4),
  "inject_hyperparams": lambda: optax.inject_hyperparams(optax.sgd)(
    learning_rate=0.5, momentum=0.9
  ),
}

# The same optimizer with masked_update first, in the middle and last.
POSITIONS = {
  "first": lambda: optax.chain(
    masked(), optax.add_decayed_weights(1e-4), optax.sgd(0.5, momentum=0.9)
  ),
  "middle": lambda: optax.chain(
    optax.add_decayed_weights(1e-4), masked(), optax.sgd(0.5, momentum=0.9)
  ),
  "last": lambda: optax.chain(
    optax.add_decayed_weights(1e-4), optax.sgd(0.5, momentum=0.9), masked()
  ),
}


def run(tx, steps, params=None):
  """Steps of ``tx``; returns the masks each step's forward used and the final state."""
  params = make_params() if params is None else params
  state = tx.init(params)
  update = jax.jit(tx.update)
  used = []
  for t in range(steps):
    used.append(dcil_jax.get_masks(state, params))
    updates, state = update(grads_at(t), state, params)
    params = optax.apply_updates(params, updates)
  return used, state, params


def weights_at(tx_without_masks, steps):
  """W_0 ... W_{steps-1} of the chain without masked_update (it never changes the updates)."""
  params, state, out = make_params(), tx_without_masks.init(make_params()), []
  for t in range(steps):
    out.append(params)
    updates, state = tx_without_masks.update(grads_at(t), state, params)
    params = optax.apply_updates(params, updates)
  return out


@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_any_position_gives_the_official_masks(position):
  """Issue 10.2: first or in the middle it used to rank W + g instead of W_{t+1} (1-4 % of
  the bits wrong at every refresh). Now every step t uses the masks of W_t when t % k == 0."""
  steps = 4 * UPDATE_EVERY + 1
  used, state, _ = run(POSITIONS[position](), steps)
  weights = weights_at(
    optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.5, momentum=0.9)), steps
  )
  template = dcil_jax.masks_like(make_params(), CONVS)
  expected = None
  for t in range(steps):
    if t % UPDATE_EVERY == 0:
      expected = dcil_jax.magnitude_masks(weights[t], template, SCHEDULE(t))
    jax.tree.map(np.testing.assert_array_equal, used[t], expected)
  # Eval and export use the masks the last step trained with.
  jax.tree.map(np.testing.assert_array_equal, dcil_jax.get_trained_masks(state), used[-1])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_refresh_counts_and_sparsity(name):
  used, state, _ = run(optax.chain(OPTIMIZERS[name](), masked()), 14)
  n = 3 * 3 * 2 * 4 + 16
  for t, masks in enumerate(used):
    stage = t - t % UPDATE_EVERY
    assert int(sum(jnp.sum(~m) for m in jax.tree.leaves(masks))) == round(
      float(SCHEDULE(stage)) * n
    )
  s = dcil_jax.transform.find_masked_state(state)
  assert int(s.count) == 14 and int(s.last_refresh) == 12


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_updates_and_momentum_are_untouched(name):
  """masked_update passes updates through: the chain without it produces the same updates."""
  tx, plain = optax.chain(OPTIMIZERS[name](), masked()), OPTIMIZERS[name]()
  params_a = params_b = make_params()
  state_a, state_b = tx.init(params_a), plain.init(params_b)
  for t in range(2 * UPDATE_EVERY + 1):  # crosses refreshes that change the masks
    ua, state_a = tx.update(grads_at(t), state_a, params_a)
    ub, state_b = plain.update(grads_at(t), state_b, params_b)
    jax.tree.map(np.testing.assert_array_equal, ua, ub)
    params_a, params_b = optax.apply_updates(params_a, ua), optax.apply_updates(params_b, ub)
  jax.tree.map(np.testing.assert_array_equal, state_a[0], state_b)  # momentum etc.


def test_inside_multisteps_counts_optimizer_steps():
  """Every micro-step of one optimizer step uses the same masks, from the same W_t."""
  inner = optax.chain(optax.sgd(0.5, momentum=0.9), masked())
  tx = optax.MultiSteps(inner, every_k_schedule=2)
  used, state, _ = run(tx, 4 * UPDATE_EVERY)
  assert int(dcil_jax.transform.find_masked_state(state).count) == 2 * UPDATE_EVERY
  for micro in range(0, len(used), 2):
    jax.tree.map(np.testing.assert_array_equal, used[micro], used[micro + 1])
  changed = [
    micro
    for micro in range(2, len(used), 2)
    if any(
      bool(jnp.any(a != b))
      for a, b in zip(jax.tree.leaves(used[micro - 2]), jax.tree.leaves(used[micro]))
    )
  ]
  assert changed == [6]  # optimizer step 3 (micro-steps 6, 7); step 0's sparsity is 0


def test_inside_one_branch_of_multi_transform():
  """Only the branch's leaves are pruned, with one threshold over them."""
  labels = {"conv": {"kernel": "pruned"}, "conv2": {"kernel": "plain"}, "head": {"bias": "plain"}}
  tx = optax.multi_transform(
    {"pruned": optax.chain(optax.sgd(0.5), masked()), "plain": optax.sgd(0.5)}, labels
  )
  used, state, params = run(tx, 2 * UPDATE_EVERY + 1)
  masks = used[-1]
  assert masks["conv2"]["kernel"] is None and masks["head"]["bias"] is None
  n = 3 * 3 * 2 * 4
  assert int(jnp.sum(~masks["conv"]["kernel"])) == round(float(SCHEDULE(2 * UPDATE_EVERY)) * n)
  trained = dcil_jax.get_trained_masks(state)
  jax.tree.map(np.testing.assert_array_equal, trained, masks)


def test_two_masked_updates_are_a_clear_error():
  tx = optax.chain(masked(), optax.sgd(0.1), masked())
  state = tx.init(make_params())
  with pytest.raises(ValueError, match="has 2 dcil_jax.masked_update"):
    dcil_jax.get_masks(state, make_params())


def test_no_masked_update_is_a_clear_error():
  with pytest.raises(ValueError, match="has no dcil_jax.masked_update"):
    dcil_jax.get_masks(optax.sgd(0.1).init(make_params()), make_params())


def test_a_plain_tree_needs_a_rule():
  with pytest.raises(ValueError, match="Which parameters to prune"):
    dcil_jax.masked_update(SCHEDULE).init(make_params())


def test_schedule_leaving_the_range_keeps_the_last_valid_sparsity_and_says_so():
  """Issue 10.5: linear_schedule(0, 1, 8) used to zero every prunable weight after 9 steps."""
  schedule = optax.linear_schedule(0.0, 1.0, 8)
  tx = optax.chain(optax.sgd(0.1), dcil_jax.masked_update(schedule, 1, prunable=CONVS))
  used, state, _ = run(tx, 12)
  s = dcil_jax.transform.find_masked_state(state)
  assert bool(s.out_of_range) and float(s.target_sparsity) == pytest.approx(float(schedule(7)))
  for t, masks in enumerate(used):
    expected = float(schedule(min(t, 7)))  # 1.0 from step 8 on: held at step 7's value
    assert float(dcil_jax.sparsity(masks)) == pytest.approx(expected, abs=1 / 88)


def test_update_without_params_is_a_clear_error():
  tx = masked()
  state = tx.init(make_params())
  with pytest.raises(ValueError, match="needs `params`"):
    tx.update(grads_at(0), state)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_update_every_is_rejected(bad):
  with pytest.raises(ValueError, match="update_every"):
    dcil_jax.masked_update(SCHEDULE, bad)
