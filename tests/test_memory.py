"""Memory that scales to large batches: gradient accumulation (``config.train.grad_accum_steps``),
rematerialisation (``config.model.remat``) and the compiled train step's memory in msdfuse-bench.

Tiny models on random images; the figures for the real presets are in docs/training.md ("Memory").
"""

import json
import os
import subprocess

import jax
import ml_collections
import numpy as np
import pytest

from configs import cifar
from msdfuse_jax import models, optim, parallel, rundir, train
from msdfuse_jax import train_state as ts
from msdfuse_jax.tools import bench_main as bench
from tests.conftest import REPO, tool_command

MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)


def tiny_config(**train_fields) -> ml_collections.ConfigDict:
  """msdnet_tiny, a global batch of 32 in 4 shards of 8 (all on this one device), no Mixup."""
  config = cifar.get_config("dataset=cifar10,model=msdnet_tiny,runlocal")
  config.aug.mixup_alpha = config.aug.cutmix_alpha = 0.0
  config.train.batch_size, config.train.num_shards = 32, 4
  config.train.update(train_fields)
  return config


def compiled_step(config, images, labels):
  """The compiled train step of `config` (as `make_steps` binds it) and its data arguments."""
  plan = train.make_plan(config.train, len(images))
  model = models.from_config(config)
  tx = optim.create_optimizer(config.optim, lambda step: 0.05)
  p_train_step, _ = train.make_steps(model, tx, config.aug, plan, np.ones(model.num_exits, np.float32),
                                     MEAN, STD, 10)
  state = parallel.replicate(ts.init_train_state(model, tx, jax.random.PRNGKey(0)))
  feed = train.DeviceFeed(images, labels, 0, plan)
  rest = (parallel.stop_votes(False), parallel.replicate(jax.random.PRNGKey(1)))
  return p_train_step.lower(state, *feed(0), *rest).compile(), state, feed, rest


def test_grad_accum_steps_compute_the_same_steps_with_less_memory():
  # 4 shards on one device: one vmap over the 4, or a scan over 2 groups of a vmap over 2. Same shards
  # (BatchNorm statistics and augmentation keys per shard), so the same steps up to float summation order.
  # This tiny net on noise amplifies a rounding difference ~250x a step (seen: 2.0e-6 after step 1,
  # 4.9e-4 after step 2, 2.5e-2 after step 3), so step 1 is held to rounding and step 2 to its amplified
  # rounding; a shard that shared another's BatchNorm statistics would be off by 1e-2 after step 1.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 64).astype(np.int32)
  results, temp = {}, {}
  for accum in (1, 2):
    step, state, feed, rest = compiled_step(tiny_config(grad_accum_steps=accum), images, labels)
    temp[accum] = step.memory_analysis().temp_size_in_bytes
    results[accum] = [parallel.to_host(state).to_checkpoint()]
    for i in range(2):
      state, metrics, _ = step(state, *feed(i), *rest)
      results[accum].append((parallel.to_host(state).to_checkpoint(), parallel.to_host(metrics)))
  start = results[1][0]
  for i, atol in ((1, 1e-5), (2, 2e-3)):
    (one, one_metrics), (two, two_metrics) = results[1][i], results[2][i]
    assert int(one["step"]) == int(two["step"]) == i
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(two)):
      np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    np.testing.assert_array_equal(one_metrics["count"], two_metrics["count"])
    np.testing.assert_allclose(one_metrics["loss"], two_metrics["loss"], rtol=1e-5)
  moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(results[1][1][0]),
                                                            jax.tree.leaves(start)))
  assert moved > 1e-2  # one step changes the state far beyond the step-1 tolerance
  # One group's activations alive at a time: about half the scratch memory (0.51x seen).
  assert temp[2] <= 0.6 * temp[1], temp


@pytest.mark.parametrize("accum, message", [
    (3, r"config.train.grad_accum_steps=3 must divide the 4 batch shards per device \(4 shards on 1 "
        r"device\); set config.train.num_shards to a multiple of 3"),
    (0, r"config.train.grad_accum_steps=0 must be a positive integer"),
    (True, r"config.train.grad_accum_steps=True must be a positive integer"),
])
def test_grad_accum_steps_that_do_not_divide_the_shards_are_a_config_error(accum, message):
  config = tiny_config(grad_accum_steps=accum)
  with pytest.raises(train.ConfigError, match=message):
    train.make_plan(config.train, 1000)
  assert train.make_plan(tiny_config(grad_accum_steps=4).train, 1000).grad_accum_steps == 4
  assert train.make_plan(tiny_config().train, 1000).grad_accum_steps == 1  # the default


