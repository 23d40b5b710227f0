"""Model zoo checks: big models only go through ``jax.eval_shape``; real passes use tiny ones."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

import dcil_jax
from dcil_jax.models import MODELS, VGG, WideResNet, create_model, resnet_tiny
from dcil_jax.models.wrn import PreActBlock

KEY = jax.random.PRNGKey(0)
# Real inits use the "rbg" PRNG: threefry's init graphs take ~3x longer to compile on CPU, and the
# initializers' distributions do not depend on the generator.
FAST_KEY = jax.random.key(0, impl="rbg")
IMAGES = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)


def num_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))


@functools.cache
def abstract_variables(name: str, num_classes: int):
  """Shapes of a model's variables, traced once per (name, num_classes) for the whole file."""
  return jax.eval_shape(create_model(name, num_classes).init, KEY, IMAGES)


@pytest.mark.parametrize(
  "name, num_classes, expected",
  [
    ("resnet50", 1000, 25_557_032),  # torchvision's resnet50
    ("resnet18", 1000, 11_689_512),  # torchvision's resnet18
    ("wrn28_2", 10, 1_467_610),  # DPF: 1.47M
    ("vgg16", 10, 14_724_042),  # 14.7M; bias-free convs, single dense head
    ("resnet20", 10, 272_474),  # regression values of the CIFAR ResNets (1x1 conv + BN shortcuts)
    ("resnet32", 10, 466_906),
  ],
)
def test_param_counts(name, num_classes, expected):
  count = num_params(abstract_variables(name, num_classes)["params"])
  assert count == expected
  published = {"wrn28_2": 1.47e6, "vgg16": 14.7e6}.get(name)
  if published:
    assert count == pytest.approx(published, rel=0.01)


SIGNAL_MODELS = ("mnist1d_cnn", "resnet1d")  # 1-D inputs [batch, length, channels]


@pytest.mark.parametrize("name", sorted(set(MODELS) - set(SIGNAL_MODELS)))
def test_create_model_output_shape(name):
  model = create_model(name, 7)
  assert model.num_classes == 7
  logits = jax.eval_shape(model.apply, abstract_variables(name, 7), IMAGES)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32


def test_create_model_unknown_name():
  with pytest.raises(ValueError, match=r"Unknown model 'resnet1000'.*wrn28_2"):
    create_model("resnet1000", 10)


def test_wrn_layout():
  """28 = 25 3x3 convs + 3 BN-free 1x1 shortcuts (one per stage, stage 1 too: 16 -> 32)."""
  params = abstract_variables("wrn28_2", 10)["params"]
  flat = traverse_util.flatten_dict(params)
  kernels = [v.shape for k, v in flat.items() if k[-1] == "kernel" and len(v.shape) == 4]
  assert sum(s[:2] == (3, 3) for s in kernels) == 25
  assert sorted(s for s in kernels if s[:2] == (1, 1)) == [
    (1, 1, 16, 32),
    (1, 1, 32, 64),
    (1, 1, 64, 128),
  ]
  # Two BNs per block and the final one: no BN on the shortcuts.
  assert sum(k[-1] == "scale" for k in flat) == 2 * 12 + 1
  assert params["Dense_0"]["kernel"].shape == (128, 10)


def test_wrn_projection_takes_pre_activated_input():
  """With the main path zeroed, a projection block returns conv1x1(relu(bn(x))), not conv1x1(x)."""
  block = PreActBlock(features=4, strides=1)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 4, 4, 3))
  variables = jax.jit(functools.partial(block.init, train=False))(FAST_KEY, x)
  params = variables["params"]
  params = {**params, "Conv_0": {"kernel": jnp.zeros_like(params["Conv_0"]["kernel"])}}
  y = block.apply({**variables, "params": params}, x, train=False)
  w = params["Conv_2"]["kernel"][0, 0]  # the 1x1 shortcut, created after the two 3x3 convs
  # Fresh running stats (mean 0, var 1): BN is x / sqrt(1 + eps).
  np.testing.assert_allclose(y, jax.nn.relu(x / np.sqrt(1 + 1e-5)) @ w, rtol=1e-5, atol=1e-6)


TINY = {
  "wrn": (functools.partial(WideResNet, depth=10, widen_factor=2), (2, 8, 8, 3)),
  "vgg": (functools.partial(VGG, config=(16, 64, "M", 64, "M")), (2, 8, 8, 3)),
  "resnet": (resnet_tiny, (2, 16, 16, 3)),
}


@functools.cache
def tiny(name: str):
  """A tiny instance of each family, its input and its variables, built once for the file."""
  make, shape = TINY[name]
  model = make(num_classes=3)
  x = jax.random.normal(jax.random.PRNGKey(1), shape)
  return model, x, jax.jit(model.init)(FAST_KEY, x)


@pytest.mark.parametrize("name", sorted(TINY))
def test_tiny_forward(name):
  model, x, variables = tiny(name)
  logits, _ = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))(
    variables, x
  )
  assert logits.shape == (2, 3) and np.isfinite(logits).all()
  assert np.isfinite(jax.jit(model.apply)(variables, x)).all()


