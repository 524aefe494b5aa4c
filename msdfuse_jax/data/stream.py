"""The ``stream`` input pipeline: each process reads its own shards of every batch on the host.

Nothing of the dataset is held on a device: for step s, process p reads the examples of its shards of the
global batch (`order.batch_rows`: a function of (seed, s) and the layout, so a resumed run, with any
process count, sees exactly the batches of an uninterrupted one), applies the source's host transform
(`Source.read`: ImageNet's decodes, crops and flips each example, keyed by (seed, step, position in the
global batch); CIFAR's records are already uint8 arrays and its augmentation runs in the step, keyed like
the ``device`` pipeline's, so the two pipelines train the same run), and the batch is prefetched onto the process's devices as part of a global array.

The host side is a `grain` dataset: a random-access sequence of steps, read ahead of the training loop.
Its position is the step itself, so the checkpointed train state is the whole iterator state. With
``workers`` = 0 grain's threads read it in the training process; with N > 0 (``config.data.workers``,
ImageNet's default: the machine's CPU count) N grain worker processes do (`grain.IterDataset.mp_prefetch`):
worker i reads steps start + i, start + i + N, ... and grain interleaves them back into step order, so
the batches are the same for any N, and decoding no longer competes for the GIL with the loop that feeds
the accelerator. Each worker decodes on its share of the cores (`threads.set_pool_size`) and holds up
to three finished steps of images (one waiting for room in its result queue, the one in that queue, and
the one grain's interleave holds for it in the training process). The
workers ignore SIGINT and SIGTERM (the training loop acts on them and then closes the feed, which stops
them) and exit by themselves if the training process dies, so none outlives the run.
"""

from __future__ import annotations

import collections
import functools
import gc
import os
import signal
import threading
import time
from typing import Any, Iterator, Protocol

import numpy as np

from msdfuse_jax import parallel
from msdfuse_jax.data import order
from msdfuse_jax.data import threads as threads_lib

try:
  import grain
except ImportError:  # pragma: no cover - exercised where grain is absent
  grain = None


class Source(Protocol):
  """The training examples: ``source.read(rows, step, positions)`` is examples `rows` (int array) of step
  `step` at `positions` in its global batch (what a source's host augmentation is keyed by), as ``image``
  uint8 (n, H, W, C) and ``label`` (n,)."""

  def __len__(self) -> int: ...

  def read(self, rows: np.ndarray, step: int, positions: np.ndarray) -> dict[str, np.ndarray]: ...


class ArraySource:
  """Examples held in host memory as arrays (CIFAR, augmented in the step): ``image`` uint8 (N, H, W, C),
  ``label`` (N,)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels")
    self.images, self.labels = images, labels

  def __len__(self) -> int:
    return len(self.images)

  def read(self, rows: np.ndarray, step: int, positions: np.ndarray) -> dict[str, np.ndarray]:
    del step, positions  # no host augmentation
    return {"image": self.images[rows], "label": self.labels[rows]}


def _require_grain() -> None:
  if grain is None:
    raise ImportError("config.data.pipeline='stream' needs the grain package: pip install grain "
                      "(or use config.data.pipeline='device')")


class _StepReader:
  """step -> this process's shards of that step's batch (the map function of the grain dataset)."""

  def __init__(self, source: Source, seed: int, plan: Any, shards: range):
    self.source, self.seed, self.plan, self.shards = source, seed, plan, shards

  @functools.lru_cache(maxsize=2)  # grain's threads read a few neighbouring steps of one epoch at a time
  def _perm(self, epoch: int) -> np.ndarray:
    return order.epoch_permutation(self.seed, epoch, len(self.source))

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    rows = order.batch_rows(self._perm(step // self.plan.steps_per_epoch), step, self.plan.steps_per_epoch,
                            self.plan.batch_size, self.shards, self.plan.shard_batch)
    shards = np.asarray(self.shards)[:, None]
    positions = shards * self.plan.shard_batch + np.arange(self.plan.shard_batch)[None, :]
    batch = self.source.read(rows.reshape(-1), step, positions.reshape(-1))
    return {k: v.reshape(*rows.shape, *v.shape[1:]) for k, v in batch.items()}


PREFETCH = 8  # steps the threads of the training process keep ready (workers = 0)
DEVICE_DEPTH = 2  # steps put on the devices ahead of their use


def _start_worker(pool_size: int, index: int, count: int) -> None:
  """Runs first in each grain worker process: its decoding threads, its signals, its watchdog."""
  del index, count
  threads_lib.set_pool_size(pool_size)
  # The training process decides when to stop (SIGTERM: after the next step and a checkpoint; Ctrl-C:
  # at once) and then closes the feed; a signal sent to the whole process group must not kill the
  # workers first, or the loop would fail on a missing batch instead of saving.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)
  parent = os.getppid()

  def watch() -> None:  # a training process killed outright (SIGKILL, OOM) leaves no orphan workers
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)

  threading.Thread(target=watch, name="msdfuse-parent-watch", daemon=True).start()


def _flags_parsed() -> None:
  """grain 0.2.18's worker start reads an absl flag, which fails before the flags are parsed (in a
  program without absl.app, such as the tests; fixed in later grain, google/grain#1355): mark them
  parsed, keeping their defaults."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _finish_shared_memory_deletes() -> None:
  """Waits for the deletions of shared-memory batches that grain hands to a thread pool.

  grain (0.2.18) unlinks a worker's batch from a thread of its own once the array is freed; a program that
  exits right after the feed closes can leave those unlinks undone, and Python's resource tracker then
  warns of "leaked shared_memory objects". grain has no public call to wait for them: the pool is
  closed and joined here (grain starts a new one with the next workers' feed); with a grain laid out
  otherwise this does nothing.
  """
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=import-outside-toplevel
  except ImportError:  # another grain: nothing known to wait for
    return
  array = shared_memory_array.SharedMemoryArray
  if not hasattr(array, "_del_thread_pool") or not hasattr(array, "_lock"):
    return
  with array._lock:  # pylint: disable=protected-access
    pool, array._del_thread_pool = array._del_thread_pool, None  # pylint: disable=protected-access
    array._outstanding_del_requests = None  # pylint: disable=protected-access
  if pool is not None:
    pool.close()
    pool.join()


