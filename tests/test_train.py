"""Training: schedule, decay mask, metrics, batch layout, both input pipelines, resume, SIGTERM, bad inputs,
the CLI (several devices and processes: test_multiprocess.py).

Hermetic and CPU-only: the tiny model on the real CIFAR-10 subset from ../shared/data (archive source).
The runs share one config where they can, so that the persistent compilation cache (tests/conftest.py)
compiles each step once.
"""

import json
import multiprocessing
import os
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import cifar
from msdfuse_jax import checkpoints, metrics, models, parallel, preemption, rundir, train, xla_flags
from msdfuse_jax.data import cifar as cifar_data
from msdfuse_jax.data import order, sources
from msdfuse_jax import optim
from msdfuse_jax import train_state as ts
from tests.conftest import REPO, shared_file, tool_command

C10 = ("data", "cifar-10-python-subset.tar.gz")
STEPS = 80


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
  """msdnet_tiny on the CIFAR-10 subset, 80 steps of 2 shards of 16 (the vmap path on 1 device).

  Every run of this module that trains uses this config, so the train and eval steps compile once (the
  settings below that change between tests are host-side only: logging, evaluation, checkpoints).
  """
  config = cifar.get_config("dataset=cifar10,model=msdnet_tiny,runlocal")
  config.data.source = "archive"
  config.data.path = str(shared_file(*C10))
  config.aug.mixup_alpha = config.aug.cutmix_alpha = 0.0  # a clean signal in few steps
  config.optim.learning_rate = 0.2
  config.train.batch_size = 32
  config.train.num_shards = 2
  config.train.num_steps = STEPS
  config.train.log_every_steps = 20
  config.train.eval_every_steps = 1000  # evaluation at the end only
  config.train.checkpoint_every_steps = 40
  config.eval.batch_size = 512
  # The steps between two log points run with implicit host<->device transfers forbidden: only the
  # explicit ones (the stream pipeline's batches, the metrics and votes read back) may cross.
  config.train.transfer_guard = "disallow"
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def params_of(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(state.params)]


