"""Budgeted batch classification ("dynamic evaluation"), as in MSDNet's reference `adaptive_inference.py`.

A port of the semantics of MSDNet-PyTorch `adaptive_inference.py`
(`dynamic_eval_find_threshold` / `dynamic_eval_with_threshold`), vectorised in numpy:

1. For p = 1..39, q = p / 20 and a geometric prior over the K exits, `prior_k ~ q^k`.
2. On the validation set, exit k (k < K) gets a confidence threshold T_k chosen so that
   `floor(N_val * prior_k)` of the samples that have not exited yet would exit there.
3. On the test set, every sample exits at the first exit whose max softmax probability
   reaches that exit's threshold; the point reported is (expected cost, accuracy).

Bit-level choices follow the reference, which works in float32 torch tensors:

* The prior is `exp(log(q) * k)` in float32, not `q ** k`, and torch's float32 kernels are not
  correctly rounded, so `floor(N * prior_k)` can differ by one from any other evaluation when
  `N * prior_k` lies close to an integer. `exit_prior` therefore reads torch's own values from a table
  (`torch_prior.npy`, made by `experiments/make_torch_prior_table.py`) for K <= 24.
* `N * prior_k` is a float32 product (a Python int times a float32 tensor is float32 in
  torch), floored afterwards.
* Thresholds are float32 confidence values and comparisons are float32 `>=`, so ties
  at a threshold exit, and a stage can take more than its share.

This only *simulates* early exit from full forward passes; `fit_thresholds` and
`apply_thresholds` are the pieces real early-exit inference reuses.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Sequence

import numpy as np

NUM_BUDGET_POINTS = 39  # p = 1..39, q = p / 20, as in the reference
NEVER_EXIT = np.float32(1e8)  # threshold of a stage nobody exits at (exact in float32)
ALWAYS_EXIT = np.float32(-1e8)  # threshold of the last stage: everybody left exits

__all__ = [
    "NUM_BUDGET_POINTS", "NEVER_EXIT", "ALWAYS_EXIT", "validate_probs", "validate_labels",
    "exit_prior", "exit_quotas", "fit_thresholds", "apply_thresholds", "dynamic_evaluation",
    "thresholds_for_budget", "fit_from_confidence", "exits_from_confidence", "p_for_budget_from_confidence",
]


def validate_probs(probs: Any, name: str) -> np.ndarray:
  """Checks per-exit probabilities (shared by the evaluation modules).

  Args:
    probs: array-like (K, N, C): exits, samples, classes.
    name: how error messages call it.

  Returns:
    `probs` as a float32 array.

  Raises:
    ValueError: on another rank, an empty axis, or non-finite values.
  """
  arr = np.asarray(probs)
  if arr.ndim != 3:
    raise ValueError(f"{name} must have shape (K, N, C) = (exits, samples, classes); "
                     f"got shape {arr.shape}")
  if min(arr.shape) == 0:
    raise ValueError(f"{name} must have at least one exit, sample and class; got shape {arr.shape}")
  # The reference holds softmax outputs in float32 tensors; float64 input is rounded the
  # same way torch.FloatTensor would round it.
  arr = arr.astype(np.float32, copy=False)
  if not np.all(np.isfinite(arr)):
    # A NaN confidence fails every `>=` test, so the reference would silently drop the sample.
    raise ValueError(f"{name} contains NaN or infinite values")
  return arr


def validate_labels(labels: Any, probs: np.ndarray, name: str, probs_name: str) -> np.ndarray:
  """Checks labels against validated (K, N, C) probabilities named `probs_name`.

  Returns:
    `labels` as an int64 (N,) array.

  Raises:
    ValueError: on a shape other than (N,), a non-integer dtype, or labels outside [0, C).
  """
  arr = np.asarray(labels)
  if arr.ndim != 1 or arr.shape[0] != probs.shape[1]:
    raise ValueError(f"{name} must have shape (N,) = ({probs.shape[1]},) to match {probs_name} "
                     f"of shape {probs.shape}; got shape {arr.shape}")
  if not np.issubdtype(arr.dtype, np.integer):
    raise ValueError(f"{name} must be integer class indices; got dtype {arr.dtype}")
  if arr.min() < 0 or arr.max() >= probs.shape[2]:
    raise ValueError(f"{name} must lie in [0, {probs.shape[2]}) (C classes of {probs_name}); "
                     f"got range [{arr.min()}, {arr.max()}]")
  return arr.astype(np.int64, copy=False)


def _check_costs(costs: Any, num_exits: int) -> np.ndarray:
  """Returns `costs` as a float64 (K,) array or raises ValueError."""
  arr = np.asarray(costs, dtype=np.float64)
  if arr.ndim != 1 or arr.shape[0] != num_exits:
    raise ValueError(f"costs must be a vector of {num_exits} cumulative per-exit costs (one per "
                     f"exit K of the probabilities); got shape {arr.shape}")
  if not np.all(np.isfinite(arr)):
    raise ValueError("costs contains NaN or infinite values")
  return arr


def _check_p(p: int) -> int:
  if isinstance(p, bool) or int(p) != p or not 1 <= p <= NUM_BUDGET_POINTS:
    raise ValueError(f"p must be an integer in [1, {NUM_BUDGET_POINTS}]; got {p!r}")
  return int(p)


def _confidences(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Max softmax probability (float32) and argmax (first index on ties) per exit and sample."""
  return probs.max(axis=2), probs.argmax(axis=2)


