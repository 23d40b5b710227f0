"""Input pipeline for CIFAR-10/100 and ImageNet: TFDS array_record files read with grain, no TF.

Why this design:

- ``tfds.data_source`` (array_record) gives random access without TensorFlow, so TensorFlow is not
  needed to train (only to prepare the files once, see :func:`data_source`), and it works under
  ``tfds.testing.mock_data``, which the tests use.
- The pipeline is a ``grain.MapDataset`` of whole batches: batch ``t`` of epoch ``e`` is a pure
  function of ``(seed, e, t)``. The same global batches come out whatever the number of hosts or
  grain workers, and the iterator's position is a batch counter, so it can be checkpointed
  (``iterator.get_state()`` / ``iterator.set_state(state)``).
- Every epoch is a fresh permutation of the whole split (seeded), cut into ``steps_per_epoch``
  global batches (remainder dropped); process ``p`` of ``P`` reads rows ``[p*b, (p+1)*b)`` of each
  global batch, so the hosts' parts are disjoint and change every epoch.
- Augmentation follows the official PyTorch code (``Jangho-Kim/DCIL-pytorch``, ``data.py``):
  CIFAR ``RandomCrop(32, padding=4)`` (zero padding) + ``RandomHorizontalFlip``, normalised with
  the CIFAR-10 mean/std for both CIFAR-10 and CIFAR-100 (the official code uses the same values for
  both); ImageNet ``RandomResizedCrop(224)`` + flip, eval ``Resize(256)`` + ``CenterCrop(224)``.
  Random draws come from a Philox generator keyed by ``(seed, position in the global stream)``.
- ImageNet JPEGs are decoded here (``tfds.decode.SkipDecoding``), so the crop box is known before
  decoding and PIL's ``draft`` can decode at 1/2, 1/4 or 1/8 size when the crop allows it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import logging
import math
import os
import queue
import random
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

T = TypeVar("T")
Record = Mapping[str, Any]

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_PADDING = 4
CROP_SCALE = (0.08, 1.0)  # RandomResizedCrop area fraction
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect ratio w / h
CROP_ATTEMPTS = 10
EVAL_RESIZE_MARGIN = 32  # eval: shorter side to image_size + 32 (256 for 224), then center crop
# Threads that build batches in each process (PIL decoding and resizing release the GIL). Each
# in-flight batch holds memory, so grain workers get one thread each.
READ_THREADS = 4
WORKER_BUFFER = 2  # batches buffered per grain worker process


class DatasetInfo(NamedTuple):
  """What the training loop and the pipeline need to know about a dataset."""

  num_classes: int
  image_size: int
  train_split: str
  eval_split: str
  mean: tuple[float, float, float]  # per channel, images in [0, 1]
  std: tuple[float, float, float]
  needs_manual_download: bool = False
  jpeg_bytes: bool = False  # read undecoded JPEG bytes and decode in the pipeline
  # "cifar": pad-crop + flip; "imagenet": random-resized crop + flip; "none": as stored;
  # "signal": float records used as stored (already standardised), no /255
  preprocessing: str = "cifar"
  channels: int = 3
  signal_length: int | None = None  # 1-D data: examples are [length, channels], not images

  def input_shape(self, image_size: int) -> tuple[int, ...]:
    """The shape of one model input (``image_size`` applies to images only)."""
    if self.signal_length is not None:
      return (self.signal_length, self.channels)
    return (image_size, image_size, self.channels)


# scikit-learn's 8x8 digits, the real images that ship offline (``pip install scikit-learn``):
# a fixed stratified 80/20 split, pixels 0..16 scaled to uint8, no augmentation (a flipped digit
# is another digit). Mean and std are those of the train split (tests/test_input_pipeline.py).
DIGITS_MEAN = (0.30543,)
DIGITS_STD = (0.37596,)
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2

# MNIST-1D (Greydanus 2020), generated offline by the `mnist1d` package's own code with its
# published defaults: 5,000 signals of length 40 from seed 42, the first 4,000 for training and
# the last 1,000 for test (the split of the paper's 32 % / 68 % / 94 % logistic / MLP / CNN
# numbers). The generator already standardises the signals (mean 0, sd 1 over the whole set).
MNIST1D_LENGTH = 40
# A validation split carved out of MNIST-1D's train set, so that learning rates and other
# settings are chosen without looking at the test split: 500 of the 4,000 train signals, drawn by
# a fixed permutation (``MNIST1D_SPLIT_SEED``, the same for every run and seed). Split ``fit`` is
# the other 3,500 (training with validation), ``validation`` the 500, both in the generator's
# order; ``train`` stays all 4,000 and ``test`` the published 1,000. Dataset ``mnist1d_val``
# trains on ``fit`` and evaluates on ``validation``.
MNIST1D_VALIDATION_SIZE = 500
MNIST1D_SPLIT_SEED = 0
MNIST1D_SPLITS = ("train", "fit", "validation", "test")

DATASETS: dict[str, DatasetInfo] = {
  "cifar10": DatasetInfo(10, 32, "train", "test", CIFAR_MEAN, CIFAR_STD),
  "cifar100": DatasetInfo(100, 32, "train", "test", CIFAR_MEAN, CIFAR_STD),
  "imagenet2012": DatasetInfo(
    1000, 224, "train", "validation", IMAGENET_MEAN, IMAGENET_STD, True, True, "imagenet"
  ),
  "digits": DatasetInfo(
    10, 8, "train", "test", DIGITS_MEAN, DIGITS_STD, preprocessing="none", channels=1
  ),
  "mnist1d": DatasetInfo(
    10,
    MNIST1D_LENGTH,
    "train",
    "test",
    (0.0,),
    (1.0,),
    preprocessing="signal",
    channels=1,
    signal_length=MNIST1D_LENGTH,
  ),
  "mnist1d_val": DatasetInfo(
    10,
    MNIST1D_LENGTH,
    "fit",
    "validation",
    (0.0,),
    (1.0,),
    preprocessing="signal",
    channels=1,
    signal_length=MNIST1D_LENGTH,
  ),
}


class DataNotPreparedError(FileNotFoundError):
  """The TFDS array_record files are missing; the message says how to make them."""


def get_info(dataset: str) -> DatasetInfo:
  """``DATASETS[dataset]`` with an error that lists the known names."""
  if dataset not in DATASETS:
    raise ValueError(f"Unknown dataset {dataset!r}; expected one of {', '.join(sorted(DATASETS))}.")
  return DATASETS[dataset]


# --------------------------------------------------------------------------------------------
# Data sources


def _data_dir_root(data_dir: str | None) -> str:
  return os.path.expanduser(os.fspath(data_dir or tfds.core.constants.get_default_data_dir()))


def _not_prepared_message(dataset: str, data_dir: str | None, problem: str) -> str:
  root = _data_dir_root(data_dir)
  lines = [
    f"{dataset} is not ready for tfds.data_source: {problem}.",
    "Training reads TFDS array_record files without TensorFlow; writing them once needs it.",
  ]
  build = f"--data_dir={root} --file_format=array_record"
  if get_info(dataset).needs_manual_download:
    manual = os.path.join(root, "downloads", "manual")
    lines += [
      "1. Register at https://image-net.org/download-images and download ILSVRC2012_img_train.tar",
      "   (~138 GB) and ILSVRC2012_img_val.tar (~6.3 GB).",
      f"2. Put both tars in a <manual_dir> (default {manual}).",
      "3. In any environment with these extra packages (e.g. a throwaway venv):",
      "     pip install tensorflow-datasets tensorflow-cpu importlib_resources",
      "   run once:",
      "     python -c \"import tensorflow_datasets as tfds; tfds.builder('imagenet2012', "
      f"data_dir='{root}', file_format='array_record').download_and_prepare(download_config="
      "tfds.download.DownloadConfig(manual_dir='<manual_dir>'))\"",
      "   or, with the `tfds` CLI (which also imports apache-beam and mlcroissant):",
      f"     tfds build imagenet2012 --manual_dir=<manual_dir> {build}",
    ]
  else:
    lines += [
      "Download (~170 MB) and convert it once, in any environment with these extra packages:",
      "  pip install tensorflow-datasets tensorflow-cpu importlib_resources "
      "apache-beam mlcroissant",
      f"  tfds build {dataset} {build}",
    ]
  return "\n".join(lines)


def data_source(dataset: str, split: str, data_dir: str | None = None) -> Sequence[Record]:
  """Opens a random-access TFDS source of ``split``; never downloads.

  Records are dicts with ``image`` (uint8 HxWx3, or JPEG ``bytes`` for ImageNet) and ``label``.

  Raises:
    ValueError: unknown ``dataset``.
    DataNotPreparedError: the array_record files are missing (or were built as TFRecord); the
      message says what to download and the command that prepares the files.
  """
  info = get_info(dataset)
  if dataset == "digits":
    return digits_source(split)
  if dataset in ("mnist1d", "mnist1d_val"):
    return mnist1d_source(split)
  decoders = {"image": tfds.decode.SkipDecoding()} if info.jpeg_bytes else None
  try:
    source = tfds.data_source(
      dataset, split=split, data_dir=data_dir, download=False, decoders=decoders
    )
  except Exception as e:
    # TFDS's own error here is misleading ("file format TFRECORD is not supported").
    builder = tfds.builder(dataset, data_dir=data_dir)
    if not builder.is_prepared():
      problem = f"no prepared data in {builder.data_path}"
      raise DataNotPreparedError(_not_prepared_message(dataset, data_dir, problem)) from e
    file_format = builder.info.file_format
    if file_format != tfds.core.file_adapters.FileFormat.ARRAY_RECORD:
      problem = (
        f"{builder.data_path} holds {file_format.value} files, not array_record (delete that "
        "directory or use another data_dir, then build again as below)"
      )
      raise DataNotPreparedError(_not_prepared_message(dataset, data_dir, problem)) from e
    raise
  if decoders is not None and len(source):
    try:
      with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints a banner when TF is missing
        source[0]
    except ImportError as e:
      # Only fake records need TF here: `tfds.testing.mock_data` generates decoded images and
      # would have to JPEG-encode them for SkipDecoding. Real records hold the JPEG bytes.
      if "tensorflow" not in str(e):
        raise
      logging.info("%s: SkipDecoding needs TensorFlow on generated records; decoding in TFDS.", e)
      source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
  return source


@functools.lru_cache(maxsize=2)
def digits_source(split: str) -> list[Record]:
  """scikit-learn's digits as TFDS-style records: ``image`` uint8 [8, 8, 1] and ``label``.

  The same fixed stratified split for every run and seed (``DIGITS_SPLIT_SEED``).
  """
  if split not in ("train", "test"):
    raise ValueError(f"digits has splits 'train' and 'test', got {split!r}.")
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
  train_x, test_x, train_y, test_y = train_test_split(
    images,
    digits.target,
    test_size=DIGITS_TEST_FRACTION,
    random_state=DIGITS_SPLIT_SEED,
    stratify=digits.target,
  )
  x, y = (train_x, train_y) if split == "train" else (test_x, test_y)
  return [{"image": image, "label": np.int64(label)} for image, label in zip(x, y)]


@functools.lru_cache(maxsize=1)
def _mnist1d_arrays() -> dict[str, np.ndarray]:
  from mnist1d.data import get_dataset_args, make_dataset

  # The generator seeds numpy's and Python's global random state: keep the caller's.
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    data = make_dataset(get_dataset_args())  # never downloads (get_dataset would)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  return {k: data[k] for k in ("x", "y", "x_test", "y_test")}


def mnist1d_validation_indices(num_train: int) -> np.ndarray:
  """Sorted indices into the train set of the validation split (``MNIST1D_VALIDATION_SIZE`` of
  them, from the fixed ``MNIST1D_SPLIT_SEED``): independent of any run's seed, so every method
  and seed is tuned on the same held-out signals."""
  order = np.random.default_rng(MNIST1D_SPLIT_SEED).permutation(num_train)
  return np.sort(order[:MNIST1D_VALIDATION_SIZE])


def mnist1d_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """``(signals float32 [n, 40, 1], labels int32 [n])`` of one split (see ``MNIST1D_SPLITS``):
  the same examples, in the same order, as :func:`mnist1d_source`, as whole arrays for
  programs that keep a small data set on the device (``experiments.fast_sweep``)."""
  if split not in MNIST1D_SPLITS:
    raise ValueError(f"mnist1d has splits {MNIST1D_SPLITS}, got {split!r}.")
  data = _mnist1d_arrays()
  if split == "test":
    x, y = data["x_test"], data["y_test"]
  else:
    x, y = data["x"], data["y"]
    if split != "train":
      held_out = np.zeros(len(y), bool)
      held_out[mnist1d_validation_indices(len(y))] = True
      keep = held_out if split == "validation" else ~held_out
      x, y = x[keep], y[keep]
  return x.astype(np.float32)[..., None], y.astype(np.int32)


@functools.lru_cache(maxsize=4)
def mnist1d_source(split: str) -> list[Record]:
  """MNIST-1D as TFDS-style records: ``image`` float32 [40, 1] (the signal, under the key the
  loop reads) and ``label``; generated once per process. Splits: ``train`` (the
  published 4,000), ``test`` (the published 1,000), and ``fit`` / ``validation``, the train set
  split in two (``MNIST1D_VALIDATION_SIZE``)."""
  x, y = mnist1d_arrays(split)
  return [{"image": signal, "label": np.int64(label)} for signal, label in zip(x, y)]


def train_order(num_records: int, global_batch_size: int, seed: int, num_steps: int) -> np.ndarray:
  """``[num_steps, global_batch_size]`` record indices: the batches :func:`create_train_iterator`
  yields for ``seed`` on one process (a new permutation each epoch, the remainder dropped), for
  programs that gather batches from arrays on the device instead of iterating."""
  layout = _layout(num_records, global_batch_size, 0, 1)
  steps = layout.train_steps()
  if steps == 0:
    raise ValueError(f"{num_records} examples are fewer than one batch of {global_batch_size}.")
  order = _permutation(num_records, seed)
  out = np.empty((num_steps, global_batch_size), np.int32)
  for t in range(num_steps):
    for i in range(global_batch_size):
      out[t, i] = order[layout.position(t * global_batch_size + i, steps)]
  return out


def num_examples(dataset: str, split: str, data_dir: str | None = None) -> int:
  """Number of records in ``split``."""
  return len(data_source(dataset, split, data_dir))


def steps_per_epoch(dataset: str, global_batch_size: int, data_dir: str | None = None) -> int:
  """Train steps per epoch: the remainder of each epoch's permutation is dropped."""
  return num_examples(dataset, get_info(dataset).train_split, data_dir) // global_batch_size


