"""`msdfuse-export`'s work: a trained run's early-exit programs, serialized for `msdfuse_jax.serving`.

An export directory holds, for one budget (the thresholds fitted on the run's validation split, exactly as
`msdfuse-eval` and `msdfuse-infer` fit them):

  manifest.json              model, dataset, exits, image shape, bucket sizes, per-exit literature cost,
                             thresholds, the budget, SHA-256 of every program, the commit and the run's
                             config, and the stage time table (each program timed on this machine)
  validation.npz             the validation split's per-exit confidences and correctness, so that
                             `serving.Runner.with_budget_ms` / `with_budget_ops` refit without the model
  stage{k}_b{b}.jaxexport    stage k's program at bucket size b (`jax.export`, StableHLO inside): stage 1
                             takes uint8 images and normalises them; every stage returns its exit's
                             confidence and prediction and the state the next stage gathers its survivors from

The programs hold their weights as constants, with BatchNorm folded into the convolutions
(`msdfuse_jax.folding`); the export refuses to write programs whose logits differ from the unfolded
model's by more than `FOLD_TOLERANCE` on the validation images, both computed at `CHECK_PRECISION`
(``manifest["matmul_precision"]`` says at what precision each figure was taken).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from msdfuse_jax import folding, inference, rundir, serving, timebudget
from msdfuse_jax.data import augment, sources
from msdfuse_jax.evaluation import budget, evaluate

FOLD_TOLERANCE = 1e-3  # largest |folded - unfolded| logit the export accepts (float32 gives ~1e-6)
CHECK_PRECISION = "highest"  # jax.default_matmul_precision of the folding check
PROGRAM_PRECISION = "default"  # the exported programs': the backend's own (TF32 on recent GPUs, TPU passes)
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")


def _commit() -> str | None:
  """The package's git commit (with ``-dirty`` when its tree has changes), or None outside a checkout."""
  here = os.path.dirname(os.path.abspath(__file__))
  try:
    commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                            timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if dirty else "")


def check_platforms(platforms: Sequence[str] | None) -> tuple[str, ...]:
  """The platforms to lower for (default: this machine's), each one jax.export knows."""
  if not platforms:
    backend = jax.default_backend()
    return ("cuda",) if backend == "gpu" else (backend,)
  unknown = [p for p in platforms if p not in PLATFORMS]
  if unknown:
    raise ValueError(f"unknown platform(s) {unknown}; valid choices: {list(PLATFORMS)}")
  return tuple(dict.fromkeys(platforms))


def check_folding(model: Any, variables: Any, folded: folding.FoldedModel, images: Any) -> float:
  """Largest |folded - unfolded| logit over every exit on `images` (model inputs); `serving.ExportError`
  above `FOLD_TOLERANCE`.

  Both sides run at `CHECK_PRECISION`: at the backend's default precision a GPU computes float32
  convolutions as TF32 and a TPU as bfloat16 passes, whose rounding (1e-3 relative) would hide a real
  folding error or refuse a correct export; at "highest" both are float32 computations and differ by
  float32 rounding only.
  """
  with jax.default_matmul_precision(CHECK_PRECISION):
    change = jax.jit(lambda x: jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in
                                          zip(model.apply(variables, x), folded.apply(x))]))
    error = float(np.max(jax.device_get(change(jax.device_put(images)))))
  if not error <= FOLD_TOLERANCE:
    raise serving.ExportError(f"folding BatchNorm changed the logits by {error:.3g} (> {FOLD_TOLERANCE}): "
                              "this model has a convolution whose output is also read without its "
                              "BatchNorm; please report it")
  return error


