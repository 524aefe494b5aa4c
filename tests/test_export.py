"""Exported early exit: BatchNorm folding, the model-free runtime, bad export directories, deadlines."""

import copy
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msdfuse_jax import exporting, folding, inference, models, serving
from msdfuse_jax.evaluation import budget, evaluate
from tests import test_evaluate as evaluate_tests
from tests import test_inference as inference_tests

# Folded against unfolded logits, the runtime against the simulation: float32's own precision on any backend.
pytestmark = pytest.mark.usefixtures("float32_matmuls")

# Every family, and MSDNet's ImageNet mode (its stem's convolution has a bias, which folding adds to).
FAMILIES = [("msdnet_tiny", 32), ("msdfuse_tiny", 32), ("ranet_tiny", 32), ("resnet_mc_tiny", 32),
            ("densenet_mc_tiny", 32), ("msdnet_imagenet_tiny", 32)]


def _trained_like(model, size, seed=0):
  """Variables as after training, without compiling an init: PyTorch-like uniform kernels, and BatchNorm
  scales, biases and running statistics far from their initial values (so that folding matters)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)

  def value(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      bound = 1.0 / np.sqrt(np.prod(leaf.shape[:-1]))
      return rng.uniform(-bound, bound, leaf.shape).astype(np.float32)
    lo, hi = (0.5, 1.5) if ("scale" in name or "var" in name) else (-0.2, 0.2)
    return rng.uniform(lo, hi, leaf.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(value, shapes)


@pytest.mark.parametrize("name,size", FAMILIES)
def test_folded_logits_equal_the_model_and_hold_no_batch_norm(name, size):
  model = models.build_model(name, 10)
  variables = _trained_like(model, size)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, size, size, 3))
  folded = folding.FoldedModel(model, variables, images)
  plain, fold = jax.jit(lambda x: (model.apply(variables, x), folded.apply(x)))(images)
  assert len(fold) == model.num_exits
  for a, b in zip(plain, fold):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-4)
  # Every conv -> BN pair is folded; the program has no normalisation left (no rsqrt, no statistics).
  assert folded.plan.folded > 0
  assert "batch_stats" not in folded.variables
  assert "rsqrt" not in jax.jit(folded.apply).lower(images).as_text()
  assert "rsqrt" in jax.jit(lambda x: model.apply(variables, x)).lower(images).as_text()
  if name.startswith("densenet"):
    # Pre-activation BatchNorms after a concatenation stay as scale and shift; the stem, whose output
    # the dense layers also concatenate, is not folded into the first layer's BatchNorm.
    assert folded.plan.folded < len(folded.plan.pairs)
    assert folded.plan.pairs[("block1_layer1", "bn1")] is None
  else:
    assert folded.plan.folded == len(folded.plan.pairs)


def test_folding_refuses_training_mode():
  model = models.build_model("msdnet_tiny", 10)
  variables = _trained_like(model, 32)
  folded = folding.FoldedModel(model, variables, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="inference mode only"):
    folded.apply(jnp.zeros((1, 32, 32, 3)), train=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """msdnet_tiny (random init) exported with batch 16 and 2 buckets, and what the simulation needs."""
  model = models.build_model("msdnet_tiny", 10)
  runner, test, val_probs, test_probs = inference_tests.early_exit_setup(model, num_buckets=2)
  out = str(tmp_path_factory.mktemp("export"))
  thresholds = budget.fit_thresholds(val_probs, 8)
  manifest = exporting.export_model(
      model, runner.variables, inference_tests.MEAN, inference_tests.STD, (32, 32, 3), out, thresholds,
      batch_size=16, num_buckets=2, chunk_batches=2, metadata={"model": "msdnet_tiny", "dataset": "cifar10"})
  return out, manifest, runner, test, val_probs, test_probs


def test_runtime_equals_the_in_process_runner_and_the_simulation(exported):
  out, manifest, in_process, test, val_probs, test_probs = exported
  runner = serving.Runner.from_dir(out)
  assert runner.buckets == [16, 8] and runner.pieces == 2 and runner.num_exits == 3
  assert manifest["batch_norm"]["max_logit_change"] < 1e-4
  # With the manifest's thresholds (p = 8), then with others: exits and predictions equal both.
  predictions, exits = runner(test)
  sim_exits, sim_preds = budget.apply_thresholds(test_probs, np.asarray(manifest["thresholds"]))
  np.testing.assert_array_equal(exits, sim_exits + 1)
  np.testing.assert_array_equal(predictions, sim_preds)
  for p in (2, 20, 35):
    thresholds = budget.fit_thresholds(val_probs, p)
    sim_exits, sim_preds = budget.apply_thresholds(test_probs, thresholds)
    result, reference = runner.run(test, thresholds), in_process.run(test, thresholds)
    np.testing.assert_array_equal(result.exits, sim_exits + 1)
    np.testing.assert_array_equal(result.predictions, sim_preds)
    np.testing.assert_array_equal(result.exits, reference.exits)
    np.testing.assert_array_equal(result.predictions, reference.predictions)
  # The folding check's figure was taken at float32's own precision, the programs at the backend's.
  assert manifest["matmul_precision"] == {"programs": "default", "folding_check": "highest",
                                          "thresholds": "highest"}
  # Per-stage times: one per stage and bucket.
  times = runner.stage_seconds(test, repeats=1)
  assert sorted(times) == [1, 2, 3] and all(sorted(t) == [8, 16] and min(t.values()) > 0
                                            for t in times.values())


def test_every_exit_and_simulate_are_the_run_of_the_same_programs(exported):
  """`Runner.simulate` (every stage on every image, decided on the host) equals `Runner.run` at any
  thresholds, and its per-stage outputs are the simulation's probabilities' confidences and argmaxes."""
  out, _, _, test, val_probs, test_probs = exported
  runner = serving.Runner.from_dir(out)
  with jax.transfer_guard("disallow"):  # every transfer of the runtime is explicit
    confidence, prediction = runner.every_exit(test)
    for p in (1, 8, 20, 39):
      thresholds = budget.fit_thresholds(val_probs, p)
      result = runner.run(test, thresholds)
      predictions, exits = runner.simulate(test, thresholds)
      np.testing.assert_array_equal(exits, result.exits)
      np.testing.assert_array_equal(predictions, result.predictions)
  assert confidence.shape == prediction.shape == (3, len(test))
  np.testing.assert_allclose(confidence, test_probs.max(-1), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(prediction, test_probs.argmax(-1))


@pytest.fixture(scope="module")
def both_runners(exported):
  """The export's runtime and the in-process runner it came from, each with its own deadline state."""
  runners = [serving.Runner.from_dir(exported[0]), copy.copy(exported[2])]
  for runner in runners:
    runner.stage_times, runner.observed = None, {}
  return runners


