"""Input pipeline: TFDS records under `tfds.testing.mock_data` (no TensorFlow, no downloads).

Examples are identified through in-memory sources whose label is the record index, so the tests can
check exactly which records each process reads.
"""

from __future__ import annotations

import io
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import dcil_jax
from experiments import input_pipeline as ip

CIFAR = ip.DATASETS["cifar10"]


# The record keys each process should read, computed from the layout directly (the pipeline
# itself reads them through grain).


def train_indices(
  num_records: int,
  *,
  global_batch_size: int,
  seed: int,
  epoch: int = 0,
  process_index: int = 0,
  process_count: int = 1,
) -> np.ndarray:
  """The record keys one process reads in one train epoch, in order (batches of local_batch)."""
  layout = ip._layout(num_records, global_batch_size, process_index, process_count)
  steps = layout.train_steps()
  order = ip._permutation(num_records, seed)
  per_epoch = steps * layout.local_batch
  js = range(epoch * per_epoch, (epoch + 1) * per_epoch)
  return np.array([order[layout.position(j, steps)] for j in js], dtype=np.int64)


def eval_indices(
  num_records: int, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> tuple[np.ndarray, np.ndarray]:
  """``(keys, mask)`` one process reads in the eval pass; padding rows have key -1, mask False."""
  layout = ip._layout(num_records, global_batch_size, process_index, process_count)
  steps = layout.eval_steps()
  pos = np.array([layout.position(j, steps) for j in range(steps * layout.local_batch)])
  mask = pos < num_records
  return np.where(mask, pos, -1), mask


def eval_steps(dataset: str, global_batch_size: int, data_dir: str | None = None) -> int:
  """Eval steps for one full pass: the last batch is padded (see ``mask``)."""
  n = ip.num_examples(dataset, ip.get_info(dataset).eval_split, data_dir)
  return -(-n // global_batch_size)


def indexed_cifar(n: int) -> list[dict]:
  """CIFAR-format records; image and label both identify the record."""
  rng = np.random.default_rng(n)
  return [
    {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "label": np.int64(i)}
    for i in range(n)
  ]


def take(iterator, k: int) -> list[dict]:
  return list(itertools.islice(iterator, k))


def to_uint8(image: np.ndarray, info: ip.DatasetInfo) -> np.ndarray:
  """Inverts `normalize` (exact after rounding for uint8 inputs)."""
  pixels = (np.asarray(image, np.float32) * np.array(info.std) + np.array(info.mean)) * 255
  return np.round(pixels).astype(np.uint8)


def jpeg_bytes(shape: tuple[int, ...], seed: int = 0) -> bytes:
  """A smooth random image (so JPEG keeps it close) encoded as JPEG."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (8, 8, *shape[2:]), dtype=np.uint8)
  mode = "RGB" if len(shape) == 3 else "L"
  img = Image.fromarray(small.squeeze(), mode).resize(shape[1::-1], Image.Resampling.BILINEAR)
  buf = io.BytesIO()
  img.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


# --------------------------------------------------------------------------------------------
# Shapes and dtypes through tfds.data_source under mock_data


@pytest.mark.parametrize(
  "dataset,image_size", [("cifar10", None), ("cifar100", None), ("imagenet2012", 32)]
)
def test_train_and_eval_batches(dataset, image_size):
  size = image_size or 32
  with tfds.testing.mock_data(num_examples=20):
    train = ip.create_train_iterator(
      dataset, global_batch_size=8, seed=0, image_size=image_size, process_index=0, process_count=1
    )
    batch = next(train)
    evals = list(
      ip.create_eval_iterator(
        dataset, global_batch_size=8, image_size=image_size, process_index=0, process_count=1
      )
    )
    assert ip.steps_per_epoch(dataset, 8) == 2
    assert eval_steps(dataset, 8) == 3 == len(evals)
  assert batch["image"].shape == (8, size, size, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (8,) and batch["label"].dtype == np.int32
  assert np.all((batch["label"] >= 0) & (batch["label"] < ip.DATASETS[dataset].num_classes))
  for b in evals:
    assert b["image"].shape == (8, size, size, 3) and b["label"].dtype == np.int32
    assert b["mask"].dtype == bool
  assert [int(b["mask"].sum()) for b in evals] == [8, 8, 4]
  assert np.all(evals[-1]["image"][4:] == 0)


def test_bfloat16_images():
  with tfds.testing.mock_data(num_examples=8):
    batch = next(
      ip.create_train_iterator(
        "imagenet2012", global_batch_size=4, seed=0, image_size=16, dtype=jnp.bfloat16
      )
    )
  assert batch["image"].dtype == jnp.bfloat16 and batch["label"].dtype == np.int32


def test_worker_processes_give_the_same_batches():
  kwargs = dict(global_batch_size=4, seed=3, image_size=16, process_index=0, process_count=1)
  with tfds.testing.mock_data(num_examples=16):
    local = take(ip.create_train_iterator("imagenet2012", **kwargs), 5)
    it = ip.create_train_iterator("imagenet2012", worker_count=2, **kwargs)
    workers = take(it, 5)
    it.close()
  for a, b in zip(local, workers, strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])


# --------------------------------------------------------------------------------------------
# Transforms


def test_normalize():
  image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  want = (image / 255.0 - np.array(CIFAR.mean)) / np.array(CIFAR.std)
  got = ip.normalize(image, CIFAR.mean, CIFAR.std)
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(to_uint8(got, CIFAR), image)


def test_cifar_eval_is_normalized_original():
  records = indexed_cifar(6)
  batches = list(
    ip.create_eval_iterator(
      "cifar10", global_batch_size=4, source=records, process_index=0, process_count=1
    )
  )
  images = np.concatenate([b["image"] for b in batches])[:6]
  want = np.stack([ip.normalize(r["image"], CIFAR.mean, CIFAR.std) for r in records])
  np.testing.assert_array_equal(images, want)


def test_cifar_crop_and_flip_keep_the_content():
  image = np.random.default_rng(1).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  seen_flip = set()
  for seed in range(20):
    out = ip.cifar_train_augment(image, np.random.default_rng(seed))
    assert out.shape == (32, 32, 3)
    matches = [
      (top, left, flip)
      for top in range(9)
      for left in range(9)
      for flip in (False, True)
      if np.array_equal(out, padded[top : top + 32, left : left + 32][:, :: -1 if flip else 1])
    ]
    assert matches, f"seed {seed}: not a (flipped) 32x32 window of the zero-padded image"
    seen_flip.add(matches[0][2])
  assert seen_flip == {False, True}


def test_cifar_train_batches_are_augmented_records():
  records = indexed_cifar(16)
  batch = next(
    ip.create_train_iterator(
      "cifar10", global_batch_size=8, seed=0, source=records, process_index=0, process_count=1
    )
  )
  keys = train_indices(16, global_batch_size=8, seed=0)[:8]
  np.testing.assert_array_equal(batch["label"], keys)
  for image, key in zip(batch["image"], keys, strict=True):
    pixels = to_uint8(image, CIFAR)
    padded = np.pad(records[key]["image"], ((4, 4), (4, 4), (0, 0)))
    windows = [
      padded[t : t + 32, s : s + 32][:, ::f] for t in range(9) for s in range(9) for f in (1, -1)
    ]
    assert any(np.array_equal(pixels, w) for w in windows)


def test_random_resized_crop_box():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = ip.random_resized_crop_box(300, 400, rng)
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
    assert 0.08 * 0.9 <= h * w / (300 * 400) <= 1.0
    assert 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
  # No attempt can succeed: torchvision's fallback, the centred image with its ratio clamped.
  assert ip.random_resized_crop_box(100, 400, rng, scale=(2.0, 3.0)) == (0, 133, 100, 133)
  assert ip.random_resized_crop_box(120, 140, rng, scale=(2.0, 3.0)) == (0, 0, 120, 140)


def test_imagenet_real_records_are_jpeg_bytes():
  """Real array_record records with SkipDecoding hold the JPEG bytes; mock_data ones are arrays."""
  features = tfds.builder("imagenet2012").info.features
  serialized = features.serialize_example(
    {"image": io.BytesIO(jpeg_bytes((300, 200, 3))), "label": 7, "file_name": "n0_1.JPEG"}
  )
  record = features.deserialize_example_np(
    serialized, decoders={"image": tfds.decode.SkipDecoding()}
  )
  assert isinstance(record["image"], bytes) and record["image"][:2] == b"\xff\xd8"
  info = ip.DATASETS["imagenet2012"]
  rng = np.random.default_rng(0)
  out = ip.preprocess(record, info, train=True, rng=rng, image_size=32)
  assert out["image"].shape == (32, 32, 3) and out["label"] == 7
  # The same record decoded by TFDS (as under mock_data) gives the same eval image (no draft
  # decoding at this size: the 160-pixel crop is less than twice 128).
  decoded = {**record, "image": features["image"].decode_example_np(record["image"])}
  a = ip.preprocess(record, info, train=False, rng=None, image_size=128)["image"]
  b = ip.preprocess(decoded, info, train=False, rng=None, image_size=128)["image"]
  np.testing.assert_array_equal(a, b)


def test_jpeg_draft_decoding_is_close_to_full_decoding():
  data = jpeg_bytes((600, 520, 3), seed=2)  # eval crop 455 px >= 2 * 128: decoded at 1/2 size
  full = ip.imagenet_eval_image(data, 128, draft=False).astype(np.float32)
  draft = ip.imagenet_eval_image(data, 128).astype(np.float32)
  assert draft.shape == full.shape == (128, 128, 3)
  assert np.mean(np.abs(draft - full)) < 3.0
  gray = ip.imagenet_train_image(jpeg_bytes((90, 70)), np.random.default_rng(0), 32)
  assert gray.shape == (32, 32, 3) and gray.dtype == np.uint8


# --------------------------------------------------------------------------------------------
# Determinism, checkpointing


def test_same_seed_same_batches_other_seed_other_batches():
  kwargs = dict(global_batch_size=4, image_size=16, process_index=0, process_count=1)
  with tfds.testing.mock_data(num_examples=12):
    a = take(ip.create_train_iterator("imagenet2012", seed=5, **kwargs), 2)
    b = take(ip.create_train_iterator("imagenet2012", seed=5, **kwargs), 2)
    c = take(ip.create_train_iterator("imagenet2012", seed=6, **kwargs), 2)
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x["image"], y["image"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_epochs_are_reshuffled_and_get_state_resumes():
  records = indexed_cifar(8)
  kwargs = dict(global_batch_size=4, seed=1, source=records, process_index=0, process_count=1)
  it = ip.create_train_iterator("cifar10", num_epochs=3, **kwargs)
  first = next(it)
  state = it.get_state()
  rest = list(it)
  assert len(rest) == 5  # 3 epochs of 2 steps
  labels = [
    np.concatenate([b["label"] for b in ([first] + rest)[2 * e : 2 * e + 2]]) for e in range(3)
  ]
  for e in range(3):
    assert sorted(labels[e]) == list(range(8))
    np.testing.assert_array_equal(labels[e], train_indices(8, global_batch_size=4, seed=1, epoch=e))
  assert not np.array_equal(labels[0], labels[1])
  resumed = ip.create_train_iterator("cifar10", num_epochs=3, **kwargs)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], rest[0]["image"])


# --------------------------------------------------------------------------------------------
# Several processes


def test_train_split_over_four_processes():
  n, global_batch, count = 50, 8, 4  # 6 steps per epoch; 2 examples per epoch dropped
  for epoch in range(2):
    parts = [
      train_indices(
        n, global_batch_size=global_batch, seed=0, epoch=epoch, process_index=p, process_count=count
      )
      for p in range(count)
    ]
    assert [len(p) for p in parts] == [12] * 4
    union = np.concatenate(parts)
    assert len(set(union.tolist())) == 48 and set(union.tolist()) <= set(range(n))
    # Row p of each global batch is process p's local batch: the global batches do not depend
    # on the number of processes.
    single = train_indices(n, global_batch_size=global_batch, seed=0, epoch=epoch)
    interleaved = np.stack([p.reshape(6, 2) for p in parts], axis=1).reshape(-1)
    np.testing.assert_array_equal(single, interleaved)
  # The iterators read exactly these records.
  records = indexed_cifar(n)
  for p in range(count):
    it = ip.create_train_iterator(
      "cifar10", global_batch_size=global_batch, seed=0, source=records, num_epochs=1,
      process_index=p, process_count=count,
    )  # fmt: skip
    labels = np.concatenate([b["label"] for b in it])
    want = train_indices(
      n, global_batch_size=global_batch, seed=0, process_index=p, process_count=count
    )
    np.testing.assert_array_equal(labels, want)


def test_eval_split_over_four_processes_counts_each_example_once():
  n, global_batch, count = 10, 8, 4
  records = indexed_cifar(n)
  counted = []
  for p in range(count):
    batches = list(
      ip.create_eval_iterator(
        "cifar10",
        global_batch_size=global_batch,
        source=records,
        process_index=p,
        process_count=count,
      )  # fmt: skip
    )
    assert len(batches) == 2 and all(b["mask"].shape == (2,) for b in batches)
    keys, mask = eval_indices(
      n, global_batch_size=global_batch, process_index=p, process_count=count
    )
    got_mask = np.concatenate([b["mask"] for b in batches])
    np.testing.assert_array_equal(got_mask, mask)
    labels = np.concatenate([b["label"] for b in batches])
    np.testing.assert_array_equal(labels[mask], keys[mask])
    counted += labels[got_mask].tolist()
  assert sorted(counted) == list(range(n))


# --------------------------------------------------------------------------------------------
# Errors


def test_batch_not_divisible_by_process_count():
  with pytest.raises(ValueError, match="multiple of process_count=4"):
    ip.create_train_iterator(
      "cifar10", global_batch_size=10, seed=0, source=indexed_cifar(12), process_index=0,
      process_count=4,
    )  # fmt: skip


def test_unknown_dataset():
  with pytest.raises(ValueError, match="cifar10, cifar100, digits, imagenet2012, mnist1d"):
    ip.create_train_iterator("mnist", global_batch_size=8, seed=0)


def test_digits_is_a_fixed_stratified_split_with_its_own_statistics():
  train, test = ip.digits_source("train"), ip.digits_source("test")
  assert (len(train), len(test)) == (1437, 360)
  assert train[0]["image"].shape == (8, 8, 1) and train[0]["image"].dtype == np.uint8
  labels = np.array([r["label"] for r in test])
  assert np.bincount(labels).min() >= 35  # stratified: every digit ~36 times in the test split
  pixels = np.stack([r["image"] for r in train]) / 255.0
  info = ip.DATASETS["digits"]
  np.testing.assert_allclose((pixels.mean(), pixels.std()), info.mean + info.std, atol=1e-4)
  it = ip.create_eval_iterator("digits", global_batch_size=128)
  batches = list(it)
  assert len(batches) == 3 and batches[-1]["image"].shape == (128, 8, 8, 1)
  assert sum(int(b["mask"].sum()) for b in batches) == 360
  image = batches[0]["image"][0]
  expected = (test[0]["image"] / 255.0 - info.mean[0]) / info.std[0]
  np.testing.assert_allclose(image, expected, atol=1e-5)  # no augmentation, normalised
  with pytest.raises(ValueError, match="'train' and 'test'"):
    ip.digits_source("validation")


def test_mnist1d_is_the_published_split_generated_offline():
  state = np.random.get_state()
  train, test = ip.mnist1d_source("train"), ip.mnist1d_source("test")
  assert np.array_equal(np.random.get_state()[1], state[1])  # the caller's RNG is untouched
  assert (len(train), len(test)) == (4000, 1000)  # the paper's 4,000 / 1,000 split
  assert train[0]["image"].shape == (40, 1) and train[0]["image"].dtype == np.float32
  signals = np.stack([r["image"] for r in train + test])
  assert abs(signals.mean()) < 0.01 and abs(signals.std() - 1.0) < 0.01  # standardised
  assert np.bincount([r["label"] for r in test], minlength=10).min() >= 80
  it = ip.create_eval_iterator("mnist1d", global_batch_size=128)
  batches = list(it)
  assert len(batches) == 8 and batches[-1]["image"].shape == (128, 40, 1)
  assert sum(int(b["mask"].sum()) for b in batches) == 1000
  np.testing.assert_array_equal(batches[0]["image"][0], test[0]["image"])  # used as stored
  train_it = ip.create_train_iterator("mnist1d", global_batch_size=100, seed=0)
  assert next(iter(train_it))["image"].shape == (100, 40, 1)
  assert ip.steps_per_epoch("mnist1d", 128) == 31
  with pytest.raises(ValueError, match="splits"):
    ip.mnist1d_source("val")


def test_mnist1d_validation_is_a_fixed_seeded_part_of_train():
  train_x, train_y = ip.mnist1d_arrays("train")
  fit_x, fit_y = ip.mnist1d_arrays("fit")
  val_x, val_y = ip.mnist1d_arrays("validation")
  held = ip.mnist1d_validation_indices(len(train_y))
  assert len(val_y) == ip.MNIST1D_VALIDATION_SIZE and len(fit_y) + len(val_y) == len(train_y)
  np.testing.assert_array_equal(val_x, train_x[held])  # carved out of train, not test
  np.testing.assert_array_equal(val_y, train_y[held])
  rest = np.setdiff1d(np.arange(len(train_y)), held)
  np.testing.assert_array_equal(fit_x, train_x[rest])  # disjoint, together all of train
  np.testing.assert_array_equal(held, ip.mnist1d_validation_indices(len(train_y)))  # fixed
  assert not np.array_equal(held, np.arange(ip.MNIST1D_VALIDATION_SIZE))  # drawn, not a prefix
  assert np.bincount(val_y, minlength=10).min() >= 30  # every class is in it
  info = ip.DATASETS["mnist1d_val"]
  assert (info.train_split, info.eval_split) == ("fit", "validation")
  assert ip.steps_per_epoch("mnist1d_val", 128) == len(fit_y) // 128
  batches = list(ip.create_eval_iterator("mnist1d_val", global_batch_size=128))
  assert sum(int(b["mask"].sum()) for b in batches) == ip.MNIST1D_VALIDATION_SIZE
  it = ip.create_train_iterator("mnist1d_val", global_batch_size=64, seed=3)
  order = ip.train_order(len(fit_y), 64, seed=3, num_steps=60)  # across an epoch boundary
  for t, batch in zip(range(60), it):
    np.testing.assert_array_equal(batch["image"], fit_x[order[t]])
    np.testing.assert_array_equal(batch["label"], fit_y[order[t]])


def test_missing_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ip.DataNotPreparedError) as e:
    ip.data_source("imagenet2012", "train", data_dir=str(tmp_path))
  message = str(e.value)
  for part in (
    "ILSVRC2012_img_train.tar",
    "ILSVRC2012_img_val.tar",
    "image-net.org",
    str(tmp_path / "downloads" / "manual"),
    f"tfds build imagenet2012 --manual_dir=<manual_dir> --data_dir={tmp_path}",
    "--file_format=array_record",
    "tensorflow-cpu",
  ):
    assert part in message, part
  with pytest.raises(FileNotFoundError, match=f"tfds build cifar10 --data_dir={tmp_path}"):
    ip.num_examples("cifar10", "train", data_dir=str(tmp_path))
  assert list(tmp_path.iterdir()) == []  # nothing downloaded or created


# --------------------------------------------------------------------------------------------
# Host -> device


def test_prefetch_of_device_batches():
  mesh = dcil_jax.make_mesh()
  batches = [
    {"image": np.full((2, 3, 3, 3), i, np.float32), "label": np.arange(2) + i} for i in range(5)
  ]
  out = list(ip.prefetch(dcil_jax.shard_batch(b, mesh) for b in batches))
  assert len(out) == 5
  for i, b in enumerate(out):
    assert isinstance(b["image"], jax.Array)
    assert b["image"].sharding == dcil_jax.sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(b["label"], np.arange(2) + i)

  def failing():
    yield 1
    raise RuntimeError("boom")

  it = ip.prefetch(failing())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match="boom"):
    next(it)
