"""The loop's owners one by one (experiments.loop, train.restore_or_init / Evaluator /
CheckpointPolicy), the config resolution, and the loop under a transfer guard: in process."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dcil_jax import sharding
from experiments import checkpoints, loop, resolve, run_state, train
from experiments.configs import cifar, digits


def step_metrics(loss, finite=True, refreshed=False, flip=0.0):
  return {
    "loss": jnp.float32(loss),
    "finite": jnp.bool_(finite),
    "mask_refreshed": jnp.bool_(refreshed),
    "flip_rate": jnp.float32(flip),
  }


def test_itstime_fires_on_multiples_and_the_last_step():
  assert [s for s in range(1, 11) if loop.itstime(s, 4, last=10)] == [4, 8, 10]
  assert [s for s in range(1, 11) if loop.itstime(s, None, last=10)] == [10]
  assert not any(loop.itstime(s, None) for s in range(1, 11))


def test_metric_buffer_means_over_finite_steps_and_flip_rate_over_refreshes():
  buffer = loop.MetricBuffer(loop.NonfiniteMonitor("skip", 10))
  buffer.append(step_metrics(1.0, refreshed=True, flip=0.5))
  buffer.append(step_metrics(np.nan, finite=False, refreshed=True, flip=0.9))
  buffer.append(step_metrics(3.0))
  with pytest.raises(RuntimeError, match="before fetch"):
    buffer.pop_mean()
  buffer.fetch(step=3)
  assert buffer.monitor.counts() == (1, 0)  # step 2 skipped, step 3 fine again
  mean = buffer.pop_mean()
  assert mean["loss"] == 2.0 and mean["flip_rate"] == 0.5 and mean["nonfinite_steps"] == 1.0
  assert len(buffer) == 0


def test_metric_buffer_carried_by_a_checkpoint_gives_the_same_mean_bit_for_bit():
  values = [0.1, 0.7, 1.3, 2.9]
  whole = loop.MetricBuffer(loop.NonfiniteMonitor("stop", 1))
  for v in values:
    whole.append(step_metrics(v))
  whole.fetch(step=4)

  first = loop.MetricBuffer(loop.NonfiniteMonitor("stop", 1))
  for v in values[:2]:
    first.append(step_metrics(v))
  first.fetch(step=2)
  saved = json.loads(json.dumps(first.pending()))  # what the checkpoint's JSON holds
  resumed = loop.MetricBuffer(loop.NonfiniteMonitor("stop", 1), saved)
  for v in values[2:]:
    resumed.append(step_metrics(v))
  resumed.fetch(step=4)
  assert resumed.pop_mean() == whole.pop_mean()


def test_nonfinite_monitor_names_the_step_and_counts_a_streak():
  buffer = loop.MetricBuffer(loop.NonfiniteMonitor("stop", 5))
  for v in (1.0, 1.0, np.inf):
    buffer.append(step_metrics(v, finite=np.isfinite(v)))
  with pytest.raises(FloatingPointError, match="Step 12: the loss"):
    buffer.fetch(step=12)
  monitor = loop.NonfiniteMonitor("skip", 2, counts=(3, 0))
  monitor.check([{"finite": False, "loss": np.nan}], first_step=7)
  assert monitor.counts() == (4, 1)
  with pytest.raises(FloatingPointError, match="Steps 7..8: 2 non-finite steps in a row"):
    monitor.check([{"finite": False, "loss": np.nan}], first_step=8)


def test_refresh_log_writes_only_the_steps_that_refreshed():
  written = []
  log = loop.RefreshLog(lambda step, record: written.append((step, record)), [{"step": 1}])
  layer = {"['Conv_0']['kernel']": jnp.float32(0.25)}
  for step, refreshed in ((2, False), (3, True)):
    result = {"flip_rate": jnp.float32(0.5), "refreshed": jnp.bool_(refreshed)}
    log.append(step, result | {"layer_flip_rate": layer})
  assert written == []  # nothing reaches the host before a flush
  log.flush()
  assert written == [(3, {"flip_rate": 0.5, "flip_rate/Conv_0/kernel": 0.25})]
  assert [r["step"] for r in log.records] == [1, 3]


def test_throughput_leaves_out_the_first_step():
  now = iter([10.0, 14.0, 14.0])
  timer = loop.Throughput(clock=lambda: next(now))
  assert timer.rate() is None
  for _ in range(3):
    timer.step(jnp.zeros(()), images=8)
  assert timer.images == 16 and timer.rate() == 4.0  # 16 images in the 4 s after step 1


def test_stop_policy_on_one_process_checks_every_step():
  asked = []
  policy = loop.StopPolicy(lambda: bool(asked), agree_every=10)
  assert not policy(3)
  asked.append(True)
  assert policy(4)  # not only at multiples of agree_every: no other process to agree with


def test_stop_policy_on_two_processes_stops_both_when_either_is_asked(monkeypatch):
  """The in-process form of test_two_processes.py's SIGTERM run (marked slow): the hosts agree
  at multiples of ``agree_every``, and a stop asked of either one stops both."""
  from jax.experimental import multihost_utils

  other_host_asked = [False]
  gathered = []

  def allgather(flag):
    gathered.append(bool(flag))
    return np.asarray([flag, other_host_asked[0]])

  monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
  policy = loop.StopPolicy(lambda: False, agree_every=2, processes=2)
  assert not policy(2) and gathered == [False]
  other_host_asked[0] = True
  assert not policy(3) and len(gathered) == 1  # no collective between agreement steps
  assert policy(4)  # this host was not asked, the other was: both stop after step 4


def test_checkpoint_policy_saves_at_evals_stops_and_its_period():
  policy = train.CheckpointPolicy(None, every=5, config=digits.get_config("local"))
  due = [s for s in range(1, 12) if policy.due(s, evaluated=s == 11, stop=s == 7)]
  assert due == [5, 7, 10, 11]


def test_flip_rate_after_the_ramp_counts_refreshes_after_its_last_step():
  refreshes = [
    {"step": s, "flip_rate": f, "flip_rate/a": f} for s, f in ((8, 0.4), (16, 0.2), (24, 0.1))
  ]
  out = train.flip_rate_summary(refreshes, ramp_end=16)
  assert out["flip_rate"]["mean_after_ramp"] == 0.1 and out["flip_rate"]["last"] == 0.1
  assert out["flip_rate"]["mean"] == pytest.approx(0.7 / 3)
  assert out["layer_flip_rate_after_ramp"] == {"a": 0.1}
  assert train.flip_rate_summary(refreshes, ramp_end=24)["flip_rate"]["mean_after_ramp"] is None


# --------------------------------------------------------------------------------------------
# Config resolution


def test_num_epochs_alone_scales_the_recipe_milestones():
  config = cifar.get_config()
  with config.unlocked():
    config.num_epochs = 3
    config.kd_start_epoch = 2.0  # set explicitly: kept
  r = resolve.resolve_config(config)
  # The 300-epoch recipe at 1/100: warm-up 5 -> 0.05, x0.1 at 150/225 -> 1.5/2.25, ramp 2.25.
  assert (r.warmup_epochs, r.lr_boundaries, r.ramp_end_epoch) == (0.05, (1.5, 2.25), 2.25)
  assert r.kd_start_epoch == 2.0
  text = resolve.milestones(r, steps_per_epoch=100)
  assert "3 epochs of 100 steps" in text and "epochs 1.5 (step 150), 2.25 (step 225)" in text
  assert "ramp to 0.9 ends at epoch 2.25 (step 225)" in text and "from epoch 2 (step 200)" in text
  unscaled = resolve.resolve_config(cifar.get_config())
  assert unscaled.lr_boundaries == (150, 225) and unscaled.warmup_epochs == 5.0


def test_dtype_follows_the_platform_unless_set():
  assert resolve.resolve_config(cifar.get_config(), platform="tpu").dtype == "bfloat16"
  assert resolve.resolve_config(cifar.get_config(), platform="cpu").dtype == "float32"
  config = cifar.get_config()
  with config.unlocked():
    config.dtype = "float32"
  assert resolve.resolve_config(config, platform="gpu").dtype == "float32"


def test_the_config_check_ignores_the_run_group_as_a_whole():
  saved = digits.get_config("local").to_dict()
  current = digits.get_config("local")
  with current.unlocked():
    current.run.worker_count, current.run.max_eval_steps = 7, 3  # any run field, no list
    current.update_every = 8
  assert checkpoints.config_diff(saved, current.to_dict()) == [
    "update_every: 4 (workdir) -> 8 (this run)"
  ]


# --------------------------------------------------------------------------------------------
# restore_or_init and the loop in process


def local_config(**overrides):
  config = digits.get_config("local")
  with config.unlocked():
    config.num_train_steps = 22
    config.run.progress = False
    config.update_from_flattened_dict(overrides)
  return config


def test_restore_or_init_starts_fresh_then_restores_the_newest_checkpoint(tmp_path):
  config = resolve.resolve_config(local_config())
  mesh = sharding.make_mesh()
  fresh = run_state.create_train_state(config, mesh, steps_per_epoch=11)
  saver = checkpoints.RunCheckpointer(tmp_path / "checkpoints", async_save=False)
  start = train.restore_or_init(config, tmp_path, saver, fresh, lead=True)
  assert start.step == 0 and start.data_position is None and start.state is fresh
  assert json.loads((tmp_path / "config.json").read_text())["model"] == "small_cnn"

  moved = fresh.replace(step=fresh.step + 5, rng=jax.random.PRNGKey(9))
  meta = {"data": {"pos": 5}, "pending_train": [{"loss": 1.5}], "nonfinite": [1, 0]}
  saver.save(5, run_state.checkpoint_tree(moved), meta | {"config": config.to_dict()})
  start = train.restore_or_init(config, tmp_path, saver, fresh, lead=True)
  assert (start.step, start.data_position, start.pending, start.nonfinite) == (
    5,
    {"pos": 5},
    [{"loss": 1.5}],
    (1, 0),
  )
  assert int(start.state.step) == int(moved.step)
  np.testing.assert_array_equal(
    jax.random.key_data(start.state.rng), jax.random.key_data(moved.rng)
  )
  saver.close()


@pytest.fixture(scope="module")
def guarded_run(tmp_path_factory):
  """A DCIL run of 22 steps (2 epochs) that logs, evaluates and checkpoints only after the last
  step. Its loop runs under ``jax.transfer_guard("disallow")`` (an implicit host-to-device
  transfer raises), and every device-to-host read of an array (``float(x)``, ``np.asarray``,
  ``jax.device_get``, ...) is recorded between the steps it falls between."""
  workdir = tmp_path_factory.mktemp("guarded")
  events = []
  array_type = type(jnp.zeros(()))
  read = array_type._value  # the property every host read of a jax.Array goes through
  compile_step = run_state.compile_train_step

  def counted_compile(state, batch):
    step_fn = compile_step(state, batch)

    def counted_step(state, batch):
      events.append("step")
      return step_fn(state, batch)

    counted_step.memory_analysis = step_fn.memory_analysis  # for the loop's memory check
    return counted_step

  config = local_config(
    log_every_steps=22, ramp_end_epoch=1.0, kd_start_epoch=1.0, **{"run.eval_every_epochs": 100}
  )
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(array_type, "_value", property(lambda x: (events.append("read"), read.fget(x))[1]))
    mp.setattr(run_state, "compile_train_step", counted_compile)
    # Set-up before the loop, the evaluation, the checkpoint (orbax's writes) and the summary
    # after it move data between host and device by design; the steps must not.
    for owner, name in (
      (run_state, "create_train_state"),
      (train, "restore_or_init"),
      (train.Evaluator, "__call__"),
      (train.CheckpointPolicy, "save"),
      (train, "summarize"),
    ):
      mp.setattr(owner, name, _allowing_transfers(getattr(owner, name)))
    with jax.transfer_guard("disallow"):
      summary = train.train_and_evaluate(config, str(workdir))
  return summary, events, workdir


def _allowing_transfers(fn):
  def wrapped(*args, **kwargs):
    with jax.transfer_guard("allow"):
      return fn(*args, **kwargs)

  return wrapped


def test_the_loop_makes_no_host_transfer_per_step(guarded_run):
  summary, events, _ = guarded_run
  assert summary["steps"] == 22 and events.count("step") == 22
  first, last = events.index("step"), len(events) - 1 - events[::-1].index("step")
  between = events[first:last]
  # Not one read of a device array from the first step to the last: the loop never waits for
  # the devices per step. The reads come after the last step (log, eval, checkpoint, summary).
  assert "read" not in between, between
  assert "read" in events[last:]


def test_the_loop_summary_has_the_deployable_sparsity(guarded_run):
  summary, _, workdir = guarded_run
  assert summary["sparsity"] == pytest.approx(0.9, abs=1e-3)
  assert summary["exported_zero_fraction"] == pytest.approx(summary["sparsity"], abs=1e-3)
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["split"] == "train"] == [22]
  refresh_steps = [r["step"] for r in records if r["split"] == "refresh"]
  # Every update_every=4 steps, recorded at the step that first trains with the new masks
  # (1-based steps 5, 9, ...; step 1's masks are the ones init computed).
  assert refresh_steps == list(range(5, 23, 4))


def test_the_loop_summary_has_the_deployable_model_counts(guarded_run):
  """``deploy``: kept parameters, MACs and bytes of the exported sparse path, consistent with the
  final masks (``layer_sparsity``) and the model's shapes."""
  from dcil_jax.models import create_model

  summary, _, _ = guarded_run
  deploy = summary["deploy"]
  keys = {"params", "kept_params", "macs", "kept_macs", "dense_bytes", "compressed_bytes"}
  assert set(deploy) == keys and all(isinstance(deploy[k], int) for k in keys)
  assert deploy["params"] == summary["num_params"]
  assert 0 < deploy["kept_macs"] < deploy["macs"]
  assert 0 < deploy["compressed_bytes"] < deploy["dense_bytes"]
  assert deploy["dense_bytes"] >= 4 * deploy["params"]  # float32 params, plus BN statistics
  # kept = (1 - s) x prunable + the rest, from the model's own shapes.
  model = create_model("small_cnn", 10)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1))))
  sizes = {
    jax.tree_util.keystr(path): leaf.size
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes["params"])[0]
  }
  layers = {k.removeprefix("['prunable']"): v for k, v in summary["layer_sparsity"].items()}
  prunable = sum(sizes[k] for k in layers)
  assert deploy["params"] == sum(sizes.values())
  pruned = sum(round(sizes[k] * s) for k, s in layers.items())
  assert deploy["kept_params"] == deploy["params"] - pruned
  for s, tolerance in ((summary["sparsity"], 1), (0.9, 1e-3 * prunable)):  # achieved, target
    expected = (1 - s) * prunable + deploy["params"] - prunable
    assert deploy["kept_params"] == pytest.approx(expected, abs=tolerance)
