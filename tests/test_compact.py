import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dcil_jax
from dcil_jax import compact as compact_lib
from dcil_jax import granularity as gr
from dcil_jax import models

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
}


def conv_kernels(path, leaf):
  """The zoo's convolution kernels (4-D; its Dense heads are 2-D)."""
  return path[-1].key == "kernel" and leaf.ndim == 4


def random_variables(model, x, seed=0):
  """Random variables from the shapes alone (a jitted init costs 10-30 s on a busy CPU).

  Kernels are Kaiming-normal (fan-out); BN statistics, shifts and head biases are non-trivial, so
  the constants that compaction folds are not zero.
  """
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    shape = leaf.shape
    if name == "['kernel']":
      fan_out = int(np.prod(shape[:-2])) * shape[-1] if len(shape) > 2 else shape[0]
      return rng.normal(size=shape, scale=np.sqrt(2.0 / fan_out)).astype(np.float32)
    if name in ("['var']", "['scale']"):
      return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    return rng.normal(size=shape, scale=0.5).astype(np.float32)  # mean, bias

  return jax.tree_util.tree_map_with_path(make, shapes)


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
DEEP = {"resnet56", "resnet18", "resnet50"}


@pytest.mark.parametrize(
  "name", [pytest.param(n, marks=pytest.mark.slow) if n in DEEP else n for n in FAMILIES]
)
def test_compact_logits_equal_masked_model(name):
  model, variables, masks, x = setup(name)
  c = compact_lib.compact(model, variables, masks)
  want = masked_logits(model, variables, masks, x)
  got = jax.jit(c.module.apply)(c.variables, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5 * float(jnp.max(jnp.abs(want))))
  assert num_params(c.variables["params"]) < num_params(variables["params"])
  report = c.report
  assert report["pruned"] == sum(round(0.4 * layer["filters"]) for layer in report["layers"])
  assert 0 < report["removed"] <= report["pruned"]
  for layer in report["layers"]:
    in_block = layer["name"].split("/")[-1] == "Conv_0" and "/" in layer["name"]
    if name in ("vgg16", "small_cnn") or in_block and name != "wrn28_2":
      assert layer["removed"] == layer["pruned"], layer  # a block's first conv: all go
    stayed = sum(len(r["channels"]) for r in layer["not_removed"])
    assert layer["pruned"] - layer["removed"] == stayed
    assert layer["kept"] == layer["filters"] - layer["removed"]
  # The folded constants were really needed: some ReLU constants are not zero.
  convs = [d for k, d in c.variables["params"].items() if "Conv" in k]
  assert any("border" in d or "bias" in d for d in convs)


def test_compact_widths_follow_the_report():
  model, variables, masks, _ = setup("resnet8")
  c = compact_lib.compact(model, variables, masks)
  by_name = {layer["name"]: layer for layer in c.report["layers"]}
  for op in c.arch["ops"]:
    if op["op"] == "conv":
      assert op["features"] == by_name[op["name"].replace("__", "/")]["kept"]
      kernel = c.variables["params"][op["name"]]["kernel"]
      assert kernel.shape[-1] == op["features"]


def test_residual_stream_channel_removed_only_when_every_writer_prunes_it():
  model, variables, _, x = setup("resnet8")
  masks = dcil_jax.masks_like(variables["params"], conv_kernels)
  # Stage 1's stream is written by the stem conv and by BasicBlock_0/Conv_1.
  masks["Conv_0"]["kernel"] = masks["Conv_0"]["kernel"].at[..., 3].set(False)
  b0 = masks["BasicBlock_0"]
  b0["Conv_1"]["kernel"] = b0["Conv_1"]["kernel"].at[..., jnp.array([3, 5])].set(False)
  c = compact_lib.compact(model, variables, masks)
  np.testing.assert_allclose(
    jax.jit(c.module.apply)(c.variables, x),
    masked_logits(model, variables, masks, x),
    rtol=1e-5,
    atol=1e-5,
  )
  layers = {layer["name"]: layer for layer in c.report["layers"]}
  assert layers["Conv_0"]["removed"] == 1
  block = layers["BasicBlock_0/Conv_1"]
  assert (block["pruned"], block["removed"]) == (2, 1)
  assert block["not_removed"] == [
    {"channels": [5], "reason": "residual stream channel: also written by Conv_0, which keep it"}
  ]
  # Every reader of the stream lost the channel.
  p = c.variables["params"]
  assert p["BasicBlock_0__Conv_0"]["kernel"].shape[-2] == 15
  assert p["BasicBlock_1__Conv_0"]["kernel"].shape[-2] == 15
  assert p["BasicBlock_1__Conv_2"]["kernel"].shape[-2] == 15


