"""ImageNet/CIFAR input throughput per CPU core: grain + PIL (this repo) vs the tf.data equivalent.

Run ``python -m benchmarks.input_pipeline`` (or ``python benchmarks/input_pipeline.py``); see
``--help``. Results go to ``<out>/input_pipeline_cpu.json`` and ``<out>/input_pipeline_cpu.md``.

Both backends see the same serialized TFDS records (``tf.train.Example`` protos, as in the
array_record files): ImageNet-like JPEGs made from scikit-learn's two sample photos (crops,
rescales to typical ImageNet sizes, quality 95 and mild noise so the files average ~110 KB like
ImageNet's), and CIFAR-like 32x32 PNGs. Each measurement parses the record, decodes, augments,
normalises to float32 and stacks batches of 64; disk reads are not included (array_record reads
are cheap next to a JPEG decode, and the same for both backends).

- Per core: each backend runs in a child process pinned to CPU 0 (``sched_setaffinity``; TF also
  gets 1 inter/intra-op thread and a 1-thread tf.data pool). Children alternate (grain, tf, grain,
  tf, ...) for ``--rounds`` rounds, so drift and other load hit both alike.
- End to end on all cores: grain's ``create_train_iterator`` with ``worker_count`` 0 and 2 on the
  same records and on ``tfds.testing.mock_data`` ImageNet, and tf.data with ``AUTOTUNE``.
- tf.data runs with the Python of a separate environment (``--tf-python``, default
  ``/tmp/tfbench/bin/python``, made with ``python -m venv /tmp/tfbench &&
  /tmp/tfbench/bin/pip install tensorflow-cpu numpy pillow``): this repo must not need TensorFlow.
  Without it the tf.data rows are skipped and the report says so.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2023, 0.1994, 0.2010)
BATCH = 64
SPLIT_LENGTHS = {"imagenet2012": 1_281_167, "cifar10": 50_000}
IMAGE_SIZE = 224
# Typical ImageNet train sizes (w, h): most photos are 500 px on the long side.
SIZES = ((500, 375), (375, 500), (500, 333), (333, 500), (500, 500), (400, 300), (640, 480))
# Assumptions for the TPU section (not measured here).
TPU_HOST_IMAGES_PER_S = (10_000, 12_000)  # ResNet-50 training on a v4-8 host (4 chips, 1 host)
TPU_HOST_VCPUS = 240
DCIL_STEP_RATIO = 1.9  # DCIL step / dense step (benchmarks/results/step_time_cpu.md, ResNet-20)


def log(msg: str) -> None:
  """Progress on stderr (results go to files)."""
  print(f"[{time.strftime('%H:%M:%S')} pid {os.getpid()}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Test records


def make_jpegs(num: int, seed: int, quality: int, noise: float) -> list[bytes]:
  """ImageNet-like JPEGs from the two scikit-learn sample photos."""
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photos = [Image.fromarray(im) for im in load_sample_images().images]  # 427 x 640 each
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    photo = photos[i % len(photos)]
    w, h = SIZES[int(rng.integers(len(SIZES)))]
    # A random crop of the photo with the target aspect ratio, 50-100% of the largest one.
    scale = rng.uniform(0.5, 1.0)
    cw = min(photo.width, photo.height * w / h) * scale
    ch = cw * h / w
    x0 = rng.uniform(0, photo.width - cw)
    y0 = rng.uniform(0, photo.height - ch)
    img = photo.resize((w, h), Image.Resampling.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    pixels = np.asarray(img, np.float32) + rng.normal(0, noise, (h, w, 3))
    if rng.random() < 0.5:
      pixels = pixels[:, ::-1]
    buf = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    out.append(buf.getvalue())
  return out


def make_pngs(num: int, seed: int) -> list[bytes]:
  """CIFAR-like 32x32 PNGs (downscaled crops of the sample photos)."""
  from PIL import Image
  from sklearn.datasets import load_sample_images

  photos = [Image.fromarray(im) for im in load_sample_images().images]
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    photo = photos[i % len(photos)]
    side = rng.uniform(60, 400)
    x0, y0 = rng.uniform(0, photo.width - side), rng.uniform(0, photo.height - side)
    img = photo.resize((32, 32), Image.Resampling.BOX, box=(x0, y0, x0 + side, y0 + side))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    out.append(buf.getvalue())
  return out


def serialize(dataset: str, images: list[bytes]) -> list[bytes]:
  """Serialized TFDS examples, byte for byte what the array_record files hold (no TF needed)."""
  import tensorflow_datasets as tfds

  features = tfds.builder(dataset, data_dir=tempfile.gettempdir()).info.features
  out = []
  for i, data in enumerate(images):
    example = {"image": io.BytesIO(data), "label": i % 10}
    example["file_name" if dataset == "imagenet2012" else "id"] = f"img_{i}.JPEG"
    out.append(features.serialize_example(example))
  return out


class SerializedSource:
  """Random access over serialized records, deserialized like ``tfds.data_source`` does.

  It claims the real split's length (record ``i`` is ``records[i % len(records)]``) so grain's
  index shuffle costs what it costs on the real split (it is ~30x slower on tiny ranges).
  """

  def __init__(self, dataset: str, records: list[bytes]):
    self.dataset, self.records = dataset, records
    self.length = SPLIT_LENGTHS[dataset]

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, i: int) -> dict[str, Any]:
    import tensorflow_datasets as tfds

    features = _features(self.dataset)
    decoders = {"image": tfds.decode.SkipDecoding()} if self.dataset == "imagenet2012" else None
    return features.deserialize_example_np(self.records[i % len(self.records)], decoders=decoders)


_FEATURES: dict[str, Any] = {}


def _features(dataset: str) -> Any:
  if dataset not in _FEATURES:
    import tensorflow_datasets as tfds

    builder = tfds.builder(dataset, data_dir=tempfile.gettempdir())
    _FEATURES[dataset] = builder.info.features
  return _FEATURES[dataset]


# --------------------------------------------------------------------------------------------
# Timing helpers


def cpu_times() -> tuple[float, float]:
  """(busy, total) jiffies of the whole machine, from /proc/stat."""
  with open("/proc/stat") as f:
    values = [float(v) for v in f.readline().split()[1:]]
  idle = values[3] + values[4]
  return sum(values) - idle, sum(values)


def pipeline_cpu_seconds() -> float:
  """CPU seconds used so far by this process and its live children (grain workers)."""
  try:
    import psutil
  except ImportError:
    return time.process_time()
  proc = psutil.Process()
  total = sum(proc.cpu_times()[:2])
  for child in proc.children(recursive=True):
    try:
      total += sum(child.cpu_times()[:2])
    except psutil.Error:
      pass
  return total


def timed(run_batch, min_seconds: float, min_images: int) -> dict[str, float]:
  """Calls ``run_batch()`` (returns images done) until both minimums are met.

  ``images_per_cpu_s`` divides by the CPU time of this process and its children: on a shared
  machine it is the steadier measure of what one core delivers; ``images_per_s`` is wall time.
  """
  run_batch()  # warm-up
  busy0, total0 = cpu_times()
  cpu0 = pipeline_cpu_seconds()
  start = time.perf_counter()
  images = 0
  while True:
    images += run_batch()
    elapsed = time.perf_counter() - start
    if elapsed >= min_seconds and images >= min_images:
      break
  cpu = pipeline_cpu_seconds() - cpu0
  busy1, total1 = cpu_times()
  ncpu = os.cpu_count() or 1
  return {
    "images_per_s": images / elapsed,
    "images_per_cpu_s": images / cpu,
    "seconds": elapsed,
    "images": images,
    "machine_busy_cores": (busy1 - busy0) / (total1 - total0) * ncpu,
    "process_cores": cpu / elapsed,
  }


def pin_to_one_core() -> None:
  os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})


# --------------------------------------------------------------------------------------------
# Child: grain / PIL transforms on one core


def child_grain(records: dict[str, list[bytes]], min_seconds: float) -> dict[str, Any]:
  """The per-element work of ``experiments.input_pipeline`` on one core."""
  pin_to_one_core()
  sys.path.insert(0, str(REPO))
  from experiments import input_pipeline as ip

  imagenet = SerializedSource("imagenet2012", records["imagenet2012"])
  cifar = SerializedSource("cifar10", records["cifar10"])
  inet_info, cifar_info = ip.DATASETS["imagenet2012"], ip.DATASETS["cifar10"]
  state = {"i": 0}

  def batch_of(source, fn) -> int:
    images = []
    for _ in range(BATCH):
      i = state["i"] = (state["i"] + 1) % len(source)
      images.append(fn(source[i], np.random.Generator(np.random.Philox(key=i))))
    np.stack(images)
    return BATCH

  def inet(train: bool, draft: bool):
    def fn(record, rng):
      if train:
        image = ip.imagenet_train_image(record["image"], rng, IMAGE_SIZE, draft=draft)
      else:
        image = ip.imagenet_eval_image(record["image"], IMAGE_SIZE, draft=draft)
      return ip.normalize(image, inet_info.mean, inet_info.std)

    return lambda: batch_of(imagenet, fn)

  def decode_only(record, rng):
    from PIL import Image

    Image.open(io.BytesIO(record["image"])).load()
    return np.zeros((8, 8, 3), np.uint8)

  def cifar_fn(train: bool):
    def fn(record, rng):
      return ip.preprocess(record, cifar_info, train=train, rng=rng, image_size=32)["image"]

    return lambda: batch_of(cifar, fn)

  configs = {
    "imagenet_train": inet(True, True),
    "imagenet_train_no_draft": inet(True, False),
    "imagenet_eval": inet(False, True),
    "imagenet_eval_no_draft": inet(False, False),
    "jpeg_decode_only": lambda: batch_of(imagenet, decode_only),
    "cifar_train": cifar_fn(True),
    "cifar_eval": cifar_fn(False),
  }
  return {name: timed(fn, min_seconds, 2 * BATCH) for name, fn in configs.items()}


# --------------------------------------------------------------------------------------------
# Child: tf.data on one core, or on all cores (AUTOTUNE)


def child_tf(records: dict[str, list[bytes]], min_seconds: float, one_core: bool) -> dict[str, Any]:
  """The tf.data equivalent (decode_and_crop_jpeg, resize, flip, normalise)."""
  if one_core:
    pin_to_one_core()
    os.environ["TF_NUM_INTEROP_THREADS"] = os.environ["TF_NUM_INTRAOP_THREADS"] = "1"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf

  if one_core:
    tf.config.threading.set_inter_op_parallelism_threads(1)
    tf.config.threading.set_intra_op_parallelism_threads(1)
  spec = {
    "image": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
  }

  def normalize(image, mean, std):
    scale = 1.0 / (255.0 * tf.constant(std))
    return tf.cast(image, tf.float32) * scale - tf.constant(mean) / tf.constant(std)

  def imagenet_train(serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    data = ex["image"]
    begin, size, _ = tf.image.sample_distorted_bounding_box(
      tf.io.extract_jpeg_shape(data),
      bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
      min_object_covered=0.0,
      aspect_ratio_range=(3 / 4, 4 / 3),
      area_range=(0.08, 1.0),
      max_attempts=10,
      use_image_if_no_bounding_boxes=True,
    )
    y, x, _ = tf.unstack(begin)
    h, w, _ = tf.unstack(size)
    image = tf.io.decode_and_crop_jpeg(data, tf.stack([y, x, h, w]), channels=3)
    image = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], method="bilinear")
    image = tf.image.random_flip_left_right(image)
    return normalize(image, IMAGENET_MEAN, IMAGENET_STD), tf.cast(ex["label"], tf.int32)

  def imagenet_eval(serialized):
    ex = tf.io.parse_single_example(serialized, spec)
    data = ex["image"]
    shape = tf.io.extract_jpeg_shape(data)
    h, w = shape[0], shape[1]
    crop = tf.cast(IMAGE_SIZE / (IMAGE_SIZE + 32) * tf.cast(tf.minimum(h, w), tf.float32), tf.int32)
    window = tf.stack([(h - crop + 1) // 2, (w - crop + 1) // 2, crop, crop])
    image = tf.io.decode_and_crop_jpeg(data, window, channels=3)
    image = tf.image.resize(image, [IMAGE_SIZE, IMAGE_SIZE], method="bilinear")
    return normalize(image, IMAGENET_MEAN, IMAGENET_STD), tf.cast(ex["label"], tf.int32)

  def decode_only(serialized):
    image = tf.io.decode_jpeg(tf.io.parse_single_example(serialized, spec)["image"], channels=3)
    return image[:8, :8], 0

  def cifar(train: bool):
    def fn(serialized):
      ex = tf.io.parse_single_example(serialized, spec)
      image = tf.io.decode_png(ex["image"], channels=3)
      if train:
        image = tf.pad(image, [[4, 4], [4, 4], [0, 0]])
        image = tf.image.random_crop(image, [32, 32, 3])
        image = tf.image.random_flip_left_right(image)
      return normalize(image, CIFAR_MEAN, CIFAR_STD), tf.cast(ex["label"], tf.int32)

    return fn

  def pipeline(dataset: str, fn):
    ds = tf.data.Dataset.from_tensor_slices(records[dataset]).repeat()
    options = tf.data.Options()
    if one_core:
      ds = ds.map(fn).batch(BATCH)
      options.threading.private_threadpool_size = 1
      options.threading.max_intra_op_parallelism = 1
    else:
      ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE).batch(BATCH)
      ds = ds.prefetch(tf.data.AUTOTUNE)
    iterator = iter(ds.with_options(options))

    def run_batch() -> int:
      image, _ = next(iterator)
      image.numpy()
      return BATCH

    return run_batch

  configs = {
    "imagenet_train": ("imagenet2012", imagenet_train),
    "imagenet_eval": ("imagenet2012", imagenet_eval),
    "jpeg_decode_only": ("imagenet2012", decode_only),
    "cifar_train": ("cifar10", cifar(True)),
    "cifar_eval": ("cifar10", cifar(False)),
  }
  if not one_core:
    configs = {k: v for k, v in configs.items() if k in ("imagenet_train", "cifar_train")}
  results = {}
  for name, (dataset, fn) in configs.items():
    results[name] = timed(pipeline(dataset, fn), min_seconds, (4 if one_core else 16) * BATCH)
  results["_versions"] = {"tensorflow": tf.__version__}
  return results


# --------------------------------------------------------------------------------------------
# Grain end to end (all cores)


def grain_end_to_end(
  records: dict[str, list[bytes]], min_seconds: float, workers: list[int]
) -> dict[str, Any]:
  """``create_train_iterator`` throughput, batches of 64, after the first batch."""
  sys.path.insert(0, str(REPO))
  import tensorflow_datasets as tfds

  from experiments import input_pipeline as ip

  def measure(dataset: str, source, worker_count: int, image_size: int | None) -> dict[str, float]:
    it = ip.create_train_iterator(
      dataset,
      global_batch_size=BATCH,
      seed=0,
      image_size=image_size,
      worker_count=worker_count,
      source=source,
      process_index=0,
      process_count=1,
    )
    start = time.perf_counter()
    next(it)
    first = time.perf_counter() - start
    out = timed(lambda: next(it)["image"].shape[0], min_seconds, 16 * BATCH)
    out["first_batch_s"] = first
    if worker_count:
      it.close()
    return out

  results = {}
  for w in workers:
    src = SerializedSource("imagenet2012", records["imagenet2012"])
    results[f"imagenet_train_records/workers={w}"] = measure("imagenet2012", src, w, None)
    src = SerializedSource("cifar10", records["cifar10"])
    results[f"cifar_train_records/workers={w}"] = measure("cifar10", src, w, None)
    with tfds.testing.mock_data(num_examples=50_000):
      results[f"imagenet_train_mock/workers={w}"] = measure("imagenet2012", None, w, None)
    log(f"grain end to end, workers={w}: done")
  return results


# --------------------------------------------------------------------------------------------
# Driver


def run_child(python: str, args: list[str], records_path: str) -> dict[str, Any]:
  cmd = [python, str(Path(__file__).resolve()), *args, "--records", records_path]
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
  if out.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def versions() -> dict[str, str]:
  from importlib.metadata import version

  import grain  # noqa: F401
  import jax
  import PIL
  import PIL.features
  import tensorflow_datasets as tfds

  return {
    "python": platform.python_version(),
    "numpy": np.__version__,
    "pillow": PIL.__version__,
    "libjpeg_turbo (pillow)": str(PIL.features.version("libjpeg_turbo")),
    "grain": version("grain"),
    "tensorflow_datasets": tfds.__version__,
    "jax": jax.__version__,
  }


def machine() -> str:
  model = "unknown CPU"
  with open("/proc/cpuinfo") as f:
    for line in f:
      if line.startswith("model name"):
        model = line.split(":", 1)[1].strip()
        break
  with open("/proc/meminfo") as f:
    mem_gib = int(f.readline().split()[1]) / 2**20
  return (
    f"{model}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
    f"{mem_gib:.0f} GiB RAM; {platform.platform()}"
  )


def summarize(rounds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Median, min and max over rounds of both rates, and the mean of the load columns."""
  out = {}
  for name in rounds[0]:
    if name.startswith("_"):
      continue
    row: dict[str, Any] = {}
    for key in ("images_per_cpu_s", "images_per_s"):
      rates = [r[name][key] for r in rounds]
      row[key] = {
        "median": statistics.median(rates),
        "min": min(rates),
        "max": max(rates),
        "rounds": rates,
      }
    for key in ("machine_busy_cores", "process_cores"):
      row[key] = statistics.mean(r[name][key] for r in rounds)
    if "first_batch_s" in rounds[0][name]:
      row["first_batch_s"] = statistics.median(r[name]["first_batch_s"] for r in rounds)
    out[name] = row
  return out


