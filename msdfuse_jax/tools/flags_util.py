"""Flag helpers shared by the command-line tools (all built on absl.app and ml_collections)."""

from __future__ import annotations

import logging as logging_std
import os
import sys

from absl import flags
from ml_collections import config_flags


def define_config_flag() -> None:
  """``--config=configs/cifar.py:dataset=cifar10,model=...`` plus ``--config.field=value`` overrides."""
  config_flags.DEFINE_config_file("config", None, "Config file and its argument, e.g. "
                                  "configs/cifar.py:dataset=cifar100,model=msdfuse", lock_config=True)


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


def fail(message: str) -> None:
  """Exits with a one-line error instead of a traceback."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


FLAGS = flags.FLAGS
