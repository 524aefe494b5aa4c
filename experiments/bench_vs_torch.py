"""Training and eval throughput of MSDNet-PyTorch's own model against `msdfuse-bench`, side by side.

  python experiments/bench_vs_torch.py --reference_dir=/path/to/MSDNet-PyTorch [--rounds=3] [--json=FILE]

Needs torch (`pip install torch`, the CPU build is enough) and a checkout of kalviny/MSDNet-PyTorch, whose
``models/msdnet.py`` is imported from ``--reference_dir`` (nothing of it is copied here). Without either the
script prints one line saying what is missing and exits with status 3.

Model: ``msdnet_anytime7`` on CIFAR-100 (MSDNet-PyTorch's README anytime command: 7 blocks, even, step 2, base
4, 16 channels, growth 6, factors 1-2-4 / 1-2-4, bottleneck, prune max, reduction 0.5). Each round times, one
after the other in this process's CPU set:

* PyTorch: ``model.train()``, SGD (momentum 0.9, weight decay 1e-4, as MSDNet-PyTorch's main.py builds it)
  on the sum of the exits' cross-entropies, ``--batch_size`` random images a step, ``--steps`` timed steps
  after one untimed; then ``model.eval()`` under ``torch.no_grad()``, ``--eval_steps`` timed batches of
  ``--eval_batch_size``;
* JAX: ``msdfuse-bench`` with the same batch sizes and step counts (its train step also draws the crop, flip
  and Mixup/CutMix on the device, which the PyTorch step does not have; its images are random too).

Both run on the same ``--threads`` CPUs: the script pins itself (and so the msdfuse-bench subprocess) to the
first ``--threads`` CPUs it may use, and sets ``torch.set_num_threads(threads)``. Rounds alternate the two,
so that a change of the machine's load touches both; the ratios (jax / torch, above 1: JAX faster) are given
per round and as the median, with the load average (``os.getloadavg``) before and after each side, and
so are the CPU seconds per image (torch / jax, above 1: JAX needs less CPU), a figure that other work on
the machine moves less than wall-clock time.
msdfuse-bench runs with ``--compilation_cache`` so that rounds after the first spend no time compiling (its
compile time is not compared). It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import types

REPO = pathlib.Path(__file__).resolve().parents[1]
MISSING_STATUS = 3  # torch or the reference checkout is missing: nothing was measured

# MSDNet-PyTorch's arguments for the `msdnet_anytime7` preset on CIFAR-100 (its README's anytime command).
TORCH_ARGS = dict(nBlocks=7, stepmode="even", step=2, base=4, nChannels=16, growthRate=6, grFactor="1-2-4",
                  bnFactor="1-2-4", prune="max", reduction=0.5, bottleneck=True, data="cifar100")
NUM_CLASSES = 100
PRESET = "msdnet_anytime7"


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--reference_dir", required=True, help="a checkout of kalviny/MSDNet-PyTorch")
  p.add_argument("--threads", type=int, default=2, help="CPUs (and threads) each side runs on")
  p.add_argument("--rounds", type=int, default=3, help="alternating PyTorch / JAX rounds")
  p.add_argument("--batch_size", type=int, default=64, help="training batch")
  p.add_argument("--eval_batch_size", type=int, default=256, help="eval batch")
  p.add_argument("--steps", type=int, default=10, help="timed training steps per round")
  p.add_argument("--eval_steps", type=int, default=5, help="timed eval batches per round")
  p.add_argument("--json", default=None, help="also write the figures here")
  return p.parse_args()


def missing(message: str) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(MISSING_STATUS)


def reference_msdnet_class(reference_dir: str):
  """MSDNet-PyTorch's MSDNet class, imported from the checkout (its models/__init__.py rebinds names)."""
  path = pathlib.Path(reference_dir)
  if not (path / "models" / "msdnet.py").is_file():
    missing(f"{path / 'models' / 'msdnet.py'} not found: --reference_dir must be a checkout of "
            "kalviny/MSDNet-PyTorch (git clone https://github.com/kalviny/MSDNet-PyTorch)")
  sys.path.insert(0, str(path.resolve()))
  return importlib.import_module("models.msdnet").MSDNet


def torch_namespace() -> types.SimpleNamespace:
  """The argparse namespace MSDNet's constructor reads, with the factors parsed as its main.py does."""
  ns = types.SimpleNamespace(**TORCH_ARGS)
  ns.grFactor = [int(v) for v in TORCH_ARGS["grFactor"].split("-")]
  ns.bnFactor = [int(v) for v in TORCH_ARGS["bnFactor"].split("-")]
  ns.nScales = len(ns.grFactor)
  return ns


def load() -> list[float]:
  return [round(v, 2) for v in os.getloadavg()]


def time_torch(torch, model, args: argparse.Namespace) -> dict:
  """images/s of the reference's training step and eval forward pass on random images."""
  gen = torch.Generator().manual_seed(0)
  criterion = torch.nn.CrossEntropyLoss()
  optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)

  def train_step(i):
    images = torch.rand(args.batch_size, 3, 32, 32, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (args.batch_size,), generator=gen)
    outputs = model(images)
    loss = sum(criterion(out, labels) for out in outputs)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.detach()

  model.train()
  train_step(-1)  # untimed: first-call allocations
  t0, c0 = time.perf_counter(), time.process_time()
  for i in range(args.steps):
    train_step(i)
  train_s, train_cpu_s = time.perf_counter() - t0, time.process_time() - c0

  model.eval()
  batches = [torch.rand(args.eval_batch_size, 3, 32, 32, generator=gen) for _ in range(args.eval_steps + 1)]
  with torch.no_grad():
    model(batches[0])  # untimed
    t0, c0 = time.perf_counter(), time.process_time()
    for images in batches[1:]:
      outputs = model(images)
      float(outputs[-1].sum())
    eval_s, eval_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  return {"train_images_per_s": args.batch_size * args.steps / train_s,
          "eval_images_per_s": args.eval_batch_size * args.eval_steps / eval_s,
          "train_cpu_s_per_image": train_cpu_s / (args.batch_size * args.steps),
          "eval_cpu_s_per_image": eval_cpu_s / (args.eval_batch_size * args.eval_steps)}


