"""L2W-DEN's train step on 1 device (its 2 shards vmapped) against 2 devices (one shard each), one process.

From the same initial state and the same global batch (2 shards of 8 from the CIFAR-10 subset, msdnet_tiny,
the meta network of tests/test_l2w.py), runs `train.train_step` (L2W-DEN's `l2w_train_step`) as the
per-device program of three layouts and prints the largest relative difference of each part of the state
after `--steps` steps, per pair of layouts:

  one    jit(shard_map) over a mesh of 1 device, which vmaps its 2 shards (a 1-device run)
  two    jit(shard_map) over a mesh of 2 devices, one shard each (a 2-device run)
  vmap   jit(vmap(per-device program of one shard, axis_name=AXIS)) over the 2 shards on 1 device (the
         2-device program, emulated: pmean over the vmapped axis)

With --x64 everything computes in float64: ``jax_enable_x64``, the model built with ``dtype=float64``, the
state cast to float64, and the ``jnp.float32`` of the modules on the step's path (the input
normalisation, BatchNorm, the heads, the losses, the meta network's input) read as float64 for this
process only. With --masks the target-exit masks each look-ahead uses (`l2w.target_exit_masks`) are
recorded through `jax.debug.callback` and compared between layouts (that changes the programs a little).

Prints one line ``RESULT {json}`` at the end (the figures); needs 2 CPU devices, which it asks for itself
(XLA_FLAGS=--xla_force_host_platform_device_count=2, set before jax is imported).

  PYTHONPATH=. python3 experiments/l2w_two_devices.py [--ge] [--distill] [--x64] [--masks] [--steps N]
      [--layouts one,two,vmap] [--data ARCHIVE]
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import sys

flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
os.environ["XLA_FLAGS"] = " ".join(flags + ["--xla_force_host_platform_device_count=2"])
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
from jax.sharding import Mesh, PartitionSpec as P  # pylint: disable=wrong-import-position

from configs import cifar  # pylint: disable=wrong-import-position
from msdfuse_jax import l2w, metrics, models, optim, parallel, train  # pylint: disable=wrong-import-position
from msdfuse_jax import train_state as ts  # pylint: disable=wrong-import-position
from msdfuse_jax import data as data_lib  # pylint: disable=wrong-import-position
from msdfuse_jax.data import augment  # pylint: disable=wrong-import-position
from msdfuse_jax.models import layers  # pylint: disable=wrong-import-position
from msdfuse_jax.tools import flags_util  # pylint: disable=wrong-import-position

if "MSDFUSE_JAX_CACHE" in os.environ:  # the tests' compilation cache: a second run skips the compiles
  flags_util.enable_compilation_cache()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(os.path.dirname(REPO), "shared", "data", "cifar-10-python-subset.tar.gz")
SHARD_BATCH = 8
SHARDS = 2


class _Float64Numpy:
  """``jax.numpy`` with ``float32`` read as ``float64`` (for the modules whose casts would round)."""

  def __getattr__(self, name):
    return jnp.float64 if name == "float32" else getattr(jnp, name)


def use_float64() -> None:
  jax.config.update("jax_enable_x64", True)
  for module in (train, l2w, metrics, augment, layers):
    module.jnp = _Float64Numpy()


def make_config(ge: bool, distill: bool):
  """tests/test_l2w.py's `l2w_config`: msdnet_tiny, L2W-DEN with a meta network of 16, 2 shards of 8."""
  config = cifar.get_config("dataset=cifar10,model=msdnet_tiny,runlocal")
  config.data.source = "archive"
  config.data.path = DATA
  config.aug.mixup_alpha = config.aug.cutmix_alpha = 0.0
  config.optim.learning_rate = 0.05
  config.optim.gradient_equilibrium = ge
  config.distill.alpha, config.distill.temperature = (0.5, 2.0) if distill else (0.0, 1.0)
  config.l2w.enabled = True
  config.l2w.meta_net_hidden_size = 16
  config.train.batch_size = SHARD_BATCH * SHARDS
  config.train.num_shards = SHARDS
  config.train.num_steps = 3
  return config


