"""Anytime prediction metrics: every exit evaluated on the whole test set.

Pure numpy over per-exit softmax probabilities shaped (K, N, C) (K exits, N samples, C
classes), so that the curves are testable without a model. The anytime curve of a run is
`anytime_rows(probs, labels, costs_report["exits"])`: one row per exit with its cumulative
costs (from `msdfuse_jax.costs`) beside its top-1, top-5 and calibration error.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from msdfuse_jax.evaluation.budget import validate_labels, validate_probs

ECE_BINS = 15  # Guo et al. (2017) and most calibration papers
COST_KEYS = ("op_counter", "macs", "xla_flops")

__all__ = ["ECE_BINS", "COST_KEYS", "topk_accuracy", "expected_calibration_error",
           "per_exit_metrics", "anytime_rows"]


def topk_accuracy(probs: Any, labels: Any, k: int) -> np.ndarray:
  """Per-exit top-k accuracy in percent.

  A sample is correct when fewer than k classes rank above its label, classes ordered by
  probability and, among equal probabilities, by index (the order of a stable sort of
  -probs). With k = 1 this is exactly `argmax == label`, numpy's first-index argmax, the
  prediction budgeted evaluation uses, so both agree on ties. k is clipped to C.

  Args:
    probs: (K, N, C) per-exit probabilities (or logits: only the order matters).
    labels: (N,) integer labels.
    k: how many top classes count, >= 1.

  Returns:
    float64 array (K,).
  """
  probs = validate_probs(probs, "probs")
  labels = validate_labels(labels, probs, "labels", "probs")
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}")
  k = min(int(k), probs.shape[2])
  label_prob = np.take_along_axis(probs, labels[None, :, None], axis=2)  # (K, N, 1)
  earlier = np.arange(probs.shape[2])[None, None, :] < labels[None, :, None]
  # Rank of the label: classes strictly more probable, plus equally probable ones listed
  # before it. Computed per exit to keep the (N, C) temporaries small.
  rank = np.stack([
      (probs[e] > label_prob[e]).sum(axis=1) + ((probs[e] == label_prob[e]) & earlier[0]).sum(axis=1)
      for e in range(probs.shape[0])
  ])
  return 100.0 * (rank < k).mean(axis=1)


def expected_calibration_error(probs: Any, labels: Any, num_bins: int = ECE_BINS) -> np.ndarray:
  """Per-exit expected calibration error of the top-1 prediction.

  `ECE = sum_b |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|` over `num_bins`
  equal-width bins of the confidence (max probability), bin b covering
  (b / num_bins, (b + 1) / num_bins]; a confidence of exactly 0 falls in the first bin.

  Args:
    probs: (K, N, C) per-exit softmax probabilities.
    labels: (N,) integer labels.
    num_bins: number of bins, 15 by default.

  Returns:
    float64 array (K,) of fractions in [0, 1] (not percent).
  """
  probs = validate_probs(probs, "probs")
  labels = validate_labels(labels, probs, "labels", "probs")
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1; got {num_bins}")
  conf = probs.max(axis=2).astype(np.float64)
  correct = (probs.argmax(axis=2) == labels[None, :]).astype(np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  # side="left" puts a value equal to an upper edge in the bin below: right-closed bins.
  bins = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, num_bins - 1)
  num_samples = probs.shape[1]
  ece = np.empty(probs.shape[0])
  for e in range(probs.shape[0]):
    # |B| * |acc - conf| = |sum(correct) - sum(conf)| within a bin, so two bincounts suffice.
    gap = (np.bincount(bins[e], weights=correct[e], minlength=num_bins)
           - np.bincount(bins[e], weights=conf[e], minlength=num_bins))
    ece[e] = np.abs(gap).sum() / num_samples
  return ece


def per_exit_metrics(probs: Any, labels: Any, num_bins: int = ECE_BINS) -> dict[str, np.ndarray]:
  """Top-1 and top-5 accuracy (percent) and ECE (fraction) of every exit.

  Args:
    probs: (K, N, C) per-exit softmax probabilities.
    labels: (N,) integer labels.
    num_bins: ECE bins.

  Returns:
    {"top1": (K,), "top5": (K,), "ece": (K,)} float64 arrays.
  """
  return {
      "top1": topk_accuracy(probs, labels, 1),
      "top5": topk_accuracy(probs, labels, 5),
      "ece": expected_calibration_error(probs, labels, num_bins),
  }


def _cost_value(value: Any) -> float | int | None:
  if value is None:
    return None
  if isinstance(value, (int, np.integer)):
    return int(value)
  value = float(value)
  return value if np.isfinite(value) else None  # NaN = not measured (e.g. XLA counting skipped)


def anytime_rows(probs: Any, labels: Any, costs: Sequence[Mapping[str, Any]],
                 num_bins: int = ECE_BINS) -> list[dict[str, Any]]:
  """The anytime curve: per-exit metrics beside per-exit cumulative costs.

  Args:
    probs: (K, N, C) per-exit softmax probabilities of the test set.
    labels: (N,) integer labels.
    costs: K mappings, exit order, with keys among `op_counter`, `macs`, `xla_flops`
      (e.g. `costs_report(...)["exits"]` of `msdfuse_jax.costs`, or the `exits` list of a
      run's `eval/costs.json`); a missing key or a NaN gives None.
    num_bins: ECE bins.

  Returns:
    K dicts with keys `exit` (1-based), `op_counter`, `macs`, `xla_flops`, `top1`, `top5`
    (percent) and `ece` (fraction).

  Raises:
    ValueError: when `costs` does not have one entry per exit.
  """
  metrics = per_exit_metrics(probs, labels, num_bins)
  num_exits = metrics["top1"].shape[0]
  if len(costs) != num_exits:
    raise ValueError(f"costs must have one entry per exit: {num_exits} exits in probs, "
                     f"{len(costs)} cost entries")
  rows = []
  for e, cost in enumerate(costs):
    row: dict[str, Any] = {"exit": e + 1}
    row.update({key: _cost_value(cost.get(key)) for key in COST_KEYS})
    row.update({name: float(values[e]) for name, values in metrics.items()})
    rows.append(row)
  return rows
