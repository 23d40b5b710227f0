"""DCIL's robustness options: the official preset is the official routing, each option does what
its docstring says in every path strategy, and the experiments' config selects them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tree_allclose

import dcil_jax
from dcil_jax import losses, paths, rules
from experiments import resolve, run_state
from experiments.configs import mnist1d


@pytest.fixture(scope="module")
def setup(tiny_model, tiny_variables, tiny_batch):
  rule = rules.conv_kernels(tiny_model, tiny_batch["image"])
  params = paths.split_params(tiny_variables["params"], rule)
  params["dense"] = jax.tree.map(lambda x: x * 1.5 + 0.1, params["dense"])
  masks = dcil_jax.magnitude_masks(params, dcil_jax.masks_like(params), 0.6)
  rest = {k: v for k, v in tiny_variables.items() if k != "params"}
  return tiny_model, params, masks, paths.split_collections(rest)


def value_and_grad(setup, batch, method, step=0):
  model, params, masks, stats = setup
  fn = lambda p: method.loss(model, p, masks, stats, batch, None, jnp.int32(step))  # noqa: E731
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)


def test_default_and_official_preset_are_the_official_loss(setup, tiny_batch):
  """``DCIL()`` and ``DCIL.official()`` compute ``dcil_loss`` with no option, which
  tests/test_losses.py checks against two independent plain applies (the official routing)."""
  model, params, masks, stats = setup
  assert dcil_jax.DCIL().is_official and dcil_jax.DCIL.official().is_official
  assert dcil_jax.DCIL.preset("official") == dcil_jax.DCIL.official()
  fn = lambda p: dcil_jax.dcil_loss(  # noqa: E731
    model, p, masks, tiny_batch, stats, kd_weight=1.0, strategy="unrolled"
  )
  (want, _), want_grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
  for method in (dcil_jax.DCIL(strategy="unrolled"), dcil_jax.DCIL.official(strategy="unrolled")):
    (loss, _), grads = value_and_grad(setup, tiny_batch, method)
    assert float(loss) == float(want)
    tree_allclose(grads, want_grads, rtol=0, atol=0)


def test_robust_preset_sets_its_options_and_fields_override_them():
  robust = dcil_jax.DCIL.robust(kd_start_step=7)
  assert robust.kd_start_step == 7
  for name, value in dcil_jax.DCIL.ROBUST_OPTIONS.items():
    assert getattr(robust, name) == value
  assert robust.is_official == (not dcil_jax.DCIL.ROBUST_OPTIONS)
  assert dcil_jax.DCIL.preset("robust", kd_start_step=7) == robust
  assert not dcil_jax.DCIL.robust(kd_clip=2.0).is_official
  assert not dcil_jax.DCIL.robust(kd_ramp_steps=3).is_official
  assert dcil_jax.DCIL.robust(kd_clip=None, kd_ramp_steps=0).is_official
  with pytest.raises(ValueError, match="preset"):
    dcil_jax.DCIL.preset("sturdy")
  with pytest.raises(ValueError, match="kd_clip"):
    dcil_jax.DCIL(kd_clip=0.0)
  with pytest.raises(ValueError, match="kd_ramp_steps"):
    dcil_jax.DCIL(kd_ramp_steps=-1)


def test_kd_ramp_rises_linearly_from_the_start_step():
  method = dcil_jax.DCIL(kd_weight=2.0, kd_start_step=5, kd_ramp_steps=4)
  got = [float(method.kd_weight_at(jnp.int32(s))) for s in range(11)]
  assert got == [0, 0, 0, 0, 0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
  step = dcil_jax.DCIL(kd_start_step=5)
  assert [float(step.kd_weight_at(jnp.int32(s))) for s in (4, 5, 9)] == [0, 1, 1]


def test_distillation_term_is_capped_relative_to_the_task_loss():
  kl, task = jnp.float32(3.0), jnp.float32(2.0)
  assert float(losses.distillation_term(kl, task, 0.5)) == 1.5
  assert float(losses.distillation_term(kl, task, 0.5, kd_clip=1.0)) == 1.5  # below the cap
  capped = lambda k: losses.distillation_term(k, task, 1.0, kd_clip=0.5)  # noqa: E731
  assert float(capped(kl)) == pytest.approx(1.0)  # 0.5 * task
  # The gradient is the KL's scaled by the same constant factor (1.0 / 3.0), not zero.
  assert float(jax.grad(capped)(kl)) == pytest.approx(1.0 / 3.0)
  # The task loss only sets the cap: no gradient flows into it.
  assert float(jax.grad(lambda t: losses.distillation_term(kl, t, 1.0, kd_clip=0.5))(task)) == 0


def test_kd_clip_caps_each_path_and_binds_only_when_reached(setup, tiny_batch):
  (loss, aux), _ = value_and_grad(setup, tiny_batch, dcil_jax.DCIL(strategy="unrolled"))
  ce, kl = np.asarray(aux["ce"]), np.asarray(aux["kl"])
  assert np.all(kl > 0)
  loose = dcil_jax.DCIL(strategy="unrolled", kd_clip=2 * float(np.max(kl / ce)))
  (loose_loss, _), _ = value_and_grad(setup, tiny_batch, loose)
  assert float(loose_loss) == pytest.approx(float(loss), rel=1e-6)
  clip = 0.5 * float(np.min(kl / ce))  # binds on both paths
  (tight_loss, _), _ = value_and_grad(
    setup, tiny_batch, dcil_jax.DCIL(strategy="unrolled", kd_clip=clip)
  )
  assert float(tight_loss) == pytest.approx(float(np.sum(ce) * (1 + clip)), rel=1e-5)


@pytest.mark.parametrize("strategy", ["vmap", "sequential_unrolled", "sequential_loop"])
def test_kd_clip_is_the_same_in_every_strategy(setup, tiny_batch, strategy):
  """The cap and its gradient (parameters and ``kd_weight``) agree with the unrolled form."""
  model, params, masks, stats = setup

  def fn(p, kd, strategy):
    return dcil_jax.dcil_loss(
      model, p, masks, tiny_batch, stats, kd_weight=kd, kd_clip=0.05, strategy=strategy
    )

  grad = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True), static_argnums=2)
  (want, aux), want_grads = grad(params, jnp.float32(1.0), "unrolled")
  assert np.all(np.asarray(aux["kl"]) > 0.05 * np.asarray(aux["ce"]))  # the cap binds
  (got, _), got_grads = grad(params, jnp.float32(1.0), strategy)
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  tree_allclose(got_grads, want_grads, rtol=1e-4, atol=1e-6)


def _config(**overrides):
  config = mnist1d.get_config()
  for key, value in overrides.items():
    config[key] = value
  return resolve.resolve_config(config)


def test_robust_preset_bounds_the_step_unless_the_config_says_otherwise():
  official = _config(dcil_preset="official")
  assert official.max_step_norm == 0.0 and official.grad_clip_norm == 0.0
  robust = dcil_jax.DCIL.ROBUST_MAX_STEP_NORM
  assert _config(dcil_preset="robust").max_step_norm == robust
  assert _config(dcil_preset="robust", max_step_norm=0.0).max_step_norm == 0.0
  assert _config(method="dpf", dcil_preset="robust").max_step_norm == 0.0
  assert _config(method="gmp", max_step_norm=0.5).max_step_norm == 0.5
  assert _config(grad_clip_norm=5.0).grad_clip_norm == 5.0


def test_config_selects_the_preset_and_overrides_its_options():
  official = run_state.dcil_method(_config(dcil_preset="official"), steps_per_epoch=10)
  assert official.is_official and official.kd_start_step == 70  # mnist1d: epoch 7
  robust = run_state.dcil_method(_config(dcil_preset="robust"), steps_per_epoch=10)
  assert robust == dcil_jax.DCIL.robust(kd_start_step=70, temperature=2.0)
  default = _config()
  assert default.dcil_preset == "robust"  # the experiments' default: no blow-up at high rates
  assert run_state.dcil_method(default, steps_per_epoch=10) == robust
  ramped = run_state.dcil_method(_config(kd_ramp_epochs=1.5, kd_clip=3.0), steps_per_epoch=10)
  assert (ramped.kd_ramp_steps, ramped.kd_clip) == (15, 3.0)


@pytest.mark.parametrize(
  "overrides, message",
  [
    ({"dcil_preset": "sturdy"}, "dcil_preset"),
    ({"kd_clip": -1.0}, "kd_clip"),
    ({"kd_ramp_epochs": -1.0}, "kd_ramp_epochs"),
    ({"grad_clip_norm": -1.0}, "grad_clip_norm"),
    ({"max_step_norm": -0.1}, "max_step_norm"),
  ],
)
def test_bad_robustness_settings_fail_at_start(overrides, message):
  with pytest.raises(resolve.BadConfigError, match=message):
    _config(**overrides)


def test_grad_clip_norm_bounds_the_update():
  params = {"w": jnp.zeros(4)}
  huge = {"w": jnp.full(4, 1e6)}
  sizes = {}
  for clip in (0.0, 1.0):
    config = _config(method="dense", sparsity=0.0, grad_clip_norm=clip, weight_decay=0.0)
    tx = run_state.make_optimizer(config, steps_per_epoch=10)
    updates, _ = tx.update(huge, tx.init(params), params)
    sizes[clip] = float(optax.tree.norm(updates))
  config = _config()
  lr = float(run_state.learning_rate_schedule(config, 10)(0))
  # Nesterov's first update is lr * (1 + momentum) * g, with |g| clipped to 1.
  assert config.nesterov
  assert sizes[1.0] == pytest.approx(lr * (1 + config.momentum), rel=1e-5)
  assert sizes[0.0] == pytest.approx(lr * (1 + config.momentum) * 2e6, rel=1e-5)  # |g| = 2e6


@pytest.mark.parametrize("rate", [0.2, 0.02])
def test_clip_step_norm_bounds_the_sgd_step_at_every_learning_rate(rate):
  """lr·‖g‖ ≤ max_step: a large gradient is clipped to max_step / lr, a small one is kept;
  under a schedule the bound follows the rate of each step."""
  params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
  big = jax.tree.map(lambda p: jnp.full_like(p, 10.0), params)
  tx = optax.chain(dcil_jax.clip_step_norm(0.2, rate), optax.sgd(rate))
  updates, _ = jax.jit(tx.update)(big, tx.init(params), params)
  assert float(optax.tree.norm(updates)) == pytest.approx(min(0.2, rate * 10.0 * 7**0.5), rel=1e-5)
  small = jax.tree.map(lambda p: jnp.full_like(p, 1e-3), params)
  kept, _ = tx.update(small, tx.init(params), params)
  tree_allclose(kept, jax.tree.map(lambda g: -rate * g, small), rtol=1e-6)

  schedule = optax.piecewise_constant_schedule(rate, {1: 0.1})  # the rate drops at step 1
  clip = dcil_jax.clip_step_norm(0.2, schedule)
  state = clip.init(params)
  norms = []
  for _ in range(2):
    clipped, state = clip.update(big, state)
    norms.append(float(optax.tree.norm(clipped)))
  want = [min(0.2 / r, 10.0 * 7**0.5) for r in (rate, rate * 0.1)]
  assert norms == pytest.approx(want, rel=1e-5)


def test_clip_step_norm_lets_a_non_finite_gradient_through_and_refuses_a_zero_rate():
  """NaN must reach the train step's NaN guard (which skips the step), not be hidden."""
  params = {"w": jnp.zeros(2)}
  clip = dcil_jax.clip_step_norm(0.2, 0.1)
  out, _ = clip.update({"w": jnp.array([jnp.nan, 1.0])}, clip.init(params))
  assert bool(jnp.isnan(out["w"][0]))
  with pytest.raises(ValueError, match="learning rate"):
    dcil_jax.clip_step_norm(0.2, 0.0)
