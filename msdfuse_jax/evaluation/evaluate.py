"""`msdfuse-eval`'s work: every exit over the validation split and the test set, then every artifact.

Writes into ``WORKDIR/eval/``:

* ``probs_val.npz``, ``probs_test.npz``: ``probs`` (K, N, C) float32 softmax per exit, ``labels`` (N,);
* ``costs.json``: `msdfuse_jax.costs.costs_report` of the model;
* ``anytime.{json,csv,png}`` and ``budgeted.{json,csv,png}`` (see `msdfuse_jax.evaluation.report`).

The validation images are not augmented (the MSDNet protocol); ``config.eval.augment_val=True`` applies the
training crop and flip to them, which reproduces the reference code's threshold fitting.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from msdfuse_jax import checkpoints, costs, models, rundir
from msdfuse_jax import data as data_lib
from msdfuse_jax.data import augment
from msdfuse_jax.evaluation import anytime, budget, predict, report

def load_run(workdir: str, dtype: str | None = None):
  """(config, model, variables, step, data) of a run directory, everything evaluation needs.

  The variables are on the default device (one explicit transfer): the tools' loops then pass them to
  their programs without copying them again.
  """
  config = rundir.load_config(workdir)
  model = models.from_config(config, dtype=dtype)
  variables, step = checkpoints.load_variables(workdir)
  variables = jax.device_put(variables)
  data = data_lib.load(config.dataset, config.data, workdir)
  return config, model, variables, step, data


def _augmented(images: np.ndarray, padding: int, seed: int) -> np.ndarray:
  """The training crop and flip applied once to `images` (the reference's validation-set bug)."""
  out = augment.random_crop_flip(jax.random.PRNGKey(seed), np.asarray(images), padding=padding)
  return np.asarray(out).astype(np.uint8)


def evaluate_run(workdir: str, out_dir: str | None = None, with_xla: bool = True) -> dict[str, Any]:
  """Evaluates the newest checkpoint of `workdir` and writes every artifact; returns a summary."""
  config, model, variables, step, data = load_run(workdir)
  out_dir = out_dir or rundir.eval_dir(workdir)
  os.makedirs(out_dir, exist_ok=True)
  batch_size = int(config.eval.get("batch_size", 500))
  predict_fn = predict.make_predict_fn(model, data.mean, data.std)
  val_images = data.val_images
  if config.eval.get("augment_val", False):
    val_images = _augmented(val_images, int(config.aug.crop_padding), int(config.seed))
  probs = {}
  for split, images, labels in (("val", val_images, data.val_labels),
                                ("test", data.test_images, data.test_labels)):
    logging.info("evaluating %d %s images", len(images), split)
    probs[split] = predict.predict_probs(model, variables, images, data.mean, data.std, batch_size,
                                         predict_fn=predict_fn)
    np.savez_compressed(os.path.join(out_dir, f"probs_{split}.npz"), probs=probs[split],
                        labels=np.asarray(labels, np.int64))

  # Costs are counted on the float32 model, whatever the compute dtype of the run.
  cost_report = costs.costs_report(models.from_config(config, dtype="float32"), config.model.name,
                                   config.dataset, with_xla=with_xla)
  with open(os.path.join(out_dir, "costs.json"), "w") as f:
    json.dump(cost_report, f, indent=2)

  rows = anytime.anytime_rows(probs["test"], data.test_labels, cost_report["exits"])
  meta = dict(model=config.model.name, dataset=config.dataset, step=step)
  report.write_anytime(out_dir, rows, split="test", **meta)
  points = budget.dynamic_evaluation(probs["val"], data.val_labels, probs["test"], data.test_labels,
                                     [e["op_counter"] for e in cost_report["exits"]])
  report.write_budgeted(out_dir, points, rows, split="test", threshold_split="val", **meta)
  return {"step": step, "out_dir": out_dir, "anytime": rows, "budgeted": points}


def format_anytime(rows: list[dict[str, Any]]) -> str:
  """The anytime table as fixed-width text."""
  lines = [f"{'exit':>4} {'op_counter':>12} {'MACs':>12} {'xla_flops':>13} {'top1':>7} {'top5':>7} "
           f"{'ECE':>6}"]
  for r in rows:
    flops = r["xla_flops"]
    lines.append(f"{r['exit']:>4} {r['op_counter']:>12,d} {r['macs']:>12,d} "
                 f"{(f'{flops:,.0f}' if flops is not None else 'n/a'):>13} {r['top1']:>7.2f} "
                 f"{r['top5']:>7.2f} {r['ece']:>6.3f}")
  return "\n".join(lines)