def export_model(model: Any, variables: Any, mean: Sequence[float], std: Sequence[float],
                 image_shape: Sequence[int], out: str, thresholds: Sequence[float], *,
                 batch_size: int = 256, num_buckets: int = 5, chunk_batches: int = 4,
                 platforms: Sequence[str] | None = None, check_images: np.ndarray | None = None,
                 metadata: dict | None = None, validation: tuple[np.ndarray, np.ndarray] | None = None,
                 time_repeats: int = 3) -> dict:
  """Writes the programs of `model` (float32, BatchNorm folded) and a manifest into `out`.

  Args:
    model, variables: the network and its variables.
    mean, std: the per-channel normalisation stage 1 applies to uint8 images (in [0, 1] units).
    image_shape: (H, W, C).
    out: the directory to write (created).
    thresholds: the K confidence thresholds the runtime uses by default (the last -1e8).
    batch_size, num_buckets, chunk_batches: the runner's batch, bucket sizes and chunk (`serving.Runner`).
    platforms: lower for these (`check_platforms`).
    check_images: uint8 images for the folding check (default: random pixels).
    metadata: more manifest fields (model name, dataset, costs, budget, source).
    validation: the validation split's (K, N) confidences and correctness, stored for refits
      (`timebudget.save_validation`).
    time_repeats: timed calls per program for the stage time table (``manifest["stage_times"]``: the
      written programs, loaded as `serving` loads them, timed on this machine); 0: no table.

  Returns:
    The manifest.
  """
  platforms = check_platforms(platforms)
  image_shape = tuple(int(d) for d in image_shape)
  if len(thresholds) != model.num_exits:
    raise ValueError(f"need {model.num_exits} thresholds (one per exit), got {len(thresholds)}")
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  preprocess = lambda images: augment.eval_batch(images, mean, std)
  folded = folding.FoldedModel(model, variables, jax.ShapeDtypeStruct((1, *image_shape), jnp.float32))
  if check_images is None:
    check_images = np.random.default_rng(0).integers(0, 256, (8, *image_shape), dtype=np.uint8)
  fold_error = check_folding(model, variables, folded,
                             jax.jit(preprocess)(jax.device_put(np.asarray(check_images))))
  fns = inference.stage_functions(model, variables, preprocess, batch_size, folded)

  buckets = serving.bucket_sizes(batch_size, num_buckets)
  os.makedirs(out, exist_ok=True)
  digests = {}
  state_spec = None
  for k in range(1, model.num_exits + 1):
    def specs(b):
      if k == 1:
        return (jax.ShapeDtypeStruct((b, *image_shape), jnp.uint8),)
      return ((state_spec,) * chunk_batches, jax.ShapeDtypeStruct((b,), jnp.int32))
    for b in buckets:
      data = bytes(jax.export.export(jax.jit(fns[k]), platforms=platforms)(*specs(b)).serialize())
      name = serving.stage_file(k, b)
      with open(os.path.join(out, name), "wb") as f:
        f.write(data)
      digests[name] = hashlib.sha256(data).hexdigest()
    if k < model.num_exits:
      state_spec = jax.eval_shape(fns[k], *specs(batch_size))[0]

  manifest = {
      "format": serving.FORMAT,
      "num_exits": model.num_exits,
      "image_shape": list(image_shape),
      "input_dtype": "uint8",
      "normalization": {"mean": mean.tolist(), "std": std.tolist()},
      "batch_size": batch_size,
      "buckets": buckets,
      "pieces": chunk_batches,
      "platforms": list(platforms),
      "thresholds": [float(t) for t in thresholds],
      "batch_norm": {"folded_into_convolutions": folded.plan.folded,
                     "kept_as_scale_and_shift": len(folded.plan.pairs) - folded.plan.folded,
                     "max_logit_change": fold_error},
      # At what jax.default_matmul_precision each figure was taken: the folding check and the thresholds'
      # fit at float32's own precision on any backend; the programs at the backend's default.
      "matmul_precision": {"programs": PROGRAM_PRECISION, "folding_check": CHECK_PRECISION,
                           "thresholds": inference.SIMULATION_PRECISION},
      "sha256": digests,
      "model": type(model).__name__,
      **(metadata or {}),
  }
  if validation is not None:
    file = timebudget.save_validation(out, *validation)
    with open(file, "rb") as f:
      manifest["validation"] = {"file": timebudget.VALIDATION_FILE, "num_images": int(validation[0].shape[1]),
                                "sha256": hashlib.sha256(f.read()).hexdigest()}
  rundir.write_json(os.path.join(out, serving.MANIFEST), manifest)
  if time_repeats > 0 and jax.default_backend() in _platform_names(platforms):
    runner = serving.Runner.from_dir(out)
    manifest["stage_times"] = runner.time_table(np.asarray(check_images), time_repeats).to_json()
    rundir.write_json(os.path.join(out, serving.MANIFEST), manifest)
  return manifest


