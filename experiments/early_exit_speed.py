"""Before / after table of early-exit speed on a trained run: the figures of docs/early_exit.md ("Speed").

  python experiments/early_exit_speed.py WORKDIR [--p=5,20,35] [--batch_size=256] [--repeats=3]
      [--baseline=OLD_INFERENCE_PY] [--export=DIR]

For each p, in one process and one sitting: the full network (every exit, batch B), the baseline runner
(`--baseline`: the `inference.py` of an earlier commit, e.g. ``git show 9aa3b46:msdfuse_jax/inference.py
> /tmp/old_inference.py``, whose runner copied every stage's outputs into a pool), the in-process runner
(`msdfuse_jax.inference.EarlyExitRunner`, unfolded) and the exported programs through
`msdfuse_jax.serving` (exported once into `--export`, default a temporary directory). Prints, per runner,
the realised speedup over the full network, realised / predicted, and, for the current runners, the
time-ideal speedup, realised / time-ideal and time-ideal / predicted (see `inference.run_inference`), and
the per-stage table (ms per image at batch B, images reaching each stage). Every runner's decisions are
checked against the simulated budgeted evaluation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile

import numpy as np

from msdfuse_jax import exporting, inference, serving
from msdfuse_jax.data import augment
from msdfuse_jax.evaluation import budget, evaluate
from msdfuse_jax.tools import flags_util


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--p", default="5,20,35")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--baseline", default=None)
  parser.add_argument("--export", default=None)
  parser.add_argument("--json", default=None, help="write the figures here too")
  args = parser.parse_args()
  flags_util.enable_compilation_cache()
  ps = [int(p) for p in args.p.split(",")]
  b, repeats = args.batch_size, args.repeats

  config, model, variables, _, data = evaluate.load_run(args.workdir, dtype="float32")
  fit = inference.fit_budget(config, model, variables, data, ps[0], None, b)
  mean, std = np.asarray(data.mean), np.asarray(data.std)
  preprocess = lambda images: augment.eval_batch(images, mean, std)
  test = np.asarray(data.test_images)
  n, k_max = len(test), model.num_exits

  export_dir = args.export or tempfile.mkdtemp(prefix="msdfuse_export_")
  exporting.export_run(args.workdir, export_dir, p=ps[0], batch_size=b)
  runners = {"in-process": inference.EarlyExitRunner(model, variables, preprocess, batch_size=b),
             "exported": serving.Runner.from_dir(export_dir)}
  if args.baseline:
    spec = importlib.util.spec_from_file_location("baseline_inference", args.baseline)
    baseline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = baseline  # dataclasses look their module up
    spec.loader.exec_module(baseline)
    runners = {"baseline": baseline.EarlyExitRunner(model, variables, preprocess, batch_size=b), **runners}
  for runner in runners.values():
    runner.warmup(test)
  every_exit, _ = inference.full_network_fns(model, preprocess)
  t_full = inference.time_batches(every_exit, variables, test, b, repeats)
  per_image = {name: np.array([t[k][b] / b for k in range(1, k_max + 1)])
               for name, runner in runners.items() if name != "baseline"
               for t in [runner.stage_seconds(test, repeats)]}
  print(f"{config.model.name}: full network {n / t_full:.1f} images/s at batch {b}")
  for name, times in per_image.items():
    print(f"  {name} stage ms per image: {', '.join(f'{1e3 * t:.3f}' for t in times)}")

  rows = []
  for p in ps:
    thresholds = budget.fit_thresholds(fit["val_probs"], p)
    sim_exits, sim_preds = budget.apply_thresholds(fit["test_probs"], thresholds)
    counts = np.bincount(sim_exits, minlength=k_max)
    reaching = n - np.concatenate([[0], np.cumsum(counts)[:-1]])
    predicted = fit["exit_costs"][-1] / float(np.dot(counts / n, fit["exit_costs"]))
    row = {"p": p, "exit_counts": counts.tolist(), "reaching_stage": reaching.tolist(),
           "predicted_speedup": predicted, "full_network_images_per_s": n / t_full}
    for name, runner in runners.items():
      result = min((runner.run(test, thresholds) for _ in range(repeats)), key=lambda r: r.seconds)
      exact = bool(np.array_equal(result.exits, sim_exits + 1) and np.array_equal(result.predictions, sim_preds))
      realised = t_full / result.seconds
      figures = {"speedup": realised, "realised_over_predicted": realised / predicted, "exact": exact}
      if name in per_image:
        ideal = t_full / float(reaching @ per_image[name])
        figures.update(time_ideal_speedup=ideal, realised_over_time_ideal=realised / ideal,
                       time_ideal_over_predicted=ideal / predicted)
      row[name] = figures
    rows.append(row)
    line = " | ".join(
        f"{name} {f['speedup']:.2f}x ({f['realised_over_predicted']:.2f} of predicted"
        + (f", {f['realised_over_time_ideal']:.2f} of time-ideal {f['time_ideal_speedup']:.2f}x" if
           "time_ideal_speedup" in f else "") + f"{'' if f['exact'] else ', NOT EXACT'})"
        for name, f in ((name, row[name]) for name in runners))
    print(f"p={p} exits {counts.tolist()} predicted {predicted:.2f}x: {line}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"model": config.model.name, "batch_size": b,
                 "stage_ms_per_image": {k: (1e3 * v).tolist() for k, v in per_image.items()}, "rows": rows},
                f, indent=2)


if __name__ == "__main__":
  main()