# --------------------------------------------------------------------------------------------
# Transforms (numpy / PIL; uint8 in, uint8 out, then `normalize`)


@functools.lru_cache(maxsize=16)
def _normalize_constants(
  shape: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]
) -> tuple[np.ndarray, np.ndarray]:
  """Scale and offset broadcast to the full image shape once, not per call (faster)."""
  std_ = np.asarray(std, np.float32)
  scale = 1.0 / (255.0 * std_)
  offset = -np.asarray(mean, np.float32) / std_
  return np.broadcast_to(scale, shape).copy(), np.broadcast_to(offset, shape).copy()


def normalize(
  image: np.ndarray,
  mean: Sequence[float],
  std: Sequence[float],
  dtype: Any = np.float32,
) -> np.ndarray:
  """``(image / 255 - mean) / std`` per channel, computed in float32, returned as ``dtype``."""
  scale, offset = _normalize_constants(image.shape, tuple(mean), tuple(std))
  out = np.multiply(image, scale, dtype=np.float32)
  out += offset
  return out.astype(dtype, copy=False)


def cifar_train_augment(
  image: np.ndarray, rng: np.random.Generator, padding: int = CIFAR_PADDING
) -> np.ndarray:
  """``RandomCrop(size, padding)`` with zero padding, then a horizontal flip with p = 0.5."""
  height, width = image.shape[:2]
  top, left = rng.integers(0, 2 * padding + 1, size=2)
  padded = np.zeros((height + 2 * padding, width + 2 * padding, *image.shape[2:]), image.dtype)
  padded[padding : padding + height, padding : padding + width] = image  # faster than np.pad
  out = padded[top : top + height, left : left + width]
  if rng.random() < 0.5:
    out = out[:, ::-1]
  return out