class HostBatches:
  """The iterator `host_batches` returns; `close()` stops the reading (joins the worker processes)."""

  def __init__(self, iterator: Any, workers: int):
    self._iterator, self._workers = iterator, workers

  def __iter__(self) -> HostBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      raise StopIteration
    return next(self._iterator)

  def close(self) -> None:
    if self._iterator is None:
      return
    self._iterator.close()
    self._iterator = None
    # A batch read by a worker lives in shared memory that grain frees when its array is deleted; grain's
    # iterators hold their buffered batches in reference cycles, which only the collector frees. Freed
    # now, not at interpreter exit (where grain's modules may be gone and the resource tracker reports
    # the segments as leaked).
    if self._workers:
      gc.collect()
      _finish_shared_memory_deletes()


def host_batches(source: Source, seed: int, plan: Any, start: int, *, shards: range | None = None,
                 workers: int = 0, threads: int = 2, prefetch: int = PREFETCH) -> HostBatches:
  """This process's host batches for steps ``start, start + 1, ..., plan.total_steps - 1``.

  Each is ``image`` (S, b, H, W, C) and ``label`` (S, b) for the S shards of `shards` (default: this
  process's, `parallel.process_shards`). `close()` the result when done (with workers, that stops them).

  Args:
    source, seed, plan, start, shards: what to read (see `Source` and `order.batch_rows`).
    workers: grain worker processes that read the steps; 0 reads them in this process, in `threads`
      grain threads that keep `prefetch` steps ready.
  """
  _require_grain()
  if workers < 0:
    raise ValueError(f"config.data.workers={workers} must be >= 0 (0: threads of the training process)")
  shards = parallel.process_shards(plan.num_shards) if shards is None else shards
  dataset = grain.MapDataset.range(start, plan.total_steps).map(_StepReader(source, seed, plan, shards))
  if not workers:
    options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
    return HostBatches(iter(dataset.to_iter_dataset(options)), workers)
  _flags_parsed()
  # In a worker the steps are read one at a time (no grain threads); the worker's decoding threads
  # split the batch, and its result queue holds one finished step.
  per_worker = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=1)
  pool_size = max(1, threads_lib.default_pool_size() // workers)
  dataset = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  dataset = dataset.mp_prefetch(per_worker, worker_init_fn=functools.partial(_start_worker, pool_size))
  return HostBatches(iter(dataset), workers)


def steps_ahead(workers: int) -> int:
  """How many steps a `StreamFeed` can hold ready before they are asked for (what a benchmark of its
  steady rate takes untimed first): 3 per worker (see the module docstring) or the threads' `PREFETCH`,
  and the `DEVICE_DEPTH` steps on the devices."""
  return DEVICE_DEPTH + (3 * workers if workers else PREFETCH)


def to_devices(batches: Iterator[dict[str, np.ndarray]], depth: int = DEVICE_DEPTH) -> Iterator[Any]:
  """Global batch arrays (`parallel.batch`), `depth` steps put on the devices ahead of their use."""
  queue: collections.deque = collections.deque()
  for host in batches:
    queue.append(parallel.batch(host))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class StreamFeed:
  """The train step's data argument for each step, in order (``feed(step)``, as `train.DeviceFeed`).

  `close()` stops the reading (and the worker processes): the training loop calls it however it ends.
  """

  def __init__(self, source: Source, seed: int, plan: Any, start: int, *, workers: int = 0,
               threads: int = 2):
    self._host = host_batches(source, seed, plan, start, workers=workers, threads=threads)
    self._batches = to_devices(self._host)
    self._next = start

  def __call__(self, step: int) -> tuple[Any]:
    if step != self._next:
      raise ValueError(f"the stream feed is at step {self._next}, not {step}")
    self._next += 1
    return (next(self._batches),)

  def close(self) -> None:
    self._batches.close()  # drops the batches already on the devices
    self._host.close()
