"""A user's own optax chain and Flax model: each is right, or a clear error (issue 10).

Each test is written as the reproduction of one failure that used to be silent.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import NUM_CLASSES, distillation_on, tree_allclose
from flax import traverse_util

import dcil_jax
from dcil_jax import paths, rules

SPARSITY = 0.5


def masked(update_every=2, **kwargs):
  return dcil_jax.masked_update(dcil_jax.constant_sparsity(SPARSITY), update_every, **kwargs)


def no_decay_on_vectors(params):
  """The usual "no weight decay on BatchNorm and biases", keyed on shapes."""
  return jax.tree.map(lambda a: a.ndim > 1, params)


def labels_by_name(params):
  """multi_transform labels from the parameter names (flax.traverse_util.path_aware_map)."""
  return traverse_util.path_aware_map(
    lambda path, x: "no_decay" if path[-1] in ("bias", "scale") else "decay", params
  )


USER_CHAINS = {
  "masked weight decay": lambda: optax.chain(
    optax.masked(optax.add_decayed_weights(0.3), no_decay_on_vectors), optax.sgd(0.1)
  ),
  "muon": lambda: optax.contrib.muon(0.02),
  "multi_transform by name": lambda: optax.multi_transform(
    {"decay": optax.adamw(0.01, weight_decay=0.3), "no_decay": optax.adam(0.01)}, labels_by_name
  ),
}


@pytest.fixture(scope="module")
def lifted_setup(tiny_model, tiny_variables, tiny_batch):
  rule = rules.conv_kernels(tiny_model, tiny_batch["image"])
  params = tiny_variables["params"]
  grads = jax.tree.map(
    lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params
  )
  return rule, params, grads


@pytest.mark.parametrize("name", sorted(USER_CHAINS))
def test_a_users_chain_updates_the_lifted_tree_as_the_plain_model(name, lifted_setup):
  """Issue 10.1: the copies used to be stacked [2, ...]: optax.masked by ndim decayed BN,
  Muon took BN/bias copies and sent the head to Adam, path_aware_map labels crashed."""
  rule, params, grads = lifted_setup
  tx = USER_CHAINS[name]()
  plain_updates, _ = tx.update(grads, tx.init(params), params)
  lifted = paths.split_params(params, rule)
  lifted_updates, _ = tx.update(paths.split_params(grads, rule), tx.init(lifted), lifted)
  for path_name in paths.PATH_NAMES:  # each path's copy is updated as the plain leaf
    tree_allclose(paths.path_params(lifted_updates, path_name), plain_updates, rtol=1e-6)


def test_no_weight_decay_on_batchnorm_in_a_dcil_state(tiny_model, tiny_variables, tiny_batch):
  def step(decay):
    inner = [optax.masked(optax.add_decayed_weights(decay), no_decay_on_vectors)]
    tx = optax.chain(*inner, optax.sgd(0.1), masked())
    state = dcil_jax.TrainState.create(
      tiny_model, tiny_variables, tx, example_input=tiny_batch["image"]
    )
    return dcil_jax.train_step(state, tiny_batch)[0].params

  with_decay, without = step(0.5), step(0.0)
  for part in paths.PATH_NAMES:
    tree_allclose(with_decay[part]["BatchNorm_0"], without[part]["BatchNorm_0"], 0, 0)
    assert not np.allclose(
      with_decay[part]["Dense_0"]["kernel"], without[part]["Dense_0"]["kernel"]
    )


def test_masked_update_in_one_branch_of_multi_transform_with_a_train_state(
  tiny_model, tiny_variables, tiny_batch
):
  """Issue 10.2: used to be a pytree error from to_dual_path."""
  tx = optax.multi_transform(
    {"decay": optax.chain(optax.sgd(0.1), masked(prunable=None)), "no_decay": optax.sgd(0.1)},
    labels_by_name,
  )
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, example_input=tiny_batch["image"]
  )
  state, metrics = dcil_jax.train_step(state, tiny_batch)
  assert float(metrics["sparsity"]) == pytest.approx(SPARSITY, abs=0.01)
  assert jax.tree.leaves(state.trained_masks["prunable"])


def test_the_rule_is_given_once(tiny_model, tiny_variables, tiny_batch):
  """Issue 10.3: lifted with one rule and pruned by another, the kernels only the second
  named were silently copied per path and never pruned."""
  x = tiny_batch["image"]
  params = paths.split_params(tiny_variables["params"], rules.conv_kernels(tiny_model, x))
  with pytest.raises(ValueError, match="lifted with another prunable rule"):
    masked(prunable=rules.all_kernels).init(params)
  # dcil_jax.lift reads the rule from the chain: one source of truth.
  tx = optax.chain(optax.sgd(0.1), masked(prunable=rules.all_kernels))
  params, _ = dcil_jax.lift(tiny_variables, tx)
  assert set(params["prunable"]) == {"Conv_0", "Conv_1", "Dense_0"}
  assert "kernel" not in params["sparse"].get("Dense_0", {})
  with pytest.raises(ValueError, match="takes no mask transform"):  # as TrainState.create
    dcil_jax.lift(tiny_variables, tx, "dense")


def test_a_hand_written_loop_trains_exports_and_evaluates(tiny_model, tiny_variables, tiny_batch):
  """Issue 10.3: export_variables used to need a TrainState."""
  tx = optax.chain(
    optax.sgd(0.1, momentum=0.9),
    masked(prunable=rules.conv_kernels(tiny_model, tiny_batch["image"])),
  )
  params, model_state = dcil_jax.lift(tiny_variables, tx)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, model_state, opt_state, batch):
    masks = dcil_jax.get_masks(opt_state, params)
    (loss, aux), grads = jax.value_and_grad(dcil_jax.dcil_loss, argnums=1, has_aux=True)(
      tiny_model, params, masks, batch, model_state, kd_weight=1.0
    )
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), aux["model_state"], opt_state, loss

  losses = []
  for _ in range(4):
    params, model_state, opt_state, loss = step(params, model_state, opt_state, tiny_batch)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  masks = dcil_jax.get_trained_masks(opt_state)
  exported = dcil_jax.export_variables(params, masks, model_state)
  kernel = exported["params"]["Conv_1"]["kernel"]
  assert float(jnp.mean(kernel == 0)) == pytest.approx(SPARSITY, abs=0.02)
  logits = tiny_model.apply(exported, tiny_batch["image"], train=False)
  assert logits.shape == (8, NUM_CLASSES)


class AttentionLike(nn.Module):
  """A 1-D conv, a DenseGeneral with a 3-D kernel (like a ViT's q/k/v), and Dense layers."""

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    x = nn.Conv(4, (3,), name="conv")(x)  # [B, L, 4]; kernel [3, C, 4]
    x = nn.DenseGeneral((2, 3), name="qkv")(x)  # kernel [4, 2, 3]
    x = nn.DenseGeneral(4, axis=(-2, -1), name="out")(x)  # kernel [2, 3, 4]: looks like a conv
    x = nn.Dropout(0.5, deterministic=deterministic)(x)
    return nn.Dense(NUM_CLASSES, name="head")(x.mean(axis=1))


def test_the_conv_rule_means_convolutions():
  """Issue 10.4: "any kernel with ndim >= 3" pruned DenseGeneral projections, not Dense MLPs."""
  model, x = AttentionLike(), jnp.zeros((2, 6, 3))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]

  def selected(rule):
    masks = dcil_jax.masks_like(params, rule)
    return {k for k, v in masks.items() if jax.tree.leaves(v)}

  assert selected(rules.conv_kernels(model, x)) == {"conv"}
  assert selected(rules.dense_kernels(model, x)) == {"qkv", "out", "head"}
  assert selected(rules.all_kernels) == {"conv", "qkv", "out", "head"}
  assert selected(rules.conv_and_dense_kernels(model, x)) == {"conv", "qkv", "out", "head"}


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.relu(nn.Dense(4)(x)), None


