"""Real early-exit inference: run stage k only on the samples that stages 1..k-1 did not classify.

The reference implementations only *simulate* budgeted classification from full forward passes. Here a
batch goes through the network stage by stage (`MultiExitModule.stage`); after stage k the samples whose
confidence reaches exit k's threshold leave, and the survivors' stage-k features (not the images) are
passed on, so no work is repeated.

The runner itself is `msdfuse_jax.serving.Runner` (shared with the exported programs' runtime); this
module builds its programs in-process (`stage_functions`, `EarlyExitRunner`) and does `msdfuse-infer`'s
work (`run_inference`). Shapes are what makes it fast under XLA: the survivors are compacted into one of a
few fixed bucket sizes (the batch size divided by powers of two) and gathered, inside the next stage's
program, from the previous stage's outputs, so each (stage, bucket) pair compiles once, and after warm-up
nothing recompiles, whatever the number of survivors. Survivors of a whole chunk of batches are pooled,
so that only one batch per stage and chunk is partly padding.

Decisions are the simulation's, exactly: a sample exits at the first k with ``max softmax >= T_k``
(float32), and the last exit takes everybody left (its threshold is -1e8).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from msdfuse_jax import costs, deadlines, folding, models, serving, timebudget
from msdfuse_jax.data import augment, sources
from msdfuse_jax.evaluation import budget, evaluate, predict


EarlyExitResult = serving.EarlyExitResult
bucket_sizes = serving.bucket_sizes

# The jax.default_matmul_precision of the simulation (the thresholds' fit and the probabilities the
# early-exit decisions are checked against) and of the in-process runner's checked run: at the backend's
# default a GPU computes float32 convolutions as TF32 and a TPU as bfloat16 passes, and two different
# programs (full forward passes, per-stage programs) would then disagree near a threshold. The timed runs
# are at the backend's default (`TIMING_PRECISION`), what a user gets.
SIMULATION_PRECISION = "highest"
TIMING_PRECISION = "default"


def _decide(logits: jax.Array) -> tuple[jax.Array, jax.Array]:
  """An exit's confidence (max softmax, float32) and prediction (int32), as the simulation computes them."""
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.max(probs, -1), jnp.argmax(probs, -1).astype(jnp.int32)


def stage_functions(model: Any, variables: Any, preprocess=lambda x: x, batch_size: int = 256,
                    folded: folding.FoldedModel | None = None) -> dict[int, Any]:
  """The per-stage programs of `serving.Runner`, as traceable functions: k -> function.

  Stage 1 maps images (b, H, W, C) to ``(state, confidence, prediction)``; stage k > 1 maps ``(states,
  index)``, a tuple of states of `batch_size` rows and the (b,) survivor rows of their concatenation, to the
  same triple. The gather happens inside the program (XLA reads the rows from the concatenation without
  materialising it), and each returned state is padded to `batch_size` rows, so that every program has
  one input shape whatever the bucket. The last stage returns an empty state.

  Args:
    model: a `MultiExitModule`.
    variables: its variables.
    preprocess: raw images -> the model's input, inside stage 1 (e.g. uint8 -> normalised float32).
    batch_size: rows of every state.
    folded: the model with BatchNorm folded into its convolutions (`folding.FoldedModel`), to run instead
      of ``model.apply(variables, ...)``.
  """
  num_exits = model.num_exits
  apply = folded.apply if folded is not None else functools.partial(model.apply, variables)

  def pad(state):
    return jax.tree.map(
        lambda a: jnp.pad(a, [(0, batch_size - a.shape[0])] + [(0, 0)] * (a.ndim - 1)), state)

  def finish(k, state, logits):
    return (pad(state) if k < num_exits else (), *_decide(logits))

  def first(images):
    state, logits = apply(preprocess(images), 1, method=model.ensemble_stage)
    return finish(1, state, logits)

  def later(k, states, index):
    state = jax.tree.map(lambda *xs: jnp.take(jnp.concatenate(xs, axis=0), index, axis=0), *states)
    state, logits = apply(state, k, method=model.ensemble_stage)
    return finish(k, state, logits)

  return {k: first if k == 1 else functools.partial(later, k) for k in range(1, num_exits + 1)}


