"""Evaluation artifacts: curves as JSON and CSV, figures as PNG, and the multi-run overlay.

A run's evaluation directory (``WORKDIR/eval``, written by ``msdfuse-eval``) holds

* ``anytime.{json,csv,png}``: one row per exit (`anytime.anytime_rows`);
* ``budgeted.{json,csv,png}``: one point per p = 1..39 (`budget.dynamic_evaluation`);
* ``costs.json``: the `msdfuse_jax.costs.costs_report` of the model;
* ``anytime_deadline.png``, from ``msdfuse-infer --deadline_ms``: accuracy and the fraction of chunks
  within the deadline against the deadline (`deadline_figure`; the figures are in ``infer.json``).

When the writer is told what it evaluated, every JSON row and point also has ``model``, ``dataset`` and
``step`` keys, next to ``split`` (and, for budgeted points, ``threshold_split``); the figures' titles say
the same, and `plot_runs` labels each run with them (else with ``costs.json``'s ``model``, else with the
directory name). The budgeted figure draws each exit's anytime point beside the budgeted curve.

Costs are plotted in units of 1e8, as on the axes of the MSDNet, RANet and MSDFuse papers;
the x axis is the literature ``op_counter`` convention of `msdfuse_jax.costs`.
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
from matplotlib.lines import Line2D

COST_UNIT = 1e8  # the papers' axes: "FLOPs x 1e8"
ANYTIME_COLUMNS = ("exit", "op_counter", "macs", "xla_flops", "top1", "top5", "ece")
ANYTIME_COST_KEYS = ("op_counter", "macs", "xla_flops")  # x axis: the first one every row has

PathLike = str | os.PathLike

META_KEYS = ("model", "dataset", "step")  # what a run is, added to every JSON row when known

__all__ = ["COST_UNIT", "ANYTIME_COLUMNS", "META_KEYS", "budgeted_columns", "anytime_figure",
           "budgeted_figure", "runs_figure", "write_anytime", "write_budgeted", "load_reference",
           "plot_runs", "DEADLINE_FILE", "deadline_figure", "write_deadline"]

DEADLINE_FILE = "anytime_deadline.png"
DEADLINE_TARGET = 0.95  # the fraction of chunks that should finish within the deadline, drawn as a line


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
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel("top-1 accuracy (%)")
  ax.grid(True, alpha=0.3)


def _meta(model: str | None, dataset: str | None, step: int | None) -> dict[str, Any]:
  """The `META_KEYS` that are known."""
  step = int(step) if step is not None else None  # a checkpoint step may be a NumPy integer
  return {k: v for k, v in zip(META_KEYS, (model, dataset, step)) if v is not None}


def _run_label(meta: Mapping[str, Any]) -> str:
  """``"msdfuse / cifar100 / step 5000"``, from whichever of model, dataset and step are known."""
  parts = [str(meta[k]) for k in ("model", "dataset") if meta.get(k) is not None]
  if meta.get("step") is not None:
    parts.append(f"step {meta['step']}")
  return " / ".join(parts)


def _title(what: str, meta: Mapping[str, Any], detail: str) -> str:
  """Two lines: what the figure shows and for which run; the split and the checkpoint."""
  model, dataset, step = (meta.get(k) for k in META_KEYS)
  run = " on ".join(str(v) for v in (model, dataset) if v is not None)
  checkpoint = f", checkpoint step {step}" if step is not None else ""
  return f"{what}{': ' + run if run else ''}\n{detail}{checkpoint}"


def _with_meta(rows: Sequence[Mapping[str, Any]], extra: Mapping[str, Any]) -> list[dict[str, Any]]:
  # New keys only: the existing ones are a public interface and keep their names and values.
  return [{**row, **{k: v for k, v in extra.items() if k not in row}} for row in rows]


def _annotate_exits(ax: Any, xs: Sequence[float], ys: Sequence[float],
                    rows: Sequence[Mapping[str, Any]], color: str = "black") -> None:
  for x, y, r in zip(xs, ys, rows):
    ax.annotate(str(r["exit"]), (x, y), textcoords="offset points", xytext=(3, -10), fontsize=7,
                color=color)


def _overlay_xy(rows: Sequence[Mapping[str, Any]] | None) -> tuple[list[float], list[float]] | None:
  """The anytime points on the budgeted axes: (op_counter / 1e8, top-1), the budgeted curve's cost."""
  if not rows or not all(_jsonable(r.get("op_counter")) is not None for r in rows):
    return None
  return [r["op_counter"] / COST_UNIT for r in rows], [r["top1"] for r in rows]


