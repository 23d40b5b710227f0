"""Compressed files, deployment counts (MACs, kept params) and exported files (StableHLO, ONNX)."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime
import optax
import pytest

import dcil_jax
from dcil_jax import compress, deploy_stats
from dcil_jax import granularity as gr
from dcil_jax.deploy import compact
from dcil_jax.models import SmallCNN


def conv_kernels(path, leaf):
  """The zoo's convolution kernels (4-D; its Dense heads are 2-D)."""
  return path[-1].key == "kernel" and leaf.ndim == 4


class TwoConv(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Conv(4, (3, 3), padding=1, use_bias=False)(x))  # 8x8x2 -> 8x8x4
    x = nn.relu(nn.Conv(6, (3, 3), strides=2, padding=1, use_bias=False)(x))  # -> 4x4x6
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def small():
  model = SmallCNN(num_classes=5, widths=(8, 16))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  return model, variables, x


def test_macs_of_a_tiny_conv_model_by_hand():
  model = TwoConv()
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2)))
  dense = deploy_stats.deploy_stats(model, variables, (8, 8, 2))
  by_hand = 8 * 8 * (3 * 3 * 2 * 4) + 4 * 4 * (3 * 3 * 4 * 6) + 6 * 3
  assert dense["macs"] == dense["kept_macs"] == by_hand == 4608 + 3456 + 18
  assert dense["params"] == dense["kept_params"] == 72 + 216 + 18 + 3
  masks = dcil_jax.masks_like(variables["params"], conv_kernels)
  masks["Conv_0"]["kernel"] = masks["Conv_0"]["kernel"].at[..., :2].set(False)  # 36 of 72
  masks["Conv_1"]["kernel"] = masks["Conv_1"]["kernel"].at[0].set(False)  # 72 of 216
  pruned = deploy_stats.deploy_stats(model, variables, (8, 8, 2), masks)
  assert pruned["kept_macs"] == 8 * 8 * 36 + 4 * 4 * (216 - 72) + 18
  assert pruned["kept_params"] == dense["params"] - 36 - 72
  layers = deploy_stats.layer_stats(model, variables, (8, 8, 2), masks)
  assert [x["name"] for x in layers] == ["Conv_0", "Conv_1", "Dense_0"]
  assert [x["output"] for x in layers] == [(8, 8, 4), (4, 4, 6), (3,)]


def test_compact_model_macs_come_from_its_shapes(small):
  model, variables, _ = small
  masks = gr.filter_masks(
    variables["params"],
    dcil_jax.masks_like(variables["params"], conv_kernels),
    0.5,
    distribution="layerwise",
  )
  c = compact(model, variables, masks, (8, 8, 1))
  stats = deploy_stats.deploy_stats(c.module, c.variables, (8, 8, 1))
  # 4 of 8 and 8 of 16 filters: 8x8x(9*1*4) + 4x4x(9*4*8) + 8*5.
  assert stats["macs"] == 8 * 8 * 36 + 4 * 4 * 288 + 40
  masked = deploy_stats.deploy_stats(model, variables, (8, 8, 1), masks)
  assert masked["kept_macs"] == 8 * 8 * 36 + 4 * 4 * (9 * 8 * 8) + 16 * 5  # masked: inputs stay


