"""Time budgets: the prediction counts the runner's own calls, the fit equals a brute-force search, the
errors are one line."""

import numpy as np
import pytest
from absl import flags

from msdfuse_jax import serving, timebudget
from msdfuse_jax.evaluation import budget
from msdfuse_jax.tools import flags_util

K, N, CLASSES = 3, 50, 4
BATCH, BUCKETS, PIECES = 8, [8, 4, 2], 8  # one chunk of 64 holds the 50 validation images

# A stored time table, not proportional to any cost: stage 1 is slow, a small bucket is dear per image.
TIMES = timebudget.StageTimes(
    {1: {8: 8e-3, 4: 5e-3, 2: 4e-3}, 2: {8: 2e-3, 4: 1.5e-3, 2: 1.2e-3}, 3: {8: 4e-3, 4: 2.5e-3, 2: 2e-3}},
    BATCH, tuple(BUCKETS), PIECES, device="a stored table")


def _probs(seed=0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(K, N, CLASSES)) * np.array([1.0, 2.0, 3.0])[:, None, None]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return probs.astype(np.float32), rng.integers(0, CLASSES, N)


def _fake_runner(conf):
  """`serving.Runner` with programs that read stage k's confidence of the images they hold: image i is a
  1-pixel image of value i, and each state is the image ids (padded to the batch size)."""
  def first(images):
    ids = np.asarray(images)[:, 0, 0, 0].astype(np.int64)
    return np.pad(ids, (0, BATCH - len(ids))), conf[0, ids], np.zeros(len(ids), np.int32)

  def later(k, states, index):
    ids = np.concatenate([np.asarray(s) for s in states])[np.asarray(index)]
    state = np.pad(ids, (0, BATCH - len(ids))) if k < K else ()
    return state, conf[k - 1, ids], np.zeros(len(ids), np.int32)

  programs = {(k, b): first if k == 1 else (lambda *a, k=k: later(k, *a)) for k in range(1, K + 1)
              for b in BUCKETS}
  return serving.Runner(programs, K, BATCH, BUCKETS, PIECES)


def _brute_force(probs, labels, budget_ms):
  """Every budget point run through the real runner, its calls counted and priced with the table; the
  point with the largest time not above the budget (ties: the smaller p)."""
  conf = probs.max(-1)
  runner = _fake_runner(conf)
  images = np.arange(N, dtype=np.uint8).reshape(N, 1, 1, 1)
  best = None
  for p in range(1, budget.NUM_BUDGET_POINTS + 1):
    thresholds = budget.fit_thresholds(probs, p)
    runner.calls.clear()
    runner.run(images, thresholds)
    ms = 1e3 * sum(n * TIMES.seconds[k][b] for (k, b), n in runner.calls.items()) / N
    if ms <= budget_ms and (best is None or ms > best[1]):
      best = (p, ms, thresholds)
  return best


def test_the_prediction_prices_the_runners_own_calls():
  probs, labels = _probs()
  conf = probs.max(-1)
  runner = _fake_runner(conf)
  images = np.arange(N, dtype=np.uint8).reshape(N, 1, 1, 1)
  for p in (1, 7, 20, 39):
    thresholds = budget.fit_thresholds(probs, p)
    runner.calls.clear()
    exits = runner.run(images, thresholds).exits - 1
    reaching = timebudget.reaching_fractions(exits, K)
    assert timebudget.stage_calls(N, reaching, BATCH, BUCKETS, PIECES) == runner.calls
  # Two chunks of 64, the second partial: stage 1 runs 8 + 2 full batches and one of 4 (bucket 4).
  assert timebudget.stage_calls(84, [1.0, 0.5, 0.0], BATCH, BUCKETS, PIECES) == {
      (1, 8): 10, (1, 4): 1, (2, 8): 5, (2, 2): 1}


