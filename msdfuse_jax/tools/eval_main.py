"""msdfuse-eval: evaluate a run directory (anytime and budgeted curves, probabilities, costs, figures).

  msdfuse-eval --workdir=DIR

Loads ``DIR/config.json`` and the newest checkpoint, and writes ``DIR/eval/`` (see
`msdfuse_jax.evaluation.evaluate`).
"""

from __future__ import annotations

from absl import app, flags

from msdfuse_jax import checkpoints
from msdfuse_jax.data import sources
from msdfuse_jax.evaluation import evaluate
from msdfuse_jax.tools import flags_util

flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).")
flags.DEFINE_string("out_dir", None, "Where to write the artifacts (default: WORKDIR/eval).")
flags.DEFINE_bool("xla", True, "Also report XLA's flop count per exit (compiles every exit prefix).")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  if not FLAGS.workdir:
    flags_util.fail("--workdir is required: the directory of a training run")
  flags_util.enable_compilation_cache()
  try:
    summary = evaluate.evaluate_run(FLAGS.workdir, FLAGS.out_dir, with_xla=FLAGS.xla)
  except (FileNotFoundError, ValueError, checkpoints.CheckpointError, sources.DataError) as e:
    flags_util.fail(str(e))
  print(f"checkpoint step {summary['step']}; anytime prediction on the test set:")
  print(evaluate.format_anytime(summary["anytime"]))
  best = max(summary["budgeted"], key=lambda p: p["accuracy"])
  print(f"budgeted: {len(summary['budgeted'])} points, expected cost {summary['budgeted'][0]['expected_cost']:,.0f} .. "
        f"{summary['budgeted'][-1]['expected_cost']:,.0f}; best accuracy {best['accuracy']:.2f} % at "
        f"p={best['p']}")
  print(f"wrote {summary['out_dir']}")


def run() -> None:
  flags_util.run_tool(main)


if __name__ == "__main__":
  run()
