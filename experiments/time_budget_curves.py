"""Thresholds fitted to a time budget against thresholds fitted to an ops budget, on one trained run: the
figures of docs/early_exit.md ("Time budgets").

  python experiments/time_budget_curves.py WORKDIR --out=POINTS_DIR [--fractions=0.4,0.5,...,1.0]
      [--batch_size=256] [--repeats=3]
  msdfuse-plot --time POINTS_DIR [POINTS_DIR_2 ...] --out time.png

In one process and one sitting, what ``msdfuse-infer --budget_ms=T`` and ``msdfuse-infer --budget=B`` do for
many budgets without reloading and recompiling each time: the in-process early-exit runner
(`msdfuse_jax.inference.EarlyExitRunner`, batch B) is built once; for every fraction f and each kind of fit,
within a few seconds: the full network (every exit) is timed, the stages are timed (`serving.Runner.measure`,
as every msdfuse-infer run times them before its fit), the thresholds are fitted, to T = f x the full
network's measured ms per image (`timebudget.fit_time_budget`, for the test set's size) or to B = f x the
full network's literature cost (`timebudget.fit_ops_budget`, what ``--budget`` chooses), and they classify
the whole test set (best of `--repeats`, warm). Every point is written as an infer.json-like file
(``budget_ms`` or ``cost_budget``, ``predicted_ms_per_image``, ``realised_ms_per_image``, ``accuracy``, ...)
into POINTS_DIR, and a markdown table is printed, with the time-fitted points set beside the ops-fitted curve
at equal realised time (`msdfuse_jax.evaluation.time_report.compare_at_equal_time`).
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from msdfuse_jax import inference, rundir, timebudget
from msdfuse_jax.data import augment
from msdfuse_jax.evaluation import budget, evaluate, time_report
from msdfuse_jax.tools import flags_util


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("workdir")
  parser.add_argument("--out", required=True, help="folder of the points' JSON files")
  parser.add_argument("--fractions", default="0.4,0.5,0.6,0.7,0.8,0.9,1.0")
  parser.add_argument("--batch_size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  flags_util.enable_compilation_cache()
  fractions = [float(f) for f in args.fractions.split(",")]
  b, repeats = args.batch_size, args.repeats

  config, model, variables, step, data = evaluate.load_run(args.workdir)
  fit = inference.fit_budget(config, model, variables, data, 1, None, b)  # probabilities, costs
  conf, correct = fit["val_confidence"], fit["val_correct"]
  exit_costs = fit["exit_costs"]
  mean, std = np.asarray(data.mean), np.asarray(data.std)
  test = np.asarray(data.test_images)
  n = len(test)
  preprocess = lambda x: augment.eval_batch(x, mean, std)
  runner = inference.EarlyExitRunner(model, variables, preprocess, batch_size=b)
  every_exit, _ = inference.full_network_fns(model, preprocess)

  os.makedirs(args.out, exist_ok=True)
  points = []
  for f in fractions:
    for kind in ("time budget", "ops budget"):
      # For every point, within a few seconds: the full network (the budget's unit), the stages (as each
      # msdfuse-infer run times them before its fit), then the fitted thresholds' runs, so that all three
      # see about the same load on a shared machine.
      with jax.default_matmul_precision(inference.TIMING_PRECISION):
        full_ms = 1e3 * inference.time_batches(every_exit, variables, test, b, repeats) / n
        runner.measure(test, repeats)
      table = runner.stage_times
      print(f"f={f:.2f}, {kind}: full network {full_ms:.3f} ms per image; stages at batch {b}: "
            f"{', '.join(f'{t:.3f}' for t in table.to_json()['ms_per_image_at_batch_size'])}; first stage "
            f"alone {timebudget.first_stage_ms(table, n):.3f} (on {table.device})", flush=True)
      try:
        if kind == "time budget":
          chosen = timebudget.fit_time_budget(conf, correct, table, f * full_ms, n)
        else:
          chosen = timebudget.fit_ops_budget(conf, exit_costs, f * exit_costs[-1])
      except ValueError as e:
        print(f"f={f:.2f}, {kind}: {e}")
        continue
      thresholds = chosen["thresholds"]
      with jax.default_matmul_precision(inference.TIMING_PRECISION):
        result = min((runner.run(test, thresholds) for _ in range(repeats)), key=lambda r: r.seconds)
      exits = budget.exits_from_confidence(conf, thresholds)
      reaching = timebudget.reaching_fractions(exits, model.num_exits)
      counts = np.bincount(result.exits - 1, minlength=model.num_exits)
      point = {
          "workdir": args.workdir, "model": config.model.name, "dataset": config.dataset, "step": step,
          "fraction": f, "p": int(chosen["p"]), "thresholds": [float(t) for t in thresholds],
          "budget_ms": f * full_ms if kind == "time budget" else None,
          "cost_budget": f * exit_costs[-1] if kind == "ops budget" else None,
          "predicted_ms_per_image": 1e3 * timebudget.predicted_seconds_per_image(reaching, table, n),
          "realised_ms_per_image": 1e3 * result.seconds / n, "full_network_ms_per_image": full_ms,
          "accuracy": float(100.0 * np.mean(result.predictions == data.test_labels)),
          "expected_cost": float(np.dot(counts / n, exit_costs)), "full_cost": exit_costs[-1],
          "exit_counts": counts.tolist(), "num_images": n, "batch_size": b, "stage_times": table.to_json(),
      }
      name = f"{config.model.name}_{kind.split()[0]}_{f:.2f}.json"
      rundir.write_json(os.path.join(args.out, name), point)
      points.append({**point, "label": config.model.name, "kind": kind})

  print("\n| f | fit | p | budget | predicted ms | realised ms | realised / full | accuracy |")
  print("|---|---|---|---|---|---|---|---|")
  for p in sorted(points, key=lambda p: (p["fraction"], p["kind"])):
    target = (f"{p['budget_ms']:.3f} ms" if p["kind"] == "time budget" else f"{p['cost_budget']:.3g} ops")
    print(f"| {p['fraction']:.2f} | {p['kind']} | {p['p']} | {target} | {p['predicted_ms_per_image']:.3f} | "
          f"{p['realised_ms_per_image']:.3f} | "
          f"{p['realised_ms_per_image'] / p['full_network_ms_per_image']:.2f} | "
          f"{p['accuracy']:.2f} |")
  print("\n| budget ms | p | realised ms | realised / budget | accuracy | ops-fitted accuracy at equal "
        "time |")
  print("|---|---|---|---|---|---|")
  for row in time_report.compare_at_equal_time(points):
    at = "outside its range" if row["ops_accuracy_at_equal_time"] is None else \
        f"{row['ops_accuracy_at_equal_time']:.2f}"
    print(f"| {row['budget_ms']:.3f} | {row['p']} | {row['realised_ms_per_image']:.3f} | "
          f"{row['realised_over_budget']:.2f} | {row['accuracy']:.2f} | {at} |")


if __name__ == "__main__":
  main()
