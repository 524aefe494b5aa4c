"""msdfuse-infer: real early-exit inference on the test set, timed against the full network.

  msdfuse-infer --workdir=DIR --p=P          # P in 1..39 (budget.NUM_BUDGET_POINTS), the curve's points
  msdfuse-infer --workdir=DIR --budget=COST  # the largest validation budget <= COST (op_counter units)
  msdfuse-infer --workdir=DIR --budget_ms=T  # the largest predicted time <= T ms per image, on this machine

  msdfuse-infer --workdir=DIR --export=EXPORT  # the programs of msdfuse-export, through msdfuse_jax.serving
  msdfuse-infer --workdir=DIR --export=EXPORT --budget_ms=T   # refitted to T on this machine's times
  msdfuse-infer --workdir=DIR --p=P --deadline_ms=D   # also anytime: D ms per chunk of --batch_size images

Thresholds are fitted on the run's validation split exactly as in `msdfuse-eval`. The test set is then
classified stage by stage, each stage run only on the samples still undecided
(`msdfuse_jax.inference`). Reported: images/s of early exit, of the full network (every exit) and of the
last exit alone; the realised speedup against the speedup the cost ratio predicts; and a check that
predictions and exits equal the simulated budgeted evaluation's; each stage's time alone and the
time-ideal speedup (the full network's time over the survivor-weighted sum of the stages' times), with
the runner's overhead (realised / time-ideal) and the architecture's CPU penalty (time-ideal /
predicted). With --budget_ms the stages are timed first and the thresholds fitted to those times
(`msdfuse_jax.timebudget`); the predicted and the realised ms per image are reported for every budget.
Writes ``DIR/eval/infer.json``.

With --deadline_ms the test set is also classified under a deadline per chunk (`msdfuse_jax.deadlines`):
the fraction of chunks that met it, the worst overshoot, the accuracy, and a sweep of deadlines from the
first stage's time to the full network's, drawn in ``DIR/eval/anytime_deadline.png``.
"""

from __future__ import annotations

import os

from absl import app, flags

from msdfuse_jax import checkpoints, inference, rundir, serving
from msdfuse_jax.data import sources
from msdfuse_jax.evaluation import report
from msdfuse_jax.tools import flags_util

flags_util.define_budget_flags()
flags.DEFINE_integer("repeats", 3, "Timed repetitions; the best is reported.")
flags.DEFINE_string("export", None, "Run the programs of this export directory (msdfuse-export) with the "
                    "model-free runtime msdfuse_jax.serving; its budget and batch size are the export's "
                    "(or, with --budget_ms, refitted on its stored validation data to this machine's times).")
flags.DEFINE_float("deadline_ms", None, "Anytime: also classify the test set with this deadline (ms) per "
                   "chunk of --batch_size images (the export's batch size with --export).")
flags.DEFINE_integer("deadline_sweep", 8, "With --deadline_ms: how many deadlines to sweep, from the first "
                     "stage's time to the full network's (0: none).")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  if FLAGS.export is not None and (FLAGS.p is not None or FLAGS.budget is not None):
    flags_util.fail("--export runs the export's own budget (or --budget_ms, refitted): leave out --p and "
                    "--budget")
  flags_util.check_budget_flags(budget_required=FLAGS.export is None)
  if FLAGS.deadline_ms is not None:
    try:
      serving.check_deadline_ms(FLAGS.deadline_ms)
    except ValueError as e:
      flags_util.fail(f"--deadline_ms: {e}")
  if FLAGS.deadline_sweep < 0:
    flags_util.fail(f"--deadline_sweep must be 0 or more, got {FLAGS.deadline_sweep}")
  flags_util.enable_compilation_cache()
  try:
    out = inference.run_inference(FLAGS.workdir, FLAGS.p, FLAGS.budget,
                                  None if FLAGS.export else FLAGS.batch_size, FLAGS.repeats, FLAGS.export,
                                  budget_ms=FLAGS.budget_ms, deadline_ms=FLAGS.deadline_ms,
                                  deadline_sweep=FLAGS.deadline_sweep)
  except (FileNotFoundError, ValueError, checkpoints.CheckpointError, sources.DataError) as e:
    flags_util.fail(str(e))
  path = rundir.write_json(os.path.join(rundir.eval_dir(FLAGS.workdir), rundir.INFER_FILE), out)
  print(f"p={out['p']}: {out['num_images']} test images, exits per stage {out['exit_counts']}, "
        f"accuracy {out['accuracy']:.2f} %")
  if out["time_fit"] is not None:
    print(f"time budget {out['budget_ms']:g} ms per image: p={out['p']} predicted at "
          f"{out['predicted_ms_per_image']:.4g} ms per image ({out['time_fit']['criterion']} among "
          f"{out['time_fit']['family']}); stages timed on {out['stage_times']['device']}")
  print(f"ms per image: predicted {out['predicted_ms_per_image']:.4g}, realised "
        f"{out['realised_ms_per_image']:.4g} (full network {out['full_network_ms_per_image']:.4g})")
  print(f"expected cost {out['expected_cost']:,.0f} of {out['full_cost']:,} (predicted speedup "
        f"{out['predicted_speedup']:.2f}x)")
  print(f"images/s: early exit {out['early_exit_images_per_s']:.1f}, full network "
        f"{out['full_network_images_per_s']:.1f}, last exit alone {out['last_exit_images_per_s']:.1f}")
  print(f"realised speedup {out['speedup_vs_full']:.2f}x over the full network "
        f"({out['realised_over_predicted']:.2f} of predicted), {out['speedup_vs_last_exit']:.2f}x over "
        f"the last exit alone")
  print(f"stage ms per image at batch {out['batch_size']}: "
        f"{', '.join(f'{t:.3f}' for t in out['stage_ms_per_image'])}; images reaching each stage "
        f"{out['reaching_stage']}")
  print(f"time-ideal speedup {out['time_ideal_speedup']:.2f}x: runner overhead (realised / time-ideal) "
        f"{out['realised_over_time_ideal']:.2f}, CPU penalty of the architecture (time-ideal / predicted) "
        f"{out['time_ideal_over_predicted']:.2f}, realised / predicted {out['realised_over_predicted']:.2f}")
  print(f"predictions and exits equal the simulated budgeted evaluation ({out['simulation']}, matmul "
        f"precision {out['matmul_precision']['matches_simulation']}): {out['matches_simulation']}")
  if FLAGS.deadline_ms is not None:
    print(f"deadline {out['deadline_ms']:g} ms per chunk of {out['deadline_chunk_size']} images: "
          f"{100 * out['deadline_met_fraction']:.1f} % of chunks within it, worst overshoot "
          f"{out['worst_overshoot_ms']:.3f} ms, accuracy {out['deadline_accuracy']:.2f} %, exits per stage "
          f"{out['deadline_exit_counts']}")
    if out["deadline_sweep"]:
      lo, hi = out["deadline_sweep_range_ms"]
      config = rundir.load_config(FLAGS.workdir)
      figure = report.write_deadline(rundir.eval_dir(FLAGS.workdir), out["deadline_sweep"],
                                     deadline_ms=out["deadline_ms"], no_deadline_accuracy=out["accuracy"],
                                     model=config.model.name, dataset=config.dataset, step=out["step"])
      print(f"deadline sweep {lo:.3f}..{hi:.3f} ms (the first stage's time to the full network's): at least "
            f"{100 * out['deadline_sweep_min_met_fraction']:.1f} % of chunks within it; {figure}")
  print(f"wrote {path}")


def run() -> None:
  flags_util.run_tool(main)


if __name__ == "__main__":
  run()
