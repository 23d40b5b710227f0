import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcil_jax
from dcil_jax import masks as masks_lib
from dcil_jax.models import resnet20


@pytest.fixture(scope="module")
def params():
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  return {
    "conv1": {"kernel": jax.random.normal(keys[0], (3, 3, 3, 8)), "bias": jnp.ones(8)},
    "conv2": {"kernel": jax.random.normal(keys[1], (3, 3, 8, 16))},
    "shortcut": {"kernel": jax.random.normal(keys[2], (1, 1, 8, 16))},
    "bn": {"scale": jnp.ones(16), "bias": jnp.zeros(16)},
    "head": {"kernel": jax.random.normal(keys[3], (16, 10)), "bias": jnp.zeros(10)},
  }


def conv_rule(path, leaf):
  return path[-1].key == "kernel" and leaf.ndim == 4


def _num_prunable(masks):
  return sum(m.size for m in jax.tree.leaves(masks))


def test_a_rule_picks_the_prunable_leaves(params):
  masks = dcil_jax.masks_like(params, lambda path, leaf: leaf.ndim == 4)
  assert masks["conv1"]["kernel"].shape == (3, 3, 3, 8)
  assert masks["shortcut"]["kernel"].dtype == jnp.bool_
  for path in [("conv1", "bias"), ("bn", "scale"), ("head", "kernel"), ("head", "bias")]:
    assert masks[path[0]][path[1]] is None
  assert jax.tree.structure(masks, is_leaf=lambda x: x is None) == jax.tree.structure(params)


def test_conv_rule_on_resnet20_selects_every_conv():
  model, x = resnet20(num_classes=10), jnp.zeros((1, 32, 32, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  masks = dcil_jax.masks_like(variables["params"], dcil_jax.rules.conv_kernels(model, x))
  # 19 3x3 convs + 2 1x1 shortcut convs; the Dense head stays dense.
  assert len(jax.tree.leaves(masks)) == 21
  assert masks["Dense_0"]["kernel"] is None


@pytest.mark.parametrize("distribution", ["global", "layerwise", "erk"])
@pytest.mark.parametrize("target", [0.0, 0.5, 0.9, 0.97])
def test_exact_sparsity(params, distribution, target):
  masks = dcil_jax.magnitude_masks(
    params, dcil_jax.masks_like(params, conv_rule), target, distribution
  )
  n = _num_prunable(masks)
  pruned = sum(int(jnp.sum(~m)) for m in jax.tree.leaves(masks))
  if distribution == "global":
    assert pruned == round(target * n)
  elif distribution == "layerwise":
    for m in jax.tree.leaves(masks):
      assert int(jnp.sum(~m)) == round(target * m.size)
  else:  # per-layer rounding only
    assert abs(pruned - target * n) <= len(jax.tree.leaves(masks))


def test_global_masks_keep_the_largest_magnitudes(params):
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params, conv_rule), 0.7)
  kept, pruned = [], []
  for path in ["conv1", "conv2", "shortcut"]:
    w, m = np.abs(np.asarray(params[path]["kernel"])), np.asarray(masks[path]["kernel"])
    kept.append(w[m])
    pruned.append(w[~m])
  assert np.concatenate(kept).min() >= np.concatenate(pruned).max()


def test_ties_are_broken_by_index_and_count_is_exact():
  params = {"conv": {"kernel": jnp.ones((2, 2, 1, 5))}}  # 20 equal magnitudes
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params, conv_rule), 0.35)
  flat = np.asarray(masks["conv"]["kernel"]).reshape(-1)
  assert flat.sum() == 13
  np.testing.assert_array_equal(flat, np.arange(20) >= 7)  # lower indices are pruned first


def test_masks_under_jit_with_traced_sparsity(params):
  template = dcil_jax.masks_like(params, conv_rule)
  fn = jax.jit(lambda p, s: dcil_jax.magnitude_masks(p, template, s, "erk"))
  for target in [0.3, 0.8]:
    eager = dcil_jax.magnitude_masks(params, template, target, "erk")
    jax.tree.map(np.testing.assert_array_equal, fn(params, target), eager)


