"""Anytime classification under a deadline per chunk: the figures of ``msdfuse-infer --deadline_ms``.

`serving.Runner.run(images, deadline_ms=D)` gives each chunk (one batch of at most `batch_size` images) D
milliseconds from when it starts: stage 1 always runs, and stage k + 1 runs on the chunk's survivors only
if the elapsed time plus its predicted time fits in D; otherwise they take exit k. This module sums such
runs up over a test set (`summary`), sweeps D over the range where the network can be stopped between
its stages (`sweep_range_ms`, `sweep`), and builds the part of ``infer.json`` that holds them (`report`);
``anytime_deadline.png`` is drawn from the sweep by `msdfuse_jax.evaluation.report.write_deadline`.

The predicted times come from the runner's table `serving.Runner.stage_times` (stage -> bucket -> seconds;
`Runner.stage_seconds` measures it; a table stored with an export, once there is one, is set there
instead), each raised to what the runner has recently seen the stage take (`serving.OBSERVED_QUANTILE`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from msdfuse_jax import serving


def summary(result: serving.EarlyExitResult, labels: np.ndarray, num_exits: int) -> dict[str, Any]:
  """A deadline run's figures over its images.

  Args:
    result: `serving.Runner.run(..., deadline_ms=D)`'s result.
    labels: (N,) the images' labels.
    num_exits: K.

  Returns:
    ``deadline_ms``; ``met_fraction``, the fraction of chunks that finished within D;
    ``worst_overshoot_ms``, the largest time over D of any chunk (0.0 when every chunk met it);
    ``accuracy`` (%); ``exit_counts`` (images per exit); ``stages_run_counts`` (chunks per number of
    stages run, 1..K) and ``misses_by_stages_run`` (of those, how many overshot: a miss with 1 stage run
    is stage 1 alone taking longer than D, which no decision can avoid); ``median_chunk_ms``.
  """
  overshoot = result.overshoot_ms
  return {
      "deadline_ms": float(result.deadline_ms),
      "met_fraction": float(np.mean(result.deadline_met)),
      "worst_overshoot_ms": max(0.0, float(np.max(overshoot))),
      "accuracy": float(100.0 * np.mean(result.predictions == np.asarray(labels))),
      "exit_counts": np.bincount(result.exits - 1, minlength=num_exits).tolist(),
      "stages_run_counts": np.bincount(result.chunk_stages - 1, minlength=num_exits).tolist(),
      "misses_by_stages_run": np.bincount(result.chunk_stages[~result.deadline_met] - 1,
                                          minlength=num_exits).tolist(),
      "median_chunk_ms": float(1e3 * np.median(result.chunk_seconds)),
  }


def sweep_range_ms(runner: serving.Runner) -> tuple[float, float]:
  """(the first stage's time, the full network's) on one full chunk, in ms, as the runner predicts them
  (`serving.Runner.predicted_seconds`: its table, raised to what it has seen the stages take): stage 1
  alone, and every stage one after the other with every image passed on."""
  times = [runner.predicted_seconds(k, runner.batch_size) for k in range(1, runner.num_exits + 1)]
  return 1e3 * times[0], 1e3 * sum(times)


def sweep(runner: serving.Runner, images: np.ndarray, labels: np.ndarray, thresholds: Sequence[float],
          deadlines_ms: Sequence[float]) -> list[dict[str, Any]]:
  """`summary` of a run at each deadline (ms), in order."""
  return [summary(runner.run(images, thresholds, deadline_ms=d), labels, runner.num_exits)
          for d in deadlines_ms]


def report(runner: serving.Runner, images: np.ndarray, labels: np.ndarray, thresholds: Sequence[float],
           deadline_ms: float, sweep_points: int = 8) -> dict[str, Any]:
  """``infer.json``'s deadline figures: a run at `deadline_ms`, then a sweep of `sweep_points` deadlines
  from the first stage's time to the full network's (`sweep_range_ms`; none when 0).

  Args:
    runner: a warmed-up runner; its `stage_times` is measured first when it has none.
    images, labels: the test set.
    thresholds: the budget's K thresholds (confident images leave early whatever the deadline).
    deadline_ms: D, per chunk.
    sweep_points: how many deadlines the sweep runs.

  Returns:
    ``deadline_ms``, ``deadline_met_fraction``, ``worst_overshoot_ms``, ``deadline_accuracy``,
    ``deadline_exit_counts``, ``deadline_stages_run_counts``, ``deadline_misses_by_stages_run``,
    ``deadline_chunk_size`` (images per chunk),
    ``deadline_chunk_ms`` and ``deadline_chunk_stages`` (each chunk's time and stages run),
    ``deadline_sweep`` (a `summary` per deadline), ``deadline_sweep_range_ms`` and
    ``deadline_sweep_min_met_fraction`` (None without a sweep).
  """
  result = runner.run(images, thresholds, deadline_ms=deadline_ms)
  figures = summary(result, labels, runner.num_exits)
  lo, hi = sweep_range_ms(runner)  # after the run: with what it saw stage 1 take
  deadlines_ms = np.linspace(lo, hi, sweep_points) if sweep_points else []
  points = sweep(runner, images, labels, thresholds, deadlines_ms)
  return {
      "deadline_ms": figures["deadline_ms"],
      "deadline_met_fraction": figures["met_fraction"],
      "worst_overshoot_ms": figures["worst_overshoot_ms"],
      "deadline_accuracy": figures["accuracy"],
      "deadline_exit_counts": figures["exit_counts"],
      "deadline_stages_run_counts": figures["stages_run_counts"],
      "deadline_misses_by_stages_run": figures["misses_by_stages_run"],
      "deadline_chunk_size": result.chunk_size,
      "deadline_chunk_ms": [1e3 * t for t in result.chunk_seconds],
      "deadline_chunk_stages": result.chunk_stages.tolist(),
      "deadline_sweep": points,
      "deadline_sweep_range_ms": [lo, hi],
      "deadline_sweep_min_met_fraction": min((p["met_fraction"] for p in points), default=None),
  }
