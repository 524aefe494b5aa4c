"""msdfuse-bench: throughput of the training and evaluation steps of a configured model.

  msdfuse-bench --config=configs/cifar.py:dataset=cifar100,model=msdnet_anytime7 --batch_size=64 \
      --eval_batch_size=256 [--steps=10] [--json=FILE]

Runs the exact steps that `msdfuse-train` runs (the global-mesh train step fed by the configured input
pipeline, `--config.data.pipeline=device|stream`: batch gathering or host reading, augmentation, SGD
update) on random uint8 images, and prints train images/s, eval images/s, compile times and peak memory.
JSON keys: train_images_per_s, train_step_ms_spread (min, median, p90, max of the timed steps),
eval_images_per_s, compile_s (train step), eval_compile_s, peak_memory_mb, peak_memory_source, the compiled
train step's memory (XLA's `memory_analysis()`, per device: step_temp_memory_mb, step_argument_memory_mb,
step_output_memory_mb, step_memory_source), pipeline, plus the settings (num_shards, grad_accum_steps, remat
among them). The timed loops run under ``jax.transfer_guard("disallow")``: nothing crosses between host and
device implicitly. `--compile_only` compiles the train step without running it and reports compile_s and
the step memory only (docs/training.md, "Memory").
`--input_only` times the input pipeline alone (host reading and the copy to the devices, no step; for ImageNet the configured source, decoded and cropped by
``config.data.workers`` processes): JSON keys input_images_per_s, input_first_batch_s. It measures, it
asserts nothing; the persistent compilation cache is off unless --compilation_cache, so that compile times
are real.
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import flags

from msdfuse_jax import models, parallel, train, xla_flags
from msdfuse_jax import data as data_lib
from msdfuse_jax.data import sources
from msdfuse_jax import metrics as metrics_lib
from msdfuse_jax import optim
from msdfuse_jax import train_state as ts
from msdfuse_jax.tools import flags_util

flags_util.define_config_flag()
flags.DEFINE_integer("batch_size", None, "Global training batch size (default: config.train.batch_size).")
flags.DEFINE_integer("eval_batch_size", None, "Global eval batch size (default: config.eval.batch_size).")
flags.DEFINE_integer("steps", 10, "Timed training steps (after one untimed step that compiles).")
flags.DEFINE_integer("eval_steps", 5, "Timed eval steps.")
flags.DEFINE_bool("input_only", False, "Time only the configured input pipeline (host reading and the "
                  "copy of each batch to the devices), not the steps.")
flags.DEFINE_bool("compile_only", False, "Only compile the train step and report its memory "
                  "(compiled.memory_analysis(): temporaries, arguments, outputs); run nothing.")
flags.DEFINE_string("json", None, "Also write the figures to this JSON file.")
flags.DEFINE_bool("compilation_cache", False, "Use the persistent compilation cache (a faster start, but "
                  "compile_s then measures loading from the cache, not compiling).")
flags.DEFINE_bool("tuned_cpu_flags", True, "Add xla_flags.CPU_XLA_FLAGS (the XLA:CPU settings measured "
                  "fastest for these models) to XLA_FLAGS, except flags already set there.")
FLAGS = flags.FLAGS


def _peak_memory_mb() -> tuple[float, str]:
  """Peak device memory where the backend reports it (GPU/TPU), else the process's peak RSS (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process peak RSS"


def step_memory(compiled: Any) -> dict[str, Any]:
  """The memory XLA planned for a compiled step (`jax.stages.Compiled.memory_analysis`), in MiB.

  ``step_temp_memory_mb`` is the scratch space of one step (activations kept for the backward pass among
  them), ``step_argument_memory_mb`` and ``step_output_memory_mb`` its inputs and results (the donated
  state counted in both), for one device. None where the backend gives no analysis.
  """
  analysis = compiled.memory_analysis()
  keys = {"step_temp_memory_mb": "temp_size_in_bytes", "step_argument_memory_mb": "argument_size_in_bytes",
          "step_output_memory_mb": "output_size_in_bytes"}
  if analysis is None:
    return {**{k: None for k in keys}, "step_memory_source": None}
  return {**{k: getattr(analysis, attr) / 2**20 for k, attr in keys.items()},
          "step_memory_source": f"compiled.memory_analysis() on {jax.devices()[0].device_kind}"}