def test_scanned_dense_stacks_are_dense_not_convolutions():
  """A scanned Dense stack has a 3-D kernel [layers, in, out]: it is still a Dense layer."""

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      x = nn.Conv(4, (3, 3), name="stem")(x).mean(axis=(1, 2))
      stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
      x, _ = stack(name="mlp")(x, None)
      return nn.Dense(NUM_CLASSES, name="head")(x)

  model, x = Scanned(), jnp.zeros((1, 8, 8, 1))
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
  assert params["mlp"]["Dense_0"]["kernel"].shape == (3, 4, 4)
  convs = dcil_jax.masks_like(params, rules.conv_kernels(model, x))
  assert convs["stem"]["kernel"] is not None and convs["mlp"]["Dense_0"]["kernel"] is None
  dense = dcil_jax.masks_like(params, rules.dense_kernels(model, x))
  assert dense["mlp"]["Dense_0"]["kernel"] is not None and dense["stem"]["kernel"] is None


def test_multisteps_counts_refreshes_and_distillation_in_optimizer_steps(
  tiny_model, tiny_variables, tiny_batch
):
  """Issue 10.6: mask_refreshed was true on 4x too many micro-steps, and kd_start_step counted
  micro-steps while the sparsity schedule counted optimizer steps."""
  micro = 2
  tx = optax.MultiSteps(optax.chain(optax.sgd(0.1), masked(update_every=2)), micro)
  method = dcil_jax.DCIL(kd_start_step=3)
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method=method, example_input=tiny_batch["image"]
  )
  refreshed, kd_on, opt_steps = [], [], []
  for _ in range(5 * micro):
    opt_steps.append(int(state.optimizer_step))
    state, metrics = dcil_jax.train_step(state, tiny_batch)
    refreshed.append(bool(metrics["mask_refreshed"]))
    kd_on.append(distillation_on(metrics))
  assert opt_steps == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
  # Refreshes before optimizer steps 2 and 4, each reported once (on its last micro-step).
  assert refreshed == [False] * 5 + [True] + [False] * 3 + [True]
  assert kd_on == [t >= 3 for t in opt_steps]


