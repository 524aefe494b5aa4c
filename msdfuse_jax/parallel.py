"""Data parallelism in one place: multi-host start-up, replication, sharding and the pmap itself.

Training is data-parallel with `jax.pmap` over all local devices (and, after
`jax.distributed.initialize`, over every host). The global batch is cut into `num_shards` equal *shards*;
each device runs `num_shards / device_count` of them. A shard is the unit of BatchNorm statistics and of
Mixup/CutMix pairing, so fixing ``config.train.num_shards`` makes a run compute the same thing on 1 device
or on N (up to float summation order). A later move to `jit` with shardings touches this file only.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterator

import jax
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
    images: this process's images (see `cifar.host_shard(..., drop_remainder=False)`).
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