def anytime_figure(rows: Sequence[Mapping[str, Any]], *, model: str | None = None,
                   dataset: str | None = None, step: int | None = None, split: str = "test") -> Figure:
  """The anytime figure: top-1 of every exit against its cost / 1e8, titled with the run.

  Args:
    rows: `anytime.anytime_rows` output: one dict per exit with the `ANYTIME_COLUMNS` keys.
    model: the model's preset name; dataset: e.g. ``"cifar100"``; step: the checkpoint's step.
      Each is left out of the title when None.
    split: the split the accuracies were measured on.

  Returns:
    The figure (Agg canvas), not yet saved.
  """
  xs, ys, key = _anytime_xy(rows)
  fig, (ax,) = _new_figure()
  ax.plot(xs, ys, marker="o")
  _annotate_exits(ax, xs, ys, rows)
  meta = _meta(model, dataset, step)
  title = _title("Anytime prediction", meta, f"top-1 on the {split} split at each exit")
  _style_axes(ax, title, f"cost per image ({key}, x1e8)")
  return fig


def write_anytime(directory: PathLike, rows: Sequence[Mapping[str, Any]], *, model: str | None = None,
                  dataset: str | None = None, step: int | None = None,
                  split: str = "test") -> dict[str, Path]:
  """Writes ``anytime.json``, ``anytime.csv`` and ``anytime.png`` (top-1 vs cost / 1e8).

  Args:
    directory: output directory, created if missing.
    rows: `anytime.anytime_rows` output: one dict per exit with the `ANYTIME_COLUMNS` keys.
    model, dataset, step: what was evaluated (see `anytime_figure`); the known ones are also added
      to every row of ``anytime.json``, with ``split``. The CSV keeps the `ANYTIME_COLUMNS`.
    split: the split the accuracies were measured on.

  Returns:
    {"json": path, "csv": path, "png": path}.
  """
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  paths = {ext: out / f"anytime.{ext}" for ext in ("json", "csv", "png")}
  _write_json(paths["json"], _with_meta(rows, {**_meta(model, dataset, step), "split": split}))
  _write_csv(paths["csv"], ANYTIME_COLUMNS, rows)
  fig = anytime_figure(rows, model=model, dataset=dataset, step=step, split=split)
  fig.savefig(paths["png"], dpi=120)
  return paths


def budgeted_columns(num_exits: int) -> list[str]:
  """CSV columns of ``budgeted.csv`` for a K-exit model (exit numbers 1-based)."""
  exits = range(1, num_exits + 1)
  return (["p", "expected_cost", "accuracy"] + [f"threshold_exit{k}" for k in exits]
          + [f"fraction_exit{k}" for k in exits] + [f"count_exit{k}" for k in exits])


def budgeted_figure(points: Sequence[Mapping[str, Any]],
                    anytime_rows: Sequence[Mapping[str, Any]] | None = None, *, model: str | None = None,
                    dataset: str | None = None, step: int | None = None, split: str = "test",
                    threshold_split: str = "val") -> Figure:
  """The budgeted figure: accuracy against expected cost / 1e8, each exit's anytime point beside it.

  Args:
    points: `budget.dynamic_evaluation` output (expected costs in ``op_counter``).
    anytime_rows: `anytime.anytime_rows` output of the same model and split; each exit's top-1 is
      drawn at its ``op_counter`` as a marker, numbered by exit. None (or rows without
      ``op_counter``) draws the curve alone.
    model, dataset, step: what was evaluated, each left out of the title when None.
    split: the split the accuracies were measured on; threshold_split: the one the thresholds were
      fitted on.

  Returns:
    The figure (Agg canvas), not yet saved.
  """
  fig, (ax,) = _new_figure()
  ax.plot([pt["expected_cost"] / COST_UNIT for pt in points], [pt["accuracy"] for pt in points],
          marker=".", label=f"budgeted: thresholds fitted on {threshold_split}")
  overlay = _overlay_xy(anytime_rows)
  if overlay is not None:
    ax.plot(*overlay, linestyle="none", marker="o", markersize=7, markerfacecolor="none",
            markeredgecolor="C1", label="single exit k (anytime)")
    _annotate_exits(ax, *overlay, anytime_rows, color="C1")
  _style_axes(ax, _title("Budgeted batch classification", _meta(model, dataset, step),
                         f"top-1 on {split}, thresholds fitted on {threshold_split}"),
              "average cost per image (op_counter, x1e8)")
  ax.legend(fontsize=8, loc="best")
  return fig


