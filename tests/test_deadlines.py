"""Anytime deadlines (msdfuse_jax.deadlines): the figures of a run, the sweep, the figure, the flag's errors.

The runner's own deadline behaviour, on real programs, is tested in tests/test_export.py; here a runner of
fake programs (fixed confidences, no compilation) gives exact answers.
"""

from __future__ import annotations

import subprocess
import types

import jax.numpy as jnp
import numpy as np
import pytest

from msdfuse_jax import deadlines, serving
from msdfuse_jax.evaluation import report
from tests.conftest import tool_command

BATCH = 4


def _fake_runner() -> serving.Runner:
  """Three stages on images whose pixel (0, 0, 0) is x: exit k's confidence is x / 255 + 0.3 (k - 1) and
  its prediction (x + k) mod 10; the state is x. Batches of 4, buckets 4 and 2, chunks of 2 batches."""
  def pad(x):
    return jnp.pad(x, (0, BATCH - x.shape[0]))

  def first(images):
    x = images[:, 0, 0, 0].astype(jnp.float32)
    return pad(x), x / 255, (x.astype(jnp.int32) + 1) % 10

  def later(k, states, index):
    x = jnp.concatenate(states)[index]
    return (pad(x) if k < 3 else (), x / 255 + 0.3 * (k - 1), (x.astype(jnp.int32) + k) % 10)

  programs = {(k, b): first if k == 1 else (lambda *a, k=k: later(k, *a))
              for k in (1, 2, 3) for b in (4, 2)}
  return serving.Runner(programs, 3, BATCH, [4, 2], 2, [0.9, 0.9, -1e8], (2, 2, 1))


def _images(n=10):
  x = np.arange(n, dtype=np.uint8) * 25  # confidences 0, 0.098, ..., 0.88 at exit 1
  return np.broadcast_to(x[:, None, None, None], (n, 2, 2, 1)).copy()


def test_summary_known_answers():
  result = serving.EarlyExitResult(np.array([1, 2, 3, 4, 5]), np.array([1, 1, 3, 2, 2]), 0.04, chunk_size=2,
                                   chunk_seconds=np.array([0.010, 0.025, 0.004]),
                                   chunk_stages=np.array([1, 3, 2]), deadline_ms=20.0)
  assert [e.tolist() for e in result.chunk_exits] == [[1, 1], [3, 2], [2]]
  np.testing.assert_allclose(result.overshoot_ms, [-10.0, 5.0, -16.0])
  assert deadlines.summary(result, np.array([1, 0, 3, 0, 5]), 3) == pytest.approx({
      "deadline_ms": 20.0, "met_fraction": 2 / 3, "worst_overshoot_ms": 5.0, "accuracy": 60.0,
      "exit_counts": [2, 2, 1], "stages_run_counts": [1, 1, 1], "misses_by_stages_run": [0, 0, 1],
      "median_chunk_ms": 10.0})
  result.deadline_ms = 30.0  # every chunk within it: no overshoot
  assert deadlines.summary(result, np.zeros(5), 3)["worst_overshoot_ms"] == 0.0


def test_sweep_range_is_the_first_stage_to_the_whole_network_as_predicted():
  runner = _fake_runner()
  runner.stage_times = {1: {4: 0.002, 2: 0.001}, 2: {4: 0.003, 2: 0.002}, 3: {4: 0.001, 2: 0.0005}}
  assert deadlines.sweep_range_ms(runner) == pytest.approx((2.0, 6.0))
  # Stage 1 seen taking 2 to 4 ms at bucket 4: its prediction is their OBSERVED_QUANTILE (0.99: 3.98 ms).
  runner.observed[(1, 4)] = [0.002, 0.003, 0.004]
  first = 1e3 * np.quantile([0.002, 0.003, 0.004], serving.OBSERVED_QUANTILE)
  assert 3 < first <= 4 and deadlines.sweep_range_ms(runner) == pytest.approx((first, first + 4.0))
  # A table of the batch size's times only serves the smaller bucket too.
  runner.stage_times[2] = {4: 0.003}
  assert runner.predicted_seconds(2, 6) == pytest.approx(0.006)
  # A table object holding the mapping as `seconds` (as a stored stage table would be) is read the same way.
  runner.stage_times, runner.observed = types.SimpleNamespace(seconds=runner.stage_times), {}
  assert deadlines.sweep_range_ms(runner) == pytest.approx((2.0, 6.0))