_TORCH_PRIOR_FILE = os.path.join(os.path.dirname(__file__), "torch_prior.npy")


@functools.lru_cache(maxsize=1)
def _torch_prior_table() -> np.ndarray:
  """torch's own float32 priors, [p, K, k] (see experiments/make_torch_prior_table.py).

  Raises:
    FileNotFoundError: when the packaged table is missing. Recomputing the prior instead would not be
      exact (for 11 and 12 exits it moves four quotas by one), so there is no silent fallback.
  """
  if not os.path.exists(_TORCH_PRIOR_FILE):
    raise FileNotFoundError(
        f"{_TORCH_PRIOR_FILE} not found: the msdfuse_jax package install is incomplete (the exit prior "
        "table of the budgeted evaluation is package data; reinstall the package), or regenerate the "
        "table with `python experiments/make_torch_prior_table.py` (needs torch)")
  table = np.load(_TORCH_PRIOR_FILE)
  if table.ndim != 3 or table.shape[0] != NUM_BUDGET_POINTS + 1:
    raise ValueError(f"{_TORCH_PRIOR_FILE} has shape {table.shape}, not ({NUM_BUDGET_POINTS + 1}, K + 1, K): "
                     "regenerate it with `python experiments/make_torch_prior_table.py`")
  return table


def exit_prior(p: int, num_exits: int) -> np.ndarray:
  """The reference's geometric prior over exits for budget point `p`.

  The reference computes ``exp(log(q) * k) / sum_j exp(log(q) * j)`` with torch float32 kernels, which
  are not correctly rounded (on torch 2.13's CPU build, 8 of the 39 logs, some exps and many sums differ
  by an ULP from the correctly rounded value), and one ULP can move ``floor(N * prior_k)`` by one. So the
  values come from a table of torch's own results for K <= 24 (packaged ``torch_prior.npy``); beyond it they
  are computed in float32 with correctly rounded log/exp and a left-to-right sum, which agrees with torch to
  about 1 ULP.

  Args:
    p: budget point in 1..39; q = p / 20.
    num_exits: K.

  Returns:
    float32 array (K,).

  Raises:
    ValueError: on `p` outside 1..39.
    FileNotFoundError: when the packaged table ``torch_prior.npy`` is missing (an incomplete install).
  """
  p = _check_p(p)
  table = _torch_prior_table()
  if num_exits < table.shape[1]:
    return table[p, num_exits, :num_exits].copy()
  q = np.float32(p / 20)
  log_q = np.float32(math.log(float(q)))
  unnormalised = []
  for k in range(1, num_exits + 1):
    # torch.range(1, K) is float32, so log(q) * k is a float32 product before exp.
    exponent = np.float32(log_q * np.float32(k))
    unnormalised.append(np.float32(math.exp(float(exponent))))
  total = np.float32(0.0)
  for value in unnormalised:
    total = np.float32(total + value)
  return np.array(unnormalised, dtype=np.float32) / total


def exit_quotas(num_samples: int, prior: np.ndarray) -> np.ndarray:
  """Samples each exit should take on the validation set: `floor(N * prior_k)` in float32.

  Args:
    num_samples: N, the size of the whole validation set (a share of all samples, not
      of those still remaining).
    prior: float32 (K,) prior from `exit_prior`.

  Returns:
    int64 array (K,).
  """
  products = np.float32(num_samples) * np.asarray(prior, dtype=np.float32)
  return np.floor(products).astype(np.int64)


