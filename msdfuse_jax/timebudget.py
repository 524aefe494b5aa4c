"""Time budgets: early-exit thresholds fitted to a mean time per image measured on the serving machine.

A literature cost ("FLOPs") does not predict time: on a CPU a stage of few channels at a fine resolution takes
far more of the time than of the cost. So a budget in milliseconds is fitted to the stages' own times:

* `StageTimes`: each stage's program timed alone at every bucket size the runner uses
  (`serving.Runner.stage_seconds`), with the device, batch size and precision it was measured at.
* `predicted_seconds_per_image`: the runner's mean time per image when a given fraction of the images reaches
  each stage. The runner cuts its images into chunks of ``batch_size * pieces``; in each chunk stage k runs
  on full batches of the survivors and pads the last one to the smallest bucket that holds it
  (`serving.Runner`), so the prediction adds up exactly those calls (`stage_calls`), each at its measured
  time.
* `fit_time_budget`: the thresholds of the reference's budget points p = 1..39 (`budget.fit_from_confidence`,
  what ``msdfuse-eval`` plots), each fitted on the validation split's confidences and applied back to them to
  get the fractions reaching every stage; chosen is the point with the largest predicted time not above the
  budget (ties: the smaller p), as ``--budget`` chooses the largest validation cost: along the reference's
  curve accuracy grows with the time spent, and the validation split's accuracy, which is also reported, is
  too noisy (a few hundred to 5,000 images) to rank neighbouring points by.

Everything here is numpy, so that `msdfuse_jax.serving` (jax and numpy only) can refit an export's
thresholds from what it stores (`save_validation`: per-exit confidences and correctness) without the model.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from msdfuse_jax.evaluation import budget

VALIDATION_FILE = "validation.npz"  # inside an export directory
FAMILY = (f"the reference's budget points p = 1..{budget.NUM_BUDGET_POINTS} (q = p/20), fitted on the "
          "validation split")
CRITERION = "the largest predicted mean time per image not above the budget (ties: the smaller p)"


@dataclasses.dataclass(frozen=True)
class StageTimes:
  """Each stage's time alone, at each bucket size, and where it was measured.

  Attributes:
    seconds: stage k (1-based) -> bucket size -> best seconds per call of that program.
    batch_size: the runner's batch, its largest bucket.
    buckets: the bucket sizes, largest first.
    pieces: batches per chunk (`serving.Runner.pieces`).
    device: the device the times were taken on (`serving.describe_device`).
    matmul_precision: the jax.default_matmul_precision of the timed programs.
    measured_on: which programs ("the exported programs", "the in-process programs").
  """

  seconds: Mapping[int, Mapping[int, float]]
  batch_size: int
  buckets: tuple[int, ...]
  pieces: int
  device: str = "unknown"
  matmul_precision: str = "default"
  measured_on: str = ""

  def __post_init__(self):
    seconds = {int(k): {int(b): float(t) for b, t in row.items()} for k, row in self.seconds.items()}
    object.__setattr__(self, "seconds", seconds)
    object.__setattr__(self, "buckets", tuple(sorted((int(b) for b in self.buckets), reverse=True)))
    if sorted(seconds) != list(range(1, len(seconds) + 1)) or not seconds:
      raise ValueError(f"stage times must cover stages 1..K, got stages {sorted(seconds)}")
    for k, row in seconds.items():
      if sorted(row, reverse=True) != list(self.buckets):
        raise ValueError(f"stage {k}'s times are at buckets {sorted(row, reverse=True)}, not at the runner's "
                         f"{list(self.buckets)}")
      if not all(math.isfinite(t) and t > 0 for t in row.values()):
        raise ValueError(f"stage {k}'s times must be positive seconds, got {row}")

  @property
  def num_exits(self) -> int:
    return len(self.seconds)

  def to_json(self) -> dict[str, Any]:
    """The manifest's and infer.json's ``stage_times`` record (string keys, as JSON has)."""
    return {"seconds": {str(k): {str(b): t for b, t in row.items()} for k, row in self.seconds.items()},
            "ms_per_image_at_batch_size": [1e3 * self.seconds[k][self.batch_size] / self.batch_size
                                           for k in sorted(self.seconds)],
            "batch_size": self.batch_size, "buckets": list(self.buckets), "pieces": self.pieces,
            "device": self.device, "matmul_precision": self.matmul_precision, "measured_on": self.measured_on}

  @classmethod
  def from_json(cls, record: Mapping[str, Any]) -> "StageTimes":
    """Reads `to_json`'s record (the derived ``ms_per_image_at_batch_size`` is ignored)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{key: value for key, value in record.items() if key in fields})


def _bucket(n: int, buckets: Sequence[int]) -> int:
  return min(b for b in buckets if b >= n)


