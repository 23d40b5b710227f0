import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import distillation_on, tree_allclose

import dcil_jax

SPARSITY = 0.75


def make_tx(update_every=2):
  """SGD + masked_update with no rule: TrainState finds the convolutions from example_input."""
  return optax.chain(
    optax.add_decayed_weights(1e-4),
    optax.sgd(0.05, momentum=0.9, nesterov=True),
    dcil_jax.masked_update(dcil_jax.cubic_sparsity(SPARSITY, ramp_steps=4), update_every),
  )


# The methods whose optimizer is `make_tx`'s (GMP and RigL take their own mask transforms;
# tests/test_baselines.py trains them through the same TrainState).
TX_METHODS = ("dcil", "dense", "dpf")


@pytest.fixture(scope="module", params=TX_METHODS)
def trained(request, tiny_model, tiny_variables, tiny_batch):
  """Six steps of each method; returns (method, state, metrics of each step)."""
  tx = make_tx() if request.param != "dense" else optax.sgd(0.05, momentum=0.9)
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method=request.param, example_input=tiny_batch["image"]
  )
  if request.param == "dcil":
    state = state.replace(method=dataclasses.replace(state.method, kd_start_step=3))
  history = []
  for _ in range(6):
    state, metrics = dcil_jax.train_step(state, tiny_batch)
    history.append(jax.device_get(metrics))
  return request.param, state, history


def test_train_step_trains_and_reports(trained, tiny_variables):
  method, state, history = trained
  assert int(state.step) == 6
  assert history[-1]["loss"] < history[0]["loss"]
  assert np.isfinite([h["loss"] for h in history]).all()
  # The caller's variables survive the donated steps.
  assert np.isfinite(np.asarray(jax.tree.leaves(tiny_variables)[0])).all()
  if method == "dcil":
    assert all(h["kl_sparse"] >= 0 and h["kl_dense"] >= 0 for h in history)
    kd_on = [distillation_on(h) for h in history]
    assert kd_on == [False, False, False, True, True, True]  # kd_start_step=3
  if method == "dense":
    assert state.masks is None and "sparsity" not in history[-1]
  else:
    # Masks refresh every 2 steps, before the forward pass of steps 2 and 4 (step 0's are
    # computed at init).
    assert [bool(h["mask_refreshed"]) for h in history] == [False, False, True, False, True, False]
    assert float(dcil_jax.sparsity(state.masks)) == pytest.approx(SPARSITY, abs=1e-3)


def test_lifted_layout(trained):
  method, state, _ = trained
  if method == "dense":
    assert set(state.params) == {"Conv_0", "Conv_1", "BatchNorm_0", "BatchNorm_1", "Dense_0"}
    return
  names = ("sparse", "dense") if method == "dcil" else ("sparse",)
  assert set(state.params) == {"prunable", *names}
  assert set(state.params["prunable"]) == {"Conv_0", "Conv_1"}  # found from the module types
  for name in names:
    assert state.params[name]["Dense_0"]["kernel"].shape == (8, 5)  # its plain shape
    assert set(state.model_state[name]) == {"batch_stats"}


def test_export_reproduces_sparse_path_eval(trained, tiny_model, tiny_batch):
  method, state, _ = trained
  exported = dcil_jax.export_variables(state)
  # Plain variables for the unmodified model: same tree as model.init.
  assert jax.tree.structure(exported) == jax.tree.structure(
    tiny_model.init(jax.random.PRNGKey(0), tiny_batch["image"])
  )
  logits = tiny_model.apply(exported, tiny_batch["image"], train=False)
  sums = dcil_jax.eval_step(state, tiny_batch)
  hits = jnp.sum(jnp.argmax(logits, -1) == tiny_batch["label"])
  assert float(sums["top1"]) == float(hits) and float(sums["count"]) == 8
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, tiny_batch["label"]).sum()
  assert float(sums["loss"]) == pytest.approx(float(loss), rel=1e-5)
  # A padded batch: only the examples the mask marks count.
  padded = dict(tiny_batch, mask=jnp.arange(8) < 5)
  assert float(dcil_jax.eval_step(state, padded)["top1"]) == float(
    jnp.sum((jnp.argmax(logits, -1) == tiny_batch["label"])[:5])
  )
  if method != "dense":
    # The exported zeros are exactly the masks the last step trained with.
    for name in ["Conv_0", "Conv_1"]:
      kernel = exported["params"][name]["kernel"]
      np.testing.assert_array_equal(kernel != 0, state.trained_masks["prunable"][name]["kernel"])
  if method == "dcil":
    dense = dcil_jax.export_variables(state, path="dense")
    assert float(jnp.mean(dense["params"]["Conv_1"]["kernel"] == 0)) == 0.0
    assert set(dcil_jax.eval_step(state, tiny_batch, path="dense")) == {
      "count",
      "invalid_labels",
      "loss",
      "top1",
      "top5",
    }
  else:
    with pytest.raises(ValueError, match="Only DCIL has a dense path|has no 'dense' path"):
      dcil_jax.export_variables(state, path="dense")


