"""Test-wide set-up: the persistent compilation cache, and where the shared data lives."""

import os
import pathlib
import sys

import jax
import pytest

from msdfuse_jax import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# The tools and scripts that the tests start import this checkout, wherever they run (cwd=tmp_path) and
# whichever checkout is installed (an editable install of another worktree would be tested instead).
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

# Compiled programs are cached across test runs (and across the tests of one run that compile the same
# program), which is most of the suite's time on a 2-core CPU. The tools that the tests start inherit the
# variable (flags_util.enable_compilation_cache reads it), so a tool and an in-process test share programs.
CACHE = os.environ.setdefault("MSDFUSE_JAX_CACHE", str(REPO / ".jax_cache"))
jax.config.update("jax_compilation_cache_dir", CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# On a CPU-only install the suite compiles at XLA's backend optimisation level 0 (LLVM's -O0), in this
# process and, through XLA_FLAGS, in the tools it starts: a train step of the tiny models then compiles in
# about 0.6 of the time and runs 2-3 times slower, a good trade for tests that take a few steps. Programs
# that give an optimisation level themselves (models.init_variables) keep it. A level set in XLA_FLAGS
# before the run is kept.
if not xla_flags.accelerator_plugin_installed():
  xla_flags.add_flags(["--xla_backend_optimization_level=0"])

# Under pytest-xdist every worker is a process of its own: on a GPU none may take most of its memory up front.
if "PYTEST_XDIST_WORKER" in os.environ:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="module")
def float32_matmuls():
  """The module's float32 convolutions and dots at float32's own precision ("highest"). On a GPU (TF32)
  or a TPU (bfloat16 passes) the default precision rounds two different programs differently, by more
  than the tests that compare them exactly allow; on the CPU it changes nothing. Use it with
  ``pytestmark = pytest.mark.usefixtures("float32_matmuls")``."""
  with jax.default_matmul_precision("highest"):
    yield


def shared_file(*parts: str) -> pathlib.Path:
  """A file of ../shared, or a skip naming it when the checkout has no ../shared beside it."""
  path = SHARED.joinpath(*parts)
  if not path.exists():
    pytest.skip(f"{path} not found: these tests need ../shared beside the repository")
  return path


# The tools that tune XLA:CPU's flags by default (msdfuse_jax.xla_flags).
_TUNING_TOOLS = ("train_main", "bench_main")


def tool_command(tool: str, *args: str, tuned_cpu_flags: bool = False) -> list[str]:
  """``python -m msdfuse_jax.tools.<tool> *args`` as the tests run it.

  msdfuse-train and msdfuse-bench run with XLA's own CPU settings (``--notuned_cpu_flags``) unless asked,
  as the in-process tests do: a tool run and an in-process run of one config then compile the same
  programs (one entry of the compilation cache), and the tuned settings compile the tiny models about a
  third slower. test_bench.py starts the tools with the tuned settings, so that XLA is seen to accept them.
  """
  command = [sys.executable, "-m", f"msdfuse_jax.tools.{tool}", *args]
  if tool in _TUNING_TOOLS and not tuned_cpu_flags:
    command.append("--notuned_cpu_flags")
  return command