def random_resized_crop_box(
  height: int,
  width: int,
  rng: np.random.Generator,
  scale: tuple[float, float] = CROP_SCALE,
  ratio: tuple[float, float] = CROP_RATIO,
  attempts: int = CROP_ATTEMPTS,
) -> tuple[int, int, int, int]:
  """``(top, left, h, w)`` of torchvision's ``RandomResizedCrop``, center-crop fallback included."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  # Fallback: the whole image, its aspect ratio clamped to `ratio`, centred.
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


ImageLike = bytes | np.ndarray | Image.Image


def _open_image(image: ImageLike) -> Image.Image:
  """A lazy PIL image: JPEG bytes are only parsed (header), arrays are wrapped."""
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(image))
  return Image.fromarray(np.asarray(image))


def crop_and_resize(
  image: ImageLike,
  box: tuple[float, float, float, float],
  size: int,
  *,
  draft: bool = True,
  flip: bool = False,
) -> np.ndarray:
  """Crops ``box = (top, left, h, w)`` (original pixels), resizes it to ``size x size`` (RGB).

  For JPEG bytes, ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop stays at
  least ``size`` pixels on its shorter side, which skips most of the decoding work. Resampling is
  PIL bilinear with antialiasing, as torchvision's PIL path does. ``flip`` mirrors the result in
  PIL, which leaves a contiguous array (normalising a mirrored numpy view is slower).
  """
  img = _open_image(image)
  top, left, h, w = box
  width, height = img.size
  if draft and img.format == "JPEG":
    factor = size / min(h, w)
    if factor <= 0.5:
      img.draft("RGB", (math.ceil(width * factor), math.ceil(height * factor)))
      sx, sy = img.size[0] / width, img.size[1] / height
      top, left, h, w = top * sy, left * sx, h * sy, w * sx
  if img.mode != "RGB":
    img = img.convert("RGB")  # grayscale / CMYK JPEGs
  out = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h))
  if flip:
    out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.asarray(out)


def imagenet_train_image(
  image: ImageLike, rng: np.random.Generator, size: int, *, draft: bool = True
) -> np.ndarray:
  """Inception-style random-resized crop to ``size`` plus a random horizontal flip (uint8)."""
  img = _open_image(image)
  width, height = img.size
  box = random_resized_crop_box(height, width, rng)
  return crop_and_resize(img, box, size, draft=draft, flip=bool(rng.random() < 0.5))


def imagenet_eval_image(image: ImageLike, size: int, *, draft: bool = True) -> np.ndarray:
  """Resize the shorter side to ``size + 32`` and center-crop ``size`` (one resample, uint8)."""
  img = _open_image(image)
  width, height = img.size
  crop = min(height, width) * size / (size + EVAL_RESIZE_MARGIN)
  box = ((height - crop) / 2, (width - crop) / 2, crop, crop)
  return crop_and_resize(img, box, size, draft=draft)


def preprocess(
  record: Record,
  info: DatasetInfo,
  *,
  train: bool,
  rng: np.random.Generator | None,
  image_size: int,
  dtype: Any = np.float32,
) -> dict[str, np.ndarray]:
  """One TFDS record to ``{"image": [H, W, C] dtype, "label": int32}``."""
  image = record["image"]
  if info.preprocessing == "signal":
    return {"image": np.asarray(image, dtype), "label": np.int32(record["label"])}
  if info.preprocessing == "none":
    image = np.asarray(image)
  elif info.preprocessing == "cifar":  # augment at the native size
    image = np.asarray(image)
    if train:
      image = cifar_train_augment(image, rng)
  elif train:
    image = imagenet_train_image(image, rng, image_size)
  else:
    image = imagenet_eval_image(image, image_size)
  return {
    "image": normalize(image, info.mean, info.std, dtype),
    "label": np.int32(record["label"]),
  }


# --------------------------------------------------------------------------------------------
# Index layout: which record goes to which process, batch and row


def _derived_seed(seed: int, stream: int) -> int:
  """A 32-bit seed for one use of ``seed`` (so seeds s and s + 1 share no permutations)."""
  if seed < 0:
    raise ValueError(f"seed must be non-negative, got {seed}")
  return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


@dataclasses.dataclass(frozen=True)
class _Layout:
  """Maps a process's element counter to a position in the global stream of examples.

  Global batch ``t`` (of ``B = b * P``) is positions ``[t*B, (t+1)*B)``; process ``p`` owns rows
  ``[p*b, (p+1)*b)`` of it. For train, position ``g`` of epoch ``e`` (``g = e*n + i``) reads the
  ``i``-th record of epoch ``e``'s permutation; for eval, record ``i`` (or padding if ``i >= n``).
  """

  num_records: int
  local_batch: int
  process_index: int
  process_count: int

  @property
  def global_batch(self) -> int:
    return self.local_batch * self.process_count

  def train_steps(self) -> int:
    return self.num_records // self.global_batch

  def eval_steps(self) -> int:
    return -(-self.num_records // self.global_batch)

  def position(self, j: int, steps: int) -> int:
    """Global stream position of this process's ``j``-th element (``steps`` batches/epoch)."""
    epoch, r = divmod(j, steps * self.local_batch)
    t, i = divmod(r, self.local_batch)
    return (
      epoch * self.num_records + t * self.global_batch + self.process_index * self.local_batch + i
    )