def test_cli_grad_accum_steps_error_is_one_line(tmp_path):
  data = REPO.parent / "shared" / "data" / "cifar-10-python-subset.tar.gz"
  if not data.exists():
    pytest.skip(f"{data} not found")
  proc = subprocess.run(
      tool_command("train_main", f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal",
                   "--config.data.source=archive", f"--config.data.path={data}",
                   "--config.train.num_shards=2", "--config.train.grad_accum_steps=4",
                   f"--workdir={tmp_path}/run"),
      capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: config.train.grad_accum_steps=4 must divide the 2 batch shards per device (2 shards on 1 "
      "device); set config.train.num_shards to a multiple of 4")


def _primitives(jaxpr) -> list[str]:
  return [eqn.primitive.name for eqn in jaxpr.eqns]


@pytest.mark.parametrize("name", ["msdnet_tiny", "msdfuse_tiny", "ranet_tiny", "resnet_mc_tiny",
                                  "densenet_mc_tiny"])
def test_remat_wraps_every_stage_in_training_mode_only(name):
  # Traced, not compiled: one rematerialised call per stage (exit) in training mode, none in eval mode,
  # and the same variables (names and shapes) either way.
  plain, remat = models.build_model(name, 10), models.build_model(name, 10, remat=True)
  variables = jax.eval_shape(models.initializer(plain), jax.random.PRNGKey(0))
  assert jax.eval_shape(models.initializer(remat), jax.random.PRNGKey(0)) == variables
  x = np.zeros((2, 32, 32, 3), np.float32)

  def trace(model, train):
    return _primitives(jax.make_jaxpr(lambda v: model.apply(v, x, train=train, mutable=["batch_stats"]))(
        variables).jaxpr)
  without, with_remat = trace(plain, True), trace(remat, True)
  added = set(with_remat) - set(without)
  assert len(added) == 1, added  # the remat primitive (its name differs between JAX versions)
  assert with_remat.count(added.pop()) == plain.num_exits
  assert trace(remat, False) == trace(plain, False)


def test_remat_is_a_bool_and_a_run_resumes_with_either_setting(tmp_path):
  with pytest.raises(ValueError, match="remat must be True or False, got 1"):
    models.build_model("msdnet_tiny", 10, remat=1)
  config = tiny_config()
  rundir.save_config(str(tmp_path), config)
  config.model.remat = True  # the same parameters: the workdir's run goes on
  train._check_saved_config(config, str(tmp_path))  # pylint: disable=protected-access
  config.model.growth_rate += 2  # another architecture: refused
  with pytest.raises(train.ConfigError, match="another --workdir"):
    train._check_saved_config(config, str(tmp_path))  # pylint: disable=protected-access


def test_remat_gives_the_same_gradients():
  config = tiny_config()
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, 16).astype(np.int32)
  out = {}
  for remat in (False, True):
    model = models.build_model("msdnet_tiny", 10, remat=remat)
    variables = models.init_variables(model, jax.random.PRNGKey(0))
    fn = jax.jit(lambda p, s, model=model: train.loss_and_grads(
        p, s, images, labels, jax.random.PRNGKey(3), model=model, aug=config.aug, mean=MEAN, std=STD,
        num_classes=10, weights=np.ones(model.num_exits, np.float32)))
    out[remat] = jax.device_get(fn(variables["params"], variables["batch_stats"]))
  assert jax.tree.structure(out[True]) == jax.tree.structure(out[False])
  for a, b in zip(jax.tree.leaves(out[True]), jax.tree.leaves(out[False])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # gradients, BatchNorm statistics, metrics


def bench_compile(tmp_path, name, *overrides):
  out = tmp_path / f"{name}.json"
  # With the tools' tuned XLA:CPU flags, which keep the optimisation barriers that remat relies on.
  proc = subprocess.run(
      tool_command("bench_main", f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny",
                   "--batch_size=32", "--config.train.num_shards=2", *overrides, "--compile_only",
                   "--compilation_cache", f"--json={out}", tuned_cpu_flags=True),
      capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "train step memory" in proc.stdout and "not run" in proc.stdout
  return json.loads(out.read_text())


@pytest.mark.slow
def test_bench_compile_only_reports_the_step_memory_and_remat_lowers_it(tmp_path):
  plain = bench_compile(tmp_path, "plain")
  remat = bench_compile(tmp_path, "remat", "--config.model.remat=True")
  for report in (plain, remat):
    assert report["model"] == "msdnet_tiny" and report["batch_size"] == 32
    assert report["num_shards"] == 2 and report["grad_accum_steps"] == 1
    for key in ("step_temp_memory_mb", "step_argument_memory_mb", "step_output_memory_mb"):
      assert report[key] > 0, key
    assert "train_images_per_s" not in report  # nothing ran
  assert plain["remat"] is False and remat["remat"] is True
  assert remat["step_argument_memory_mb"] == plain["step_argument_memory_mb"]  # the same state and batch
  # Each stage's activations recomputed in the backward pass instead of kept (0.58x seen).
  assert remat["step_temp_memory_mb"] <= 0.75 * plain["step_temp_memory_mb"], (remat, plain)


def test_step_memory_reads_the_compiled_programs_analysis():
  class Analysis:
    temp_size_in_bytes, argument_size_in_bytes, output_size_in_bytes = 3 * 2**20, 2**19, 2**21

  class Compiled:
    def __init__(self, analysis):
      self.analysis = analysis

    def memory_analysis(self):
      return self.analysis

  got = bench.step_memory(Compiled(Analysis()))
  assert (got["step_temp_memory_mb"], got["step_argument_memory_mb"], got["step_output_memory_mb"]) == (
      3.0, 0.5, 2.0)
  assert got["step_memory_source"].startswith("compiled.memory_analysis() on ")
  assert bench.step_memory(Compiled(None))["step_temp_memory_mb"] is None
