import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcil_jax
from dcil_jax import granularity as gr
from dcil_jax import stability


def conv_kernels(path, leaf):
  """The zoo's convolution kernels (4-D; its Dense heads are 2-D)."""
  return path[-1].key == "kernel" and leaf.ndim == 4


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


@pytest.fixture(scope="module")
def template(params):
  return dcil_jax.masks_like(params, conv_kernels)


def _filters(m):
  return np.asarray(m).reshape(-1, m.shape[-1])


@pytest.mark.parametrize("score", ["l1", "l2"])
@pytest.mark.parametrize("target", [0.0, 0.3, 0.5, 0.9])
def test_filter_masks_exact_count_and_broadcast(params, template, score, target):
  masks = gr.filter_masks(params, template, target, score)
  assert masks["head"]["kernel"] is None and masks["bn"]["scale"] is None
  total = 8 + 16 + 16
  pruned = 0
  for name in ("conv1", "conv2", "shortcut"):
    m = masks[name]["kernel"]
    assert m.shape == params[name]["kernel"].shape and m.dtype == jnp.bool_
    f = _filters(m)
    assert (f.all(axis=0) | ~f.any(axis=0)).all()  # constant along each filter
    pruned += int((~f.any(axis=0)).sum())
  assert pruned == round(target * total)
  assert float(gr.filter_sparsity(masks)) == pytest.approx(round(target * total) / total)
  assert gr.is_filter_structured(masks)


@pytest.mark.parametrize("score", ["l1", "l2"])
def test_filter_masks_prune_the_lowest_scores_globally(params, template, score):
  masks = gr.filter_masks(params, template, 0.5, score)
  reduce = (lambda w: np.abs(w)) if score == "l1" else np.square
  scores, kept = [], []
  for name in ("conv1", "conv2", "shortcut"):
    w = np.asarray(params[name]["kernel"])
    scores.append(reduce(w).reshape(-1, w.shape[-1]).mean(axis=0))
    kept.append(_filters(masks[name]["kernel"]).any(axis=0))
  scores, kept = np.concatenate(scores), np.concatenate(kept)
  assert scores[kept].min() > scores[~kept].max()


def test_filter_masks_layerwise(params, template):
  masks = gr.filter_masks(params, template, 0.5, distribution="layerwise")
  counts = gr.layer_filter_counts(masks)
  assert {k: (int(v["kept"]), v["total"]) for k, v in counts.items()} == {
    "['conv1']['kernel']": (4, 8),
    "['conv2']['kernel']": (8, 16),
    "['shortcut']['kernel']": (8, 16),
  }


def test_filter_ties_prune_lower_index_first():
  # Lower index first in tree order, except that each layer keeps its best filter (the last of
  # tied bests): without the floor, all of "a" would go.
  params = {"a": {"kernel": jnp.ones((1, 1, 2, 3))}, "b": {"kernel": jnp.ones((1, 1, 2, 3))}}
  masks = gr.filter_masks(params, dcil_jax.masks_like(params, conv_kernels), 0.5)
  assert _filters(masks["a"]["kernel"]).any(axis=0).tolist() == [False, False, True]
  assert _filters(masks["b"]["kernel"]).any(axis=0).tolist() == [False, True, True]


def test_filter_masks_jit_with_traced_sparsity(params, template):
  fn = jax.jit(lambda p, s: gr.filter_masks(p, template, s))
  for target in (0.25, 0.5):  # one compile, a traced sparsity
    got = fn(params, jnp.float32(target))
    want = gr.filter_masks(params, template, target)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_array_equal(a, b)
  assert fn._cache_size() == 1


def test_filter_units_for_stability_metrics(params, template):
  a = gr.filter_masks(params, template, 0.3)
  b = gr.filter_masks(jax.tree.map(lambda x: jnp.flip(x, -1), params), template, 0.3)
  va, vb = gr.filter_view(a), gr.filter_view(b)
  changed = sum(
    int(np.sum(np.asarray(x) != np.asarray(y)))
    for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb))
  )
  assert changed > 0
  assert float(dcil_jax.flip_rate(va, vb)) == pytest.approx(changed / 40)
  assert float(stability.fraction(stability.revived(va, vb))) == pytest.approx(
    sum(
      int(np.sum(~np.asarray(x) & np.asarray(y)))
      for x, y in zip(jax.tree.leaves(va), jax.tree.leaves(vb))
    )
    / 40
  )


