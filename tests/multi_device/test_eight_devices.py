"""Data and path parallelism on 8 fake CPU devices, against one device on the same global batch.

These tests need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before JAX starts, so
``tests/test_multi_device.py`` runs this directory in a subprocess (the main run ignores it).
"""

import functools

import jax
import numpy as np
import optax
import pytest
from conftest import NUM_CLASSES, tree_allclose

import dcil_jax
from dcil_jax import sharding

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")

GLOBAL_BATCH = 16
STEPS = 3


@pytest.fixture(scope="module")
def global_batch():
  rng = np.random.default_rng(0)
  return {
    "image": rng.normal(size=(GLOBAL_BATCH, 8, 8, 1)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, GLOBAL_BATCH).astype(np.int32),
  }


def make_tx():
  # Plain SGD with lr 1: each step's param change is minus the gradient, so equal params after
  # a step mean equal gradients. Masks refresh after every step, from the updated weights.
  return optax.chain(
    optax.sgd(1.0), dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5), update_every=1)
  )


def run(model, variables, batch, method, mesh=None):
  if method.startswith("dcil"):  # "dcil" (default strategy) or "dcil/<strategy>"
    strategy = method.partition("/")[2] or None
    method = dcil_jax.DCIL(kd_start_step=1, strategy=strategy)
  tx = make_tx() if method != "dense" else optax.sgd(1.0)
  state = dcil_jax.TrainState.create(
    model, variables, tx, method=method, mesh=mesh, example_input=batch["image"][:1]
  )
  if mesh is not None:
    batch = sharding.shard_batch(batch, mesh)
  losses, masks = [], []
  for _ in range(STEPS):
    state, metrics = dcil_jax.train_step(state, batch)
    losses.append(float(metrics["loss"]))
    masks.append(jax.device_get(state.masks))
  return state, np.array(losses), masks


@pytest.fixture(scope="module")
def one_device(tiny_model, tiny_variables, global_batch):
  """The reference: each method on one device, computed once per method."""
  cache = {}

  def get(method):
    if method not in cache:
      cache[method] = run(tiny_model, tiny_variables, global_batch, method)
    return cache[method]

  return get


@pytest.fixture(scope="module")
def on_mesh(tiny_model, tiny_variables, global_batch):
  """A method's run on the 8-device mesh (data, or data x path), computed once per pair."""

  @functools.cache
  def get(method, path_parallel=False):
    mesh = sharding.make_mesh(path_parallel=path_parallel)
    return mesh, run(tiny_model, tiny_variables, global_batch, method, mesh)

  return get


@pytest.mark.parametrize(
  "method, path_parallel",
  [
    ("dcil", False),
    ("dcil", True),
    ("dcil/sequential", False),
    ("dcil/sequential_loop", False),
    ("dpf", False),
    ("dense", False),
  ],
)
def test_sharded_step_equals_one_device_step(one_device, on_mesh, method, path_parallel):
  # The reference is always the one-device step of the default strategy; "dcil/sequential" (on
  # CPU its unrolled form) and "dcil/sequential_loop" (the accelerator form), KD off in step 0
  # and on from step 1, on the data mesh must match it.
  ref_state, ref_losses, ref_masks = one_device(method.partition("/")[0])
  _, (state, losses, masks) = on_mesh(method, path_parallel)

  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  tree_allclose(state.params, ref_state.params, rtol=1e-4, atol=1e-6)  # = the gradients
  tree_allclose(state.model_state, ref_state.model_state, rtol=1e-4, atol=1e-6)
  if method == "dense":
    return
  for got, want in zip(masks, ref_masks, strict=True):
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))
  # The refreshes really moved the masks, so equal masks are not trivially equal.
  first, last = jax.tree.leaves(masks[0]), jax.tree.leaves(masks[-1])
  assert any(not np.array_equal(a, b) for a, b in zip(first, last, strict=True))


