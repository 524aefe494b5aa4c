"""Early-exit classification from an export directory: a runtime that needs jax and numpy only.

``msdfuse-export`` writes a directory of per-stage programs (`jax.export`, StableHLO) and a
``manifest.json``; this module loads it and classifies uint8 images with early exits, without the models,
flax or the training code:

  runner = serving.Runner.from_dir("/srv/msdfuse_p10")
  predictions, exits = runner(images)          # uint8 (N, H, W, C); exits are 1-based
  runner = runner.measure().with_budget_ms(2)  # re-timed here, refitted for 2 ms per image

An export keeps its stage time table and its validation split's per-exit confidences and correctness, so
`Runner.with_budget_ms` and `Runner.with_budget_ops` refit its thresholds without the model
(`msdfuse_jax.timebudget`, numpy only, imported only then).

How a batch runs (the same for the programs compiled in-process by `msdfuse_jax.inference`): images are
taken a chunk of `pieces` batches at a time. Stage 1 runs on each batch; every program returns, besides its
exit's confidence (max softmax, float32) and prediction, the state the next stage continues from, padded
to the full batch size. The host compares the confidences with the thresholds and lists the survivors;
stage k then runs on full batches of survivors, each gathered inside stage k's program from the previous
stage's outputs (passed as they are, so no state is copied between programs except the survivors' rows
the gather reads), only the chunk's last batch being padded to the smallest bucket that holds it. Each
(stage, bucket) program has fixed shapes, so nothing compiles after warm-up, whatever the survivors.

Decisions are those of the simulated budgeted evaluation: a sample exits at the first k with
``confidence >= T_k``; the last exit takes everybody left.

Anytime, with a deadline (``runner.run(images, deadline_ms=D)``): D is per chunk, and a chunk is then one
batch (at most `batch_size` images), timed from when the runner starts it. Stage 1 always runs; stage
k + 1 runs on the chunk's survivors only if the time elapsed plus stage k + 1's predicted time on them
(`Runner.predicted_seconds`, from the table `Runner.stage_times`) fits in D; otherwise every survivor takes
exit k, the deepest it has (confident images have left earlier, as without a deadline). The result gives
each chunk's time, the stages it ran, and each image's exit.

Every transfer between host and device is explicit (`jax.device_put` of each batch of images and of each
survivor index, `jax.device_get` of the confidences and predictions), so a runner works under
``jax.transfer_guard("disallow")``; the states stay on the device.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np

MANIFEST = "manifest.json"
FORMAT = "msdfuse-export/1"

# A deadline's prediction of a stage's time is the larger of the table's (`Runner.stage_times`: the
# program alone, at its best) and this quantile of the last `OBSERVED_WINDOW` times the runner saw that
# stage take at that bucket in its deadline runs (dispatch, the program, reading the decisions back): on a
# shared or busy machine the table alone is optimistic, and the chunks would overshoot.
OBSERVED_QUANTILE = 0.99
OBSERVED_WINDOW = 64


class ExportError(ValueError):
  """An export directory that cannot be used (missing or foreign files, wrong inputs)."""


@dataclasses.dataclass
class EarlyExitResult:
  """Per-sample predictions and exits (1-based) of an early-exit run, with its wall time and its chunks'.

  Chunk i holds images ``[i * chunk_size, (i + 1) * chunk_size)`` (the last one may hold fewer):
  `chunk_seconds` is its wall time, `chunk_stages` how many stages ran on it, `chunk_exits` its images'
  exits. `deadline_ms` is the deadline each chunk had (None: none; then a chunk is `pieces` batches).
  """

  predictions: np.ndarray
  exits: np.ndarray
  seconds: float
  chunk_size: int = 0
  chunk_seconds: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,)))
  chunk_stages: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0,), np.int64))
  deadline_ms: float | None = None

  @property
  def images_per_second(self) -> float:
    return len(self.predictions) / self.seconds if self.seconds > 0 else float("inf")

  @property
  def chunk_exits(self) -> list[np.ndarray]:
    """Each chunk's images' exits (1-based), in order."""
    return [self.exits[lo:lo + self.chunk_size] for lo in range(0, len(self.exits), self.chunk_size)]

  @property
  def overshoot_ms(self) -> np.ndarray:
    """Each chunk's time minus the deadline, in ms (negative: the time to spare); needs a deadline."""
    if self.deadline_ms is None:
      raise ValueError("this run had no deadline")
    return 1e3 * self.chunk_seconds - self.deadline_ms

  @property
  def deadline_met(self) -> np.ndarray:
    """Whether each chunk finished within the deadline (bool per chunk)."""
    return self.overshoot_ms <= 0