def test_report_sweeps_and_cuts_where_the_table_says():
  """Table: stages take 1, 2 and 5 s; the sweep runs D = 1, 4.5 and 8 s. The fake programs take
  milliseconds, so stage k + 1 runs where its own time fits in D: stage 1 only, stages 1-2, all; every chunk
  meets D."""
  runner, images = _fake_runner(), _images()
  labels = (images[:, 0, 0, 0].astype(np.int64) + 2) % 10  # exit 2's predictions are right
  runner.stage_times = {k: {4: t, 2: t} for k, t in ((1, 1.0), (2, 2.0), (3, 5.0))}
  _, sim_exits = runner.simulate(images)
  assert sim_exits.tolist() == [3] * 7 + [2] * 3  # chunks [0..3], [4..7], [8, 9]: 3, 3 and 2 stages
  out = deadlines.report(runner, images, labels, runner.thresholds, 1e9, sweep_points=3)
  assert out["deadline_ms"] == 1e9 and out["deadline_met_fraction"] == 1.0
  assert out["worst_overshoot_ms"] == 0.0 and out["deadline_sweep_range_ms"] == [1e3, 8e3]
  assert out["deadline_exit_counts"] == [0, 3, 7] and out["deadline_accuracy"] == 30.0
  assert out["deadline_chunk_size"] == BATCH and len(out["deadline_chunk_ms"]) == 3
  assert out["deadline_stages_run_counts"] == [0, 1, 2] and out["deadline_chunk_stages"] == [3, 3, 2]
  assert out["deadline_misses_by_stages_run"] == [0, 0, 0]
  sweep = out["deadline_sweep"]
  assert [p["deadline_ms"] for p in sweep] == [1e3, 4.5e3, 8e3]
  assert [p["exit_counts"] for p in sweep] == [[10, 0, 0], [0, 10, 0], [0, 3, 7]]
  assert [p["accuracy"] for p in sweep] == [0.0, 100.0, 30.0]
  assert [p["stages_run_counts"] for p in sweep] == [[3, 0, 0], [0, 3, 0], [0, 1, 2]]
  assert out["deadline_sweep_min_met_fraction"] == 1.0 == min(p["met_fraction"] for p in sweep)
  assert deadlines.report(runner, images, labels, runner.thresholds, 1e9, 0)["deadline_sweep"] == []


def test_the_runner_keeps_the_latest_observed_times_only():
  runner = _fake_runner()
  runner.stage_times = {k: {4: 1e-9, 2: 1e-9} for k in (1, 2, 3)}
  runner.run(np.repeat(_images(), 30, axis=0), deadline_ms=1e9)  # 300 images: 75 chunks of 4
  assert len(runner.observed[(1, 4)]) == serving.OBSERVED_WINDOW < 75
  assert all(0 < len(seen) <= serving.OBSERVED_WINDOW for seen in runner.observed.values())


def test_deadline_figure(tmp_path):
  points = [{"deadline_ms": d, "accuracy": a, "met_fraction": m}
            for d, a, m in ((1.0, 50.0, 0.5), (2.0, 60.0, 0.97), (3.0, 65.0, 1.0))]
  path = report.write_deadline(tmp_path / "eval", points, deadline_ms=2.0, no_deadline_accuracy=66.0,
                               model="msdnet_tiny", dataset="cifar10", step=6)
  assert path == tmp_path / "eval" / "anytime_deadline.png" and path.read_bytes()[:4] == b"\x89PNG"
  fig = report.deadline_figure(points, deadline_ms=1e9)  # far from the sweep: in the legend only
  acc, met = fig.axes
  assert "msdnet_tiny" not in acc.get_title() and "deadline per chunk" in acc.get_title()
  assert max(acc.get_xlim()) < 10 and "asked: 1e+09 ms (off the axis)" in [
      t.get_text() for t in met.get_legend().get_texts()]
  # A flat curve (32.6-32.9 %) is drawn on 2 points of accuracy, not stretched to the axis' height.
  flat = [{**pt, "accuracy": a} for pt, a in zip(points, (32.6, 32.9, 32.7))]
  low, high = report.deadline_figure(flat).axes[0].get_ylim()
  assert high - low == pytest.approx(2.0) and low < 32.6 and high > 32.9
  with pytest.raises(ValueError, match="at least one point"):
    report.deadline_figure([])


def test_infer_refuses_a_non_positive_deadline_in_one_line(tmp_path):
  command = tool_command("infer_main", f"--workdir={tmp_path}", "--p=3", "--deadline_ms=0")
  done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert done.returncode == 2 and "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1] == ("error: --deadline_ms: the deadline must be a positive "
                                                  "number of milliseconds per chunk, got 0.0")
