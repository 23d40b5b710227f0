"""``strategy="sequential"``: the paths one after the other, at about the memory of dense training.

Same loss, gradients and new BatchNorm statistics as ``"unrolled"`` (the tolerance the other
strategies are held to in ``test_losses.py``), and a compiled step whose temporary memory is
clearly below unrolled's (``memory_analysis()`` is deterministic for a given program). Both
forms are tested: the loop (accelerators) and the unrolled stages (what ``"sequential"`` runs
on CPU).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_same, lifted, tree_allclose

import dcil_jax
from dcil_jax import paths
from dcil_jax.models import SmallCNN


class DropoutCNN(nn.Module):
  """Conv + BN + ReLU + dropout twice, pooled, a head: each path must draw its own dropout."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    for width in (4, 8):
      x = nn.Conv(width, (3, 3))(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
      x = nn.Dropout(0.3, deterministic=not train)(x)
    return nn.Dense(5)(jnp.mean(x, axis=(1, 2)))


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_variables, tiny_batch):
  dual, masks, stats = lifted(tiny_model, tiny_variables, tiny_batch["image"])
  dual["dense"] = jax.tree.map(lambda x: x * 1.5 + 0.1, dual["dense"])  # paths differ
  return tiny_model, dual, masks, stats


def value_and_grad(model, dual, masks, stats, batch, strategy, kd, rngs=None, traced_kd=False):
  """jit(value_and_grad) of ``dcil_loss``; ``traced_kd`` passes the weight as a jit argument."""

  def fn(p, kd):
    return dcil_jax.dcil_loss(
      model, p, masks, batch, stats, kd_weight=kd, strategy=strategy, rngs=rngs
    )

  if traced_kd:
    return jax.jit(jax.value_and_grad(fn, has_aux=True))(dual, jnp.float32(kd))
  return jax.jit(jax.value_and_grad(lambda p: fn(p, kd), has_aux=True))(dual)


FORMS = ["sequential_unrolled", "sequential_loop"]


@pytest.fixture(scope="module")
def unrolled(setup, tiny_batch):
  """The reference, ``"unrolled"``'s loss and gradients at a KD weight: computed once each."""
  return functools.cache(lambda kd: value_and_grad(*setup, tiny_batch, "unrolled", kd))


