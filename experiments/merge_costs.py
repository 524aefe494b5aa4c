"""Merge `costs.json` files measured on different backends into one comparison table.

  msdfuse-costs --config=configs/cifar.py:dataset=cifar100,model=msdfuse --json=costs_cpu.json   # on a CPU
  msdfuse-costs --config=configs/cifar.py:dataset=cifar100,model=msdfuse --json=costs_gpu.json   # on a GPU
  python experiments/merge_costs.py costs_cpu.json costs_gpu.json [--csv=merged.csv]

Prints a Markdown table, per exit: the literature (op_counter) cost, MACs and parameters (identical on every
backend: they come from the model's graph; a disagreement means the files describe different models and is
an error) and XLA's flop count per backend, plus its ratio to 2 x MACs.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from typing import Any, Sequence


def merge(reports: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
  """Returns (header, rows) of the merged table; raises ValueError if the reports disagree."""
  if not reports:
    raise ValueError("no costs.json given")
  first = reports[0]
  backends = []
  for r in reports:
    if (r["model"], r["dataset"], len(r["exits"])) != (first["model"], first["dataset"], len(first["exits"])):
      raise ValueError(f"cannot merge {r['model']}/{r['dataset']} with {first['model']}/{first['dataset']}")
    for a, b in zip(r["exits"], first["exits"]):
      if (a["op_counter"], a["macs"], a["params"]) != (b["op_counter"], b["macs"], b["params"]):
        raise ValueError(f"exit {a['exit']}: graph costs differ between backends {r['backend']} and "
                         f"{first['backend']}: not the same model")
    name, n = r["backend"], 2
    while name in backends:  # two files from the same kind of backend
      name, n = f"{r['backend']}#{n}", n + 1
    backends.append(name)
  header = ["exit", "op_counter", "macs", "params"]
  for b in backends:
    header += [f"xla_flops[{b}]", f"xla/2macs[{b}]"]
  rows = []
  for i, e in enumerate(first["exits"]):
    row = [e["exit"], e["op_counter"], e["macs"], e["params"]]
    for r in reports:
      flops = r["exits"][i].get("xla_flops")
      row += [flops, (flops / (2 * e["macs"])) if flops and e["macs"] else None]
    rows.append(row)
  return header, rows


def to_markdown(title: str, header: list[str], rows: list[list[Any]]) -> str:
  def fmt(v):
    if v is None:
      return "n/a"
    if isinstance(v, float) and v < 10:
      return f"{v:.3f}"
    return f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)
  lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("files", nargs="+", help="costs.json files (msdfuse-costs --json, or eval/costs.json)")
  parser.add_argument("--csv", help="also write the table as CSV")
  args = parser.parse_args(argv)
  try:
    reports = []
    for path in args.files:
      with open(path) as f:
        reports.append(json.load(f))
    header, rows = merge(reports)
  except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(to_markdown(f"{reports[0]['model']} on {reports[0]['dataset']}", header, rows))
  if args.csv:
    with open(args.csv, "w", newline="") as f:
      csv.writer(f).writerows([header] + rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