def test_erk_sparsities_match_target_and_cap_dense_layers():
  shapes = [(3, 3, 3, 16), (3, 3, 16, 32), (3, 3, 32, 64), (1, 1, 2, 2)]
  sizes = np.array([np.prod(s) for s in shapes])
  for target in [0.5, 0.9, 0.98]:
    s = np.asarray(dcil_jax.erk_sparsities(shapes, target))
    assert np.all((s >= 0) & (s < 1))
    np.testing.assert_allclose((s * sizes).sum() / sizes.sum(), target, rtol=1e-5)
    assert s[0] < s[2]  # small, thin layers are pruned less than big ones
  assert dcil_jax.erk_sparsities(shapes, 0.5)[3] == 0.0  # tiny layer capped at density 1


def test_statistics_and_flip_rate(params):
  template = dcil_jax.masks_like(params, conv_rule)
  a = dcil_jax.magnitude_masks(params, template, 0.5)
  assert float(dcil_jax.sparsity(a)) == pytest.approx(
    round(0.5 * _num_prunable(a)) / _num_prunable(a)
  )
  per_layer = dcil_jax.layer_sparsities(a)
  assert set(per_layer) == {"['conv1']['kernel']", "['conv2']['kernel']", "['shortcut']['kernel']"}
  assert float(dcil_jax.flip_rate(a, a)) == 0.0
  b = jax.tree.map(lambda m: m.at[(0,) * m.ndim].set(~m[(0,) * m.ndim]), a)
  assert float(dcil_jax.flip_rate(a, b)) == pytest.approx(3 / _num_prunable(a))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_range_is_rejected(params, bad):
  with pytest.raises(ValueError, match="Sparsity must be"):
    dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params, conv_rule), bad)


def test_mismatched_masks_are_rejected(params):
  masks = dcil_jax.masks_like(params, conv_rule)
  wrong_shape = dict(masks, conv2={"kernel": jnp.ones((3, 3, 8, 15), bool)})
  with pytest.raises(ValueError, match="shape"):
    dcil_jax.apply_masks(params, wrong_shape)
  wrong_tree = {k: v for k, v in masks.items() if k != "conv2"}
  with pytest.raises(ValueError, match="does not mirror"):
    dcil_jax.apply_masks(params, wrong_tree)
  with pytest.raises(ValueError, match="distribution"):
    dcil_jax.magnitude_masks(params, masks, 0.5, "random")
  # magnitude_masks compiles its ranking: a mismatch is still a clear error, raised while tracing.
  with pytest.raises(ValueError, match="shape"):
    dcil_jax.magnitude_masks(params, wrong_shape, 0.5)
  with pytest.raises(ValueError, match="does not mirror"):
    dcil_jax.magnitude_masks(params, wrong_tree, 0.5)


def test_rule_that_selects_nothing_is_rejected(params):
  with pytest.raises(ValueError, match="selects no parameter"):
    dcil_jax.masks_like(params, lambda path, leaf: False)


def test_custom_rule(params):
  masks = dcil_jax.masks_like(params, lambda path, leaf: path[0].key == "head")
  assert masks["head"]["kernel"] is not None and masks["conv1"]["kernel"] is None


def test_apply_masks_zeroes_pruned_entries(params):
  masks = dcil_jax.magnitude_masks(params, masks_lib.masks_like(params, conv_rule), 0.6)
  masked = dcil_jax.apply_masks(params, masks)
  assert float(jnp.sum(masked["conv2"]["kernel"] != 0)) == float(jnp.sum(masks["conv2"]["kernel"]))
  np.testing.assert_array_equal(masked["head"]["kernel"], params["head"]["kernel"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_search_matches_a_stable_sort(seed):
  """The bisection threshold prunes exactly the entries a stable argsort would."""
  rng = np.random.default_rng(seed)
  scores = np.round(rng.exponential(size=5000), 1).astype(np.float32)  # many ties
  scores[:50] = 0.0
  keep = jax.jit(masks_lib._keep_top)
  for k in [0, 1, 49, 50, 51, 2500, 4999, 5000]:
    expected = np.ones(5000, bool)
    expected[np.argsort(scores, kind="stable")[:k]] = False
    np.testing.assert_array_equal(np.asarray(keep(jnp.asarray(scores), k)), expected)
