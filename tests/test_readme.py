"""Every Python block of the README and of docs/*.md runs as written (in order, one namespace
per file)."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def python_blocks(path: Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


def test_the_readme_has_the_two_user_examples():
  blocks = python_blocks(README)
  assert any("dcil_jax.TrainState.create(" in b for b in blocks)  # your own code
  assert any("def step(" in b for b in blocks)  # your own model, optimizer and loop
  deploy = [b for b in blocks if "deploy.compact(" in b]
  assert deploy and "(nn.Module)" in deploy[0]  # deploys an own model, not a zoo model


def check(block: str, ns: dict) -> None:
  """What each example promises, checked right after it ran."""
  if "state = dcil_jax.TrainState.create(\n" in block:  # the README's TrainState example
    assert "sparse" in ns["state"].params  # DCIL's lifted layout
    assert jax.tree.structure(ns["deployable"]) == jax.tree.structure(ns["variables"])
    assert float(ns["sums"]["count"]) == 16
  if "def step(" in block:  # your own loop
    assert np.isfinite(float(ns["loss"])) and ns["logits"].shape == (16, 10)
  if "from_nnx" in block:
    assert type(ns["trained"]).__name__ == "Net"  # the user's class comes back
  if "deploy.compact(" in block:
    assert (Path("mynet_compact") / "model.onnx").exists()
    assert (Path("mynet_compact") / "model.stablehlo").exists()
    assert ns["small"].report["removed"] > 0  # filters were pruned and removed
  if "save_compressed(" in block:
    assert Path("mynet_sparse.npz").exists()
  if "onnxruntime.InferenceSession(" in block and "masked(images)" not in block:
    masked = ns["dcil_jax"].masked_function(
      ns["model"], ns["dcil_jax"].export_variables(ns["state"]), ns["state"].trained_masks
    )
    np.testing.assert_allclose(ns["logits"], masked(ns["images"]), rtol=1e-4, atol=1e-4)
  if 'method="rigl"' in block:  # the baselines
    assert ns["state"].method.name == "rigl"


@pytest.mark.parametrize(
  "path", [README, *(p for p in DOCS if python_blocks(p))], ids=lambda p: p.name
)
def test_every_python_block_runs(path, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that save files write them here
  namespace: dict = {}
  for block in python_blocks(path):
    exec(compile(block, str(path), "exec"), namespace)  # noqa: S102
    check(block, namespace)
