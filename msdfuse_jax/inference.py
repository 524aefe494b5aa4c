"""Real early-exit inference: run stage k only on the samples that stages 1..k-1 did not classify.

The reference implementations only *simulate* budgeted classification from full forward passes. Here a
batch goes through the network stage by stage (`MultiExitModule.stage`); after stage k the samples whose
confidence reaches exit k's threshold leave, and the survivors' stage-k features (not the images) are
passed on, so no work is repeated.

Shapes are what makes this fast under XLA: the survivors are compacted into one of a few fixed bucket
sizes (the batch size divided by powers of two) and gathered from a pool of fixed size, so each
(stage, bucket) pair compiles once, and after warm-up nothing recompiles, whatever the number of
survivors. Survivors of a whole chunk of batches are pooled, so that only one batch per stage and chunk
is partly padding.

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

from msdfuse_jax import costs, models
from msdfuse_jax.data import augment, sources
from msdfuse_jax.evaluation import budget, evaluate, predict


@dataclasses.dataclass
class EarlyExitResult:
  """Per-sample predictions and exits (1-based) of an early-exit run, with its wall time."""

  predictions: np.ndarray
  exits: np.ndarray
  seconds: float

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

  Images are taken a chunk at a time (`chunk_batches` batches). Stage 1 runs on the whole chunk; the
  features of its survivors are pooled, and stage k runs on full batches of survivors gathered from that
  pool, only the chunk's last batch being padded (to the smallest bucket that holds it). All batches of a
  stage are dispatched before any decision is read back, so the host's bookkeeping overlaps the device's
  work.

  Args:
    model: a `MultiExitModule`.
    variables: its variables (params and batch statistics).
    preprocess: maps a batch of raw images (e.g. uint8) to the model's input (e.g. normalised float32);
      it runs inside the first stage's compiled function.
    batch_size: images per batch; the largest bucket.
    num_buckets: batch sizes a partial batch can be padded to (batch_size, /2, /4, ...).
    chunk_batches: batches per chunk (the pool of features held on the device).
  """

  def __init__(self, model: Any, variables: Any, preprocess=lambda x: x, batch_size: int = 256,
               num_buckets: int = 5, chunk_batches: int = 4):
    self.model = model
    self.variables = variables
    self.calls: dict[tuple[int, int], int] = {}  # (stage, bucket size) -> number of calls so far
    self.batch_size = batch_size
    self.chunk = batch_size * chunk_batches
    self.buckets = bucket_sizes(batch_size, num_buckets)
    chunk = self.chunk

    def decide(logits):
      probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
      return jnp.max(probs, -1), jnp.argmax(probs, -1)

    def first(variables, images):
      state, logits = model.apply(variables, preprocess(images), 1, method=model.ensemble_stage)
      return (state, *decide(logits))

    def later(variables, pool, index, k):
      # Gathering inside the compiled stage keeps the features on the device and costs no dispatch.
      state = jax.tree.map(lambda a: jnp.take(a, index, axis=0), pool)
      state, logits = model.apply(variables, state, k, method=model.ensemble_stage)
      # Back to the full batch size, so that the pool has one shape whatever the bucket.
      pad = batch_size - index.shape[0]
      state = jax.tree.map(lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)), state)
      return (state, *decide(logits))

    def assemble(pieces):
      def join(*xs):
        x = jnp.concatenate(xs, axis=0)
        return jnp.pad(x, [(0, chunk - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
      return jax.tree.map(join, *pieces)

    self._first = jax.jit(first)
    self._later = jax.jit(later, static_argnums=3)
    self._assemble = jax.jit(assemble)

  def _bucket(self, n: int) -> int:
    return min(b for b in self.buckets if b >= n)

  def warmup(self, example_images: np.ndarray) -> None:
    """Compiles every program a run can need, so that timed runs measure no compilation."""
    images = np.repeat(example_images[:1], self.batch_size, axis=0)
    state = self._first(self.variables, images)[0]
    n_pieces = self.chunk // self.batch_size
    outs = [self._assemble([state] * n) for n in range(1, n_pieces + 1)]
    pool = outs[-1]
    for k in range(2, self.model.num_exits + 1):
      for b in self.buckets:
        outs.append(self._later(self.variables, pool, jnp.zeros((b,), jnp.int32), k))
      pool = self._assemble([outs[-len(self.buckets)][0]] * n_pieces)
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
    for lo in range(0, n, self.chunk):
      self._run_chunk(images[lo:lo + self.chunk], lo, thresholds, predictions, exits)
    return EarlyExitResult(predictions, exits, time.perf_counter() - start)

  def _run_chunk(self, images, offset, thresholds, predictions, exits) -> None:
    b, num_exits = self.batch_size, self.model.num_exits
    # Stage 1 on every batch of the chunk (dispatched together), then the decisions.
    outs, sizes = [], []
    for lo in range(0, len(images), b):
      batch = images[lo:lo + b]
      sizes.append(len(batch))
      if len(batch) < b:  # pad the last batch; the padding is dropped at the first decision
        batch = np.concatenate([batch, np.repeat(batch[:1], b - len(batch), axis=0)])
      self._count(1, b)
      outs.append(self._first(self.variables, batch))
    # `groups` lists, per batch of the current stage, the images it holds (indices into `images`).
    groups = [np.arange(i * b, i * b + size) for i, size in enumerate(sizes)]
    for k in range(1, num_exits + 1):
      if k > 1:
        outs, new_groups = [], []
        for lo in range(0, len(alive), b):
          index = alive[lo:lo + b]
          bucket = self._bucket(len(index))
          index = np.concatenate([index, np.repeat(index[:1], bucket - len(index))]).astype(np.int32)
          self._count(k, bucket)
          outs.append(self._later(self.variables, pool, index, k))
          new_groups.append(alive_ids[lo:lo + b])
        groups = new_groups
      alive, alive_ids = [], []
      for i, (out, ids) in enumerate(zip(outs, groups)):
        conf, pred = np.asarray(out[1])[:len(ids)], np.asarray(out[2])[:len(ids)]
        done = conf >= thresholds[k - 1] if k < num_exits else np.ones(len(ids), bool)
        predictions[offset + ids[done]] = pred[done]
        exits[offset + ids[done]] = k
        alive.append(i * b + np.flatnonzero(~done))  # positions in the pool assembled below
        alive_ids.append(ids[~done])
      alive, alive_ids = np.concatenate(alive), np.concatenate(alive_ids)
      if not len(alive):
        return
      pool = self._assemble([out[0] for out in outs])

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


def run_inference(workdir: str, p: int | None, cost_budget: float | None, batch_size: int,
                  repeats: int) -> dict:
  """`msdfuse-infer`'s work: fits thresholds, runs early exit and the baselines, checks the simulation.

  Args:
    workdir: a run directory (trained or imported).
    p: the budget point (1..`budget.NUM_BUDGET_POINTS`), or None to use `cost_budget`.
    cost_budget: the largest average cost per image (literature op_counter units) when `p` is None.
    batch_size: images per batch (the largest bucket).
    repeats: timed repetitions; the best is reported.

  Returns:
    The figures written to ``WORKDIR/eval/infer.json``.
  """
  config, model, variables, step, data = evaluate.load_run(workdir)
  mean, std = np.asarray(data.mean), np.asarray(data.std)
  predict_fn = predict.make_predict_fn(model, mean, std)
  val_probs = predict.predict_probs(model, variables, data.val_images, mean, std, batch_size,
                                    predict_fn=predict_fn)
  test_probs = predict.predict_probs(model, variables, data.test_images, mean, std, batch_size,
                                     predict_fn=predict_fn)
  exit_costs = [c.op_counter for c in costs.exit_costs(models.from_config(config, dtype="float32"),
                                                       image_size=sources.image_size(config.dataset),
                                                       with_xla=False)]
  if p is None:
    p = budget.thresholds_for_budget(val_probs, exit_costs, cost_budget)
  thresholds = budget.fit_thresholds(val_probs, p)
  sim_exits, sim_preds = budget.apply_thresholds(test_probs, thresholds)

  # Timed on decoded images held in memory (ImageNet's lazy test set is decoded here, once).
  test_images = np.asarray(data.test_images)
  preprocess = lambda images: augment.eval_batch(images, mean, std)
  runner = EarlyExitRunner(model, variables, preprocess, batch_size=batch_size)
  runner.warmup(test_images)
  result = min((runner.run(test_images, thresholds) for _ in range(repeats)),
               key=lambda r: r.seconds)
  every_exit, last_exit = full_network_fns(model, preprocess)
  t_full = time_batches(every_exit, variables, test_images, batch_size, repeats)
  t_last = time_batches(last_exit, variables, test_images, batch_size, repeats)

  n = len(test_images)
  counts = np.bincount(result.exits - 1, minlength=model.num_exits)
  expected_cost = float(np.dot(counts / n, exit_costs))
  predicted = exit_costs[-1] / expected_cost
  realised = t_full / result.seconds
  return {
      "workdir": workdir, "step": step, "p": int(p), "thresholds": [float(t) for t in thresholds],
      "num_images": n, "batch_size": batch_size, "buckets": runner.buckets,
      "exit_counts": counts.tolist(),
      "accuracy": float(100.0 * np.mean(result.predictions == data.test_labels)),
      "expected_cost": expected_cost, "full_cost": exit_costs[-1],
      "early_exit_images_per_s": n / result.seconds,
      "full_network_images_per_s": n / t_full,
      "last_exit_images_per_s": n / t_last,
      "speedup_vs_full": realised, "speedup_vs_last_exit": t_last / result.seconds,
      "predicted_speedup": predicted, "realised_over_predicted": realised / predicted,
      "matches_simulation": bool(np.array_equal(result.exits, sim_exits + 1)
                                 and np.array_equal(result.predictions, sim_preds)),
  }
