"""``masked_update``: an optax transform that owns the masks and refreshes them inside ``jit``."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax
from flax import serialization

from dcil_jax import granularity as granularity_lib
from dcil_jax import masks as masks_lib
from dcil_jax import refresh as refresh_lib
from dcil_jax.schedules import SparsitySchedule, constant_sparsity

GRANULARITIES = ("weight", "filter", "nm")


@runtime_checkable
class FilterAllocation(Protocol):
  """Who decides which filters a refresh prunes, instead of one global threshold: e.g.
  :class:`dcil_jax.deploy.GroupAllocation` (coupled channel groups, cost-aware). Static (it
  travels in the optimizer state as part of :class:`MaskRefresh`)."""

  def masks(self, params: Any, masks: Any, sparsity: jax.Array, score: str) -> Any:
    """Filter masks like ``masks`` pruning a ``sparsity`` fraction of its filters (in ``jit``)."""
    ...


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True, eq=False)
class MaskRefresh:
  """How :func:`masked_update` recomputes masks (a :class:`dcil_jax.refresh.Refresh`): static
  data that travels inside the optimizer state (no leaves), so that the forward pass can
  compute the masks of its step from the state alone."""

  schedule: SparsitySchedule
  update_every: int
  distribution: masks_lib.Distribution
  granularity: str = "weight"
  score: str = "l1"
  n_m: tuple[int, int] = (2, 4)
  regrow: bool = True
  prunable: masks_lib.IsPrunable | None = None
  track_revivals: bool = False
  allocation: FilterAllocation | None = None

  def describe(self) -> str:
    if not self.regrow:
      return "dcil_jax.masked_update(schedule, ..., regrow=False) (GMP's masks)"
    return "dcil_jax.masked_update(schedule, ...) (dynamic masks with regrowth)"

  def due(self, count: jax.Array) -> jax.Array:
    return count % self.update_every == 0

  def target_at(self, count: jax.Array, last_target: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(target, out_of_range)``: the scheduled sparsity of step ``count``.

    A traced value outside [0, 1) (or NaN) cannot raise inside ``jit``, and pruning every
    weight would silently kill the network: the last valid target is kept instead (0 before
    any), and ``out_of_range`` says so (``train_step`` reports it as
    ``sparsity_out_of_range``). A value known at trace time (a schedule that returns a
    constant) is checked at once.
    """
    if self.granularity == "nm":  # fixed by construction: 1 - n/m
      n, m = self.n_m
      return jnp.asarray(1.0 - n / m, jnp.float32), jnp.bool_(False)
    value = self.schedule(count)
    if not isinstance(value, jax.core.Tracer) and not 0.0 <= float(value) < 1.0:
      raise ValueError(
        f"The sparsity schedule returned {value!r}, known at trace time (a constant); a "
        "sparsity lies in [0, 1). (Only a traced value out of range is replaced by the last "
        "valid one and flagged.)"
      )
    target = jnp.asarray(value, jnp.float32)
    out_of_range = ~((target >= 0.0) & (target < 1.0))
    return jnp.where(out_of_range, last_target, target), out_of_range

  def masks_at(self, params: Any, template: Any, target: jax.Array) -> Any:
    """Magnitude masks of ``params`` (structured like ``template``) at sparsity ``target``."""
    if self.granularity == "nm":
      return granularity_lib.nm_masks(params, template, *self.n_m)
    if self.granularity == "filter" and self.allocation is not None:
      return self.allocation.masks(params, template, target, self.score)
    if self.granularity == "filter":
      return granularity_lib.filter_masks(params, template, target, self.score, self.distribution)
    return masks_lib.magnitude_masks(
      params, template, target, self.distribution, keep_pruned=not self.regrow
    )

  def compute(self, params: Any, template: Any, count: jax.Array, last_target: jax.Array):
    """``(masks, target, out_of_range)`` of step ``count`` (see :meth:`target_at`)."""
    target, out_of_range = self.target_at(count, last_target)
    return self.masks_at(params, template, target), target, out_of_range

  def view(self, masks: Any) -> Any:
    """``masks`` in the unit that is pruned: one bit per filter for filter masks, else as is.
    Flip rates, sparsities and revival counts are taken on this view."""
    return granularity_lib.filter_view(masks) if self.granularity == "filter" else masks

  def pruned_fraction(self, masks: Any) -> jax.Array:
    """The pruned fraction in the unit the schedule counts (filters for filter masks)."""
    return masks_lib.sparsity(self.view(masks))


