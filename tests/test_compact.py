import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import conv_kernels, random_variables

import dcil_jax
from dcil_jax import granularity as gr
from dcil_jax import models
from dcil_jax.deploy import compact

# Every family the project ships; the ImageNet ResNets at width 8 (same layout, fast on CPU).
FAMILIES = {
  "resnet8": (lambda: models.resnet8(num_classes=5), (2, 8, 8, 3)),
  "resnet56": (lambda: models.resnet56(num_classes=5), (2, 8, 8, 3)),
  "wrn28_2": (lambda: models.wrn28_2(num_classes=5), (2, 8, 8, 3)),
  "vgg16": (lambda: models.vgg16(num_classes=5), (2, 32, 32, 3)),
  "resnet18": (lambda: models.resnet18(num_classes=5, width=8), (2, 32, 32, 3)),
  "resnet50": (lambda: models.resnet50(num_classes=5, width=8), (2, 32, 32, 3)),
  # ResNet-50's stem and bottleneck blocks, one block per stage.
  "bottleneck_tiny": (
    lambda: models.ResNet((1, 1, 1, 1), num_classes=5, width=8),
    (2, 32, 32, 3),
  ),
  "resnet_tiny": (lambda: models.resnet_tiny(num_classes=5), (2, 16, 16, 3)),
  "small_cnn": (lambda: models.SmallCNN(num_classes=5, widths=(8, 16)), (2, 8, 8, 1)),
  # The MNIST-1D models: 1-D convs, and a flatten into the Dense head.
  "mnist1d_cnn": (lambda: models.MNIST1DCNN(num_classes=5, channels=8), (2, 40, 1)),
  "resnet1d": (lambda: models.ResNet1D(num_classes=5, widths=(8, 16)), (2, 40, 1)),
}


def setup(name, sparsity=0.4, distribution="layerwise"):
  make, shape = FAMILIES[name]
  model = make()
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  variables = random_variables(model, x)
  template = dcil_jax.masks_like(variables["params"], conv_kernels)
  masks = jax.jit(lambda p: gr.filter_masks(p, template, sparsity, distribution=distribution))(
    variables["params"]
  )
  return model, variables, masks, x


def masked_logits(model, variables, masks, x):
  """The masked model, as dcil_jax.export_variables gives it."""
  masked = dict(variables, params=dcil_jax.apply_masks(variables["params"], masks))
  return jax.jit(model.apply)(masked, x)


def num_params(tree):
  return sum(int(np.size(x)) for x in jax.tree.leaves(tree))


# The deep ones repeat a shallower family's blocks: the default run checks ResNet-8 (for
# ResNet-56's CIFAR layout), resnet_tiny (ResNet-18's basic blocks) and bottleneck_tiny
# (ResNet-50's bottlenecks, and ResNet-56's block).
# VGG-16, WRN-28-2 and the bottlenecks are slow on 2 CPU cores: the default run covers their
# parts (plain conv stacks: small_cnn, mnist1d_cnn; pre-activation and 1x1 shortcuts: resnet8,
# resnet1d; a concatenation and flatten: test_own_model_with_concat_depthwise_and_epsilon...).
DEEP = {"resnet56", "resnet18", "resnet50", "vgg16", "wrn28_2", "bottleneck_tiny"}


def run(c, x):
  return jax.jit(c.module.apply)(c.variables, x)


def assert_close(got, want):
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))


@pytest.mark.parametrize(
  "name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in FAMILIES]
)
def test_compact_logits_equal_masked_model(name):
  model, variables, masks, x = setup(name)
  c = compact(model, variables, masks, x.shape[1:])
  assert_close(run(c, x), masked_logits(model, variables, masks, x))
  assert c.report["compact_params"] < c.report["params"]
  report = c.report
  assert report["pruned"] == sum(round(0.4 * layer["filters"]) for layer in report["layers"])
  assert 0 < report["removed"] <= report["pruned"]
  for layer in report["layers"]:
    in_block = layer["name"].split("/")[-1] == "Conv_0" and "/" in layer["name"]
    if name in ("vgg16", "small_cnn", "mnist1d_cnn") or in_block and name != "wrn28_2":
      assert layer["removed"] == layer["pruned"], layer  # a block's first conv: all go
    stayed = sum(len(r["channels"]) for r in layer["not_removed"])
    assert layer["pruned"] - layer["removed"] == stayed
    assert layer["kept"] == layer["filters"] - layer["removed"]


