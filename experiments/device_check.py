"""One command for an accelerator: what this package does on whatever device is present, in 8 minutes.

  python3 experiments/device_check.py --out=DIR            # on a GPU machine or a TPU VM
  python3 experiments/device_check.py --out=DIR --smoke    # the same parts on the CPU, tiny, < 3 minutes

Parts, in this order, each a separate process with its own time budget (the whole run stays within
`--budget_s`, 480 s by default), each failing soft: a part that fails or runs out of time records its error
and the check goes on.

  device  the backend, its devices (kind, count, memory), jax / jaxlib versions
  bench   msdfuse-bench of msdnet_anytime7 and msdfuse (CIFAR-100) at batch 512, float32 and bfloat16
  train   300 training steps of msdfuse on CIFAR-shaped random images (msdfuse-bench --steps=300):
          images/s and the step-time spread (min, median, p90, max)
  costs   msdfuse-costs --json of msdfuse: XLA's flops per exit as this backend compiles them
  infer   a tiny run (msdnet_tiny, 6 steps on a written CIFAR-shaped folder), then msdfuse-infer on it
          under JAX_TRANSFER_GUARD=disallow: early exit against the full network, and the simulation check;
          then msdfuse-infer --budget_ms (0.9 of the full network's time just measured) with
          --deadline_ms (half the full network's time on one batch) and a 4-deadline sweep
  tests   the fast test tier on the device: pytest -m "not slow and not cpu_exact"

Writes DIR/device_check.json (keys device, bench, train, costs, infer, tests, plus settings) and
DIR/device_check.md (the same as tables), and each part's log in DIR/logs/. This process never touches
the accelerator itself (the parts would find its memory taken).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import pickle
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from typing import Any, Callable

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "cifar.py"

# Settings per mode: the full check on the accelerator, and the smoke run on the CPU. `budgets` are each
# run's planned seconds (bench: each of its 4 runs; infer: its 3 runs together), in proportion to which the
# whole budget is shared out (480 s and 175 s by default; the fast test tier takes what is left).
FULL = dict(bench_models=("msdnet_anytime7", "msdfuse"), bench_batch=512, bench_steps=10,
            train_model="msdfuse", train_steps=300, costs_model="msdfuse", infer_batch=64,
            tests=["tests"], budgets={"device": 20, "bench": 45, "train": 60, "costs": 40, "infer": 60,
                                      "tests": 120})
SMOKE = dict(bench_models=("msdnet_tiny", "msdfuse_tiny"), bench_batch=4, bench_steps=2,
             train_model="msdfuse_tiny", train_steps=5, costs_model="msdfuse_tiny", infer_batch=32,
             tests=["tests/test_inference.py::test_bucket_sizes",
                    "tests/test_inference.py::test_wrong_number_of_thresholds"],
             budgets={"device": 8, "bench": 19, "train": 15, "costs": 12, "infer": 50, "tests": 12})
DTYPES = ("float32", "bfloat16")
TEST_TIER = "not slow and not cpu_exact"


class PartError(RuntimeError):
  """A part that did not produce its figures (the message is what the JSON records)."""


class Check:
  """Runs the parts within one deadline and keeps what each produced or why it did not."""

  def __init__(self, out: pathlib.Path, smoke: bool, budget_s: float):
    self.out, self.smoke = out, smoke
    self.settings = SMOKE if smoke else FULL
    self.deadline = time.monotonic() + budget_s
    # The budgets of the runs not yet started: a run gets at most its share of the time that is left,
    # so a slow part cannot take the later parts' time.
    budgets = self.settings["budgets"]
    self.pending = [("device", budgets["device"])]
    self.pending += [("bench", budgets["bench"])] * (len(self.settings["bench_models"]) * len(DTYPES))
    self.pending += [(name, budgets[name]) for name in ("train", "costs")]
    self.pending += [("infer", budgets["infer"] / 3)] * 3 + [("tests", budgets["tests"])]
    (out / "logs").mkdir(parents=True, exist_ok=True)
    self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                           os.environ.get("PYTHONPATH")]))}
    if smoke:
      # The test suite's CPU settings: XLA's -O0 (tiny programs compile faster than they run) and the
      # persistent compilation cache, which the parts then share.
      self.env["JAX_PLATFORMS"] = "cpu"
      if "xla_backend_optimization_level" not in self.env.get("XLA_FLAGS", ""):
        self.env["XLA_FLAGS"] = f"{self.env.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    self.tool_flags = ["--compilation_cache", "--notuned_cpu_flags"] if smoke else []
    # Parts run one after another, each with the device to itself; no part may take all of its memory at
    # start-up while pytest-xdist workers share it.
    self.env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

  def remaining(self) -> float:
    return self.deadline - time.monotonic()

  def run(self, name: str, args: list[str], env: dict | None = None) -> str:
    """Runs `python args...` from the repository with at most its share of what is left of the deadline
    (its planned seconds over those of every run not yet started); returns its stdout. PartError when it
    fails or runs out of time."""
    unit = name.split("_")[0]
    planned = next((b for u, b in self.pending if u == unit), None)
    if planned is not None:
      self.pending.remove((unit, planned))
    later = sum(b for _, b in self.pending)
    # An unplanned run (or the last one) may take all that is left.
    timeout = (self.remaining() - 5) * (1.0 if planned is None else planned / (planned + later))
    if timeout < 5:
      raise PartError(f"skipped: {max(self.remaining(), 0):.0f} s of the check's budget left")
    log = self.out / "logs" / f"{name}.log"
    try:
      done = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO,
                            timeout=timeout, env={**self.env, **(env or {})})
    except subprocess.TimeoutExpired as e:
      log.write_text(_text(e.stdout) + _text(e.stderr))
      raise PartError(f"ran past its {timeout:.0f} s budget (log: {log})") from None
    log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
      lines = [l for l in done.stderr.strip().splitlines() if l.strip()] or ["(no output)"]
      raise PartError(f"exit status {done.returncode}: {lines[-1][:300]} (log: {log})")
    return done.stdout

  def part(self, name: str, fn: Callable[[], Any]) -> dict[str, Any]:
    """`fn`'s result with its wall time, or its error: a failing part does not stop the check."""
    start = time.monotonic()
    try:
      result = {"ok": True, "result": fn()}
    except Exception as e:  # pylint: disable=broad-except  (fail soft: record it, go on)
      result = {"ok": False, "error": str(e) if isinstance(e, PartError) else f"{type(e).__name__}: {e}"}
    result["seconds"] = round(time.monotonic() - start, 1)
    print(f"[device_check] {name}: {'ok' if result['ok'] else result['error']} ({result['seconds']} s)",
          flush=True)
    return result