class StopAt(preemption.Preemption):
  """A preemption that arrives after a given step, as SIGTERM would."""

  def __init__(self, step):
    super().__init__()
    self.step = step

  def reached(self, step):
    return step == self.step or super().reached(step)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """The reference run of `tiny_config()`: its workdir and final parameters."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  state = train.train_and_evaluate(tiny_config(), str(workdir))
  return workdir, params_of(state)


# ---- pure pieces ------------------------------------------------------------------------------------------


def test_exit_metrics_known_answers():
  # Exit 1 is right on both samples, exit 2 on the first only; the second sample is padding.
  logits = (jnp.array([[2.0, 0.0], [0.0, 2.0]]), jnp.array([[1.0, 0.0], [1.0, 0.0]]))
  labels = jnp.array([0, 1])
  targets = jax.nn.one_hot(labels, 2)
  sums = metrics.exit_metrics(logits, targets, labels)
  ce_2_0 = np.log1p(np.exp(-2.0))  # cross-entropy of the right class at logit margin 2
  ce_1_0 = np.log1p(np.exp(-1.0))
  np.testing.assert_allclose(sums["loss"], [2 * ce_2_0, ce_1_0 + np.log1p(np.exp(1.0))], rtol=1e-6)
  np.testing.assert_allclose(sums["correct"], [2, 1])
  assert float(sums["count"]) == 2
  masked = metrics.exit_metrics(logits, targets, labels, mask=jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(masked["correct"], [1, 1])
  out = metrics.summarize(jax.tree.map(np.asarray, masked), np.array([1.0, 0.5]), "val")
  assert out["val/accuracy_exit1"] == 1.0 and out["val/accuracy_exit2"] == 1.0
  np.testing.assert_allclose(out["val/loss"], ce_2_0 + 0.5 * ce_1_0, rtol=1e-6)
  with pytest.raises(ValueError, match="3 entries but the model has 2 exits"):
    metrics.exit_weights((1, 1, 1), 2)


def test_every_epoch_visits_each_example_once_in_a_seeded_order():
  n, batch_size, shard_batch = 20, 6, 3  # 3 full batches an epoch, 2 examples left over
  dataset = {"image": jnp.arange(n)[:, None, None, None] * jnp.ones((1, 2, 2, 3), jnp.int32),
             "label": jnp.arange(n, dtype=jnp.int32)}
  seen = []
  for epoch in range(2):
    perm = order.epoch_permutation(seed=7, epoch=epoch, n=n)
    for step in range(epoch * 3, epoch * 3 + 3):
      batch = train.gather_batch(dataset, jnp.asarray(perm), jnp.int32(step), jnp.arange(2),
                                 steps_per_epoch=3, batch_size=batch_size, shard_batch=shard_batch)
      assert batch["image"].shape == (2, 3, 2, 2, 3)
      np.testing.assert_array_equal(batch["image"][..., 0, 0, 0], batch["label"])
      # The stream pipeline's host reader picks the same rows, also for one shard at a time.
      for shards in (range(0, 2), range(1, 2)):
        np.testing.assert_array_equal(
            order.batch_rows(perm, step, 3, batch_size, shards, shard_batch),
            np.asarray(batch["label"])[shards.start:shards.stop])
      seen.append(np.asarray(batch["label"]).ravel())
  first, second = np.concatenate(seen[:3]), np.concatenate(seen[3:])
  assert len(set(first)) == 18 and len(set(second)) == 18  # no repeats within an epoch
  assert not np.array_equal(first, second)  # a new order every epoch
  np.testing.assert_array_equal(order.epoch_permutation(7, 1, n), order.epoch_permutation(7, 1, n))


def test_batch_layout_errors_name_the_fields():
  config = tiny_config()
  with pytest.raises(train.ConfigError, match="multiple of the 2 batch shards"):
    train.make_plan(ml_collections.ConfigDict({**config.train.to_dict(), "batch_size": 15}), 1000)
  with pytest.raises(train.ConfigError, match="larger than the 10 training images"):
    train.make_plan(config.train, 10)


def test_sigterm_sets_the_stop_flag_and_the_handler_is_restored():
  before = signal.getsignal(signal.SIGTERM)
  with preemption.Preemption() as stop:
    assert not stop.reached(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)  # the handler runs between bytecodes of the main thread
    assert stop.reached(2)
  assert signal.getsignal(signal.SIGTERM) is before


def test_tuned_cpu_flags_keep_what_the_user_set(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=individual_dot --xla_foo=1")
  xla_flags.use_fast_cpu_flags()
  flags = os.environ["XLA_FLAGS"].split()
  assert flags[:2] == ["--xla_cpu_experimental_ynn_fusion_type=individual_dot", "--xla_foo=1"]
  assert "--xla_cpu_experimental_ynn_fusion_type=" not in flags
  assert set(xla_flags.CPU_XLA_FLAGS[1:]) <= set(flags)
  xla_flags.use_fast_cpu_flags()  # idempotent
  assert os.environ["XLA_FLAGS"].split() == flags


# ---- runs -------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_run_on_the_cifar10_subset_learns(uninterrupted):
  workdir, _ = uninterrupted
  final = json.loads((workdir / rundir.FINAL_METRICS_FILE).read_text())
  assert final["step"] == STEPS
  num_exits = 3
  # The loss starts at about ln(10) per exit; the last 20 train steps (augmented, smoothed) and the clean
  # held-out sets are clearly below that after 80 steps.
  assert final["train/loss"] < 0.96 * num_exits * np.log(10), final
  assert final["test/loss"] < 0.92 * num_exits * np.log(10), final
  assert final["val/loss"] < 0.92 * num_exits * np.log(10), final
  for k in range(1, num_exits + 1):  # chance is 10 %
    assert final[f"test/accuracy_exit{k}"] > 0.15, final
    assert final[f"val/accuracy_exit{k}"] > 0.15, final
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["40", "80"]
  assert rundir.load_config(str(workdir)).model.name == "msdnet_tiny"
  assert (workdir / rundir.VAL_SPLIT_FILE).exists()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir))


def test_the_run_writes_its_parameter_table(uninterrupted):
  workdir, params = uninterrupted
  table = (workdir / rundir.PARAMETERS_FILE).read_text()
  total = sum(int(np.size(p)) for p in params)
  # clu's table: one row per array (name, shape, size, mean, std) and the total on its last line.
  assert f"Total: {total:,}" in table, table[-500:]
  assert "block1/layer0/scale1/conv/kernel" in table and "Std" in table.splitlines()[1]


def interrupted_run(workdir, step: int) -> list[np.ndarray]:
  """Runs `tiny_config()` in `workdir` until a preemption after `step`; returns the parameters it saved."""
  with pytest.raises(train.Preempted, match=f"after step {step} of {STEPS}"):
    train.train_and_evaluate(tiny_config(), str(workdir), preemption=StopAt(step))
  saved_step, saved = checkpoints.restore(str(workdir))
  assert saved_step == step and os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]
  return [np.asarray(x) for x in jax.tree.leaves(saved["params"])]


@pytest.mark.slow
def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, uninterrupted):
  _, reference = uninterrupted
  workdir = tmp_path / "run"
  interrupted_run(workdir, 30)  # mid-epoch, between log, eval and checkpoint steps
  resumed = train.train_and_evaluate(tiny_config(), str(workdir))
  assert int(resumed.step) == STEPS
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["30", "40", "80"]
  for got, want in zip(params_of(resumed), reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Running the finished run again is a no-op.
  again = train.train_and_evaluate(tiny_config(), str(workdir))
  assert int(again.step) == STEPS


@pytest.mark.slow
def test_stream_pipeline_trains_and_resumes_to_the_device_pipelines_result(tmp_path, uninterrupted):
  # The host reader picks the rows the device gather picks and the augmentation keys are the same, so
  # a stream run, stopped mid-epoch and resumed, ends where the device pipeline's uninterrupted run ends,
  # whether grain worker processes read the batches (the first part) or threads (the second).
  _, reference = uninterrupted
  config = tiny_config()
  config.data.pipeline = "stream"
  config.data.workers = 2
  workdir = tmp_path / "stream"
  with pytest.raises(train.Preempted, match=f"after step 30 of {STEPS}"):
    train.train_and_evaluate(config, str(workdir), preemption=StopAt(30))
  assert multiprocessing.active_children() == []  # the stopped run joined its workers
  config.data.workers = 0
  resumed = train.train_and_evaluate(config, str(workdir))
  assert int(resumed.step) == STEPS
  for got, want in zip(params_of(resumed), reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_stream_batches_do_not_depend_on_the_process_count():
  # Resuming at step 5 with 1 process reading all 4 shards, or with 2 processes reading 2 each (what a
  # 4-process run's processes read is the same split again), gives every step the same global batch.
  from msdfuse_jax.data import stream  # pylint: disable=import-outside-toplevel
  n = 40
  source = stream.ArraySource(np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 2, 3),
                                                                                          np.uint8),
                              np.arange(n, dtype=np.int32))
  plan = train.Plan(num_shards=4, shard_batch=2, batch_size=8, steps_per_epoch=5, total_steps=12)
  whole = list(stream.host_batches(source, 3, plan, 5, shards=range(0, 4)))
  halves = [list(stream.host_batches(source, 3, plan, 5, shards=shards)) for shards in (range(0, 2),
                                                                                        range(2, 4))]
  assert len(whole) == 7 and [len(h) for h in halves] == [7, 7]
  for step, (batch, first, second) in enumerate(zip(whole, *halves), start=5):
    assert batch["image"].shape == (4, 2, 2, 2, 3) and batch["label"].shape == (4, 2)
    np.testing.assert_array_equal(batch["image"][..., 0, 0, 0], batch["label"])
    np.testing.assert_array_equal(np.concatenate([first["label"], second["label"]]), batch["label"])
    perm = order.epoch_permutation(3, step // 5, n)
    np.testing.assert_array_equal(batch["label"].ravel(), perm[(step % 5) * 8:][:8])


def test_unknown_pipeline_is_a_config_error(tmp_path):
  config = tiny_config()
  config.data.pipeline = "disk"
  with pytest.raises(train.ConfigError, match="config.data.pipeline='disk' is not one of"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_non_finite_loss_stops_without_saving(tmp_path):
  # Resume from a checkpoint whose parameters are NaN (the same compiled step as the other runs).
  config = tiny_config(log_every_steps=1, checkpoint_every_steps=1)
  model = models.from_config(config)
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  state = ts.init_train_state(model, tx, jax.random.PRNGKey(0))
  state = state.replace(step=jnp.int32(4), params=jax.tree.map(lambda p: p * np.nan, state.params))
  checkpoints.save(checkpoints.manager(str(tmp_path)), 4, state.to_checkpoint())
  with pytest.raises(train.NonFiniteLossError, match="non-finite loss at step 5.*last good checkpoint is "
                     "step 4"):
    train.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path / "checkpoints") == ["4"]


@pytest.mark.slow
def test_bad_inputs_raise_their_own_errors(tmp_path):
  config = tiny_config()
  config.data.path = str(tmp_path / "missing.tar.gz")
  with pytest.raises(sources.DataError, match="missing.tar.gz"):
    train.train_and_evaluate(config, str(tmp_path / "a"))
  config = tiny_config()
  config.model.name = "nope"
  with pytest.raises(train.ConfigError, match="unknown model 'nope'"):
    train.train_and_evaluate(config, str(tmp_path / "b"))
  # A workdir belongs to one model.
  rundir.save_config(str(tmp_path / "c"), tiny_config())
  other = cifar.get_config("dataset=cifar10,model=msdfuse_tiny,runlocal")
  with pytest.raises(train.ConfigError, match="another --workdir"):
    train.train_and_evaluate(other, str(tmp_path / "c"))


@pytest.mark.slow
def test_imported_weights_start_a_fresh_optimizer(tmp_path):
  config = tiny_config()
  model = models.from_config(config)
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  imported = ts.init_train_state(model, tx, jax.random.PRNGKey(42))
  checkpoints.save(checkpoints.manager(str(tmp_path)), 0,
                   {"step": 0, "params": imported.params, "batch_stats": imported.batch_stats})
  fresh = ts.init_train_state(model, tx, jax.random.PRNGKey(0))
  state, how = ts.restore_or_init(str(tmp_path), fresh)
  assert how == "imported" and int(state.step) == 0
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(imported.params)):
    np.testing.assert_array_equal(got, want)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(fresh.opt_state)


def test_resuming_restores_into_the_shapes_without_initialising(tmp_path, uninterrupted):
  workdir, final = uninterrupted
  config = tiny_config()
  model = models.from_config(config)
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  like = ts.abstract_train_state(model, tx)
  calls = []
  make = lambda: calls.append(1) or ts.init_train_state(model, tx, jax.random.PRNGKey(0))
  state, how = ts.restore_or_init(str(workdir), make, like=like)
  assert how == "resumed" and int(state.step) == STEPS and not calls
  for got, want in zip(params_of(state), final):
    np.testing.assert_array_equal(got, want)
  assert jax.tree.structure(state) == jax.tree.structure(like)
  state, how = ts.restore_or_init(str(tmp_path), make, like=like)  # no checkpoint: the fresh state
  assert how == "fresh" and calls == [1] and int(state.step) == 0
  with pytest.raises(ValueError, match="give `like`"):
    ts.restore_or_init(str(tmp_path), make)


def _corrupt(step_dir) -> None:
  """Overwrites every data file of a checkpoint step, as a disk error or a killed copy would."""
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage" * 7)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_set_aside_and_the_run_continues(tmp_path, uninterrupted):
  _, reference = uninterrupted
  workdir = tmp_path / "run"
  with pytest.raises(train.Preempted, match="after step 40"):
    train.train_and_evaluate(tiny_config(checkpoint_every_steps=20), str(workdir), preemption=StopAt(40))
  assert sorted(os.listdir(workdir / "checkpoints"), key=int) == ["20", "40"]
  _corrupt(workdir / "checkpoints" / "40")
  # Evaluation reads the newest readable step and leaves the workdir as it is.
  _, step = checkpoints.load_variables(str(workdir))
  assert step == 20 and (workdir / "checkpoints" / "40").exists()
  # Training resumes from step 20, moves step 40 aside, and saves step 40 again when it gets there.
  resumed = train.train_and_evaluate(tiny_config(checkpoint_every_steps=20), str(workdir))
  assert int(resumed.step) == STEPS
  assert "40" in os.listdir(workdir / "checkpoints")
  aside = os.listdir(workdir / rundir.UNREADABLE_CHECKPOINT_DIR)
  assert len(aside) == 1 and aside[0].startswith("40-")
  for got, want in zip(params_of(resumed), reference):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_every_unreadable_checkpoint_is_an_error_and_nothing_is_moved(tmp_path):
  config = tiny_config()
  model = models.from_config(config)
  tx = optim.create_optimizer(config.optim, lambda step: 0.1)
  state = ts.init_train_state(model, tx, jax.random.PRNGKey(0))
  checkpoints.save(checkpoints.manager(str(tmp_path)), 3, state.replace(step=jnp.int32(3)).to_checkpoint())
  _corrupt(tmp_path / "checkpoints" / "3")
  with pytest.raises(checkpoints.CheckpointError, match="no readable checkpoint.*step 3"):
    ts.restore_or_init(str(tmp_path), state)
  assert os.listdir(tmp_path / "checkpoints") == ["3"]


@pytest.mark.slow
def test_every_shard_of_a_step_gets_its_own_augmentation():
  # Two shards holding the same 16 images: with one key for both they would see the same crops and flips,
  # and the step's summed loss would be twice shard 0's. It must be shard 0's loss under the key folded
  # with global shard id 0 plus shard 1's under id 1. The step is the one `tiny_config` training compiles
  # (same shapes and constants), so it comes from the compilation cache.
  config = tiny_config()
  data = cifar_data.load_cifar(config.dataset, config.data)
  model = models.from_config(config)
  n = len(data.train_images)
  images, labels = data.train_images[:16], data.train_labels[:16]
  dataset = {"image": data.train_images.copy(), "label": data.train_labels.copy()}
  dataset["image"][16:32], dataset["label"][16:32] = images, labels
  plan = train.make_plan(config.train, n)
  tx = optim.create_optimizer(config.optim, optim.learning_rate_schedule(config.optim, plan.steps_per_epoch,
                                                                         plan.total_steps))
  weights = np.ones(model.num_exits, np.float32)
  p_train_step, _ = train.make_steps(model, tx, config.aug, plan, weights, data.mean, data.std, 10)
  state = ts.init_train_state(model, tx, jax.random.PRNGKey(0))
  aug_rng = jax.random.PRNGKey(7)
  _, metrics, _ = p_train_step(parallel.replicate(state), parallel.replicate(dataset),
                               parallel.replicate(np.arange(n, dtype=np.int32)), parallel.stop_votes(False),
                               parallel.replicate(aug_rng))
  step_loss = parallel.to_host(metrics)["loss"]

  @jax.jit
  def shard_sums(shard_id):
    key = jax.random.fold_in(jax.random.fold_in(aug_rng, 0), shard_id)
    return train.loss_and_grads(state.params, state.batch_stats, images, labels, key, model=model,
                                aug=config.aug, mean=data.mean, std=data.std, num_classes=10,
                                weights=weights)[2]

  def shard_loss(shard_id):
    return np.asarray(shard_sums(jnp.int32(shard_id))["loss"])

  first, second = shard_loss(0), shard_loss(1)
  assert not np.allclose(first, second, rtol=1e-3)  # the two keys augment differently
  np.testing.assert_allclose(step_loss, first + second, rtol=1e-5)


@pytest.mark.slow
def test_sigterm_while_the_run_starts_stops_it_cleanly(tmp_path):
  config = f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal"
  proc = subprocess.Popen(
      tool_command("train_main", config, "--config.data.source=archive", f"--config.data.path={shared_file(*C10)}",
                   f"--workdir={tmp_path}/run"),
      stderr=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  lines, deadline = [], time.time() + 240
  try:
    for line in proc.stderr:  # wait until the data is loaded: initialisation and compilation follow
      lines.append(line)
      if "CIFAR-10:" in line or time.time() > deadline:
        break
    proc.send_signal(signal.SIGTERM)
    _, rest = proc.communicate(timeout=240)
  finally:
    proc.kill()
  err = "".join(lines) + rest
  assert proc.returncode == 128 + 15, err[-3000:]
  assert "stopped by SIGTERM before step 1 of 20; nothing to save" in err
  assert "Traceback" not in err
  assert not os.path.exists(tmp_path / "run" / "checkpoints") or not os.listdir(tmp_path / "run" / "checkpoints")


def test_a_config_json_of_an_older_version_without_new_model_fields_resumes(tmp_path):
  # boost_reweight did not exist when this run was saved: its preset value (0) is assumed, not a mismatch.
  config = tiny_config()
  saved = config.to_dict()
  del saved["model"]["boost_reweight"]
  rundir.write_json(str(tmp_path / rundir.CONFIG_FILE), saved)
  train._check_saved_config(config, str(tmp_path))  # pylint: disable=protected-access
  config.model.boost_reweight = 0.5
  with pytest.raises(train.ConfigError, match="another --workdir"):
    train._check_saved_config(config, str(tmp_path))  # pylint: disable=protected-access


def test_a_config_json_without_model_entry_is_reported_not_crashed(tmp_path):
  rundir.write_json(str(tmp_path / rundir.CONFIG_FILE), {"dataset": "cifar10"})
  with pytest.raises(train.ConfigError, match="another --workdir"):
    train.train_and_evaluate(tiny_config(), str(tmp_path))


# ---- the command line -------------------------------------------------------------------------------------


def run_cli(*args, cwd):
  return subprocess.run(tool_command("train_main", *args), capture_output=True,
                        text=True, cwd=cwd, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_cli_without_workdir_says_so(tmp_path):
  proc = run_cli(f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal", cwd=tmp_path)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --workdir is required")


def test_cli_missing_data_is_one_line_naming_the_file(tmp_path):
  proc = run_cli(f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal",
                 "--config.data.source=archive", f"--config.data.path={tmp_path}/nowhere.tar.gz",
                 f"--workdir={tmp_path}/run", cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "nowhere.tar.gz" in last


def test_an_implicit_transfer_in_a_step_is_caught_by_the_transfer_guard(tmp_path, monkeypatch):
  # The votes as a host array: jit would copy it to the device implicitly with every step.
  monkeypatch.setattr(parallel, "stop_votes",
                      lambda requested: np.full(jax.local_device_count(), int(requested), np.int32))
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    train.train_and_evaluate(tiny_config(), str(tmp_path / "run"))
  config = tiny_config(transfer_guard="sometimes")
  with pytest.raises(train.ConfigError, match="transfer_guard"):
    train.train_and_evaluate(config, str(tmp_path / "other"))
