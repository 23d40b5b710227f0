"""Every Python block of the README runs as written (in order, in one namespace)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
  return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_examples():
  assert len(python_blocks()) >= 3


def test_every_python_block_runs(capsys):
  namespace: dict = {}
  for block in python_blocks():
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102
  import jax
  import numpy as np

  # The examples end with plain variables of the unmodified model, and its logits.
  assert jax.tree.structure(namespace["deployable"]) == jax.tree.structure(namespace["variables"])
  assert namespace["logits"].shape == (16, 10)
  assert float(namespace["sums"]["count"]) == 16 and np.isfinite(float(namespace["loss"]))
  assert "sparse" in namespace["state"].params  # DCIL's lifted layout
  assert type(namespace["trained"]).__name__ == "Net"  # NNX: the user's class comes back