def test_each_path_draws_its_own_dropout_mask(tiny_batch):
  """Issue 10.7: both paths used to get the same dropout mask."""
  model, x = AttentionLike(), jax.random.normal(jax.random.PRNGKey(2), (8, 6, 3))
  batch = {"image": x, "label": tiny_batch["label"]}
  variables = model.init(jax.random.PRNGKey(0), x)
  params = paths.split_params(variables["params"], rules.conv_kernels(model, x))
  masks = dcil_jax.masks_like(params)  # all kept: the two paths compute the same function
  rngs = {"dropout": jax.random.PRNGKey(7)}

  @functools.partial(jax.jit, static_argnums=0)
  def run(strategy):
    return dcil_jax.dcil_loss(model, params, masks, batch, rngs=rngs, strategy=strategy)[1]

  unrolled, vmapped = run("unrolled"), run("vmap")
  z_s, z_d = unrolled["logits"]
  assert not np.allclose(z_s, z_d)  # different dropout masks
  # Without dropout (eval mode) both paths agree: the difference is the dropout alone.
  eval_logits = model.apply(variables, x)
  assert not np.allclose(z_s, eval_logits)
  tree_allclose(vmapped["logits"], unrolled["logits"], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def attention_state(tiny_batch):
  model, x = AttentionLike(), jax.random.normal(jax.random.PRNGKey(2), (8, 6, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  return model, variables, {"image": x, "label": tiny_batch["label"]}


def test_a_model_with_a_deterministic_flag_trains(attention_state):
  """Open step: `deterministic=` used to fail in train_step with "unexpected keyword 'train'"."""
  model, variables, batch = attention_state
  tx = optax.chain(optax.adam(0.01), masked())
  state = dcil_jax.TrainState.create(model, variables, tx, example_input=batch["image"])
  state, metrics = dcil_jax.train_step(state, batch)
  assert bool(metrics["finite"])
  sums = dcil_jax.eval_step(state, batch)  # eval mode: deterministic=True, no rng needed
  assert float(sums["count"]) == 8


def test_a_model_with_an_unknown_flag_needs_mode(tiny_batch):
  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x, use_noise):
      return nn.Dense(NUM_CLASSES)(nn.Conv(2, (3, 3))(x).mean(axis=(1, 2)))

  with pytest.raises(TypeError, match="mode="):
    dcil_jax.as_model(Odd())
  model = dcil_jax.as_model(Odd(), mode=lambda train: {"use_noise": train})
  variables = Odd().init(jax.random.PRNGKey(0), tiny_batch["image"], False)
  tx = optax.chain(optax.sgd(0.1), masked())
  state = dcil_jax.TrainState.create(model, variables, tx, example_input=tiny_batch["image"])
  assert bool(dcil_jax.train_step(state, tiny_batch)[1]["finite"])


def test_other_variable_collections_are_kept_per_path(tiny_batch):
  """Open step: a collection besides params/batch_stats used to raise ScopeCollectionNotFound."""

  class Counting(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      calls = self.variable("counters", "calls", lambda: jnp.zeros([], jnp.int32))
      if train:
        calls.value += 1
      x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
      return nn.Dense(NUM_CLASSES)(x.mean(axis=(1, 2)))

  model = Counting()
  variables = model.init(jax.random.PRNGKey(0), tiny_batch["image"])
  tx = optax.chain(optax.sgd(0.1), masked())
  state = dcil_jax.TrainState.create(model, variables, tx, example_input=tiny_batch["image"])
  for _ in range(3):
    state, _ = dcil_jax.train_step(state, tiny_batch)
  for path in paths.PATH_NAMES:
    assert int(state.model_state[path]["counters"]["calls"]) == 3
    assert set(state.model_state[path]) == {"counters", "batch_stats"}
  assert int(dcil_jax.export_variables(state)["counters"]["calls"]) == 3


def test_custom_task_loss_soft_targets_and_kd_schedule(tiny_model, tiny_variables, tiny_batch):
  """Open step: label smoothing / one-hot or mixup targets and a kd_weight schedule."""

  def smoothed(logits, batch):
    labels = batch["label"]
    targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, NUM_CLASSES)
    targets = optax.smooth_labels(targets, 0.1)
    return optax.softmax_cross_entropy(logits, targets).mean()

  method = dcil_jax.DCIL(task_loss=smoothed, kd_weight=lambda step: 0.5 * step)
  tx = optax.chain(optax.sgd(0.1), masked())
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method=method, example_input=tiny_batch["image"]
  )
  soft = dict(tiny_batch, label=jax.nn.one_hot(tiny_batch["label"], NUM_CLASSES))
  for t in range(3):
    state, metrics = dcil_jax.train_step(state, soft if t % 2 else tiny_batch)
    kd = float(metrics["loss"] - metrics["ce_sparse"] - metrics["ce_dense"])
    expected = 0.5 * t * float(metrics["kl_sparse"] + metrics["kl_dense"])
    assert kd == pytest.approx(expected, rel=1e-4, abs=1e-5)
  # The task loss is the smoothed one (not plain cross-entropy).
  _, aux = jax.jit(
    lambda s: dcil_jax.dcil_loss(
      tiny_model, s.params, s.trained_masks, tiny_batch, s.model_state, task_loss=smoothed
    )
  )(state)
  assert float(aux["ce"][0]) == pytest.approx(float(smoothed(aux["logits"][0], tiny_batch)))


def test_optimizers_that_need_the_loss_value_get_it(tiny_model, tiny_variables, tiny_batch):
  """Open step: reduce_on_plateau needs `value=`; it used to get nothing."""
  tx = optax.chain(
    optax.sgd(0.1), optax.contrib.reduce_on_plateau(patience=0, factor=0.5), masked()
  )
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method="dpf", example_input=tiny_batch["image"]
  )
  worse = dict(tiny_batch, label=(tiny_batch["label"] + 1) % NUM_CLASSES)
  for batch in (tiny_batch, worse, worse, worse):
    state, _ = dcil_jax.train_step(state, batch)
  plateau = state.opt_state[1]
  assert float(plateau.scale) < 1.0  # it saw the loss rise


