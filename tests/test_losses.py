"""The method itself: gradient routing of DCIL and DPF against independent plain applies."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import lifted, tree_allclose

import dcil_jax
from dcil_jax import losses, paths, rules

KD = 1.0  # exercise the distillation terms too


def plain_apply(model, params, state, x):
  """A plain train-mode apply: (logits, new collections)."""
  return dcil_jax.as_model(model).apply_train({"params": params, **(state or {})}, x)


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_variables, tiny_batch):
  dual, masks, stats = lifted(tiny_model, tiny_variables, tiny_batch["image"])
  # distinct BN/head per path, so a routing mix-up shows
  dual["dense"] = jax.tree.map(lambda x: x * 1.5 + 0.1, dual["dense"])
  return tiny_model, masks, dual, stats


def reference(model, masks, dual, dual_stats, batch, temperature=2.0):
  """Two independent plain applies: sparse (W⊙M, BN_s, FC_s) and dense (W, BN_d, FC_d)."""
  x, y = batch["image"], batch["label"]
  sparse_p = dcil_jax.export_variables(dual, masks, path="sparse")["params"]
  dense_p = dcil_jax.export_variables(dual, masks, path="dense")["params"]
  stats = [dual_stats[name] for name in paths.PATH_NAMES]
  f = lambda p, i: plain_apply(model, p, stats[i], x)[0]  # noqa: E731
  z_s, z_d = f(sparse_p, 0), f(dense_p, 1)

  def loss_s(p):
    z = f(p, 0)
    return losses.cross_entropy(z, y) + KD * losses.distillation_kl(z, z_d, temperature)

  def loss_d(p):
    z = f(p, 1)
    return losses.cross_entropy(z, y) + KD * losses.distillation_kl(z, z_s, temperature)

  l_s, g_s = jax.jit(jax.value_and_grad(loss_s))(sparse_p)
  l_d, g_d = jax.jit(jax.value_and_grad(loss_d))(dense_p)
  return l_s + l_d, g_s, g_d


def dcil_value_and_grad(model, masks, dual, dual_stats, batch, strategy):
  fn = lambda p: dcil_jax.dcil_loss(  # noqa: E731
    model, p, masks, batch, dual_stats, kd_weight=KD, strategy=strategy
  )
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(dual)


@pytest.fixture(scope="module")
def dcil_unrolled(setup, tiny_batch):
  return dcil_value_and_grad(*setup, tiny_batch, "unrolled")


def test_dcil_gradient_routing(setup, tiny_batch, dcil_unrolled):
  model, masks, dual, dual_stats = setup
  (loss, _), grads = dcil_unrolled
  ref_loss, g_s, g_d = reference(model, masks, dual, dual_stats, tiny_batch)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
  # Kernels: the refined gradient M⊙g_sparse + (1−M)⊙g_dense. BN_s/FC_s only from the sparse
  # terms, BN_d/FC_d only from the dense ones.
  kernels = jax.tree.map(
    lambda m, _, gs, gd: jnp.where(m, gs, gd),
    masks["prunable"],
    dual["prunable"],
    *(paths.partition(g, lambda p, _: jax.tree_util.keystr(p) in KERNELS)[0] for g in (g_s, g_d)),
  )
  own = [
    paths.partition(g, lambda p, _: jax.tree_util.keystr(p) not in KERNELS)[0] for g in (g_s, g_d)
  ]
  expected = {"prunable": kernels, "sparse": own[0], "dense": own[1]}
  tree_allclose(grads, expected, rtol=1e-4, atol=1e-6)
  # Every pruned weight gets a gradient (from the dense path), unlike a plain masked model.
  kernel_grad = grads["prunable"]["Conv_1"]["kernel"]
  assert float(jnp.mean(kernel_grad[~masks["prunable"]["Conv_1"]["kernel"]] != 0)) > 0.9


KERNELS = {"['Conv_0']['kernel']", "['Conv_1']['kernel']"}


def test_optimizer_sees_the_plain_shapes_and_names(setup, tiny_variables):
  _, _, dual, _ = setup
  plain = {
    jax.tree_util.keystr(p): (rules.key_names(p)[-1], x.shape)
    for p, x in jax.tree_util.tree_flatten_with_path(tiny_variables["params"])[0]
  }
  for path, x in jax.tree_util.tree_flatten_with_path(dual)[0]:
    own = jax.tree_util.keystr(path[1:])
    assert plain[own] == (rules.key_names(path)[-1], x.shape), own


def test_bn_statistics_are_updated_per_path(setup, tiny_batch, dcil_unrolled):
  model, masks, dual, dual_stats = setup
  (_, aux), _ = dcil_unrolled
  x = tiny_batch["image"]
  for name in paths.PATH_NAMES:
    p = dcil_jax.export_variables(dual, masks, path=name)["params"]
    _, expected = plain_apply(model, p, dual_stats[name], x)
    tree_allclose(aux["model_state"][name], expected)


def test_kd_weight_zero_leaves_only_cross_entropy(setup, tiny_batch):
  model, masks, dual, dual_stats = setup
  loss, aux = dcil_jax.dcil_loss(model, dual, masks, tiny_batch, dual_stats, kd_weight=0.0)
  assert float(loss) == pytest.approx(float(jnp.sum(aux["ce"])), rel=1e-6)
  assert [z.shape for z in aux["logits"]] == [(8, 5), (8, 5)]
  assert aux["ce"].shape == aux["kl"].shape == aux["accuracy"].shape == (2,)


def test_vmap_strategy_equals_unrolled(setup, tiny_batch, dcil_unrolled):
  (loss_u, aux_u), grads_u = dcil_unrolled
  (loss_v, aux_v), grads_v = dcil_value_and_grad(*setup, tiny_batch, "vmap")
  assert float(loss_v) == pytest.approx(float(loss_u), rel=1e-5)
  tree_allclose(grads_v, grads_u, rtol=1e-4, atol=1e-6)
  tree_allclose(aux_v["model_state"], aux_u["model_state"])


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
  params, masks, stats = lifted(
    tiny_model, tiny_variables, tiny_batch["image"], path_names=("sparse",)
  )
  (loss, _), grads = jax.value_and_grad(dcil_jax.dpf_loss, argnums=1, has_aux=True)(
    tiny_model, params, masks, tiny_batch, stats
  )
  pruned = dcil_jax.export_variables(params, masks)["params"]
  plain = lambda p: losses.cross_entropy(  # noqa: E731
    plain_apply(tiny_model, p, stats["sparse"], tiny_batch["image"])[0], tiny_batch["label"]
  )
  ref_loss, ref_grads = jax.value_and_grad(plain)(pruned)
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  tree_allclose(
    grads,
    paths.split_params(
      ref_grads, lambda p, _: jax.tree_util.keystr(p) in KERNELS, path_names=("sparse",)
    ),
    rtol=1e-5,
  )
  pruned_entries = ~masks["prunable"]["Conv_1"]["kernel"]
  assert float(jnp.mean(grads["prunable"]["Conv_1"]["kernel"][pruned_entries] != 0)) > 0.9


def test_dense_loss_is_plain_cross_entropy(tiny_model, tiny_variables, tiny_batch):
  params, stats = tiny_variables["params"], tiny_variables["batch_stats"]
  loss, aux = dcil_jax.dense_loss(tiny_model, params, None, tiny_batch, {"batch_stats": stats})
  logits, _ = tiny_model.apply(
    tiny_variables, tiny_batch["image"], train=True, mutable=["batch_stats"]
  )
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, tiny_batch["label"]).mean()
  assert float(loss) == pytest.approx(float(expected), rel=1e-6)
  assert aux["logits"].shape == (8, 5)


def test_unknown_strategy_is_rejected(setup, tiny_batch):
  model, masks, dual, dual_stats = setup
  with pytest.raises(ValueError, match="Unknown path strategy"):
    dcil_jax.dcil_loss(model, dual, masks, tiny_batch, dual_stats, strategy="pmap")
  with pytest.raises(ValueError, match="needs a mesh"):
    dcil_jax.dcil_loss(model, dual, masks, tiny_batch, dual_stats, strategy="sharded")


def test_shared_bn_and_head_ablation_sums_both_paths(tiny_model, tiny_variables, tiny_batch):
  x = tiny_batch["image"]
  shared, masks_shared, stats = lifted(tiny_model, tiny_variables, x, share_non_prunable=True)
  per_path, masks, _ = lifted(tiny_model, tiny_variables, x)
  assert set(shared) == {"prunable", "shared"} and set(per_path) == {"prunable", "sparse", "dense"}
  loss_fn = lambda p, m: dcil_jax.dcil_loss(tiny_model, p, m, tiny_batch, stats)[0]  # noqa: E731
  g_shared, g_per_path = jax.grad(loss_fn)(shared, masks_shared), jax.grad(loss_fn)(per_path, masks)
  # Identical forward values, so the shared head's gradient is the sum over the two paths.
  assert float(loss_fn(shared, masks_shared)) == pytest.approx(
    float(loss_fn(per_path, masks)), rel=1e-6
  )
  heads = [g_per_path[name]["Dense_0"]["kernel"] for name in paths.PATH_NAMES]
  np.testing.assert_allclose(
    g_shared["shared"]["Dense_0"]["kernel"], heads[0] + heads[1], rtol=1e-5, atol=1e-7
  )
  np.testing.assert_allclose(
    g_shared["prunable"]["Conv_1"]["kernel"], g_per_path["prunable"]["Conv_1"]["kernel"], rtol=1e-5
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
  variables = model.init(jax.random.PRNGKey(0), tiny_batch["image"])
  dual, masks, stats = lifted(model, variables, tiny_batch["image"], 0.5)
  assert stats is None
  loss, aux = dcil_jax.dcil_loss(model, dual, masks, tiny_batch, strategy=strategy)
  assert aux["model_state"] is None and aux["logits"][0].shape == (8, 5)
  sparse = dcil_jax.export_variables(dual, masks)
  z_s = model.apply(sparse, tiny_batch["image"])
  np.testing.assert_allclose(aux["logits"][0], z_s, rtol=1e-5, atol=1e-6)