def refresh_input(params: Any, masks: Any) -> Any:
  """``params`` with ``|W|`` at the prunable leaves: what a refresh's ``lax.cond`` should read.

  Every mask rule reads ``W`` only through ``|W|`` (magnitudes, squares, filter norms), so the
  masks are the same. The reason is memory: XLA copies a donated parameter that a conditional
  reads, and that kernel-sized copy then stands in for ``W`` until the end of the step, while
  ``|W|`` is an ordinary temporary that dies once the refresh has read it. The gain depends on
  where the step's peak is (a measurement: ``benchmarks/results/notes_cpu.md``).
  """
  return masks_lib.map_masked(lambda w, m: jnp.abs(w), params, masks)


class MaskedUpdateState(NamedTuple):
  """State of :func:`masked_update`.

  Attributes:
    count: optimizer steps taken so far (``t``).
    masks: the masks step ``t - 1`` trained with (before any step: those of ``W_0``). Eval and
      export use them; step ``t``'s forward uses :func:`get_masks` (the same masks, or a fresh
      refresh from ``W_t`` when ``t % update_every == 0``).
    target_sparsity: the schedule's sparsity at the last refresh.
    last_refresh: the step whose forward pass first used ``masks``.
    out_of_range: the schedule left [0, 1) at the last refresh (its last valid value was used).
    record: what the last refresh changed (flip rate, revived weights, per-layer flip rates;
      :class:`dcil_jax.refresh.RefreshRecord`).
    refresh: how masks are computed (static, no leaves; a
      :class:`dcil_jax.refresh.Refresh`: :class:`MaskRefresh` or RigL's).
    next_masks: the masks of the next forward pass, for transforms that decide them in the
      update (:func:`dcil_jax.rigl`); ``None`` when they are computed from ``W_t`` on the fly.
  """

  count: jax.Array
  masks: Any
  target_sparsity: jax.Array
  last_refresh: jax.Array
  out_of_range: jax.Array
  record: refresh_lib.RefreshRecord
  refresh: refresh_lib.Refresh
  next_masks: Any = None

  @property
  def flip_rate(self) -> jax.Array:
    """Fraction of prunable entries (in the pruned unit) whose bit changed at the last
    refresh."""
    return self.record.flip_rate