def test_state_stays_replicated_and_batch_is_split(on_mesh, global_batch):
  mesh, (state, _, _) = on_mesh("dcil")
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.is_fully_replicated, leaf.sharding
  # Replicated BN statistics: every device holds the same global-batch statistics.
  for leaf in jax.tree.leaves(state.model_state):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 8 and all(np.array_equal(s, shards[0]) for s in shards)
  batch = sharding.shard_batch(global_batch, mesh)
  assert batch["image"].sharding.shard_shape(batch["image"].shape) == (GLOBAL_BATCH // 8, 8, 8, 1)


def test_path_axis_puts_one_path_per_device(on_mesh, global_batch):
  mesh, (state, _, _) = on_mesh("dcil", True)
  assert dict(mesh.shape) == {"data": 4, "path": 2}
  assert state.method.strategy == "sharded"
  # Every leaf replicated: each path device slices its own copy out locally.
  for leaf in jax.tree.leaves(state.params):
    assert leaf.sharding.is_fully_replicated
  # Each device runs one path with ordinary (not grouped) convolutions.
  hlo = dcil_jax.train_step.lower(state, sharding.shard_batch(global_batch, mesh)).compile()
  convs = [line for line in hlo.as_text().splitlines() if " convolution(" in line]
  assert convs and not any("feature_group_count" in line for line in convs)


def test_sharded_strategy_without_a_mesh_takes_two_devices_and_equals_one_device(
  one_device, tiny_model, tiny_variables, global_batch
):
  """``strategy="sharded"`` and no mesh: a 2-device ``path`` mesh, one path per device, each
  running ordinary (not grouped) convolutions, with the steps of the one-device default."""
  ref_state, ref_losses, ref_masks = one_device("dcil")
  state, losses, masks = run(tiny_model, tiny_variables, global_batch, "dcil/sharded")
  assert dict(state.mesh.shape) == {"path": 2}
  hlo = dcil_jax.train_step.lower(state, global_batch).compile().as_text()
  convs = [line for line in hlo.splitlines() if " convolution(" in line]
  assert convs and not any("feature_group_count" in line for line in convs), convs
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  tree_allclose(state.params, ref_state.params, rtol=1e-4, atol=1e-6)
  for got, want in zip(masks, ref_masks, strict=True):
    assert jax.tree.all(jax.tree.map(np.array_equal, got, want))


def test_batch_that_does_not_split_over_data_axis_is_rejected(tiny_model, tiny_variables):
  mesh = sharding.make_mesh()
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, make_tx(), mesh=mesh, example_input=np.zeros((1, 8, 8, 1))
  )
  batch = {"image": np.zeros((12, 8, 8, 1), np.float32), "label": np.zeros(12, np.int32)}
  with pytest.raises(ValueError, match="multiple of 8"):
    dcil_jax.train_step(state, batch)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(state))  # nothing donated


def test_path_axis_needs_sharded_strategy(tiny_model, tiny_variables):
  with pytest.raises(ValueError, match="sharded"):
    dcil_jax.TrainState.create(
      tiny_model,
      tiny_variables,
      make_tx(),
      example_input=np.zeros((1, 8, 8, 1)),
      strategy="unrolled",
      mesh=sharding.make_mesh(path_parallel=True),
    )


def test_checkpoint_of_a_sharded_state_restores_values_and_shardings(
  on_mesh, tiny_model, tiny_variables, global_batch, tmp_path
):
  from experiments import checkpoints, run_state

  mesh, (state, _, _) = on_mesh("dcil", True)
  saver = checkpoints.RunCheckpointer(tmp_path)
  saver.save(STEPS, run_state.checkpoint_tree(state), {"data": None})
  saver.close()  # waits for the asynchronous write
  fresh = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, make_tx(), mesh=mesh, example_input=global_batch["image"][:1]
  )
  restored = checkpoints.RunCheckpointer(tmp_path).restore_latest(run_state.checkpoint_tree(fresh))
  assert restored.step == STEPS
  expected = jax.tree.leaves(run_state.checkpoint_tree(state))
  for got, want in zip(jax.tree.leaves(restored.state), expected, strict=True):
    assert got.sharding == want.sharding  # replicated
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_global_batch_that_does_not_split_over_the_devices_stops_the_run_at_start(tmp_path):
  from experiments import train
  from experiments.configs import digits

  config = digits.get_config("local")
  with config.unlocked():
    config.batch_size = 12
  with pytest.raises(train.BadConfigError, match="split evenly over the 8 data-parallel devices"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("devices, path_parallel", [(2, True), (1, False)])
def test_a_checkpoint_of_8_devices_restores_bit_for_bit_on_fewer(
  on_mesh, tiny_model, tiny_variables, global_batch, tmp_path, devices, path_parallel
):
  """A run moved to another device count (a preempted slice that comes back smaller) resumes
  from the same values: orbax reads each array into the new mesh's shardings."""
  from experiments import checkpoints, run_state

  _, (state, _, _) = on_mesh("dcil", True)  # written from a data x path mesh of 8
  saver = checkpoints.RunCheckpointer(tmp_path)
  saver.save(STEPS, run_state.checkpoint_tree(state), {"data": {"next_index": STEPS}})
  saver.close()
  mesh = sharding.make_mesh(path_parallel=path_parallel, devices=jax.devices()[:devices])
  fresh = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, make_tx(), mesh=mesh, example_input=global_batch["image"][:1]
  )
  target = run_state.checkpoint_tree(fresh)
  restored = checkpoints.RunCheckpointer(tmp_path).restore_latest(target)
  assert restored.step == STEPS and restored.meta["data"] == {"next_index": STEPS}
  expected = jax.tree.leaves(run_state.checkpoint_tree(state))
  for got, want, like in zip(
    jax.tree.leaves(restored.state), expected, jax.tree.leaves(target), strict=True
  ):
    assert got.sharding == like.sharding and len(got.sharding.device_set) == devices
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
