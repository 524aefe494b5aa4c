"""The ``stream`` input pipeline: each process reads its own shards of every batch on the host.

Nothing of the dataset is held on a device: for step s, process p reads the examples of its shards of the
global batch (`order.batch_rows`: a function of (seed, s) and the layout, so a resumed run, with any
process count, sees exactly the batches of an uninterrupted one), applies the source's host transform
(`Source.read`: ImageNet's decodes, crops and flips each example, keyed by (seed, step, position in the
global batch); CIFAR's records are already uint8 arrays and its augmentation runs in the step, keyed like
the ``device`` pipeline's, so the two pipelines train the same run), and the batch is prefetched onto the process's devices as part of a global array.

The host side is a `grain` dataset: a random-access sequence of steps, read by grain's thread pool ahead
of the training loop. Its position is the step itself, so the checkpointed train state is the whole
iterator state.
"""

from __future__ import annotations

import collections
import functools
from typing import Any, Iterator, Protocol

import numpy as np

from msdfuse_jax import parallel
from msdfuse_jax.data import order

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


def host_batches(source: Source, seed: int, plan: Any, start: int, *, shards: range | None = None,
                 threads: int = 2, prefetch: int = 8) -> Iterator[dict[str, np.ndarray]]:
  """This process's host batches for steps ``start, start + 1, ..., plan.total_steps - 1``.

  Each is ``image`` (S, b, H, W, C) and ``label`` (S, b) for the S shards of `shards` (default: this
  process's, `parallel.process_shards`).
  """
  _require_grain()
  shards = parallel.process_shards(plan.num_shards) if shards is None else shards
  dataset = grain.MapDataset.range(start, plan.total_steps).map(_StepReader(source, seed, plan, shards))
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch)
  return iter(dataset.to_iter_dataset(options))


def to_devices(batches: Iterator[dict[str, np.ndarray]], depth: int = 2) -> Iterator[Any]:
  """Global batch arrays (`parallel.batch`), `depth` steps put on the devices ahead of their use."""
  queue: collections.deque = collections.deque()
  for host in batches:
    queue.append(parallel.batch(host))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class StreamFeed:
  """The train step's data argument for each step, in order (``feed(step)``, as `train.DeviceFeed`)."""

  def __init__(self, source: Source, seed: int, plan: Any, start: int, *, threads: int = 2):
    self._batches = to_devices(host_batches(source, seed, plan, start, threads=threads))
    self._next = start

  def __call__(self, step: int) -> tuple[Any]:
    if step != self._next:
      raise ValueError(f"the stream feed is at step {self._next}, not {step}")
    self._next += 1
    return (next(self._batches),)

  def close(self) -> None:
    close = getattr(self._batches, "close", None)
    if close:
      close()
