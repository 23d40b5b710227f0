"""Cost-aware filter allocation (dcil_jax.deploy.allocation): groups that compaction removes."""

import numpy as np
import pytest
from conftest import conv_kernels, random_variables

import dcil_jax
from dcil_jax import granularity as gr
from dcil_jax import models
from dcil_jax.deploy import compact, deploy_stats
from dcil_jax.deploy.allocation import channel_groups, cost_aware_filter_masks

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
