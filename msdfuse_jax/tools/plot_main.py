"""``msdfuse-plot``: overlay the evaluated curves of several runs in one figure.

Usage::

  msdfuse-plot workdirs/msdnet workdirs/msdfuse \
      --reference experiments/reference_points_example.json --out figures/cifar100.png

Each RUN_DIR must hold ``eval/anytime.json`` and ``eval/budgeted.json`` (written by
``msdfuse-eval --workdir=RUN_DIR``). The figure has the anytime curves on the left and the
budgeted batch classification curves on the right, costs in units of 1e8.

  msdfuse-plot --time points/ RUN_DIR/eval/infer.json ... --out figures/time.png

draws instead the budgeted accuracy against the *realised* time per image of ``msdfuse-infer`` runs (their
``infer.json`` files, or folders of them), one line per model and kind of fit: thresholds fitted to a time
budget (``--budget_ms``), to an ops budget (``--budget``), or a plain budget point (``--p``)
(`msdfuse_jax.evaluation.time_report`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from msdfuse_jax.evaluation import report, time_report


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Parses the command line (`sys.argv[1:]` when `argv` is None)."""
  parser = argparse.ArgumentParser(
      prog="msdfuse-plot",
      description="Overlay the anytime and budgeted curves of evaluated runs.")
  parser.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                      help="run directories evaluated by msdfuse-eval (each has eval/*.json)")
  parser.add_argument("--time", nargs="+", metavar="INFER_JSON", default=None,
                      help="infer.json files of msdfuse-infer runs (or folders of them): accuracy against "
                           "realised ms per image, time-fitted against ops-fitted thresholds")
  parser.add_argument("--reference", metavar="FILE", default=None,
                      help='JSON of published points: {"anytime": {name: [[cost, acc], ...]}, '
                           '"budgeted": {...}}, drawn as dashed lines')
  parser.add_argument("--out", metavar="FILE.png", required=True, help="figure to write")
  return parser.parse_args(argv)


def run(argv: Sequence[str] | None = None) -> int:
  """Console-script entry point; returns the process exit status.

  Args:
    argv: arguments without the program name; `sys.argv[1:]` when None.

  Returns:
    0 on success, 1 when an input file is missing or malformed (the message says which).
  """
  args = parse_args(argv)
  if bool(args.run_dirs) == bool(args.time):
    print("msdfuse-plot: error: give run directories (anytime and budgeted curves) or --time INFER_JSON... "
          "(accuracy against realised time), not both", file=sys.stderr)
    return 2
  try:
    if args.time:
      out = time_report.plot_time(args.time, args.out)
    else:
      out = report.plot_runs(args.run_dirs, args.out, reference=args.reference)
  except (FileNotFoundError, ValueError) as e:
    # A missing eval file is a user error with a known fix; a traceback would hide it.
    print(f"msdfuse-plot: error: {e}", file=sys.stderr)
    return 1
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(run())
