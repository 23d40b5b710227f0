"""``python -m experiments.export``: a finished run's best checkpoint as ONNX and StableHLO."""

import json

import numpy as np
import onnxruntime
import pytest

from experiments import export, train
from experiments.configs import digits

TINY = {
  "batch_size": 16,
  "steps_per_epoch": 2,
  "num_train_steps": 4,
  "ramp_end_epoch": 1.0,
  "kd_start_epoch": 1.0,
  "warmup_epochs": 0.5,
  "update_every": 2,
  "sparsity": 0.5,
  "granularity": "filter",
  "run.progress": False,
  "run.worker_count": 0,
}


def tiny_config(**overrides):
  config = digits.get_config("local")
  for key, value in {**TINY, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("digits")
  train.train_and_evaluate(tiny_config(), str(workdir))
  return workdir


# Slow (a real training run compiles DCIL's step): the default run covers the export itself in
# tests/test_deploy.py::test_compact_and_masked_models_run_in_onnxruntime.
@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["onnx", "stablehlo"])
def test_export_of_a_finished_run_is_compact_and_exact(run_dir, fmt):
  report = export.export_run(run_dir, fmt)
  path = run_dir / "export" / f"model.{fmt}"
  assert report["file"] == str(path) and path.stat().st_size == report["bytes"]
  assert report["compacted"] and report["compact"]["removed"] > 0
  assert report["compact_macs"] < report["masked_model"]["macs"]
  assert report["max_abs_logit_diff_vs_masked"] < 1e-3
  assert report["step"] in (2, 4)  # an evaluated checkpoint
  saved = json.loads((run_dir / "export" / f"model.{fmt}.report.json").read_text())
  assert saved["bytes"] == report["bytes"]
  if fmt == "onnx":  # the batch size is free
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"x": np.zeros((3, *report["input_shape"]), np.float32)})
    assert logits.shape == (3, 10)


def test_a_directory_without_a_run_is_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match="config.json is missing"):
    export.export_run(tmp_path, "onnx")
  with pytest.raises(ValueError, match="--format"):
    export.export_run(tmp_path, "tflite")
