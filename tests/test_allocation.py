"""Cost-aware filter allocation (dcil_jax.deploy.allocation): groups that compaction removes."""

import jax
import numpy as np
import optax
import pytest
from conftest import conv_kernels, random_variables

import dcil_jax
from dcil_jax import granularity as gr
from dcil_jax import models
from dcil_jax.deploy import compact, deploy_stats
from dcil_jax.deploy.allocation import channel_groups, cost_aware_filter_masks, group_allocation

SHAPE = (8, 8, 3)


@pytest.fixture(scope="module")
def resnet8():
  model = models.resnet8(num_classes=5)
  variables = random_variables(model, np.zeros((1, *SHAPE), np.float32))
  return model, variables, dcil_jax.masks_like(variables["params"], conv_kernels)


def test_groups_couple_the_writers_of_a_residual_stream(resnet8):
  model, variables, template = resnet8
  groups = {tuple(g["writers"]): g for g in channel_groups(model, variables, template, SHAPE)}
  # Stage 1's stream: the stem and the last conv of the stage's block write it.
  assert ("Conv_0/kernel", "BasicBlock_0/Conv_1/kernel") in groups
  inner = groups[("BasicBlock_0/Conv_0/kernel",)]
  assert inner["removable"].all() and (inner["cost"] > 0).all()
  np.testing.assert_allclose(inner["score"].mean(), 1.0)  # normalised per layer


@pytest.mark.parametrize("cost_weight", [0.0, 1.0])
def test_every_pruned_filter_is_removed(resnet8, cost_weight):
  model, variables, template = resnet8
  masks = cost_aware_filter_masks(model, variables, template, 0.4, SHAPE, cost_weight=cost_weight)
  c = compact(model, variables, masks, SHAPE)
  report = c.report
  assert report["removed"] == report["pruned"] >= 0.4 * report["filters"]
  assert report["pruned"] < 0.4 * report["filters"] + 3  # one group has at most 3 writers
  assert all(layer["kept"] >= 1 for layer in report["layers"])
  dense = deploy_stats(model, variables, SHAPE)["macs"]
  compact_macs = deploy_stats(c.module, c.variables, SHAPE)["macs"]
  global_masks = gr.filter_masks(variables["params"], template, 0.4)
  g = compact(model, variables, global_masks, SHAPE)
  assert g.report["removed"] < g.report["pruned"]  # today's allocation: some stay
  assert compact_macs < deploy_stats(g.module, g.variables, SHAPE)["macs"] < dense


def test_a_macs_budget(resnet8):
  model, variables, template = resnet8
  masks = cost_aware_filter_masks(model, variables, template, 0.3, SHAPE, target="macs")
  c = compact(model, variables, masks, SHAPE)
  dense = deploy_stats(model, variables, SHAPE)["macs"]
  assert 0.6 * dense < deploy_stats(c.module, c.variables, SHAPE)["macs"] <= 0.7 * dense
  with pytest.raises(ValueError, match="max_group_fraction=0.75; ask for less"):
    cost_aware_filter_masks(model, variables, template, 0.99, SHAPE, target="macs")
  with pytest.raises(ValueError, match="target"):
    cost_aware_filter_masks(model, variables, template, 0.5, SHAPE, target="params")


# Training with the allocation: the refresh inside jit prunes the groups traced once.


def _same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.mark.parametrize("cost_weight", [0.0, 1.0])
def test_the_jitted_refresh_gives_the_one_shot_masks(resnet8, cost_weight):
  model, variables, template = resnet8
  allocation = group_allocation(model, variables, SHAPE, cost_weight=cost_weight)
  refresh = jax.jit(lambda p, s: allocation.masks(p, template, s))
  for fraction in (0.1, 0.4, 0.6):
    want = cost_aware_filter_masks(
      model, variables, template, fraction, SHAPE, cost_weight=cost_weight
    )
    assert _same(refresh(variables["params"], fraction), want), fraction
  # Through masked_update, on the lifted tree a TrainState trains.
  tx = dcil_jax.masked_update(
    dcil_jax.constant_sparsity(0.4), granularity="filter", allocation=allocation
  )
  lifted = dcil_jax.paths.split_params(variables["params"], conv_kernels)
  masks = dcil_jax.get_trained_masks(jax.jit(tx.init)(lifted))
  want = cost_aware_filter_masks(model, variables, template, 0.4, SHAPE, cost_weight=cost_weight)
  assert _same(masks[dcil_jax.PRUNABLE], want)


@pytest.mark.parametrize("max_group_fraction", [0.5, 1.0])
def test_the_refresh_never_empties_a_space(resnet8, max_group_fraction):
  model, variables, template = resnet8
  allocation = group_allocation(
    model, variables, SHAPE, cost_weight=1.0, max_group_fraction=max_group_fraction
  )
  masks = jax.jit(lambda p: allocation.masks(p, template, 0.99))(variables["params"])
  flat = {
    "/".join(str(k.key) for k in path): np.asarray(m)
    for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]
  }
  for group in allocation.groups:
    kept = flat[group.writers[0]].reshape(-1, group.cost.size).any(axis=0)
    n = group.cost.size
    assert 1 <= kept.sum() and n - kept.sum() <= max(min(n - 1, int(max_group_fraction * n)), 0)
    for writer in group.writers[1:]:  # a group goes as one
      np.testing.assert_array_equal(flat[writer].reshape(-1, n).any(axis=0), kept)
  # Short of 0.99: the count stops where the limits do, as reachable_fraction says.
  reached = float(gr.filter_sparsity(masks))
  assert reached == pytest.approx(allocation.reachable_fraction(template), abs=1e-6)


def test_a_model_trained_with_the_allocation_compacts_every_pruned_filter(resnet8):
  model, variables, _ = resnet8
  allocation = group_allocation(model, variables, SHAPE, cost_weight=1.0)
  tx = optax.chain(
    optax.sgd(0.05),
    dcil_jax.masked_update(
      dcil_jax.constant_sparsity(0.4), update_every=2, granularity="filter", allocation=allocation
    ),
  )
  x = np.random.default_rng(1).normal(size=(4, *SHAPE)).astype(np.float32)
  state = dcil_jax.TrainState.create(model, variables, tx, method="dcil", example_input=x[:1])
  batch = {"image": x, "label": np.arange(4) % 5}
  for _ in range(4):
    state, metrics = dcil_jax.train_step(state, batch)
  assert bool(metrics["finite"]) and float(metrics["sparsity"]) >= 0.4
  masks = state.trained_masks
  assert gr.is_filter_structured(jax.tree.leaves(masks[dcil_jax.PRUNABLE]))
  c = compact(model, dcil_jax.export_variables(state), masks, SHAPE)
  assert c.report["removed"] == c.report["pruned"] >= 0.4 * c.report["filters"]


def test_the_allocation_takes_filter_masks_with_a_global_count(resnet8):
  model, variables, _ = resnet8
  allocation = group_allocation(model, variables, SHAPE)
  schedule = dcil_jax.constant_sparsity(0.4)
  with pytest.raises(ValueError, match="granularity='filter'"):
    dcil_jax.masked_update(schedule, allocation=allocation)
  with pytest.raises(ValueError, match="distribution='global'"):
    dcil_jax.masked_update(
      schedule, granularity="filter", distribution="layerwise", allocation=allocation
    )
  with pytest.raises(TypeError, match="masks\\(params, masks, sparsity, score\\)"):
    dcil_jax.masked_update(schedule, granularity="filter", allocation=0.5)