def _fit_from_confidence(conf: np.ndarray, p: int) -> np.ndarray:
  num_exits, num_samples = conf.shape
  quotas = exit_quotas(num_samples, exit_prior(p, num_exits))
  thresholds = np.full(num_exits, NEVER_EXIT, dtype=np.float32)
  exited = np.zeros(num_samples, dtype=bool)
  for k in range(num_exits - 1):
    remaining = conf[k][~exited]
    n_k = int(quotas[k])
    # The reference walks the remaining samples in descending confidence and takes the
    # n_k-th one; its value is the n_k-th largest whatever the order among ties.
    if 1 <= n_k <= remaining.size:
      pos = remaining.size - n_k
      thresholds[k] = np.partition(remaining, pos)[pos]
    # Every sample (exited or not) at or above T_k is marked, so ties exit too.
    exited |= conf[k] >= thresholds[k]
  thresholds[num_exits - 1] = ALWAYS_EXIT
  return thresholds


def fit_thresholds(val_probs: Any, p: int) -> np.ndarray:
  """Fits per-exit confidence thresholds on validation probabilities (reference step 3).

  Args:
    val_probs: (K, N, C) per-exit softmax probabilities of the validation set.
    p: budget point in 1..39 (q = p / 20; larger p sends more samples to later exits).

  Returns:
    float32 array (K,): T_k for k < K is a validation confidence, or 1e8 where no sample
    should exit; T_K = -1e8.
  """
  conf, _ = _confidences(validate_probs(val_probs, "val_probs"))
  return _fit_from_confidence(conf, p)


