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
