"""Every Python block of the README runs as written (in order, in one namespace)."""

import re
from pathlib import Path

import jax
import numpy as np

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_examples():
  assert len(python_blocks()) >= 4


def check(block: str, ns: dict) -> None:
  """What each example promises, checked right after it ran."""
  if "state = dcil_jax.TrainState.create(" in block:  # the TrainState example
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
    assert Path("mynet_sparse.npz").exists()


def test_every_python_block_runs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # examples that save files write them here
  namespace: dict = {}
  for block in python_blocks():
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
    check(block, namespace)