@pytest.mark.parametrize("seed", [0, 1])
def test_the_fit_equals_a_brute_force_search(seed):
  probs, labels = _probs(seed)
  conf, correct = timebudget.validation_from_probs(probs, labels)
  rows = timebudget.candidates(conf, correct, TIMES, N)
  # Budgets between the distinct predicted times (at a time itself, summing in another order could put
  # one side an ULP over), below the cheapest and above the dearest.
  times = sorted({round(row["predicted_ms_per_image"], 9) for row in rows})
  budgets = [times[0] / 2, *((a + b) / 2 for a, b in zip(times, times[1:])), times[-1] * 2]
  assert len(budgets) > 10
  for budget_ms in budgets:
    expected = _brute_force(probs, labels, budget_ms)
    if expected is None:
      with pytest.raises(ValueError, match="below"):
        timebudget.fit_time_budget(conf, correct, TIMES, budget_ms, N)
      continue
    fit = timebudget.fit_time_budget(conf, correct, TIMES, budget_ms, N)
    assert fit["p"] == expected[0]
    assert fit["predicted_ms_per_image"] == pytest.approx(expected[1], rel=1e-12)
    np.testing.assert_array_equal(fit["thresholds"], expected[2])
    exits, preds = budget.apply_thresholds(probs, fit["thresholds"])
    assert fit["val_accuracy"] == pytest.approx(100 * np.mean(preds == labels), rel=1e-12)
  assert fit["family"] == timebudget.FAMILY and len(fit["points"]) == budget.NUM_BUDGET_POINTS


def test_impossible_and_non_positive_budgets():
  probs, labels = _probs()
  conf, correct = timebudget.validation_from_probs(probs, labels)
  first = timebudget.first_stage_ms(TIMES, N)
  assert first == pytest.approx(1e3 * (6 * 8e-3 + 4e-3) / N)  # 6 full batches and one of 2
  with pytest.raises(ValueError, match=r"^budget_ms=0\.5 is impossible: it is below the first stage's "
                     r"predicted time, 1\.04 ms per image on a stored table"):
    timebudget.fit_time_budget(conf, correct, TIMES, 0.5, N)
  for bad in (0, -1.0, float("nan")):
    with pytest.raises(ValueError, match="budget_ms must be a positive number"):
      timebudget.fit_time_budget(conf, correct, TIMES, bad, N)


