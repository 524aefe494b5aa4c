"""msdfuse-export: a run's early-exit programs for one budget, serialized for deployment.

  msdfuse-export --workdir=DIR --p=P --out=EXPORT            # P in 1..39, the budgeted curve's points
  msdfuse-export --workdir=DIR --budget=COST --out=EXPORT    # the largest validation budget <= COST
  msdfuse-export --workdir=DIR --budget_ms=T --out=EXPORT     # the largest predicted time <= T ms per image
  msdfuse-export ... --batch_size=256 --platforms=cpu,cuda,tpu

Writes one `jax.export` program (StableHLO) per stage and bucket size, with BatchNorm folded into the
convolutions and the weights inside, and ``manifest.json`` (model, dataset, exits, buckets, per-exit cost,
the thresholds fitted on the validation split, commit and config, the stage time table measured here),
and ``validation.npz`` (the validation split's per-exit confidences and correctness, for refits). Load it with
``msdfuse_jax.serving.Runner.from_dir(EXPORT)`` (jax and numpy only) or time it with
``msdfuse-infer --workdir=DIR --export=EXPORT``.
"""

from __future__ import annotations

import os

from absl import app, flags

from msdfuse_jax import checkpoints, exporting, serving
from msdfuse_jax.data import sources
from msdfuse_jax.tools import flags_util

flags_util.define_budget_flags()
flags.DEFINE_integer("num_buckets", 5, "Bucket sizes: batch_size, /2, /4, ... (this many).")
flags.DEFINE_string("out", None, "The export directory to write.")
flags.DEFINE_list("platforms", None, f"Platforms to lower for, among {list(exporting.PLATFORMS)} "
                  "(default: this machine's).")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  flags_util.check_budget_flags()
  if not FLAGS.out:
    flags_util.fail("--out is required: the export directory to write")
  if FLAGS.num_buckets < 1:
    flags_util.fail(f"--num_buckets must be positive, got {FLAGS.num_buckets}")
  if os.path.isfile(os.path.join(FLAGS.out, serving.MANIFEST)) or (
      os.path.isdir(FLAGS.out) and os.listdir(FLAGS.out)):
    flags_util.fail(f"--out={FLAGS.out} exists and is not empty: give a new directory")
  flags_util.enable_compilation_cache()
  try:
    manifest = exporting.export_run(FLAGS.workdir, FLAGS.out, FLAGS.p, FLAGS.budget, FLAGS.batch_size,
                                    FLAGS.num_buckets, platforms=FLAGS.platforms, budget_ms=FLAGS.budget_ms)
  except (FileNotFoundError, ValueError, checkpoints.CheckpointError, sources.DataError) as e:
    flags_util.fail(str(e))
  size = sum(os.path.getsize(os.path.join(FLAGS.out, f)) for f in manifest["sha256"])
  print(f"{manifest['model']} ({manifest['dataset']}), p={manifest['p']}: {manifest['num_exits']} stages x "
        f"buckets {manifest['buckets']} = {len(manifest['sha256'])} programs for {manifest['platforms']} "
        f"({size / 1e6:.1f} MB), {manifest['batch_norm']['folded_into_convolutions']} BatchNorms folded "
        f"(largest logit change {manifest['batch_norm']['max_logit_change']:.2g})")
  print(f"thresholds {', '.join(f'{t:.4f}' for t in manifest['thresholds'][:-1])}; expected validation cost "
        f"{manifest['expected_val_cost']:,.0f} of {manifest['exit_costs'][-1]:,}")
  if manifest.get("time_fit"):
    print(f"time budget {manifest['budget_ms']:g} ms per image: p={manifest['p']} predicted at "
          f"{manifest['time_fit']['predicted_ms_per_image']:.4g} ms per image on "
          f"{manifest['stage_times']['device']}")
  print(f"wrote {FLAGS.out}")


def run() -> None:
  flags_util.run_tool(main)


if __name__ == "__main__":
  run()