def kd_case(kd: float, traced: bool, form: str):
  """One case: a KD weight of 0 skips distillation (statically, or by ``lax.cond`` when traced,
  as ``train_step`` runs it). The unrolled form's static 0 is in the long run; the loop form's
  (the same skip at trace time) stays in the default run."""
  slow = (kd, traced, form) == (0.0, False, "sequential_unrolled")
  name = f"{kd}-{'traced' if traced else 'static'}_kd-{form}"
  return pytest.param(kd, traced, form, id=name, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize(
  "kd, traced_kd, form",
  [kd_case(kd, traced, form) for kd in (0.0, 1.0) for traced in (False, True) for form in FORMS],
)
def test_sequential_equals_unrolled(setup, unrolled, tiny_batch, kd, traced_kd, form):
  want = unrolled(kd)
  got = value_and_grad(*setup, tiny_batch, form, kd, traced_kd=traced_kd)
  assert_same(got, want)
  if kd:  # the distillation terms reach the gradient (so kd 0 and 1 test different things)
    assert float(jnp.sum(want[0][1]["kl"])) > 1e-3


def test_without_differentiation_the_loss_is_the_same(setup, tiny_batch):
  model, dual, masks, stats = setup
  run = jax.jit(
    lambda s: dcil_jax.dcil_loss(model, dual, masks, tiny_batch, stats, kd_weight=1.0, strategy=s),
    static_argnums=0,
  )
  (loss, aux), (ref_loss, ref_aux) = run("sequential"), run("unrolled")
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
  tree_allclose(aux["model_state"], ref_aux["model_state"])


def test_kd_weight_gradient_is_the_kl_sum(setup, tiny_batch):
  model, dual, masks, stats = setup

  def loss(kd, strategy):
    return dcil_jax.dcil_loss(
      model, dual, masks, tiny_batch, stats, kd_weight=kd, strategy=strategy
    )[0]

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  got, want = grad(jnp.float32(0.5), "sequential"), grad(jnp.float32(0.5), "unrolled")
  assert float(got) == pytest.approx(float(want), rel=1e-5) and float(want) > 1e-3


@pytest.fixture(scope="module")
def dropout_setup(tiny_batch):
  """A model with dropout, lifted, and ``"unrolled"``'s loss and gradients at a KD weight."""
  model, x = DropoutCNN(), tiny_batch["image"]
  variables = model.init(jax.random.PRNGKey(0), x)
  dual, masks, stats = lifted(model, variables, x)
  rngs = {"dropout": jax.random.PRNGKey(7)}
  unrolled = functools.cache(
    lambda kd: value_and_grad(model, dual, masks, stats, tiny_batch, "unrolled", kd, rngs)
  )
  return model, dual, masks, stats, rngs, unrolled


# Each form and each KD weight once by default; the other two pairs in the long run.
@pytest.mark.parametrize(
  "kd, form",
  [
    (0.0, "sequential_loop"),
    (1.0, "sequential_unrolled"),
    pytest.param(0.0, "sequential_unrolled", marks=pytest.mark.slow),
    pytest.param(1.0, "sequential_loop", marks=pytest.mark.slow),
  ],
)
def test_each_path_keeps_its_own_dropout_keys(dropout_setup, tiny_batch, kd, form):
  model, dual, masks, stats, rngs, unrolled = dropout_setup
  want = unrolled(kd)
  got = value_and_grad(model, dual, masks, stats, tiny_batch, form, kd, rngs, True)
  assert_same(got, want)
  other_keys = value_and_grad(
    model, dual, masks, stats, tiny_batch, form, kd, {"dropout": jax.random.PRNGKey(8)}
  )
  assert not np.allclose(other_keys[0][0], want[0][0])  # dropout is on: keys matter


def test_shared_bn_ablation_and_a_model_without_state(tiny_model, tiny_variables, tiny_batch):
  x = tiny_batch["image"]
  shared, masks, stats = lifted(tiny_model, tiny_variables, x, share_non_prunable=True)
  want = value_and_grad(tiny_model, shared, masks, stats, tiny_batch, "unrolled", 1.0)
  for form in FORMS:
    assert_same(value_and_grad(tiny_model, shared, masks, stats, tiny_batch, form, 1.0), want)

  class NoBN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      return nn.Dense(5)(jnp.mean(nn.relu(nn.Conv(4, (3, 3))(x)), axis=(1, 2)))

  model = NoBN()
  dual, masks, stats = lifted(model, model.init(jax.random.PRNGKey(0), x), x, 0.5)
  assert stats is None
  want = value_and_grad(model, dual, masks, None, tiny_batch, "unrolled", 1.0)
  for form in FORMS:
    got = value_and_grad(model, dual, masks, None, tiny_batch, form, 1.0)
    assert got[0][1]["model_state"] is None
    assert_same(got, want)


def make_tx():
  return optax.chain(
    optax.sgd(0.05, momentum=0.9),
    dcil_jax.masked_update(dcil_jax.constant_sparsity(0.6), update_every=1),
  )


# The default run checks both forms through `TrainState` / `train_step` on a data mesh of 8 fake
# devices against the one-device unrolled step (tests/multi_device); this is the one-device form.
@pytest.mark.slow
def test_train_step_equals_unrolled(tiny_model, tiny_variables, tiny_batch):
  """Two steps: KD off in the first (traced kd_weight 0, so the teacher forward is skipped by
  ``lax.cond``), on in the second; masks refresh in between."""
  out = {}
  for strategy in ["unrolled", *FORMS]:
    state = dcil_jax.TrainState.create(
      tiny_model,
      tiny_variables,
      make_tx(),
      method=dcil_jax.DCIL(kd_start_step=1, strategy=strategy),
      example_input=tiny_batch["image"],
    )
    assert state.method.strategy == strategy
    metrics = []
    for _ in range(2):
      state, m = dcil_jax.train_step(state, tiny_batch)
      metrics.append(m)
    out[strategy] = state, metrics
  ref_state, ref_metrics = out["unrolled"]
  for form in FORMS:
    state, metrics = out[form]
    tree_allclose(state.params, ref_state.params, rtol=1e-4, atol=1e-6)
    tree_allclose(state.model_state, ref_state.model_state, rtol=1e-4, atol=1e-6)
    tree_allclose(metrics, ref_metrics, rtol=1e-4, atol=1e-6)


def test_train_state_takes_the_strategy_by_name(tiny_model, tiny_variables, tiny_batch):
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, make_tx(), strategy="sequential", example_input=tiny_batch["image"]
  )
  assert state.method.strategy == "sequential" and "sequential" in paths.STRATEGIES


