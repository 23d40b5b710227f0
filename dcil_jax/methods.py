"""The training methods as objects: each says how to lay out a plain model (``layout``), its
loss, its metrics and which paths it exports. ``TrainState`` holds one and never branches on a
method name.

All three are frozen dataclasses, so a state that holds one stays a valid ``jit`` argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from dcil_jax import losses, paths
from dcil_jax.refresh import Refresh
from dcil_jax.rigl import RigLRefresh
from dcil_jax.transform import MaskRefresh

KdWeight = float | Callable[[jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class Dense:
  """Dense training of the plain model: no masks, plain params.

  Attributes:
    task_loss: ``(logits, batch) -> scalar`` (default: cross-entropy on ``batch["label"]``).
  """

  task_loss: losses.TaskLoss = losses.batch_cross_entropy
  name = "dense"
  path_names = ()  # the DCIL paths it trains (none: it trains the plain model)
  uses_masks = False
  mask_transform = "no mask transform"  # how to build the optimizer's masks, for errors

  def fits(self, refresh: Refresh) -> bool:
    """Whether the optimizer's mask transform (its :class:`dcil_jax.refresh.Refresh`) makes
    the masks this method trains with."""
    del refresh
    return False

  def layout(self, params: Any, model_state: Any, prunable: Any) -> tuple[Any, Any]:
    del prunable
    return jax.tree.map(jnp.array, params), jax.tree.map(jnp.array, model_state or None)

  def loss(self, model, params, masks, model_state, batch, rngs, step, mesh=None):
    del step, mesh
    return losses.dense_loss(
      model, params, masks, batch, model_state, rngs=rngs, task_loss=self.task_loss
    )

  def metrics(self, aux: dict[str, Any]) -> dict[str, jax.Array]:
    return {"ce_sparse": aux["ce"], "accuracy_sparse": aux["accuracy"]}


@dataclasses.dataclass(frozen=True)
class DPF(Dense):
  """DPF (Lin et al. 2020): one pruned path, straight-through estimator for pruned weights."""

  name = "dpf"
  path_names = ("sparse",)
  uses_masks = True
  mask_transform = "dcil_jax.masked_update(schedule, ...)"

  def fits(self, refresh: Refresh) -> bool:
    return isinstance(refresh, MaskRefresh) and refresh.regrow

  def layout(self, params: Any, model_state: Any, prunable: Any) -> tuple[Any, Any]:
    names = ("sparse",)
    return (
      paths.split_params(params, prunable, path_names=names),
      paths.split_collections(model_state, names),
    )

  def loss(self, model, params, masks, model_state, batch, rngs, step, mesh=None):
    del step, mesh
    return losses.dpf_loss(
      model, params, masks, batch, model_state, rngs=rngs, task_loss=self.task_loss
    )


@dataclasses.dataclass(frozen=True)
class DCIL(Dense):
  """DCIL: a sparse and a dense path over shared prunable kernels, with mutual distillation.

  Two settings have names (:attr:`PRESETS`):

  - ``DCIL.official(**fields)``: exactly the official code (a step of the distillation weight
    at ``kd_start_step``, no cap on the distillation term); its loss and gradients are the
    official routing (tests/test_losses.py, tests/test_sequential.py).
  - ``DCIL.robust(**fields)``: the setting that keeps DCIL from blowing up where the official
    code does (no BatchNorm, high learning rate). It has two halves: the method options of
    :attr:`ROBUST_OPTIONS`, and an optimizer half that a method object cannot hold: chain
    ``dcil_jax.clip_step_norm(DCIL.ROBUST_MAX_STEP_NORM, learning_rate)`` before your
    optimizer, with the optimizer's learning rate (the experiments do this for
    ``--config.dcil_preset=robust``). The measurements that chose it are in docs/method.md,
    "When DCIL is unstable": switching distillation on multiplies the loss's sharpness at a
    point where a high learning rate already trains at the edge of stability; bounding the
    step prevented every blow-up measured, while the method-side options alone did not (so
    :attr:`ROBUST_OPTIONS` is empty today, and the robust method object equals the official
    one: its loss is the official loss).

  ``DCIL(...)`` with no option set is the official method object; whether a run is robust is
  decided by the optimizer (the step bound). ``DCIL.preset(name, **fields)`` picks one by name
  (the experiments' ``--config.dcil_preset=robust|official``, robust by default, which also
  chains the step bound). Any field can be overridden in both, e.g.
  ``DCIL.robust(kd_start_step=217, strategy="unrolled")``.

  Attributes:
    kd_weight: weight of the distillation terms, a number or a schedule ``optimizer step ->
      weight`` (official: 0 before epoch 70, then 1; see ``kd_start_step``).
    kd_start_step: first optimizer step with distillation (``kd_weight`` applies from there).
    temperature: distillation temperature ``T`` (official: 2).
    strategy: how the path axis runs: ``"unrolled"``, ``"vmap"``, ``"sharded"`` or
      ``"sequential"`` (one path's activations alive at a time: the memory of dense training;
      a loop over the paths on accelerators, unrolled on CPU, see
      :func:`paths.sequential_loop`; ``"sequential_loop"`` / ``"sequential_unrolled"`` pick one)
      (``None``: ``"sharded"`` on a mesh with a ``path`` axis, else
      :func:`paths.default_strategy`: sequential on accelerators, unrolled on CPU).
    share_non_prunable: ablation: one BatchNorm/head for both paths (default: per path, as the
      official code).
    kd_ramp_steps: robustness option: the distillation weight rises linearly over this many
      optimizer steps from ``kd_start_step`` instead of switching on in one step
      (``kd_weight · min(1, (step − kd_start_step + 1) / kd_ramp_steps)``); 0 (official): a step.
    kd_clip: robustness option: each path's distillation term is capped at ``kd_clip`` times
      that path's own task loss by a constant factor (:func:`dcil_jax.losses.distillation_term`:
      the value and the gradient of the KL term shrink together, the task gradient is
      untouched); ``None`` (official): no cap.

  Step-indexed settings count **optimizer steps** (the ``masked_update`` count), as the sparsity
  schedule does; under ``optax.MultiSteps`` every micro-step of one optimizer step sees the same.
  Gradient clipping, the other robustness knob measured, belongs to the optimizer
  (:func:`dcil_jax.clip_step_norm`; the experiments' ``--config.max_step_norm``).
  """

  kd_weight: KdWeight = losses.DEFAULT_KD_WEIGHT
  kd_start_step: int = 0
  temperature: float = losses.DEFAULT_TEMPERATURE
  strategy: str | None = None
  share_non_prunable: bool = False
  kd_ramp_steps: int = 0
  kd_clip: float | None = None
  name = "dcil"
  path_names = paths.PATH_NAMES
  uses_masks = True
  mask_transform = DPF.mask_transform
  fits = DPF.fits
  PRESETS = ("official", "robust")
  # The robust preset's method options (docs/method.md: neither option alone prevented the
  # blow-ups that gradient clipping prevents, so none is set).
  ROBUST_OPTIONS: ClassVar[dict[str, Any]] = {}
  # The optimizer half of the robust setting: the largest SGD step lr·‖g‖
  # (``dcil_jax.clip_step_norm``); a method object cannot own the optimizer. At the MNIST-1D
  # CNN's lr 0.2 it clips the gradient at norm 1, the fixed clip that rescued every seed there.
  ROBUST_MAX_STEP_NORM = 0.2

  def __post_init__(self):
    if int(self.kd_ramp_steps) != self.kd_ramp_steps or self.kd_ramp_steps < 0:
      raise ValueError(f"kd_ramp_steps must be an integer >= 0, got {self.kd_ramp_steps!r}.")
    if self.kd_clip is not None and not self.kd_clip > 0:
      raise ValueError(f"kd_clip must be None or > 0, got {self.kd_clip!r}.")

  @classmethod
  def official(cls, **fields: Any) -> DCIL:
    """The official code's DCIL (no robustness option), with ``fields`` set."""
    return cls(**{"kd_ramp_steps": 0, "kd_clip": None, **fields})

  @classmethod
  def robust(cls, **fields: Any) -> DCIL:
    """DCIL with the robustness options of :attr:`ROBUST_OPTIONS`, with ``fields`` set (which
    may override them)."""
    return cls(**{**cls.ROBUST_OPTIONS, **fields})

  @classmethod
  def preset(cls, name: str, **fields: Any) -> DCIL:
    """``DCIL.official(**fields)`` or ``DCIL.robust(**fields)`` by ``name``."""
    if name not in cls.PRESETS:
      raise ValueError(f"Unknown DCIL preset {name!r}; expected one of {cls.PRESETS}.")
    return getattr(cls, name)(**fields)

  @property
  def is_official(self) -> bool:
    """Whether no robustness option is set (the official code's loss and gradients)."""
    return self.kd_ramp_steps == 0 and self.kd_clip is None

  def layout(self, params: Any, model_state: Any, prunable: Any) -> tuple[Any, Any]:
    return (
      paths.split_params(params, prunable, share_non_prunable=self.share_non_prunable),
      paths.split_collections(model_state),
    )

  def kd_weight_at(self, step: jax.Array) -> jax.Array:
    """The distillation weight of optimizer step ``step`` (0 before ``kd_start_step``)."""
    weight = self.kd_weight(step) if callable(self.kd_weight) else self.kd_weight
    weight = jnp.asarray(weight, losses.kd_dtype(weight))  # float64 stays float64
    if self.kd_ramp_steps:
      done = (jnp.asarray(step, weight.dtype) - self.kd_start_step + 1) / self.kd_ramp_steps
      weight = weight * jnp.clip(done, 0.0, 1.0)
    return jnp.where(step >= self.kd_start_step, weight, jnp.zeros([], weight.dtype))

  def loss(self, model, params, masks, model_state, batch, rngs, step, mesh: Mesh | None = None):
    return losses.dcil_loss(
      model,
      params,
      masks,
      batch,
      model_state,
      kd_weight=self.kd_weight_at(step),
      temperature=self.temperature,
      kd_clip=self.kd_clip,
      strategy=self.strategy or paths.default_strategy(),
      mesh=mesh,
      rngs=rngs,
      task_loss=self.task_loss,
    )

  def metrics(self, aux: dict[str, Any]) -> dict[str, jax.Array]:
    s, d = paths.SPARSE, paths.DENSE
    return {
      "ce_sparse": aux["ce"][s],
      "ce_dense": aux["ce"][d],
      "kl_sparse": aux["kl"][s],
      "kl_dense": aux["kl"][d],
      "accuracy_sparse": aux["accuracy"][s],
      "accuracy_dense": aux["accuracy"][d],
    }


@dataclasses.dataclass(frozen=True)
class GMP(DPF):
  """Gradual magnitude pruning (Zhu & Gupta 2017), the standard non-dynamic baseline.

  One pruned path as DPF, with ``masked_update(..., regrow=False)``: the cubic ramp prunes the
  smallest kept weights at each refresh and a pruned weight never comes back. The forward pass
  and the export use ``W ⊙ M``, so a pruned weight is zero wherever it counts; the gradient it
  gets through DPF's estimator moves only a value nothing reads (the masks rank pruned weights
  below every kept one), so the kept weights train exactly as with GMP's masked gradient.
  """

  name = "gmp"
  mask_transform = "dcil_jax.masked_update(schedule, ..., regrow=False)"

  def fits(self, refresh: Refresh) -> bool:
    return isinstance(refresh, MaskRefresh) and not refresh.regrow


@dataclasses.dataclass(frozen=True)
class RigL(DPF):
  """RigL (Evci et al. 2020): constant sparsity, drop by magnitude, grow by dense gradient.

  The loss is DPF's (the forward at ``W ⊙ M``, and every entry of the kernels gets the gradient
  at ``W ⊙ M``: the dense gradient RigL grows by); the optimizer is wrapped by
  :func:`dcil_jax.rigl`, which trains only kept weights and keeps pruned ones at zero.
  """

  name = "rigl"
  mask_transform = "dcil_jax.rigl(optimizer, sparsity, ..., end_step=...) around the optimizer"

  def fits(self, refresh: Refresh) -> bool:
    return isinstance(refresh, RigLRefresh)


METHODS = {"dcil": DCIL, "dpf": DPF, "gmp": GMP, "rigl": RigL, "dense": Dense}
Method = Dense | DPF | DCIL | GMP | RigL


def check_refresh(method: Method, refresh: Refresh) -> None:
  """Raises unless the optimizer's mask transform makes the masks ``method`` trains with: a DPF
  loss with RigL's masks, or GMP with regrowth, would train silently as something else."""
  if not method.fits(refresh):
    raise ValueError(
      f"method={method.name!r} trains with {method.mask_transform}, but the optimizer holds "
      f"{refresh.describe()}."
    )


def get_method(method: str | Method) -> Method:
  """A method object from its name (default settings), or the object itself."""
  if isinstance(method, Dense):
    return method
  if method not in METHODS:
    raise ValueError(f"Unknown method {method!r}; expected one of {tuple(METHODS)}.")
  return METHODS[method]()