def _layout(
  num_records: int, global_batch_size: int, process_index: int | None, process_count: int | None
) -> _Layout:
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(
      f"global_batch_size={global_batch_size} must be a positive multiple of "
      f"process_count={process_count} (each process loads global_batch_size // process_count)."
    )
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, {process_count})")
  return _Layout(num_records, global_batch_size // process_count, process_index, process_count)


def _permutation(num_records: int, seed: int) -> grain.MapDataset:
  """``order[e * n + i]``: record at position ``i`` of epoch ``e`` (a new permutation per epoch)."""
  return grain.MapDataset.range(num_records).shuffle(seed=_derived_seed(seed, 0))


# --------------------------------------------------------------------------------------------
# Grain datasets


class _TrainElement:
  """``map_with_index`` function: element counter -> augmented example (picklable for workers)."""

  def __init__(self, source, info, layout, steps, seed, image_size, dtype):
    self.source, self.info, self.layout, self.steps = source, info, layout, steps
    self.order = _permutation(layout.num_records, seed)
    self.rng_key = _derived_seed(seed, 1)
    self.image_size, self.dtype = image_size, dtype

  def __call__(self, j: int, _: Any) -> dict[str, np.ndarray]:
    g = self.layout.position(j, self.steps)
    # Keyed by the global position: the same example gets the same augmentation however many
    # processes or workers there are.
    rng = np.random.Generator(np.random.Philox(key=np.array([g, self.rng_key], np.uint64)))
    record = self.source[int(self.order[g])]
    return preprocess(
      record, self.info, train=True, rng=rng, image_size=self.image_size, dtype=self.dtype
    )


class _EvalElement:
  """``map_with_index`` function: element counter -> example, or zero padding with mask False."""

  def __init__(self, source, info, layout, steps, image_size, dtype):
    self.source, self.info, self.layout, self.steps = source, info, layout, steps
    self.image_size, self.dtype = image_size, dtype

  def __call__(self, j: int, _: Any) -> dict[str, np.ndarray]:
    i = self.layout.position(j, self.steps)
    if i >= self.layout.num_records:
      image = np.zeros(self.info.input_shape(self.image_size), self.dtype)
      return {"image": image, "label": np.int32(0), "mask": np.bool_(False)}
    out = preprocess(
      self.source[i], self.info, train=False, rng=None, image_size=self.image_size, dtype=self.dtype
    )
    return {**out, "mask": np.bool_(True)}


def _to_iterator(ds: grain.MapDataset, worker_count: int) -> grain.DatasetIterator:
  """Batches are built by ``READ_THREADS`` threads here, or by ``worker_count`` processes."""
  if worker_count < 0:
    raise ValueError(f"worker_count must be >= 0, got {worker_count}")
  if worker_count == 0:
    read = grain.ReadOptions(num_threads=READ_THREADS, prefetch_buffer_size=READ_THREADS)
    return iter(ds.to_iter_dataset(read))
  if not flags.FLAGS.is_parsed():
    # grain 0.2.18 reads an absl flag when starting workers and fails outside `absl.app`
    # (google/grain#1355, fixed upstream later); its defaults are what we want.
    flags.FLAGS.mark_as_parsed()
  read = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
  mp = grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=WORKER_BUFFER)
  return iter(ds.to_iter_dataset(read).mp_prefetch(mp))