def write_budgeted(directory: PathLike, points: Sequence[Mapping[str, Any]],
                   anytime_rows: Sequence[Mapping[str, Any]] | None = None, *, model: str | None = None,
                   dataset: str | None = None, step: int | None = None, split: str = "test",
                   threshold_split: str = "val") -> dict[str, Path]:
  """Writes ``budgeted.json``, ``budgeted.csv`` and ``budgeted.png`` (accuracy vs expected cost).

  Args:
    directory: output directory, created if missing.
    points: `budget.dynamic_evaluation` output: one dict per p with `p`, `expected_cost`,
      `accuracy`, `thresholds`, `exit_counts` and `exit_fractions`.
    anytime_rows: the anytime rows to draw beside the curve (see `budgeted_figure`).
    model, dataset, step: what was evaluated; the known ones are also added to every point of
      ``budgeted.json``, with ``split`` and ``threshold_split``. The CSV keeps its columns.
    split: the split of the accuracies; threshold_split: the split the thresholds were fitted on.

  Returns:
    {"json": path, "csv": path, "png": path}.
  """
  if not points:
    raise ValueError("write_budgeted needs at least one point")
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  paths = {ext: out / f"budgeted.{ext}" for ext in ("json", "csv", "png")}
  _write_json(paths["json"], _with_meta(points, {**_meta(model, dataset, step), "split": split,
                                                 "threshold_split": threshold_split}))
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
  fig = budgeted_figure(points, anytime_rows, model=model, dataset=dataset, step=step, split=split,
                        threshold_split=threshold_split)
  fig.savefig(paths["png"], dpi=120)
  return paths


def deadline_figure(points: Sequence[Mapping[str, Any]], *, deadline_ms: float | None = None,
                    no_deadline_accuracy: float | None = None, model: str | None = None,
                    dataset: str | None = None, step: int | None = None) -> Figure:
  """The anytime-deadline figure: accuracy, and the fraction of chunks that finished in time, against the
  deadline per chunk (ms).

  Args:
    points: `msdfuse_jax.deadlines.sweep` output: one dict per deadline with ``deadline_ms``,
      ``accuracy`` and ``met_fraction``.
    deadline_ms: the deadline asked for, marked on both panels (in the legend only when it lies far
      from the sweep); None: not marked.
    no_deadline_accuracy: the accuracy without a deadline, drawn as a level; None: not drawn.
    model, dataset, step: what was evaluated, each left out of the title when None.

  Returns:
    The figure (Agg canvas), not yet saved.
  """
  if not points:
    raise ValueError("deadline_figure needs at least one point")
  xs = [pt["deadline_ms"] for pt in points]
  fig, (acc, met) = _new_figure(2)
  meta = _meta(model, dataset, step)
  acc.plot(xs, [pt["accuracy"] for pt in points], marker="o", label="with the deadline")
  if no_deadline_accuracy is not None:
    acc.axhline(no_deadline_accuracy, color="gray", linestyle="--", linewidth=1, label="no deadline")
  _style_axes(acc, _title("Anytime: a deadline per chunk", meta, "top-1 on the test split"),
              "deadline per chunk (ms)")
  # At least 2 points of accuracy on the axis: a flat curve's last digits are not drawn as a swing.
  lo, hi = acc.get_ylim()
  if hi - lo < 2.0:
    middle = (lo + hi) / 2
    acc.set_ylim(middle - 1.0, middle + 1.0)
  met.plot(xs, [100.0 * pt["met_fraction"] for pt in points], marker="o", color="C2",
           label="chunks within the deadline")
  met.axhline(100.0 * DEADLINE_TARGET, color="C3", linestyle=":", linewidth=1,
              label=f"{100 * DEADLINE_TARGET:.0f} % target")
  met.set_ylim(-3, 103)
  _style_axes(met, _title("Chunks that met the deadline", meta, "test split"), "deadline per chunk (ms)")
  met.set_ylabel("chunks within the deadline (%)")
  # The deadline asked for, where it lies near the sweep (a huge one would squash the sweep's axis).
  near = deadline_ms is not None and 0.5 * min(xs) <= deadline_ms <= 2.0 * max(xs)
  for ax in (acc, met):
    if near:
      ax.axvline(deadline_ms, color="black", linewidth=0.8, alpha=0.6, label=f"asked: {deadline_ms:g} ms")
    elif deadline_ms is not None:
      ax.plot([], [], linestyle="none", label=f"asked: {deadline_ms:g} ms (off the axis)")
    ax.legend(fontsize=8, loc="best")
  return fig