def time_jax(args: argparse.Namespace, json_path: str) -> dict:
  """msdfuse-bench's figures (a subprocess of this pinned process: the same CPUs)."""
  command = [sys.executable, "-m", "msdfuse_jax.tools.bench_main",
             f"--config={REPO / 'configs' / 'cifar.py'}:dataset=cifar100,model={PRESET}",
             f"--batch_size={args.batch_size}", f"--eval_batch_size={args.eval_batch_size}",
             f"--steps={args.steps}", f"--eval_steps={args.eval_steps}", "--compilation_cache",
             f"--json={json_path}"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    sys.exit(f"error: msdfuse-bench failed (status {done.returncode}):\n{done.stderr[-2000:]}")
  with open(json_path) as f:
    report = json.load(f)
  return {"train_images_per_s": report["train_images_per_s"], "eval_images_per_s": report["eval_images_per_s"],
          "train_cpu_s_per_image": report["train_cpu_s_per_step"] / args.batch_size,
          "eval_cpu_s_per_image": report["eval_cpu_s_per_step"] / args.eval_batch_size}


def main() -> None:
  args = parse_args()
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    missing("torch is not installed: pip install torch (the CPU build is enough), then run this again")
  msdnet_cls = reference_msdnet_class(args.reference_dir)

  cpus = sorted(os.sched_getaffinity(0))
  if len(cpus) < args.threads:
    sys.exit(f"error: --threads={args.threads} but this process may use only {len(cpus)} CPUs")
  os.sched_setaffinity(0, cpus[:args.threads])
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  with contextlib.redirect_stdout(io.StringIO()):  # the reference prints its layer plan
    model = msdnet_cls(torch_namespace())

  rounds = []
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      row = {"round": r + 1, "load_before_torch": load()}
      row["torch"] = time_torch(torch, model, args)
      row["load_before_jax"] = load()
      row["jax"] = time_jax(args, os.path.join(tmp, f"bench{r}.json"))
      row["load_after"] = load()
      row["ratio_train"] = row["jax"]["train_images_per_s"] / row["torch"]["train_images_per_s"]
      row["ratio_eval"] = row["jax"]["eval_images_per_s"] / row["torch"]["eval_images_per_s"]
      # CPU seconds per image, torch over jax (above 1: JAX needs less CPU): less sensitive to other work on
      # the machine than wall-clock time, though a runtime's threads that spin while waiting count in it.
      for part in ("train", "eval"):
        row[f"cpu_ratio_{part}"] = (row["torch"][f"{part}_cpu_s_per_image"] /
                                    row["jax"][f"{part}_cpu_s_per_image"])
      rounds.append(row)
      print(f"round {r + 1}: train {row['jax']['train_images_per_s']:.1f} vs "
            f"{row['torch']['train_images_per_s']:.1f} images/s (jax/torch {row['ratio_train']:.2f}), "
            f"eval {row['jax']['eval_images_per_s']:.1f} vs {row['torch']['eval_images_per_s']:.1f} "
            f"({row['ratio_eval']:.2f}); CPU time per image torch/jax: train {row['cpu_ratio_train']:.2f}, "
            f"eval {row['cpu_ratio_eval']:.2f}; load average (1, 5, 15 min) {row['load_before_torch']} "
            f"before, {row['load_after']} after", flush=True)

  summary = {
      "model": PRESET, "dataset": "cifar100", "threads": args.threads, "cpus": cpus[:args.threads],
      "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size, "steps": args.steps,
      "eval_steps": args.eval_steps, "torch_version": torch.__version__,
      "median_ratio_train": statistics.median(r["ratio_train"] for r in rounds),
      "median_ratio_eval": statistics.median(r["ratio_eval"] for r in rounds),
      "median_cpu_ratio_train": statistics.median(r["cpu_ratio_train"] for r in rounds),
      "median_cpu_ratio_eval": statistics.median(r["cpu_ratio_eval"] for r in rounds), "rounds": rounds}
  print(f"median jax/torch over {args.rounds} rounds: training {summary['median_ratio_train']:.2f}x, "
        f"eval {summary['median_ratio_eval']:.2f}x ({args.threads} threads, torch {torch.__version__}); CPU "
        f"time per image torch/jax: training {summary['median_cpu_ratio_train']:.2f}, eval "
        f"{summary['median_cpu_ratio_eval']:.2f}")
  busiest = max(max(r["load_before_torch"][0], r["load_before_jax"][0], r["load_after"][0]) for r in rounds)
  summary["busiest_load"] = busiest
  if busiest > os.cpu_count():
    # Both runtimes spin their worker threads between parallel regions; on an oversubscribed machine that
    # costs each a different, load-dependent amount, so the ratio then says more about the load.
    print(f"warning: the 1-minute load average reached {busiest} on {os.cpu_count()} CPUs: the two sides "
          "competed with other work, so these ratios are not the frameworks' alone; run again on a quiet "
          "machine", file=sys.stderr)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summary, f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
