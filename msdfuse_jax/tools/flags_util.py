"""Flag helpers shared by the command-line tools (all built on absl.app and ml_collections)."""

from __future__ import annotations

import importlib.util
import json
import logging as logging_std
import os
import pathlib
import re
import sys
from typing import Any, Sequence

from absl import app, flags
import ml_collections
from ml_collections import config_flags


def parse_config_arg(arg: str | None, valid: dict[str, str]) -> dict[str, str | bool]:
  """Parses a config file's argument, ``"key=value,key2=value2,flag"`` (flags map to True).

  `valid` maps each accepted key to how it is written in the error message (``{"model": "model=<preset>",
  "runlocal": "runlocal"}``); any other key is a ValueError listing them.
  """
  out: dict[str, str | bool] = {}
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    out[key.strip()] = value.strip() if sep else True
  unknown = sorted(set(out) - set(valid))
  if unknown:
    raise ValueError(f"unknown config argument(s) {unknown}; valid: {', '.join(valid.values())}")
  return out


def run_loop_fields(train: Any) -> None:
  """Sets the fields of ``config.train`` that every config file shares (logging, evaluation and checkpoint
  cadence, multi-process start-up, batch shards) to their defaults; see `configs/cifar.py` for each."""
  train.log_every_steps = 50
  train.eval_every_steps = -1  # <= 0: once per epoch and at the end
  train.checkpoint_every_steps = 1000
  train.keep_checkpoints = 3
  train.distributed = False  # join a multi-process run (jax.distributed.initialize) before training
  # Override JAX's cluster detection (TPU VM, SLURM, Open MPI, ...) when set; needed elsewhere, e.g. two
  # GPU machines or several processes on one: process 0's host:port, the process count, this process's id.
  train.coordinator_address = ""
  train.num_processes = 0  # 0: detected
  train.process_id = -1  # -1: detected
  # Seconds without a heartbeat after which the coordination service declares a process dead; then every
  # other process stops (exit status 4, one line naming the lost process and the last checkpoint).
  train.heartbeat_timeout_s = 60
  # jax.transfer_guard level for the training steps: "disallow" makes any implicit host<->device transfer
  # inside a step an error (the tests run so); "allow" is JAX's default.
  train.transfer_guard = "allow"
  train.async_checkpoints = True  # orbax writes a checkpoint while the next steps run
  # How a save is committed (checkpoints.COMMIT_MODES): "auto" picks "commit_file" on a FUSE mount (a
  # gcsfuse bucket, whose renames are not atomic) and "rename" elsewhere.
  train.checkpoint_commit = "auto"
  train.num_shards = 0  # batch shards (BatchNorm, Mixup units); 0: 1 per device; set: any device count
  # Each device runs its shards in this many sequential groups (gradients summed): the same step with
  # about 1/N of the activation memory. Must divide the shards per device (num_shards / device count).
  train.grad_accum_steps = 1


