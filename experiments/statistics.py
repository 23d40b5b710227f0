"""Host-side statistics of a run's accuracy curve and of results over seeds (numpy; scipy for
the tests).

The paper's second claim is that DCIL trains *more stably* than DPF. Mask churn is recorded by
the library's mask transforms (``dcil_jax.refresh.RefreshRecord``); these functions measure the
rest from what a run logs:

- :func:`accuracy_variability`: how much test accuracy moves from one evaluation to the next
  over the last part of training (a stable run has converged; an unstable one keeps jumping).
- :func:`largest_drop`: the deepest one-evaluation dip over the whole run (after warm-up).
- :func:`seed_spread`: mean and sample standard deviation over seeds.
- :func:`compare` and :func:`paired`: DCIL against a baseline over seeds (Welch's and the
  paired t-test), for ``experiments.report`` and ``experiments.fast_report``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

# The report's rule: a difference is clear when it exceeds the larger seed sd and p < this.
P_THRESHOLD = 0.05


def accuracy_variability(
  accuracies: Sequence[float], last_fraction: float = 0.25
) -> dict[str, float]:
  """Variability of a test-accuracy curve over its last ``last_fraction`` of evaluations.

  Returns:
    ``step_std``: the standard deviation of the change from one evaluation to the next (the
    step-to-step variance's square root; 0 for a flat curve, large for a jumpy one whatever its
    trend); ``std``: the standard deviation of the accuracies themselves; ``min``: the lowest
    accuracy in the window (a dip); ``evals``: how many evaluations the window holds.
  """
  if not 0 < last_fraction <= 1:
    raise ValueError(f"last_fraction must be in (0, 1], got {last_fraction}.")
  acc = np.asarray(accuracies, dtype=np.float64)
  if acc.ndim != 1 or acc.size < 2:
    raise ValueError(f"Need a 1-D curve of at least 2 accuracies, got shape {acc.shape}.")
  window = acc[-max(2, round(last_fraction * acc.size)) :]
  return {
    "step_std": float(np.std(np.diff(window))),
    "std": float(np.std(window)),
    "min": float(window.min()),
    "evals": int(window.size),
  }


def largest_drop(accuracies: Sequence[float], skip_fraction: float = 0.1) -> float:
  """The largest fall of accuracy from one evaluation to the next (0 if it never falls),
  after the first ``skip_fraction`` of the evaluations (the first epochs' noise).

  Catches the dips of an unstable run during the sparsity ramp, which a window at the end of
  training (:func:`accuracy_variability`) misses once the run has settled.
  """
  acc = np.asarray(accuracies, dtype=np.float64)
  if acc.ndim != 1 or acc.size < 2:
    raise ValueError(f"Need a 1-D curve of at least 2 accuracies, got shape {acc.shape}.")
  if not 0 <= skip_fraction < 1:
    raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}.")
  tail = acc[min(round(skip_fraction * acc.size), acc.size - 2) :]
  return float(max(0.0, np.max(tail[:-1] - tail[1:])))


def seed_spread(values: Sequence[float]) -> dict[str, float]:
  """Mean and sample standard deviation (``ddof=1``; 0 for one value) over seeds."""
  v = np.asarray(values, dtype=np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"Need a 1-D, non-empty list of values, got shape {v.shape}.")
  return {
    "mean": float(v.mean()),
    "sd": float(v.std(ddof=1)) if v.size > 1 else 0.0,
    "n": int(v.size),
  }


def compare(dcil: Sequence[float], other: Sequence[float]) -> dict[str, Any]:
  """DCIL vs a baseline's final accuracies (fractions): difference of means (DCIL − baseline)
  in percentage points, the larger seed sd, the Welch t-test p-value (None with fewer than 2
  seeds a side) and the verdict ("DCIL higher", "DCIL lower" or "no clear difference")."""
  a, b = seed_spread(dcil), seed_spread(other)
  diff = 100 * (a["mean"] - b["mean"])
  larger_sd = 100 * max(a["sd"], b["sd"]) if min(a["n"], b["n"]) >= 2 else None
  p = None
  if a["n"] >= 2 and b["n"] >= 2:
    from scipy import stats

    with warnings.catch_warnings(), np.errstate(all="ignore"):
      warnings.simplefilter("ignore", RuntimeWarning)
      p = float(stats.ttest_ind(dcil, other, equal_var=False).pvalue)
    p = p if math.isfinite(p) else None
  if p is not None and larger_sd is not None and abs(diff) > larger_sd and p < P_THRESHOLD:
    verdict = "DCIL higher" if diff > 0 else "DCIL lower"
  elif larger_sd is None:
    verdict = "no clear difference (fewer than 2 seeds a side)"
  else:
    verdict = "no clear difference"
  return {"diff": diff, "larger_sd": larger_sd, "p": p, "verdict": verdict, "dcil": a, "other": b}


def paired(dcil: dict[int, float], other: dict[int, float]) -> dict[str, Any] | None:
  """Same-seed differences DCIL − baseline (fractions in, pp out): runs of one seed share the
  initialisation and the data order, so these cancel the seed's own luck. Mean, sd, how many
  seeds DCIL wins, and the paired t-test p (None with fewer than 2 shared seeds)."""
  seeds = sorted(set(dcil) & set(other))
  if len(seeds) < 2:
    return None
  from scipy import stats

  d = np.asarray([100 * (dcil[k] - other[k]) for k in seeds])
  with warnings.catch_warnings(), np.errstate(all="ignore"):
    warnings.simplefilter("ignore", RuntimeWarning)
    p = float(stats.ttest_rel([dcil[k] for k in seeds], [other[k] for k in seeds]).pvalue)
  return {
    "mean": float(d.mean()),
    "sd": float(d.std(ddof=1)),
    "wins": int((d > 0).sum()),
    "n": len(seeds),
    "p": p if math.isfinite(p) else None,
  }
