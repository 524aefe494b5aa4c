"""msdfuse-train: train a multi-exit model, with TensorBoard curves and checkpoints in a workdir.

  msdfuse-train --config=configs/cifar.py:dataset=cifar100,model=msdfuse --workdir=DIR [--config.x=y ...]

Re-running the same command resumes from the newest checkpoint. SIGTERM saves a checkpoint at the next step
boundary and exits with status 143; a non-finite loss stops with status 3. Bad input (missing data,
unknown model, impossible batch layout) is reported in one line, with status 2.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging

from msdfuse_jax import checkpoints, input_pipeline, parallel, train
from msdfuse_jax.tools import flags_util

flags_util.define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and the resolved config.")
flags.DEFINE_bool("tuned_cpu_flags", True, "Add parallel.CPU_XLA_FLAGS (the XLA:CPU settings measured "
                  "fastest for these models) to XLA_FLAGS, except flags already set there.")
FLAGS = flags.FLAGS


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.config is None:
    flags_util.fail("--config is required, e.g. --config=configs/cifar.py:dataset=cifar100,model=msdfuse")
  if not FLAGS.workdir:
    flags_util.fail("--workdir is required: the directory for checkpoints, logs and the resolved config")
  if FLAGS.tuned_cpu_flags:
    parallel.use_fast_cpu_flags()  # read when the backend starts, i.e. below
  # Before anything touches a device: a multi-host run must join the cluster first.
  parallel.maybe_initialize_distributed(FLAGS.config.train.distributed)
  flags_util.enable_compilation_cache()
  flags_util.quiet_library_logs()
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except train.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(128 + 15)  # the shell's convention for "ended by SIGTERM": a supervisor restarts the command
  except train.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except (input_pipeline.DataError, train.ConfigError, checkpoints.CheckpointError) as e:
    flags_util.fail(str(e))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
