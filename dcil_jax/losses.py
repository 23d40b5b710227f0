"""DCIL, DPF and dense losses: pure functions of (params, masks, batch) for one training loop.

All three take ``(apply_fn, params, masks, batch, batch_stats)`` and return ``(loss, aux)``.
``apply_fn`` is a plain Flax ``model.apply`` whose ``__call__`` takes ``train: bool`` (as in
Flax's examples); ``batch`` is ``{"image": x, "label": y}`` with integer labels.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dcil_jax import masks as masks_lib
from dcil_jax import paths

ApplyFn = Any


def apply_train(apply_fn: ApplyFn, params: Any, batch_stats: Any, x: jax.Array, rngs=None):
  """``apply_fn`` in train mode; returns ``(logits, new_batch_stats)`` (``None`` without BN)."""
  variables = {"params": params}
  if batch_stats is None:
    return apply_fn(variables, x, train=True, rngs=rngs), None
  variables["batch_stats"] = batch_stats
  logits, updates = apply_fn(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
  return logits, updates["batch_stats"]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def distillation_kl(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """``T² · mean_batch KL(softmax(teacher/T) ‖ softmax(student/T))`` with the teacher detached.

  The official code adds 1e-7 to the teacher's probabilities; that shifts the loss by a constant
  and gradients by < 1e-6 relative, so we use the exact log-probabilities instead.
  """
  t = temperature
  log_q = jax.nn.log_softmax(jax.lax.stop_gradient(teacher) / t)
  log_p = jax.nn.log_softmax(student / t)
  return t**2 * jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1))


def path_weights(params: Any, masks: Any, path: int | jax.Array) -> Any:
  """Forward weights of one path (``path`` may be traced: 0 = sparse, 1 = dense).

  Prunable kernels become ``W⊙M`` on the sparse path and ``sg(W⊙M) + W⊙(1−M)`` on the dense
  path: the sparse path's gradient reaches only kept weights, the dense path's only pruned ones,
  which is the refined gradient ``M⊙g_sparse + (1−M)⊙g_dense`` with no custom VJP. Every other
  leaf (this path's own copy, or a leaf both paths share) is used as it is.
  """

  def leaf(m, p):
    if m is None:
      return p
    sparse = jnp.where(m, p, jnp.zeros_like(p))
    dense = jax.lax.stop_gradient(sparse) + jnp.where(m, jnp.zeros_like(p), p)
    return jnp.where(path == paths.SPARSE, sparse, dense)

  return jax.tree.map(leaf, masks, params, is_leaf=lambda x: x is None)


def dcil_loss(
  apply_fn: ApplyFn,
  params: Any,
  masks: Any,
  batch: dict[str, jax.Array],
  batch_stats: Any = None,
  *,
  kd_weight: float | jax.Array = 0.0,
  temperature: float = 2.0,
  strategy: str = "unrolled",
  mesh: Mesh | None = None,
  rngs: Any = None,
) -> tuple[jax.Array, dict[str, Any]]:
  """The DCIL loss: ``CE_s + CE_d + kd_weight · (KL_T(z_s‖sg z_d) + KL_T(z_d‖sg z_s))``.

  One pure function whose two paths are a mapped axis (see :func:`dcil_jax.paths.map_paths`).

  Args:
    apply_fn: the plain model's ``apply``.
    params: dual-path params (:func:`dcil_jax.to_dual_path`).
    masks: masks tree for ``params``.
    batch: ``{"image": x, "label": y}``.
    batch_stats: dual-path BN statistics, or ``None`` for a model without BatchNorm.
    kd_weight: weight of the mutual distillation terms (official: 0 before epoch 70, then 1).
    temperature: distillation temperature ``T`` (official: 2).
    strategy: ``"unrolled"``, ``"vmap"`` or ``"sharded"`` — same values and gradients.
    mesh: mesh with a ``path`` axis, for ``strategy="sharded"``.
    rngs: Flax rngs passed to ``apply_fn`` (e.g. for dropout).

  Returns:
    ``(loss, aux)``; ``aux`` has ``logits`` [2, B, C], ``ce``, ``kl``, ``accuracy`` (each [2]:
    sparse, dense; ``kl[0]`` pulls the sparse path towards the dense one) and the new
    ``batch_stats`` (dual-path).
  """
  masks_lib.check_masks(masks, params)
  x, y = batch["image"], batch["label"]
  own, shared = paths.split_per_path(params)
  stats = paths.unbox(batch_stats)  # None (no BatchNorm) is an empty pytree: mapped like any other

  # Each path builds its own forward weights from the shared kernels and masks, so on a `path`
  # mesh axis every device computes only its path's weights, with no resharding.
  def forward(path, own, s, shared, masks, x):
    weights = path_weights(paths.merge_per_path(own, shared), masks, path)
    return apply_train(apply_fn, weights, s, x, rngs)

  logits, new_stats = paths.map_paths(
    forward,
    (jnp.arange(paths.NUM_PATHS), own, stats),
    (shared, masks, x),
    strategy=strategy,
    mesh=mesh,
  )
  z_s, z_d = logits[paths.SPARSE], logits[paths.DENSE]
  ce = jnp.stack([cross_entropy(z_s, y), cross_entropy(z_d, y)])
  kl = jnp.stack([distillation_kl(z_s, z_d, temperature), distillation_kl(z_d, z_s, temperature)])
  loss = jnp.sum(ce) + kd_weight * jnp.sum(kl)
  aux = {
    "logits": logits,
    "ce": ce,
    "kl": kl,
    "accuracy": jnp.stack([accuracy(z_s, y), accuracy(z_d, y)]),
    "batch_stats": None if new_stats is None else paths.box(new_stats),
  }
  return loss, aux


def _single_path_loss(apply_fn, weights, batch, batch_stats, rngs):
  logits, new_stats = apply_train(apply_fn, weights, batch_stats, batch["image"], rngs)
  ce = cross_entropy(logits, batch["label"])
  aux = {
    "logits": logits,
    "ce": ce,
    "accuracy": accuracy(logits, batch["label"]),
    "batch_stats": new_stats,
  }
  return ce, aux


def dpf_loss(apply_fn, params, masks, batch, batch_stats=None, *, rngs=None):
  """DPF (Lin et al. 2020): one pruned path with the straight-through estimator.

  Forward weights ``W + sg(W⊙M − W)`` equal ``W⊙M`` in value, while the pruned model's gradient
  is applied to every entry of ``W``, pruned ones included (the "coarse" gradient DCIL refines).
  Same signature and ``aux`` keys as :func:`dcil_loss`, without the path axis.
  """
  weights = masks_lib.map_masked(
    lambda p, m: p + jax.lax.stop_gradient(jnp.where(m, p, jnp.zeros_like(p)) - p), params, masks
  )
  return _single_path_loss(apply_fn, weights, batch, batch_stats, rngs)


def dense_loss(apply_fn, params, masks, batch, batch_stats=None, *, rngs=None):
  """Plain cross-entropy of the unpruned model (``masks`` is ignored; may be ``None``)."""
  del masks
  return _single_path_loss(apply_fn, params, batch, batch_stats, rngs)
