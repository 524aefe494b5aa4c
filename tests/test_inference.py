"""Real early-exit inference equals the simulated budgeted evaluation, exactly."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msdfuse_jax import costs, inference, models
from msdfuse_jax.evaluation import budget, evaluate, predict
from tests import test_evaluate as evaluate_tests

# Early exit must equal the simulation exactly: both at float32's own precision on any backend.
pytestmark = pytest.mark.usefixtures("float32_matmuls")

MEAN, STD = np.array([0.5, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)


def early_exit_setup(model, *, seed=0, num_val=60, num_test=70, predict_batch=32, num_buckets=3):
  """(runner, test images, val probs, test probs) for `model` at random init on random images: the
  in-process runner and the simulated evaluation's inputs (also used by test_techniques.py)."""
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  val = rng.integers(0, 256, (num_val, 32, 32, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8)
  fn = predict.make_predict_fn(model, MEAN, STD)
  val_probs = predict.predict_probs(model, variables, val, MEAN, STD, predict_batch, predict_fn=fn)
  test_probs = predict.predict_probs(model, variables, test, MEAN, STD, predict_batch, predict_fn=fn)
  preprocess = lambda x: (x.astype(jnp.float32) / 255.0 - MEAN) / STD
  runner = inference.EarlyExitRunner(model, variables, preprocess, batch_size=16, num_buckets=num_buckets,
                                     chunk_batches=2)
  return runner, test, val_probs, test_probs


@pytest.fixture(scope="module")
def setup():
  model = models.build_model("msdnet_tiny", 10)
  return (model, *early_exit_setup(model))


def test_bucket_sizes():
  assert inference.bucket_sizes(256) == [256, 128, 64, 32, 16]
  assert inference.bucket_sizes(100, 3) == [100, 50, 25]


@pytest.mark.parametrize("p", [1, 4, 10, 20, 39])
def test_early_exit_equals_simulation(setup, p):
  model, runner, test, val_probs, test_probs = setup
  thresholds = budget.fit_thresholds(val_probs, p)
  sim_exits, sim_preds = budget.apply_thresholds(test_probs, thresholds)
  result = runner.run(test, thresholds)
  np.testing.assert_array_equal(result.exits, sim_exits + 1)
  np.testing.assert_array_equal(result.predictions, sim_preds)
  assert result.seconds > 0
  assert result.images_per_second == pytest.approx(len(test) / result.seconds, rel=1e-12)


def test_later_stages_see_only_survivors(setup):
  model, runner, test, val_probs, _ = setup
  thresholds = budget.fit_thresholds(val_probs, 2)  # most samples leave at exit 1
  runner.calls.clear()
  result = runner.run(test, thresholds)
  counts = np.bincount(result.exits - 1, minlength=model.num_exits)
  survivors_2 = len(test) - counts[0]
  images_at_stage_2 = sum(b * n for (k, b), n in runner.calls.items() if k == 2)
  # Stage 2 ran on the survivors only, padded at most to the next bucket once per chunk.
  assert survivors_2 <= images_at_stage_2 < survivors_2 + 2 * 16
  assert set(b for (_, b) in runner.calls) <= set(runner.buckets)


def test_no_recompilation_after_warmup(setup):
  model, runner, test, val_probs, _ = setup
  runner.warmup(test)
  compiled = runner.compiled_programs()
  assert compiled == model.num_exits * len(runner.buckets)  # one per (stage, bucket)
  for p in (3, 15, 30):
    runner.run(test[: 50 - p], budget.fit_thresholds(val_probs, p))
  assert runner.compiled_programs() == compiled


def test_full_network_timing_moves_no_weights_in_its_loop(setup):
  """`time_batches` puts the variables on the device before its loop: host (numpy) weights would
  otherwise be copied with every timed batch, inflating the early-exit speedups on a GPU."""
  model, _, test, _, _ = setup
  host_variables = jax.device_get(models.init_variables(model, jax.random.PRNGKey(0)))
  every_exit, _ = inference.full_network_fns(model, lambda x: x.astype(jnp.float32) / 255.0)
  with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
    with jax.transfer_guard("disallow"):  # what the loop would do with implicit transfers
      every_exit(host_variables, test[:16])
  with jax.transfer_guard("disallow"):
    seconds = inference.time_batches(every_exit, host_variables, test, 16, repeats=1)
  assert 0 < seconds < math.inf


def test_wrong_number_of_thresholds(setup):
  _, runner, test, _, _ = setup
  with pytest.raises(ValueError, match="3 thresholds"):
    runner.run(test, [0.5, -1e8])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """The tiny trained run of tests/test_evaluate.py (trained once per session, shared by both)."""
  return evaluate_tests.tiny_run_dir(tmp_path_factory)


@pytest.mark.slow
def test_run_inference_matches_simulation(run_dir):
  # The simulation, recomputed here from full forward passes (with run_inference's batch size).
  config, model, variables, _, data = evaluate.load_run(str(run_dir))
  mean, std = np.asarray(data.mean), np.asarray(data.std)
  fn = predict.make_predict_fn(model, mean, std)
  with jax.default_matmul_precision("highest"):  # the simulation's precision, on any backend
    val_probs = predict.predict_probs(model, variables, data.val_images, mean, std, 64, predict_fn=fn)
    test_probs = predict.predict_probs(model, variables, data.test_images, mean, std, 64, predict_fn=fn)
  cost_model = models.from_config(config, dtype="float32")
  exit_costs = np.array([c.op_counter for c in costs.exit_costs(cost_model, with_xla=False)], np.float64)

  # Nothing crosses between host and device implicitly (the weights go to the device once, every batch
  # and every result is an explicit transfer): what JAX_TRANSFER_GUARD=disallow msdfuse-infer runs under.
  with jax.transfer_guard("disallow"):
    out = inference.run_inference(str(run_dir), p=8, cost_budget=None, batch_size=64, repeats=1)
  assert out["simulation"] == "the model's full forward passes"
  assert out["matmul_precision"] == {"timings": "default", "matches_simulation": "highest",
                                     "thresholds": "highest"}
  n = len(data.test_images)
  assert out["num_images"] == n == 1017 and out["p"] == 8
  thresholds = budget.fit_thresholds(val_probs, 8)
  assert out["thresholds"] == [float(t) for t in thresholds]
  sim_exits, sim_preds = budget.apply_thresholds(test_probs, thresholds)
  assert out["matches_simulation"] is True
  assert out["exit_counts"] == np.bincount(sim_exits, minlength=model.num_exits).tolist()
  assert sum(out["exit_counts"]) == n
  assert out["accuracy"] == pytest.approx(100.0 * np.mean(sim_preds == data.test_labels), rel=1e-12)
  # The expected cost is the exit fractions dotted with the per-exit costs; p = 8 mixes exits, so it lies
  # strictly between exit 1's cost and the whole network's.
  assert out["full_cost"] == exit_costs[-1]
  fractions = np.asarray(out["exit_counts"]) / n
  assert out["expected_cost"] == pytest.approx(float(fractions @ exit_costs), rel=1e-12)
  assert np.count_nonzero(out["exit_counts"]) > 1
  assert exit_costs[0] < out["expected_cost"] < exit_costs[-1]
  # The reported rates are finite and agree with the reported speedups (all from the same timings).
  rates = [out[f"{name}_images_per_s"] for name in ("early_exit", "full_network", "last_exit")]
  assert all(0 < r < math.inf for r in rates)
  early, full, last = rates
  assert out["speedup_vs_full"] == pytest.approx(early / full, rel=1e-9)
  assert out["speedup_vs_last_exit"] == pytest.approx(early / last, rel=1e-9)
  assert out["predicted_speedup"] == pytest.approx(out["full_cost"] / out["expected_cost"], rel=1e-12)
  assert out["realised_over_predicted"] == pytest.approx(out["speedup_vs_full"] / out["predicted_speedup"],
                                                         rel=1e-12)

  # By cost budget: the p the validation curve allows, then the same simulation check.
  cost_budget = float(exit_costs[-1]) * 0.9
  by_budget = inference.run_inference(str(run_dir), p=None, cost_budget=cost_budget, batch_size=64,
                                      repeats=1, deadline_ms=1e-3, deadline_sweep=2)
  assert by_budget["p"] == budget.thresholds_for_budget(val_probs, exit_costs, cost_budget)
  assert by_budget["matches_simulation"] is True
  sim_exits, _ = budget.apply_thresholds(test_probs, budget.fit_thresholds(val_probs, by_budget["p"]))
  assert by_budget["exit_counts"] == np.bincount(sim_exits, minlength=model.num_exits).tolist()
  # With a deadline (here 1 us per chunk of 64 images, below the first stage's time): the in-process
  # runner still gives every image exit 1, and no chunk meets the deadline.
  assert by_budget["deadline_ms"] == 1e-3 and by_budget["deadline_exit_counts"] == [n, 0, 0]
  assert by_budget["deadline_met_fraction"] == 0.0 and by_budget["worst_overshoot_ms"] > 0
  assert by_budget["deadline_chunk_size"] == 64 and len(by_budget["deadline_chunk_ms"]) == 16
  assert by_budget["deadline_stage_times"] == "timed in this run (Runner.time_table)"
  lo, hi = by_budget["deadline_sweep_range_ms"]
  assert 0 < lo < hi and [p["deadline_ms"] for p in by_budget["deadline_sweep"]] == [lo, hi]
