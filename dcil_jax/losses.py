"""DCIL, DPF and dense losses: pure functions of (model, params, masks, batch, model state).

``model`` is anything :func:`dcil_jax.as_model` takes (a Linen module, its ``apply``, or a
:class:`dcil_jax.FlaxModel`). ``batch`` is a dict with the model input under ``"image"`` and the
targets under ``"label"``: integer class indices ``[B]`` or target distributions ``[B, C]``
(one-hot, label smoothing, mixup), plus anything a custom ``task_loss`` reads. DCIL and DPF take
lifted params and masks (:func:`dcil_jax.lift`); dense takes the plain ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from dcil_jax import masks as masks_lib
from dcil_jax import paths, pool_gradient
from dcil_jax.model import as_model

__all__ = [
  "DEFAULT_KD_WEIGHT",
  "DEFAULT_TEMPERATURE",
  "TaskLoss",
  "accuracy",
  "batch_cross_entropy",
  "check_targets",
  "cross_entropy",
  "dcil_kernels",
  "dcil_loss",
  "dense_loss",
  "distillation_kl",
  "distillation_term",
  "dpf_kernels",
  "dpf_loss",
  "labels_in_range",
]

TaskLoss = Callable[[jax.Array, dict[str, Any]], jax.Array]

# The DCIL defaults, shared by :func:`dcil_loss` and :class:`dcil_jax.DCIL` (one owner): the
# official distillation weight once distillation is on, and its temperature.
DEFAULT_KD_WEIGHT = 1.0
DEFAULT_TEMPERATURE = 2.0


def promoted(x: jax.Array) -> jax.Array:
  """``x`` in at least float32: low-precision logits (bf16, f16) are promoted for the loss, and
  float64 stays float64 (a float64 model's loss and gradients are computed in float64)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_targets(logits: jax.Array, labels: jax.Array) -> None:
  """Raises unless ``labels`` are class indices ``[B]`` (integer) or target distributions
  ``[B, C]`` (float) that fit ``logits`` ``[B, C]``; the error names what to change. Checked at
  trace time (shapes and dtypes only): a wrong layout would otherwise broadcast silently."""
  lshape, zshape = jnp.shape(labels), jnp.shape(logits)
  integer = jnp.issubdtype(jnp.result_type(labels), jnp.integer)
  if jnp.ndim(labels) == jnp.ndim(logits) - 1:
    if not integer:
      raise TypeError(
        f"Labels {lshape} must be integer class indices, got dtype {jnp.result_type(labels)} "
        f"(target distributions are [B, C] = {zshape})."
      )
    if lshape != zshape[:-1]:
      raise ValueError(f"Labels {lshape} do not match logits {zshape}: expected {zshape[:-1]}.")
    return
  if jnp.ndim(labels) == jnp.ndim(logits) and integer:
    raise TypeError(
      f"Integer labels of shape {lshape} for logits {zshape}: class indices are [B] (e.g. "
      "labels[:, 0] or labels.squeeze(-1) for a [B, 1] column); target distributions [B, C] "
      "are float."
    )
  if lshape != zshape:
    raise ValueError(
      f"Target distributions {lshape} do not match logits {zshape}: they need one probability "
      f"per class ({zshape[-1]} classes)."
    )


def labels_in_range(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Whether every class index lies in ``[0, C)`` (always true for target distributions).

  An index outside cannot raise inside ``jit``: ``-1`` would gather the last class, ``C`` a
  NaN. ``train_step`` skips such a step and reports ``labels_in_range`` (see
  :func:`dcil_jax.train_step`)."""
  if jnp.ndim(labels) == jnp.ndim(logits):
    return jnp.bool_(True)
  return jnp.all((labels >= 0) & (labels < jnp.shape(logits)[-1]))


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Mean softmax cross-entropy against class indices ``[B]`` or distributions ``[B, C]``."""
  check_targets(logits, labels)
  logits = promoted(logits)
  if jnp.ndim(labels) == jnp.ndim(logits):
    return optax.softmax_cross_entropy(logits, labels).mean()
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def batch_cross_entropy(logits: jax.Array, batch: dict[str, Any]) -> jax.Array:
  """The default task loss: :func:`cross_entropy` against ``batch["label"]``."""
  return cross_entropy(logits, batch["label"])


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Top-1 accuracy; for target distributions, against their most likely class."""
  if jnp.ndim(labels) == jnp.ndim(logits):
    labels = jnp.argmax(labels, -1)
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def distillation_kl(student: jax.Array, teacher: jax.Array, temperature: float) -> jax.Array:
  """``T² · mean_batch KL(softmax(teacher/T) ‖ softmax(student/T))`` with the teacher detached.

  The official code adds 1e-7 to the teacher's probabilities; that shifts the loss by a constant
  and gradients by < 1e-6 relative, so we use the exact log-probabilities instead.
  """
  t = temperature
  log_q = jax.nn.log_softmax(promoted(jax.lax.stop_gradient(teacher)) / t)
  log_p = jax.nn.log_softmax(promoted(student) / t)
  return t**2 * jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - log_p), axis=-1))


def distillation_term(
  kl: jax.Array, task: jax.Array, kd_weight: float | jax.Array, kd_clip: float | None = None
) -> jax.Array:
  """One path's distillation term ``kd_weight · KL``, optionally capped relative to its task loss.

  With ``kd_clip=None`` (the official code) this is ``kd_weight · kl``. With a number ``c`` the
  term is multiplied by the constant (stop-gradient) factor ``min(1, c · task / (kd_weight ·
  kl))``: its value never exceeds ``c`` times the path's own task loss, and its gradient is the
  KL gradient scaled down by the same factor. Why: without BatchNorm, at a high learning rate
  the two paths' logits can be far apart when distillation switches on, and the KL gradient
  then dwarfs the task gradient; capping it relative to the task loss keeps distillation a
  correction of the task objective rather than a replacement (see docs/method.md, "When DCIL
  is unstable"). Below the cap the term is exactly the official one.

  Args:
    kl: the path's ``KL_T`` (:func:`distillation_kl`), differentiable.
    task: the path's task loss (only its value is used).
    kd_weight: the distillation weight (a number, or traced).
    kd_clip: the cap as a multiple of ``task``, or ``None`` for no cap.

  Returns:
    The scalar term to add to the path's task loss.
  """
  if kd_clip is None:
    return kd_weight * kl
  return _kd_scale(kl, task, kd_weight, kd_clip) * kd_weight * kl


def _kd_scale(kl, task, kd_weight, kd_clip: float) -> jax.Array:
  """The constant factor of :func:`distillation_term` (1 below the cap)."""
  kl, task = jax.lax.stop_gradient(kl), jax.lax.stop_gradient(task).astype(jnp.float32)
  size = jax.lax.stop_gradient(kd_weight) * kl
  cap = kd_clip * jnp.maximum(task, 0.0)
  return jnp.where(size > cap, cap / jnp.where(size > cap, size, 1.0), 1.0)


def _kd_gradient(aux: dict[str, Any], kd_weight, kd_clip: float | None) -> jax.Array:
  """``d loss / d kd_weight``: the KL sum, each path's KL scaled by its cap factor."""
  if kd_clip is None:
    return jnp.sum(aux["kl"])
  return jnp.sum(_kd_scale(aux["kl"], aux["ce"], kd_weight, kd_clip) * aux["kl"])


def path_rngs(rngs: Any, path: int | jax.Array) -> Any:
  """Each path's own keys (e.g. dropout), as two PyTorch forwards draw independent masks."""
  if rngs is None:
    return None
  return {name: jax.random.fold_in(key, path) for name, key in rngs.items()}


def dcil_kernels(kernels: Any, masks: Any, path: int | jax.Array) -> Any:
  """Forward kernels of one path (``path`` may be traced: 0 = sparse, 1 = dense).

  ``W⊙M`` on the sparse path and ``sg(W⊙M) + W⊙(1−M)`` on the dense path: the sparse path's
  gradient reaches only kept weights, the dense path's only pruned ones, which is the refined
  gradient ``M⊙g_sparse + (1−M)⊙g_dense`` with no custom VJP.

  The dense kernel is ``W`` itself in value, so it is written ``where(M, sg(W), W)``: one
  select instead of two and an add, and only the gradient is masked.
  """

  def leaf(w, m):
    sparse = jnp.where(m, w, jnp.zeros_like(w))
    dense = jnp.where(m, jax.lax.stop_gradient(w), w)
    if isinstance(path, int):
      return sparse if path == paths.SPARSE else dense
    return jnp.where(path == paths.SPARSE, sparse, dense)

  return jax.tree.map(leaf, kernels, masks)


def dpf_kernels(kernels: Any, masks: Any) -> Any:
  """DPF's forward kernels ``W + sg(W⊙M − W)``: ``W⊙M`` in value, and the pruned model's
  gradient reaches every entry of ``W``, pruned ones included (the straight-through estimator)."""
  return jax.tree.map(
    lambda w, m: w + jax.lax.stop_gradient(jnp.where(m, w, jnp.zeros_like(w)) - w), kernels, masks
  )


def _variables(params: Any, model_state: Any) -> dict:
  return {"params": params, **(model_state or {})}


def _check_lifted(params: Any, masks: Any, name: str) -> Any:
  if not paths.is_lifted(params):
    raise ValueError(
      f"{name} takes lifted params ({{'prunable': ..., 'sparse': ..., ...}}, see dcil_jax.lift); "
      "got a plain params tree."
    )
  masks_lib.check_masks(masks, params)
  return masks[paths.PRUNABLE]


def dcil_loss(
  model: Any,
  params: Any,
  masks: Any,
  batch: dict[str, Any],
  model_state: Any = None,
  *,
  kd_weight: float | jax.Array = DEFAULT_KD_WEIGHT,
  temperature: float = DEFAULT_TEMPERATURE,
  kd_clip: float | None = None,
  strategy: str | None = None,
  mesh: Mesh | None = None,
  rngs: Any = None,
  task_loss: TaskLoss = batch_cross_entropy,
) -> tuple[jax.Array, dict[str, Any]]:
  """The DCIL loss: ``L_s + L_d + kd_weight · (KL_T(z_s‖sg z_d) + KL_T(z_d‖sg z_s))``.

  One pure function whose two paths are a mapped axis (see :func:`dcil_jax.paths.map_paths`).

  Args:
    model: the plain model (see :func:`dcil_jax.as_model`).
    params: lifted params with ``"sparse"`` and ``"dense"`` parts (:func:`dcil_jax.lift`).
    masks: masks tree for ``params``.
    batch: ``{"image": x, "label": y, ...}``.
    model_state: lifted model state ``{"sparse": collections, "dense": collections}`` (BatchNorm
      statistics, ...), or ``None`` for a model without mutable collections.
    kd_weight: weight of the mutual distillation terms (official: 0 before epoch 70, then 1;
      the default is :class:`dcil_jax.DCIL`'s, distillation on).
    temperature: distillation temperature ``T`` (official: 2).
    kd_clip: cap each path's distillation term at ``kd_clip`` times its task loss
      (:func:`distillation_term`); ``None`` (official): no cap.
    strategy: ``None`` (default: :func:`dcil_jax.default_strategy`, as :class:`dcil_jax.DCIL`
      picks), ``"unrolled"``, ``"vmap"``, ``"sharded"`` or ``"sequential"`` — same values,
      gradients and model state. ``"sequential"`` runs the sparse path's forward and backward,
      then the dense path's, so only one path's activations are alive (close to the memory of
      dense training, how close depends on the model: docs/library.md; one extra forward of
      the dense path when ``kd_weight`` is not 0); it is
      reverse-mode only, and differentiates ``params`` and ``kd_weight`` only (see
      ``_sequential_dcil_loss``).
    mesh: mesh with a ``path`` axis, for ``strategy="sharded"``.
    rngs: Flax rngs (e.g. ``{"dropout": key}``); each path folds in its index.
    task_loss: ``(logits, batch) -> scalar`` of each path (default: cross-entropy).

  Returns:
    ``(loss, aux)``; ``aux`` has ``logits`` (sparse, dense), ``ce`` (each path's task loss),
    ``kl``, ``accuracy`` (each [2]: sparse, dense; ``kl[0]`` pulls the sparse path towards the
    dense one) and the new lifted ``model_state``.
  """
  model = as_model(model)
  kernel_masks = _check_lifted(params, masks, "dcil_loss")
  strategy = strategy or paths.default_strategy()
  if strategy in paths.SEQUENTIAL:
    loop = paths.sequential_loop(strategy)
    return _sequential_dcil_loss(
      model,
      params,
      masks,
      batch,
      model_state,
      kd_weight,
      temperature,
      kd_clip,
      rngs,
      task_loss,
      loop,
    )
  names = paths.PATH_NAMES
  own = [params.get(name, {}) for name in names]
  states = [None if model_state is None else model_state[name] for name in names]

  # Each path builds its own forward weights from the shared kernels and masks, so on a `path`
  # mesh axis every device computes only its path's weights, with no resharding.
  def forward(i, own, state, shared, x, rngs):
    kernels = dcil_kernels(shared[paths.PRUNABLE], kernel_masks, i)
    weights = paths.merge(kernels, shared.get(paths.SHARED), own)
    return model.apply_train(_variables(weights, state), x, path_rngs(rngs, i))

  shared = {k: v for k, v in params.items() if k in (paths.PRUNABLE, paths.SHARED)}
  (z_s, state_s), (z_d, state_d) = paths.map_paths(
    forward,
    [(own[0], states[0]), (own[1], states[1])],
    (shared, batch["image"], rngs),
    strategy=strategy,
    mesh=mesh,
  )
  return _dcil_outputs(
    z_s, z_d, state_s, state_d, model_state, batch, kd_weight, temperature, kd_clip, task_loss
  )


def _dcil_outputs(
  z_s, z_d, state_s, state_d, model_state, batch, kd_weight, temperature, kd_clip, task_loss
):
  """``(loss, aux)`` of :func:`dcil_loss` from both paths' logits and new model states."""
  task = jnp.stack([task_loss(z_s, batch), task_loss(z_d, batch)])
  kl = jnp.stack([distillation_kl(z_s, z_d, temperature), distillation_kl(z_d, z_s, temperature)])
  if kd_clip is None:  # the official loss, written as it always was
    loss = jnp.sum(task) + kd_weight * jnp.sum(kl)
  else:
    terms = [distillation_term(kl[i], task[i], kd_weight, kd_clip) for i in range(2)]
    loss = jnp.sum(task) + terms[0] + terms[1]
  aux = {
    "logits": (z_s, z_d),
    "ce": task,
    "kl": kl,
    "accuracy": jnp.stack([accuracy(z_s, batch["label"]), accuracy(z_d, batch["label"])]),
    "model_state": None if model_state is None else dict(zip(paths.PATH_NAMES, (state_s, state_d))),
  }
  return loss, aux


def kd_dtype(weight: float | jax.Array) -> Any:
  """The distillation weight's dtype: its own if it is a float array, else the default float
  (float64 under ``jax_enable_x64``): never a demotion of a float64 loss."""
  dtype = jnp.result_type(weight)
  return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


def _static_weight(weight: float | jax.Array) -> float | None:
  """``weight`` as a Python float when it is known at trace time, else ``None`` (traced)."""
  try:
    return float(weight)
  except TypeError:  # a tracer (ConcretizationTypeError and friends are TypeErrors)
    return None


def _after(tree: Any, done: Any) -> tuple[Any, Any]:
  """``(tree, done)`` with the same values, where every array of ``tree`` can only be computed
  once every array of ``done`` is: the next stage's inputs wait for the previous stage.

  An ``optimization_barrier`` keeps XLA from merging or overlapping the stages where barriers
  survive until scheduling, but XLA:CPU expands (erases) them before it schedules, so each leaf
  also gets a data dependency on ``done``: ``+ 0·max|done|``. XLA does not fold ``0·x`` for
  floats (it is NaN for an infinite or NaN ``x``), so the dependency stays; the values are
  unchanged unless ``done`` is not finite, and then the step is not finite anyway.
  """
  tree, done = jax.lax.optimization_barrier((tree, done))
  scales = [
    jnp.max(jnp.abs(x)).astype(jnp.float32)
    for x in jax.tree.leaves(done)
    if jnp.issubdtype(x.dtype, jnp.inexact) and x.size
  ]
  if not scales:
    return tree, done
  zero = 0.0 * jnp.max(jnp.stack(scales))

  def tie(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = tie(jax.random.key_data(x))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if x.dtype == jnp.bool_:
      return x | zero.astype(jnp.bool_)
    return x + zero.astype(x.dtype)

  return jax.tree.map(tie, tree), done


def _sequential_dcil_loss(
  model, params, masks, batch, model_state, kd_weight, temperature, kd_clip, rngs, task_loss, loop
):
  """:func:`dcil_loss` with ``strategy="sequential"``: one path's activations alive at a time.

  The loss splits per path once each path sees the other's logits as a constant (the KL target
  is detached anyway): ``L = [CE(z_s) + w·KL(z_s‖sg z_d)] + [CE(z_d) + w·KL(z_d‖sg z_s)]``, and
  the sparse bracket's gradient reaches only ``W⊙M`` and BN_s/FC_s, the dense one's only
  ``W⊙(1−M)`` and BN_d/FC_d. So a ``jax.custom_vjp`` computes the parameter gradients in its
  forward: (1) with distillation, a forward-only pass of the dense path gives the teacher
  ``z_d``; (2) the sparse path's forward and backward (teacher ``z_d``) give ``z_s`` and its
  gradient; (3) the dense path's forward and backward (teacher ``z_s``). The gradients are the
  residuals; the backward returns ``cotangent · grads``. Steps (2) and (3) run in one of two
  forms (:func:`dcil_jax.paths.sequential_loop`): ``loop`` (accelerators) — the two
  iterations of a ``lax.scan`` over the path axis (the path index is traced, as under
  ``vmap``), with the gradient sum and the next teacher in the carry: a loop body is a
  computation of its own, so XLA can neither overlap the paths nor allocate step (3)'s buffers
  while step (2)'s activations are alive; or unrolled (CPU, whose loop bodies run convolutions
  slowly) — one computation in which each stage's inputs depend on the previous stage's
  outputs (:func:`_after`), so XLA can neither overlap the stages nor merge the teacher
  forward with step (3)'s forward; on CPU each stage differentiates the model through
  :func:`dcil_jax.pool_gradient.late_pool_indices`, so no max-pool gradient's index arrays are
  created before their stage (XLA:CPU's scheduler puts operand-free arrays at the step's start).

  Whether step (1) runs is decided statically when ``kd_weight`` is a concrete number (0: skip
  it, so the step costs what unrolled costs) and under ``lax.cond(kd_weight != 0)`` when it is
  traced: ``DCIL.kd_weight_at(step)`` turns distillation on at ``kd_start_step`` inside one
  compiled ``train_step``, and a static flag would need a second compile and a second method
  object. Each path draws its own dropout keys (:func:`path_rngs`), the same in the teacher
  forward as in step (3), so the teacher logits equal the dense path's logits.

  Differentiable with reverse mode only (no ``jax.jvp``), and only with respect to ``params``
  and ``kd_weight``: the batch, model state, masks and ``aux`` get no gradient.
  """
  names = paths.PATH_NAMES
  static_kd = _static_weight(kd_weight)
  kd_weight = jnp.asarray(kd_weight, kd_dtype(kd_weight))
  states = None if model_state is None else tuple(model_state[name] for name in names)

  def forward(i, params, masks, batch, states, rngs):
    kernels = dcil_kernels(params[paths.PRUNABLE], masks[paths.PRUNABLE], i)
    weights = paths.path_params(params, names[i], kernels)
    state = None if states is None else states[i]
    return model.apply_train(_variables(weights, state), batch["image"], path_rngs(rngs, i))

  def outputs(z_s, z_d, new_states, kd, batch):
    return _dcil_outputs(
      z_s, z_d, *new_states, model_state, batch, kd, temperature, kd_clip, task_loss
    )

  def primal(params, kd, masks, batch, states, rngs):
    (z_s, state_s), (z_d, state_d) = paths.map_paths(
      lambda i, *args: forward(i, *args),
      [(), ()],
      (params, masks, batch, states, rngs),
      strategy="sequential",
    )
    return outputs(z_s, z_d, (state_s, state_d), kd, batch)

  def path_objective(i, params, teacher, kd, masks, batch, states, rngs):
    z, new_state = forward(i, params, masks, batch, states, rngs)
    objective = task_loss(z, batch)
    if teacher is not None:
      kl = distillation_kl(z, teacher, temperature)
      objective = objective + distillation_term(kl, objective, kd, kd_clip)
    return objective, (z, new_state)

  def grad_fn(i, params, teacher, kd, *args):
    """One path's parameter gradient and ``(logits, model state)``."""
    objective = lambda p: path_objective(i, p, teacher, kd, *args)  # noqa: E731
    if jax.default_backend() == "cpu":  # see dcil_jax.pool_gradient
      objective = pool_gradient.late_pool_indices(objective)
    return jax.grad(objective, has_aux=True)(params)

  def unrolled_stages(params, kd, masks, batch, states, rngs, z_teacher):
    """Steps (2) and (3) in one computation, ordered by data dependencies (:func:`_after`)."""
    args = (masks, batch, states, rngs)
    params_s = params
    if z_teacher is not None:
      (params_s, args), z_teacher = _after((params, args), z_teacher)
    g_s, (z_s, state_s) = grad_fn(paths.SPARSE, params_s, z_teacher, kd, *args)
    # The dense path's inputs exist only once the sparse gradient does.
    (params_d, args), (z_s, g_s) = _after((params, args), (z_s, g_s))
    teacher_s = None if z_teacher is None else z_s
    g_d, (z_d, state_d) = grad_fn(paths.DENSE, params_d, teacher_s, kd, *args)
    grads = jax.tree.map(jnp.add, g_s, g_d)
    loss, aux = outputs(z_s, z_d, (state_s, state_d), kd, batch)
    return (loss, aux), (grads, _kd_gradient(aux, kd, kd_clip))

  def fwd(params, kd, masks, batch, states, rngs):
    z_teacher = None
    if static_kd != 0.0:
      args = (masks, batch, states, rngs)
      teacher = lambda *a: forward(paths.DENSE, *a)[0]  # noqa: E731
      if static_kd is None:
        shape = jax.eval_shape(teacher, params, *args)
        z_teacher = jax.lax.cond(
          kd != 0, teacher, lambda *a: jnp.zeros(shape.shape, shape.dtype), params, *args
        )
      else:
        z_teacher = teacher(params, *args)
    if not loop:
      return unrolled_stages(params, kd, masks, batch, states, rngs, z_teacher)
    kernel_masks = masks[paths.PRUNABLE]

    def stage(carry, per_path):
      """One path's forward and backward: the body of a loop over the path axis."""
      g_kernels, g_shared, teacher = carry
      i, own, state, path_keys = per_path

      def objective(kernels, shared, own):
        weights = paths.merge(dcil_kernels(kernels, kernel_masks, i), shared, own)
        z, new_state = model.apply_train(_variables(weights, state), batch["image"], path_keys)
        value = task_loss(z, batch)
        if teacher is not None:
          kl = distillation_kl(z, teacher, temperature)
          value = value + distillation_term(kl, value, kd, kd_clip)
        return value, (z, new_state)

      grads, (z, new_state) = jax.grad(objective, argnums=(0, 1, 2), has_aux=True)(
        params[paths.PRUNABLE], params.get(paths.SHARED), own
      )
      g_kernels, g_shared = jax.tree.map(jnp.add, (g_kernels, g_shared), grads[:2])
      # The next path's distillation target is this path's logits (sparse, then dense).
      return (g_kernels, g_shared, None if teacher is None else z), (grads[2], z, new_state)

    # The paths run as the two iterations of a loop: a loop body is its own computation, so
    # XLA can neither overlap the paths nor allocate the dense path's buffers while the sparse
    # path's activations are alive. (With the paths unrolled into one computation and ordered
    # by data dependencies alone, XLA:CPU still created the dense path's operand-free buffers,
    # e.g. the index arrays of a max-pool's gradient, at the start of the step: 4 activations
    # of ResNet-50's stem at the sparse path's peak. The unrolled form now builds those from the
    # incoming gradient instead, see dcil_jax.pool_gradient.)
    zeros = jax.tree.map(jnp.zeros_like, (params[paths.PRUNABLE], params.get(paths.SHARED)))
    per_path = (
      jnp.arange(paths.NUM_PATHS),
      paths.stack_paths(*(params.get(name, {}) for name in names)),
      None if states is None else paths.stack_paths(*states),
      None
      if rngs is None
      else paths.stack_paths(*(path_rngs(rngs, i) for i in range(paths.NUM_PATHS))),
    )
    (g_kernels, g_shared, _), (g_own, z, new_states) = jax.lax.scan(
      stage, (*zeros, z_teacher), per_path
    )
    grads = {paths.PRUNABLE: g_kernels}
    if paths.SHARED in params:
      grads[paths.SHARED] = g_shared
    for j, name in enumerate(names):
      if name in params:
        grads[name] = jax.tree.map(lambda x, j=j: x[j], g_own)
    z_s, z_d = z[0], z[1]
    state_s, state_d = (
      (None, None)
      if new_states is None
      else (jax.tree.map(lambda x, j=j: x[j], new_states) for j in range(paths.NUM_PATHS))
    )
    loss, aux = outputs(z_s, z_d, (state_s, state_d), kd, batch)
    return (loss, aux), (grads, _kd_gradient(aux, kd, kd_clip))

  def bwd(residuals, cotangents):
    grads, kl_sum = residuals
    ct = cotangents[0]  # aux gets no gradient
    scaled = jax.tree.map(lambda g: (ct * g).astype(g.dtype), grads)
    return scaled, ct * kl_sum, None, None, None, None

  loss_fn = jax.custom_vjp(primal)
  loss_fn.defvjp(fwd, bwd)
  return loss_fn(params, kd_weight, masks, batch, states, rngs)


def _single_path_loss(model, weights, batch, model_state, rngs, task_loss):
  logits, new_state = model.apply_train(_variables(weights, model_state), batch["image"], rngs)
  loss = task_loss(logits, batch)
  aux = {
    "logits": logits,
    "ce": loss,
    "accuracy": accuracy(logits, batch["label"]),
    "model_state": new_state,
  }
  return loss, aux


def dpf_loss(
  model: Any,
  params: Any,
  masks: Any,
  batch: dict[str, Any],
  model_state: Any = None,
  *,
  rngs: Any = None,
  task_loss: TaskLoss = batch_cross_entropy,
) -> tuple[jax.Array, dict[str, Any]]:
  """DPF (Lin et al. 2020): one pruned path with the straight-through estimator.

  Takes lifted params with a ``"sparse"`` part (``dcil_jax.lift(..., "dpf")``) and the
  lifted model state ``{"sparse": ...}``; ``aux`` as :func:`dcil_loss`, without the path axis.
  """
  model = as_model(model)
  kernel_masks = _check_lifted(params, masks, "dpf_loss")
  weights = paths.path_params(params, "sparse", dpf_kernels(params[paths.PRUNABLE], kernel_masks))
  state = None if model_state is None else model_state["sparse"]
  loss, aux = _single_path_loss(model, weights, batch, state, rngs, task_loss)
  aux["model_state"] = None if model_state is None else {"sparse": aux["model_state"]}
  return loss, aux


def dense_loss(
  model: Any,
  params: Any,
  masks: Any,
  batch: dict[str, Any],
  model_state: Any = None,
  *,
  rngs: Any = None,
  task_loss: TaskLoss = batch_cross_entropy,
) -> tuple[jax.Array, dict[str, Any]]:
  """The task loss of the plain, unpruned model (``masks`` is ignored; may be ``None``)."""
  del masks
  return _single_path_loss(as_model(model), params, batch, model_state, rngs, task_loss)
