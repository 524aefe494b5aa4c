"""Real early-exit inference: run stage k only on the samples that stages 1..k-1 did not classify.

The reference implementations only *simulate* budgeted classification from full forward passes. Here a
batch goes through the network stage by stage (`MultiExitModule.stage`); after stage k the samples whose
confidence reaches exit k's threshold leave, and the survivors' stage-k features (not the images) are
passed on, so no work is repeated.

Shapes are what makes this fast under XLA: the survivors are compacted into one of a few fixed bucket
sizes (the batch size divided by powers of two), padding with copies of a survivor, and every stage's
output features are zero-padded back to the batch size inside the compiled function. So each
(stage, bucket) pair compiles once, (K - 1) x buckets + 1 programs in all, and after warm-up nothing
recompiles, whatever the number of survivors.

Decisions are the simulation's, exactly: a sample exits at the first k with ``max softmax >= T_k``
(float32), and the last exit takes everybody left (its threshold is -1e8).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass
class EarlyExitResult:
  """Per-sample predictions and exits (1-based) of an early-exit run, with its wall time."""

  predictions: np.ndarray
  exits: np.ndarray
  seconds: float
  stage_calls: dict[tuple[int, int], int]  # (stage, bucket size) -> number of calls

  @property
  def images_per_second(self) -> float:
    return len(self.predictions) / self.seconds if self.seconds > 0 else float("inf")


def bucket_sizes(batch_size: int, num_buckets: int = 5) -> list[int]:
  """``[batch_size, batch_size/2, ...]`` (rounded up), `num_buckets` sizes at most, largest first."""
  sizes = [batch_size]
  while len(sizes) < num_buckets and sizes[-1] > 1:
    sizes.append(-(-sizes[-1] // 2))
  return sizes


class EarlyExitRunner:
  """Runs a multi-exit model with confidence thresholds, stage by stage, on compacted survivors.

  Args:
    model: a `MultiExitModule`.
    variables: its variables (params and batch statistics).
    preprocess: maps a batch of raw images (e.g. uint8) to the model's input (e.g. normalised float32);
      it runs inside the first stage's compiled function.
    batch_size: images per batch; the largest bucket.
  """

  def __init__(self, model: Any, variables: Any, preprocess=lambda x: x, batch_size: int = 256,
               num_buckets: int = 5):
    self.model = model
    self.variables = variables
    self.batch_size = batch_size
    self.buckets = bucket_sizes(batch_size, num_buckets)
    self.calls: dict[tuple[int, int], int] = {}

    def first(variables, images):
      state, logits = model.apply(variables, preprocess(images), 1, method=model.stage)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      return state, jnp.max(probs, -1), jnp.argmax(probs, -1)

    def later(variables, state, index, k):
      # Gathering inside the compiled stage keeps the features on the device and costs no dispatch.
      state = jax.tree.map(lambda a: jnp.take(a, index, axis=0), state)
      state, logits = model.apply(variables, state, k, method=model.stage)
      # Back to the full batch size, so that the next stage sees one input shape whatever this bucket.
      pad = batch_size - index.shape[0]
      state = jax.tree.map(lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), state)
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      return state, jnp.max(probs, -1), jnp.argmax(probs, -1)

    self._first = jax.jit(first)
    self._later = jax.jit(later, static_argnums=3)

  def _bucket(self, n: int) -> int:
    return min(b for b in self.buckets if b >= n)

  def warmup(self, example_images: np.ndarray) -> None:
    """Compiles every (stage, bucket) pair so that timed runs measure no compilation."""
    images = np.repeat(example_images[:1], self.batch_size, axis=0)
    state, conf, _ = self._first(self.variables, images)
    outs = [conf]
    for k in range(2, self.model.num_exits + 1):
      for b in self.buckets:
        outs.append(self._later(self.variables, state, jnp.zeros((b,), jnp.int32), k))
      state = outs[-len(self.buckets)][0]  # the full-size bucket's output feeds the next stage
    jax.block_until_ready(outs)

  def run(self, images: np.ndarray, thresholds: Sequence[float]) -> EarlyExitResult:
    """Classifies `images` with early exits at `thresholds` (K values, the last one -1e8)."""
    thresholds = np.asarray(thresholds, np.float32)
    num_exits = self.model.num_exits
    if thresholds.shape != (num_exits,):
      raise ValueError(f"need {num_exits} thresholds (one per exit), got shape {thresholds.shape}")
    n = len(images)
    predictions = np.zeros((n,), np.int64)
    exits = np.zeros((n,), np.int64)
    start = time.perf_counter()
    for lo in range(0, n, self.batch_size):
      batch = images[lo:lo + self.batch_size]
      real = len(batch)
      if real < self.batch_size:  # pad the last batch; the padding is dropped at the first exit
        batch = np.concatenate([batch, np.repeat(batch[:1], self.batch_size - real, axis=0)])
      self._count(1, self.batch_size)
      state, conf, pred = self._first(self.variables, batch)
      alive = np.arange(real)          # positions, within `state`, of the samples still running
      ids = lo + np.arange(real)       # their indices in `images`
      for k in range(1, num_exits + 1):
        if k > 1:
          bucket = self._bucket(len(alive))
          index = np.concatenate([alive, np.repeat(alive[:1], bucket - len(alive))]).astype(np.int32)
          self._count(k, bucket)
          state, conf, pred = self._later(self.variables, state, index, k)
          alive = np.arange(len(alive))  # the survivors now sit at the front of the new state
        conf_h, pred_h = np.asarray(conf)[alive], np.asarray(pred)[alive]
        done = conf_h >= thresholds[k - 1] if k < num_exits else np.ones_like(conf_h, bool)
        predictions[ids[done]] = pred_h[done]
        exits[ids[done]] = k
        alive, ids = alive[~done], ids[~done]
        if not len(alive):
          break
    return EarlyExitResult(predictions, exits, time.perf_counter() - start, dict(self.calls))

  def _count(self, k: int, bucket: int) -> None:
    self.calls[(k, bucket)] = self.calls.get((k, bucket), 0) + 1


def full_network_fns(model: Any, preprocess=lambda x: x):
  """Compiled baselines for timing: every exit of the network, and the last exit alone.

  The first returns all K logits (what the simulated evaluation needs); the second returns only the last
  one, so XLA drops the earlier heads, as a plain single-exit network would.
  """
  every_exit = jax.jit(lambda variables, images: model.apply(variables, preprocess(images)))
  last_exit = jax.jit(lambda variables, images: model.apply(variables, preprocess(images))[-1])
  return every_exit, last_exit


def time_batches(fn, variables: Any, images: np.ndarray, batch_size: int, repeats: int = 1) -> float:
  """Seconds to run `fn(variables, batch)` over `images` in padded batches (after one warm-up call)."""
  pad = (-len(images)) % batch_size
  if pad:
    images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
  jax.block_until_ready(fn(variables, images[:batch_size]))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for lo in range(0, len(images), batch_size):
      out = fn(variables, images[lo:lo + batch_size])
    jax.block_until_ready(out)
    best = min(best, time.perf_counter() - start)
  return best