def test_filter_bad_input(params, template):
  with pytest.raises(ValueError, match="filter score"):
    gr.filter_masks(params, template, 0.5, score="l3")
  with pytest.raises(ValueError, match="Sparsity"):
    gr.filter_masks(params, template, 1.0)
  with pytest.raises(ValueError, match="distribution"):
    gr.filter_masks(params, template, 0.5, distribution="erk")


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8), (4, 4)])
def test_nm_pattern(params, n, m):
  template, dropped = gr.nm_compatible(params, dcil_jax.masks_like(params, conv_kernels), m)
  assert dropped == ["['conv1']['kernel']"]  # 3 input channels
  masks = gr.nm_masks(params, template, n, m)
  assert masks["conv1"]["kernel"] is None
  for name in ("conv2", "shortcut"):
    w = np.abs(np.moveaxis(np.asarray(params[name]["kernel"]), -2, -1))
    k = np.moveaxis(np.asarray(masks[name]["kernel"]), -2, -1)
    groups_w = w.reshape(-1, m)
    groups_k = k.reshape(-1, m)
    assert (groups_k.sum(axis=1) == n).all()
    # The kept ones are the n largest of each group.
    for gw, gk in zip(groups_w, groups_k):
      if n < m:
        assert gw[gk].min() >= gw[~gk].max()
  assert float(dcil_jax.sparsity(masks)) == pytest.approx(1 - n / m)


def test_nm_ties_and_jit():
  w = jnp.ones((1, 1, 8, 2)).at[0, 0, 5, 0].set(2.0)
  params = {"c": {"kernel": w}}
  masks = jax.jit(lambda p: gr.nm_masks(p, dcil_jax.masks_like(p, conv_kernels), 2, 4))(params)
  k = np.asarray(masks["c"]["kernel"])[0, 0]
  # Filter 0: group 2 has a 2.0 at index 5, then ties pruned lower index first -> keep 5 and 7.
  assert k[:, 0].tolist() == [False, False, True, True, False, True, False, True]
  assert k[:, 1].tolist() == [False, False, True, True, False, False, True, True]


def test_nm_bad_input_names_the_layer(params, template):
  with pytest.raises(ValueError, match=r"\['conv1'\]\['kernel'\] \(shape \(3, 3, 3, 8\)\)"):
    gr.nm_masks(params, template, 2, 4)
  with pytest.raises(ValueError, match="0 < n <= m"):
    gr.nm_masks(params, template, 5, 4)
  with pytest.raises(ValueError, match="integers"):
    gr.nm_masks(params, template, 2.0, 4)


class ThreeConv(nn.Module):
  """A user's own small CNN: three convolutions of widths 8/16/24 under Flax's default init,
  whose kernel scale shrinks with fan-in (so the last layer's filters score lowest)."""

  @nn.compact
  def __call__(self, x):
    for width in (8, 16, 24):
      x = nn.relu(nn.Conv(width, (3, 3))(x))
    return nn.Dense(10)(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def three_conv():
  x = jnp.zeros((2, 8, 8, 1))
  params = ThreeConv().init(jax.random.PRNGKey(0), x)["params"]
  return params, dcil_jax.masks_like(params, lambda path, leaf: leaf.ndim == 4)


def _kept(masks):
  return {k: int(v["kept"]) for k, v in gr.layer_filter_counts(masks).items()}


@pytest.mark.parametrize("score", gr.FILTER_SCORES)
def test_global_filter_masks_never_empty_a_layer(three_conv, score):
  params, template = three_conv
  masks = gr.filter_masks(params, template, 0.5, score)
  kept = _kept(masks)
  assert len(kept) == 3 and min(kept.values()) >= 1, kept
  assert sum(kept.values()) == 24  # the count stays exact while the floor does not bind
  # The same through the optimizer transform the experiments use.
  tx = dcil_jax.masked_update(
    dcil_jax.constant_sparsity(0.5),
    granularity="filter",
    score=score,
    prunable=lambda path, leaf: leaf.ndim == 4,
  )
  state = tx.init(params)
  assert _kept(state.masks) == kept


def test_filter_floor_binds_and_is_reported(three_conv):
  params, template = three_conv
  half = gr.filter_masks(params, template, 0.5)
  assert int(gr.layers_at_floor(half)) == sum(v == 1 for v in _kept(half).values())
  almost_all = gr.filter_masks(params, template, 0.99)
  assert set(_kept(almost_all).values()) == {1}  # 47 of 48 asked for; 45 is the most allowed
  assert int(jax.jit(gr.layers_at_floor)(almost_all)) == 3
  layerwise = gr.filter_masks(params, template, 0.99, distribution="layerwise")
  assert int(gr.layers_at_floor(layerwise)) == 3


def test_relative_filter_scores_ignore_each_layer_s_scale(three_conv):
  """Scaling one layer's kernel changes raw-score masks (that layer wins or loses filters) but
  not layer-relative ones, which rank each filter against its own layer."""
  params, template = three_conv
  scaled = jax.tree.map(lambda x: x, params)
  scaled["Conv_2"] = {**params["Conv_2"], "kernel": params["Conv_2"]["kernel"] * 100.0}
  for score in ("l1_relative", "l2_relative"):
    a, b = (gr.filter_masks(p, template, 0.5, score) for p in (params, scaled))
    assert _kept(a) == _kept(b)
    means = [float(jnp.mean(s)) for s in jax.tree.leaves(gr.filter_scores(params, template, score))]
    assert means == pytest.approx([1.0, 1.0, 1.0], rel=1e-6)
  raw = [_kept(gr.filter_masks(p, template, 0.5, "l1")) for p in (params, scaled)]
  assert raw[0]["['Conv_2']['kernel']"] < raw[1]["['Conv_2']['kernel']"]
