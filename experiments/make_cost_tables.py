"""Writes `msdfuse_jax/models/cost_tables.json`: the per-exit costs of the presets, as the code counts them.

  python experiments/make_cost_tables.py   # 1-2 minutes on a CPU; prints every table it writes

Run it by hand after a change that moves a cost on purpose; tests/test_costs.py checks the file against
`msdfuse_jax.costs.exit_costs` (jaxpr only, no compilation), so an unintended change fails a test.

The file is ``{entry: {dataset: [{"exit": k, "op_counter": ..., "macs": ..., "params": ...}, ...]}}``,
cumulative per exit (see `msdfuse_jax.costs`). An entry is a preset name, or ``preset,field=value`` for a
preset with an overridden string field (``resnet_mc,head=pool``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from msdfuse_jax import costs, models
from msdfuse_jax.data import sources

OUT = Path(models.__file__).resolve().parent / "cost_tables.json"
CIFAR = ("cifar10", "cifar100")
# entry -> the datasets of its tables (class count and image size follow from the dataset).
ENTRIES = {**{e: CIFAR for e in ("msdfuse", "msdnet_anytime7", "msdnet_budget5", "ranet_cifar", "ranet_readme",
                                 "resnet_mc", "resnet_mc,head=pool", "densenet_mc", "densenet_mc,head=pool")},
           "msdfuse_imagenet": ("imagenet2012",)}
FIELDS = ("op_counter", "macs", "params")


def parse_entry(entry: str) -> tuple[str, dict[str, str]]:
  """``"resnet_mc,head=pool"`` -> ``("resnet_mc", {"head": "pool"})``."""
  name, *overrides = entry.split(",")
  return name, dict(o.split("=", 1) for o in overrides)


def entry_costs(entry: str, dataset: str) -> list[dict[str, Any]]:
  """The table rows of one entry on `dataset`: exit, op_counter, macs and params of every exit."""
  name, overrides = parse_entry(entry)
  got = costs.exit_costs(models.build_model(name, sources.num_classes(dataset), **overrides),
                         image_size=sources.image_size(dataset), with_xla=False)
  return [{"exit": c.exit, **{f: getattr(c, f) for f in FIELDS}} for c in got]


def dumps(tables: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
  """The JSON text of `tables`, one exit per line so that a diff shows which exit moved."""
  entries = []
  for entry, per_dataset in tables.items():
    datasets = []
    for dataset, rows in per_dataset.items():
      lines = ",\n".join(f"   {json.dumps(r)}" for r in rows)
      datasets.append(f"  {json.dumps(dataset)}: [\n{lines}\n  ]")
    entries.append(f" {json.dumps(entry)}: {{\n" + ",\n".join(datasets) + "\n }")
  return "{\n" + ",\n".join(entries) + "\n}\n"


def main() -> int:
  tables: dict[str, dict[str, list[dict[str, Any]]]] = {}
  for entry, datasets in ENTRIES.items():
    tables[entry] = {}
    for dataset in datasets:
      start = time.perf_counter()
      rows = tables[entry][dataset] = entry_costs(entry, dataset)
      print(f"{entry} on {dataset} ({time.perf_counter() - start:.1f} s)")
      print(f"{'exit':>4} {'op_counter':>14} {'MACs':>14} {'params':>11}")
      for r in rows:
        print(f"{r['exit']:>4} {r['op_counter']:>14,d} {r['macs']:>14,d} {r['params']:>11,d}")
  OUT.write_text(dumps(tables))
  print(f"wrote {OUT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