@pytest.mark.parametrize("kind", ["unstructured", "2:4", "filter"])
def test_compressed_round_trip_is_exact(small, tmp_path, kind):
  model, variables, x = small
  template = dcil_jax.masks_like(variables["params"], conv_kernels)
  if kind == "unstructured":
    masks = dcil_jax.magnitude_masks(variables["params"], template, 0.9)
  elif kind == "2:4":
    template, _ = gr.nm_compatible(variables["params"], template, 4)
    masks = gr.nm_masks(variables["params"], template, 2, 4)
  else:
    masks = gr.filter_masks(variables["params"], template, 0.5)
  masked = dict(variables, params=dcil_jax.apply_masks(variables["params"], masks))
  sizes = compress.save_compressed(tmp_path / "m.npz", variables, masks)
  got, got_masks = compress.load_compressed(tmp_path / "m.npz")
  assert jax.tree.structure(got) == jax.tree.structure(masked)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(masked)):
    np.testing.assert_array_equal(a, b)
  assert jax.tree.structure(got_masks, is_leaf=lambda v: v is None) == jax.tree.structure(
    masks, is_leaf=lambda v: v is None
  )
  for a, b in zip(jax.tree.leaves(got_masks), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(model.apply(got, x), model.apply(masked, x))
  kept = sum(int(np.sum(m)) for m in jax.tree.leaves(masks))
  total = sum(m.size for m in jax.tree.leaves(masks))
  assert sizes["value_bytes"] == 4 * kept
  assert sizes["mask_bytes"] == sum((m.size + 7) // 8 for m in jax.tree.leaves(masks))
  assert sizes["dense_bytes"] == sum(v.nbytes for v in jax.tree.leaves(variables))
  assert sizes["compressed_bytes"] < sizes["dense_bytes"] - 4 * (total - kept) + total / 8 + 8
  assert sizes["file_bytes"] > sizes["compressed_bytes"]  # + npz headers (large for a tiny model)


def test_compress_bad_input_writes_nothing(small, tmp_path):
  _, variables, _ = small
  masks = dcil_jax.masks_like(variables["params"], conv_kernels)
  masks["Conv_0"]["kernel"] = jnp.ones((1, 2))
  with pytest.raises(ValueError, match="mask at Conv_0/kernel has shape \\(1, 2\\)"):
    compress.save_compressed(tmp_path / "m.npz", variables, masks)
  assert list(tmp_path.iterdir()) == []
  (tmp_path / "x.npz").write_bytes(b"")
  np.savez(tmp_path / "other.npz", a=np.zeros(2))
  with pytest.raises(ValueError, match="not a dcil-jax-compressed-v1 file"):
    compress.load_compressed(tmp_path / "other.npz")


def test_inference_report_on_a_fake_result():
  from benchmarks import inference

  def cfg(label, speed, **extra):
    keys = ("jax b1", "jax b128", "onnxruntime b1", "onnxruntime b128")
    return {
      "model": "resnet32",
      "label": label,
      "macs": 2e6,
      "median_s": {k: 0.01 / speed for k in keys},
      "speedup": {k: speed for k in keys},
      **extra,
    }

  result = {
    "date": "2026-01-01",
    "rounds": 5,
    "batches": [1, 128],
    "notes": "",
    "machine": {
      "cpu": "cpu",
      "cores": 2,
      "jax": "x",
      "flax": "y",
      "onnxruntime": "z",
      "load_average_start": [1.0, 1.0, 1.0],
    },
    "load_average_end": [1.0, 1.0, 1.0],
    "max_diff": 1e-7,
    "goal": {
      "speedup": 1.4,
      "model": "resnet32",
      "at_40": {"global, jax": 1.2, "groups, jax": 1.5},
    },
    "configs": [
      cfg("dense", 1.0),
      cfg("global 40%", 1.2, filters=10, pruned=4, removed=3, fraction=0.4),
    ],
  }
  text = inference.report(result)
  assert "| global 40% | 4 / 3 of 10 | 2.00 | - | 1.20× (8.33 ms) |" in text
  assert "on resnet32: global, jax 1.20× (not met), groups, jax 1.50× (met)." in text


@pytest.fixture(scope="module")
def trained_state(small):
  """A DCIL TrainState: its ``trained_masks`` are a lifted tree (prunable, shared, paths)."""
  model, variables, x = small
  tx = optax.chain(
    optax.sgd(0.1),
    dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5), granularity="filter"),
  )
  return dcil_jax.TrainState.create(model, variables, tx, method="dcil", example_input=x[:1])


def test_trained_masks_are_accepted_as_they_are(small, trained_state):
  """``state.trained_masks`` is what users have: deploy_stats and compress take it (they raised
  a bare KeyError before), and count its sparse path, as export_variables exports it."""
  model, _, _ = small
  state = trained_state
  variables = dcil_jax.export_variables(state)
  plain = dcil_jax.path_params(state.trained_masks, "sparse")
  got = deploy_stats.deploy_stats(model, variables, (8, 8, 1), masks=state.trained_masks)
  assert got == deploy_stats.deploy_stats(model, variables, (8, 8, 1), masks=plain)
  assert got["kept_params"] < got["params"] and got["kept_macs"] < got["macs"]
  arrays, sizes = compress.compress(variables, state.trained_masks)
  assert sizes == compress.compress(variables, plain)[1]
  c = compact(model, variables, state.trained_masks, (8, 8, 1))
  assert c.report["removed"] > 0


