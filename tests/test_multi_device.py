"""Runs ``tests/multi_device`` in a subprocess with 8 fake CPU devices.

The device count is fixed when JAX starts, so these tests cannot share the main process.
"""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).parent


def test_eight_fake_devices():
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=8",
    JAX_PLATFORMS="cpu",
    DCIL_MULTI_DEVICE="1",
  )
  result = subprocess.run(
    [
      sys.executable,
      "-m",
      "pytest",
      "-q",
      "-n",
      "0",
      "-p",
      "no:cacheprovider",
      str(TESTS / "multi_device"),
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
    cwd=TESTS.parent,
  )
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-3000:]
