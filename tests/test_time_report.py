"""Accuracy against realised time from infer.json files: loading, the figure, the equal-time comparison."""

import json

import numpy as np
import pytest

from msdfuse_jax.evaluation import time_report
from msdfuse_jax.tools import plot_main as plot


def _point(path, *, budget_ms=None, cost_budget=None, realised, accuracy, model="msdnet_anytime7"):
  point = {"model": model, "dataset": "cifar10", "p": 5, "budget_ms": budget_ms, "cost_budget": cost_budget,
           "predicted_ms_per_image": realised, "realised_ms_per_image": realised, "accuracy": accuracy,
           "stage_times": {"device": "cpu (test)"}}
  path.write_text(json.dumps(point))
  return path


@pytest.fixture
def points_dir(tmp_path):
  folder = tmp_path / "points"
  folder.mkdir()
  for i, (ms, acc) in enumerate([(1.0, 50.0), (2.0, 54.0), (3.0, 55.0)]):  # the ops-fitted curve
    _point(folder / f"ops_{i}.json", cost_budget=1e7 * (i + 1), realised=ms, accuracy=acc)
  _point(folder / "time_0.json", budget_ms=1.6, realised=1.5, accuracy=53.5)
  _point(folder / "time_1.json", budget_ms=4.0, realised=3.8, accuracy=55.5)  # beyond the ops curve
  (folder / "not_a_point.json").write_text(json.dumps({"something": "else"}))
  return folder


def test_points_are_grouped_by_model_and_fit_and_compared_at_equal_time(points_dir):
  points = time_report.load_points([points_dir])
  assert len(points) == 5 and {p["label"] for p in points} == {"msdnet_anytime7 / cifar10"}
  assert sorted(p["kind"] for p in points) == ["ops budget"] * 3 + ["time budget"] * 2
  rows = time_report.compare_at_equal_time(points)
  assert [r["budget_ms"] for r in rows] == [1.6, 4.0]
  # At 1.5 ms the ops-fitted curve reads 52 % (halfway from 50 at 1 ms to 54 at 2 ms): +1.5 points.
  assert rows[0]["ops_accuracy_at_equal_time"] == pytest.approx(52.0)
  assert rows[0]["gain"] == pytest.approx(1.5)
  assert rows[0]["realised_over_budget"] == pytest.approx(1.5 / 1.6)
  assert rows[1]["ops_accuracy_at_equal_time"] is None and rows[1]["gain"] is None
  fig = time_report.time_figure(points)
  ax = fig.axes[0]
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels == ["msdnet_anytime7 / cifar10, time budget", "msdnet_anytime7 / cifar10, ops budget"]
  assert any(np.allclose(line.get_xydata(), [[1.0, 50.0], [2.0, 54.0], [3.0, 55.0]]) for line in ax.lines
             if len(line.get_xydata()) == 3)
  assert "realised mean time per image" in ax.get_xlabel() and "cpu (test)" in ax.get_title()


def test_plot_time_and_its_errors(points_dir, tmp_path, capsys):
  out = tmp_path / "time.png"
  assert plot.run(["--time", str(points_dir), "--out", str(out)]) == 0
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert plot.run(["--time", str(tmp_path / "nowhere.json"), "--out", str(out)]) == 1
  assert "nowhere.json not found" in capsys.readouterr().err
  old = _point(tmp_path / "old.json", realised=1.0, accuracy=50.0)
  old.write_text(json.dumps({"accuracy": 50.0}))
  assert plot.run(["--time", str(old), "--out", str(out)]) == 1
  assert "has no ['realised_ms_per_image']" in capsys.readouterr().err
  assert plot.run(["--out", str(out)]) == 2
  assert "give run directories" in capsys.readouterr().err