def stage_calls(num_images: int, reaching: Sequence[float], batch_size: int, buckets: Sequence[int],
                pieces: int) -> dict[tuple[int, int], int]:
  """The (stage, bucket) calls `serving.Runner.run` makes on `num_images` images when a fraction
  ``reaching[k-1]`` of every chunk reaches stage k (rounded to whole images per chunk).

  Returns:
    (stage, bucket size) -> number of calls.
  """
  calls: dict[tuple[int, int], int] = {}
  chunk = batch_size * pieces
  for lo in range(0, num_images, chunk):
    size = min(chunk, num_images - lo)
    for k, fraction in enumerate(reaching, start=1):
      survivors = size if k == 1 else int(math.floor(size * float(fraction) + 0.5))
      full, rest = divmod(survivors, batch_size)
      if full:
        calls[(k, batch_size)] = calls.get((k, batch_size), 0) + full
      if rest:
        key = (k, _bucket(rest, buckets))
        calls[key] = calls.get(key, 0) + 1
  return calls


def predicted_seconds_per_image(reaching: Sequence[float], times: StageTimes,
                                num_images: int | None = None) -> float:
  """The runner's predicted mean seconds per image: every call of `stage_calls` at its measured time.

  Args:
    reaching: (K,) fraction of the images that reach each stage (the first is 1).
    times: the stage time table.
    num_images: how many images a run classifies (default: one full chunk, ``batch_size * pieces``).
  """
  if len(reaching) != times.num_exits:
    raise ValueError(f"need the fraction reaching each of the {times.num_exits} stages, got {len(reaching)}")
  num_images = num_images or times.batch_size * times.pieces
  calls = stage_calls(num_images, reaching, times.batch_size, times.buckets, times.pieces)
  return sum(n * times.seconds[k][b] for (k, b), n in calls.items()) / num_images


def reaching_fractions(exits: np.ndarray, num_exits: int) -> np.ndarray:
  """(K,) fraction of the samples that reach stage k, from their 0-based exits."""
  counts = np.bincount(np.asarray(exits), minlength=num_exits)
  return (len(exits) - np.concatenate([[0], np.cumsum(counts)[:-1]])) / len(exits)


def check_validation(conf: Any, correct: Any) -> tuple[np.ndarray, np.ndarray]:
  """The validation split's (K, N) confidences as float32 and correctness as bool, checked."""
  conf, correct = np.asarray(conf, np.float32), np.asarray(correct, bool)
  if conf.ndim != 2 or conf.shape != correct.shape or not conf.size:
    raise ValueError(f"validation confidences and correctness must both be (K, N), got {conf.shape} and "
                     f"{correct.shape}")
  return conf, correct


def candidates(conf: Any, correct: Any, times: StageTimes, num_images: int | None = None
               ) -> list[dict[str, Any]]:
  """Every budget point of the family (`FAMILY`) with its predicted time on `times`' machine.

  Args:
    conf: (K, N) validation confidences (max softmax) per exit.
    correct: (K, N) whether exit k's prediction of sample n is right.
    times: the stage time table.
    num_images: images per run the prediction is for (`predicted_seconds_per_image`).

  Returns:
    One dict per p = 1..39: ``p``, ``thresholds`` (float32 (K,)), ``reaching`` (the validation fractions
    reaching each stage), ``predicted_ms_per_image`` and ``val_accuracy`` (percent).
  """
  conf, correct = check_validation(conf, correct)
  if conf.shape[0] != times.num_exits:
    raise ValueError(f"the validation data has {conf.shape[0]} exits, the stage times {times.num_exits}")
  columns = np.arange(conf.shape[1])
  rows = []
  for p in range(1, budget.NUM_BUDGET_POINTS + 1):
    thresholds = budget.fit_from_confidence(conf, p)
    exits = budget.exits_from_confidence(conf, thresholds)
    reaching = reaching_fractions(exits, conf.shape[0])
    rows.append({"p": p, "thresholds": thresholds, "reaching": reaching,
                 "predicted_ms_per_image": 1e3 * predicted_seconds_per_image(reaching, times, num_images),
                 "val_accuracy": 100.0 * float(np.mean(correct[exits, columns]))})
  return rows


def first_stage_ms(times: StageTimes, num_images: int | None = None) -> float:
  """Predicted ms per image of stage 1 alone (every image runs it): no budget below it can be met."""
  return 1e3 * predicted_seconds_per_image([1.0] + [0.0] * (times.num_exits - 1), times, num_images)