def check_deadline_ms(deadline_ms: Any) -> float:
  """`deadline_ms` as a float, or a ValueError (one line) unless it is a positive, finite number."""
  try:
    value = float(deadline_ms)
  except (TypeError, ValueError):
    value = float("nan")
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f"the deadline must be a positive number of milliseconds per chunk, got {deadline_ms}")
  return value


def bucket_sizes(batch_size: int, num_buckets: int = 5) -> list[int]:
  """``[batch_size, batch_size/2, ...]`` (rounded up), `num_buckets` sizes at most, largest first."""
  sizes = [batch_size]
  while len(sizes) < num_buckets and sizes[-1] > 1:
    sizes.append(-(-sizes[-1] // 2))
  return sizes


def stage_file(k: int, bucket: int) -> str:
  """The file name of stage k's program at one bucket size."""
  return f"stage{k}_b{bucket}.jaxexport"


# A program: stage 1 maps uint8 images (b, H, W, C) to (state, confidence (b,), prediction (b,)); stage
# k > 1 maps (tuple of `pieces` states, survivor index (b,) into their concatenation) to the same triple.
# States hold `batch_size` rows; the last stage returns an empty state.
Program = Callable[..., tuple[Any, Any, Any]]


class Runner:
  """Early-exit classification with a table of per-(stage, bucket) programs.

  Args:
    programs: (k, bucket size) -> program, for k in 1..num_exits and every bucket.
    num_exits: K.
    batch_size: images per batch, the largest bucket.
    buckets: the batch sizes a partial batch is padded to, largest first (``buckets[0] == batch_size``).
    pieces: batches per chunk: how many previous outputs a stage-k program gathers from.
    thresholds: the K confidence thresholds `__call__` uses (the last is -1e8); `run` takes its own.
    image_shape: (H, W, C) of an image, checked on input when given.
  """

  def __init__(self, programs: Mapping[tuple[int, int], Program], num_exits: int, batch_size: int,
               buckets: Sequence[int], pieces: int, thresholds: Sequence[float] | None = None,
               image_shape: Sequence[int] | None = None):
    self.programs = dict(programs)
    self.num_exits = num_exits
    self.batch_size = batch_size
    self.buckets = sorted(buckets, reverse=True)
    if self.buckets[0] != batch_size:
      raise ValueError(f"the largest bucket must be the batch size {batch_size}, got {self.buckets}")
    self.pieces = pieces
    self.chunk = batch_size * pieces
    self.thresholds = None if thresholds is None else self._check_thresholds(thresholds)
    self.image_shape = None if image_shape is None else tuple(image_shape)
    self.manifest: dict | None = None
    self.calls: dict[tuple[int, int], int] = {}  # (stage, bucket size) -> number of calls so far
    # What deadlines predict from: stage -> bucket size -> seconds per call (int keys; a stage may give
    # its batch size's time only), or a table object whose `seconds` is that mapping. None until a deadline
    # run measures it (`stage_seconds`, then cached here); a table stored with an export can be set here
    # instead, and is then used as it is.
    self.stage_times: dict[int, dict[int, float]] | None = None
    # (stage, bucket size) -> the seconds it took in the latest deadline runs, newest last.
    self.observed: dict[tuple[int, int], list[float]] = {}

  # Time budgets (`with_budget_ms`, `measure`): how the runner's thresholds were chosen, and the export
  # directory whose stored validation data a refit reads. Class attributes, so that a runner built without
  # them has none.
  budget: dict | None = None
  source_dir: str | None = None
  _stage_times: Any = None
  _stage_times_record: dict | None = None  # the manifest's, read into `stage_times` when first asked for

  @property
  def stage_times(self) -> Any:
    """The stage time table the thresholds are fitted to (a `msdfuse_jax.timebudget.StageTimes`), or None:
    an export's (measured when it was written) until `measure` re-times the stages here."""
    if self._stage_times is None and self._stage_times_record:
      from msdfuse_jax import timebudget  # pylint: disable=import-outside-toplevel  (numpy only)
      self._stage_times = timebudget.StageTimes.from_json(self._stage_times_record)
    return self._stage_times

  @stage_times.setter
  def stage_times(self, table: Any) -> None:
    self._stage_times, self._stage_times_record = table, None

  @classmethod
  def from_dir(cls, path: str) -> "Runner":
    """Loads an export directory written by ``msdfuse-export`` (its thresholds, buckets and programs)."""
    manifest = read_manifest(path)
    exported = {}
    for k in range(1, manifest["num_exits"] + 1):
      for b in manifest["buckets"]:
        exported[(k, b)] = _load_program(path, k, b, manifest)
    _check_chain(path, exported, manifest)
    programs = {key: jax.jit(e.call) for key, e in exported.items()}
    runner = cls(programs, manifest["num_exits"], manifest["batch_size"], manifest["buckets"],
                 manifest["pieces"], manifest["thresholds"], manifest["image_shape"])
    runner.manifest = manifest
    runner.source_dir = path
    runner._stage_times_record = manifest.get("stage_times")  # pylint: disable=protected-access
    runner.budget = {**{key: manifest.get(key) for key in ("p", "cost_budget", "budget_ms")},
                     "num_images": (manifest.get("time_fit") or {}).get("num_images")}
    return runner

  def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Classifies uint8 images (N, H, W, C) with the runner's thresholds: (predictions, 1-based exits)."""
    if self.thresholds is None:
      raise ValueError("this runner has no thresholds: pass them to run(images, thresholds)")
    result = self.run(images)
    return result.predictions, result.exits

  def _check_thresholds(self, thresholds: Sequence[float]) -> np.ndarray:
    thresholds = np.asarray(thresholds, np.float32)
    if thresholds.shape != (self.num_exits,):
      raise ValueError(f"need {self.num_exits} thresholds (one per exit), got shape {thresholds.shape}")
    return thresholds

  def _check_images(self, images: Any) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ExportError(f"images must be uint8 (N, H, W, C) pixels, got dtype {images.dtype}")
    if self.image_shape is not None and (images.ndim != 4 or images.shape[1:] != self.image_shape):
      raise ExportError(f"images must have shape (N, {', '.join(map(str, self.image_shape))}), "
                        f"got {images.shape}")
    if not len(images):
      raise ExportError("no images to classify")
    return images

  def _bucket(self, n: int) -> int:
    return min(b for b in self.buckets if b >= n)

  def warmup(self, example_images: np.ndarray) -> None:
    """Runs every program once, so that timed runs measure no compilation."""
    images = np.repeat(self._check_images(example_images)[:1], self.batch_size, axis=0)
    first = {b: self.programs[(1, b)](jax.device_put(images[:b])) for b in self.buckets}
    state = first[self.batch_size][0]
    outs = list(first.values())
    for k in range(2, self.num_exits + 1):
      outs += [self.programs[(k, b)]((state,) * self.pieces, jax.device_put(np.zeros((b,), np.int32)))
               for b in self.buckets]
      state = outs[-len(self.buckets)][0]
    jax.block_until_ready(outs)

  def run(self, images: np.ndarray, thresholds: Sequence[float] | None = None, *,
          deadline_ms: float | None = None) -> EarlyExitResult:
    """Classifies `images` with early exits at `thresholds` (K values, the last one -1e8; by default the
    runner's).

    Args:
      images: uint8 (N, H, W, C).
      thresholds: the K confidence thresholds; None: the runner's.
      deadline_ms: anytime mode: milliseconds per chunk of at most `batch_size` images, timed from when
        the chunk starts. Stage 1 always runs; stage k + 1 runs on the chunk's survivors only if the
        elapsed time plus its predicted time (`predicted_seconds`) fits, else they all take exit k. The
        first call measures `stage_times` unless it is set (which also compiles every program).

    Returns:
      An `EarlyExitResult` with each chunk's time and stages.
    """
    if thresholds is None:
      if self.thresholds is None:
        raise ValueError("no thresholds given and the runner has none")
      thresholds = self.thresholds
    thresholds = self._check_thresholds(thresholds)
    deadline_s = None if deadline_ms is None else check_deadline_ms(deadline_ms) / 1e3
    images = self._check_images(images)
    if deadline_s is not None and self.stage_times is None:
      self.stage_times = self.time_table(images)  # a StageTimes, as `measure` keeps
    n = len(images)
    predictions = np.zeros((n,), np.int64)
    exits = np.zeros((n,), np.int64)
    # With a deadline a chunk is one batch: a deadline per batch, as a server would answer each request.
    chunk = self.chunk if deadline_s is None else self.batch_size
    chunk_seconds, chunk_stages = [], []
    start = time.perf_counter()
    for lo in range(0, n, chunk):
      began = time.perf_counter()
      chunk_stages.append(self._run_chunk(images[lo:lo + chunk], lo, thresholds, predictions, exits,
                                          deadline=None if deadline_s is None else (began, deadline_s)))
      chunk_seconds.append(time.perf_counter() - began)
    return EarlyExitResult(predictions, exits, time.perf_counter() - start, chunk, np.asarray(chunk_seconds),
                           np.asarray(chunk_stages, np.int64),
                           None if deadline_ms is None else float(deadline_ms))

  def predicted_seconds(self, k: int, n: int) -> float:
    """Stage k's predicted time on `n` survivors: its full batches' and the last one's bucket's, each the
    larger of `stage_times` and the `OBSERVED_QUANTILE` of the runner's latest observations. What the
    deadline's check adds to the elapsed time."""
    if self.stage_times is None:
      raise ValueError("the runner has no stage time table: set stage_times or run with a deadline")
    full, rest = divmod(n, self.batch_size)
    return (full * self._stage_estimate(k, self.batch_size)
            + (self._stage_estimate(k, self._bucket(rest)) if rest else 0.0))

  def _stage_estimate(self, k: int, bucket: int) -> float:
    times = getattr(self.stage_times, "seconds", self.stage_times)[k]  # a mapping, or a table holding one
    # A table timed at the batch size only (a smaller bucket never takes longer) serves every bucket.
    table = times[bucket] if bucket in times else times[self.batch_size]
    seen = self.observed.get((k, bucket))
    return max(table, float(np.quantile(seen, OBSERVED_QUANTILE))) if seen else table

  def every_exit(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every stage's confidence and prediction for every image, from these programs: (K, N) float32 and
    (K, N) int64. Nobody exits before the last stage, so every stage runs on every image."""
    images = self._check_images(images)
    n = len(images)
    trace = (np.zeros((self.num_exits, n), np.float32), np.zeros((self.num_exits, n), np.int64))
    never = np.full((self.num_exits,), np.inf, np.float32)
    for lo in range(0, n, self.chunk):
      self._run_chunk(images[lo:lo + self.chunk], lo, never, np.zeros((n,), np.int64),
                      np.zeros((n,), np.int64), trace)
    return trace

  def simulate(self, images: np.ndarray, thresholds: Sequence[float] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(predictions, 1-based exits) that `run` must give, decided on the host from `every_exit`: the
    simulated budgeted evaluation with the same programs, so the two agree exactly at any precision."""
    if thresholds is None:
      if self.thresholds is None:
        raise ValueError("no thresholds given and the runner has none")
      thresholds = self.thresholds
    thresholds = self._check_thresholds(thresholds)
    confidence, prediction = self.every_exit(images)
    leaves = confidence >= thresholds[:, None]
    leaves[-1] = True  # the last exit takes everybody left
    exits = np.argmax(leaves, axis=0)
    return prediction[exits, np.arange(len(exits))], exits + 1

  def _call(self, k: int, bucket: int, *args: Any) -> Any:
    self.calls[(k, bucket)] = self.calls.get((k, bucket), 0) + 1
    return self.programs[(k, bucket)](*args)

  def _run_chunk(self, images, offset, thresholds, predictions, exits, trace=None, deadline=None) -> int:
    """Runs one chunk, writing its predictions and exits; returns how many stages ran. `deadline`:
    (the chunk's start, its seconds) or None."""
    b, num_exits = self.batch_size, self.num_exits
    stage_start = time.perf_counter()
    # Stage 1 on every batch of the chunk (dispatched together), then the decisions.
    outs, groups = [], []  # per batch of the current stage: its outputs and the images it holds
    for lo in range(0, len(images), b):
      batch = images[lo:lo + b]
      bucket = self._bucket(len(batch))
      if len(batch) < bucket:  # pad the last batch; the padding is dropped at the first decision
        batch = np.concatenate([batch, np.repeat(batch[:1], bucket - len(batch), axis=0)])
      outs.append(self._call(1, bucket, jax.device_put(batch)))
      groups.append(np.arange(lo, lo + min(b, len(images) - lo)))
    alive = alive_ids = np.zeros((0,), np.int64)  # survivors: rows of the concatenated states, image ids
    for k in range(1, num_exits + 1):
      if k > 1:
        stage_start = time.perf_counter()
        # The previous stage's states, as they are (the missing ones repeat the first: never read).
        states = tuple(out[0] for out in outs)
        states += (states[0],) * (self.pieces - len(states))
        outs, new_groups = [], []
        for lo in range(0, len(alive), b):
          index = alive[lo:lo + b]
          bucket = self._bucket(len(index))
          index = np.concatenate([index, np.repeat(index[:1], bucket - len(index))]).astype(np.int32)
          outs.append(self._call(k, bucket, states, jax.device_put(index)))
          new_groups.append(alive_ids[lo:lo + b])
        groups = new_groups
      alive, alive_ids, alive_preds = [], [], []
      # The decisions are the host's: every batch's confidences and predictions, read back at once.
      decisions = jax.device_get([(out[1], out[2]) for out in outs])
      for i, ((conf, pred), ids) in enumerate(zip(decisions, groups)):
        conf, pred = conf[:len(ids)], pred[:len(ids)]
        if trace is not None:  # `every_exit`: every stage's outputs
          trace[0][k - 1, offset + ids], trace[1][k - 1, offset + ids] = conf, pred
        done = conf >= thresholds[k - 1] if k < num_exits else np.ones(len(ids), bool)
        predictions[offset + ids[done]] = pred[done]
        exits[offset + ids[done]] = k
        alive.append(i * b + np.flatnonzero(~done))  # rows of the concatenated states
        alive_ids.append(ids[~done])
        alive_preds.append(pred[~done])
      alive, alive_ids = np.concatenate(alive), np.concatenate(alive_ids)
      if deadline is not None:  # one batch: what stage k took at its bucket, for the next predictions
        seen = self.observed.setdefault((k, self._bucket(len(groups[0]))), [])
        seen.append(time.perf_counter() - stage_start)
        del seen[:-OBSERVED_WINDOW]
      if not len(alive):
        return k
      if deadline is not None:
        start, seconds = deadline
        if time.perf_counter() - start + self.predicted_seconds(k + 1, len(alive)) > seconds:
          # Stage k + 1 would not fit: the survivors take exit k, the deepest they have.
          predictions[offset + alive_ids] = np.concatenate(alive_preds)
          exits[offset + alive_ids] = k
          return k
    return num_exits  # not reached: the last stage takes everybody left

  def stage_seconds(self, example_images: np.ndarray, repeats: int = 3) -> dict[int, dict[int, float]]:
    """Each program's time alone: stage -> bucket -> best seconds per call (after a warm-up call), on
    states computed from `example_images` (every sample passed on, none exiting)."""
    images = self._check_images(example_images)
    images = np.resize(images, (self.batch_size,) + images.shape[1:])
    times: dict[int, dict[int, float]] = {}
    states = None
    for k in range(1, self.num_exits + 1):
      times[k] = {}
      for bucket in self.buckets:
        # On the device before the clock starts: a stage's time is its program's alone.
        args = jax.device_put((images[:bucket],) if k == 1 else
                              ((states,) * self.pieces, np.arange(bucket, dtype=np.int32)))
        fn = self.programs[(k, bucket)]
        out = jax.block_until_ready(fn(*args))
        if bucket == self.batch_size:  # the full batch's state is what the next stage is timed on
          next_states = out[0]
        best = float("inf")
        for _ in range(repeats):
          start = time.perf_counter()
          jax.block_until_ready(fn(*args))
          best = min(best, time.perf_counter() - start)
        times[k][bucket] = best
      states = next_states
    return times

  # Time budgets. The fit is `msdfuse_jax.timebudget`'s (numpy only), imported when a budget is refitted, so
  # that a runner that classifies at its export's thresholds loads jax and numpy alone.

  def measure(self, example_images: np.ndarray | None = None, repeats: int = 3) -> "Runner":
    """Re-times every stage on this machine (`stage_seconds`) and keeps the table (`stage_times`); a runner
    whose thresholds were fitted to a time budget is refitted to the new times. Returns the runner.

    Args:
      example_images: uint8 images the stages are timed on (default: random pixels of the export's shape).
      repeats: timed calls per program; the best is kept.
    """
    self.stage_times = self.time_table(example_images, repeats)
    if self.budget and self.budget.get("budget_ms") is not None:
      refitted = self.with_budget_ms(self.budget["budget_ms"], self.budget.get("num_images"))
      self.thresholds, self.budget = refitted.thresholds, refitted.budget
    return self

  def time_table(self, example_images: np.ndarray | None = None, repeats: int = 3) -> Any:
    """`stage_seconds` after a warm-up, as a `msdfuse_jax.timebudget.StageTimes` with the device, batch
    size, buckets and precision (the runner is left as it is; `measure` keeps the table and refits)."""
    from msdfuse_jax import timebudget  # pylint: disable=import-outside-toplevel
    if example_images is None:
      if self.image_shape is None:
        raise ValueError("this runner does not know its image shape: pass example images to time it on")
      example_images = np.random.default_rng(0).integers(0, 256, (self.batch_size, *self.image_shape),
                                                          dtype=np.uint8)
    self.warmup(example_images)
    seconds = self.stage_seconds(example_images, repeats)
    if self.manifest is not None:  # the programs' precision was fixed when they were exported
      precision = self.manifest.get("matmul_precision", {}).get("programs", "default")
    else:
      precision = str(jax.config.jax_default_matmul_precision or "default")
    return timebudget.StageTimes(
        seconds, self.batch_size, tuple(self.buckets), self.pieces, device=describe_device(),
        matmul_precision=precision,
        measured_on="the exported programs" if self.manifest is not None else "the in-process programs")

  def validation(self) -> tuple[np.ndarray, np.ndarray]:
    """The export's stored validation split: per-exit confidences (K, N) float32 and correctness (K, N)."""
    from msdfuse_jax import timebudget  # pylint: disable=import-outside-toplevel
    if self.source_dir is None:
      raise ExportError("this runner was not loaded from an export directory: it has no stored validation "
                        "data to refit from")
    try:
      return timebudget.load_validation(self.source_dir)
    except FileNotFoundError as e:
      raise ExportError(str(e)) from None

  def with_budget_ms(self, budget_ms: float, num_images: int | None = None) -> "Runner":
    """A runner (the same programs) whose thresholds are refitted on the stored validation data so that the
    predicted mean time per image on `stage_times`' machine is at most `budget_ms` milliseconds
    (`msdfuse_jax.timebudget.fit_time_budget`; its choice is in the new runner's `budget`).

    Args:
      budget_ms: milliseconds per image.
      num_images: images per run the prediction is for (default: one full chunk).
    """
    from msdfuse_jax import timebudget  # pylint: disable=import-outside-toplevel
    if self.stage_times is None:
      raise ExportError("this runner has no stage time table (an export of an older version): call "
                        "measure() first")
    conf, correct = self.validation()
    fit = timebudget.fit_time_budget(conf, correct, self.stage_times, budget_ms, num_images)
    return self._refitted(fit["thresholds"], {k: v for k, v in fit.items() if k != "thresholds"})

  def with_budget_ops(self, budget_ops: float) -> "Runner":
    """A runner (the same programs) whose thresholds are refitted on the stored validation data for an
    average literature cost per image of at most `budget_ops` (op_counter units), as ``--budget`` fits
    them."""
    from msdfuse_jax import timebudget  # pylint: disable=import-outside-toplevel
    if self.manifest is None or "exit_costs" not in self.manifest:
      raise ExportError("this runner's manifest has no per-exit costs to fit an ops budget to")
    conf, _ = self.validation()
    fit = timebudget.fit_ops_budget(conf, self.manifest["exit_costs"], budget_ops)
    record = {"p": fit["p"], "cost_budget": float(budget_ops), "budget_ms": None,
              "expected_val_cost": fit["expected_val_cost"]}
    return self._refitted(fit["thresholds"], record)

  def _refitted(self, thresholds: np.ndarray, fit: dict) -> "Runner":
    runner = copy.copy(self)  # the programs are shared; thresholds, budget and call counts are its own
    runner.thresholds = self._check_thresholds(thresholds)
    runner.budget = fit
    runner.calls = {}
    return runner


def describe_device() -> str:
  """The device the programs run on, for a stage time table: platform and kind, and on a CPU its model and
  core count (what the times depend on)."""
  device = jax.devices()[0]
  name = f"{device.platform} {device.device_kind}"
  if device.platform == "cpu":
    model = None
    try:
      with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
      pass
    name = f"cpu ({model + ', ' if model else ''}{os.cpu_count()} cores)"
  return name


def read_manifest(path: str) -> dict:
  """The manifest of export directory `path`, checked for the fields the runtime needs."""
  file = os.path.join(path, MANIFEST)
  if not os.path.isdir(path):
    raise ExportError(f"export directory {path} does not exist: write one with msdfuse-export")
  if not os.path.isfile(file):
    raise ExportError(f"{file} is missing: {path} is not an export directory (write one with "
                      "msdfuse-export)")
  try:
    with open(file) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"{file} is not a readable manifest ({e}); export again") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportError(f"{file} is not an msdfuse export manifest (format "
                      f"{manifest.get('format') if isinstance(manifest, dict) else None!r}, expected "
                      f"{FORMAT!r}); export again")
  required = ("num_exits", "batch_size", "buckets", "pieces", "thresholds", "image_shape", "model")
  missing = [key for key in required if key not in manifest]
  if missing:
    raise ExportError(f"{file} lacks {missing}; export again")
  return manifest


def _load_program(path: str, k: int, bucket: int, manifest: dict) -> Program:
  """Deserializes stage k's program at `bucket` and checks its input against the manifest."""
  file = os.path.join(path, stage_file(k, bucket))
  try:
    with open(file, "rb") as f:
      data = f.read()
  except OSError:
    raise ExportError(f"{file} is missing: the export of {manifest['model']} needs one program per stage "
                      f"and bucket ({manifest['num_exits']} stages x buckets {manifest['buckets']}); "
                      "export again") from None
  digest = manifest.get("sha256", {}).get(stage_file(k, bucket))
  if digest is not None and hashlib.sha256(data).hexdigest() != digest:
    raise ExportError(f"{file} does not belong to this export of {manifest['model']} (its checksum differs "
                      f"from {MANIFEST}'s); copy the whole directory again or export again")
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # a truncated or foreign file: flatbuffers raises anything
    raise ExportError(f"{file} is not a serialized jax.export program ({type(e).__name__}); "
                      "export again") from None
  platform = jax.default_backend()
  if platform not in exported.platforms and not (platform == "gpu"
                                                 and {"cuda", "rocm"} & set(exported.platforms)):
    raise ExportError(f"{file} was exported for {list(exported.platforms)}, not for this {platform} "
                      "machine: export with --platforms including it")
  if k == 1:
    expected = (bucket, *manifest["image_shape"])
    aval = exported.in_avals[0]
    if len(exported.in_avals) != 1 or tuple(aval.shape) != expected or str(aval.dtype) != "uint8":
      raise ExportError(f"{file} takes {[f'{a.dtype}{list(a.shape)}' for a in exported.in_avals]}, but the "
                        f"manifest says stage 1 at bucket {bucket} takes uint8{list(expected)}: the file "
                        "belongs to another export")
  elif tuple(exported.in_avals[-1].shape) != (bucket,):
    raise ExportError(f"{file} takes a survivor index of shape {tuple(exported.in_avals[-1].shape)}, not "
                      f"({bucket},): the file belongs to another export")
  return exported


def _check_chain(path: str, exported: dict, manifest: dict) -> None:
  """Each stage's programs take the states that the previous stage's programs return."""
  batch, pieces = manifest["batch_size"], manifest["pieces"]
  for (k, b), program in sorted(exported.items()):
    if k == 1:
      continue
    previous = exported[(k - 1, batch)]
    state = previous.out_avals[:len(previous.out_avals) - 2]  # (state leaves..., confidence, prediction)
    expected = [f"{a.dtype}{list(a.shape)}" for a in state] * pieces
    got = [f"{a.dtype}{list(a.shape)}" for a in program.in_avals[:-1]]
    if got != expected:
      raise ExportError(f"{os.path.join(path, stage_file(k, b))} takes states {got[:3]}..., but stage {k - 1} "
                        f"returns {expected[:3]}...: the file belongs to another export")