def test_masks_of_another_layout_name_what_to_pass(small):
  model, variables, _ = small
  wrong = {"Conv_9": {"kernel": jnp.ones((3, 3, 1, 8), bool)}}
  for call in (
    lambda: deploy_stats.deploy_stats(model, variables, (8, 8, 1), masks=wrong),
    lambda: compress.compress(variables, wrong),
  ):
    with pytest.raises(
      ValueError, match="Conv_9.*Pass masks over the plain model's params: state.trained_masks"
    ):
      call()


class Branchy(nn.Module):
  """Small, with what ONNX has to map: BN (epsilon 0.1), residual, concat, pools, flatten."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = lambda: nn.BatchNorm(use_running_average=True, epsilon=0.1)
    x = nn.relu(bn()(nn.Conv(6, (3, 3), padding=1, use_bias=False)(x)))
    y = nn.relu(bn()(nn.Conv(6, (3, 3), padding=1, use_bias=False)(x)))
    x = nn.relu(x + bn()(nn.Conv(6, (3, 3), padding=1, use_bias=False)(y)))
    x = jnp.concatenate([x, nn.Conv(4, (1, 1), feature_group_count=2)(x[..., :4] * 1.0)], -1)
    x = nn.max_pool(nn.avg_pool(x, (2, 2), (2, 2)), (2, 2), (2, 2), padding="SAME")
    return nn.Dense(3)(nn.gelu(x).reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  model = Branchy()
  x = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype(np.float32)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  template = dcil_jax.masks_like(
    variables["params"], lambda p, v: p[-1].key == "kernel" and v.ndim == 4
  )
  masks = gr.filter_masks(variables["params"], template, 0.5, distribution="layerwise")
  c = compact(model, variables, masks, x.shape[1:])
  masked = dcil_jax.masked_function(model, variables, masks)
  want = np.asarray(jax.jit(masked)(x))
  out = tmp_path_factory.mktemp("export")
  sizes = dcil_jax.save_compact(c, out / "compact")
  dcil_jax.export(masked, out / "masked.onnx", "onnx", input_shape=x.shape[1:])
  dcil_jax.export(masked, out / "masked.stablehlo", "stablehlo", input_shape=x.shape[1:])
  np.save(out / "x.npy", x)
  return c, want, x, out, sizes


def test_compact_and_masked_models_run_in_onnxruntime(exported):
  c, want, x, out, sizes = exported
  assert set(sizes) == {"model.onnx", "model.stablehlo", "report.json"}
  assert c.report["removed"] > 0
  for path in (out / "compact" / "model.onnx", out / "masked.onnx"):
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, x[:1]):  # the batch size is free
      (got,) = session.run(None, {"x": batch})
      np.testing.assert_allclose(got, want[: len(batch)], rtol=1e-5, atol=1e-5)
  assert (out / "compact" / "model.onnx").stat().st_size < (out / "masked.onnx").stat().st_size


def test_stablehlo_and_onnx_load_in_a_fresh_process_without_dcil_jax(exported):
  c, want, x, out, _ = exported
  script = (
    "import sys, json, numpy as np, jax, onnxruntime\n"
    f"out = {str(out)!r}\n"
    "x = np.load(out + '/x.npy')\n"
    "result = {}\n"
    "for name in ('compact/model', 'masked'):\n"
    "  exp = jax.export.deserialize(bytearray(open(out + f'/{name}.stablehlo', 'rb').read()))\n"
    "  result[name + '.stablehlo'] = np.asarray(exp.call(x)).tolist()\n"
    "  s = onnxruntime.InferenceSession(out + f'/{name}.onnx')\n"
    "  result[name + '.onnx'] = s.run(None, {'x': x})[0].tolist()\n"
    "result['dcil_jax'] = any(m.split('.')[0] == 'dcil_jax' for m in sys.modules)\n"
    "print(json.dumps(result))\n"
  )
  run = subprocess.run(
    [sys.executable, "-c", script], cwd=out, capture_output=True, text=True, check=True
  )
  result = json.loads(run.stdout.strip().splitlines()[-1])
  assert result.pop("dcil_jax") is False
  assert len(result) == 4
  for got in result.values():
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_save_compact_refuses_a_full_directory(exported, tmp_path):
  c = exported[0]
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "keep.txt").write_text("x")
  with pytest.raises(ValueError, match="not empty"):
    dcil_jax.save_compact(c, tmp_path / "full")
  assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # no temporary left
