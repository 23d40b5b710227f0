"""The method itself: gradient routing of DCIL and DPF against independent plain applies."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_allclose

import dcil_jax
from dcil_jax import losses, paths

KD = 1.0  # exercise the distillation terms too


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_variables):
  params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params), 0.6)
  dual, dual_stats = dcil_jax.to_dual_path(params, masks, stats)

  def make_paths_differ(x):  # distinct BN/head per path, so a routing mix-up shows
    if paths.is_per_path(x):
      return paths.PerPath(x.value.at[1].set(x.value[1] * 1.5 + 0.1))
    return x

  dual = jax.tree.map(make_paths_differ, dual, is_leaf=paths.is_per_path)
  return tiny_model.apply, masks, dual, dual_stats


def reference(apply_fn, masks, dual, dual_stats, batch, temperature=2.0):
  """Two independent plain applies: sparse (W⊙M, BN_s, FC_s) and dense (W, BN_d, FC_d)."""
  x, y = batch["image"], batch["label"]
  sparse_p = dcil_jax.apply_masks(paths.select_path(dual, 0), masks)
  dense_p = paths.select_path(dual, 1)
  stats = [paths.select_path(dual_stats, i) for i in range(2)]
  f = lambda p, i: losses.apply_train(apply_fn, p, stats[i], x)[0]  # noqa: E731
  z_s, z_d = f(sparse_p, 0), f(dense_p, 1)

  def loss_s(p):
    z = f(p, 0)
    return losses.cross_entropy(z, y) + KD * losses.distillation_kl(z, z_d, temperature)

  def loss_d(p):
    z = f(p, 1)
    return losses.cross_entropy(z, y) + KD * losses.distillation_kl(z, z_s, temperature)

  (l_s, g_s), (l_d, g_d) = jax.value_and_grad(loss_s)(sparse_p), jax.value_and_grad(loss_d)(dense_p)
  return l_s + l_d, g_s, g_d


def dcil_value_and_grad(apply_fn, masks, dual, dual_stats, batch, strategy):
  fn = lambda p: dcil_jax.dcil_loss(  # noqa: E731
    apply_fn, p, masks, batch, dual_stats, kd_weight=KD, strategy=strategy
  )
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(dual)


@pytest.fixture(scope="module")
def dcil_unrolled(setup, tiny_batch):
  return dcil_value_and_grad(*setup, tiny_batch, "unrolled")


def test_dcil_gradient_routing(setup, tiny_batch, dcil_unrolled):
  apply_fn, masks, dual, dual_stats = setup
  (loss, _), grads = dcil_unrolled
  ref_loss, g_s, g_d = reference(apply_fn, masks, dual, dual_stats, tiny_batch)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)

  def expected(m, p, gs, gd):
    if paths.is_per_path(p):  # BN_s/FC_s only from sparse terms, BN_d/FC_d only from dense ones
      return paths.PerPath(jnp.stack([gs, gd]))
    return jnp.where(m, gs, gd)  # refined gradient M⊙g_sparse + (1−M)⊙g_dense

  sparse_tree = paths.select_path(dual, 0)
  exp = jax.tree.map(
    lambda m, p, gs, gd: expected(m, p, gs, gd),
    masks,
    dual,
    jax.tree.map(lambda _, g: g, sparse_tree, g_s),
    jax.tree.map(lambda _, g: g, sparse_tree, g_d),
    is_leaf=lambda x: x is None or paths.is_per_path(x),
  )
  tree_allclose(grads, exp, rtol=1e-4, atol=1e-6)
  # Every pruned weight gets a gradient (from the dense path), unlike a plain masked model.
  kernel_grad = grads["Conv_1"]["kernel"]
  assert float(jnp.mean(kernel_grad[~masks["Conv_1"]["kernel"]] != 0)) > 0.9


def test_bn_statistics_are_updated_per_path(setup, tiny_batch, dcil_unrolled):
  apply_fn, masks, dual, dual_stats = setup
  (_, aux), _ = dcil_unrolled
  x = tiny_batch["image"]
  sparse_p = dcil_jax.apply_masks(paths.select_path(dual, 0), masks)
  _, stats_s = losses.apply_train(apply_fn, sparse_p, paths.select_path(dual_stats, 0), x)
  _, stats_d = losses.apply_train(
    apply_fn, paths.select_path(dual, 1), paths.select_path(dual_stats, 1), x
  )
  tree_allclose(paths.select_path(aux["batch_stats"], 0), stats_s)
  tree_allclose(paths.select_path(aux["batch_stats"], 1), stats_d)


def test_kd_weight_zero_leaves_only_cross_entropy(setup, tiny_batch):
  apply_fn, masks, dual, dual_stats = setup
  loss, aux = dcil_jax.dcil_loss(apply_fn, dual, masks, tiny_batch, dual_stats, kd_weight=0.0)
  assert float(loss) == pytest.approx(float(jnp.sum(aux["ce"])), rel=1e-6)
  assert aux["logits"].shape == (2, 8, 5)
  assert aux["ce"].shape == aux["kl"].shape == aux["accuracy"].shape == (2,)


def test_vmap_strategy_equals_unrolled(setup, tiny_batch, dcil_unrolled):
  (loss_u, aux_u), grads_u = dcil_unrolled
  (loss_v, aux_v), grads_v = dcil_value_and_grad(*setup, tiny_batch, "vmap")
  assert float(loss_v) == pytest.approx(float(loss_u), rel=1e-5)
  tree_allclose(grads_v, grads_u, rtol=1e-4, atol=1e-6)
  tree_allclose(aux_v["batch_stats"], aux_u["batch_stats"])


def test_distillation_kl_matches_formula():
  k1, k2 = jax.random.split(jax.random.PRNGKey(3))
  a, b = jax.random.normal(k1, (6, 4)) * 3, jax.random.normal(k2, (6, 4)) * 3
  t = 2.0
  q = np.exp(np.asarray(b) / t) / np.exp(np.asarray(b) / t).sum(-1, keepdims=True)
  log_p = np.asarray(jax.nn.log_softmax(a / t))
  expected = t**2 * np.mean(np.sum(q * (np.log(q) - log_p), -1))
  assert float(dcil_jax.distillation_kl(a, b, t)) == pytest.approx(expected, rel=1e-5)
  grad_b = jax.grad(lambda b: dcil_jax.distillation_kl(a, b, t))(b)
  assert float(jnp.max(jnp.abs(grad_b))) == 0.0  # the target is detached


def test_dpf_applies_the_pruned_model_gradient_to_every_weight(
  tiny_model, tiny_variables, tiny_batch
):
  params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params), 0.6)
  (loss, _), grads = jax.value_and_grad(dcil_jax.dpf_loss, argnums=1, has_aux=True)(
    tiny_model.apply, params, masks, tiny_batch, stats
  )
  pruned = dcil_jax.apply_masks(params, masks)
  plain = lambda p: losses.cross_entropy(  # noqa: E731
    losses.apply_train(tiny_model.apply, p, stats, tiny_batch["image"])[0], tiny_batch["label"]
  )
  ref_loss, ref_grads = jax.value_and_grad(plain)(pruned)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  tree_allclose(grads, ref_grads, rtol=1e-5)
  pruned_entries = ~masks["Conv_1"]["kernel"]
  assert float(jnp.mean(grads["Conv_1"]["kernel"][pruned_entries] != 0)) > 0.9


def test_dense_loss_is_plain_cross_entropy(tiny_model, tiny_variables, tiny_batch):
  params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
  loss, aux = dcil_jax.dense_loss(tiny_model.apply, params, None, tiny_batch, stats)
  logits, _ = tiny_model.apply(
    tiny_variables, tiny_batch["image"], train=True, mutable=["batch_stats"]
  )
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, tiny_batch["label"]).mean()
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  assert aux["logits"].shape == (8, 5)


def test_unknown_strategy_is_rejected(setup, tiny_batch):
  apply_fn, masks, dual, dual_stats = setup
  with pytest.raises(ValueError, match="Unknown path strategy"):
    dcil_jax.dcil_loss(apply_fn, dual, masks, tiny_batch, dual_stats, strategy="pmap")
  with pytest.raises(ValueError, match="needs a mesh"):
    dcil_jax.dcil_loss(apply_fn, dual, masks, tiny_batch, dual_stats, strategy="sharded")


def test_shared_bn_and_head_ablation_sums_both_paths(tiny_model, tiny_variables, tiny_batch):
  params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params), 0.6)
  shared, dual_stats = dcil_jax.to_dual_path(params, masks, stats, share_non_prunable=True)
  assert not isinstance(shared["Dense_0"]["kernel"], dcil_jax.PerPath)
  per_path, _ = dcil_jax.to_dual_path(params, masks, stats)
  loss_fn = lambda p: dcil_jax.dcil_loss(tiny_model.apply, p, masks, tiny_batch, dual_stats)[0]  # noqa: E731
  g_shared, g_per_path = jax.grad(loss_fn)(shared), jax.grad(loss_fn)(per_path)
  # Identical forward values, so the shared head's gradient is the sum over the two paths.
  assert float(loss_fn(shared)) == pytest.approx(float(loss_fn(per_path)), rel=1e-6)
  head = g_per_path["Dense_0"]["kernel"].value
  np.testing.assert_allclose(g_shared["Dense_0"]["kernel"], head[0] + head[1], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(
    g_shared["Conv_1"]["kernel"], g_per_path["Conv_1"]["kernel"], rtol=1e-5
  )


@pytest.mark.parametrize("strategy", ["unrolled", "vmap"])
def test_model_without_batchnorm(strategy, tiny_batch):
  import flax.linen as nn

  class NoBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.relu(nn.Conv(4, (3, 3))(x))
      return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))

  model = NoBN()
  params = model.init(jax.random.PRNGKey(0), tiny_batch["image"])["params"]
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params), 0.5)
  dual, stats = dcil_jax.to_dual_path(params, masks)
  assert stats is None
  loss, aux = dcil_jax.dcil_loss(model.apply, dual, masks, tiny_batch, strategy=strategy)
  assert aux["batch_stats"] is None and aux["logits"].shape == (2, 8, 5)
  sparse = dcil_jax.apply_masks(paths.select_path(dual, 0), masks)
  z_s = model.apply({"params": sparse}, tiny_batch["image"])
  np.testing.assert_allclose(aux["logits"][0], z_s, rtol=1e-5, atol=1e-6)