def technique_fields(config: Any) -> None:
  """Adds the training techniques' fields, all off, to a config that has ``config.optim``: IMTA's gradient
  equilibrium (``optim.gradient_equilibrium``) and IMTA's distillation of the last exit into the earlier ones
  (``distill.alpha``, ``distill.temperature``: loss_k = (1 - alpha) CE_k + alpha T^2 KL(p_K^T || p_k^T)),
  and L2W-DEN's meta-learned sample weights (``l2w.*``, `msdfuse_jax.l2w`). BoostNet's boosted ensembles
  are a model field, ``model.boost_reweight``. See `train.techniques`."""
  config.optim.gradient_equilibrium = False
  config.distill = ml_collections.ConfigDict()
  config.distill.alpha = 0.0
  config.distill.temperature = 1.0
  # L2W-DEN's meta-learned sample weights (`msdfuse_jax.l2w`): the authors' names and CIFAR command's values.
  config.l2w = ml_collections.ConfigDict()
  config.l2w.enabled = False
  config.l2w.meta_net_hidden_size = 500  # the meta MLP's width
  config.l2w.meta_net_num_layers = 1  # its ReLU layers (then linear + tanh)
  config.l2w.meta_net_input_type = "loss"  # loss | conf | both: per-exit losses and/or max softmax
  config.l2w.constraint_dimension = "col"  # row | col | mat: weights 1 + epsilon (w - mean over ...)
  config.l2w.epsilon = 0.8
  config.l2w.target_p_index = 15  # 1..39: the target exit distribution q_k ~ (index / 20)^k
  config.l2w.meta_interval = 1  # meta update every N steps
  config.l2w.meta_lr = 1e-4  # Adam, cosine to 0 over the run
  config.l2w.meta_weight_decay = 1e-4


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: Sequence[str] | None = None) -> None:
  """``--config=configs/cifar.py:dataset=cifar10,model=...`` plus ``--config.field=value`` overrides.

  Args:
    flag_values: where to define it (the global FLAGS for the tools; a fresh FlagValues in tests).
    sys_argv: the command line that overrides are read from (default: sys.argv at parse time).
  """
  config_flags.DEFINE_config_file("config", None, "Config file and its argument, e.g. "
                                  "configs/cifar.py:dataset=cifar100,model=msdfuse", lock_config=True,
                                  flag_values=flag_values, sys_argv=sys_argv)


def _load_config_file(spec: str) -> Any:
  """The config that ``--config=PATH[:ARG]`` names (for error messages only)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_msdfuse_config_for_errors", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def describe_override_error(argv: Sequence[str]) -> str | None:
  """A one-line message naming the first ``--config.a.b=...`` override whose field does not exist and the
  valid fields of the sub-dict it names; None when every override names a field."""
  spec = next((a.split("=", 1)[1] for a in argv if re.match(r"^--?config=", a)), None)
  if spec is None:
    return None
  try:
    config = _load_config_file(spec)
  except Exception:  # the config file itself is broken: let ml_collections say so  # pylint: disable=broad-except
    return None
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=]+)", arg)
    if not match:
      continue
    node, where = config, "config"
    for key in match.group(1).split("."):
      fields = sorted(node.keys()) if hasattr(node, "keys") else None
      if fields is None:
        return (f"unknown config field config.{match.group(1)}: {where} is a {type(node).__name__}, not a "
                "sub-dict with fields")
      if key not in fields:
        return f"unknown config field config.{match.group(1)}; valid fields of {where}: {', '.join(fields)}"
      node, where = node[key], f"{where}.{key}"
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a one-line error (exit status 2) for an override of a field that does not
  exist, in place of ml_collections' traceback; then the libraries' log lines are quietened
  (`quiet_library_logs`). Pass it to ``app.run(main, flags_parser=parse_flags)``."""
  try:
    rest = app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    fail(describe_override_error(argv) or f"bad --config override: {e}")
  quiet_library_logs()
  return rest


def run_tool(main) -> None:
  """``app.run(main)`` with the tools' flag parsing (`parse_flags`): the body of every tool's ``run()``."""
  app.run(main, flags_parser=parse_flags)


def config_or_fail(example: str = "configs/cifar.py:dataset=cifar100,model=msdfuse") -> Any:
  """The parsed ``--config``, or a one-line error saying it is required."""
  config = flags.FLAGS.config
  if config is None:
    fail(f"--config is required, e.g. --config={example}")
  return config