class EarlyExitRunner(serving.Runner):
  """`serving.Runner` on the in-process model: one jitted program per stage (its bucket sizes are shapes
  of the same jitted function).

  Args:
    model: a `MultiExitModule`.
    variables: its variables (params and batch statistics).
    preprocess: maps a batch of raw images (e.g. uint8) to the model's input (e.g. normalised float32);
      it runs inside the first stage's program.
    batch_size: images per batch; the largest bucket.
    num_buckets: batch sizes a partial batch can be padded to (batch_size, /2, /4, ...).
    chunk_batches: batches per chunk (how many states a stage gathers its survivors from).
    fold: fold BatchNorm into the convolutions (what `msdfuse-export` ships).
    example: the model's input (after `preprocess`) or its `jax.ShapeDtypeStruct`, needed to fold.
  """

  def __init__(self, model: Any, variables: Any, preprocess=lambda x: x, batch_size: int = 256,
               num_buckets: int = 5, chunk_batches: int = 4, fold: bool = False,
               example: Any = None):
    self.model = model
    self.variables = variables
    folded = folding.FoldedModel(model, variables, example) if fold else None
    fns = stage_functions(model, variables, preprocess, batch_size, folded)
    self.jitted = {k: jax.jit(fn) for k, fn in fns.items()}
    buckets = bucket_sizes(batch_size, num_buckets)
    programs = {(k, b): self.jitted[k] for k in fns for b in buckets}
    super().__init__(programs, model.num_exits, batch_size, buckets, chunk_batches)

  def compiled_programs(self) -> int:
    """How many (stage, shape) programs have been compiled so far."""
    return sum(fn._cache_size() for fn in self.jitted.values())  # pylint: disable=protected-access


def full_network_fns(model: Any, preprocess=lambda x: x):
  """Compiled baselines for timing: every exit of the network, and the last exit alone.

  The first returns all K logits (what the simulated evaluation needs); the second returns only the last
  one, so XLA drops the earlier heads, as a plain single-exit network would.
  """
  every_exit = jax.jit(lambda variables, images: model.apply(variables, preprocess(images)))
  last_exit = jax.jit(lambda variables, images: model.apply(variables, preprocess(images))[-1])
  return every_exit, last_exit


def time_batches(fn, variables: Any, images: np.ndarray, batch_size: int, repeats: int = 1) -> float:
  """Seconds to run `fn(variables, batch)` over `images` in padded batches (after one warm-up call).

  The variables are put on the device before the clock starts (nothing is copied when they are there
  already); each batch of images is put there inside the timed loop, as the early-exit runner puts its
  batches, so both sides of a speedup pay the same transfers and neither pays for the weights.
  """
  pad = (-len(images)) % batch_size
  if pad:
    images = np.concatenate([images, np.repeat(images[:1], pad, axis=0)])
  variables = jax.device_put(variables)
  jax.block_until_ready(fn(variables, jax.device_put(images[:batch_size])))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    out = None
    for lo in range(0, len(images), batch_size):
      out = fn(variables, jax.device_put(images[lo:lo + batch_size]))
    jax.block_until_ready(out)
    best = min(best, time.perf_counter() - start)
  return best