def test_schedule_free_evaluates_at_its_eval_params(tiny_model, tiny_variables, tiny_batch):
  tx = optax.chain(optax.contrib.schedule_free_sgd(0.1), masked())
  eval_params = lambda s, p: optax.contrib.schedule_free_eval_params(s[0], p)  # noqa: E731
  create = dcil_jax.TrainState.create
  kwargs = dict(method="dpf", example_input=tiny_batch["image"])
  state = create(tiny_model, tiny_variables, tx, eval_params_fn=eval_params, **kwargs)
  for _ in range(3):
    state, _ = dcil_jax.train_step(state, tiny_batch)
  exported = dcil_jax.export_variables(state)["params"]
  expected = dcil_jax.export_variables(
    eval_params(state.opt_state, state.params), state.trained_masks, state.model_state
  )["params"]
  tree_allclose(exported, expected, 0, 0)
  train_point = dcil_jax.export_variables(state.params, state.trained_masks)["params"]
  assert not np.allclose(exported["Dense_0"]["kernel"], train_point["Dense_0"]["kernel"])


def test_sparsity_out_of_range_is_reported_by_the_step(tiny_model, tiny_variables, tiny_batch):
  tx = optax.chain(optax.sgd(0.1), dcil_jax.masked_update(optax.linear_schedule(0.5, 1.5, 2), 1))
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method="dpf", example_input=tiny_batch["image"]
  )
  flags = []
  for _ in range(4):
    state, metrics = dcil_jax.train_step(state, tiny_batch)
    flags.append(bool(metrics["sparsity_out_of_range"]))
    assert float(metrics["sparsity"]) < 1.0
  assert flags == [False, True, True, True]  # 0.5 at step 0, then 1.0 and beyond


