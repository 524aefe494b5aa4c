"""Data parallelism in one place: multi-host start-up, replication, sharding and the pmap itself.

Training is data-parallel with `jax.pmap` over all local devices (and, after
`jax.distributed.initialize`, over every host). The global batch is cut into `num_shards` equal *shards*;
each device runs `num_shards / device_count` of them. A shard is the unit of BatchNorm statistics and of
Mixup/CutMix pairing, so fixing ``config.train.num_shards`` makes a run compute the same thing on 1 device
or on N (up to float summation order). A later move to `jit` with shardings touches this file only.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import Any, Callable, Iterator

import jax
import jaxlib
import numpy as np
from absl import logging

AXIS = "batch"  # the pmap axis name every collective of the train and eval steps reduces over


def maybe_initialize_distributed(requested: bool) -> None:
  """Calls `jax.distributed.initialize()` when the config asks or the environment names a coordinator.

  Must run before anything touches a device. On a TPU VM slice the coordinator, process count and index
  are discovered automatically; elsewhere set ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
  ``JAX_PROCESS_ID`` (read by JAX itself).
  """
  if not (requested or os.environ.get("JAX_COORDINATOR_ADDRESS")):
    return
  if jax.distributed.is_initialized():
    return
  jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


# XLA:CPU settings measured fastest for these convnets on a 2-core x86 CPU (msdfuse-bench, msdnet_anytime7,
# CIFAR-100, batch 64 / 256; the profile is dominated by many small convolutions and BatchNorm reductions):
# - no YNNPACK fusions: every convolution then runs in Eigen, faster for MSDNet's small channel counts;
# - oneDNN takes the dots and the element-wise and reduction fusions;
# - fast math for reassociation and FMA contraction only: NaN/Inf, division and functions stay exact, so
#   a non-finite loss is still seen as one.
# Together: train step about 25 % less CPU time, eval about twice the images/s of XLA's defaults. They only
# touch the CPU backend.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",
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


def use_fast_cpu_flags() -> None:
  """Adds `CPU_XLA_FLAGS` to ``XLA_FLAGS``, except those the user already set there.

  Only effective before the backend starts (the first device operation), so the tools call it first.
  Set a flag yourself to override it: ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot``
  restores XLA's default for that one.
  """
  # On a GPU/TPU host they would not help, and an XLA build that does not know an experimental flag
  # refuses to start: leave XLA_FLAGS alone wherever an accelerator plugin is installed.
  if any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS):
    return
  if not jaxlib.__version__.startswith(_VALIDATED_JAXLIB):
    logging.info("jaxlib %s: XLA:CPU flags %s not validated for it, left unset", jaxlib.__version__,
                 CPU_XLA_FLAGS)
    return
  current = os.environ.get("XLA_FLAGS", "")
  extra = [flag for flag in CPU_XLA_FLAGS if flag.split("=")[0] + "=" not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def num_shards(requested: int) -> int:
  """The number of batch shards: `requested`, or one per device when it is 0 or less.

  Raises:
    ValueError: when `requested` is not a multiple of the device count.
  """
  devices = jax.device_count()
  if requested <= 0:
    return devices
  if requested % devices:
    raise ValueError(f"config.train.num_shards={requested} must be a multiple of the {devices} devices "
                     "(or 0 for one shard per device)")
  return requested


def local_shard_ids(shards: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's shards, as (local, global) int32 arrays of shape (local devices, shards per device).

  Local ids index the process's share of the data; global ids key the augmentation randomness.
  """
  per_device = shards // jax.device_count()
  local = np.arange(jax.local_device_count() * per_device, dtype=np.int32)
  offset = jax.process_index() * len(local)
  local = local.reshape(jax.local_device_count(), per_device)
  return local, local + np.int32(offset)


def _local_mesh_sharding() -> jax.sharding.NamedSharding:
  # The leading axis over the local devices, named like the pmap axis: that is the sharding pmap gives its
  # outputs, so the state fed back into the next step has the sharding of the first one. Any other (a mesh
  # axis named otherwise) makes the second call trace and compile the whole step again.
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree: Any) -> Any:
  """Copies every array of `tree` to every local device (a leading axis of size local_device_count)."""
  n = jax.local_device_count()
  sharding = _local_mesh_sharding()
  return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(np.asarray(x), (n, *np.shape(x))), sharding),
                      tree)


def shard(tree: Any) -> Any:
  """Puts arrays whose leading axis is local_device_count on the local devices, one slice each."""
  sharding = _local_mesh_sharding()
  return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), tree)


def unreplicate(tree: Any) -> Any:
  """The first device's copy of a replicated pytree, as host numpy arrays (no cross-device gather)."""
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(x.addressable_shards[0].data)[0]
    return np.asarray(x)[0]
  return jax.tree.map(first, tree)


def pmap(fn: Callable[..., Any], *, donate_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
  """`jax.pmap` over every device with the module's axis name (all arguments mapped over devices)."""
  return jax.pmap(fn, axis_name=AXIS, donate_argnums=donate_argnums)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, total: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Per-device batches of this process's share of an eval set, the last one padded and masked.

  Every process yields the same number of batches (the collectives in the eval step need that), based on
  the largest share. Shapes: image (local devices, b, H, W, C), label and mask (local devices, b), with
  ``b = ceil(batch_size / device_count)``.

  Args:
    images: this process's images (see `input_pipeline.host_shard(..., drop_remainder=False)`).
    labels: their labels.
    batch_size: the global eval batch size.
    total: the size of the whole eval set (over all processes).
  """
  local = jax.local_device_count()
  per_device = max(1, math.ceil(batch_size / jax.device_count()))
  per_process = per_device * local
  largest_share = math.ceil(total / jax.process_count())
  for start in range(0, max(largest_share, 1), per_process):
    x, y = images[start:start + per_process], labels[start:start + per_process]
    pad = per_process - len(x)
    mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *images.shape[1:]), images.dtype)])
    y = np.concatenate([y, np.zeros(pad, labels.dtype)])
    yield {"image": x.reshape(local, per_device, *images.shape[1:]),
           "label": y.reshape(local, per_device), "mask": mask.reshape(local, per_device)}