def fit_time_budget(conf: Any, correct: Any, times: StageTimes, budget_ms: float,
                    num_images: int | None = None) -> dict[str, Any]:
  """The budget point whose predicted mean time per image is the largest not above `budget_ms` (`CRITERION`).

  Args:
    conf, correct: (K, N) validation confidences and correctness (`candidates`).
    times: the stage time table of the machine (and runner) that will classify.
    budget_ms: the largest acceptable predicted mean milliseconds per image.
    num_images: images per run the prediction is for (default: one full chunk).

  Returns:
    dict with ``p``, ``thresholds`` (float32 (K,)), ``budget_ms``, ``predicted_ms_per_image``,
    ``val_accuracy``, ``reaching``, ``num_images``, ``family``, ``criterion`` and ``points`` (every
    candidate's p, predicted ms per image and validation accuracy).

  Raises:
    ValueError: for a budget that is not a positive number, below the first stage's predicted time, or below
      every candidate's predicted time (each message says the figure the budget missed).
  """
  if isinstance(budget_ms, bool) or not isinstance(budget_ms, (int, float, np.floating)) or not (
      math.isfinite(budget_ms) and budget_ms > 0):
    raise ValueError(f"budget_ms must be a positive number of milliseconds per image, got {budget_ms}")
  num_images = num_images or times.batch_size * times.pieces
  first = first_stage_ms(times, num_images)
  if budget_ms < first:
    raise ValueError(f"budget_ms={budget_ms:g} is impossible: it is below the first stage's predicted time, "
                     f"{first:.4g} ms per image on {times.device} (batch {times.batch_size}, {num_images} "
                     "images per run), which every image pays")
  rows = candidates(conf, correct, times, num_images)
  fitting = [row for row in rows if row["predicted_ms_per_image"] <= budget_ms]
  if not fitting:
    cheapest = min(rows, key=lambda row: row["predicted_ms_per_image"])
    raise ValueError(f"budget_ms={budget_ms:g} is below the cheapest fit's predicted time, "
                     f"{cheapest['predicted_ms_per_image']:.4g} ms per image (p = {cheapest['p']}) on "
                     f"{times.device}; the first stage alone is {first:.4g}")
  best = max(fitting, key=lambda row: (row["predicted_ms_per_image"], -row["p"]))
  return {"p": best["p"], "thresholds": best["thresholds"], "budget_ms": float(budget_ms),
          "predicted_ms_per_image": best["predicted_ms_per_image"], "val_accuracy": best["val_accuracy"],
          "reaching": [float(f) for f in best["reaching"]], "num_images": int(num_images),
          "family": FAMILY, "criterion": CRITERION,
          "points": [{"p": row["p"], "predicted_ms_per_image": row["predicted_ms_per_image"],
                      "val_accuracy": row["val_accuracy"]} for row in rows]}


def fit_ops_budget(conf: Any, exit_costs: Sequence[float], budget_ops: float) -> dict[str, Any]:
  """``--budget``'s fit from the validation confidences alone: the point whose validation expected cost is
  the largest not above `budget_ops` (`budget.thresholds_for_budget`, the same choice).

  Returns:
    dict with ``p``, ``thresholds`` and ``expected_val_cost``.
  """
  conf = np.asarray(conf, np.float32)
  if not (math.isfinite(budget_ops) and budget_ops > 0):
    raise ValueError(f"the ops budget must be a positive average cost per image, got {budget_ops}")
  p = budget.p_for_budget_from_confidence(conf, exit_costs, budget_ops)
  thresholds = budget.fit_from_confidence(conf, p)
  counts = np.bincount(budget.exits_from_confidence(conf, thresholds), minlength=conf.shape[0])
  return {"p": p, "thresholds": thresholds,
          "expected_val_cost": float(np.dot(counts / conf.shape[1], np.asarray(exit_costs, np.float64)))}


def save_validation(directory: str, conf: Any, correct: Any) -> str:
  """Writes the validation split's per-exit confidences (float32) and correctness (bits) into `directory`.

  Returns:
    The file's path (`VALIDATION_FILE` in `directory`).
  """
  conf, correct = check_validation(conf, correct)
  path = os.path.join(directory, VALIDATION_FILE)
  np.savez_compressed(path, confidence=conf, correct=np.packbits(correct, axis=1),
                      num_images=np.int64(conf.shape[1]))
  return path


def load_validation(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads `save_validation`'s file: ((K, N) float32 confidences, (K, N) bool correctness).

  Raises:
    FileNotFoundError: when `directory` holds no such file.
  """
  path = os.path.join(directory, VALIDATION_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} is missing: this export keeps no validation data to refit its "
                            "thresholds; export again")
  with np.load(path) as data:
    conf = data["confidence"]
    correct = np.unpackbits(data["correct"], axis=1, count=int(data["num_images"])).astype(bool)
  return check_validation(conf, correct)


def validation_from_probs(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
  """(confidence, correctness) per exit and sample from (K, N, C) probabilities and (N,) labels."""
  probs = budget.validate_probs(probs, "val_probs")
  labels = budget.validate_labels(labels, probs, "val_labels", "val_probs")
  return probs.max(axis=2), probs.argmax(axis=2) == labels[None, :]


def fit_record(fit: Mapping[str, Any]) -> dict[str, Any]:
  """`fit_time_budget`'s result as JSON (thresholds as floats), for a manifest or infer.json."""
  return {key: ([float(t) for t in value] if key == "thresholds" else value) for key, value in fit.items()}
