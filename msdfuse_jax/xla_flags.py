"""XLA:CPU settings measured fastest for these networks, applied by the tools before the backend starts.

`use_fast_cpu_flags` only touches ``XLA_FLAGS`` on a CPU-only install of the validated jaxlib releases, and
never overrides a flag the user set.
"""

from __future__ import annotations

import importlib.util
import os

import jaxlib
from absl import logging

# XLA:CPU settings measured fastest for these convnets on a 2-core x86 CPU (msdfuse-bench, msdnet_anytime7,
# CIFAR-100, batch 64 / 256; the profile is dominated by many small convolutions and BatchNorm reductions):
# - no YNNPACK fusions: every convolution then runs in Eigen, faster for MSDNet's small channel counts;
# - oneDNN takes the dots and the element-wise and reduction fusions;
# - fast math for reassociation and FMA contraction only: NaN/Inf, division and functions stay exact, so
#   a non-finite loss is still seen as one.
# Together: train step about 25 % less CPU time, eval about twice the images/s of XLA's defaults. They only
# touch the CPU backend.
# - optimisation barriers kept through CSE: XLA:CPU removes them first by default (its
#   "cse_barrier_expander"), so CSE merged the recomputation that `jax.checkpoint` (config.model.remat)
#   emits for the backward pass with the forward pass, which kept every activation: remat saved nothing
#   (msdnet_anytime7, batch 256: 1546 MB of temporaries with remat, 571 MB with this flag, 1521 MB
#   without remat; docs/training.md). Only programs with barriers change.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",
                 "--xla_disable_hlo_passes=cse_barrier_expander",
                 "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
                 "--xla_cpu_enable_fast_math=true",
                 "--xla_cpu_fast_math_honor_nans=true",
                 "--xla_cpu_fast_math_honor_infs=true",
                 "--xla_cpu_fast_math_honor_division=true",
                 "--xla_cpu_fast_math_honor_functions=true")


# Python modules of JAX's accelerator plugins (CUDA, ROCm, TPU).
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin", "jax_rocm60_plugin",
                        "libtpu")
# jaxlib releases whose XLA knows every flag of CPU_XLA_FLAGS (an unknown flag in XLA_FLAGS aborts the
# process, and experimental flags come and go).
_VALIDATED_JAXLIB = ("0.10.",)


def accelerator_plugin_installed() -> bool:
  """Whether JAX can find a CUDA, ROCm or TPU plugin here (otherwise this is a CPU-only install)."""
  return any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def use_fast_cpu_flags() -> None:
  """Adds `CPU_XLA_FLAGS` to ``XLA_FLAGS``, except those the user already set there.

  Only effective before the backend starts (the first device operation), so the tools call it first.
  Set a flag yourself to override it: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot``
  restores XLA's default for that one.
  """
  # On a GPU/TPU host they would not help, and an XLA build that does not know an experimental flag
  # refuses to start: leave XLA_FLAGS alone wherever an accelerator plugin is installed.
  if accelerator_plugin_installed():
    return
  if not jaxlib.__version__.startswith(_VALIDATED_JAXLIB):
    logging.info("jaxlib %s: XLA:CPU flags %s not validated for it, left unset", jaxlib.__version__,
                 CPU_XLA_FLAGS)
    return
  add_flags(CPU_XLA_FLAGS)


def add_flags(flags: tuple[str, ...] | list[str]) -> None:
  """Appends ``--name=value`` flags to ``XLA_FLAGS``, except those whose name is set there already."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [flag for flag in flags if flag.split("=")[0] + "=" not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()