def write_deadline(directory: PathLike, points: Sequence[Mapping[str, Any]], **kwargs: Any) -> Path:
  """Writes ``anytime_deadline.png`` (`deadline_figure` of `points`, with its keyword arguments) into
  `directory`, created if missing, and returns its path."""
  out = Path(directory)
  out.mkdir(parents=True, exist_ok=True)
  path = out / DEADLINE_FILE
  deadline_figure(points, **kwargs).savefig(path, dpi=120)
  return path


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
  first = run["anytime"][0] if run["anytime"] else {}
  meta = {k: first[k] for k in META_KEYS if first.get(k) is not None}
  costs_path = eval_dir / "costs.json"
  if costs_path.is_file() and not {"model", "dataset"} <= set(meta):
    with open(costs_path) as f:
      cost_report = json.load(f)
    for k in ("model", "dataset"):  # eval dirs written before the rows carried them
      if k not in meta and cost_report.get(k):
        meta[k] = cost_report[k]
  run["split"] = first.get("split", "test")
  pt = run["budgeted"][0] if run["budgeted"] else {}
  run["threshold_split"] = pt.get("threshold_split", "val")
  run["label"] = _run_label(meta) or run["name"]
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


def runs_figure(run_dirs: Sequence[PathLike], reference: PathLike | None = None) -> Figure:
  """The `plot_runs` figure, not yet saved: anytime curves (left), budgeted curves (right).

  The budgeted panel also holds every run's anytime points (open markers in the run's colour) at
  their ``op_counter``, so that each curve can be read against the exits it chooses from.

  Args:
    run_dirs: run directories, each with ``eval/anytime.json`` and ``eval/budgeted.json``.
      A run is labelled "model / dataset / step N" from the keys its JSON rows carry; for older
      eval directories, by the ``model`` and ``dataset`` of its ``eval/costs.json``, else by its
      directory name (and by the directory too when two runs share a label).
    reference: optional JSON of published points (see `load_reference`), drawn dashed.

  Returns:
    The figure (Agg canvas).

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
  overlaid = False
  for i, run in enumerate(runs):
    color = f"C{i}"
    xs, ys, key = _anytime_xy(run["anytime"])
    keys.add(key)
    ax_any.plot(xs, ys, marker="o", color=color, label=run["label"])
    pts = run["budgeted"]
    ax_bud.plot([p["expected_cost"] / COST_UNIT for p in pts], [p["accuracy"] for p in pts],
                marker=".", color=color, label=run["label"])
    overlay = _overlay_xy(run["anytime"])
    if overlay is not None:
      ax_bud.plot(*overlay, linestyle="none", marker="o", markersize=6, markerfacecolor="none",
                  markeredgecolor=color)
      overlaid = True
  offset = len(runs)
  for panel, ax in (("anytime", ax_any), ("budgeted", ax_bud)):
    for j, (name, pts) in enumerate(sorted(ref[panel].items())):
      ax.plot([c / COST_UNIT for c, _ in pts], [a for _, a in pts], linestyle="--", marker="s",
              markersize=4, color=f"C{offset + j}", label=f"{name} (reference)")
  splits = "/".join(sorted({r["split"] for r in runs}))
  fitted = "/".join(sorted({r["threshold_split"] for r in runs}))
  _style_axes(ax_any, f"Anytime prediction\ntop-1 on {splits} at each exit",
              f"cost per image ({'/'.join(sorted(keys))}, x1e8)")
  _style_axes(ax_bud, f"Budgeted batch classification\ntop-1 on {splits}, thresholds fitted on {fitted}",
              "average cost per image (op_counter, x1e8)")
  ax_any.legend(fontsize=8)
  handles, labels = ax_bud.get_legend_handles_labels()
  if overlaid:  # one legend entry for every run's exit markers
    handles.append(Line2D([], [], linestyle="none", marker="o", markerfacecolor="none",
                          markeredgecolor="gray"))
    labels.append("single exits (anytime)")
  ax_bud.legend(handles, labels, fontsize=8)
  return fig


def plot_runs(run_dirs: Sequence[PathLike], out_png: PathLike,
              reference: PathLike | None = None) -> Path:
  """Overlays several runs in one PNG (see `runs_figure`).

  Args:
    run_dirs: run directories, each with ``eval/anytime.json`` and ``eval/budgeted.json``.
    out_png: the figure to write; its directory is created if missing.
    reference: optional JSON of published points (see `load_reference`), drawn dashed.

  Returns:
    The path of the PNG.

  Raises:
    FileNotFoundError: naming the missing file and the ``msdfuse-eval`` command to run.
  """
  fig = runs_figure(run_dirs, reference)
  out = Path(out_png)
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=120)
  return out
