"""The train step's memory for the presets (XLA's `memory_analysis()` of the compiled step), as a table.

  python experiments/step_memory_table.py --out=/tmp/step_memory [--batch_size=512] \
      [--presets=msdnet_anytime7,msdfuse] [--dtypes=float32,bfloat16] [--variants=plain,accum4,remat]

Compiles (never runs) each preset's train step through `msdfuse-bench --compile_only`'s code path
(`bench_main.benchmark_compile`): CIFAR presets on CIFAR-100 (32x32), ImageNet-mode presets on ImageNet
(224x224, the stream pipeline), one shard per device, each in every dtype and variant asked for
(``plain``; ``accum4``: ``config.train.grad_accum_steps=4`` with ``num_shards=4``; ``remat``:
``config.model.remat=True``). Writes OUT/step_memory.json (one record per compile, bench's keys, written
after each) and OUT/step_memory.md (the table of docs/training.md, "Memory"). The figures are the backend's
own: on the CPU, XLA:CPU's buffer assignment, which a GPU's or TPU's compiler does differently. A compile
of a CIFAR preset takes 1-4 minutes on a loaded 2-core CPU; an ImageNet preset longer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # configs/ of this checkout

from configs import cifar, imagenet  # pylint: disable=wrong-import-position
from msdfuse_jax import models, xla_flags  # pylint: disable=wrong-import-position
from msdfuse_jax.tools import bench_main  # pylint: disable=wrong-import-position

VARIANTS = {"plain": {}, "accum4": {"train.num_shards": 4, "train.grad_accum_steps": 4},
            "remat": {"model.remat": True}}


def parse_args() -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="directory for step_memory.json and step_memory.md")
  parser.add_argument("--batch_size", type=int, default=512, help="global batch of the compiled step")
  parser.add_argument("--presets", default="", help="comma-separated presets (default: all but *_tiny)")
  parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated compute dtypes")
  parser.add_argument("--variants", default="plain", help=f"comma-separated, of {sorted(VARIANTS)}")
  return parser.parse_args()


def preset_config(name: str, dtype: str, variant: str) -> Any:
  """The config msdfuse-bench would build for `name` (CIFAR-100 or ImageNet), in `dtype`, with `variant`."""
  if models.preset_hparams(name).get("imagenet"):
    config = imagenet.get_config(f"model={name}")
  else:
    config = cifar.get_config(f"dataset=cifar100,model={name}")
  config.model.dtype = dtype
  for field, value in VARIANTS[variant].items():
    group, key = field.split(".")
    config[group][key] = value
  return config


def markdown(records: list[dict[str, Any]]) -> str:
  """One row per preset and variant: temporaries per dtype, then the arguments (the state and batch)."""
  dtypes = list(dict.fromkeys(r["dtype"] for r in records))
  rows = {}
  for r in records:
    rows.setdefault((r["model"], r["variant"]), {})[r["dtype"]] = r
  head = ["preset", "dataset", "variant", *[f"temp MB ({d})" for d in dtypes], "arguments MB (float32)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for (model, variant), by_dtype in rows.items():
    first = next(iter(by_dtype.values()))
    temps = [f"{by_dtype[d]['step_temp_memory_mb']:.0f}" if d in by_dtype else "" for d in dtypes]
    args = by_dtype.get("float32", first)["step_argument_memory_mb"]
    lines.append(f"| {model} | {first['dataset']} | {variant} | " + " | ".join(temps) + f" | {args:.0f} |")
  r = records[0]
  lines.append("")
  lines.append(f"XLA:CPU's figures (`compiled.memory_analysis()`, {r['backend']}, {r['devices']} device), "
               f"batch {r['batch_size']}, `experiments/step_memory_table.py`.")
  return "\n".join(lines) + "\n"


def main() -> None:
  args = parse_args()
  xla_flags.use_fast_cpu_flags()  # msdfuse-bench's default settings, before the backend starts
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  variants, dtypes = args.variants.split(","), args.dtypes.split(",")
  unknown = sorted(set(variants) - set(VARIANTS))
  if unknown:
    sys.exit(f"error: unknown --variants {unknown}; valid: {sorted(VARIANTS)}")
  presets = args.presets.split(",") if args.presets else [n for n in models.preset_names()
                                                           if not n.endswith("_tiny")]
  records = []
  for name in presets:
    for variant in variants:
      for dtype in dtypes:
        t0 = time.perf_counter()
        report = bench_main.benchmark_compile(preset_config(name, dtype, variant), args.batch_size)
        records.append({**report, "variant": variant})
        print(f"{name} {variant} {dtype}: temp {report['step_temp_memory_mb']:.1f} MB, arguments "
              f"{report['step_argument_memory_mb']:.1f} MB ({time.perf_counter() - t0:.0f} s, load "
              f"{os.getloadavg()[0]:.1f})", flush=True)
        (out / "step_memory.json").write_text(json.dumps(records, indent=2))
        (out / "step_memory.md").write_text(markdown(records))
  print(markdown(records))


if __name__ == "__main__":
  main()