def _settings(config: ml_collections.ConfigDict, plan: train.Plan) -> dict[str, Any]:
  """The fields that decide a train step's memory, for the reports."""
  return {"num_shards": plan.num_shards, "grad_accum_steps": plan.grad_accum_steps,
          "remat": bool(config.model.get("remat", False))}


def benchmark_compile(config: ml_collections.ConfigDict, batch_size: int) -> dict[str, Any]:
  """Compiles `config`'s train step for `batch_size` without running it (the state only as shapes);
  returns its compile time and `step_memory`."""
  model = models.from_config(config)
  num_classes = sources.num_classes(config.dataset)
  pipeline = config.data.get("pipeline", "device")
  data = _RandomData(config, batch_size, 1)
  plan = data.plan
  tx = optim.create_optimizer(config.optim, optim.learning_rate_schedule(config.optim, plan.steps_per_epoch,
                                                                         plan.total_steps))
  weights = metrics_lib.exit_weights(config.optim.exit_weights, model.num_exits)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  tech = train.techniques(config)
  p_train_step, _ = train.make_steps(model, tx, config.aug, plan, weights, mean, std, num_classes, pipeline,
                                     tech)
  replicated = parallel.replicated()
  meta_init = train.meta_initializer(tech, model.num_exits, jax.random.PRNGKey(2))
  state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       ts.abstract_train_state(model, tx, sources.image_size(config.dataset), meta_init))
  feed = train.make_feed(pipeline, data, 0, plan, 0)
  load_before = os.getloadavg()[0]
  try:
    t0 = time.perf_counter()
    compiled = p_train_step.lower(state, *feed(0), parallel.stop_votes(False),
                                  parallel.replicate(jax.random.PRNGKey(1))).compile()
    compile_s = time.perf_counter() - t0
  finally:
    feed.close()
  return {"model": config.model.name, "dataset": config.dataset, "dtype": config.model.dtype,
          "pipeline": pipeline, "backend": jax.default_backend(), "devices": jax.device_count(),
          "batch_size": batch_size, **_settings(config, plan), "compile_s": compile_s,
          **step_memory(compiled), "load_average": load_before, "cpu_count": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def _timed(fn, *args) -> tuple[Any, float]:
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def _plan(config: ml_collections.ConfigDict, batch_size: int, steps: int, num_examples: int) -> train.Plan:
  train_cfg = ml_collections.ConfigDict(config.train.to_dict())
  train_cfg.batch_size, train_cfg.num_steps = batch_size, steps
  return train.make_plan(train_cfg, num_examples)


class _RandomData:
  """Random uint8 images at the dataset's size for `steps` distinct batches (every timed step reads new
  images), with the fields `train.make_feed` reads; already decoded, so no host augmentation is timed."""

  def __init__(self, config: ml_collections.ConfigDict, batch_size: int, steps: int):
    size = sources.image_size(config.dataset)
    rng = np.random.default_rng(0)
    n = batch_size * steps
    self.dataset = config.dataset
    self.train_images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    self.train_labels = rng.integers(0, sources.num_classes(config.dataset), (n,), dtype=np.int32)
    self.plan = _plan(config, batch_size, steps, n)

  def train_source(self, seed: int) -> Any:
    del seed
    from msdfuse_jax.data import stream  # pylint: disable=import-outside-toplevel  (needs grain)
    return stream.ArraySource(self.train_images, self.train_labels)


def benchmark_input(config: ml_collections.ConfigDict, batch_size: int, steps: int = 10) -> dict[str, Any]:
  """Times the configured input pipeline alone: every step's data arguments, ready on the devices.

  CIFAR reads random uint8 images (its records need no decoding); ImageNet reads the configured source
  (``config.data.source``, ``path``, ...), decoded and cropped as in training by
  ``config.data.workers`` processes. The first batch (which starts the workers) is timed apart; the steps
  read ahead meanwhile are taken untimed.
  """
  pipeline = config.data.get("pipeline", "device")
  workers = int(config.data.get("workers", 0))
  ahead = 0
  if pipeline == "stream":
    from msdfuse_jax.data import stream  # pylint: disable=import-outside-toplevel  (needs grain)
    ahead = stream.steps_ahead(workers)
  total = 1 + ahead + steps
  if config.dataset == "imagenet2012":
    data = data_lib.load(config.dataset, config.data, save_split=False)
    plan = _plan(config, batch_size, total, len(data.train_images))
    source = f"{config.data.source} {config.data.get('path') or config.data.get('data_dir') or ''}".strip()
  else:
    data = _RandomData(config, batch_size, total)
    plan, source = data.plan, "random uint8 images"
  t0 = time.perf_counter()
  feed = train.make_feed(pipeline, data, 0, plan, 0, workers=workers)
  try:
    jax.block_until_ready(feed(0))  # starts the readers, puts the dataset on the devices
    t1 = time.perf_counter()
    # The steps read ahead while the readers started are taken untimed: the timed ones come at the
    # pipeline's steady rate.
    for step in range(1, ahead + 1):
      jax.block_until_ready(feed(step))
    t2 = time.perf_counter()
    for step in range(ahead + 1, ahead + steps + 1):
      jax.block_until_ready(feed(step))
    step_s = (time.perf_counter() - t2) / steps
  finally:
    feed.close()
  return {"model": config.model.name, "dataset": config.dataset, "pipeline": pipeline, "source": source,
          "workers": workers, "backend": jax.default_backend(), "devices": jax.device_count(),
          "batch_size": batch_size, "input_first_batch_s": t1 - t0, "untimed_steps": 1 + ahead,
          "input_step_s": step_s,
          "input_images_per_s": batch_size / step_s, "load_average": os.getloadavg()[0],
          "cpu_count": os.cpu_count()}


def benchmark(config: ml_collections.ConfigDict, batch_size: int, eval_batch_size: int, steps: int = 10,
              eval_steps: int = 5) -> dict[str, Any]:
  """Measures the train and eval steps of `config`'s model; returns the figures as a dict."""
  baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the imports
  model = models.from_config(config)
  num_classes = sources.num_classes(config.dataset)
  pipeline = config.data.get("pipeline", "device")
  data = _RandomData(config, batch_size, steps + 1)
  images, labels, plan = data.train_images, data.train_labels, data.plan
  schedule = optim.learning_rate_schedule(config.optim, plan.steps_per_epoch, plan.total_steps)
  tx = optim.create_optimizer(config.optim, schedule)
  weights = metrics_lib.exit_weights(config.optim.exit_weights, model.num_exits)
  mean, std = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
  tech = train.techniques(config)
  p_train_step, p_eval_step = train.make_steps(model, tx, config.aug, plan, weights, mean, std, num_classes,
                                               pipeline, tech)

  # Set-up, once: the state is initialised and replicated on the mesh (transfers allowed here only).
  with jax.transfer_guard("allow"):
    meta_init = train.meta_initializer(tech, model.num_exits, jax.random.PRNGKey(2))
    state = parallel.replicate(ts.init_train_state(model, tx, jax.random.PRNGKey(0),
                                                   sources.image_size(config.dataset), meta_init))
    aug_rng = parallel.replicate(jax.random.PRNGKey(1))
    votes = parallel.stop_votes(False)
  feed = train.make_feed(pipeline, data, 0, plan, 0)

  load_before = os.getloadavg()[0]
  # The timed loops move nothing between host and device implicitly: the batches come from the feed
  # (explicit transfers), the state stays on the devices.
  try:
    first_args = feed(0)
    # Compiled once, explicitly: the steps below run this program, and its memory analysis is read from it
    # (a later `lower(...).compile()` would compile it again).
    t0 = time.perf_counter()
    compiled = p_train_step.lower(state, *first_args, votes, aug_rng).compile()
    compile_s = time.perf_counter() - t0
    memory = step_memory(compiled)
    with jax.transfer_guard("disallow"):
      (state, _, _), _ = _timed(compiled, state, *first_args, votes, aug_rng)  # untimed first step
      t0, c0 = time.perf_counter(), time.process_time()
      previous, finished = None, [t0]
      for step in range(1, steps + 1):  # the loop of msdfuse-train: at most one step ahead of the devices
        state, metrics, _ = compiled(state, *feed(step), votes, aug_rng)
        if previous is not None:
          jax.block_until_ready(previous)
          finished.append(time.perf_counter())
        previous = metrics
      jax.block_until_ready((state, metrics))
      finished.append(time.perf_counter())
    step_s = (time.perf_counter() - t0) / steps
    # The times between two steps' ends: with one step queued ahead, each is one step's time.
    spread = 1e3 * np.percentile(np.diff(finished), [0, 50, 90, 100])
    step_cpu_s = (time.process_time() - c0) / steps
  finally:
    feed.close()

  variables = state.variables
  batch = next(parallel.eval_batches(images[:eval_batch_size], labels[:eval_batch_size], eval_batch_size,
                                     eval_batch_size * jax.process_count()))
  batch = parallel.batch(batch)
  with jax.transfer_guard("disallow"):
    _, eval_first = _timed(p_eval_step, variables, batch)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(eval_steps):
      out = p_eval_step(variables, batch)
    jax.block_until_ready(out)
  eval_s = (time.perf_counter() - t0) / eval_steps
  eval_cpu_s = (time.process_time() - c0) / eval_steps
  peak_mb, peak_source = _peak_memory_mb()
  return {
      "model": config.model.name, "dataset": config.dataset, "dtype": config.model.dtype,
      "pipeline": pipeline,
      "backend": jax.default_backend(), "devices": jax.device_count(),
      "batch_size": batch_size, "eval_batch_size": eval_batch_size, **_settings(config, plan), **memory,
      "train_step_s": step_s, "train_images_per_s": batch_size / step_s,
      "train_step_ms_spread": dict(zip(("min", "median", "p90", "max"), map(float, spread))),
      "eval_step_s": eval_s, "eval_images_per_s": eval_batch_size / eval_s,
      # The train step's lowering and compilation; the eval step's first call compiles and runs once,
      # and subtracting one steady step leaves its compile (and dispatch set-up) time.
      "compile_s": compile_s, "eval_compile_s": max(eval_first - eval_s, 0.0),
      "peak_memory_mb": peak_mb, "peak_memory_source": peak_source, "rss_before_mb": baseline_mb,
      # CPU seconds of this process per step (all threads), and the 1-minute load average before the
      # timed steps: on a shared machine, a load above the core count means the wall-clock figures
      # above are contended.
      "train_cpu_s_per_step": step_cpu_s, "eval_cpu_s_per_step": eval_cpu_s,
      "load_average": load_before, "cpu_count": os.cpu_count(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
  }


def format_input_report(report: dict[str, Any]) -> str:
  return (f"{report['pipeline']} input pipeline of {report['model']} on {report['dataset']} "
          f"({report['source']}, {report['workers']} workers), {report['devices']} {report['backend']} "
          f"device(s): batch {report['batch_size']}  {report['input_images_per_s']:9.1f} images/s "
          f"({1000 * report['input_step_s']:.2f} ms/batch; first batch after "
          f"{report['input_first_batch_s']:.1f} s); "
          f"load average {report['load_average']:.2f} on {report['cpu_count']} CPUs")


def _format_memory(report: dict[str, Any]) -> str:
  if report.get("step_temp_memory_mb") is None:
    return "train step memory: not reported by this backend"
  return (f"train step memory ({report['step_memory_source']}; {report['num_shards']} shards, "
          f"grad_accum_steps {report['grad_accum_steps']}, remat {report['remat']}): temporaries "
          f"{report['step_temp_memory_mb']:.1f} MB, arguments {report['step_argument_memory_mb']:.1f} MB, "
          f"outputs {report['step_output_memory_mb']:.1f} MB")


def format_compile_report(report: dict[str, Any]) -> str:
  return "\n".join([
      f"{report['model']} on {report['dataset']} ({report['dtype']}), {report['devices']} "
      f"{report['backend']} device(s), {report['pipeline']} input pipeline: train step for batch "
      f"{report['batch_size']} compiled in {report['compile_s']:.1f} s (not run)",
      _format_memory(report),
      f"load average {report['load_average']:.2f} on {report['cpu_count']} CPUs",
  ])


def format_report(report: dict[str, Any]) -> str:
  return "\n".join([
      f"{report['model']} on {report['dataset']} ({report['dtype']}), {report['devices']} "
      f"{report['backend']} device(s), {report['pipeline']} input pipeline",
      f"train: batch {report['batch_size']:5d}  {report['train_images_per_s']:9.1f} images/s  "
      f"({1000 * report['train_step_s']:.1f} ms/step; median {report['train_step_ms_spread']['median']:.1f}, "
      f"p90 {report['train_step_ms_spread']['p90']:.1f}, max {report['train_step_ms_spread']['max']:.1f})  "
      f"compile {report['compile_s']:.1f} s",
      f"eval:  batch {report['eval_batch_size']:5d}  {report['eval_images_per_s']:9.1f} images/s  "
      f"({1000 * report['eval_step_s']:.1f} ms/step)  compile {report['eval_compile_s']:.1f} s",
      f"peak memory: {report['peak_memory_mb']:.0f} MB ({report['peak_memory_source']}; the process held "
      f"{report['rss_before_mb']:.0f} MB before building anything)",
      _format_memory(report),
      f"CPU time per step: train {report['train_cpu_s_per_step']:.3f} s, eval "
      f"{report['eval_cpu_s_per_step']:.3f} s; load average {report['load_average']:.2f} on "
      f"{report['cpu_count']} CPUs; XLA_FLAGS={report['xla_flags']!r}",
  ])


def main(argv) -> None:
  del argv
  if FLAGS.tuned_cpu_flags:
    xla_flags.use_fast_cpu_flags()  # read when the backend starts, i.e. below
  if FLAGS.compilation_cache:
    flags_util.enable_compilation_cache()
  config = flags_util.config_or_fail("configs/cifar.py:dataset=cifar100,model=msdnet_anytime7")
  batch_size = FLAGS.batch_size or config.train.batch_size
  eval_batch_size = FLAGS.eval_batch_size or config.eval.batch_size
  if FLAGS.steps < 1 or FLAGS.eval_steps < 1:
    flags_util.fail("--steps and --eval_steps must be at least 1")
  try:
    if FLAGS.input_only:
      report = benchmark_input(config, batch_size, FLAGS.steps)
      text = format_input_report(report)
    elif FLAGS.compile_only:
      report = benchmark_compile(config, batch_size)
      text = format_compile_report(report)
    else:
      report = benchmark(config, batch_size, eval_batch_size, FLAGS.steps, FLAGS.eval_steps)
      text = format_report(report)
  except (ValueError, ImportError, train.ConfigError) as e:
    flags_util.fail(str(e))
  flags_util.print_report(text, report, FLAGS.json)


def run() -> None:
  flags_util.run_tool(main)


if __name__ == "__main__":
  run()
