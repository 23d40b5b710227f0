"""Flax NNX models get the guarantees of Linen ones (issue 15)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NUM_CLASSES, tree_allclose
from flax import nnx

import dcil_jax
from dcil_jax import paths


class NNXSmallCNN(nnx.Module):
  """``dcil_jax.models.SmallCNN(widths=(4, 8))`` written in NNX, with the same parameter names."""

  def __init__(self, rngs: nnx.Rngs, dropout: float = 0.0):
    conv = lambda i, o, s: nnx.Conv(  # noqa: E731
      i, o, (3, 3), strides=s, padding=1, use_bias=False, rngs=rngs
    )
    bn = lambda c: nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs)  # noqa: E731
    self.Conv_0, self.BatchNorm_0 = conv(1, 4, 1), bn(4)
    self.Conv_1, self.BatchNorm_1 = conv(4, 8, 2), bn(8)
    self.Dense_0 = nnx.Linear(8, NUM_CLASSES, rngs=rngs)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout else None

  def __call__(self, x):
    x = nnx.relu(self.BatchNorm_0(self.Conv_0(x)))
    x = nnx.relu(self.BatchNorm_1(self.Conv_1(x)))
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout is not None:
      x = self.dropout(x)
    return self.Dense_0(x)


def make_tx():
  return optax.chain(
    optax.sgd(0.05, momentum=0.9),
    dcil_jax.masked_update(dcil_jax.cubic_sparsity(0.75, 4), 2),
  )


@pytest.fixture(scope="module")
def nnx_model():
  model, _ = dcil_jax.from_nnx(NNXSmallCNN(nnx.Rngs(0)))
  return model


def test_the_nnx_variables_are_the_linen_ones(nnx_model, tiny_variables):
  _, variables = dcil_jax.from_nnx(NNXSmallCNN(nnx.Rngs(0)))
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, tiny_variables)


@pytest.mark.parametrize(
  "method, strategy",
  [("dcil", "unrolled"), ("dcil", "vmap"), ("dpf", None), ("dense", None)],
)
def test_one_step_equals_the_linen_model(
  method, strategy, nnx_model, tiny_model, tiny_variables, tiny_batch
):
  """Loss, every metric, every new parameter and BN statistic: NNX == Linen, same weights."""
  tx = make_tx() if method != "dense" else optax.sgd(0.05, momentum=0.9)
  kwargs = {"method": method, "strategy": strategy} if strategy else {"method": method}
  x = tiny_batch["image"]
  states = [
    dcil_jax.TrainState.create(nnx_model, tiny_variables, tx, **kwargs),
    dcil_jax.TrainState.create(tiny_model, tiny_variables, tx, example_input=x, **kwargs),
  ]
  if method != "dense":  # the NNX rule found the same convolutions without an example input
    assert set(states[0].params["prunable"]) == {"Conv_0", "Conv_1"}
  results = []
  for state in states:
    for _ in range(3):  # crosses a refresh
      state, metrics = dcil_jax.train_step(state, tiny_batch)
    results.append((state, metrics))
  (nnx_state, nnx_metrics), (linen_state, linen_metrics) = results
  tree_allclose(nnx_metrics, linen_metrics, rtol=1e-5, atol=1e-6)
  tree_allclose(nnx_state.params, linen_state.params, rtol=1e-5, atol=1e-6)
  tree_allclose(nnx_state.model_state, linen_state.model_state, rtol=1e-5, atol=1e-6)
  tree_allclose(
    dcil_jax.eval_step(nnx_state, tiny_batch), dcil_jax.eval_step(linen_state, tiny_batch)
  )


def test_gradients_equal_the_linen_model(nnx_model, tiny_model, tiny_variables, tiny_batch):
  rule = dcil_jax.rules.conv_kernels(nnx_model)
  params = paths.split_params(tiny_variables["params"], rule)
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params), 0.5)
  stats = paths.split_collections({"batch_stats": tiny_variables["batch_stats"]})

  def grads(model):
    fn = lambda p: dcil_jax.dcil_loss(model, p, masks, tiny_batch, stats, kd_weight=1.0)  # noqa: E731
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)

  (loss_n, aux_n), g_n = grads(nnx_model)
  (loss_l, aux_l), g_l = grads(tiny_model)
  assert float(loss_n) == pytest.approx(float(loss_l), rel=1e-6)
  tree_allclose(g_n, g_l, rtol=1e-5, atol=1e-7)
  tree_allclose(aux_n["model_state"], aux_l["model_state"])


def test_export_writes_back_into_the_users_class(nnx_model, tiny_variables, tiny_batch):
  state = dcil_jax.TrainState.create(nnx_model, tiny_variables, make_tx())
  for _ in range(3):
    state, _ = dcil_jax.train_step(state, tiny_batch)
  module = dcil_jax.to_nnx(nnx_model, dcil_jax.export_variables(state))
  assert isinstance(module, NNXSmallCNN)
  logits = module(tiny_batch["image"])  # eval mode: running statistics
  sums = dcil_jax.eval_step(state, tiny_batch)
  hits = jnp.sum(jnp.argmax(logits, -1) == tiny_batch["label"])
  assert float(sums["top1"]) == float(hits)
  np.testing.assert_array_equal(
    module.Conv_1.kernel[...] != 0, state.trained_masks["prunable"]["Conv_1"]["kernel"]
  )


def test_each_path_draws_its_own_dropout_mask(tiny_batch):
  model, variables = dcil_jax.from_nnx(NNXSmallCNN(nnx.Rngs(0, dropout=1), dropout=0.5))
  assert model.rng_tags == ("dropout",)
  params = paths.split_params(variables["params"], dcil_jax.rules.conv_kernels(model))
  masks = dcil_jax.masks_like(params)  # all kept: the paths differ by dropout alone
  stats = paths.split_collections({"batch_stats": variables["batch_stats"]})
  rngs = {"dropout": jax.random.PRNGKey(3)}
  loss = jax.jit(
    lambda strategy: dcil_jax.dcil_loss(
      model, params, masks, tiny_batch, stats, rngs=rngs, strategy=strategy
    ),
    static_argnums=0,
  )
  _, aux = loss("unrolled")
  z_s, z_d = aux["logits"]
  assert not np.allclose(z_s, z_d)
  _, again = loss("vmap")
  tree_allclose(again["logits"], aux["logits"], rtol=1e-5, atol=1e-6)


def test_bad_input_is_a_clear_error(tiny_batch):
  class NoConv(nnx.Module):
    def __init__(self, rngs):
      self.head = nnx.Linear(64, NUM_CLASSES, rngs=rngs)

    def __call__(self, x):
      return self.head(x.reshape(x.shape[0], -1))

  model, variables = dcil_jax.from_nnx(NoConv(nnx.Rngs(0)))
  with pytest.raises(ValueError, match="selects no parameter"):
    dcil_jax.TrainState.create(model, variables, make_tx())

  class NoParams(nnx.Module):
    def __call__(self, x):
      return x

  with pytest.raises(ValueError, match="no nnx.Param"):
    dcil_jax.from_nnx(NoParams())

  model, variables = dcil_jax.from_nnx(NNXSmallCNN(nnx.Rngs(0, dropout=1), dropout=0.5))
  with pytest.raises(ValueError, match="rng streams"):
    dcil_jax.TrainState.create(model, variables, make_tx(), rng_names=("noise",))
  with pytest.raises(TypeError, match="from_nnx"):
    dcil_jax.TrainState.create(NNXSmallCNN(nnx.Rngs(0)), variables, make_tx())


def test_a_short_run_on_the_offline_digits():
  """End to end: loss falls, the sparsity is exact, export equals eval."""
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = jnp.asarray(digits.images[:512, :, :, None] / 16.0, jnp.float32)
  y = jnp.asarray(digits.target[:512], jnp.int32)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(1, 16, (3, 3), rngs=rngs)
      self.bn1 = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
      self.conv2 = nnx.Conv(16, 32, (3, 3), strides=2, rngs=rngs)
      self.bn2 = nnx.BatchNorm(32, momentum=0.9, rngs=rngs)
      self.head = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn1(self.conv1(x)))
      x = nnx.relu(self.bn2(self.conv2(x)))
      return self.head(x.mean(axis=(1, 2)))

  model, variables = dcil_jax.from_nnx(Net(nnx.Rngs(0)))
  tx = optax.chain(
    optax.sgd(0.1, momentum=0.9), dcil_jax.masked_update(dcil_jax.cubic_sparsity(0.7, 24), 4)
  )
  state = dcil_jax.TrainState.create(model, variables, tx)
  losses = []
  for step in range(40):
    idx = (np.arange(64) + 64 * step) % 512
    state, metrics = dcil_jax.train_step(state, {"image": x[idx], "label": y[idx]})
    losses.append(float(metrics["loss"]))
  assert np.mean(losses[-5:]) < np.mean(losses[:5])
  n = sum(m.size for m in jax.tree.leaves(state.trained_masks))
  assert int(sum(jnp.sum(~m) for m in jax.tree.leaves(state.trained_masks))) == round(0.7 * n)
  module = dcil_jax.to_nnx(model, dcil_jax.export_variables(state))
  sums = dcil_jax.eval_step(state, {"image": x, "label": y})
  assert float(sums["top1"]) == float(jnp.sum(jnp.argmax(module(x), -1) == y))
  assert float(sums["top1"]) / 512 > 0.3  # learned something in 40 steps
