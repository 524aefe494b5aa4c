"""Evaluation artifacts: curves as JSON and CSV, figures as PNG, and the multi-run overlay.

A run's evaluation directory (``WORKDIR/eval``, written by ``msdfuse-eval``) holds

* ``anytime.{json,csv,png}``: one row per exit (`anytime.anytime_rows`);
* ``budgeted.{json,csv,png}``: one point per p = 1..39 (`budget.dynamic_evaluation`);
* ``costs.json``: the `msdfuse_jax.costs.costs_report` of the model, whose ``model`` field
  labels the run in `plot_runs`.

Costs are plotted in units of 1e8, as on the axes of the MSDNet, RANet and MSDFuse papers;
the anytime x axis is the literature ``op_counter`` convention (SPEC.md section 5).
Figures are drawn on `matplotlib.figure.Figure` with the Agg canvas, never through pyplot,
so importing this module does not change the process-wide matplotlib backend and works
without a display.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

COST_UNIT = 1e8  # the papers' axes: "FLOPs x 1e8"
ANYTIME_COLUMNS = ("exit", "op_counter", "macs", "xla_flops", "top1", "top5", "ece")
ANYTIME_COST_KEYS = ("op_counter", "macs", "xla_flops")  # x axis: the first one every row has

PathLike = str | os.PathLike

__all__ = ["COST_UNIT", "ANYTIME_COLUMNS", "budgeted_columns", "write_anytime",
           "write_budgeted", "load_reference", "plot_runs"]


def _jsonable(value: Any) -> Any:
  """Strict JSON: NaN and infinities (costs not measured) become null."""
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {k: _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def _write_json(path: Path, data: Any) -> None:
  with open(path, "w") as f:
    json.dump(_jsonable(data), f, indent=2, allow_nan=False)
    f.write("\n")


def _write_csv(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(columns))
    writer.writeheader()
    for row in rows:
      # repr-exact floats (a float32 threshold reads back as the same float32); None -> "".
      writer.writerow({c: "" if _jsonable(row.get(c)) is None else row[c] for c in columns})


def _new_figure(ncols: int = 1) -> tuple[Figure, Any]:
  fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _anytime_axis(rows: Sequence[Mapping[str, Any]]) -> str:
  for key in ANYTIME_COST_KEYS:
    if rows and all(_jsonable(r.get(key)) is not None for r in rows):
      return key
  raise ValueError(f"anytime rows need one of {ANYTIME_COST_KEYS} on every exit to plot against")


def _anytime_xy(rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float], str]:
  key = _anytime_axis(rows)
  return [r[key] / COST_UNIT for r in rows], [r["top1"] for r in rows], key


def _style_axes(ax: Any, title: str, xlabel: str) -> None:
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(True, alpha=0.3)


def write_anytime(directory: PathLike, rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
  """Writes ``anytime.json``, ``anytime.csv`` and ``anytime.png`` (top-1 vs cost / 1e8).

  Args:
    directory: output directory, created if missing.
    rows: `anytime.anytime_rows` output: one dict per exit with the `ANYTIME_COLUMNS` keys.

  Returns:
    {"json": path, "csv": path, "png": path}.
  """
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  paths = {ext: out / f"anytime.{ext}" for ext in ("json", "csv", "png")}
  _write_json(paths["json"], list(rows))
  _write_csv(paths["csv"], ANYTIME_COLUMNS, rows)
  xs, ys, key = _anytime_xy(rows)
  fig, (ax,) = _new_figure()
  ax.plot(xs, ys, marker="o")
  for x, y, r in zip(xs, ys, rows):
    ax.annotate(str(r["exit"]), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7)
  _style_axes(ax, "Anytime prediction", f"cost per image ({key}, x1e8)")
  fig.savefig(paths["png"], dpi=120)
  return paths


def budgeted_columns(num_exits: int) -> list[str]:
  """CSV columns of ``budgeted.csv`` for a K-exit model (exit numbers 1-based)."""
  exits = range(1, num_exits + 1)
  return (["p", "expected_cost", "accuracy"] + [f"threshold_exit{k}" for k in exits]
          + [f"fraction_exit{k}" for k in exits] + [f"count_exit{k}" for k in exits])


def write_budgeted(directory: PathLike, points: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
  """Writes ``budgeted.json``, ``budgeted.csv`` and ``budgeted.png`` (accuracy vs expected cost).

  Args:
    directory: output directory, created if missing.
    points: `budget.dynamic_evaluation` output: one dict per p with `p`, `expected_cost`,
      `accuracy`, `thresholds`, `exit_counts` and `exit_fractions`.

  Returns:
    {"json": path, "csv": path, "png": path}.
  """
  if not points:
    raise ValueError("write_budgeted needs at least one point")
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  paths = {ext: out / f"budgeted.{ext}" for ext in ("json", "csv", "png")}
  _write_json(paths["json"], list(points))
  num_exits = len(points[0]["thresholds"])
  flat = []
  for pt in points:
    row = {"p": pt["p"], "expected_cost": pt["expected_cost"], "accuracy": pt["accuracy"]}
    for k in range(num_exits):
      row[f"threshold_exit{k + 1}"] = pt["thresholds"][k]
      row[f"fraction_exit{k + 1}"] = pt["exit_fractions"][k]
      row[f"count_exit{k + 1}"] = pt["exit_counts"][k]
    flat.append(row)
  _write_csv(paths["csv"], budgeted_columns(num_exits), flat)
  fig, (ax,) = _new_figure()
  ax.plot([pt["expected_cost"] / COST_UNIT for pt in points], [pt["accuracy"] for pt in points],
          marker=".")
  _style_axes(ax, "Budgeted batch classification", "average cost per image (x1e8)")
  fig.savefig(paths["png"], dpi=120)
  return paths


def _read_json(path: Path, run_dir: Path) -> Any:
  if not path.is_file():
    raise FileNotFoundError(f"{path} not found: run `msdfuse-eval --workdir={run_dir}` first")
  with open(path) as f:
    return json.load(f)


def _load_run(run_dir: PathLike) -> dict[str, Any]:
  run_dir = Path(run_dir)
  eval_dir = run_dir / "eval"
  run = {
      "anytime": _read_json(eval_dir / "anytime.json", run_dir),
      "budgeted": _read_json(eval_dir / "budgeted.json", run_dir),
      "name": run_dir.resolve().name,
  }
  run["label"] = run["name"]
  costs_path = eval_dir / "costs.json"
  if costs_path.is_file():
    with open(costs_path) as f:
      model = json.load(f).get("model")
    if model:
      run["label"] = str(model)
  return run


def load_reference(path: PathLike) -> dict[str, dict[str, list[tuple[float, float]]]]:
  """Reads published points to draw beside the runs.

  The file is ``{"anytime": {SERIES: [[cost, accuracy], ...], ...}, "budgeted": {...}}``;
  either panel may be absent. Costs are in raw ops unless the file has a top-level
  ``"cost_unit"`` (e.g. 1e8 for points read off the papers' axes), by which they are
  multiplied. Keys starting with "_" (``"_comment"``, ``"_source"``) are ignored.

  Args:
    path: the JSON file.

  Returns:
    {"anytime": {series: [(raw cost, accuracy), ...]}, "budgeted": {...}}.

  Raises:
    FileNotFoundError: when the file is missing; ValueError: when it is malformed.
  """
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"reference file {path} not found")
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object with 'anytime' and/or 'budgeted'")
  unit = float(data.get("cost_unit", 1.0))
  result: dict[str, dict[str, list[tuple[float, float]]]] = {}
  for panel in ("anytime", "budgeted"):
    series = {k: v for k, v in data.get(panel, {}).items() if not k.startswith("_")}
    result[panel] = {}
    for name, pts in series.items():
      if not isinstance(pts, list) or not all(isinstance(p, list) and len(p) == 2 for p in pts):
        raise ValueError(f"{path}: {panel}/{name} must be a list of [cost, accuracy] pairs")
      result[panel][name] = [(float(c) * unit, float(a)) for c, a in pts]
  return result


def _unique_labels(runs: list[dict[str, Any]]) -> None:
  labels = [r["label"] for r in runs]
  for r in runs:
    if labels.count(r["label"]) > 1:  # two runs of one model: tell them apart by directory
      r["label"] = f"{r['label']} ({r['name']})"


def plot_runs(run_dirs: Sequence[PathLike], out_png: PathLike,
              reference: PathLike | None = None) -> Path:
  """Overlays several runs: anytime curves (left) and budgeted curves (right).

  Args:
    run_dirs: run directories, each with ``eval/anytime.json`` and ``eval/budgeted.json``.
      A run is labelled by the ``model`` field of its ``eval/costs.json`` when present,
      else by its directory name (both, when two runs share a model name).
    out_png: the figure to write; its directory is created if missing.
    reference: optional JSON of published points (see `load_reference`), drawn dashed.

  Returns:
    The path of the PNG.

  Raises:
    FileNotFoundError: naming the missing file and the ``msdfuse-eval`` command to run.
  """
  if not run_dirs:
    raise ValueError("plot_runs needs at least one run directory")
  runs = [_load_run(d) for d in run_dirs]
  _unique_labels(runs)
  ref = load_reference(reference) if reference is not None else {"anytime": {}, "budgeted": {}}
  fig, (ax_any, ax_bud) = _new_figure(ncols=2)
  keys = set()
  for i, run in enumerate(runs):
    color = f"C{i}"
    xs, ys, key = _anytime_xy(run["anytime"])
    keys.add(key)
    ax_any.plot(xs, ys, marker="o", color=color, label=run["label"])
    pts = run["budgeted"]
    ax_bud.plot([p["expected_cost"] / COST_UNIT for p in pts], [p["accuracy"] for p in pts],
                marker=".", color=color, label=run["label"])
  offset = len(runs)
  for panel, ax in (("anytime", ax_any), ("budgeted", ax_bud)):
    for j, (name, pts) in enumerate(sorted(ref[panel].items())):
      ax.plot([c / COST_UNIT for c, _ in pts], [a for _, a in pts], linestyle="--", marker="s",
              markersize=4, color=f"C{offset + j}", label=f"{name} (reference)")
  _style_axes(ax_any, "Anytime prediction", f"cost per image ({'/'.join(sorted(keys))}, x1e8)")
  _style_axes(ax_bud, "Budgeted batch classification", "average cost per image (x1e8)")
  for ax in (ax_any, ax_bud):
    ax.legend(fontsize=8)
  out = Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  return out