def rate(row: dict[str, Any], key: str = "images_per_cpu_s") -> str:
  r = row[key]
  return f"{r['median']:.0f} ({r['min']:.0f}–{r['max']:.0f})"


def med(row: dict[str, Any] | None, key: str = "images_per_cpu_s") -> float:
  return row[key]["median"] if row else float("nan")


def previous_summary(previous: dict[str, Any]) -> dict[str, Any]:
  """The medians of an earlier run that the run-to-run table shows."""
  return {
    "date": previous["date"],
    "loadavg_before": previous["loadavg_before"],
    "per_core": {
      backend: {name: med(row) for name, row in table.items()}
      for backend, table in previous["per_core"].items()
    },
    "end_to_end": {
      backend: {name: med(row, "images_per_s") for name, row in table.items()}
      for backend, table in previous["end_to_end"].items()
    },
  }


def run_to_run_lines(result: dict[str, Any]) -> list[str]:
  prev = result.get("previous_run")
  if not prev:
    return []
  lines = [
    "## Run to run",
    "",
    f"The same benchmark run earlier ({prev['date']}, load average before "
    f"{prev['loadavg_before']}): medians of that run vs this one.",
    "",
    "| measurement | earlier | this run | this / earlier |",
    "|---|---:|---:|---:|",
  ]
  for section, key in (("per_core", "images_per_cpu_s"), ("end_to_end", "images_per_s")):
    for backend, table in result[section].items():
      for name, row in table.items():
        before = prev[section].get(backend, {}).get(name)
        if before:
          now = med(row, key)
          label = f"{section.replace('_', ' ')}: {backend} {name}"
          lines.append(f"| {label} | {before:.0f} | {now:.0f} | {now / before:.2f} |")
  return lines + [""]


