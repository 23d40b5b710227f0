"""experiments/instability.py: the stability edge it plots, and a short trace of a real run."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments import instability
from experiments.configs import mnist1d


@pytest.mark.parametrize("nesterov", [True, False])
def test_stability_edge_is_where_sgd_on_a_quadratic_starts_to_diverge(nesterov):
  lr, momentum = 0.2, 0.9
  edge = instability.stability_edge(lr, momentum, nesterov)

  def sizes(curvature):
    tx = optax.sgd(lr, momentum=momentum, nesterov=nesterov)
    x = jnp.ones([])
    state = tx.init(x)
    out = []
    for _ in range(1000):
      updates, state = tx.update(curvature * x, state)
      x = x + updates
      out.append(abs(float(x)))
    return np.array(out)

  assert sizes(0.95 * edge)[-1] < 1e-2  # converges below the edge
  assert not np.all(sizes(1.05 * edge) < 1e3)  # runs away above it (to inf or NaN)


# Minutes under load (it compiles the three-gradient diagnosis and the Hessian power iteration of
# the real CNN); the default run checks the DCIL loss options it reads (test_robust_dcil.py) and
# the stability edge it plots (above).
@pytest.mark.slow
def test_trace_records_each_step(tmp_path):
  config = mnist1d.get_config("local")
  config.kd_start_epoch = 0.1  # distillation from optimizer step 3 (31 steps per epoch)
  records = instability.trace(config, str(tmp_path), steps=5, sharpness_every=5)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  assert [r["kd_weight"] for r in records] == [0, 0, 0, 1, 1]  # record step t: optimizer step t-1
  assert all(r["finite"] for r in records)
  first = records[0]
  assert len(first["layers"]) == 3 and first["logit_gap"] == 0  # one mask of W_0: same paths
  assert records[-1]["sharpness_kd"] > records[-1]["sharpness_task"] > 0
  later = records[-1]
  assert later["task_grad_pruned"] > 0 and later["kl_grad_kept"] > 0
  assert np.isfinite(later["cos_kept"])
  read, saved = instability.read_trace(str(tmp_path))
  assert read == records and saved["method"] == "dcil"