def _text(data: Any) -> str:
  return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


DEVICE_CODE = """
import json, jax, jaxlib
devices = jax.devices()
def memory(d):
  stats = d.memory_stats() or {}
  return stats.get("bytes_limit")
print(json.dumps({"backend": jax.default_backend(), "count": len(devices),
                  "kind": devices[0].device_kind, "platform": devices[0].platform,
                  "memory_bytes": memory(devices[0]), "jax": jax.__version__,
                  "jaxlib": jaxlib.__version__, "process_count": jax.process_count()}))
"""


def device(check: Check) -> dict[str, Any]:
  out = check.run("device", ["-c", DEVICE_CODE])
  info = json.loads(out.strip().splitlines()[-1])
  info.update(python=platform.python_version(), host=platform.node(), cpu_count=os.cpu_count())
  return info


def _bench(check: Check, name: str, model: str, dtype: str, batch: int, steps: int,
           eval_batch: int | None = None) -> dict[str, Any]:
  path = check.out / "logs" / f"{name}.json"
  check.run(name, ["-m", "msdfuse_jax.tools.bench_main",
                   f"--config={CONFIG}:dataset=cifar100,model={model}", f"--config.model.dtype={dtype}",
                   f"--batch_size={batch}", f"--eval_batch_size={eval_batch or batch}", f"--steps={steps}",
                   "--eval_steps=5" if not check.smoke else "--eval_steps=1", f"--json={path}",
                   *check.tool_flags])
  return json.loads(path.read_text())


BENCH_KEYS = ("model", "dtype", "batch_size", "train_images_per_s", "train_step_ms_spread",
              "eval_images_per_s", "compile_s", "eval_compile_s", "peak_memory_mb", "peak_memory_source")