def test_a_deadline_below_the_first_stage_still_gives_exit_1_to_every_image(exported, both_runners):
  _, _, _, test, val_probs, test_probs = exported
  for runner in both_runners:
    result = runner.run(test, budget.fit_thresholds(val_probs, 35), deadline_ms=1e-3)
    np.testing.assert_array_equal(result.exits, np.ones(len(test)))
    np.testing.assert_array_equal(result.predictions, test_probs[0].argmax(-1))
    # A chunk is one batch (16 images) and says what it took: 70 images, 5 chunks, none in 1 us.
    assert result.chunk_size == 16 and result.deadline_ms == 1e-3
    assert [len(e) for e in result.chunk_exits] == [16, 16, 16, 16, 6]
    assert result.chunk_stages.tolist() == [1] * 5 and not result.deadline_met.any()
    np.testing.assert_allclose(result.overshoot_ms, 1e3 * result.chunk_seconds - 1e-3)
    # The table the deadline predicted from was measured once and kept: one time per stage and bucket.
    # A StageTimes, as `Runner.measure` keeps, so that a later `with_budget_ms` refits from it.
    assert sorted(runner.stage_times.seconds) == [1, 2, 3]
    assert all(sorted(t) == [8, 16] for t in runner.stage_times.seconds.values())