class OwnNet(nn.Module):
  """A residual add, a concatenation, a depthwise conv, BatchNorm with epsilon 0.1, average and
  max pooling, LayerNorm, and a flatten into a Dense head: no family compact() was told of."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda: nn.BatchNorm(use_running_average=not train, epsilon=0.1)
    conv = lambda n, k=(3, 3), **kw: nn.Conv(n, k, padding=1, use_bias=False, **kw)
    x = nn.relu(bn()(conv(8)(x)))
    y = nn.relu(bn()(conv(8)(x)))
    x = nn.relu(x + bn()(conv(8)(y)))  # the residual add
    d = nn.relu(bn()(conv(8, feature_group_count=8)(x)))  # depthwise
    x = jnp.concatenate([x, d, nn.relu(nn.Conv(6, (1, 1))(x))], axis=-1)
    x = nn.avg_pool(nn.Conv(12, (3, 3), strides=2, padding=1)(x), (2, 2), (2, 2))
    x = nn.relu(nn.Conv(10, (3, 3), padding=1)(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


class Conv1DNet(nn.Module):
  """1-D convs, BatchNorm with epsilon 0.1, a GELU residual, LayerNorm, a flatten into Dense."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = nn.BatchNorm(use_running_average=True, epsilon=0.1)
    x = nn.relu(bn(nn.Conv(6, (5,), padding="SAME")(x)))
    x = nn.relu(nn.Conv(8, (3,), strides=2)(x))
    x = nn.gelu(nn.Conv(8, (3,), padding=1)(x)) + x
    x = nn.LayerNorm()(nn.Conv(5, (1,))(x))  # LayerNorm needs every channel: Conv_3 keeps all
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


def own_setup(model, shape):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  variables = random_variables(model, x)
  template = dcil_jax.masks_like(variables["params"], conv_kernels)
  masks = gr.filter_masks(variables["params"], template, 0.5, distribution="layerwise")
  return variables, masks, x


@pytest.fixture(scope="module")
def own():
  model = OwnNet()
  variables, masks, x = own_setup(model, (2, 16, 16, 3))
  return model, variables, masks, x, compact(model, variables, masks, x.shape[1:])


def test_own_model_with_concat_depthwise_and_epsilon_compacts_exactly(own):
  model, variables, masks, x, c = own
  assert_close(run(c, x), masked_logits(model, variables, masks, x))
  layers = {layer["name"]: layer for layer in c.report["layers"]}
  # Inside the residual block every pruned filter goes; the stream's writers keep each other's.
  assert layers["Conv_1"]["removed"] == layers["Conv_1"]["pruned"] == 4
  for stream in ("Conv_0", "Conv_2"):
    assert layers[stream]["removed"] < layers[stream]["pruned"]
    assert "residual stream channel" in layers[stream]["not_removed"][0]["reason"]
  assert layers["Conv_4"]["removed"] == 3  # the 1x1 branch of the concatenation
  assert layers["Conv_6"]["removed"] == 5  # before the flatten: its Dense rows go too
  shapes = {
    c.module.names[int(k)]: v.shape
    for k, v in c.variables["constants"].items()
    if int(k) in c.module.names
  }
  assert shapes["Dense_0/kernel"] == (2 * 2 * 5, 4)
  assert shapes["Conv_5/kernel"][-2] < 8 + 8 + 6  # the concatenation lost channels
  # Epsilon 0.1 is taken from the trace: with PyTorch's 1e-5 the logits would differ.
  assert np.isclose(c.report["removed"], sum(layer["removed"] for layer in layers.values()))


def test_one_dimensional_model_with_layer_norm():
  model = Conv1DNet()
  variables, masks, x = own_setup(model, (2, 20, 2))
  c = compact(model, variables, masks, x.shape[1:])
  assert_close(run(c, x), masked_logits(model, variables, masks, x))
  layers = {layer["name"]: layer for layer in c.report["layers"]}
  assert layers["Conv_0"]["removed"] == 3
  assert layers["Conv_3"]["removed"] == 0  # read by LayerNorm's mean over channels
  assert "not removable" in layers["Conv_3"]["not_removed"][0]["reason"]


def test_an_unknown_primitive_is_named():
  class Sorts(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(jnp.sort(nn.Conv(4, (3, 3))(x), axis=-1).mean(axis=(1, 2)))

  x = np.ones((1, 6, 6, 1), np.float32)
  variables = Sorts().init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="primitive 'sort'"):
    compact(Sorts(), variables, None, x.shape[1:])


