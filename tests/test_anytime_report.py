"""Tests for msdfuse_jax.evaluation.anytime, msdfuse_jax.evaluation.report and msdfuse-plot."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msdfuse_jax.evaluation import anytime, budget, report
from msdfuse_jax.tools import plot_main as plot

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_REFERENCE = REPO / "experiments" / "reference_points_example.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _probs_from_conf(conf, preds, num_classes: int = 10) -> np.ndarray:
  """(K, N, C) float32 probabilities whose max is `conf` (> 1 / C) at class `preds`."""
  conf = np.asarray(conf, dtype=np.float64)
  probs = np.repeat(((1.0 - conf) / (num_classes - 1))[..., None], num_classes, axis=-1)
  np.put_along_axis(probs, np.asarray(preds)[..., None], conf[..., None], axis=-1)
  return probs.astype(np.float32)


def _is_png(path: Path) -> bool:
  return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_topk_known_answers():
  probs = np.array([[[0.5, 0.2, 0.1, 0.1, 0.05, 0.05],
                     [0.5, 0.2, 0.1, 0.1, 0.05, 0.05],
                     [0.3, 0.25, 0.2, 0.15, 0.1, 0.0]]])
  labels = np.array([0, 1, 5])  # rank 0, rank 1, rank 5
  np.testing.assert_allclose(anytime.topk_accuracy(probs, labels, 1), [100 / 3])
  np.testing.assert_allclose(anytime.topk_accuracy(probs, labels, 2), [200 / 3])
  np.testing.assert_allclose(anytime.topk_accuracy(probs, labels, 5), [200 / 3])
  np.testing.assert_allclose(anytime.topk_accuracy(probs, labels, 6), [100.0])


def test_topk_ties_and_clipping():
  # Equal probabilities rank by class index, as argmax does: label 1 loses a tie with class 0
  # (exit 1) and wins one with class 2 (exit 2, sample 0); in exit 2, sample 1 it has rank 2.
  probs = np.array([[[0.4, 0.4, 0.2], [0.4, 0.4, 0.2]], [[0.2, 0.4, 0.4], [0.1, 0.1, 0.8]]])
  labels = np.array([1, 1])
  top1 = anytime.topk_accuracy(probs, labels, 1)
  np.testing.assert_allclose(top1, [0.0, 50.0])
  np.testing.assert_allclose(top1, 100 * (probs.argmax(-1) == labels).mean(-1))
  np.testing.assert_allclose(anytime.topk_accuracy(probs, labels, 2), [100.0, 50.0])
  # top-5 of a 3-class problem is clipped to top-3: always right.
  np.testing.assert_allclose(anytime.topk_accuracy(probs, labels, 5), [100.0, 100.0])
  with pytest.raises(ValueError, match="k must be"):
    anytime.topk_accuracy(probs, labels, 0)


def test_ece_known_answers():
  # Exit 1: all at 0.9, half right -> |0.5 - 0.9| = 0.4.
  # Exit 2: 0.88 right and 0.92 wrong share bin (13/15, 14/15]: accuracy 0.5, confidence 0.9,
  #   so they contribute 2/4 * 0.4 (not the per-sample mean |c - conf| = 0.52); 1.0 right
  #   twice contributes 0. ECE = 0.2.
  # Exit 3: 0.95 right twice (bin 15) and 0.55 right once, wrong once (bin 9):
  #   2/4 * 0.05 + 2/4 * 0.05 = 0.05.
  conf = np.array([[0.9, 0.9, 0.9, 0.9],
                   [0.88, 0.92, 1.0, 1.0],
                   [0.95, 0.95, 0.55, 0.55]])
  labels = np.array([0, 1, 2, 3])
  preds = np.array([[0, 1, 9, 9], [0, 9, 2, 3], [0, 1, 2, 9]])
  ece = anytime.expected_calibration_error(_probs_from_conf(conf, preds), labels)
  np.testing.assert_allclose(ece, [0.4, 0.2, 0.05], atol=1e-6)
  # One bin: ECE = |accuracy - mean confidence|.
  one_bin = anytime.expected_calibration_error(_probs_from_conf(conf, preds), labels, num_bins=1)
  np.testing.assert_allclose(one_bin, [0.4, abs(0.75 - 0.95), abs(0.75 - 0.75)], atol=1e-6)


def _costs(k: int) -> list[dict]:
  return [{"exit": e + 1, "op_counter": (e + 1) * 10_000_000, "macs": (e + 1) * 9_000_000,
           "xla_flops": float("nan") if e == 0 else (e + 1) * 2e7, "params": 1000} for e in range(k)]


def _fake_probs(seed: int, k: int = 3, n: int = 64, c: int = 10):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, c, n)
  # Later exits are sharper and more often right, like a trained multi-exit network.
  logits = rng.normal(size=(k, n, c))
  logits[np.arange(k)[:, None], np.arange(n)[None, :], labels[None, :]] += np.arange(1, k + 1)[:, None]
  logits *= np.arange(1, k + 1)[:, None, None]
  probs = np.exp(logits)
  return (probs / probs.sum(-1, keepdims=True)).astype(np.float32), labels


def test_anytime_rows():
  probs, labels = _fake_probs(0)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  assert [r["exit"] for r in rows] == [1, 2, 3]
  assert all(set(r) == set(report.ANYTIME_COLUMNS) for r in rows)
  assert rows[0]["xla_flops"] is None  # NaN: not measured
  assert rows[2]["op_counter"] == 30_000_000 and isinstance(rows[2]["op_counter"], int)
  np.testing.assert_allclose([r["top1"] for r in rows], anytime.topk_accuracy(probs, labels, 1))
  assert rows[0]["top1"] <= rows[0]["top5"]
  assert anytime.anytime_rows(probs, labels, [{"op_counter": 1}] * 3)[0]["macs"] is None
  with pytest.raises(ValueError, match="one entry per exit"):
    anytime.anytime_rows(probs, labels, _costs(2))


def test_exit1_everywhere_budgeted_equals_anytime_exit1():
  # Everybody tied at exit 1 -> the budgeted point is exit 1's anytime point.
  rng = np.random.default_rng(1)
  preds = rng.integers(0, 10, size=(3, 50))
  conf = np.full((3, 50), 0.5)
  probs = _probs_from_conf(conf, preds)
  labels = np.where(rng.uniform(size=50) < 0.7, preds[0], (preds[0] + 1) % 10)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  point = budget.dynamic_evaluation(probs, labels, probs, labels, [r["op_counter"] for r in rows])[19]
  assert point["accuracy"] == pytest.approx(rows[0]["top1"])
  assert point["expected_cost"] == pytest.approx(rows[0]["op_counter"])


def _write_run(run_dir: Path, seed: int, model: str | None = None) -> None:
  probs, labels = _fake_probs(seed)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  points = budget.dynamic_evaluation(probs, labels, probs, labels, [r["op_counter"] for r in rows])
  report.write_anytime(run_dir / "eval", rows)
  report.write_budgeted(run_dir / "eval", points)
  if model is not None:
    (run_dir / "eval" / "costs.json").write_text(json.dumps({"model": model, "exits": _costs(3)}))


def test_write_anytime(tmp_path):
  probs, labels = _fake_probs(2)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  paths = report.write_anytime(tmp_path / "eval", rows)
  assert set(paths) == {"json", "csv", "png"}
  data = json.loads(paths["json"].read_text())  # strict JSON: NaN was written as null
  # The columns, plus the split (model, dataset and step are left out when not given).
  assert [set(r) for r in data] == [set(report.ANYTIME_COLUMNS) | {"split"}] * 3
  assert data[0]["xla_flops"] is None
  with open(paths["csv"]) as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == list(report.ANYTIME_COLUMNS)
  assert [float(r["top1"]) for r in table] == [r["top1"] for r in rows]
  assert table[0]["xla_flops"] == ""
  assert _is_png(paths["png"])


def test_write_budgeted(tmp_path):
  probs, labels = _fake_probs(3, k=4)
  points = budget.dynamic_evaluation(probs, labels, probs, labels, [1e7, 2e7, 3e7, 4e7])
  paths = report.write_budgeted(tmp_path, points)
  data = json.loads(paths["json"].read_text())
  assert len(data) == 39
  assert set(data[0]) == {"p", "thresholds", "accuracy", "expected_cost", "exit_counts",
                          "exit_fractions", "split", "threshold_split"}
  with open(paths["csv"]) as f:
    table = list(csv.DictReader(f))
  assert list(table[0]) == report.budgeted_columns(4)
  assert [int(r["p"]) for r in table] == list(range(1, 40))
  assert {"threshold_exit1", "fraction_exit4", "count_exit2"} <= set(table[0])
  for row, pt in zip(table, points):
    # Thresholds survive the CSV as the same float32 values.
    assert [np.float32(float(row[f"threshold_exit{k}"])) for k in range(1, 5)] == \
        [np.float32(t) for t in pt["thresholds"]]
    assert float(row["expected_cost"]) == pt["expected_cost"]
  assert _is_png(paths["png"])


def test_load_reference(tmp_path):
  ref = report.load_reference(EXAMPLE_REFERENCE)
  assert "_comment" in json.loads(EXAMPLE_REFERENCE.read_text())
  first = ref["anytime"]["example_baseline"][0]
  assert first == pytest.approx((0.15e8, 60.0))  # cost_unit 1e8 applied
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"anytime": {"x": [[1, 2, 3]]}}))
  with pytest.raises(ValueError, match="anytime/x"):
    report.load_reference(bad)


def test_plot_two_runs(tmp_path, capsys):
  _write_run(tmp_path / "run_a", 4, model="msdnet_anytime7")
  _write_run(tmp_path / "run_b", 5)
  out = tmp_path / "figs" / "overlay.png"
  status = plot.run([str(tmp_path / "run_a"), str(tmp_path / "run_b"),
                     "--reference", str(EXAMPLE_REFERENCE), "--out", str(out)])
  assert status == 0 and _is_png(out)
  assert str(out) in capsys.readouterr().out
  assert report._load_run(tmp_path / "run_a")["label"] == "msdnet_anytime7"
  assert report._load_run(tmp_path / "run_b")["label"] == "run_b"


def test_plot_missing_eval_names_file_and_command(tmp_path, capsys):
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match=r"anytime\.json.*msdfuse-eval --workdir="):
    report.plot_runs([tmp_path / "empty"], tmp_path / "x.png")
  assert plot.run([str(tmp_path / "empty"), "--out", str(tmp_path / "x.png")]) == 1
  assert "msdfuse-eval --workdir=" in capsys.readouterr().err
  assert not (tmp_path / "x.png").exists()


def test_plot_module_entry_point(tmp_path):
  _write_run(tmp_path / "run", 6)
  out = tmp_path / "cli.png"
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
             MPLBACKEND="Agg")
  result = subprocess.run([sys.executable, "-m", "msdfuse_jax.tools.plot_main", str(tmp_path / "run"),
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=60)
  assert result.returncode == 0, result.stderr
  assert _is_png(out)


META = dict(model="msdfuse", dataset="cifar100", step=1234)


def _legend_texts(ax) -> list[str]:
  return [t.get_text() for t in ax.get_legend().get_texts()]


def _holds_points(ax, xs, ys) -> bool:
  """Whether one line or collection of `ax` has exactly the points (xs, ys)."""
  want = np.column_stack([xs, ys])
  data = [line.get_xydata() for line in ax.lines] + [c.get_offsets() for c in ax.collections]
  return any(np.shape(d) == want.shape and np.allclose(d, want) for d in data)


def test_anytime_figure_says_what_it_shows():
  probs, labels = _fake_probs(7)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  title = report.anytime_figure(rows, **META).axes[0].get_title()
  assert all(s in title for s in ("Anytime", "msdfuse", "cifar100", "step 1234", "test"))
  # Without them (other callers), the title still names the figure and the split.
  bare = report.anytime_figure(rows).axes[0].get_title()
  assert "Anytime" in bare and "test" in bare and "step" not in bare


def test_budgeted_figure_says_what_it_shows_and_holds_the_anytime_points():
  probs, labels = _fake_probs(8)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  points = budget.dynamic_evaluation(probs, labels, probs, labels, [r["op_counter"] for r in rows])
  (ax,) = report.budgeted_figure(points, rows, **META).axes
  title = ax.get_title()
  assert all(s in title for s in ("Budgeted", "msdfuse", "cifar100", "step 1234", "test", "val"))
  assert any("anytime" in t for t in _legend_texts(ax))
  assert _holds_points(ax, [r["op_counter"] / report.COST_UNIT for r in rows], [r["top1"] for r in rows])
  assert _holds_points(ax, [p["expected_cost"] / report.COST_UNIT for p in points],
                       [p["accuracy"] for p in points])
  (bare,) = report.budgeted_figure(points).axes  # no anytime rows: the curve alone
  assert len(bare.lines) == 1


def test_writers_add_what_was_evaluated_as_new_json_keys(tmp_path):
  probs, labels = _fake_probs(9)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  points = budget.dynamic_evaluation(probs, labels, probs, labels, [r["op_counter"] for r in rows])
  any_paths = report.write_anytime(tmp_path, rows, **META)
  bud_paths = report.write_budgeted(tmp_path, points, rows, **META)
  data = json.loads(any_paths["json"].read_text())
  for row, written in zip(rows, data):
    assert written == {**row, **META, "split": "test"}  # the old keys unchanged
  data = json.loads(bud_paths["json"].read_text())
  assert data[0]["p"] == 1 and data[0]["accuracy"] == points[0]["accuracy"]
  assert {k: data[5][k] for k in ("model", "dataset", "step", "split", "threshold_split")} == \
      {**META, "split": "test", "threshold_split": "val"}
  with open(any_paths["csv"]) as f:
    assert list(next(csv.DictReader(f))) == list(report.ANYTIME_COLUMNS)  # the CSV keeps its columns
  assert _is_png(any_paths["png"]) and _is_png(bud_paths["png"])


def test_runs_figure_labels_runs_and_overlays_their_exits(tmp_path):
  probs, labels = _fake_probs(10)
  rows = anytime.anytime_rows(probs, labels, _costs(3))
  points = budget.dynamic_evaluation(probs, labels, probs, labels, [r["op_counter"] for r in rows])
  report.write_anytime(tmp_path / "new" / "eval", rows, **META)
  report.write_budgeted(tmp_path / "new" / "eval", points, rows, **META)
  _write_run(tmp_path / "old", 11, model="msdnet_anytime7")  # an eval dir from before the new keys
  ax_any, ax_bud = report.runs_figure([tmp_path / "new", tmp_path / "old"]).axes
  for ax in (ax_any, ax_bud):
    assert _legend_texts(ax)[:2] == ["msdfuse / cifar100 / step 1234", "msdnet_anytime7"]
  assert "single exits (anytime)" in _legend_texts(ax_bud)
  assert "test" in ax_any.get_title() and "val" in ax_bud.get_title()
  old_rows = json.loads((tmp_path / "old" / "eval" / "anytime.json").read_text())
  for r in (rows, old_rows):
    assert _holds_points(ax_bud, [x["op_counter"] / report.COST_UNIT for x in r], [x["top1"] for x in r])
