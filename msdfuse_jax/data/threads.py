"""The host's threads: the pool that decodes images, and batches prepared in the background.

Decoding and resizing with PIL release the GIL, so the threads of one process decode side by side.
`pool()` is this process's decoding pool: one thread per core (at most 32) in the training or evaluation
process. A grain worker process of the ``stream`` pipeline (``config.data.workers``, `data.stream`) gets
its share of the cores instead (`set_pool_size`), so that the workers together use the machine once.

`prefetched(items)` computes the next items of an iterator in a background thread while the caller works
on the current one. The evaluation loops take their decoded batches from it: the next batch is decoded
while the device computes the previous one, and the batches are the same, in the same order.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")

MAX_POOL_SIZE = 32
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_size: int | None = None  # None: one thread per core


def default_pool_size() -> int:
  """One decoding thread per core of the machine (at least 2, at most `MAX_POOL_SIZE`)."""
  return max(2, min(MAX_POOL_SIZE, os.cpu_count() or 2))


def set_pool_size(size: int) -> None:
  """Sets the number of this process's decoding threads (a grain worker sets its share when it starts).

  Args:
    size: at least 1.
  """
  global _pool, _pool_size
  if size < 1:
    raise ValueError(f"a decoding pool needs at least 1 thread, got {size}")
  if _pool is not None:
    _pool.shutdown(wait=True)
    _pool = None
  _pool_size = size


def pool() -> concurrent.futures.ThreadPoolExecutor:
  """This process's decoding threads (made on first use)."""
  global _pool
  if _pool is None:
    _pool = concurrent.futures.ThreadPoolExecutor(_pool_size or default_pool_size(),
                                                  thread_name_prefix="msdfuse-decode")
  return _pool


def prefetched(items: Iterable[T], depth: int = 2) -> Iterator[T]:
  """The items of `items` in their order, each computed up to `depth` items ahead in a background thread.

  One thread advances the iterator, so an iterator that is not thread-safe (a generator) is fine. An
  exception raised while computing an item is raised here where that item would have been returned.
  Leaving the loop early (or closing this generator) waits for the item being computed and computes no
  more.

  Args:
    items: any iterable; it is advanced only from the background thread.
    depth: how many items are computed ahead (at least 1).
  """
  if depth < 1:
    raise ValueError(f"prefetch depth must be at least 1, got {depth}")
  iterator = iter(items)
  end = object()
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="msdfuse-prefetch") as executor:
    pending = collections.deque(executor.submit(next, iterator, end) for _ in range(depth))
    try:
      while True:
        item = pending.popleft().result()
        if item is end:
          return
        pending.append(executor.submit(next, iterator, end))
        yield item
    finally:
      for future in pending:  # not started yet: never computed
        future.cancel()