def print_report(text: str, report: dict[str, Any], json_path: str | None) -> None:
  """Prints a tool's table and, when asked (``--json=FILE``), writes the same figures as JSON."""
  print(text)
  if json_path:
    with open(json_path, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {json_path}")


def enable_compilation_cache(path: str | None = None) -> None:
  """Turns on JAX's persistent compilation cache (a second run of a tool skips most compile time)."""
  import jax  # pylint: disable=import-outside-toplevel
  path = path or os.environ.get("MSDFUSE_JAX_CACHE", os.path.expanduser("~/.cache/msdfuse_jax/xla"))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


# Set to 1 to see the libraries' own log lines (also shown with --verbosity=1 or more).
LIBRARY_LOGS_ENV = "MSDFUSE_JAX_LIBRARY_LOGS"
_PACKAGE_DIR = str(pathlib.Path(__file__).resolve().parents[1]) + os.sep  # msdfuse_jax/
# Warnings that libraries emit for what the project does on purpose (a checkpoint read without writing).
_EXPECTED_WARNINGS = ("Given directory is read only", "CheckpointManagerOptions.read_only=True")


class _ProjectLogFilter(logging_std.Filter):
  """Keeps a tool's output to the project's own progress lines and real warnings: INFO and DEBUG records
  of libraries (optax's note on a constant schedule, JAX's backend probe, orbax's per-save lines) and the
  warnings listed in `_EXPECTED_WARNINGS` are dropped."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno >= logging_std.WARNING:
      return not any(text in str(record.msg) for text in _EXPECTED_WARNINGS)
    return os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)


def library_logs_wanted() -> bool:
  """Whether the user asked for the libraries' log lines (`LIBRARY_LOGS_ENV` or --verbosity >= 1)."""
  verbosity = flags.FLAGS["verbosity"].value if "verbosity" in flags.FLAGS else 0
  return os.environ.get(LIBRARY_LOGS_ENV, "") not in ("", "0") or verbosity >= 1


def quiet_library_logs() -> None:
  """Installs `_ProjectLogFilter` on absl's handler (and Python's root handlers), unless the user asked for
  the libraries' logs. Idempotent; `parse_flags` calls it for every tool."""
  if library_logs_wanted():
    return
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  absl_handler = absl_logging.get_absl_handler()  # it hands records to its python_handler, unfiltered
  for handler in [absl_handler, absl_handler.python_handler, *logging_std.getLogger().handlers]:
    if not any(isinstance(f, _ProjectLogFilter) for f in handler.filters):
      handler.addFilter(_ProjectLogFilter())


def define_budget_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """--workdir, --p, --budget, --budget_ms and --batch_size: the flags of the tools that classify a run's
  test set under one budget (msdfuse-infer, msdfuse-export)."""
  from msdfuse_jax.evaluation import budget  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).",
                      flag_values=flag_values)
  flags.DEFINE_integer("p", None, f"Budget point p in 1..{budget.NUM_BUDGET_POINTS} (q = p/20), as in the "
                       "budgeted curve.", flag_values=flag_values)
  flags.DEFINE_float("budget", None, "Average cost per image (literature op_counter units), instead of --p.",
                     flag_values=flag_values)
  flags.DEFINE_float("budget_ms", None, "Predicted mean milliseconds per image on this machine, instead of "
                     "--p: thresholds fitted to the stages' measured times (msdfuse_jax.timebudget).",
                     flag_values=flag_values)
  flags.DEFINE_integer("batch_size", 256, "Images per batch (the largest bucket).", flag_values=flag_values)


def check_budget_flags(budget_required: bool = True, values: flags.FlagValues | None = None) -> None:
  """One-line errors for the flags of `define_budget_flags`: --workdir is required, and exactly one of --p
  (in range), --budget and --budget_ms (positive) when `budget_required`, at most one otherwise."""
  from msdfuse_jax.evaluation import budget  # pylint: disable=import-outside-toplevel
  values = flags.FLAGS if values is None else values
  if not values.workdir:
    fail("--workdir is required: the directory of a training run")
  given = sum(value is not None for value in (values.p, values.budget, values.budget_ms))
  if given > 1 or (budget_required and not given):
    fail(f"give exactly one of --p (1..{budget.NUM_BUDGET_POINTS}), --budget (average cost per image) or "
         "--budget_ms (milliseconds per image)")
  if values.p is not None and not 1 <= values.p <= budget.NUM_BUDGET_POINTS:
    fail(f"--p must lie in 1..{budget.NUM_BUDGET_POINTS}, got {values.p}")
  if values.budget_ms is not None and not values.budget_ms > 0:
    fail(f"--budget_ms must be positive (milliseconds per image), got {values.budget_ms:g}")
  if values.batch_size < 1:
    fail(f"--batch_size must be positive, got {values.batch_size}")


def fail(message: str) -> None:
  """Exits with a one-line error instead of a traceback."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
