"""msdfuse-train: train a multi-exit model, with TensorBoard curves and checkpoints in a workdir.

  msdfuse-train --config=configs/cifar.py:dataset=cifar100,model=msdfuse --workdir=DIR [--config.x=y ...]

Re-running the same command resumes from the newest checkpoint. SIGTERM saves a checkpoint at the next step
boundary and exits with status 143; a non-finite loss stops with status 3. Bad input (missing data,
unknown model, impossible batch layout) is reported in one line, with status 2. In a multi-process run, a
process that is lost (killed, out of memory, its host gone) stops the others within the heartbeat timeout
(``config.train.heartbeat_timeout_s``, 60 s) with one line naming it and the last checkpoint, status 4
(`msdfuse_jax.launcher`).
"""

from __future__ import annotations

# Before anything slow is imported (JAX, TensorFlow through clu): a SIGTERM that arrives while the run
# starts then stops it cleanly instead of killing it silently.
from msdfuse_jax import preemption  # pylint: disable=g-bad-import-order

preemption.install()

import sys  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags, logging  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from msdfuse_jax import checkpoints, launcher, parallel, train, xla_flags
from msdfuse_jax.data import sources
from msdfuse_jax.tools import flags_util

flags_util.define_config_flag()
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard logs and the resolved config.")
flags.DEFINE_bool("tuned_cpu_flags", True, "Add xla_flags.CPU_XLA_FLAGS (the XLA:CPU settings measured "
                  "fastest for these models) to XLA_FLAGS, except flags already set there.")
FLAGS = flags.FLAGS


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = flags_util.config_or_fail()
  if not FLAGS.workdir:
    flags_util.fail("--workdir is required: the directory for checkpoints, logs and the resolved config")
  heartbeat_s = int(config.train.get("heartbeat_timeout_s", parallel.HEARTBEAT_TIMEOUT_S))
  if config.train.distributed and not launcher.supervised():
    # This process only watches the one that trains (a lost peer then ends it in one line: launcher).
    sys.exit(launcher.supervise(FLAGS.workdir, heartbeat_s, int(config.train.process_id)))
  if FLAGS.tuned_cpu_flags:
    xla_flags.use_fast_cpu_flags()  # read when the backend starts, i.e. below
  # Before anything touches a device: a multi-host run must join the cluster first.
  try:
    parallel.maybe_initialize_distributed(config.train)
  except parallel.DistributedError as e:
    flags_util.fail(str(e))
  if jax.process_index() != 0:  # one process speaks for the run; the others only warn
    logging.set_verbosity(logging.WARNING)
  flags_util.enable_compilation_cache()
  try:
    train.train_and_evaluate(config, FLAGS.workdir)
  except train.Preempted as e:
    logging.warning("%s", e)
    print(f"preempted: {e}", file=sys.stderr)
    sys.exit(128 + 15)  # the shell's convention for "ended by SIGTERM": a supervisor restarts the command
  except train.NonFiniteLossError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except (sources.DataError, train.ConfigError, checkpoints.CheckpointError) as e:
    flags_util.fail(str(e))
  except Exception as e:  # pylint: disable=broad-except
    if jax.process_count() == 1:
      raise
    # Most likely a collective with a process that died (XLA's error, or gloo's inside orbax's barriers:
    # a ValueError): the coordination service will name it. The traceback goes to the crash report.
    logging.warning("a collective with the other processes failed; waiting up to %d s for JAX's "
                    "coordination service to say which process was lost", heartbeat_s +
                    launcher.VERDICT_MARGIN_S)
    launcher.await_verdict(e, FLAGS.workdir, heartbeat_s)


def run() -> None:
  flags_util.run_tool(main)


if __name__ == "__main__":
  run()