def _resolve(dataset: str, image_size: int | None) -> tuple[DatasetInfo, int]:
  info = get_info(dataset)
  image_size = info.image_size if image_size is None else image_size
  if info.preprocessing not in ("imagenet", "signal") and image_size != info.image_size:
    size = info.image_size
    raise ValueError(
      f"{dataset} images are {size}x{size}; image_size={image_size} is not supported."
    )
  return info, image_size


def create_train_iterator(
  dataset: str,
  *,
  global_batch_size: int,
  seed: int,
  data_dir: str | None = None,
  image_size: int | None = None,
  dtype: Any = np.float32,
  num_epochs: int | None = None,
  worker_count: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  source: Sequence[Record] | None = None,
) -> grain.DatasetIterator:
  """Shuffled, augmented train batches ``{"image": [b, H, W, 3] dtype, "label": int32 [b]}``.

  ``b = global_batch_size // process_count``; each epoch is ``steps_per_epoch`` batches of a new
  permutation; ``num_epochs=None`` repeats forever. Checkpointing: ``state = it.get_state()`` and,
  on a fresh iterator built with the same arguments, ``it.set_state(state)`` resumes at the same
  batch. With :func:`prefetch` on top, take the state from the number of steps run, not from the
  iterator, which is ahead by the prefetched batches.

  Args:
    source: an already opened random-access source of TFDS-format records (tests, benchmarks);
      default ``data_source(dataset, "train", data_dir)``.
  """
  info, image_size = _resolve(dataset, image_size)
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs must be positive or None, got {num_epochs}")
  source = data_source(dataset, info.train_split, data_dir) if source is None else source
  layout = _layout(len(source), global_batch_size, process_index, process_count)
  steps = layout.train_steps()
  if steps == 0:
    raise ValueError(f"{dataset} train has {len(source)} examples, fewer than one global batch.")
  element = _TrainElement(source, info, layout, steps, seed, image_size, np.dtype(dtype))
  ds = grain.MapDataset.range(steps * layout.local_batch).map_with_index(element)
  # Batch, then repeat: epoch e's batches ask for elements e * len + j, which `element` maps into
  # epoch e's permutation.
  ds = ds.batch(layout.local_batch, drop_remainder=True).repeat(num_epochs)
  return _to_iterator(ds, worker_count)