def _exit_index(conf: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  reaches = conf >= thresholds[:, None]  # float32 comparison, as in the reference
  reaches[-1] = True  # the last exit takes everybody left, whatever its threshold
  return reaches.argmax(axis=0)  # first exit whose threshold is reached


def _check_thresholds(thresholds: Any, num_exits: int) -> np.ndarray:
  arr = np.asarray(thresholds, dtype=np.float32)
  if arr.shape != (num_exits,):
    raise ValueError(f"thresholds must have shape ({num_exits},), one per exit; got {arr.shape}")
  return arr


def apply_thresholds(test_probs: Any, thresholds: Any) -> tuple[np.ndarray, np.ndarray]:
  """Sends each sample to the first exit whose confidence reaches its threshold.

  Args:
    test_probs: (K, N, C) per-exit softmax probabilities.
    thresholds: (K,) thresholds, e.g. from `fit_thresholds`; compared in float32. The last
      exit always accepts the samples left, as the reference's T_K = -1e8 does.

  Returns:
    `(exit_index, prediction)`: int arrays (N,), the 0-based exit each sample takes and
    the class predicted there (argmax of that exit's probabilities).
  """
  probs = validate_probs(test_probs, "test_probs")
  conf, preds = _confidences(probs)
  exits = _exit_index(conf, _check_thresholds(thresholds, probs.shape[0]))
  return exits, preds[exits, np.arange(probs.shape[1])]


def _expected_cost(counts: np.ndarray, num_samples: int, costs: np.ndarray) -> float:
  return float(sum(int(c) / num_samples * float(cost) for c, cost in zip(counts, costs)))


def dynamic_evaluation(val_probs: Any, val_labels: Any, test_probs: Any, test_labels: Any,
                       costs: Sequence[float]) -> list[dict[str, Any]]:
  """Budgeted batch classification curve: one point per p = 1..39 (the reference's budget points).

  Args:
    val_probs: (K, N_val, C) per-exit softmax probabilities of the validation set, on
      which thresholds are fitted.
    val_labels: (N_val,) integer labels. Not used by the reference's threshold fitting;
      validated so that a mismatched split fails loudly.
    test_probs: (K, N_test, C) per-exit softmax probabilities of the test set.
    test_labels: (N_test,) integer labels.
    costs: (K,) cumulative cost of running the model up to and including exit k.

  Returns:
    39 dicts, p ascending, each with `p` (int), `thresholds` (K floats, float32 values),
    `accuracy` (percent of test samples correct at the exit they took), `expected_cost`
    (sum_k count_k / N * cost_k), `exit_counts` (K ints) and `exit_fractions` (K floats,
    counts / N_test).

  Raises:
    ValueError: on shapes that do not agree, labels out of range, non-finite values, or
      a cost vector whose length is not K.
  """
  val = validate_probs(val_probs, "val_probs")
  test = validate_probs(test_probs, "test_probs")
  if val.shape[0] != test.shape[0] or val.shape[2] != test.shape[2]:
    raise ValueError(f"val_probs {val.shape} and test_probs {test.shape} must agree in the number "
                     "of exits K and classes C")
  validate_labels(val_labels, val, "val_labels", "val_probs")
  labels = validate_labels(test_labels, test, "test_labels", "test_probs")
  cost_vec = _check_costs(costs, val.shape[0])

  num_exits, num_test = test.shape[:2]
  val_conf, _ = _confidences(val)
  test_conf, test_preds = _confidences(test)
  # Correctness of every exit's prediction, looked up once a sample's exit is known.
  correct_at = test_preds == labels[None, :]
  columns = np.arange(num_test)
  points = []
  for p in range(1, NUM_BUDGET_POINTS + 1):
    thresholds = _fit_from_confidence(val_conf, p)
    exits = _exit_index(test_conf, thresholds)
    counts = np.bincount(exits, minlength=num_exits)
    num_correct = int(correct_at[exits, columns].sum())
    points.append({
        "p": p,
        "thresholds": [float(t) for t in thresholds],
        "accuracy": num_correct * 100.0 / num_test,  # same expression as the reference
        "expected_cost": _expected_cost(counts, num_test, cost_vec),
        "exit_counts": [int(c) for c in counts],
        "exit_fractions": [int(c) / num_test for c in counts],
    })
  return points


def thresholds_for_budget(val_probs: Any, costs: Sequence[float], budget: float) -> int:
  """Picks the budget point p to deploy under an average per-sample cost budget.

  For every p = 1..39, thresholds are fitted on the validation set and applied back to
  it; the validation expected cost is a good estimate of the test one (same
  distribution). Returned is the p whose validation expected cost is the largest one not
  exceeding `budget` (the most accurate choice under the budget, since accuracy grows
  with cost along the curve); among p with that same cost, the smallest p. Fit the
  thresholds to use with `fit_thresholds(val_probs, p)`.

  Args:
    val_probs: (K, N, C) per-exit softmax probabilities of the validation set.
    costs: (K,) cumulative per-exit costs, in the units of `budget`.
    budget: largest acceptable average cost per sample.

  Returns:
    p in 1..39.

  Raises:
    ValueError: on bad shapes, or when every p costs more than `budget` on validation
      (the message gives the cheapest achievable cost).
  """
  conf, _ = _confidences(validate_probs(val_probs, "val_probs"))
  return p_for_budget_from_confidence(conf, costs, budget)


def fit_from_confidence(conf: Any, p: int) -> np.ndarray:
  """`fit_thresholds` from the per-exit confidences (max softmax, (K, N) float32) alone: what an export
  keeps of its validation split to refit without the model (`msdfuse_jax.timebudget`)."""
  return _fit_from_confidence(np.asarray(conf, np.float32), _check_p(p))


def exits_from_confidence(conf: Any, thresholds: Any) -> np.ndarray:
  """The 0-based exit of every sample, from (K, N) confidences: `apply_thresholds` without predictions."""
  conf = np.asarray(conf, np.float32)
  return _exit_index(conf, _check_thresholds(thresholds, conf.shape[0]))


def p_for_budget_from_confidence(conf: Any, costs: Sequence[float], budget: float) -> int:
  """`thresholds_for_budget` from the (K, N) validation confidences alone (same choice, same errors)."""
  conf = np.asarray(conf, np.float32)
  cost_vec = _check_costs(costs, conf.shape[0])
  num_exits, num_samples = conf.shape
  best_p, best_cost = None, -math.inf
  cheapest = math.inf
  for p in range(1, NUM_BUDGET_POINTS + 1):
    exits = _exit_index(conf, _fit_from_confidence(conf, p))
    cost = _expected_cost(np.bincount(exits, minlength=num_exits), num_samples, cost_vec)
    cheapest = min(cheapest, cost)
    if best_cost < cost <= budget:  # strict: the first (smallest) p wins ties
      best_p, best_cost = p, cost
  if best_p is None:
    raise ValueError(f"budget {budget} is below the cheapest validation expected cost {cheapest} "
                     f"over p = 1..{NUM_BUDGET_POINTS}")
  return best_p