def test_residual_stream_channel_removed_only_when_every_writer_prunes_it():
  model, variables, _, x = setup("resnet8")
  masks = dcil_jax.masks_like(variables["params"], conv_kernels)
  # Stage 1's stream is written by the stem conv and by BasicBlock_0/Conv_1.
  masks["Conv_0"]["kernel"] = masks["Conv_0"]["kernel"].at[..., 3].set(False)
  b0 = masks["BasicBlock_0"]
  b0["Conv_1"]["kernel"] = b0["Conv_1"]["kernel"].at[..., jnp.array([3, 5])].set(False)
  c = compact(model, variables, masks, x.shape[1:])
  assert_close(run(c, x), masked_logits(model, variables, masks, x))
  layers = {layer["name"]: layer for layer in c.report["layers"]}
  assert layers["Conv_0"]["removed"] == 1
  block = layers["BasicBlock_0/Conv_1"]
  assert (block["pruned"], block["removed"]) == (2, 1)
  assert block["not_removed"] == [
    {"channels": [5], "reason": "residual stream channel: also written by Conv_0, which keep it"}
  ]
  # Every reader of the stream lost the channel.
  shapes = {
    c.module.names[int(k)]: v.shape
    for k, v in c.variables["constants"].items()
    if int(k) in c.module.names
  }
  assert shapes["BasicBlock_0/Conv_0/kernel"][-2] == 15
  assert shapes["BasicBlock_1/Conv_0/kernel"][-2] == 15
  assert shapes["BasicBlock_1/Conv_2/kernel"][-2] == 15


def test_fully_pruned_layer_keeps_one_channel():
  model, variables, _, x = setup("small_cnn")
  masks = dcil_jax.masks_like(variables["params"], conv_kernels)
  masks["Conv_0"]["kernel"] = jnp.zeros_like(masks["Conv_0"]["kernel"])
  c = compact(model, variables, masks, x.shape[1:])
  assert_close(run(c, x), masked_logits(model, variables, masks, x))
  layer = c.report["layers"][0]
  assert (layer["pruned"], layer["removed"], layer["kept"]) == (8, 7, 1)
  assert "not empty" in layer["not_removed"][0]["reason"]


def test_bad_input():
  model, variables, masks, x = setup("resnet8")
  extra = masks | {"BasicBlock_3": masks["BasicBlock_2"]}  # masks of another model
  with pytest.raises(ValueError, match="leaf at BasicBlock_3/Conv_0/kernel.*state.trained_masks"):
    compact(model, variables, extra, x.shape[1:])
  weight_masks = dcil_jax.magnitude_masks(variables["params"], masks, 0.5)
  with pytest.raises(ValueError, match="Conv_0/kernel is not a filter mask"):
    compact(model, variables, weight_masks, x.shape[1:])
  with pytest.raises(ValueError, match="align"):
    compact(model, variables, masks, x.shape[1:], align=0)
  c = compact(model, variables, masks, x.shape[1:])
  with pytest.raises(ValueError, match="traced for examples of shape"):
    c.module.apply(c.variables, np.zeros((1, 16, 16, 3), np.float32))


def test_align_rounds_widths_up_and_stays_exact():
  model, variables, masks, x = setup("resnet8")
  c = compact(model, variables, masks, x.shape[1:], align=8)
  assert_close(run(c, x), masked_logits(model, variables, masks, x))
  exact = compact(model, variables, masks, x.shape[1:])
  rounded = 0
  for layer, base in zip(c.report["layers"], exact.report["layers"]):
    assert layer["kept"] % 8 == 0 or layer["kept"] == layer["filters"]
    assert base["kept"] <= layer["kept"] < base["kept"] + 8
    rounded += layer["kept"] - base["kept"]
  assert rounded > 0


def test_an_nnx_model_compacts_through_from_nnx():
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv0 = nnx.Conv(3, 8, (3, 3), use_bias=False, rngs=rngs)
      self.bn0 = nnx.BatchNorm(8, epsilon=0.1, rngs=rngs)
      self.conv1 = nnx.Conv(8, 8, (3, 3), rngs=rngs)
      self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
      x = nnx.relu(self.bn0(self.conv0(x)))
      return self.head(nnx.relu(self.conv1(x)).mean(axis=(1, 2)))

  model, variables = dcil_jax.from_nnx(Net(nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda v: v + rng.uniform(0.1, 0.5, np.shape(v)), variables)
  template = dcil_jax.masks_like(variables["params"], conv_kernels)
  masks = gr.filter_masks(variables["params"], template, 0.5, distribution="layerwise")
  x = rng.normal(size=(2, 6, 6, 3)).astype(np.float32)
  c = compact(model, variables, masks, x.shape[1:])
  masked = dict(variables, params=dcil_jax.apply_masks(variables["params"], masks))
  assert_close(run(c, x), model.apply_eval(masked, x))
  assert c.report["removed"] == c.report["pruned"] == 8