def create_eval_iterator(
  dataset: str,
  *,
  global_batch_size: int,
  data_dir: str | None = None,
  image_size: int | None = None,
  dtype: Any = np.float32,
  worker_count: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  source: Sequence[Record] | None = None,
) -> grain.DatasetIterator:
  """One pass over the eval split in full batches, plus ``"mask": bool [b]`` (False on padding).

  Over all processes every eval example is counted exactly once: sum ``mask``-weighted metrics.
  """
  info, image_size = _resolve(dataset, image_size)
  source = data_source(dataset, info.eval_split, data_dir) if source is None else source
  layout = _layout(len(source), global_batch_size, process_index, process_count)
  steps = layout.eval_steps()
  element = _EvalElement(source, info, layout, steps, image_size, np.dtype(dtype))
  ds = grain.MapDataset.range(steps * layout.local_batch).map_with_index(element)
  return _to_iterator(ds.batch(layout.local_batch, drop_remainder=True), worker_count)


# --------------------------------------------------------------------------------------------
# Host -> device


_END = object()


class _Raised(NamedTuple):
  error: BaseException


def prefetch(iterator: Iterable[T], size: int = 2) -> Iterator[T]:
  """Runs ``iterator`` in a background thread, ``size`` items ahead, so it overlaps the step.

  To overlap the host-to-device copy too, prefetch the copies:
  ``prefetch(dcil_jax.shard_batch(b, mesh) for b in it)``.
  """
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item: Any) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def produce() -> None:
    try:
      for item in iterator:
        if not put(item):
          return
    except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer
      put(_Raised(e))
      return
    put(_END)

  thread = threading.Thread(target=produce, daemon=True, name="input_pipeline.prefetch")
  thread.start()
  try:
    while True:
      item = items.get()
      if item is _END:
        return
      if isinstance(item, _Raised):
        raise item.error
      yield item
  finally:
    stop.set()
    thread.join(timeout=60)  # the producer stops after its current item