def masked_update(
  sparsity_schedule: SparsitySchedule | float,
  update_every: int = 16,
  *,
  distribution: masks_lib.Distribution = "global",
  prunable: masks_lib.IsPrunable | None = None,
  granularity: str = "weight",
  score: str = "l1",
  n_m: tuple[int, int] = (2, 4),
  regrow: bool = True,
  track_revivals: bool = False,
  allocation: FilterAllocation | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Keeps magnitude masks in the optimizer state and refreshes them every ``update_every`` steps.

  DCIL (and DPF) prune dynamically: every ``k`` iterations, *before* the forward pass, the masks
  are recomputed from the magnitudes of the dense weights ``W_t`` at the scheduled sparsity, also
  after the target is reached, so pruned weights that grew back are revived. The masks of step
  ``t`` are a function of ``W_t`` and ``t`` alone, and ``W_t`` is the ``params`` every member of
  an optax chain receives. So this transform reads only ``params`` and its own step count, never
  the incoming updates: **its position in the chain does not matter** (first, middle, last, inside
  one branch of ``optax.multi_transform`` or inside ``optax.MultiSteps``, where it counts
  optimizer steps). The forward pass of step ``t`` gets its masks from
  :func:`get_masks` ``(opt_state, params)``; the update of step ``t`` stores them, so eval and
  export see what the step trained with: pass them as ``tx.update(..., dcil_masks=masks)``
  (``train_step`` does) and they are computed once per refresh; without them the update
  recomputes the same masks (a ``lax.cond``, only on refresh steps). This is the official
  timing: step ``t``'s forward uses masks computed from ``W_t`` when ``t % k == 0``. Each
  refresh leaves a :class:`dcil_jax.refresh.RefreshRecord` in the state.

  The updates pass through untouched: pruned weights keep training (that is the method), and
  momentum is never reset.

  Args:
    sparsity_schedule: ``step -> sparsity`` (see :mod:`dcil_jax.schedules`), in optimizer steps,
      or a number: that sparsity from the first step (as optax takes a float learning rate);
      None for ``granularity="nm"``, which ignores it.
      A traced value outside [0, 1) is replaced by the last valid one and flagged
      (``sparsity_out_of_range`` in the step metrics); a concrete one raises.
    update_every: refresh period ``k`` in optimizer steps (official: 16).
    distribution: ``"global"`` (official), ``"layerwise"`` or ``"erk"``.
    prunable: which parameters to prune (see :mod:`dcil_jax.rules`). On a lifted tree
      (``TrainState`` / :func:`dcil_jax.lift`) the default is its ``"prunable"`` part; on a
      plain tree a rule is required. This is the one place the rule is given: ``TrainState``
      and ``lift`` read it from here.
    granularity: ``"weight"`` (official DCIL/DPF), ``"filter"`` (the official structured mode:
      whole output filters, scored by ``score``; the sparsity is the fraction of filters and
      flip rates count filters) or ``"nm"`` (``n_m = (n, m)``: ``n`` of every ``m`` weights
      along the input channels; its sparsity is ``1 - n/m`` and ignores the schedule).
    score: filter score, ``"l1"`` (mean ``|w|``) or ``"l2"`` (mean ``w²``).
    n_m: ``(n, m)`` for ``granularity="nm"`` (e.g. 2:4).
    regrow: ``False`` for GMP (Zhu & Gupta 2017): a pruned weight stays pruned (it ranks below
      every kept one at later refreshes), so masks only shrink under a rising schedule. Weight
      granularity only.
    track_revivals: also record which weights were ever revived
      (``RefreshRecord.ever_revived``; one bool per prunable weight).
    allocation: for ``granularity="filter"``, which filters a refresh prunes instead of the
      global threshold of ``filter_masks``: :func:`dcil_jax.deploy.group_allocation` (traced
      once from the model) prunes coupled channel groups, per-layer-normalised and optionally
      weighted by the MACs they save, so that compaction removes every pruned filter. The
      sparsity still counts prunable filters; ``distribution`` must stay ``"global"``.

  Returns:
    An optax transform whose state is a :class:`MaskedUpdateState`.
  """
  if isinstance(sparsity_schedule, numbers.Real) and not isinstance(sparsity_schedule, bool):
    sparsity_schedule = constant_sparsity(sparsity_schedule)
  if not callable(sparsity_schedule) and not (granularity == "nm" and sparsity_schedule is None):
    raise TypeError(
      "sparsity_schedule must be a number or a function step -> sparsity (e.g. "
      f"dcil_jax.cubic_sparsity(...)), got {type(sparsity_schedule).__name__}."
    )
  if int(update_every) != update_every or update_every < 1:
    raise ValueError(f"update_every must be a positive integer, got {update_every!r}.")
  if distribution not in masks_lib.DISTRIBUTIONS:
    raise ValueError(
      f"Unknown mask distribution {distribution!r}; expected one of {masks_lib.DISTRIBUTIONS}."
    )
  if granularity not in GRANULARITIES:
    raise ValueError(f"Unknown granularity {granularity!r}; expected one of {GRANULARITIES}.")
  if granularity == "filter" and (
    score not in granularity_lib.FILTER_SCORES or distribution not in ("global", "layerwise")
  ):
    raise ValueError(
      f"Filter masks take score in {granularity_lib.FILTER_SCORES} and a 'global' or "
      f"'layerwise' distribution; got {score!r}, {distribution!r}."
    )
  if granularity == "nm":
    granularity_lib._check_nm(*n_m)
  if allocation is not None and (granularity != "filter" or distribution != "global"):
    raise ValueError(
      "allocation= decides which filters go: it takes granularity='filter' and the default "
      f"distribution='global', got {granularity!r}, {distribution!r}."
    )
  if allocation is not None and not isinstance(allocation, FilterAllocation):
    raise TypeError(
      f"allocation must have a masks(params, masks, sparsity, score) method (e.g. "
      f"dcil_jax.deploy.group_allocation(...)), got {type(allocation).__name__}."
    )
  if not regrow and granularity != "weight":
    raise ValueError(f"regrow=False (GMP) takes granularity='weight', got {granularity!r}.")
  refresh = MaskRefresh(
    sparsity_schedule,
    int(update_every),
    distribution,
    granularity,
    score,
    tuple(n_m),
    regrow,
    prunable,
    bool(track_revivals),
    allocation,
  )

  def init_fn(params):
    count = jnp.zeros([], jnp.int32)
    zero = jnp.zeros([], jnp.float32)
    if refresh_lib.declare(refresh):  # TrainState.create reading the settings: no masks
      return MaskedUpdateState(count, None, zero, count, jnp.bool_(False), None, refresh)
    template = masks_lib.masks_like(params, prunable)
    masks, target, out_of_range = refresh.compute(params, template, count, zero)
    record = refresh_lib.RefreshRecord.create(refresh.view(masks), refresh.track_revivals)
    return MaskedUpdateState(count, masks, target, count, out_of_range, record, refresh)

  def update_fn(updates, state, params=None, *, dcil_masks=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError("masked_update needs `params`: call tx.update(grads, state, params).")
    given = _as_state_masks(dcil_masks, state.masks)
    magnitudes = None if given is not None else refresh_input(params, state.masks)

    def fresh():
      target, out_of_range = refresh.target_at(state.count, state.target_sparsity)
      if given is not None:  # the forward pass's masks of this step: computed once
        masks = given
      else:
        masks = refresh.masks_at(magnitudes, state.masks, target)
      record = state.record.after(refresh.view(state.masks), refresh.view(masks))
      return masks, target, record, state.count, out_of_range

    def kept():
      s = state
      return s.masks, s.target_sparsity, s.record, s.last_refresh, s.out_of_range

    masks, target, record, last, out_of_range = jax.lax.cond(refresh.due(state.count), fresh, kept)
    count = optax.safe_increment(state.count)
    return updates, MaskedUpdateState(count, masks, target, last, out_of_range, record, refresh)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _as_state_masks(given: Any, state_masks: Any) -> Any:
  """The forward pass's masks (``dcil_masks``, plain: ``None`` at unpruned leaves) in the
  layout of the state's (``optax.MaskedNode`` where another optimizer branch owns a leaf), or
  ``None`` when none were given or they do not fit (then the update recomputes them)."""
  if given is None:
    return None
  masked_node = lambda x: isinstance(x, optax.MaskedNode)
  flat_state, tree = jax.tree.flatten(state_masks, is_leaf=masked_node)
  node_free = [None if masked_node(x) else x for x in flat_state]
  plain = jax.tree.unflatten(tree, node_free)
  if jax.tree.structure(plain) != jax.tree.structure(given):
    return None
  as_given = jax.tree.leaves(given)
  it = iter(as_given)
  return jax.tree.unflatten(tree, [x if masked_node(x) else next(it) for x in flat_state])


def _is_masked_state(x: Any) -> bool:
  return isinstance(x, MaskedUpdateState)


def find_masked_state(opt_state: Any) -> MaskedUpdateState:
  """The :class:`MaskedUpdateState` inside any (nested) optimizer state.

  Raises:
    ValueError: if there is none, or more than one.
  """
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_masked_state) if _is_masked_state(s)]
  if not found:
    raise ValueError(
      "The optimizer has no dcil_jax.masked_update: add it to the optax chain (anywhere: it "
      "reads only the params and its step count)."
    )
  if len(found) > 1:
    raise ValueError(
      f"The optimizer has {len(found)} dcil_jax.masked_update transforms; use exactly one. "
      "(It may sit inside one branch of optax.multi_transform, and then prunes that branch.)"
    )
  return found[0]


def has_masks(opt_state: Any) -> bool:
  """Whether ``opt_state`` holds any :class:`MaskedUpdateState`."""
  return any(_is_masked_state(s) for s in jax.tree.leaves(opt_state, is_leaf=_is_masked_state))


def get_masks(opt_state: Any, params: Any) -> Any:
  """The masks of the next forward pass (step ``count``) at weights ``params``.

  The trained masks, or, on a refresh step, masks computed from ``params`` (``W_t``) exactly as
  the optimizer update of this step will compute and store them.

  Args:
    opt_state: any optimizer state that holds one :func:`masked_update`.
    params: the params the optimizer is applied to (the lifted tree for DCIL/DPF).

  Returns:
    A masks tree mirroring ``params`` (``None`` at leaves that are not pruned).
  """
  state = find_masked_state(opt_state)
  if state.next_masks is not None:
    return masks_lib.plain_masks(state.next_masks)
  trained = masks_lib.plain_masks(state.masks)
  magnitudes = refresh_input(params, trained)
  refresh = state.refresh

  def fresh():
    target, _ = refresh.target_at(state.count, state.target_sparsity)
    return refresh.masks_at(magnitudes, trained, target)

  return jax.lax.cond(refresh.due(state.count), fresh, lambda: trained)


def get_trained_masks(opt_state: Any) -> Any:
  """The masks the last optimizer step trained with: those to evaluate and export."""
  return masks_lib.plain_masks(find_masked_state(opt_state).masks)


# The settings are static (no leaves): flax.serialization (to_bytes / from_bytes of a state that
# holds them) keeps the target's own.
serialization.register_serialization_state(MaskRefresh, lambda _: {}, lambda target, _: target)