def test_a_huge_deadline_gives_the_run_without_one(exported, both_runners):
  _, _, _, test, val_probs, _ = exported
  for runner in both_runners:
    for p in (8, 30):
      thresholds = budget.fit_thresholds(val_probs, p)
      plain, anytime = runner.run(test, thresholds), runner.run(test, thresholds, deadline_ms=1e9)
      np.testing.assert_array_equal(anytime.exits, plain.exits)
      np.testing.assert_array_equal(anytime.predictions, plain.predictions)
      assert anytime.deadline_met.all() and len(anytime.chunk_seconds) == 5
      assert anytime.chunk_stages.tolist() == [e.max() for e in anytime.chunk_exits]
      # Without a deadline a chunk is `pieces` (2) batches.
      assert plain.deadline_ms is None and plain.chunk_size == 32 and len(plain.chunk_seconds) == 3


def test_the_deadline_stops_a_chunk_where_the_predicted_stage_would_not_fit(exported, both_runners):
  """With a stage table that says stage 3 takes 1000 s, a 100 s deadline runs stages 1 and 2 only: every
  image takes its own exit when that is 1 or 2, else exit 2 with stage 2's prediction."""
  _, _, _, test, val_probs, _ = exported
  thresholds = budget.fit_thresholds(val_probs, 30)
  for runner in both_runners:
    runner = copy.copy(runner)
    runner.stage_times = {1: {16: 0.0, 8: 0.0}, 2: {16: 0.0, 8: 0.0}, 3: {16: 1e3, 8: 1e3}}
    runner.observed = {}
    assert runner.predicted_seconds(3, 20) == 2e3 and runner.predicted_seconds(3, 5) == 1e3
    _, sim_exits = runner.simulate(test, thresholds)
    _, prediction = runner.every_exit(test)
    assert (sim_exits == 3).any() and (sim_exits < 3).any()
    result = runner.run(test, thresholds, deadline_ms=1e5)
    expected = np.minimum(sim_exits, 2)
    np.testing.assert_array_equal(result.exits, expected)
    np.testing.assert_array_equal(result.predictions, prediction[expected - 1, np.arange(len(test))])
    assert result.deadline_met.all() and set(result.chunk_stages.tolist()) <= {1, 2}
    # What the stages took is kept, and raises the next predictions (never below the table's).
    assert {k for k, _ in runner.observed} == {1, 2}
    for (k, bucket), seen in runner.observed.items():
      assert 0 < len(seen) <= serving.OBSERVED_WINDOW
      assert runner.predicted_seconds(k, bucket) == max(runner.stage_times[k][bucket],
                                                        np.quantile(seen, serving.OBSERVED_QUANTILE))


def test_a_deadline_that_is_not_a_positive_time_is_refused(exported, both_runners):
  for deadline in (0, -5.0, float("nan"), float("inf"), "soon"):
    with pytest.raises(ValueError, match=r"^the deadline must be a positive number of milliseconds per "
                                         rf"chunk, got {deadline}$"):
      both_runners[0].run(exported[3], deadline_ms=deadline)
  with pytest.raises(ValueError, match="this run had no deadline"):
    _ = both_runners[0].run(exported[3][:3]).overshoot_ms


def test_the_folding_check_runs_at_highest_precision(monkeypatch):
  """On a GPU (TF32) or a TPU (bfloat16 passes) the default precision's rounding is larger than the
  check's tolerance: both sides of the check are traced at "highest", whatever the default."""
  model = models.build_model("msdnet_tiny", 10)
  variables = _trained_like(model, 32)
  folded = folding.FoldedModel(model, variables, jnp.zeros((1, 32, 32, 3)))
  seen = []
  apply = folded.apply
  monkeypatch.setattr(folded, "apply", lambda *a, **k: seen.append(jax.config.jax_default_matmul_precision)
                      or apply(*a, **k))
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  with jax.default_matmul_precision("bfloat16"):
    error = exporting.check_folding(model, variables, folded, images)
  assert seen == ["highest"] and 0 <= error < 1e-4