def test_vmap_strategy_trains_like_unrolled(tiny_model, tiny_variables, tiny_batch):
  states = {}
  for strategy in ["unrolled", "vmap"]:
    state = dcil_jax.TrainState.create(
      tiny_model,
      tiny_variables,
      make_tx(update_every=100),
      strategy=strategy,
      example_input=tiny_batch["image"],
    )
    states[strategy], _ = dcil_jax.train_step(state, tiny_batch)
  tree_allclose(states["vmap"].params, states["unrolled"].params, rtol=1e-4, atol=1e-6)


def test_bad_method_and_missing_masks(tiny_model, tiny_variables, tiny_batch):
  x = tiny_batch["image"]
  create = functools.partial(dcil_jax.TrainState.create, tiny_model, example_input=x)
  with pytest.raises(ValueError, match="Unknown method"):
    create(tiny_variables, make_tx(), method="snip")
  with pytest.raises(ValueError, match="needs masks"):
    create(tiny_variables, optax.sgd(0.1), method="dcil")
  with pytest.raises(ValueError, match="Unknown path strategy"):
    create(tiny_variables, make_tx(), strategy="magic")
  with pytest.raises(TypeError, match="'params'"):
    create(tiny_variables["params"], make_tx())
  with pytest.raises(ValueError, match="Which parameters to prune"):  # no rule, no example
    dcil_jax.TrainState.create(tiny_model, tiny_variables, make_tx())
  with pytest.raises(ValueError, match="takes no mask transform"):
    create(tiny_variables, make_tx(), method="dense")
  state = create(tiny_variables, optax.sgd(0.1), method="dense")
  assert state.masks is None


def test_bad_batches_are_rejected_before_anything_is_donated(
  tiny_model, tiny_variables, tiny_batch
):
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, make_tx(), method="dpf", example_input=tiny_batch["image"]
  )
  bad = {
    "keys": {"x": tiny_batch["image"], "y": tiny_batch["label"]},
    "float labels": dict(tiny_batch, label=tiny_batch["label"].astype(jnp.float32)),
    "sizes": dict(tiny_batch, label=tiny_batch["label"][:3]),
  }
  for name, batch in bad.items():
    with pytest.raises(TypeError, match="batch|labels|Labels"):
      dcil_jax.train_step(state, batch)
    assert name and np.isfinite(np.asarray(jax.tree.leaves(state.params)[0])).all()
  state, _ = dcil_jax.train_step(state, tiny_batch)  # the state is still usable
  assert int(state.step) == 1


@pytest.mark.parametrize("method", TX_METHODS)
def test_donating_the_state_leaves_the_callers_variables_intact(
  method, tiny_model, tiny_variables, tiny_batch
):
  variables = jax.tree.map(jnp.copy, tiny_variables)
  tx = make_tx() if method != "dense" else optax.sgd(0.1)
  state = dcil_jax.TrainState.create(
    tiny_model, variables, tx, method=method, example_input=tiny_batch["image"]
  )
  dcil_jax.train_step(state, tiny_batch)
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(variables))
  tree_allclose(variables, tiny_variables, rtol=0, atol=0)