def setup(config, x64: bool):
  """(per-device program, initial state, batches of `steps` steps) of the run `config` describes."""
  data = data_lib.load(config.dataset, config.data, None, save_split=False)
  fields = {k: v for k, v in config.model.to_dict().items() if k not in ("name", "dtype")}
  model = models.build_model(config.model.name, data.num_classes,
                             dtype=jnp.float64 if x64 else jnp.float32, **fields)
  tech = train.techniques(config)
  plan = train.make_plan(config.train, len(data.train_images))
  schedule = optim.learning_rate_schedule(config.optim, plan.steps_per_epoch, plan.total_steps)
  tx = optim.create_optimizer(config.optim, schedule)
  weights = metrics.exit_weights(config.optim.exit_weights, model.num_exits)
  root = jax.random.PRNGKey(config.seed)
  state = ts.init_train_state(model, tx, jax.random.fold_in(root, 0), 32,
                              train.meta_initializer(tech, model.num_exits, jax.random.fold_in(root, 2)))
  if x64:
    state = jax.tree.map(lambda a: a.astype(jnp.float64) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                         state)
  step_fn = functools.partial(train.train_step, model=model, tx=tx, aug=config.aug, mean=data.mean,
                              std=data.std, num_classes=data.num_classes, weights=weights, tech=tech,
                              total_steps=plan.total_steps)

  def program(state, batch, rng):  # as train._stream_pipeline_step: the shards' global indices
    return step_fn(state, {**batch, "shard": parallel.device_shards(batch["image"].shape[0])}, rng)
  rows = np.arange(plan.batch_size * 8) % len(data.train_images)
  batches = []
  for step in range(8):
    idx = rows[step * plan.batch_size:(step + 1) * plan.batch_size]
    batches.append({"image": data.train_images[idx].reshape(SHARDS, SHARD_BATCH, 32, 32, 3),
                    "label": data.train_labels[idx].reshape(SHARDS, SHARD_BATCH).astype(np.int32)})
  return program, state, batches, jax.random.fold_in(root, 1)


def layouts(program):
  """name -> jitted ``(state, batch, rng) -> state``."""
  devices = jax.devices()
  out = {}
  for name, n in (("one", 1), ("two", 2)):
    mesh = Mesh(np.array(devices[:n]), (parallel.AXIS,))
    out[name] = jax.jit(jax.shard_map(lambda s, b, r: program(s, b, r)[0], mesh=mesh,
                                      in_specs=(P(), P(parallel.AXIS), P()), out_specs=P(),
                                      check_vma=False))

  def emulated(state, batch, rng):
    per_shard = jax.tree.map(lambda a: a.reshape(SHARDS, 1, *a.shape[1:]), batch)
    new = jax.vmap(lambda b: program(state, b, rng)[0], axis_name=parallel.AXIS)(per_shard)
    return jax.tree.map(lambda a: a[0], new)

  out["vmap"] = jax.jit(emulated)
  return out


RECORDED: dict[str, list] = collections.defaultdict(list)
CURRENT = ["?", 0]  # layout, step


def record_masks() -> None:
  """Wraps `l2w.target_exit_masks` so that every look-ahead reports (confidence, masks) to the host."""
  original = l2w.target_exit_masks

  def wrapped(confidence, counts):
    masks = original(confidence, counts)
    jax.debug.callback(lambda c, m: RECORDED[CURRENT[0]].append((CURRENT[1], np.asarray(c), np.asarray(m))),
                       confidence, masks)
    return masks

  l2w.target_exit_masks = wrapped


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30)) if a.size else 0.0


