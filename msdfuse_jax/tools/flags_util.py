"""Flag helpers shared by the command-line tools (all built on absl.app and ml_collections)."""

from __future__ import annotations

import importlib.util
import json
import logging as logging_std
import os
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
  train.num_shards = 0  # batch shards (BatchNorm, Mixup units); 0: 1 per device; set: any device count
  # Each device runs its shards in this many sequential groups (gradients summed): the same step with
  # about 1/N of the activation memory. Must divide the shards per device (num_shards / device count).
  train.grad_accum_steps = 1


def technique_fields(config: Any) -> None:
  """Adds the training techniques' fields, all off, to a config that has ``config.optim``: IMTA's gradient
  equilibrium (``optim.gradient_equilibrium``) and IMTA's distillation of the last exit into the earlier ones
  (``distill.alpha``, ``distill.temperature``: loss_k = (1 - alpha) CE_k + alpha T^2 KL(p_K^T || p_k^T)).
  BoostNet's boosted ensembles are a model field, ``model.boost_reweight``. See `train.techniques`."""
  config.optim.gradient_equilibrium = False
  config.distill = ml_collections.ConfigDict()
  config.distill.alpha = 0.0
  config.distill.temperature = 1.0


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
  exist, in place of ml_collections' traceback. Pass it to ``app.run(main, flags_parser=parse_flags)``."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    fail(describe_override_error(argv) or f"bad --config override: {e}")
  return []  # not reached


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


class _LibraryInfoFilter(logging_std.Filter):
  """Drops INFO/DEBUG records that orbax and the TPU probe emit on every save (dozens per checkpoint)."""

  NOISY = ("/orbax/", "/jax/_src/xla_bridge.py")

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or not any(n in record.pathname for n in self.NOISY)


def quiet_library_logs() -> None:
  """Keeps the tools' own progress lines readable: libraries log warnings and errors only."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _LibraryInfoFilter) for f in handler.filters):
    handler.addFilter(_LibraryInfoFilter())


def define_budget_flags() -> None:
  """--workdir, --p, --budget and --batch_size: the flags of the tools that classify a run's test set under
  one budget (msdfuse-infer, msdfuse-export)."""
  from msdfuse_jax.evaluation import budget  # pylint: disable=import-outside-toplevel
  flags.DEFINE_string("workdir", None, "Run directory (holds config.json and checkpoints/).")
  flags.DEFINE_integer("p", None, f"Budget point p in 1..{budget.NUM_BUDGET_POINTS} (q = p/20), as in the "
                       "budgeted curve.")
  flags.DEFINE_float("budget", None, "Average cost per image (literature op_counter units), instead of --p.")
  flags.DEFINE_integer("batch_size", 256, "Images per batch (the largest bucket).")


def check_budget_flags(budget_required: bool = True) -> None:
  """One-line errors for the flags of `define_budget_flags`: --workdir is required, and exactly one of --p
  (in range) and --budget when `budget_required`, neither otherwise."""
  from msdfuse_jax.evaluation import budget  # pylint: disable=import-outside-toplevel
  values = flags.FLAGS
  if not values.workdir:
    fail("--workdir is required: the directory of a training run")
  if budget_required and (values.p is None) == (values.budget is None):
    fail(f"give exactly one of --p (1..{budget.NUM_BUDGET_POINTS}) or --budget (average cost per image)")
  if values.p is not None and not 1 <= values.p <= budget.NUM_BUDGET_POINTS:
    fail(f"--p must lie in 1..{budget.NUM_BUDGET_POINTS}, got {values.p}")
  if values.batch_size < 1:
    fail(f"--batch_size must be positive, got {values.batch_size}")


def fail(message: str) -> None:
  """Exits with a one-line error instead of a traceback."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)