def test_the_runtime_imports_neither_the_models_nor_flax(exported):
  out = exported[0]
  code = ("import sys, numpy as np; from msdfuse_jax import serving; r = serving.Runner.from_dir(sys.argv[1]); "
          "p, e = r(np.zeros((5, 32, 32, 3), np.uint8)); assert e.shape == (5,); "
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'optax', 'tensorflow', 'orbax') "
          "or m.startswith('msdfuse_jax.') and m != 'msdfuse_jax.serving'); print(bad)")
  done = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(__file__)))
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip().splitlines()[-1] == "[]"


def _copy(exported, tmp_path):
  path = tmp_path / "export"
  shutil.copytree(exported[0], path)
  return path


def _edit_manifest(path, **changes):
  manifest = json.loads((path / serving.MANIFEST).read_text())
  manifest.update(changes)
  (path / serving.MANIFEST).write_text(json.dumps(manifest))


def test_bad_export_directories_name_the_file(exported, tmp_path):
  with pytest.raises(serving.ExportError, match="does not exist"):
    serving.Runner.from_dir(str(tmp_path / "nowhere"))
  with pytest.raises(serving.ExportError, match="manifest.json is missing"):
    serving.Runner.from_dir(str(tmp_path))
  path = _copy(exported, tmp_path)
  (path / "stage2_b8.jaxexport").unlink()
  with pytest.raises(serving.ExportError, match=r"stage2_b8.jaxexport is missing"):
    serving.Runner.from_dir(str(path))
  # A program of another export (here: another stage's file under this name).
  shutil.copy(path / "stage3_b8.jaxexport", path / "stage2_b8.jaxexport")
  with pytest.raises(serving.ExportError, match=r"stage2_b8.jaxexport does not belong to this export"):
    serving.Runner.from_dir(str(path))
  # Without a checksum to compare, the programs' input shapes still tell.
  _edit_manifest(path, sha256={})
  with pytest.raises(serving.ExportError, match=r"stage2_b8.jaxexport takes states .* but stage 1 returns"):
    serving.Runner.from_dir(str(path))
  (path / "stage2_b8.jaxexport").write_bytes(b"not a program")
  with pytest.raises(serving.ExportError, match=r"stage2_b8.jaxexport is not a serialized jax.export"):
    serving.Runner.from_dir(str(path))
  _edit_manifest(path, image_shape=[28, 28, 1])
  with pytest.raises(serving.ExportError, match=r"stage1_b16.jaxexport takes .*uint8\[16, 28, 28, 1\]"):
    serving.Runner.from_dir(str(path))
  _edit_manifest(path, format="something else")
  with pytest.raises(serving.ExportError, match="not an msdfuse export manifest"):
    serving.Runner.from_dir(str(path))
  (path / serving.MANIFEST).write_text("{")
  with pytest.raises(serving.ExportError, match="not a readable manifest"):
    serving.Runner.from_dir(str(path))


