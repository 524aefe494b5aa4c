"""Budgeted accuracy against realised time: the points of ``msdfuse-infer`` runs (``infer.json``), compared.

Each ``infer.json`` (``WORKDIR/eval/infer.json``, or any copy of it) is one point: the test accuracy of one
set of thresholds and the realised mean time per image of the early-exit runner that classified the test set
with them (``realised_ms_per_image``). A point is *fitted to time* when it has a ``budget_ms``, to an *ops
budget* when it has a ``cost_budget``, else it is a plain budget point ``p``. `time_figure` draws accuracy against
realised time, one line per model and kind of fit (``msdfuse-plot --time``); `compare_at_equal_time` sets
each time-fitted point beside the ops-fitted curve of the same model read at the same realised time (linear
interpolation between its two neighbouring points), which is what fitting to time buys, or not, at equal
time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

PathLike = str | os.PathLike
REQUIRED = ("realised_ms_per_image", "accuracy")
KINDS = ("time budget", "ops budget", "budget point")  # `fit_kind`'s names, in legend order


def fit_kind(point: Mapping[str, Any]) -> str:
  """``"time budget"`` (fitted to ``budget_ms``), ``"ops budget"`` (to ``cost_budget``), else
  ``"budget point"``."""
  if point.get("budget_ms") is not None:
    return "time budget"
  if point.get("cost_budget") is not None:
    return "ops budget"
  return "budget point"


def _label(point: Mapping[str, Any], path: Path) -> str:
  """The model (and dataset) of a point: its own keys, else its run's config.json, else the file's folder."""
  model, dataset = point.get("model"), point.get("dataset")
  if model is None and point.get("workdir"):
    config = Path(point["workdir"]) / "config.json"
    if config.is_file():
      with open(config) as f:
        data = json.load(f)
      model, dataset = data.get("model", {}).get("name"), data.get("dataset")
  return " / ".join(str(v) for v in (model, dataset) if v) or path.parent.name


def load_points(paths: Sequence[PathLike]) -> list[dict[str, Any]]:
  """Reads ``infer.json`` files; a directory stands for every ``*.json`` inside it that is such a file.

  Returns:
    The points, each with ``label`` (model / dataset), ``kind`` (`fit_kind`) and ``file`` added.

  Raises:
    FileNotFoundError: for a path that does not exist; ValueError: for a file that is not an infer.json
      (no realised time or accuracy: written before time budgets, or by another tool) or no points at all.
  """
  files: list[Path] = []
  for path in map(Path, paths):
    if path.is_dir():
      found = sorted(path.glob("*.json"))
      files += [f for f in found if all(key in json.loads(f.read_text()) for key in REQUIRED)]
    elif path.is_file():
      files.append(path)
    else:
      raise FileNotFoundError(f"{path} not found: give infer.json files (msdfuse-infer writes "
                              "WORKDIR/eval/infer.json) or folders of them")
  points = []
  for file in files:
    with open(file) as f:
      point = json.load(f)
    missing = [key for key in REQUIRED if point.get(key) is None]
    if missing:
      raise ValueError(f"{file} has no {missing}: not an infer.json of this version (run msdfuse-infer "
                       "again)")
    points.append({**point, "label": _label(point, file), "kind": fit_kind(point), "file": str(file)})
  if not points:
    raise ValueError(f"no infer.json points in {list(map(str, paths))}")
  return points


def _curves(points: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
  curves: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
  for point in points:
    curves.setdefault((point["label"], point["kind"]), []).append(point)
  return {key: sorted(rows, key=lambda p: p["realised_ms_per_image"]) for key, rows in sorted(
      curves.items(), key=lambda item: (item[0][0], KINDS.index(item[0][1])))}


def time_figure(points: Sequence[Mapping[str, Any]]) -> Figure:
  """Test accuracy against realised ms per image: one line per (model, kind of fit); a time-fitted point
  also shows its budget (a short grey tick from T to the realised time)."""
  fig = Figure(figsize=(6.5, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  ax = fig.subplots()
  labels = sorted({p["label"] for p in points})
  styles = {"time budget": ("-", "o"), "ops budget": ("--", "s"), "budget point": (":", ".")}
  for (label, kind), rows in _curves(points).items():
    line, marker = styles[kind]
    xs, ys = [p["realised_ms_per_image"] for p in rows], [p["accuracy"] for p in rows]
    ax.plot(xs, ys, linestyle=line, marker=marker, color=f"C{labels.index(label)}", label=f"{label}, {kind}")
    if kind == "time budget":
      for p in rows:
        ax.plot([p["budget_ms"], p["realised_ms_per_image"]], [p["accuracy"]] * 2, color="gray", lw=0.8)
  devices = sorted({p.get("stage_times", {}).get("device", "?") for p in points})
  ax.set_title("Budgeted batch classification against realised time\n"
               f"test top-1; early-exit runner on {', '.join(devices)}", fontsize=10)
  ax.set_xlabel("realised mean time per image (ms, whole test set, warm)")
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  return fig


def plot_time(paths: Sequence[PathLike], out_png: PathLike) -> Path:
  """`time_figure` of the infer.json files (or folders) `paths`, written to `out_png`."""
  fig = time_figure(load_points(paths))
  out = Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  return out


def compare_at_equal_time(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Each time-fitted point beside its model's ops-fitted curve read at the same realised time.

  Returns:
    One row per time-fitted point: ``label``, ``budget_ms``, ``p``, ``predicted_ms_per_image``,
    ``realised_ms_per_image``, ``realised_over_budget``, ``accuracy``, and ``ops_accuracy_at_equal_time``
    (None outside the ops-fitted curve's range of realised times, or without one), its difference ``gain``.
  """
  curves = _curves(points)
  rows = []
  for (label, kind), timed in curves.items():
    if kind != "time budget":
      continue
    ops = curves.get((label, "ops budget"), [])
    xs = np.array([p["realised_ms_per_image"] for p in ops])
    ys = np.array([p["accuracy"] for p in ops])
    for p in timed:
      t = p["realised_ms_per_image"]
      at = float(np.interp(t, xs, ys)) if len(ops) and xs[0] <= t <= xs[-1] else None
      rows.append({"label": label, "budget_ms": p["budget_ms"], "p": p.get("p"),
                   "predicted_ms_per_image": p.get("predicted_ms_per_image"), "realised_ms_per_image": t,
                   "realised_over_budget": t / p["budget_ms"], "accuracy": p["accuracy"],
                   "ops_accuracy_at_equal_time": at, "gain": None if at is None else p["accuracy"] - at})
  return rows