def bench(check: Check) -> dict[str, Any]:
  """One entry per model and dtype (its figures or its error)."""
  s = check.settings
  runs = {}
  for model in s["bench_models"]:
    for dtype in DTYPES:
      key = f"{model}/{dtype}"
      runs[key] = check.part(f"bench {key}", lambda m=model, d=dtype: {
          k: v for k, v in _bench(check, f"bench_{m}_{d}", m, d, s["bench_batch"],
                                  s["bench_steps"]).items() if k in BENCH_KEYS})
  if not any(r["ok"] for r in runs.values()):
    raise PartError("every benchmark failed: " + "; ".join(f"{k}: {r['error']}" for k, r in runs.items()))
  return runs


def train(check: Check) -> dict[str, Any]:
  s = check.settings
  report = _bench(check, "train", s["train_model"], "float32", 512 if not check.smoke else 4,
                  s["train_steps"], eval_batch=64 if not check.smoke else 4)
  return {"model": report["model"], "dataset": report["dataset"], "steps": s["train_steps"],
          "batch_size": report["batch_size"], "images_per_s": report["train_images_per_s"],
          "step_ms_spread": report["train_step_ms_spread"], "compile_s": report["compile_s"],
          "peak_memory_mb": report["peak_memory_mb"]}


def costs(check: Check) -> dict[str, Any]:
  path = check.out / "logs" / "costs.json"
  check.run("costs", ["-m", "msdfuse_jax.tools.costs_main",
                      f"--config={CONFIG}:dataset=cifar100,model={check.settings['costs_model']}",
                      f"--json={path}"])
  report = json.loads(path.read_text())
  return {"model": report["model"], "dataset": report["dataset"], "backend": report.get("backend"),
          "exits": [{k: e.get(k) for k in ("exit", "op_counter", "macs", "xla_flops")}
                    for e in report["exits"]]}


def write_cifar_folder(path: pathlib.Path, per_batch: int = 200, seed: int = 0) -> pathlib.Path:
  """A CIFAR-10 python-version folder of random images (5 training pickles and the test pickle)."""
  rng = np.random.default_rng(seed)
  path.mkdir(parents=True, exist_ok=True)
  for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
    entry = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, per_batch).tolist()}
    (path / name).write_bytes(pickle.dumps(entry))
  return path


INFER_KEYS = ("p", "num_images", "batch_size", "exit_counts", "early_exit_images_per_s",
              "full_network_images_per_s", "last_exit_images_per_s", "speedup_vs_full", "predicted_speedup",
              "realised_over_predicted", "matches_simulation", "simulation", "matmul_precision")
BUDGET_MS_KEYS = ("budget_ms", "p", "predicted_ms_per_image", "realised_ms_per_image", "full_network_ms_per_image",
                  "accuracy", "matches_simulation")
# The infer part's time budget, as a fraction of the full network's ms per image just measured, and its
# deadline, as a fraction of the full network's time on one batch.
BUDGET_FRACTION, DEADLINE_FRACTION = 0.9, 0.5
DEADLINE_KEYS = ("deadline_ms", "deadline_met_fraction", "worst_overshoot_ms", "deadline_accuracy",
                 "deadline_chunk_size", "deadline_sweep_range_ms", "deadline_sweep_min_met_fraction")


def infer(check: Check) -> dict[str, Any]:
  data = write_cifar_folder(check.out / "work" / "cifar10_random")
  run = check.out / "work" / "tiny_run"
  check.run("infer_train", ["-m", "msdfuse_jax.tools.train_main",
                            f"--config={CONFIG}:dataset=cifar10,model=msdnet_tiny,runlocal", f"--workdir={run}",
                            "--config.data.source=archive", f"--config.data.path={data}",
                            "--config.train.num_steps=6", "--config.train.eval_every_steps=6",
                            "--config.train.checkpoint_every_steps=6",
                            *(["--notuned_cpu_flags"] if check.smoke else [])])
  check.run("infer", ["-m", "msdfuse_jax.tools.infer_main", f"--workdir={run}", "--p=8",
                      f"--batch_size={check.settings['infer_batch']}", "--repeats=1"],
            env={"JAX_TRANSFER_GUARD": "disallow"})
  report = json.loads((run / "eval" / "infer.json").read_text())
  result = {"transfer_guard": "disallow", **{k: report[k] for k in INFER_KEYS}}
  # With a short sweep of deadlines from the first stage's time to the full network's.
  full_ms = 1e3 / report["full_network_images_per_s"]
  budget_ms = BUDGET_FRACTION * full_ms
  deadline_ms = DEADLINE_FRACTION * full_ms * check.settings["infer_batch"]
  check.run("infer_ms", ["-m", "msdfuse_jax.tools.infer_main", f"--workdir={run}", f"--budget_ms={budget_ms:.6f}",
                         f"--batch_size={check.settings['infer_batch']}", "--repeats=3",
                         f"--deadline_ms={deadline_ms:.6f}", "--deadline_sweep=4"],
            env={"JAX_TRANSFER_GUARD": "disallow"})
  timed = json.loads((run / "eval" / "infer.json").read_text())
  result["budget_ms"] = {k: timed[k] for k in BUDGET_MS_KEYS}
  result["deadline"] = {k: timed[k] for k in DEADLINE_KEYS}
  return result