@pytest.mark.parametrize("name", sorted(TINY))
def test_conv_init_is_kaiming_fan_out(name):
  """Every conv kernel with >= 1000 weights (up to 3x3x128x128, and 1x1 shortcuts, where fan-in
  and fan-out differ) has std sqrt(2 / (kh * kw * out)) within 10 %."""
  _, _, variables = tiny(name)
  flat = traverse_util.flatten_dict(variables["params"])
  kernels = [v for k, v in flat.items() if k[-1] == "kernel" and v.ndim == 4 and v.size >= 1000]
  assert len(kernels) >= 2
  for kernel in kernels:
    kh, kw, _, out = kernel.shape
    expected = np.sqrt(2.0 / (kh * kw * out))
    assert float(jnp.std(kernel)) == pytest.approx(expected, rel=0.1), kernel.shape
    assert abs(float(jnp.mean(kernel))) < 0.1 * expected


def conv_outputs(intermediates) -> list:
  flat = traverse_util.flatten_dict(intermediates)
  return [v[0] for k, v in flat.items() if len(k) > 1 and k[-2].startswith("Conv_")]


@pytest.mark.parametrize("name", ["wrn28_2", "vgg16", "resnet50"])
def test_bfloat16_compute_float32_params_and_logits(name):
  model = create_model(name, 10, dtype=jnp.bfloat16)
  variables = jax.eval_shape(model.init, KEY, IMAGES)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  apply = functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"])
  logits, state = jax.eval_shape(apply, variables, IMAGES)
  assert logits.dtype == jnp.float32
  convs = conv_outputs(state["intermediates"])
  assert len(convs) >= 13
  assert {v.dtype for v in convs} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_tiny_forward():
  """The same with real numbers on the tiny ResNet: bf16 convs, f32 params and logits."""
  _, x, variables = tiny("resnet")  # the same variables as in float32
  model = resnet_tiny(num_classes=3, dtype=jnp.bfloat16)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  apply = functools.partial(model.apply, capture_intermediates=True, mutable=["intermediates"])
  logits, state = jax.jit(apply)(variables, x)
  assert logits.dtype == jnp.float32 and np.isfinite(logits).all()
  convs = conv_outputs(state["intermediates"])
  assert len(convs) == 6 and {v.dtype for v in convs} == {jnp.dtype(jnp.bfloat16)}


def test_batch_stats_update_in_train_mode_only():
  model, x, variables = tiny("resnet")
  x = x + 3.0  # far from the initial running mean
  stats = variables["batch_stats"]
  assert len(jax.tree.leaves(stats)) == 2 * 6  # mean and var: stem, 2 x 2 in blocks, 1 shortcut

  @jax.jit
  def train_step(variables):
    def loss_fn(params):
      logits, updates = model.apply(
        {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
      )
      return jnp.mean(logits**2), updates

    grads, updates = jax.grad(loss_fn, has_aux=True)(variables["params"])
    return grads, updates["batch_stats"]

  grads, new_stats = train_step(variables)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(new_stats), strict=True):
    assert not np.allclose(old, new)
  # Eval mode reads the running statistics and leaves them as they are.
  _, updates = model.apply(variables, x, mutable=["batch_stats"])
  for old, new in zip(jax.tree.leaves(stats), jax.tree.leaves(updates), strict=True):
    np.testing.assert_array_equal(old, new)


@pytest.mark.parametrize("name", SIGNAL_MODELS)
def test_mnist1d_models_take_signals_and_the_rule_finds_their_1d_convs(name):
  signals = jax.ShapeDtypeStruct((2, 40, 1), jnp.float32)
  model = create_model(name, 10)
  variables = jax.eval_shape(model.init, KEY, signals)
  logits = jax.eval_shape(model.apply, variables, signals)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  kernels = dcil_jax.rules.conv_kernels(model, jnp.zeros(signals.shape))
  flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
  chosen = [x.shape for path, x in flat if kernels(path, x)]
  assert chosen and all(len(shape) == 3 for shape in chosen)  # (taps, in, out)
  assert not any(kernels(path, x) for path, x in flat if len(x.shape) != 3)  # not the head


def test_mnist1d_cnn_is_the_papers_convbase():
  """25 channels, kernels 5/3/3 with stride 2: 40 -> 19 -> 10 -> 5, a 125 -> 10 linear head."""
  variables = jax.eval_shape(create_model("mnist1d_cnn", 10).init, KEY, jnp.zeros((1, 40, 1)))
  shapes = {k: v.shape for k, v in traverse_util.flatten_dict(variables["params"]).items()}
  assert [shapes[(f"Conv_{i}", "kernel")] for i in range(3)] == [
    (5, 1, 25),
    (3, 25, 25),
    (3, 25, 25),
  ]
  assert shapes[("Dense_0", "kernel")] == (125, 10)
  assert num_params(variables["params"]) == 5_210  # 3,875 conv weights, 75 biases, 1,260 head