def test_validation_data_round_trips_and_the_ops_fit_equals_the_reference(tmp_path):
  probs, labels = _probs()
  conf, correct = timebudget.validation_from_probs(probs, labels)
  timebudget.save_validation(str(tmp_path), conf, correct)
  conf2, correct2 = timebudget.load_validation(str(tmp_path))
  np.testing.assert_array_equal(conf2, conf)
  np.testing.assert_array_equal(correct2, correct)
  costs = [10.0, 25.0, 40.0]
  for cost_budget in (12.0, 20.0, 30.0, 40.0):
    fit = timebudget.fit_ops_budget(conf2, costs, cost_budget)
    assert fit["p"] == budget.thresholds_for_budget(probs, costs, cost_budget)
    np.testing.assert_array_equal(fit["thresholds"], budget.fit_thresholds(probs, fit["p"]))
  assert timebudget.StageTimes.from_json(TIMES.to_json()) == TIMES
  with pytest.raises(FileNotFoundError, match="validation.npz is missing"):
    timebudget.load_validation(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("args,message", [
    (["--p=3", "--budget_ms=2"], "give exactly one of --p (1..39), --budget (average cost per image) or "
     "--budget_ms (milliseconds per image)"),
    (["--budget=3e7", "--budget_ms=2"], "give exactly one of"),
    (["--budget_ms=0"], "--budget_ms must be positive (milliseconds per image), got 0"),
    (["--budget_ms=-1.5"], "--budget_ms must be positive (milliseconds per image), got -1.5"),
])
def test_budget_flags_are_one_line_errors(args, message, capsys):
  values = flags.FlagValues()
  flags_util.define_budget_flags(values)
  values(["tool", "--workdir=/tmp/run", *args])
  with pytest.raises(SystemExit) as exit_:
    flags_util.check_budget_flags(values=values)
  assert exit_.value.code == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith(f"error: {message}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """The tiny trained run of tests/test_evaluate.py (trained once per session, shared)."""
  from tests import test_evaluate as evaluate_tests  # pylint: disable=import-outside-toplevel
  return evaluate_tests.tiny_run_dir(tmp_path_factory)


@pytest.mark.slow
@pytest.mark.usefixtures("float32_matmuls")
def test_refits_from_an_export_equal_the_fits_of_the_tools(run_dir, tmp_path):
  """An export keeps its stage time table and validation data: refits from them equal the fits made with
  the model (ops and time budgets), and msdfuse-infer's time fit equals a refit of the stored data on its
  table."""
  from msdfuse_jax import exporting, inference  # pylint: disable=import-outside-toplevel
  out = tmp_path / "export"
  manifest = exporting.export_run(str(run_dir), str(out), p=8, batch_size=64, num_buckets=3,
                                  platforms=["cpu"])
  table = timebudget.StageTimes.from_json(manifest["stage_times"])
  assert table.batch_size == 64 and table.buckets == (64, 32, 16)
  assert table.measured_on == "the exported programs"
  assert table.device.startswith("cpu") and table.matmul_precision == "default"
  assert manifest["validation"]["num_images"] == 517

  runner = serving.Runner.from_dir(str(out))
  assert runner.budget["p"] == 8 and runner.stage_times == table
  rows = timebudget.candidates(*runner.validation(), table)
  budget_ms = float(np.median([row["predicted_ms_per_image"] for row in rows]))
  refit = runner.with_budget_ms(budget_ms)
  best = max((row for row in rows if row["predicted_ms_per_image"] <= budget_ms),
             key=lambda row: (row["predicted_ms_per_image"], -row["p"]))
  assert refit.budget["p"] == best["p"] and refit.budget["predicted_ms_per_image"] <= budget_ms
  assert refit.budget["budget_ms"] == budget_ms and refit.budget["family"] == timebudget.FAMILY
  assert runner.thresholds.tolist() == manifest["thresholds"]  # the original runner keeps its own
  # An ops budget at p = 8's validation cost gives back the thresholds the export fitted with the model.
  by_ops = runner.with_budget_ops(manifest["expected_val_cost"])
  assert by_ops.budget["p"] == 8 and by_ops.thresholds.tolist() == manifest["thresholds"]
  # Impossible budgets are one-line errors naming the figure they missed.
  with pytest.raises(ValueError, match=r"^budget_ms=1e-06 is impossible: it is below the first stage's "
                     r"predicted time, [0-9.e-]+ ms per image on cpu[^\n]*$"):
    runner.with_budget_ms(1e-6)
  # measure() re-times the stages here and refits a runner fitted to a time budget (one every point fits:
  # on a loaded machine the times move by several times).
  generous = runner.with_budget_ms(1e3)
  assert generous.measure(repeats=1) is generous and generous.stage_times is not table
  again = timebudget.fit_time_budget(*runner.validation(), generous.stage_times, 1e3)
  assert generous.budget["predicted_ms_per_image"] == again["predicted_ms_per_image"]

  # msdfuse-infer's fit (in process: the model's probabilities, its own stage table, timed first) equals a
  # refit of the export's stored data on that table. (The in-process programs' times are not the export's,
  # so the budget is one every point fits: the point with the largest predicted time.)
  infer = inference.run_inference(str(run_dir), None, None, 64, 1, budget_ms=1e3)
  assert infer["budget_ms"] == 1e3 and infer["time_fit"]["num_images"] == infer["num_images"] == 1017
  infer_table = timebudget.StageTimes.from_json(infer["stage_times"])
  again = timebudget.fit_time_budget(*runner.validation(), infer_table, infer["budget_ms"],
                                     infer["num_images"])
  assert again["p"] == infer["p"] and [float(t) for t in again["thresholds"]] == infer["thresholds"]
  assert infer["predicted_ms_per_image"] == pytest.approx(again["predicted_ms_per_image"], rel=1e-12)
  assert infer["stage_times"]["measured_on"] == "the in-process programs"
  assert infer["matches_simulation"] is True
  assert 0 < infer["realised_ms_per_image"] < float("inf") and 0 < infer["accuracy"] <= 100