def test_wrong_images_are_one_line_errors(exported):
  runner = serving.Runner.from_dir(exported[0])
  with pytest.raises(serving.ExportError, match=r"must have shape \(N, 32, 32, 3\), got \(2, 28, 28, 3\)"):
    runner(np.zeros((2, 28, 28, 3), np.uint8))
  with pytest.raises(serving.ExportError, match="must be uint8.*float32"):
    runner(np.zeros((2, 32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="need 3 thresholds"):
    runner.run(np.zeros((2, 32, 32, 3), np.uint8), [0.5, -1e8])


def test_export_for_other_platforms_from_this_machine(tmp_path):
  model = models.build_model("resnet_mc_tiny", 10)
  variables = _trained_like(model, 32)
  out = tmp_path / "tpu_only"
  exporting.export_model(model, variables, [0.5] * 3, [0.25] * 3, (32, 32, 3), str(out),
                         [0.5] * (model.num_exits - 1) + [-1e8], batch_size=4, num_buckets=1,
                         platforms=["cuda", "tpu"])
  data = (out / "stage1_b4.jaxexport").read_bytes()
  assert jax.export.deserialize(bytearray(data)).platforms == ("cuda", "tpu")
  with pytest.raises(serving.ExportError, match=r"exported for \['cuda', 'tpu'\], not for this cpu"):
    serving.Runner.from_dir(str(out))
  with pytest.raises(ValueError, match="unknown platform"):
    exporting.check_platforms(["cpu", "metal"])


def test_a_manifest_of_another_model_is_refused():
  config = evaluate_tests.cifar.get_config("dataset=cifar10,model=msdnet_tiny,runlocal")
  with pytest.raises(serving.ExportError,
                     match="export of model 'msdfuse_tiny', but the run is model 'msdnet_tiny'"):
    inference.check_export_matches({"model": "msdfuse_tiny", "dataset": "cifar10"}, config, "/x")
  with pytest.raises(serving.ExportError,
                     match="export of dataset 'cifar100', but the run is dataset 'cifar10'"):
    inference.check_export_matches({"model": "msdnet_tiny", "dataset": "cifar100"}, config, "/x")
  inference.check_export_matches({"model": "msdnet_tiny", "dataset": "cifar10"}, config, "/x")


def _folding_off_by(offset):
  """A FoldedModel whose every logit is `offset` away from the model's: a folding gone wrong."""
  class OffFolding(folding.FoldedModel):
    def apply(self, *args, **kwargs):
      return tuple(logits + offset for logits in super().apply(*args, **kwargs))
  return OffFolding


def test_the_export_refuses_a_folding_that_changes_the_logits(tmp_path, monkeypatch):
  model = models.build_model("msdnet_tiny", 10)
  variables = _trained_like(model, 32)
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  # Within the tolerance the check returns the change; above it, the export stops before writing anything.
  near = _folding_off_by(exporting.FOLD_TOLERANCE / 2)(model, variables, images)
  assert exporting.FOLD_TOLERANCE / 4 < exporting.check_folding(model, variables, near, images) \
      <= exporting.FOLD_TOLERANCE
  monkeypatch.setattr(folding, "FoldedModel", _folding_off_by(2 * exporting.FOLD_TOLERANCE))
  out = tmp_path / "export"
  with pytest.raises(serving.ExportError,
                     match=r"folding BatchNorm changed the logits by 0\.002 \(> 0\.001\)"):
    exporting.export_model(model, variables, inference_tests.MEAN, inference_tests.STD, (32, 32, 3), str(out),
                           [0.5, 0.5, -1e8], batch_size=4, num_buckets=1)
  assert not out.exists()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return evaluate_tests.tiny_run_dir(tmp_path_factory)


def _cli(*args, env=None):
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=600,
                        cwd=os.path.dirname(os.path.dirname(__file__)),
                        env=None if env is None else {**os.environ, **env})


# What a GPU user would run to see that nothing crosses between host and device implicitly.
NO_IMPLICIT_TRANSFERS = {"JAX_TRANSFER_GUARD": "disallow"}


@pytest.mark.slow
def test_export_and_infer_on_a_trained_run(run_dir, tmp_path):
  """msdfuse-export on the trained tiny run, then the runtime at several budgets against the simulation
  and the in-process runner, then msdfuse-infer --export."""
  out = tmp_path / "p8"
  done = _cli("msdfuse_jax.tools.export_main", f"--workdir={run_dir}", "--p=8", f"--out={out}",
              "--batch_size=64", "--num_buckets=3", "--platforms=cpu,cuda", env=NO_IMPLICIT_TRANSFERS)
  assert done.returncode == 0, done.stderr[-3000:]
  assert "wrote" in done.stdout
  manifest = json.loads((out / serving.MANIFEST).read_text())
  assert manifest["model"] == "msdnet_tiny" and manifest["p"] == 8 and manifest["platforms"] == ["cpu", "cuda"]
  assert len(manifest["sha256"]) == 3 * 3 and manifest["source"]["step"] == 6
  assert manifest["source"]["config"]["model"]["name"] == "msdnet_tiny"
  assert manifest["matmul_precision"]["folding_check"] == "highest"

  config, model, variables, _, data = evaluate.load_run(str(run_dir), dtype="float32")
  fit = inference.fit_budget(config, model, variables, data, 8, None, 64)
  assert manifest["thresholds"] == [float(t) for t in fit["thresholds"]]
  assert manifest["exit_costs"] == [int(c) for c in fit["exit_costs"]]
  runner = serving.Runner.from_dir(str(out))
  mean, std = np.asarray(data.mean), np.asarray(data.std)
  in_process = inference.EarlyExitRunner(model, variables, lambda x: (x.astype(jnp.float32) / 255 - mean) / std,
                                         batch_size=64, num_buckets=3)
  test = np.asarray(data.test_images)
  for p in (8, 3, 15, 30):
    thresholds = budget.fit_thresholds(fit["val_probs"], p)
    sim_exits, sim_preds = budget.apply_thresholds(fit["test_probs"], thresholds)
    result = runner.run(test, thresholds)
    np.testing.assert_array_equal(result.exits, sim_exits + 1)
    np.testing.assert_array_equal(result.predictions, sim_preds)
    reference = in_process.run(test, thresholds)
    np.testing.assert_array_equal(result.exits, reference.exits)
    np.testing.assert_array_equal(result.predictions, reference.predictions)

  # With a deadline far above the whole network's time (the anytime run then equals the plain one).
  done = _cli("msdfuse_jax.tools.infer_main", f"--workdir={run_dir}", f"--export={out}", "--repeats=1",
              "--deadline_ms=1e9", "--deadline_sweep=2", env=NO_IMPLICIT_TRANSFERS)
  assert done.returncode == 0, done.stderr[-3000:]
  infer = json.loads((run_dir / "eval" / "infer.json").read_text())
  assert infer["deadline_ms"] == 1e9 and infer["deadline_met_fraction"] == 1.0
  assert infer["worst_overshoot_ms"] == 0.0 and infer["deadline_exit_counts"] == infer["exit_counts"]
  assert infer["deadline_accuracy"] == infer["accuracy"] and len(infer["deadline_sweep"]) == 2
  assert (run_dir / "eval" / "anytime_deadline.png").stat().st_size > 0
  assert "100.0 % of chunks within it, worst overshoot 0.000 ms" in done.stdout
  assert infer["runner"] == "export" and infer["matches_simulation"] is True and infer["p"] == 8
  # The export's programs are checked against themselves run on every image (like with like).
  assert infer["simulation"] == "the export's programs, every stage on every image"
  assert infer["matmul_precision"] == {"timings": "default", "matches_simulation": "default",
                                       "thresholds": "highest"}
  assert infer["batch_size"] == 64 and infer["buckets"] == [64, 32, 16]
  for key in ("realised_over_time_ideal", "time_ideal_over_predicted", "realised_over_predicted"):
    assert 0 < infer[key] < float("inf")
  assert (f"runner overhead (realised / time-ideal) {infer['realised_over_time_ideal']:.2f}" in done.stdout
          and f"(time-ideal / predicted) {infer['time_ideal_over_predicted']:.2f}" in done.stdout)
  assert infer["realised_over_predicted"] == pytest.approx(
      infer["realised_over_time_ideal"] * infer["time_ideal_over_predicted"], rel=1e-9)
  assert infer["reaching_stage"][0] == infer["num_images"] and len(infer["stage_ms_per_image"]) == 3

  # Errors: an export with --p, a non-empty --out.
  done = _cli("msdfuse_jax.tools.infer_main", f"--workdir={run_dir}", f"--export={out}", "--p=3")
  assert done.returncode == 2 and "leave out --p" in done.stderr
  done = _cli("msdfuse_jax.tools.export_main", f"--workdir={run_dir}", "--p=8", f"--out={out}")
  assert done.returncode == 2 and "exists and is not empty" in done.stderr


def test_tools_print_one_line_for_a_bad_export_directory(tmp_path):
  done = _cli("msdfuse_jax.tools.infer_main", f"--workdir={tmp_path}", f"--export={tmp_path / 'nowhere'}")
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1] == (f"error: export directory {tmp_path / 'nowhere'} does not "
                                                  "exist: write one with msdfuse-export")
  assert "Traceback" not in done.stderr
  done = _cli("msdfuse_jax.tools.export_main", f"--workdir={tmp_path}", "--p=3")
  assert done.returncode == 2 and "--out is required" in done.stderr