def tree_rel(a, b) -> float:
  return max(rel(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def parts(state) -> dict:
  adam = state.meta["opt_state"][1]
  return {"meta_params": state.meta["params"], "meta_adam_mu": adam.mu, "meta_adam_nu": adam.nu,
          "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": [x for x in jax.tree.leaves(state.opt_state) if jnp.issubdtype(x.dtype, jnp.floating)]}


def mask_report(a: list, b: list) -> dict:
  """Each look-ahead of `a` matched with the one of `b` of the nearest confidences: are the masks equal?"""
  if len(a) != len(b):
    return {"count": [len(a), len(b)]}
  used, equal, conf_gap, margins, differing_steps = set(), 0, 0.0, [], []
  for t, conf, masks in a:
    j = min((j for j in range(len(b)) if j not in used and b[j][0] == t),
            key=lambda j: float(np.max(np.abs(b[j][1] - conf))))
    used.add(j)
    same = bool(np.array_equal(masks, b[j][2]))
    equal += same
    if not same:
      differing_steps.append(t)
    conf_gap = max(conf_gap, rel(conf, b[j][1]))
  for _, conf, _ in a:  # the smallest gap between two confidences of one exit: how close a flip would be
    margins.append(min(float(np.min(np.diff(np.sort(c)))) for c in conf))
  return {"lookaheads": len(a), "equal_masks": equal, "differing_at_steps": differing_steps,
          "confidence_rel_gap": conf_gap, "smallest_confidence_spacing": min(margins)}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--ge", action="store_true", help="config.optim.gradient_equilibrium=True")
  parser.add_argument("--distill", action="store_true", help="config.distill.alpha=0.5, temperature 2")
  parser.add_argument("--x64", action="store_true", help="everything in float64")
  parser.add_argument("--masks", action="store_true", help="record and compare the target-exit masks")
  parser.add_argument("--steps", type=int, default=1, choices=range(1, 9))
  parser.add_argument("--layouts", default="one,two,vmap", help="which of one, two, vmap to run")
  parser.add_argument("--data", default=DATA, help="the CIFAR-10 python-version archive (the test subset)")
  args = parser.parse_args(argv)
  if args.x64:
    use_float64()
  if args.masks:
    record_masks()
  assert jax.device_count() >= 2, jax.devices()
  config = make_config(args.ge, args.distill)
  config.data.path = args.data
  program, state, batches, rng = setup(config, args.x64)
  steps = layouts(program)
  history, replicas = {}, []
  for name in args.layouts.split(","):
    CURRENT[0] = name
    s, history[name] = state, []
    for t in range(args.steps):
      CURRENT[1] = t
      s = steps[name](s, batches[t], rng)
      jax.block_until_ready(s)
      jax.effects_barrier()
      history[name].append(parts(jax.device_get(s)))
      if name == "two":  # do the devices hold the same state? (out_specs=P() reads device 0's)
        replicas.append(max(float(np.max(np.abs(np.asarray(x.addressable_shards[0].data, np.float64) -
                                                np.asarray(x.addressable_shards[1].data, np.float64))))
                            for x in jax.tree.leaves(s) if len(x.addressable_shards) > 1))
  names = list(history)
  finals = {name: h[-1] for name, h in history.items()}
  result = {"ge": args.ge, "distill": args.distill, "x64": args.x64, "steps": args.steps,
            "dtype": str(jax.tree.leaves(finals[names[0]]["meta_params"])[0].dtype), "gaps": {},
            "gaps_per_step": {}, "two_devices_replica_max_abs_difference": replicas}
  for i, a in enumerate(names):
    for b in names[i + 1:]:
      result["gaps"][f"{a}-{b}"] = {k: tree_rel(finals[a][k], finals[b][k]) for k in finals[a]}
      result["gaps_per_step"][f"{a}-{b}"] = [{k: tree_rel(x[k], y[k]) for k in x}
                                             for x, y in zip(history[a], history[b])]
  if args.masks:
    jax.effects_barrier()
    result["masks"] = {f"{a}-{b}": mask_report(RECORDED[a], RECORDED[b])
                       for i, a in enumerate(names) for b in names[i + 1:]}
  print("RESULT " + json.dumps(result), flush=True)
  return result


if __name__ == "__main__":
  sys.exit(main() and 0)
