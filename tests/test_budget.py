"""Tests for msdfuse_jax.evaluation.budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from msdfuse_jax.evaluation import budget

NUM_CLASSES = 10


def _probs_from_conf(conf: np.ndarray, preds: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """(K, N, C) float32 probabilities whose max is `conf` (> 1 / C) at class `preds`."""
  conf = np.asarray(conf, dtype=np.float64)
  probs = np.repeat(((1.0 - conf) / (num_classes - 1))[..., None], num_classes, axis=-1)
  np.put_along_axis(probs, np.asarray(preds)[..., None], conf[..., None], axis=-1)
  return probs.astype(np.float32)


def _random_probs(rng: np.random.Generator, k: int, n: int, c: int, ties: bool) -> np.ndarray:
  if ties:
    # Few distinct integer scores: many samples share a confidence, so ties at a threshold
    # (which exit together in the reference) are common.
    scores = rng.integers(1, 4, size=(k, n, c)).astype(np.float32)
  else:
    scores = np.exp(rng.normal(scale=2.0, size=(k, n, c))).astype(np.float32)
  return scores / scores.sum(axis=-1, keepdims=True)


def _reference_point(val_probs, test_probs, test_labels, costs, p):
  """MSDNet-PyTorch's dynamic_eval_find_threshold + dynamic_eval_with_threshold, literally.

  Per-sample Python loops over float32 values, as the torch code does them.
  """
  m, n, _ = val_probs.shape
  # probs = exp(log(_p) * range(1, m)); probs /= probs.sum(), every step in float32.
  q = np.float32(p * 1.0 / 20)
  log_q = np.float32(math.log(q))
  prior = [np.float32(math.exp(np.float32(log_q * np.float32(k)))) for k in range(1, m + 1)]
  total = np.float32(0)
  for value in prior:
    total = np.float32(total + value)
  prior = [np.float32(value / total) for value in prior]

  max_preds = val_probs.max(axis=2)
  sorted_idx = [sorted(range(n), key=lambda i, k=k: -float(max_preds[k][i])) for k in range(m)]
  filtered = [0] * n
  thresholds = [np.float32(1e8)] * m
  for k in range(m - 1):
    count = 0
    out_n = math.floor(np.float32(n) * prior[k])  # int * float32 tensor is float32 in torch
    for i in range(n):
      ori_idx = sorted_idx[k][i]
      if filtered[ori_idx] == 0:
        count += 1
        if count == out_n:
          thresholds[k] = max_preds[k][ori_idx]
          break
    for i in range(n):
      if max_preds[k][i] >= thresholds[k]:
        filtered[i] += 1
  thresholds[m - 1] = np.float32(-1e8)

  test_max = test_probs.max(axis=2)
  test_arg = test_probs.argmax(axis=2)
  n_test = test_probs.shape[1]
  acc, exp = 0, [0] * m
  for i in range(n_test):
    for k in range(m):
      if test_max[k][i] >= thresholds[k]:
        if int(test_labels[i]) == int(test_arg[k][i]):
          acc += 1
        exp[k] += 1
        break
  expected = np.float32(0)
  for k in range(m):
    expected = np.float32(expected + np.float32(exp[k]) / np.float32(n_test) * np.float32(costs[k]))
  return thresholds, acc * 100.0 / n_test, float(expected), exp


@pytest.mark.parametrize("k,n_val,n_test,c,ties", [
    (1, 20, 15, 5, False),
    (2, 37, 41, 10, True),
    (2, 21, 30, 10, False),  # p = 1: 21 * prior_1 = 19.999998 in float32
    (4, 5, 6, 3, True),  # tiny N: many stages get n_k = 0
    (5, 300, 250, 10, False),
    (7, 400, 350, 100, True),
    (10, 600, 500, 10, False),
])
def test_matches_literal_reference(k, n_val, n_test, c, ties):
  rng = np.random.default_rng(1000 * k + n_val)
  val = _random_probs(rng, k, n_val, c, ties)
  test = _random_probs(rng, k, n_test, c, ties)
  val_labels = rng.integers(0, c, n_val)
  test_labels = rng.integers(0, c, n_test)
  costs = np.cumsum(rng.uniform(1e6, 2e7, size=k))
  points = budget.dynamic_evaluation(val, val_labels, test, test_labels, costs)
  assert [pt["p"] for pt in points] == list(range(1, 40))
  for pt in points:
    ref_t, ref_acc, ref_cost, ref_counts = _reference_point(val, test, test_labels, costs, pt["p"])
    np.testing.assert_array_equal(np.float32(pt["thresholds"]), np.float32(ref_t))
    assert pt["accuracy"] == ref_acc
    assert pt["exit_counts"] == ref_counts
    assert pt["expected_cost"] == pytest.approx(ref_cost, rel=1e-6)


def test_all_confident_at_exit1_gives_exit1_accuracy_and_cost():
  k, n = 4, 6
  rng = np.random.default_rng(0)
  preds = rng.integers(0, NUM_CLASSES, size=(k, n))
  conf = np.full((k, n), 0.3)
  conf[0] = 0.9  # everybody equally confident at exit 1: ties exit together
  probs = _probs_from_conf(conf, preds)
  labels = preds[0].copy()
  labels[:2] = (labels[:2] + 1) % NUM_CLASSES  # exit 1 gets 4 of 6 right
  costs = [1e7, 2e7, 3e7, 4e7]
  points = budget.dynamic_evaluation(probs, labels, probs, labels, costs)
  quota1 = {p: budget.exit_quotas(n, budget.exit_prior(p, k))[0] for p in range(1, 40)}
  assert any(q >= 1 for q in quota1.values()) and any(q == 0 for q in quota1.values())
  for pt in points:
    if quota1[pt["p"]] >= 1:  # exit 1 takes a share, hence (ties) everybody
      assert pt["thresholds"][0] == np.float32(0.9)
      assert pt["accuracy"] == pytest.approx(100.0 * 4 / 6)
      assert pt["expected_cost"] == pytest.approx(1e7)
      assert pt["exit_counts"] == [n, 0, 0, 0]
      assert pt["exit_fractions"] == [1.0, 0.0, 0.0, 0.0]
      # Nobody is left for the later stages: their thresholds stay 1e8, the last is -1e8.
      assert pt["thresholds"][1:] == [1e8, 1e8, -1e8]
    else:  # no share for exit 1 (large q, tiny N): nobody exits there
      assert pt["thresholds"][0] == 1e8
      assert pt["exit_counts"][0] == 0


def test_hand_computed_thresholds_with_tie():
  # p = 20: q = 1, prior = 1/3 each (float32 0.33333334), n_k = floor(10 * 1/3) = 3.
  conf1 = [0.95, 0.9, 0.8, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35]
  conf2 = [0.99, 0.99, 0.99, 0.99, 0.5, 0.6, 0.7, 0.4, 0.3, 0.25]
  conf3 = [0.3] * 10
  preds = np.zeros((3, 10), dtype=np.int64)
  probs = _probs_from_conf(np.array([conf1, conf2, conf3]), preds)
  np.testing.assert_array_equal(budget.exit_quotas(10, budget.exit_prior(20, 3)), [3, 3, 3])
  thresholds = budget.fit_thresholds(probs, 20)
  assert thresholds.dtype == np.float32
  # Exit 1: 3rd largest is 0.8, shared by samples 2 and 3: both exit (4 > n_1 = 3).
  # Exit 2: among the 6 left (samples 4..9; 0..3 are ignored despite 0.99), 3rd largest is 0.5.
  np.testing.assert_array_equal(thresholds, np.float32([0.8, 0.5, -1e8]))
  exits, predictions = budget.apply_thresholds(probs, thresholds)
  np.testing.assert_array_equal(exits, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
  np.testing.assert_array_equal(predictions, np.zeros(10))


def test_hand_computed_thresholds_empty_stage():
  # p = 1: q = 0.05, prior ~ (0.9501, 0.0475, 0.0024): n = (9, 0, 0) of 10.
  np.testing.assert_array_equal(budget.exit_quotas(10, budget.exit_prior(1, 3)), [9, 0, 0])
  conf1 = np.linspace(0.9, 0.45, 10)
  probs = _probs_from_conf(np.array([conf1, conf1, conf1]), np.zeros((3, 10), np.int64))
  thresholds = budget.fit_thresholds(probs, 1)
  # 9th largest exit-1 confidence; nobody is sent to exit 2 (n_2 = 0).
  np.testing.assert_array_equal(thresholds, np.float32([conf1[8], 1e8, -1e8]))
  # Everybody tied at exit 1 leaves nobody for exit 2 even though n_2 >= 1 at p = 20.
  tied = _probs_from_conf(np.full((3, 10), 0.5), np.zeros((3, 10), np.int64))
  np.testing.assert_array_equal(budget.fit_thresholds(tied, 20), np.float32([0.5, 1e8, -1e8]))


def test_float32_prior_changes_the_quota():
  # K = 2, p = 1: the exact prior_1 = 1 / 1.05 = 20/21, so 21 * prior_1 = 20. The float32
  # exp/log form gives 0.9523809 and 21 * that = 19.999998 in float32: n_1 = 19, not 20
  # (the same with numpy's SIMD exp/log, so it does not hinge on their last bit).
  # (n_2 is 0 or 1 depending on the exp's last bit, but the last exit ignores its quota.)
  assert budget.exit_quotas(21, budget.exit_prior(1, 2))[0] == 19
  conf1 = np.linspace(0.95, 0.55, 21)
  probs = _probs_from_conf(np.array([conf1, conf1]), np.zeros((2, 21), np.int64))
  np.testing.assert_array_equal(budget.fit_thresholds(probs, 1), np.float32([conf1[18], -1e8]))


def test_single_exit_takes_everything():
  probs = _probs_from_conf(np.full((1, 4), 0.5), np.array([[0, 1, 2, 3]]))
  points = budget.dynamic_evaluation(probs, [0, 1, 0, 0], probs, [0, 1, 0, 0], [5.0])
  assert all(pt["thresholds"] == [-1e8] and pt["accuracy"] == 50.0 for pt in points)
  assert all(pt["expected_cost"] == 5.0 for pt in points)


def test_exit_prior_is_the_float32_exp_log_form():
  np.testing.assert_array_equal(budget.exit_prior(20, 4), np.float32([0.25] * 4))
  for p in (1, 7, 13, 39):
    prior = budget.exit_prior(p, 7)
    assert prior.dtype == np.float32
    q = p / 20
    exact = np.array([q ** k for k in range(1, 8)])
    np.testing.assert_allclose(prior, exact / exact.sum(), rtol=1e-5)
  # exp(float32(log q) * k) is not float32 q ** k bit for bit, which is why the form matters.
  differs = 0
  for p in range(1, 40):
    q = np.float32(p / 20)
    powers = np.array([q ** k for k in range(1, 8)], dtype=np.float32)
    differs += not np.array_equal(budget.exit_prior(p, 7), powers / powers.sum(dtype=np.float32))
  assert differs > 0
  with pytest.raises(ValueError, match="p must be"):
    budget.exit_prior(40, 3)


def test_thresholds_for_budget_picks_largest_cost_within_budget():
  rng = np.random.default_rng(3)
  val = _random_probs(rng, 4, 200, 10, ties=False)
  costs = [1.0, 2.0, 3.0, 4.0]
  labels = rng.integers(0, 10, 200)
  curve = {pt["p"]: pt["expected_cost"] for pt in
           budget.dynamic_evaluation(val, labels, val, labels, costs)}
  target = sorted(set(curve.values()))[len(set(curve.values())) // 2]
  p = budget.thresholds_for_budget(val, costs, target + 1e-9)
  assert curve[p] == target
  assert p == min(q for q, c in curve.items() if c == target)
  assert budget.thresholds_for_budget(val, costs, 1e9) == min(
      q for q, c in curve.items() if c == max(curve.values()))
  with pytest.raises(ValueError, match="cheapest"):
    budget.thresholds_for_budget(val, costs, min(curve.values()) - 1e-3)


def test_input_validation():
  rng = np.random.default_rng(0)
  val = _random_probs(rng, 3, 8, 5, ties=False)
  labels = rng.integers(0, 5, 8)
  costs = [1.0, 2.0, 3.0]
  with pytest.raises(ValueError, match="costs"):
    budget.dynamic_evaluation(val, labels, val, labels, [1.0, 2.0])
  with pytest.raises(ValueError, match="exits K and classes C"):
    budget.dynamic_evaluation(val, labels, val[:2], labels, costs)
  with pytest.raises(ValueError, match="exits K and classes C"):
    budget.dynamic_evaluation(val, labels, val[:, :, :4], labels, costs)
  with pytest.raises(ValueError, match="test_labels"):
    budget.dynamic_evaluation(val, labels, val, labels[:5], costs)
  with pytest.raises(ValueError, match="val_labels"):
    budget.dynamic_evaluation(val, labels + 5, val, labels, costs)
  with pytest.raises(ValueError, match=r"\(K, N, C\)"):
    budget.dynamic_evaluation(val[0], labels, val, labels, costs)
  with pytest.raises(ValueError, match="NaN"):
    budget.dynamic_evaluation(np.full_like(val, np.nan), labels, val, labels, costs)
  with pytest.raises(ValueError, match="thresholds"):
    budget.apply_thresholds(val, [0.5, -1e8])


def test_missing_prior_table_is_an_error_not_a_recomputation(monkeypatch, tmp_path):
  missing = tmp_path / "torch_prior.npy"
  monkeypatch.setattr(budget, "_TORCH_PRIOR_FILE", str(missing))
  budget._torch_prior_table.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(FileNotFoundError, match="torch_prior.npy not found") as info:
      budget.exit_prior(5, 11)
    message = str(info.value)
    assert str(missing) in message and "install is incomplete" in message
    assert "experiments/make_torch_prior_table.py" in message
    # Every entry point that needs the prior fails the same way (nothing falls back silently).
    probs = _random_probs(np.random.default_rng(0), 3, 8, 5, ties=False)
    with pytest.raises(FileNotFoundError, match="install is incomplete"):
      budget.fit_thresholds(probs, 5)
  finally:
    # The next caller reads the real table again (monkeypatch restores the path after this test).
    budget._torch_prior_table.cache_clear()  # pylint: disable=protected-access