def _platform_names(platforms: Sequence[str]) -> set[str]:
  """jax.default_backend() names of `platforms` (an export for cuda or rocm runs on the 'gpu' backend)."""
  return {"gpu" if p in ("cuda", "rocm") else p for p in platforms}


def export_run(workdir: str, out: str, p: int | None = None, cost_budget: float | None = None,
               batch_size: int = 256, num_buckets: int = 5, chunk_batches: int = 4,
               platforms: Sequence[str] | None = None, budget_ms: float | None = None) -> dict:
  """`msdfuse-export`: writes the export directory `out` for run `workdir` at budget point `p`, or the
  largest point whose validation cost fits `cost_budget`, or (`budget_ms`) the largest point whose predicted
  mean time per image, from the written programs timed on this machine, fits `budget_ms` milliseconds
  (`timebudget.fit_time_budget`, for full chunks); the thresholds fitted on its validation split.

  Returns:
    The manifest (also written to ``out/manifest.json``).
  """
  check_platforms(platforms)
  if budget_ms is not None and jax.default_backend() not in _platform_names(check_platforms(platforms)):
    raise ValueError(f"--budget_ms fits to the programs' times on this {jax.default_backend()} machine: "
                     "include its platform in --platforms")
  config, model, variables, step, data = evaluate.load_run(workdir, dtype="float32")
  # A time budget is fitted after the programs are written and timed; until then the manifest holds the
  # thresholds of point p = 1, replaced below (or the directory is removed if no point fits).
  fit = inference.fit_budget(config, model, variables, data, 1 if budget_ms is not None else p, cost_budget,
                             batch_size)
  image_shape = np.asarray(data.test_images[:1]).shape[1:]
  metadata = {
      "model": config.model.name,
      "dataset": config.dataset,
      "num_classes": sources.num_classes(config.dataset),
      "exit_costs": [int(c) for c in fit["exit_costs"]],
      "p": fit["p"],
      "cost_budget": cost_budget,
      "budget_ms": budget_ms,
      "expected_val_cost": fit["expected_val_cost"],
      "source": {"workdir": os.path.abspath(workdir), "step": int(step), "commit": _commit(),
                 "jax": jax.__version__, "config": config.to_dict()},
  }
  manifest = export_model(model, variables, data.mean, data.std, image_shape, out, fit["thresholds"],
                          batch_size=batch_size, num_buckets=num_buckets, chunk_batches=chunk_batches,
                          platforms=platforms, check_images=np.asarray(data.val_images[:64]),
                          metadata=metadata, validation=(fit["val_confidence"], fit["val_correct"]))
  if budget_ms is not None:
    try:
      table = timebudget.StageTimes.from_json(manifest["stage_times"])
      time_fit = timebudget.fit_time_budget(fit["val_confidence"], fit["val_correct"], table, budget_ms)
    except ValueError:
      shutil.rmtree(out, ignore_errors=True)  # the tool wrote into a new or empty directory
      raise
    exits = budget.exits_from_confidence(fit["val_confidence"], time_fit["thresholds"])
    counts = np.bincount(exits, minlength=model.num_exits)
    manifest.update(p=time_fit["p"], thresholds=[float(t) for t in time_fit["thresholds"]],
                    expected_val_cost=float(np.dot(counts / len(exits), fit["exit_costs"])),
                    time_fit=timebudget.fit_record({k: v for k, v in time_fit.items() if k != "thresholds"}))
    rundir.write_json(os.path.join(out, serving.MANIFEST), manifest)
  return manifest