def fit_budget(config: Any, model: Any, variables: Any, data: Any, p: int | None,
               cost_budget: float | None, batch_size: int, budget_ms: float | None = None,
               stage_times: timebudget.StageTimes | None = None, num_images: int | None = None) -> dict:
  """The thresholds of budget point `p`, or of the largest point whose validation cost fits `cost_budget`,
  or of the largest point whose predicted time per image on `stage_times` fits `budget_ms`
  (`timebudget.fit_time_budget`, for runs of `num_images` images), fitted on the validation split exactly
  as `msdfuse-eval` fits them, from probabilities computed at `SIMULATION_PRECISION`.

  Returns:
    dict with ``p``, ``thresholds``, ``exit_costs`` (literature op_counter per exit), ``expected_val_cost``,
    the validation and test probabilities (``val_probs``, ``test_probs``: (K, N, C)), the validation
    split's per-exit confidences and correctness (``val_confidence``, ``val_correct``: (K, N), what an
    export keeps to refit) and ``time_fit`` (`timebudget.fit_time_budget`'s record, or None).
  """
  mean, std = np.asarray(data.mean), np.asarray(data.std)
  predict_fn = predict.make_predict_fn(model, mean, std)
  with jax.default_matmul_precision(SIMULATION_PRECISION):
    val_probs = predict.predict_probs(model, variables, data.val_images, mean, std, batch_size,
                                      predict_fn=predict_fn)
    test_probs = predict.predict_probs(model, variables, data.test_images, mean, std, batch_size,
                                       predict_fn=predict_fn)
  exit_costs = [c.op_counter for c in costs.exit_costs(models.from_config(config, dtype="float32"),
                                                       image_size=sources.image_size(config.dataset),
                                                       with_xla=False)]
  val_conf, val_correct = timebudget.validation_from_probs(val_probs, data.val_labels)
  time_fit = None
  if budget_ms is not None:
    if stage_times is None:
      raise ValueError("a time budget needs the stages' measured times")
    time_fit = timebudget.fit_time_budget(val_conf, val_correct, stage_times, budget_ms, num_images)
    p = time_fit["p"]
  elif p is None:
    p = budget.thresholds_for_budget(val_probs, exit_costs, cost_budget)
  thresholds = budget.fit_thresholds(val_probs, p)
  val_exits, _ = budget.apply_thresholds(val_probs, thresholds)
  counts = np.bincount(val_exits, minlength=model.num_exits)
  return dict(p=int(p), thresholds=thresholds, exit_costs=exit_costs, val_probs=val_probs,
              test_probs=test_probs, val_confidence=val_conf, val_correct=val_correct, time_fit=time_fit,
              expected_val_cost=float(np.dot(counts / len(val_exits), exit_costs)))


def check_export_matches(manifest: dict, config: Any, export_dir: str) -> None:
  """`serving.ExportError` unless the export in `export_dir` was made from a run of this model and dataset."""
  for key, value in (("model", config.model.name), ("dataset", config.dataset)):
    if manifest.get(key) != value:
      raise serving.ExportError(f"{export_dir}/manifest.json is an export of {key} {manifest.get(key)!r}, but the run "
                       f"is {key} {value!r}: give the --workdir it was exported from")