def tests(check: Check) -> dict[str, Any]:
  xml = check.out / "logs" / "tests.xml"
  args = ["-m", "pytest", *check.settings["tests"], "-m", TEST_TIER, "-q", "-p", "no:cacheprovider",
          f"--junitxml={xml}"]
  workers = 1 if check.smoke else max(1, min(4, (os.cpu_count() or 1) // 4))
  if workers > 1:
    args += ["-n", str(workers)]
  error = None
  try:
    check.run("tests", args)
  except PartError as e:  # failures are the figures of this part: read them from the XML if it exists
    error = str(e)
  if not xml.exists():
    raise PartError(error or "pytest wrote no report")
  suite = ElementTree.parse(xml).getroot()
  suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
  failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None]
  counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
  return {"selection": TEST_TIER, "paths": check.settings["tests"], "workers": workers, **counts,
          "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
          "seconds": float(suite.get("time", 0)), "failed": failed[:30], "error": error}


PARTS = (("device", device), ("bench", bench), ("train", train), ("costs", costs), ("infer", infer),
         ("tests", tests))


def _fmt(value: Any, spec: str = ",.1f") -> str:
  return "n/a" if value is None else format(value, spec)


def markdown(report: dict[str, Any]) -> str:
  """device_check.json as tables."""
  lines = ["# Device check", ""]
  dev = report["device"]
  if dev["ok"]:
    d = dev["result"]
    memory = f", {d['memory_bytes'] / 2**30:.0f} GiB" if d.get("memory_bytes") else ""
    lines.append(f"{d['count']} x {d['kind']} ({d['backend']}{memory}); jax {d['jax']}, jaxlib {d['jaxlib']}, "
                 f"Python {d['python']}, {d['cpu_count']} CPUs. {'Smoke run (CPU, tiny settings).' if report['smoke'] else ''}")
  else:
    lines.append(f"device: {dev['error']}")
  lines += ["", f"Commit {report['commit']}, {report['date']}, {report['seconds']:.0f} s in all (budget "
            f"{report['budget_s']:.0f} s); host load average {report['load_average']:.2f} at the end.", "",
            "## msdfuse-bench (CIFAR-100)", "",
            "| model | dtype | batch | train images/s | step ms median / p90 | eval images/s | compile s | peak MB |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
  if report["bench"]["ok"]:
    for key, run in report["bench"]["result"].items():
      model, dtype = key.split("/")
      if not run["ok"]:
        lines.append(f"| {model} | {dtype} | | failed: {run['error']} | | | | |")
        continue
      r = run["result"]
      spread = r["train_step_ms_spread"]
      lines.append(f"| {model} | {dtype} | {r['batch_size']} | {_fmt(r['train_images_per_s'])} | "
                   f"{spread['median']:.1f} / {spread['p90']:.1f} | {_fmt(r['eval_images_per_s'])} | "
                   f"{r['compile_s']:.1f} | {r['peak_memory_mb']:,.0f} ({r['peak_memory_source']}) |")
  else:
    lines.append(f"failed: {report['bench']['error']}")
  lines += ["", "## Training", ""]
  if report["train"]["ok"]:
    t = report["train"]["result"]
    s = t["step_ms_spread"]
    lines.append(f"{t['model']}, {t['steps']} steps at batch {t['batch_size']} on CIFAR-shaped random images: "
                 f"{t['images_per_s']:,.1f} images/s; step time min {s['min']:.1f} ms, median {s['median']:.1f}, "
                 f"p90 {s['p90']:.1f}, max {s['max']:.1f}; compile {t['compile_s']:.1f} s.")
  else:
    lines.append(f"failed: {report['train']['error']}")
  lines += ["", "## XLA flops per exit (msdfuse-costs)", ""]
  if report["costs"]["ok"]:
    c = report["costs"]["result"]
    lines += [f"{c['model']} on {c['dataset']}, backend {c['backend']}:", "",
              "| exit | op_counter | MACs | XLA flops |", "|---:|---:|---:|---:|"]
    lines += [f"| {e['exit']} | {e['op_counter']:,} | {e['macs']:,} | {_fmt(e['xla_flops'], ',.0f')} |"
              for e in c["exits"]]
  else:
    lines.append(f"failed: {report['costs']['error']}")
  lines += ["", "## msdfuse-infer (tiny run, JAX_TRANSFER_GUARD=disallow)", ""]
  if report["infer"]["ok"]:
    i = report["infer"]["result"]
    lines.append(f"p={i['p']}, {i['num_images']} images at batch {i['batch_size']}, exits {i['exit_counts']}: "
                 f"early exit {i['early_exit_images_per_s']:,.1f} images/s, full network "
                 f"{i['full_network_images_per_s']:,.1f}; speedup {i['speedup_vs_full']:.2f}x (predicted "
                 f"{i['predicted_speedup']:.2f}x); equal to the simulation ({i['simulation']}, matmul precision "
                 f"{i['matmul_precision']['matches_simulation']}): {i['matches_simulation']}.")
    b, d = i["budget_ms"], i["deadline"]
    lines.append(f"Time budget {b['budget_ms']:.4f} ms per image ({BUDGET_FRACTION} of the full network's): "
                 f"p={b['p']}, "
                 f"predicted {b['predicted_ms_per_image']:.4f} ms, realised {b['realised_ms_per_image']:.4f} ms "
                 f"({b['realised_ms_per_image'] / b['budget_ms']:.2f} of the budget; full network "
                 f"{b['full_network_ms_per_image']:.4f} ms), accuracy {b['accuracy']:.2f} %.")
    lines.append(f"Deadline {d['deadline_ms']:.3f} ms per chunk of {d['deadline_chunk_size']}: "
                 f"{100 * d['deadline_met_fraction']:.1f} % of chunks within it, worst overshoot "
                 f"{d['worst_overshoot_ms']:.3f} ms, accuracy {d['deadline_accuracy']:.2f} %; over the sweep "
                 f"{d['deadline_sweep_range_ms'][0]:.3f}..{d['deadline_sweep_range_ms'][1]:.3f} ms the lowest "
                 f"met fraction is {100 * d['deadline_sweep_min_met_fraction']:.1f} %.")
  else:
    lines.append(f"failed: {report['infer']['error']}")
  lines += ["", f"## Tests (-m \"{TEST_TIER}\")", ""]
  if report["tests"]["ok"]:
    t = report["tests"]["result"]
    lines.append(f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped of "
                 f"{t['tests']} in {t['seconds']:.0f} s ({', '.join(t['paths'])}; {t['workers']} worker(s)).")
    lines += [f"- failed: {name}" for name in t["failed"]]
    if t["error"]:
      lines.append(f"- pytest: {t['error']}")
  else:
    lines.append(f"failed: {report['tests']['error']}")
  return "\n".join(lines) + "\n"


def _commit() -> str:
  try:
    return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, timeout=10, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", required=True, help="directory for device_check.json, .md and logs/")
  parser.add_argument("--smoke", action="store_true", help="the same parts on the CPU with tiny settings")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="the whole check's time budget in seconds (default 480, --smoke 175)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  budget = args.budget_s or (175.0 if args.smoke else 480.0)
  check = Check(out, args.smoke, budget)
  start = time.monotonic()
  report: dict[str, Any] = {"smoke": args.smoke, "budget_s": budget, "commit": _commit(),
                            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
  for name, fn in PARTS:
    report[name] = check.part(name, lambda f=fn: f(check))
  report["seconds"] = time.monotonic() - start
  report["load_average"] = os.getloadavg()[0]
  (out / "device_check.json").write_text(json.dumps(report, indent=2) + "\n")
  (out / "device_check.md").write_text(markdown(report))
  print(f"wrote {out / 'device_check.json'} and {out / 'device_check.md'} ({report['seconds']:.0f} s)")
  return report


if __name__ == "__main__":
  main()