def step_memory(strategy: str | None, method: str = "dcil", kd_start_step: int = 0) -> int:
  """Compile-only ``memory_analysis()`` of ``train_step`` for a small conv net, batch 32.

  Compiled under the session's ``jax_disable_most_optimizations``: the flag lowers the LLVM
  optimisation level of the generated kernels and leaves XLA's HLO passes and buffer assignment
  as they are, so the step memory is the optimised program's (checked: the same bytes for all
  six configurations of this file either way)."""
  model = SmallCNN(num_classes=5, widths=(16, 32, 32))
  x = jnp.zeros((32, 16, 16, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])
  if method == "dcil":
    method = dcil_jax.DCIL(kd_start_step=kd_start_step, strategy=strategy)
    tx = make_tx()
  else:
    tx = optax.sgd(0.05, momentum=0.9)
  state = dcil_jax.TrainState.create(model, variables, tx, method=method, example_input=x[:1])
  batch = {"image": x, "label": jnp.zeros((32,), jnp.int32)}
  memory = dcil_jax.train_step.lower(state, batch).compile().memory_analysis()
  return memory.temp_size_in_bytes


@pytest.fixture(scope="module")
def compiled_memory():
  """:func:`step_memory`, each configuration once."""
  return functools.cache(step_memory)


KD_ON, KD_OFF = 0, 10**6  # kd_start_step: KD on from the start (traced weight 1), or off


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("kd_start_step", [KD_ON, KD_OFF], ids=["kd_on", "kd_off"])
def test_sequential_step_needs_about_the_memory_of_a_dense_step(
  compiled_memory, form, kd_start_step
):
  """The ordering is checked where it matters: XLA's buffer assignment of the compiled step."""
  dense, unrolled = compiled_memory(None, "dense"), compiled_memory("unrolled")
  sequential = compiled_memory(form, kd_start_step=kd_start_step)
  assert sequential < 0.7 * unrolled, (form, sequential, unrolled)
  assert sequential < 1.15 * dense, (form, sequential, dense)


def test_sequential_is_a_loop_on_accelerators_and_unrolled_on_cpu():
  assert not paths.sequential_loop("sequential", "cpu")
  assert paths.sequential_loop("sequential", "gpu") and paths.sequential_loop("sequential", "tpu")
  assert paths.sequential_loop("sequential_loop", "cpu")
  assert not paths.sequential_loop("sequential_unrolled", "tpu")
  with pytest.raises(ValueError, match="not one of the sequential strategies"):
    paths.sequential_loop("unrolled")


def test_default_strategy_is_sequential_on_accelerators_only():
  assert paths.default_strategy("cpu") == "unrolled"
  assert paths.default_strategy("gpu") == paths.default_strategy("tpu") == "sequential"
  assert paths.default_strategy() == paths.default_strategy(jax.default_backend())


def test_experiment_config_selects_sequential():
  from experiments import resolve, run_state
  from experiments.configs import cifar

  config = cifar.get_config()
  config.model, config.strategy = "resnet8", "sequential"
  config = resolve.resolve_config(config)
  state = run_state.create_train_state(config, dcil_jax.sharding.make_mesh(), steps_per_epoch=10)
  assert state.method.strategy == "sequential"