def run_inference(workdir: str, p: int | None, cost_budget: float | None, batch_size: int,
                  repeats: int, export_dir: str | None = None, budget_ms: float | None = None, *,
                  deadline_ms: float | None = None, deadline_sweep: int = 8) -> dict:
  """`msdfuse-infer`'s work: fits thresholds, runs early exit and the baselines, checks the simulation,
  and times every stage alone.

  Args:
    workdir: a run directory (trained or imported).
    p: the budget point (1..`budget.NUM_BUDGET_POINTS`), or None to use `cost_budget` or `budget_ms`.
    cost_budget: the largest average cost per image (literature op_counter units).
    batch_size: images per batch (the largest bucket).
    repeats: timed repetitions; the best is reported.
    export_dir: run the exported programs of this directory (`msdfuse-export`) with `serving.Runner`
      instead of the in-process model; its batch size and buckets are then the export's, and its
      thresholds too unless `budget_ms` is given (`p`, `cost_budget` and `batch_size` must be None).
    budget_ms: the largest predicted mean milliseconds per image on this machine: the stages are timed
      first (`serving.Runner.measure`) and the thresholds fitted to those times (`timebudget`), on the
      validation split (with an export: on the validation data it stores, `Runner.with_budget_ms`).
    deadline_ms: also classify the test set under this deadline per chunk (`serving.Runner.run`'s anytime
      mode), then sweep deadlines (`deadlines.report`); the stage times predicted are the runner's
      `stage_times`, set to the table timed here unless the runner has one.
    deadline_sweep: how many deadlines the sweep runs (0: none).

  Returns:
    The figures written to ``WORKDIR/eval/infer.json``. ``matches_simulation`` compares the runner's
    predictions and exits with ``simulation``'s (in process: the model's full forward passes, both at
    `SIMULATION_PRECISION`; with an export: its own programs run on every image, at their precision);
    ``matmul_precision`` says at what precision the timings, that check and the thresholds were taken.
    ``predicted_ms_per_image`` is the time the stage table (``stage_times``) predicts for the thresholds
    (the validation split's fractions reaching each stage), ``realised_ms_per_image`` the best wall time of
    the whole test set over its images, warm. With `deadline_ms`, also the keys of `deadlines.report`
    (``deadline_ms``, ``deadline_met_fraction``, ``worst_overshoot_ms``, ``deadline_sweep``, ...). Every transfer between host and device is explicit
    (it runs under ``JAX_TRANSFER_GUARD=disallow``).
  """
  if deadline_ms is not None:
    serving.check_deadline_ms(deadline_ms)  # a one-line error before any work
  if export_dir is not None:
    manifest = serving.read_manifest(export_dir)
    config, model, variables, step, data = evaluate.load_run(workdir, dtype="float32")
    check_export_matches(manifest, config, export_dir)
    batch_size = int(manifest["batch_size"])
    runner = serving.Runner.from_dir(export_dir)
  else:
    config, model, variables, step, data = evaluate.load_run(workdir)
  # Timed on decoded images held in memory (ImageNet's lazy test set is decoded here, once).
  test_images = np.asarray(data.test_images)
  n = len(test_images)
  mean, std = np.asarray(data.mean), np.asarray(data.std)
  preprocess = lambda images: augment.eval_batch(images, mean, std)
  if export_dir is None:
    runner = EarlyExitRunner(model, variables, preprocess, batch_size=batch_size)
  if budget_ms is not None:  # the stages' times on this machine come first: the fit needs them
    with jax.default_matmul_precision(TIMING_PRECISION):
      runner.measure(test_images, repeats)
  if export_dir is not None:
    if budget_ms is not None:  # refitted on the export's stored validation data
      runner = runner.with_budget_ms(budget_ms, num_images=n)
      time_fit = timebudget.fit_record(runner.budget)
      p = runner.budget["p"]
    else:
      time_fit, p = None, manifest["p"]
    fit = fit_budget(config, model, variables, data, int(p), None, batch_size)
    thresholds = runner.thresholds
  else:
    fit = fit_budget(config, model, variables, data, p, cost_budget, batch_size, budget_ms,
                     runner.stage_times, n)
    thresholds = fit["thresholds"]
    time_fit = None if fit["time_fit"] is None else timebudget.fit_record(fit["time_fit"])
  p, exit_costs = fit["p"], fit["exit_costs"]

  # The check compares like with like. In process: the runner's decisions and the simulation's
  # probabilities (`fit_budget`), both at SIMULATION_PRECISION. An export's programs have their precision
  # built in: they are checked against the simulation computed with the same programs.
  if export_dir is None:
    with jax.default_matmul_precision(SIMULATION_PRECISION):
      checked = runner.run(test_images, thresholds)
    sim_exits, sim_preds = budget.apply_thresholds(fit["test_probs"], thresholds)
    sim_exits = sim_exits + 1
    simulation, check_precision = "the model's full forward passes", SIMULATION_PRECISION
    timing_precision = TIMING_PRECISION
  else:
    checked = runner.run(test_images, thresholds)
    sim_preds, sim_exits = runner.simulate(test_images, thresholds)
    simulation = "the export's programs, every stage on every image"
    check_precision = timing_precision = manifest.get("matmul_precision", {}).get("programs", "default")
  # At the precision infer.json records, whatever the caller's (an export's programs keep their own).
  with jax.default_matmul_precision(TIMING_PRECISION):
    runner.warmup(test_images)
    result = min((runner.run(test_images, thresholds) for _ in range(repeats)),
                 key=lambda r: r.seconds)
    every_exit, last_exit = full_network_fns(model, preprocess)
    t_full = time_batches(every_exit, variables, test_images, batch_size, repeats)
    t_last = time_batches(last_exit, variables, test_images, batch_size, repeats)
    # A time budget measured the stages before its fit: that table is reported. Otherwise they are timed
    # now, without refitting anything (an export fitted to a time budget keeps its thresholds here).
    stage_times = runner.stage_times if budget_ms is not None else runner.time_table(test_images, repeats)
    deadline = {}
    if deadline_ms is not None:
      source = "the runner's own table"  # e.g. one stored with an export
      if runner.stage_times is None:  # the table just timed is what the deadlines predict from
        runner.stage_times, source = stage_times, "timed in this run (Runner.time_table)"
      deadline = {**deadlines.report(runner, test_images, data.test_labels, thresholds, deadline_ms,
                                     deadline_sweep), "deadline_stage_times": source}
  stage_seconds = stage_times.seconds

  counts = np.bincount(checked.exits - 1, minlength=model.num_exits)
  reaching = n - np.concatenate([[0], np.cumsum(counts)[:-1]])
  per_image = np.array([stage_seconds[k][batch_size] / batch_size for k in range(1, model.num_exits + 1)])
  t_ideal = float(reaching @ per_image)
  expected_cost = float(np.dot(counts / n, exit_costs))
  predicted = exit_costs[-1] / expected_cost
  realised = t_full / result.seconds
  time_ideal = t_full / t_ideal
  # The time the table predicts for these thresholds, as the time budget's fit predicts it: the validation
  # split's fractions reaching each stage, priced at the runner's calls for n images.
  val_reaching = timebudget.reaching_fractions(
      budget.exits_from_confidence(fit["val_confidence"], thresholds), model.num_exits)
  predicted_ms = 1e3 * timebudget.predicted_seconds_per_image(val_reaching, stage_times, n)
  return {
      "workdir": workdir, "model": config.model.name, "dataset": config.dataset, "step": step,
      "p": int(p), "thresholds": [float(t) for t in thresholds],
      "runner": "export" if export_dir is not None else "in-process",
      "export_dir": None if export_dir is None else os.path.abspath(export_dir),
      "num_images": n, "batch_size": batch_size, "buckets": runner.buckets,
      "exit_counts": counts.tolist(), "reaching_stage": reaching.tolist(),
      "accuracy": float(100.0 * np.mean(checked.predictions == data.test_labels)),
      "expected_cost": expected_cost, "full_cost": exit_costs[-1],
      "cost_budget": cost_budget, "budget_ms": budget_ms,
      "predicted_ms_per_image": predicted_ms,
      "realised_ms_per_image": 1e3 * result.seconds / n,
      "full_network_ms_per_image": 1e3 * t_full / n,
      "early_exit_images_per_s": n / result.seconds,
      "full_network_images_per_s": n / t_full,
      "last_exit_images_per_s": n / t_last,
      "speedup_vs_full": realised, "speedup_vs_last_exit": t_last / result.seconds,
      "predicted_speedup": predicted, "realised_over_predicted": realised / predicted,
      "time_ideal_speedup": time_ideal,
      "realised_over_time_ideal": realised / time_ideal,
      "time_ideal_over_predicted": time_ideal / predicted,
      "stage_ms_per_image": [1e3 * t for t in per_image],
      "stage_seconds": {str(k): {str(b): t for b, t in times.items()} for k, times in stage_seconds.items()},
      "stage_times": stage_times.to_json(),
      "time_fit": time_fit,
      "matches_simulation": bool(np.array_equal(checked.exits, sim_exits)
                                 and np.array_equal(checked.predictions, sim_preds)),
      "simulation": simulation,
      # At what jax.default_matmul_precision the figures were taken ("default": the backend's own).
      "matmul_precision": {"timings": timing_precision, "matches_simulation": check_precision,
                           "thresholds": SIMULATION_PRECISION},
      **deadline,
  }