@pytest.mark.parametrize("method", ["dcil", "dpf"])
def test_filter_granularity_trains_whole_filters(method, tiny_model, tiny_variables, tiny_batch):
  from dcil_jax import granularity

  tx = optax.chain(
    optax.sgd(0.1),
    dcil_jax.masked_update(dcil_jax.constant_sparsity(0.5), 2, granularity="filter"),
  )
  state = dcil_jax.TrainState.create(
    tiny_model, tiny_variables, tx, method=method, example_input=tiny_batch["image"]
  )
  for _ in range(3):
    state, metrics = dcil_jax.train_step(state, tiny_batch)
  masks = state.trained_masks
  assert granularity.is_filter_structured(masks)
  assert float(granularity.filter_sparsity(masks)) == pytest.approx(0.5)  # 6 of 12 filters
  assert 0.0 <= float(metrics["flip_rate"]) <= 1.0
  assert float(metrics["sparsity"]) == pytest.approx(0.5)  # counted in filters, not weights
  assert float(dcil_jax.sparsity(masks)) != pytest.approx(0.5)  # (in weights it is not 0.5)
  _check_experiments_count_filters(state)


def _check_experiments_count_filters(state):
  """The experiments layer's summary and revival tracking count filters for filter masks."""
  from experiments import run_state

  report = run_state.mask_report(state)
  assert report["sparsity_unit"] == "filter" and report["sparsity"] == pytest.approx(0.5)
  assert report["weight_sparsity"] == pytest.approx(float(dcil_jax.sparsity(state.trained_masks)))
  for fraction in report["layer_sparsity"].values():  # whole filters of 4 and 8
    assert fraction * 8 == pytest.approx(round(fraction * 8))
  refresh = dcil_jax.find_masked_state(state.opt_state).refresh
  view = refresh.view(state.trained_masks)
  assert [x.shape for x in jax.tree.leaves(view)] == [(4,), (8,)]  # one bit per filter
  record = dcil_jax.refresh.RefreshRecord.create(view, track_revivals=True).after(view, view)
  assert [x.shape for x in jax.tree.leaves(record.ever_revived)] == [(4,), (8,)]
  measured = run_state.refresh_record(state, True)
  assert 0.0 <= float(measured["flip_rate"]) <= 1.0
  assert len(measured["layer_flip_rate"]) == 2


def conv_1_only(path, leaf):
  return rules.key_names(path) == ("Conv_1", "kernel")


@pytest.mark.parametrize("method", ["dcil", "dpf"])
def test_n_m_granularity_keeps_n_of_every_m(method, tiny_model, tiny_variables, tiny_batch):
  tx = optax.chain(
    optax.sgd(0.1),
    dcil_jax.masked_update(None, 2, granularity="nm", n_m=(2, 4), prunable=conv_1_only),
  )
  state = dcil_jax.TrainState.create(tiny_model, tiny_variables, tx, method=method)
  state, metrics = dcil_jax.train_step(state, tiny_batch)
  m = np.asarray(state.trained_masks["prunable"]["Conv_1"]["kernel"])  # [3, 3, 4, 8]
  groups = m.reshape(3, 3, 1, 4, 8).sum(axis=3)  # groups of 4 input channels
  assert (groups == 2).all() and float(metrics["target_sparsity"]) == 0.5


def test_n_m_on_a_layer_that_cannot_take_it_names_the_layer(tiny_model, tiny_variables, tiny_batch):
  tx = optax.chain(optax.sgd(0.1), dcil_jax.masked_update(None, granularity="nm", n_m=(2, 4)))
  with pytest.raises(ValueError, match="Conv_0"):  # 1 input channel does not divide by 4
    dcil_jax.TrainState.create(tiny_model, tiny_variables, tx, example_input=tiny_batch["image"])