def write_report(result: dict[str, Any], out: Path) -> None:
  pc_g, pc_t = result["per_core"]["grain"], result["per_core"].get("tf") or {}
  e2e_g, e2e_t = result["end_to_end"]["grain"], result["end_to_end"].get("tf") or {}
  rec = result["records"]
  lines = ["# Input pipeline throughput on CPU: grain + PIL vs tf.data", ""]
  lines += [result["recommendation"], ""]
  lines += [
    f"- **CPU**: {result['machine']}",
    "- **Software**: "
    + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    + (f"; tensorflow {result['tf_version']} (separate venv)" if result.get("tf_version") else ""),
    f"- **Date**: {result['date']}; wall time {result['wall_s'] / 60:.1f} min; "
    f"load average before / after: {result['loadavg_before']} / {result['loadavg_after']}",
    f"- **Command**: `{result['command']}`",
    f"- **Records**: {rec['imagenet_jpegs']} ImageNet-like JPEGs (mean "
    f"{rec['jpeg_mean_kb']:.0f} KB, mean {rec['jpeg_mean_wh']} px, quality {rec['quality']}) and "
    f"{rec['cifar_pngs']} CIFAR-like "
    "32x32 PNGs, serialized as TFDS examples; sources claim the real split lengths.",
    "",
    "## Per core (process pinned to one CPU)",
    "",
    f"Images per CPU-second of the pinned process, median over {result['rounds']} rounds "
    "(min–max). Each image: record parse, decode, augment, normalise to float32, stack batches "
    "of 64. *wall* = images per wall second; *busy* = busy cores of the whole machine while "
    "timing (the pinned process can use 1; the rest is other load). *PIL / TF* = median "
    "(min–max) over rounds of the ratio within a round (the two children run back to back).",
    "",
    "| transform | grain/PIL per CPU-s | wall | busy | tf.data per CPU-s | wall | busy "
    "| PIL / TF |",
    "|---|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for name, g in pc_g.items():
    t = pc_t.get(name)
    ratios = result.get("per_core_ratio", {}).get(name)
    tf_cols = (
      f"{rate(t)} | {med(t, 'images_per_s'):.0f} | {t['machine_busy_cores']:.2f} | "
      f"**{statistics.median(ratios):.2f}** ({min(ratios):.2f}–{max(ratios):.2f})"
      if t
      else "— | — | — | —"
    )
    lines.append(
      f"| {name} | {rate(g)} | {med(g, 'images_per_s'):.0f} | {g['machine_busy_cores']:.2f} | "
      f"{tf_cols} |"
    )
  if not pc_t:
    lines += ["", f"tf.data was not measured: {result['tf_skipped']}"]
  lines += [
    "",
    "- *no_draft*: PIL decodes the full JPEG. By default libjpeg decodes at 1/2–1/8 scale when "
    "the crop is at least twice the output size, which is rare for ~500x375 photos at 224.",
    "- tf.data decodes only the crop window (`decode_and_crop_jpeg`) and resizes without "
    "antialiasing (`tf.image.resize` bilinear); PIL decodes the whole JPEG and resizes with "
    "antialiasing, as torchvision (the official code) does.",
    "- *jpeg_decode_only*: parse + full decode, no crop (PIL: `Image.open(...).load()`).",
    "",
    "## End to end, all cores",
    "",
    "Train batches of 64 (float32; ImageNet 224x224), timed after the first batch. grain: "
    "`create_train_iterator` with `worker_count=0` "
    f"({result['read_threads']} threads in the main process) or worker processes. *cores* = CPU "
    "used by the pipeline (process + workers); *per CPU-s* = images / that CPU time.",
    "",
    "| pipeline | img/s wall | per CPU-s | cores | machine busy | first batch s |",
    "|---|---:|---:|---:|---:|---:|",
  ]
  for backend, table in (("grain", e2e_g), ("tf.data AUTOTUNE", e2e_t)):
    for name, g in table.items():
      first = f"{g['first_batch_s']:.1f}" if "first_batch_s" in g else ""
      lines.append(
        f"| {backend} {name} | {rate(g, 'images_per_s')} | {med(g):.0f} | "
        f"{g['process_cores']:.2f} | {g['machine_busy_cores']:.2f} | {first} |"
      )
  lines += [
    "",
    "*mock*: `tfds.testing.mock_data` ImageNet records are random arrays of 5–49 px (no JPEG), "
    "so those rows measure grain's overhead and the resize to 224, not decoding. "
    "`worker_count=0` builds batches on threads: PIL releases the GIL while decoding and "
    "resizing, so ImageNet gets some parallelism there and CIFAR (small, Python-bound work) "
    "little; on a TPU host use worker processes.",
    "",
    "## What it means for a TPU v4 host",
    "",
  ]
  lines += result["tpu_lines"]
  lines += ["", *run_to_run_lines(result)]
  (out / "input_pipeline_cpu.md").write_text("\n".join(lines) + "\n")


def tpu_lines(result: dict[str, Any]) -> list[str]:
  lo, hi = TPU_HOST_IMAGES_PER_S
  pc_g, pc_t = result["per_core"]["grain"], result["per_core"].get("tf") or {}
  lines = [
    f"Assumptions, not measured here: a v4-8 host (4 chips, one host with {TPU_HOST_VCPUS} "
    f"vCPUs) trains dense ResNet-50 at roughly {lo / 1000:.0f}–{hi / 1000:.0f}k images/s; a DCIL "
    f"step costs about {DCIL_STEP_RATIO}x a dense step (our CPU step-time benchmark), so DCIL "
    f"needs about {lo / DCIL_STEP_RATIO / 1000:.1f}–{hi / DCIL_STEP_RATIO / 1000:.1f}k images/s."
    " Cores needed = rate / per-core images per CPU-second, assuming linear scaling over worker "
    "processes (this 2-core machine cannot show scaling beyond 2).",
    "",
    "| transform | backend | per core | cores for dense (10–12k/s) | cores for DCIL |",
    "|---|---|---:|---:|---:|",
  ]
  for name in ("imagenet_train", "imagenet_eval"):
    for backend, table in (("grain/PIL", pc_g), ("tf.data", pc_t)):
      if name not in table:
        continue
      r = med(table[name])
      lines.append(
        f"| {name} | {backend} | {r:.0f} | {lo / r:.0f}–{hi / r:.0f} | "
        f"{lo / DCIL_STEP_RATIO / r:.0f}–{hi / DCIL_STEP_RATIO / r:.0f} |"
      )
  cifar = f"{1e4 / med(pc_g['cifar_train']):.1f} cores with grain/PIL"
  if "cifar_train" in pc_t:
    cifar += f" and {1e4 / med(pc_t['cifar_train']):.1f} with tf.data"
  lines += [
    "",
    f"CIFAR: every 10k train images/s take about {cifar}; small CIFAR models step fast, so "
    "give them worker processes too.",
  ]
  return lines


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="benchmarks/results")
  parser.add_argument("--num-images", type=int, default=256)
  parser.add_argument("--quality", type=int, default=95)
  parser.add_argument("--noise", type=float, default=8.0, help="pixel noise std (file size)")
  parser.add_argument("--rounds", type=int, default=5, help="per-core rounds")
  parser.add_argument("--e2e-rounds", type=int, default=3, help="end-to-end rounds")
  parser.add_argument("--min-seconds", type=float, default=2.0, help="per per-core measurement")
  parser.add_argument("--e2e-seconds", type=float, default=8.0, help="per end-to-end measurement")
  parser.add_argument("--tf-python", default="/tmp/tfbench/bin/python")
  parser.add_argument("--workers", default="0,2", help="grain worker_count values, end to end")
  parser.add_argument("--child", choices=["grain", "tf", "tf-all"], help=argparse.SUPPRESS)
  parser.add_argument("--records", help=argparse.SUPPRESS)
  parser.add_argument("--from-json", help="rewrite the report from this results file, no runs")
  parser.add_argument("--previous", help="results JSON of an earlier run, for a run-to-run table")
  args = parser.parse_args()

  previous = json.loads(Path(args.previous).read_text()) if args.previous else None
  if args.from_json:
    result = json.loads(Path(args.from_json).read_text())
    if previous:
      result["previous_run"] = previous_summary(previous)
    result["tpu_lines"] = tpu_lines(result)
    result["recommendation"] = recommendation(result)
    out = Path(args.out)
    (out / "input_pipeline_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(result, out)
    return

  if args.child:
    with open(args.records, "rb") as f:
      records = pickle.load(f)
    if args.child == "grain":
      res = child_grain(records, args.min_seconds)
    else:
      res = child_tf(records, args.min_seconds, one_core=args.child == "tf")
    print(json.dumps(res))
    return

  t_start = time.time()
  loadavg_before = open("/proc/loadavg").read().split()[:3]
  log("making records")
  jpegs = make_jpegs(args.num_images, 0, args.quality, args.noise)
  pngs = make_pngs(args.num_images, 1)
  from PIL import Image

  dims = np.array([Image.open(io.BytesIO(j)).size for j in jpegs])
  records = {
    "imagenet2012": serialize("imagenet2012", jpegs),
    "cifar10": serialize("cifar10", pngs),
  }
  tmp = tempfile.mkdtemp(prefix="input_pipeline_bench_")
  records_path = os.path.join(tmp, "records.pkl")
  with open(records_path, "wb") as f:
    pickle.dump(records, f)

  tf_python = args.tf_python if args.tf_python and os.path.exists(args.tf_python) else None
  tf_skipped = None
  if tf_python:
    probe = subprocess.run([tf_python, "-c", "import tensorflow"], capture_output=True, text=True)
    if probe.returncode:
      tf_skipped = f"{tf_python} cannot import tensorflow: {probe.stderr.strip()[-300:]}"
      tf_python = None
  else:
    tf_skipped = f"no TensorFlow python at {args.tf_python!r} (see the module docstring)"
  if tf_skipped:
    log(f"skipping tf.data: {tf_skipped}")

  common = ["--min-seconds", str(args.min_seconds)]
  grain_rounds, tf_rounds = [], []
  for r in range(args.rounds):
    log(f"per-core round {r + 1}/{args.rounds}: grain")
    grain_rounds.append(run_child(sys.executable, ["--child", "grain", *common], records_path))
    if tf_python:
      log(f"per-core round {r + 1}/{args.rounds}: tf.data")
      tf_rounds.append(run_child(tf_python, ["--child", "tf", *common], records_path))

  workers = [int(w) for w in args.workers.split(",")]
  e2e_grain_rounds, e2e_tf_rounds = [], []
  e2e_common = ["--min-seconds", str(args.e2e_seconds)]
  for r in range(args.e2e_rounds):
    log(f"end-to-end round {r + 1}/{args.e2e_rounds}")
    e2e_grain_rounds.append(grain_end_to_end(records, args.e2e_seconds, workers))
    if tf_python:
      e2e_tf_rounds.append(run_child(tf_python, ["--child", "tf-all", *e2e_common], records_path))

  from experiments import input_pipeline as ip

  result: dict[str, Any] = {
    "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    "command": " ".join(["python", *sys.argv]),
    "machine": machine(),
    "versions": versions(),
    "tf_version": tf_rounds[0]["_versions"]["tensorflow"] if tf_rounds else None,
    "tf_skipped": tf_skipped,
    "rounds": args.rounds,
    "e2e_rounds": args.e2e_rounds,
    "min_seconds": args.min_seconds,
    "e2e_seconds": args.e2e_seconds,
    "read_threads": ip.READ_THREADS,
    "records": {
      "imagenet_jpegs": len(jpegs),
      "jpeg_mean_kb": float(np.mean([len(j) for j in jpegs]) / 1024),
      "jpeg_mean_wh": f"{dims[:, 0].mean():.0f}x{dims[:, 1].mean():.0f}",
      "quality": args.quality,
      "noise": args.noise,
      "cifar_pngs": len(pngs),
    },
    "per_core": {"grain": summarize(grain_rounds)},
    "end_to_end": {"grain": summarize(e2e_grain_rounds)},
    "raw": {"per_core_grain": grain_rounds, "per_core_tf": tf_rounds},
  }
  if tf_rounds:
    result["per_core"]["tf"] = summarize(tf_rounds)
    result["end_to_end"]["tf"] = summarize(e2e_tf_rounds)
    result["per_core_ratio"] = {
      name: [
        g[name]["images_per_cpu_s"] / t[name]["images_per_cpu_s"]
        for g, t in zip(grain_rounds, tf_rounds)
      ]
      for name in tf_rounds[0]
      if not name.startswith("_")
    }
  result["loadavg_before"] = " ".join(loadavg_before)
  result["loadavg_after"] = " ".join(open("/proc/loadavg").read().split()[:3])
  result["wall_s"] = time.time() - t_start
  if previous:
    result["previous_run"] = previous_summary(previous)
  result["tpu_lines"] = tpu_lines(result)
  result["recommendation"] = recommendation(result)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  (out / "input_pipeline_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
  write_report(result, out)
  log(f"wrote {out / 'input_pipeline_cpu.md'} and .json")


def recommendation(result: dict[str, Any]) -> str:
  """The report's opening paragraph, from the numbers."""
  pc_g, pc_t = result["per_core"]["grain"], result["per_core"].get("tf") or {}
  g_train, g_eval = med(pc_g["imagenet_train"]), med(pc_g["imagenet_eval"])
  cores = TPU_HOST_IMAGES_PER_S[1] / g_train
  text = (
    f"**Result.** One core runs the grain/PIL ImageNet train transform at {g_train:.0f} images/s "
    f"(eval {g_eval:.0f}), CIFAR train at {med(pc_g['cifar_train']):.0f}"
  )
  if pc_t:
    ratio = {k: statistics.median(v) for k, v in result["per_core_ratio"].items()}
    text += (
      f"; tf.data does {med(pc_t['imagenet_train']):.0f} (eval {med(pc_t['imagenet_eval']):.0f}),"
      f" CIFAR train {med(pc_t['cifar_train']):.0f}. Per round, grain/PIL runs at "
      f"{ratio['imagenet_train']:.2f}x tf.data on ImageNet train, {ratio['imagenet_eval']:.2f}x "
      f"on eval and {ratio['cifar_train']:.2f}x on CIFAR train."
    )
  else:
    text += f". tf.data was not measured ({result['tf_skipped']})."
    return text + " The recommendation needs both backends: see the committed results."
  text += (
    f" Feeding a v4-8 host's ~12k dense ResNet-50 images/s (assumed) takes about {cores:.0f} of "
    f"its {TPU_HOST_VCPUS} vCPUs with grain/PIL (half that for DCIL, whose step costs ~2x)."
  )
  return text + "\n\n" + RECOMMENDATION


# Written after reading the numbers (see the tables); kept here so a rerun does not drop it.
RECOMMENDATION = """**Recommendation: keep tfds.data_source (array_record) + grain + PIL**, as
`experiments/input_pipeline.py` does. It is *not* the faster decoder: per core it reaches about
two thirds of tf.data on the ImageNet transforms and under half on CIFAR, because tf.data decodes
only the crop window (`decode_and_crop_jpeg`) and resizes without antialiasing, while PIL decodes
the whole JPEG and resizes with antialiasing (as the official torchvision code does), and TFDS
decodes CIFAR's PNGs in Python. PIL's `draft` (reduced-size decoding) almost never applies at 224.
But the absolute cost fits a TPU host: a few dozen cores for dense ResNet-50 at a v4-8 host's
rate, half that for DCIL, out of the ~240 vCPUs such a host has (assumptions below), so decoding
need not be the bottleneck if `worker_count` is set high enough (a few more workers than the cores
computed below). In exchange it needs no TensorFlow at train time (tf.data needs tensorflow-cpu,
~1.4 GB and ~6 s of import), gives an exact per-host split with the same global batches for any
number of hosts or workers, a small checkpointable position (a batch counter; a tf.data iterator
checkpoint carries its shuffle buffer), and runs under `tfds.testing.mock_data` in the tests.
Switch to tf.data (or add OpenCV / pillow-simd to the PIL path, not done here) only if the host CPU
turns out to be the limit: smaller hosts per chip, heavier host-side augmentation. Moving the
normalisation to the device (feed uint8) would also save host time and 4x of the transfer.
Caveat: this 2-core machine was shared with other jobs (both cores busy in every measurement), so
absolute numbers vary by ~10-20% between rounds; the per-round PIL/TF ratios are steadier. It
cannot show how grain's worker processes scale: the end-to-end rows are functional checks, not
scaling data."""


if __name__ == "__main__":
  main()
