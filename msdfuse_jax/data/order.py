"""Which examples each training step reads: a function of (seed, step) and the batch layout only.

Epoch e visits the whole training set in the order ``epoch_permutation(seed, e, n)``; step s of the run is
step ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch`` and reads the next ``batch_size``
examples of that order (the last ``n mod batch_size`` of each epoch are skipped). Shard j of the global
batch is its j-th slice of ``shard_batch`` examples. Both input pipelines use this order, so a run sees the
same batches whatever the number of devices and processes, and a resumed run those of an uninterrupted
one.
"""

from __future__ import annotations

import numpy as np


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The order of the training examples in `epoch`: a function of (seed, epoch) only, for exact resume."""
  return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def batch_rows(perm: np.ndarray, step: int, steps_per_epoch: int, batch_size: int, shards: range,
               shard_batch: int) -> np.ndarray:
  """The example indices of shards `shards` of step `step`'s global batch, shape (len(shards), b).

  Args:
    perm: ``epoch_permutation(seed, step // steps_per_epoch, n)``.
    step: the run's step (0-based).
    steps_per_epoch: full global batches per epoch.
    batch_size: the global batch size (``num_shards * shard_batch``).
    shards: the global shard indices wanted (a contiguous block).
    shard_batch: examples per shard.
  """
  start = (step % steps_per_epoch) * batch_size + shards.start * shard_batch
  return perm[start:start + len(shards) * shard_batch].reshape(len(shards), shard_batch)