def test_fully_pruned_layer_keeps_one_channel():
  model, variables, _, x = setup("small_cnn")
  masks = dcil_jax.masks_like(variables["params"], conv_kernels)
  masks["Conv_0"]["kernel"] = jnp.zeros_like(masks["Conv_0"]["kernel"])
  c = compact_lib.compact(model, variables, masks)
  np.testing.assert_allclose(
    jax.jit(c.module.apply)(c.variables, x),
    masked_logits(model, variables, masks, x),
    rtol=1e-5,
    atol=1e-5,
  )
  layer = c.report["layers"][0]
  assert (layer["pruned"], layer["removed"], layer["kept"]) == (8, 7, 1)
  assert "not empty" in layer["not_removed"][0]["reason"]


def test_bad_input(tmp_path):
  model, variables, masks, _ = setup("resnet8")

  class MyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(2)(x)

  with pytest.raises(ValueError, match="'MyNet'"):
    compact_lib.compact(MyNet(), variables, masks)
  with pytest.raises(ValueError, match="ResNetCifar layout: no layer BasicBlock_3"):
    compact_lib.compact(models.resnet20(num_classes=5), variables, masks)
  weight_masks = dcil_jax.magnitude_masks(variables["params"], masks, 0.5)
  with pytest.raises(ValueError, match="Conv_0 is not a filter mask"):
    compact_lib.compact(model, variables, weight_masks)
  head_masked = jax.tree.map(lambda m: m, masks, is_leaf=lambda m: m is None)
  head_masked["Dense_0"]["kernel"] = jnp.ones((64, 5), bool)
  with pytest.raises(ValueError, match="Dense_0/kernel is masked"):
    compact_lib.compact(model, variables, head_masked)
  c = compact_lib.compact(model, variables, masks)
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    compact_lib.save_compact(c, tmp_path / "full")
  assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary left


def test_saved_compact_model_runs_in_a_fresh_process_without_dcil_jax(tmp_path):
  model, variables, masks, x = setup("resnet8")
  c = compact_lib.compact(model, variables, masks)
  sizes = compact_lib.save_compact(c, tmp_path / "model")
  assert set(sizes) == {"arch.json", "report.json", "variables.npz", "compact_model.py"}
  np.save(tmp_path / "x.npy", np.asarray(x))
  script = (
    "import sys, json, numpy as np\n"
    f"sys.path.insert(0, {str(tmp_path / 'model')!r})\n"
    "import compact_model\n"
    f"model, variables = compact_model.load({str(tmp_path / 'model')!r})\n"
    f"logits = model.apply(variables, np.load({str(tmp_path / 'x.npy')!r}))\n"
    "print(json.dumps({'dcil_jax': any(m.split('.')[0] == 'dcil_jax' for m in sys.modules),\n"
    "                  'logits': np.asarray(logits).tolist()}))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, check=True
  )
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["dcil_jax"] is False
  np.testing.assert_allclose(
    result["logits"], masked_logits(model, variables, masks, x), rtol=1e-5, atol=1e-5
  )


def test_align_rounds_widths_up_and_stays_exact():
  model, variables, masks, x = setup("resnet8")
  c = compact_lib.compact(model, variables, masks, align=8)
  np.testing.assert_allclose(
    jax.jit(c.module.apply)(c.variables, x),
    masked_logits(model, variables, masks, x),
    rtol=1e-5,
    atol=1e-5,
  )
  exact = compact_lib.compact(model, variables, masks)
  rounded = 0
  for layer, base in zip(c.report["layers"], exact.report["layers"]):
    assert layer["kept"] % 8 == 0 or layer["kept"] == layer["filters"]
    assert base["kept"] <= layer["kept"] < base["kept"] + 8
    rounded += layer["kept"] - base["kept"]
    for entry in layer["not_removed"]:
      if "multiple of 8" in entry["reason"]:
        assert set(entry["channels"]) <= set(range(layer["filters"]))
  assert rounded > 0
  with pytest.raises(ValueError, match="align"):
    compact_lib.compact(model, variables, masks, align=0)
