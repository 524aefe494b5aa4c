"""Data parallelism in one place: multi-process start-up, the global mesh, shardings and the SPMD steps.

Every device of every process is one position of a 1-D `jax.sharding.Mesh` with axis `AXIS`. The train
and eval steps are ``jax.jit(jax.shard_map(per_device_fn, mesh, ...))``: each device runs the same code on
its part of the batch, with explicit `lax.pmean`/`lax.psum` over `AXIS`, and parameters, optimiser state
and (in the ``device`` input pipeline) the training set are replicated (``P()``). Batches are global
`jax.Array` s put together from every process's local part (`batch`).

The global batch is cut into ``num_shards`` equal *shards*; device d of the mesh runs shards
``d * S, ..., d * S + S - 1`` with ``S = num_shards / device_count``, so process p holds a contiguous block
of shards (`process_shards`). A shard is the unit of BatchNorm statistics and of Mixup/CutMix pairing, so
fixing ``config.train.num_shards`` makes a run compute the same thing on 1 device, on N devices and on N
processes (up to float summation order).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

AXIS = "data"  # the mesh axis every collective of the train and eval steps reduces over
# config.train.heartbeat_timeout_s's default: a process silent this long is declared dead (JAX's is 100 s).
HEARTBEAT_TIMEOUT_S = 60


class DistributedError(RuntimeError):
  """The processes of a multi-process run could not be started (or were started inconsistently)."""


def maybe_initialize_distributed(train: Any) -> None:
  """Joins the processes of a multi-process run (`jax.distributed.initialize`) when the config asks.

  ``train`` is ``config.train``. With
  ``distributed=True`` and no other field set, JAX detects the cluster (TPU VM slice, SLURM, Open MPI,
  mpi4py, Kubernetes). Elsewhere, or to override the detection, set ``coordinator_address`` (``host:port``
  of process 0), ``num_processes`` and ``process_id``. CPU processes talk through the gloo collectives.
  Must run before anything touches a device; a second call does nothing.

  Raises:
    DistributedError: the fields are inconsistent or the processes could not meet.
  """
  requested = bool(train.get("distributed", False))
  address = train.get("coordinator_address", "") or ""
  count = int(train.get("num_processes", 0) or 0)
  index = int(train.get("process_id", -1))
  if not requested:
    if address or count or index >= 0:
      raise DistributedError("config.train.coordinator_address/num_processes/process_id are set but "
                             "config.train.distributed is False; add --config.train.distributed=True")
    return
  if jax.distributed.is_initialized():
    return
  if (count > 0) != (index >= 0):
    raise DistributedError("set both config.train.num_processes and config.train.process_id (or "
                           "neither, to let JAX detect the cluster)")
  if count > 0 and not 0 <= index < count:
    raise DistributedError(f"config.train.process_id={index} must be in [0, "
                           f"config.train.num_processes={count})")
  if count > 0 and not address:
    raise DistributedError("config.train.num_processes is set without config.train.coordinator_address "
                           "(host:port of process 0, the same for every process)")
  # Our own SIGTERM handling (msdfuse_jax.preemption) agrees on the stopping step inside the train step;
  # JAX's preemption service would replace the process's SIGTERM handler with its own.
  for option, value in (("jax_enable_preemption_service", False),
                        ("jax_cpu_collectives_implementation", "gloo")):
    try:
      jax.config.update(option, value)
    except AttributeError:  # an option a later JAX renamed or dropped: its default then applies
      logging.warning("this JAX has no option %s; left at its default", option)
  kwargs = {"heartbeat_timeout_seconds": int(train.get("heartbeat_timeout_s", HEARTBEAT_TIMEOUT_S))}
  if address:
    kwargs["coordinator_address"] = address
  if count > 0:
    kwargs.update(num_processes=count, process_id=index)
  try:
    jax.distributed.initialize(**kwargs)
  except (ValueError, RuntimeError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DistributedError(
        f"jax.distributed.initialize failed ({first[:300]}). Outside a detected cluster set "
        "config.train.coordinator_address=HOST:PORT (process 0's address, the same for every process), "
        "config.train.num_processes and a different config.train.process_id per process, and start "
        "every process") from None
  logging.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


@functools.cache
def _mesh(devices: tuple[Any, ...]) -> jax.sharding.Mesh:
  return jax.sharding.Mesh(np.array(devices), (AXIS,))


def mesh() -> jax.sharding.Mesh:
  """The global 1-D mesh of every device of every process, in `jax.devices()` order."""
  return _mesh(tuple(jax.devices()))


def replicated() -> NamedSharding:
  return NamedSharding(mesh(), P())


def split() -> NamedSharding:
  """The leading axis split over the mesh (each device one contiguous block)."""
  return NamedSharding(mesh(), P(AXIS))


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


def process_shards(shards: int) -> range:
  """The global shard indices whose data this process supplies (a contiguous block, in order)."""
  index_map = split().addressable_devices_indices_map((shards,))
  blocks = sorted(slc[0].indices(shards)[:2] for slc in index_map.values())
  first, last = blocks[0][0], blocks[-1][1]
  if sum(b - a for a, b in blocks) != last - first:  # a mesh whose local devices are not adjacent
    raise ValueError(f"this process's devices hold shards {blocks} of {shards}, not one block")
  return range(first, last)


def replicate(tree: Any) -> Any:
  """Host values (the same in every process) as global arrays replicated on every device (``P()``)."""
  sharding = replicated()

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  # This is an explicit transfer, but the transfer guard counts make_array_from_callback's copies as
  # implicit ones: allowed here, so that loops running under jax.transfer_guard("disallow") may call it.
  with jax.transfer_guard_host_to_device("allow"):
    return jax.tree.map(put, tree)


def batch(tree: Any) -> Any:
  """This process's part of a batch (leading axis: its devices' blocks, in mesh order) as global arrays
  split over the mesh; every process passes the same shapes."""
  sharding = split()
  with jax.transfer_guard_host_to_device("allow"):  # an explicit transfer, under any transfer guard
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def to_host(tree: Any) -> Any:
  """Host numpy copies of replicated arrays (this process's first copy: no communication)."""
  def first(x):
    if isinstance(x, jax.Array):
      return np.asarray(jax.device_get(x.addressable_shards[0].data))  # explicit: passes a transfer guard
    return np.asarray(x)
  return jax.tree.map(first, tree)


def stop_votes(requested: bool) -> jax.Array:
  """Every device's vote to stop (1 where its process was asked to), for the train step to sum."""
  return batch(np.full(jax.local_device_count(), int(requested), np.int32))


def spmd(fn: Callable[..., Any], in_specs: tuple[Any, ...], out_specs: Any, *,
         donate_argnums: tuple[int, ...] = ()) -> Callable[..., Any]:
  """``jax.jit`` of ``jax.shard_map(fn)`` over the global mesh: `fn` is the per-device program.

  `fn` reduces over devices itself (``lax.pmean``/``lax.psum`` over `AXIS`), exactly as a pmapped program
  does, so the replication checker is off: with it on, the gradient with respect to replicated parameters
  would already be summed over devices (the transpose of their implicit broadcast), and the explicit
  mean on top would scale it by the device count.
  """
  return jax.jit(jax.shard_map(fn, mesh=mesh(), in_specs=in_specs, out_specs=out_specs, check_vma=False),
                 donate_argnums=donate_argnums)


def device_shards(per_device: int) -> jax.Array:
  """Inside an `spmd` function: the global indices of the shards this device runs."""
  return jax.lax.axis_index(AXIS) * per_device + jax.numpy.arange(per_device, dtype=np.int32)


def eval_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, total: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """This process's parts of the batches of an eval set, the last one padded and masked (for `batch`).

  Every process yields the same number of batches (the collectives in the eval step need that), based on
  the largest share. Shapes: image (local devices * b, H, W, C), label and mask (local devices * b), with
  ``b = ceil(batch_size / device_count)``.

  Args:
    images: this process's images (see `cifar.host_shard(..., drop_remainder=False)`); an array-like that
      slices like numpy (ImageNet's lazy `imagenet.EvalImages`) is decoded a batch at a time.
    labels: their labels.
    batch_size: the global eval batch size.
    total: the size of the whole eval set (over all processes).
  """
  per_device = max(1, math.ceil(batch_size / jax.device_count()))
  per_process = per_device * jax.local_device_count()
  largest_share = math.ceil(total / jax.process_count())
  for start in range(0, max(largest_share, 1), per_process):
    x, y = np.asarray(images[start:start + per_process]), labels[start:start + per_process]
    pad = per_process - len(x)
    mask = np.concatenate([np.ones(len(x), np.float32), np.zeros(pad, np.float32)])
    x = np.concatenate([x, np.zeros((pad, *images.shape[1:]), images.dtype)])
    y = np.concatenate([y, np.zeros(pad, labels.dtype)])
    yield {"image": x, "label": y, "mask": mask}
