"""Issue 23: inputs that used to train silently wrong or crash deep inside now train right or
fail with an error that names what to change; and one owner for what is pruned and how."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NUM_CLASSES
from flax import serialization

import dcil_jax
from dcil_jax import masks as masks_lib
from dcil_jax import rules


def masked(schedule=None, **kwargs):
  return dcil_jax.masked_update(schedule or dcil_jax.constant_sparsity(0.5), **kwargs)


@pytest.fixture(scope="module")
def dcil_state(tiny_model, tiny_variables, tiny_batch):
  """A DCIL state that refreshes every step (CPU default strategy)."""
  tx = optax.chain(optax.sgd(0.1, momentum=0.9), masked(update_every=1, track_revivals=True))
  return dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, example_input=tiny_batch["image"][:1]
  )


@pytest.fixture(scope="module")
def step(dcil_state):
  """``train_step`` without donation, so a test can compare a state with its successor."""
  return jax.jit(dcil_jax.train_step.__wrapped__)


# --------------------------------------------------------------------------------------------
# Labels


def test_an_integer_label_column_is_an_error_not_soft_targets(dcil_state, step, tiny_batch):
  column = tiny_batch | {"label": tiny_batch["label"][:, None]}
  with pytest.raises(TypeError, match=r"squeeze"):
    step(dcil_state, column)
  logits = jnp.zeros((8, NUM_CLASSES))
  with pytest.raises(TypeError, match=r"class indices are \[B\]"):
    dcil_jax.losses.cross_entropy(logits, tiny_batch["label"][:, None])


def test_one_hot_targets_with_the_wrong_number_of_classes_name_both_shapes(
  dcil_state, step, tiny_batch
):
  wrong = tiny_batch | {"label": jax.nn.one_hot(tiny_batch["label"], NUM_CLASSES + 1)}
  with pytest.raises(ValueError, match=r"\(8, 6\) do not match logits \(8, 5\)"):
    step(dcil_state, wrong)


@pytest.mark.parametrize("bad", [-1, NUM_CLASSES])
def test_a_label_outside_the_classes_skips_the_step_and_says_so(dcil_state, step, tiny_batch, bad):
  batch = tiny_batch | {"label": tiny_batch["label"].at[3].set(bad)}
  new, metrics = step(dcil_state, batch)
  assert not bool(metrics["labels_in_range"]) and not bool(metrics["finite"])
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(dcil_state.params), strict=True):
    np.testing.assert_array_equal(a, b)  # nothing trained (label -1 used to train as class 4)
  _, good = step(dcil_state, tiny_batch)
  assert bool(good["labels_in_range"]) and bool(good["finite"])
  sums = dcil_jax.eval_step(dcil_state, batch)
  assert float(sums["invalid_labels"]) == 1.0
  assert float(dcil_jax.eval_step(dcil_state, tiny_batch)["invalid_labels"]) == 0.0


def test_the_training_loop_stops_on_bad_labels_with_a_message():
  from experiments import loop

  monitor = loop.NonfiniteMonitor("skip", 10)
  window = [{"finite": np.bool_(False), "labels_in_range": np.bool_(False), "loss": 1.0}]
  with pytest.raises(ValueError, match="class index outside"):
    monitor.check(window, 7)


# --------------------------------------------------------------------------------------------
# RigL, schedules, serialization


def test_rigl_must_wrap_the_whole_optimizer(tiny_model, tiny_variables, tiny_batch):
  rigl = dcil_jax.rigl(optax.sgd(0.1), 0.5, update_every=2, end_step=10)
  x = tiny_batch["image"][:1]
  after = optax.chain(rigl, optax.scale(0.5))
  with pytest.raises(ValueError, match=r"1 transform\(s\) come after it"):
    dcil_jax.TrainState.create(tiny_model, tiny_variables, after, method="rigl", example_input=x)
  inside = dcil_jax.rigl(optax.chain(optax.sgd(0.1), optax.scale(0.5)), 0.5, 2, end_step=10)
  for tx in (inside, optax.chain(optax.clip(1.0), rigl)):  # transforms before it are fine
    dcil_jax.TrainState.create(tiny_model, tiny_variables, tx, method="rigl", example_input=x)


def test_a_constant_schedule_out_of_range_is_an_error_at_once(tiny_model, tiny_variables):
  tx = optax.chain(optax.sgd(0.1), masked(lambda step: 1.0, prunable=rules.all_kernels))
  with pytest.raises(ValueError, match=r"returned 1.0, known at trace time"):
    dcil_jax.TrainState.create(tiny_model, tiny_variables, tx)


def test_a_number_is_a_constant_sparsity_and_a_non_schedule_is_an_error(tiny_variables):
  params = tiny_variables["params"]
  number = masked(0.5, prunable=rules.all_kernels)
  schedule = masked(dcil_jax.constant_sparsity(0.5), prunable=rules.all_kernels)
  a = dcil_jax.get_masks(number.init(params), params)
  b = dcil_jax.get_masks(schedule.init(params), params)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, b))
  assert 0.4 < float(masks_lib.sparsity(a)) < 0.6
  c = dcil_jax.get_masks(masked(np.float32(0.5), prunable=rules.all_kernels).init(params), params)
  assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), a, c))  # NumPy's numbers
  with pytest.raises(TypeError, match="number or a function step -> sparsity"):
    masked("0.5", prunable=rules.all_kernels)
  with pytest.raises(ValueError):
    masked(1.5, prunable=rules.all_kernels)


@pytest.mark.parametrize("method", ["dcil", "rigl"])
def test_train_state_round_trips_through_flax_serialization(
  tiny_model, tiny_variables, tiny_batch, method
):
  if method == "rigl":
    tx = dcil_jax.rigl(optax.sgd(0.1, momentum=0.9), 0.5, update_every=1, end_step=10)
  else:
    tx = optax.chain(optax.sgd(0.1, momentum=0.9), masked(update_every=1))
  x = tiny_batch["image"][:1]
  state = dcil_jax.TrainState.create(tiny_model, tiny_variables, tx, method=method, example_input=x)
  state, _ = dcil_jax.train_step(state, tiny_batch)
  restored = serialization.from_bytes(state, serialization.to_bytes(state))
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
    np.testing.assert_array_equal(a, b)
  assert restored.opt_state is not state.opt_state


# --------------------------------------------------------------------------------------------
# float64 and the DCIL defaults


class Float64MLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dense(6, dtype=jnp.float64, param_dtype=jnp.float64)(x)
    return nn.Dense(3, dtype=jnp.float64, param_dtype=jnp.float64)(nn.tanh(x))


def _reference_dcil_loss(variables, kernel_masks, batch, kd_weight, temperature):
  """The DCIL objective written out in float64: the sparse path at ``W⊙M``, the dense path at
  ``sg(W⊙M) + W⊙(1−M)``, cross-entropy of both and the mutual distillation terms."""
  model = Float64MLP()

  def kernels(sparse):
    out = {name: dict(layer) for name, layer in variables.items()}
    for name, layer in kernel_masks.items():
      for leaf, m in layer.items():
        w = variables[name][leaf]
        out[name][leaf] = w * m if sparse else jax.lax.stop_gradient(w * m) + w * (1 - m)
    return out

  z_s = model.apply({"params": kernels(True)}, batch["image"])
  z_d = model.apply({"params": kernels(False)}, batch["image"])

  def ce(z):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), batch["label"][:, None], 1))

  def kl(student, teacher):
    t = temperature
    log_q = jax.nn.log_softmax(jax.lax.stop_gradient(teacher) / t)
    log_p = jax.nn.log_softmax(student / t)
    return t**2 * jnp.mean(jnp.sum(jnp.exp(log_q) * (log_q - log_p), -1))

  return ce(z_s) + ce(z_d) + kd_weight * (kl(z_s, z_d) + kl(z_d, z_s))


@pytest.mark.parametrize("strategy", ["unrolled", "sequential"])
def test_a_float64_dcil_loss_and_its_gradients_stay_float64(strategy):
  with jax.enable_x64(True):
    model = Float64MLP()
    x = jax.random.normal(jax.random.PRNGKey(0), (6, 4), jnp.float64)
    batch = {"image": x, "label": jnp.arange(6) % 3}
    variables = model.init(jax.random.PRNGKey(1), x)
    rule = rules.all_kernels
    tx = optax.chain(optax.sgd(0.1), masked(prunable=rule))
    params, _ = dcil_jax.lift(variables, tx, dcil_jax.DCIL(share_non_prunable=True))
    masks = dcil_jax.get_masks(tx.init(params), params)

    def loss(p):
      return dcil_jax.dcil_loss(
        model, p, masks, batch, kd_weight=0.7, temperature=2.0, strategy=strategy
      )[0]

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    assert value.dtype == jnp.float64

    # The same objective over the plain params (shared biases: the lifted layout's "shared").
    ref_value, ref_grads = jax.value_and_grad(_reference_dcil_loss)(
      variables["params"], masks["prunable"], batch, 0.7, 2.0
    )
    np.testing.assert_allclose(value, ref_value, rtol=1e-12, atol=0)
    for name, layer in masks["prunable"].items():
      for leaf in layer:
        got, g = grads["prunable"][name][leaf], ref_grads[name][leaf]
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, g, rtol=1e-12, atol=1e-15)


def test_dcil_loss_defaults_are_the_method_defaults(dcil_state, tiny_batch):
  """An own loop that calls ``dcil_loss`` with its defaults trains what ``DCIL()`` trains."""
  state = dcil_state
  args = (state.model, state.params, state.masks, tiny_batch, state.model_state)
  plain, _ = jax.jit(lambda: dcil_jax.dcil_loss(*args))()
  method = dcil_jax.DCIL()
  model, params, masks, batch, model_state = args
  via_method, _ = jax.jit(
    lambda: method.loss(model, params, masks, model_state, batch, None, jnp.int32(0))
  )()
  assert float(plain) == pytest.approx(float(via_method), rel=1e-6)
  no_kd, _ = jax.jit(lambda: dcil_jax.dcil_loss(*args, kd_weight=0.0))()
  assert float(plain) != pytest.approx(float(no_kd))  # distillation is on by default


# --------------------------------------------------------------------------------------------
# One refresh, one record


def test_masks_are_computed_once_per_refresh_step(
  monkeypatch, tiny_model, tiny_variables, tiny_batch
):
  calls = []
  original = masks_lib.magnitude_masks

  def counting(*args, **kwargs):
    calls.append(1)
    return original(*args, **kwargs)

  tx = optax.chain(optax.sgd(0.1), masked(update_every=1, prunable=rules.all_kernels))
  state = dcil_jax.TrainState.create(tiny_model, tiny_variables, tx)
  monkeypatch.setattr(masks_lib, "magnitude_masks", counting)
  jax.jit(dcil_jax.train_step.__wrapped__).trace(state, tiny_batch)  # traces every branch
  assert len(calls) == 1


def test_the_refresh_record_lives_in_the_transform_state(dcil_state, step, tiny_batch):
  state = dcil_state
  for _ in range(3):
    old = state.trained_masks
    state, metrics = step(state, tiny_batch)
    new = state.trained_masks
    record = dcil_jax.find_masked_state(state.opt_state).record
    assert float(record.flip_rate) == pytest.approx(float(dcil_jax.flip_rate(old, new)))
    assert float(metrics["flip_rate"]) == float(record.flip_rate)
    back = dcil_jax.refresh.revived(old, new)
    count = sum(int(b.sum()) for b in jax.tree.leaves(back))
    total = sum(b.size for b in jax.tree.leaves(back))
    assert float(record.revived) == pytest.approx(count / total)
    rates = dcil_jax.refresh.layer_flip_rates(old, new)
    assert {k: float(v) for k, v in record.layer_flip_rate.items()} == pytest.approx(
      {k: float(v) for k, v in rates.items()}
    )
  assert record.ever_revived is not None  # built with track_revivals=True


def test_mask_settings_are_read_without_building_masks(tiny_variables):
  """A transform with no rule on a plain tree is an error for a user calling ``init``, but its
  settings can still be read (no exception is caught on the way)."""
  tx = optax.chain(optax.sgd(0.1), masked(update_every=7))
  with pytest.raises(ValueError, match="Which parameters to prune"):
    tx.init(tiny_variables["params"])
  (refresh,) = dcil_jax.refresh.declared_refreshes(tx, tiny_variables["params"])
  assert isinstance(refresh, dcil_jax.refresh.Refresh) and refresh.update_every == 7
  assert refresh.prunable is None
  assert dcil_jax.refresh.declared_refreshes(optax.sgd(0.1), tiny_variables["params"]) == ()


# --------------------------------------------------------------------------------------------
# The library boundary


def _library_names_used(root):
  """``(file, module, name, imported)`` for every ``dcil_jax`` name the files under ``root``
  use: ``from dcil_jax.X import Y`` (imported), ``from dcil_jax import X``, ``import
  dcil_jax.X`` and attribute chains ``dcil_jax.X.Y``."""
  import ast
  from pathlib import Path

  used = []
  for file in sorted(Path(root).rglob("*.py")):
    for node in ast.walk(ast.parse(file.read_text())):
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dcil_jax"):
        module = node.module.removeprefix("dcil_jax").lstrip(".") or None
        used += [(file.name, module, alias.name, True) for alias in node.names]
      elif isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.startswith("dcil_jax."):
            module, _, name = alias.name.removeprefix("dcil_jax.").rpartition(".")
            used.append((file.name, module or None, name, True))
      elif isinstance(node, ast.Attribute):
        chain, inner = [node.attr], node.value
        while isinstance(inner, ast.Attribute):
          chain.append(inner.attr)
          inner = inner.value
        if isinstance(inner, ast.Name) and inner.id == "dcil_jax":
          chain.reverse()
          used.append((file.name, None, chain[0], False))
          if len(chain) >= 2:
            used.append((file.name, chain[0], chain[1], False))
  return used


@pytest.mark.parametrize("root", ["experiments", "benchmarks"])
def test_experiments_and_benchmarks_use_only_public_library_names(root):
  """Public: a name in ``dcil_jax.__all__``, or a name in the ``__all__`` of a module that is
  itself in ``dcil_jax.__all__`` (``dcil_jax.rules``, ``dcil_jax.models``, ...)."""
  import importlib
  import types
  from pathlib import Path

  private = []
  for file, module, name, imported in _library_names_used(Path(__file__).parent.parent / root):
    if name.startswith("__") and name.endswith("__"):  # dcil_jax.__file__ and friends
      continue
    if module is None:
      if name not in dcil_jax.__all__:
        private.append(f"{file}: dcil_jax.{name}")
      continue
    top = module.split(".")[0]
    is_module = isinstance(getattr(dcil_jax, top, None), types.ModuleType)
    if not imported and not is_module:  # an attribute of a public object (train_step.lower)
      continue
    if top not in dcil_jax.__all__ or not is_module:
      private.append(f"{file}: dcil_jax.{module} (not a public module)")
      continue
    if name not in getattr(importlib.import_module(f"dcil_jax.{module}"), "__all__", ()):
      private.append(f"{file}: dcil_jax.{module}.{name}")
  assert not private, "private dcil_jax names used:\n" + "\n".join(sorted(set(private)))
