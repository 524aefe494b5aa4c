"""Training a multi-exit classifier (CIFAR, ImageNet): `train_and_evaluate(config, workdir)`.

Data flow: every step trains on the global batch that `data.order` assigns to (seed, step), cut into
``num_shards`` shards; device d of the global mesh (`parallel`) runs its block of shards, and process p
supplies the shards of its devices. Two input pipelines (``config.data.pipeline``) deliver them:
``device`` puts the training set on every device once, as uint8 (CIFAR is 150 MB), and the compiled step
gathers its own shards; ``stream`` (`data.stream`) reads each process's shards on the host with grain
(decoding and cropping ImageNet's images there) and prefetches them to its devices. Either way the step augments with a key derived from (seed, step, shard)
and takes one SGD step, so a run computes the same thing on any number of devices and processes, and a
resumed run sees exactly the batches, augmentations and updates of an uninterrupted one.

The loop around it: TensorBoard summaries (`msdfuse_jax.summaries`, no TensorFlow needed) and progress
lines (process 0), periodic evaluation of every exit on the validation split and the test set, orbax
checkpoints (periodic, at the end, and on SIGTERM at the next step boundary, agreed by every process),
automatic resumption, and a clear stop on a non-finite loss.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import PartitionSpec as P

from msdfuse_jax import checkpoints, l2w as l2w_lib, models, parallel, preemption as preemption_lib, rundir
from msdfuse_jax import summaries
from msdfuse_jax import data as data_lib
from msdfuse_jax.data import augment, cifar, order, sources, threads
from msdfuse_jax.models import base as base_lib
from msdfuse_jax import metrics as metrics_lib
from msdfuse_jax import optim
from msdfuse_jax import train_state as ts

Metrics = metrics_lib.Metrics


class ConfigError(ValueError):
  """The config cannot describe a run (unknown model, bad batch layout, ...)."""


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite; the bad state was not saved."""


class Preempted(RuntimeError):
  """The run stopped on SIGTERM (after saving a checkpoint, if it had taken a step); the same command
  resumes it."""


# --------------------------------------------------------------------------------------------------------
# The pure steps: per-device programs, bound with functools.partial and compiled for the global mesh in
# `make_steps`.


@dataclasses.dataclass(frozen=True)
class Techniques:
  """The training techniques of the step (static): IMTA's gradient equilibrium and last-exit distillation,
  L2W-DEN's meta-learned sample weights (`l2w_train_step`).

  (BoostNet's boosted ensembles are a model field, ``boost_reweight``: they change the predictions too.)
  """

  gradient_equilibrium: bool = False
  distill_alpha: float = 0.0        # 0: no distillation
  distill_temperature: float = 1.0
  l2w: l2w_lib.L2W | None = None    # None: no meta-learned weights


def techniques(config: ml_collections.ConfigDict) -> Techniques:
  """The `Techniques` of a run config (fields absent from an older config.json are off); ConfigError when
  a value is out of range."""
  distill = config.get("distill") or {}
  try:
    l2w = l2w_lib.from_config(config.get("l2w"))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  out = Techniques(bool(config.optim.get("gradient_equilibrium", False)), float(distill.get("alpha", 0.0)),
                   float(distill.get("temperature", 1.0)), l2w)
  if not 0.0 <= out.distill_alpha <= 1.0:
    raise ConfigError(f"config.distill.alpha={out.distill_alpha} must lie in [0, 1] (0 disables distillation)")
  if out.distill_temperature <= 0:
    raise ConfigError(f"config.distill.temperature={out.distill_temperature} must be > 0")
  return out


def distillation_losses(logits: tuple[jax.Array, ...], temperature: float) -> jax.Array:
  """Per-exit, per-sample ``T^2 KL(p_K^T || p_k^T)`` against the last exit (stopped gradient): (K, B),
  0 for the last exit."""
  stacked = jnp.stack([x.astype(jnp.float32) for x in logits]) / temperature
  teacher = jax.lax.stop_gradient(jax.nn.log_softmax(stacked[-1], axis=-1))
  student = jax.nn.log_softmax(stacked, axis=-1)
  kl = jnp.sum(jnp.exp(teacher) * (teacher - student), axis=-1)
  return temperature ** 2 * kl.at[-1].set(0.0)


def meta_initializer(tech: Techniques, num_exits: int, rng: jax.Array):
  """The function that makes the train state's ``meta`` (L2W-DEN's `l2w.init_meta`), None without it."""
  if tech.l2w is None:
    return None
  return functools.partial(l2w_lib.init_meta, tech.l2w, num_exits, rng)


def exit_losses(logits: tuple[jax.Array, ...], targets: jax.Array, tech: Techniques
                ) -> tuple[jax.Array, jax.Array]:
  """Per-exit, per-sample (K, B) cross-entropies and training losses (the loss of `loss_and_grads`,
  sample by sample: with distillation ``(1 - alpha) CE_k + alpha T^2 KL`` for k < K)."""
  stacked = jnp.stack([x.astype(jnp.float32) for x in logits])
  ce = -jnp.sum(targets * jax.nn.log_softmax(stacked, axis=-1), axis=-1)
  if tech.distill_alpha <= 0:
    return ce, ce
  num_exits = len(logits)
  label_weight = np.where(np.arange(num_exits) < num_exits - 1, 1.0 - tech.distill_alpha, 1.0)
  kd = distillation_losses(logits, tech.distill_temperature)
  return ce, label_weight.astype(np.float32)[:, None] * ce + tech.distill_alpha * kd


def loss_and_grads(params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array, key: jax.Array, *,
                   model, aug: ml_collections.ConfigDict, mean: np.ndarray, std: np.ndarray, num_classes: int,
                   weights: np.ndarray, tech: Techniques = Techniques()) -> tuple[Any, Any, Metrics]:
  """One shard's gradient: augment with `key`, forward in training mode, weighted sum of exit losses.

  The loss is ``sum_k weights[k] * mean_over_batch(loss_k)``, MSDNet-PyTorch's summed criterion, with
  ``loss_k = CE_k``, or with distillation ``(1 - alpha) CE_k + alpha T^2 KL(p_K^T || p_k^T)`` for k < K.
  The metric sums report the cross-entropies.

  Returns:
    (gradient w.r.t. `params`, the shard's updated BatchNorm statistics, the shard's metric sums).
  """
  x, targets = augment.augment_batch(key, images, labels, aug, mean, std, num_classes)
  alpha = tech.distill_alpha
  num_exits = len(weights)

  def loss_fn(p):
    with base_lib.gradient_equilibrium(tech.gradient_equilibrium):
      logits, updates = model.apply({"params": p, "batch_stats": batch_stats}, x, train=True,
                                    mutable=["batch_stats"])
    sums = metrics_lib.exit_metrics(logits, targets, labels)
    losses = sums["loss"]
    if alpha > 0:
      kd = distillation_losses(logits, tech.distill_temperature).sum(axis=1)
      label_weight = np.where(np.arange(num_exits) < num_exits - 1, 1.0 - alpha, 1.0).astype(np.float32)
      losses = label_weight * losses + alpha * kd
    return jnp.dot(weights, losses) / sums["count"], (updates.get("batch_stats", {}), sums)

  grads, (new_stats, sums) = jax.grad(loss_fn, has_aux=True)(params)
  return grads, new_stats, sums


def train_step(state: ts.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, model, tx,
               aug: ml_collections.ConfigDict, mean: np.ndarray, std: np.ndarray, num_classes: int,
               weights: np.ndarray, tech: Techniques = Techniques(), accum: int = 1, total_steps: int = 0
               ) -> tuple[ts.TrainState, Metrics]:
  """One SGD step on this device's shards of the global batch: the per-device program of `make_steps`.

  Args:
    state: the (replicated) train state.
    batch: ``image`` uint8 (S, b, H, W, C), ``label`` int32 (S, b) and ``shard`` int32 (S,): the S shards
      this device runs and their global indices.
    rng: the run's augmentation key, the same on every device.
    model, tx, aug, mean, std, num_classes, weights, tech: bound with functools.partial (static).
    accum: ``config.train.grad_accum_steps`` (static, divides S): the S shards run in that many sequential
      groups of S / accum (a `lax.scan`), so only one group's activations are alive at a time; the
      gradients and BatchNorm statistics are summed over the groups, so the step computes what it computes
      with 1 (up to float summation order).

    total_steps: the run's length (static), for L2W-DEN's meta learning rate.

  Returns:
    The new state and the metric sums of the whole global batch (accuracy against the un-mixed labels).
  """
  if tech.l2w is not None:
    return l2w_train_step(state, batch, rng, model=model, tx=tx, aug=aug, mean=mean, std=std,
                          num_classes=num_classes, weights=weights, tech=tech, total_steps=total_steps)
  step_rng = jax.random.fold_in(rng, state.step)

  def shard_grads(images, labels, shard):
    return loss_and_grads(state.params, state.batch_stats, images, labels, jax.random.fold_in(step_rng, shard),
                          model=model, aug=aug, mean=mean, std=std, num_classes=num_classes, weights=weights,
                          tech=tech)

  def group_sums(images, labels, shards):
    """(gradient, BatchNorm statistics, metric sums), each summed over a group of shards."""
    if images.shape[0] == 1:  # one shard per group: no vmap, the common case
      return shard_grads(images[0], labels[0], shards[0])
    # Several shards per group: BatchNorm statistics and Mixup pairs stay per shard.
    return jax.tree.map(lambda x: x.sum(0), jax.vmap(shard_grads)(images, labels, shards))

  per_device = batch["image"].shape[0]
  data = (batch["image"], batch["label"], batch["shard"])
  if accum == 1:
    grads, batch_stats, sums = group_sums(*data)
  else:
    # A scan, not a vmap, over the groups: XLA keeps one iteration's activations alive, not all of them.
    # The carry is the running sum (zeros of the per-group result's shapes to start).
    groups = jax.tree.map(lambda x: x.reshape(accum, per_device // accum, *x.shape[1:]), data)
    first = jax.eval_shape(group_sums, *jax.tree.map(lambda x: x[0], groups))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), first)
    (grads, batch_stats, sums), _ = lax.scan(
        lambda total, group: (jax.tree.map(jnp.add, total, group_sums(*group)), None), zeros, groups)
  # Every shard has the same size, so the mean over local shards and then over devices is the gradient of
  # the global-batch loss. Running BatchNorm statistics are averaged the same way, which keeps them
  # identical on every replica (each replica normalised with its own batch statistics in the forward pass).
  grads, batch_stats = lax.pmean(jax.tree.map(lambda x: x / per_device, (grads, batch_stats)), parallel.AXIS)
  sums = lax.psum(sums, parallel.AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = jax.tree.map(lambda p, u: p + u, state.params, updates)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), sums


def l2w_train_step(state: ts.TrainState, batch: dict[str, jax.Array], rng: jax.Array, *, model, tx,
                   aug: ml_collections.ConfigDict, mean: np.ndarray, std: np.ndarray, num_classes: int,
                   weights: np.ndarray, tech: Techniques, total_steps: int) -> tuple[ts.TrainState, Metrics]:
  """`train_step` with L2W-DEN's meta-learned sample weights (`msdfuse_jax.l2w`), on the same arguments.

  Each shard is augmented as in `train_step`, then cut into two halves, which take turns (a two-step
  `lax.scan`): first the first half trains and the second is the meta half, then the other way round from
  the updated state. A turn is (1) the meta network's Adam step on the meta loss of a functional look-ahead
  (`l2w.Turn.meta_gradient`, per shard; its gradient averaged over shards and devices), skipped on steps
  that are not a multiple of ``meta_interval``, and (2) the classifier's optimiser step on the train half's
  losses weighted by the updated meta network. Both optimiser steps run at this step's learning rate (the
  optimiser's step count advances once per train step); BatchNorm statistics advance with both.

  Returns:
    The new state (``meta``: the meta network's parameters and Adam state) and the metric sums of the
    train halves (the whole batch once), with ``meta_loss``/``meta_count``: the summed meta losses and
    their number.
  """
  cfg = tech.l2w
  step_rng = jax.random.fold_in(rng, state.step)
  per_device = batch["image"].shape[0]

  def augment_shard(images, labels, shard):
    return augment.augment_batch(jax.random.fold_in(step_rng, shard), images, labels, aug, mean, std,
                                 num_classes)

  x, targets = jax.vmap(augment_shard)(batch["image"], batch["label"], batch["shard"])
  half = x.shape[1] // 2
  first = jax.tree.map(lambda a: a[:, :half], (x, targets, batch["label"]))
  second = jax.tree.map(lambda a: a[:, half:], (x, targets, batch["label"]))
  # Turn 1 trains on the first halves with the second ones as meta halves; turn 2 the other way round.
  turns = jax.tree.map(lambda a, b: jnp.stack([a, b]), (first, second[:2]), (second, first[:2]))

  def forward(params, batch_stats, images, with_techniques):
    with base_lib.gradient_equilibrium(tech.gradient_equilibrium and with_techniques):
      logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                                    mutable=["batch_stats"])
    return logits, updates.get("batch_stats", {})

  turn = l2w_lib.Turn(cfg, forward, functools.partial(exit_losses, tech=tech), tx, weights, model.num_exits)
  meta_tx = l2w_lib.meta_optimizer(cfg)
  meta_lr = l2w_lib.meta_learning_rate(cfg, state.step, total_steps)

  def one_turn(carry, data):
    params, batch_stats, opt_state, meta = carry
    opt_state = l2w_lib.keep_counts(opt_state, state.opt_state)  # this step's learning rate in both turns
    (xt, tt, lt), meta_half = data

    def meta_update(meta):
      values, grads, _ = jax.vmap(turn.meta_gradient, in_axes=(None, None, None, None, 0, 0))(
          meta["params"], params, batch_stats, opt_state, (xt, tt), meta_half)
      grads = lax.pmean(jax.tree.map(lambda g: g.mean(0), grads), parallel.AXIS)
      updates, meta_opt = meta_tx.update(grads, meta["opt_state"], meta["params"])
      new = jax.tree.map(lambda p, u: p - meta_lr * u, meta["params"], updates)
      return {"params": new, "opt_state": meta_opt}, values.sum(), jnp.float32(per_device)

    if cfg.meta_interval == 1:
      meta, meta_sum, meta_count = meta_update(meta)
    else:
      meta, meta_sum, meta_count = lax.cond(state.step % cfg.meta_interval == 0, meta_update,
                                            lambda m: (m, jnp.float32(0), jnp.float32(0)), meta)
    meta_params = lax.stop_gradient(meta["params"])

    def shard_grads(images, soft, labels):
      grads, (stats, logits, _, _) = jax.grad(turn.weighted_loss, has_aux=True)(params, batch_stats,
                                                                                 meta_params, images, soft)
      return grads, stats, metrics_lib.exit_metrics(logits, soft, labels)

    grads, new_stats, sums = jax.tree.map(lambda a: a.sum(0), jax.vmap(shard_grads)(xt, tt, lt))
    grads, new_stats = lax.pmean(jax.tree.map(lambda a: a / per_device, (grads, new_stats)), parallel.AXIS)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    return (params, new_stats, opt_state, meta), {**sums, "meta_loss": meta_sum, "meta_count": meta_count}

  (params, batch_stats, opt_state, meta), sums = lax.scan(
      one_turn, (state.params, state.batch_stats, state.opt_state, state.meta), turns)
  sums = lax.psum(jax.tree.map(lambda a: a.sum(0), sums), parallel.AXIS)
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
                       meta=meta), sums


def gather_batch(dataset: dict[str, jax.Array], perm: jax.Array, step: jax.Array, shards: jax.Array, *,
                 steps_per_epoch: int, batch_size: int, shard_batch: int) -> dict[str, jax.Array]:
  """Shards `shards` of step `step`'s global batch, taken from the on-device dataset (`order.batch_rows`
  inside the step)."""
  start = (step % steps_per_epoch) * batch_size

  def one(shard):
    idx = lax.dynamic_slice(perm, (start + shard * shard_batch,), (shard_batch,))
    return jnp.take(dataset["image"], idx, axis=0), jnp.take(dataset["label"], idx, axis=0)

  images, labels = jax.vmap(one)(shards)
  return {"image": images, "label": labels}


def _device_pipeline_step(state, dataset, perm, votes, rng, *, gather, step, per_device):
  """The per-device program of the ``device`` pipeline: `gather_batch` from the replicated dataset, then
  `train_step`. Also sums the devices' stop votes (see `parallel.stop_votes`)."""
  shards = parallel.device_shards(per_device)
  batch = gather(dataset, perm, state.step, shards)
  state, sums = step(state, {**batch, "shard": shards}, rng)
  return state, sums, lax.psum(votes.sum(), parallel.AXIS)


def _stream_pipeline_step(state, batch, votes, rng, *, step, per_device):
  """The per-device program of the ``stream`` pipeline: `train_step` on the batch the host sent."""
  shards = parallel.device_shards(per_device)
  state, sums = step(state, {**batch, "shard": shards}, rng)
  return state, sums, lax.psum(votes.sum(), parallel.AXIS)


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model, mean: np.ndarray,
              std: np.ndarray, num_classes: int) -> Metrics:
  """Metric sums of every exit (eval mode) on one padded, masked batch, summed over devices."""
  x = augment.eval_batch(batch["image"], mean, std)
  logits = model.apply(variables, x, train=False)
  targets = jax.nn.one_hot(batch["label"], num_classes)
  return lax.psum(metrics_lib.exit_metrics(logits, targets, batch["label"], batch["mask"]), parallel.AXIS)


def evaluate_all(p_eval_step, state: ts.TrainState, eval_sets: dict[str, tuple[np.ndarray, np.ndarray, int]],
                 batch_size: int, weights: np.ndarray) -> dict[str, float]:
  """Every exit on every eval set: ``{set}/loss``, ``{set}/loss_exit{k}``, ``{set}/accuracy_exit{k}``.

  Args:
    p_eval_step: the eval step of `make_steps`.
    state: the replicated train state.
    eval_sets: name -> (this process's images, labels, size of the whole set).
    batch_size: the global eval batch size.
    weights: the exit weights of the summed loss.
  """
  variables = state.variables
  scalars = {}
  for name, (images, labels, total) in eval_sets.items():
    sums = None
    # The next batches are decoded (ImageNet) in the background while the devices compute this one.
    for batch in threads.prefetched(parallel.eval_batches(images, labels, batch_size, total)):
      out = p_eval_step(variables, parallel.batch(batch))
      sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
    scalars.update(metrics_lib.summarize(parallel.to_host(sums), weights, name))
  return scalars


# --------------------------------------------------------------------------------------------------------
# The host side.


PIPELINES = ("device", "stream")
# With several processes, the stop vote read each step is the one of this many steps before (see the loop).
VOTE_LAG = 3
TRANSFER_GUARDS = ("allow", "log", "disallow", "log_explicit", "disallow_explicit")


def check_pipeline(pipeline: str) -> str:
  """`pipeline` if it names an input pipeline; ConfigError otherwise."""
  if pipeline not in PIPELINES:
    raise ConfigError(f"config.data.pipeline={pipeline!r} is not one of {PIPELINES}")
  return pipeline


@dataclasses.dataclass(frozen=True)
class Plan:
  """How the global batch is laid out and how long the run is."""

  num_shards: int       # shards of the global batch (units of BatchNorm statistics and Mixup pairs)
  shard_batch: int      # samples per shard
  batch_size: int       # samples per step, over all processes
  steps_per_epoch: int  # full global batches per pass over the training set
  total_steps: int
  grad_accum_steps: int = 1  # sequential groups each device runs its shards in (divides shards_per_device)

  @property
  def shards_per_device(self) -> int:
    return self.num_shards // jax.device_count()


def make_plan(train: ml_collections.ConfigDict, num_examples: int) -> Plan:
  """Checks the batch layout against the devices and the data; raises ConfigError when it cannot work."""
  try:
    shards = parallel.num_shards(train.get("num_shards", 0))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if train.batch_size <= 0 or train.batch_size % shards:
    raise ConfigError(f"config.train.batch_size={train.batch_size} must be a positive multiple of the "
                      f"{shards} batch shards (one per device unless config.train.num_shards is set)")
  steps_per_epoch = num_examples // train.batch_size
  if steps_per_epoch < 1:
    raise ConfigError(f"config.train.batch_size={train.batch_size} is larger than the {num_examples} "
                      "training images")
  total = train.num_steps if train.num_steps > 0 else int(train.num_epochs * steps_per_epoch)
  if total < 1:
    raise ConfigError("the run has no steps: set config.train.num_epochs > 0 or config.train.num_steps > 0")
  return Plan(shards, train.batch_size // shards, train.batch_size, steps_per_epoch, total,
              check_grad_accum(train.get("grad_accum_steps", 1), shards))


def check_grad_accum(accum: Any, shards: int) -> int:
  """``config.train.grad_accum_steps`` if it divides the `shards` batch shards' share of each device;
  ConfigError otherwise."""
  devices = jax.device_count()
  per_device = shards // devices
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"config.train.grad_accum_steps={accum!r} must be a positive integer (1: no "
                      "accumulation)")
  if per_device % accum:
    raise ConfigError(f"config.train.grad_accum_steps={accum} must divide the {per_device} batch shards per "
                      f"device ({shards} shards on {devices} device{'s' if devices > 1 else ''}); set "
                      f"config.train.num_shards to a multiple of {accum * devices}")
  return accum


def make_steps(model, tx, aug: ml_collections.ConfigDict, plan: Plan, weights: np.ndarray,
               mean: np.ndarray, std: np.ndarray, num_classes: int, pipeline: str = "device",
               tech: Techniques = Techniques()):
  """The train step and the eval step, compiled for the global mesh (`parallel.spmd`).

  The train step is ``(state, *feed(step), votes, rng) -> (state, metric sums, stop votes)``, where
  `feed` is the pipeline's `DeviceFeed` or `stream.StreamFeed` and `votes` is `parallel.stop_votes`;
  the eval step is ``(variables, batch) -> metric sums``. This is the one place the steps are bound
  (training, `msdfuse-bench` and the parity tests all use it).
  """
  check_pipeline(pipeline)
  if tech.l2w is not None and (plan.grad_accum_steps > 1 or plan.shard_batch % 2):
    raise ConfigError(f"config.l2w.enabled cuts every batch shard in two halves: it needs an even shard "
                      f"size (here {plan.shard_batch}) and config.train.grad_accum_steps=1 (here "
                      f"{plan.grad_accum_steps})")
  common = dict(model=model, mean=mean, std=std, num_classes=num_classes)
  step_fn = functools.partial(train_step, tx=tx, aug=aug, weights=weights, tech=tech,
                              accum=plan.grad_accum_steps, total_steps=plan.total_steps, **common)
  rep, split = P(), P(parallel.AXIS)
  if pipeline == "device":
    gather_fn = functools.partial(gather_batch, steps_per_epoch=plan.steps_per_epoch,
                                  batch_size=plan.batch_size, shard_batch=plan.shard_batch)
    fn = functools.partial(_device_pipeline_step, gather=gather_fn, step=step_fn,
                           per_device=plan.shards_per_device)
    in_specs = (rep, rep, rep, split, rep)  # state, dataset, permutation, votes, rng
  else:
    fn = functools.partial(_stream_pipeline_step, step=step_fn, per_device=plan.shards_per_device)
    in_specs = (rep, split, split, rep)  # state, batch, votes, rng
  # The state is donated: XLA updates parameters and optimiser state in place instead of keeping two
  # copies alive across the step.
  p_train_step = parallel.spmd(fn, in_specs, (rep, rep, rep), donate_argnums=(0,))
  p_eval_step = parallel.spmd(functools.partial(eval_step, **common), (rep, split), rep)
  return p_train_step, p_eval_step


class DeviceFeed:
  """The ``device`` pipeline: the whole training set replicated on every device (uint8), and each
  epoch's permutation; the step gathers its own shards. ``feed(step)`` gives the step's data arguments."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int, plan: Plan):
    self.dataset = parallel.replicate({"image": images, "label": labels})
    self.seed, self.plan, self.n = seed, plan, len(images)
    self._epoch, self._perm = -1, None

  def __call__(self, step: int) -> tuple[Any, ...]:
    epoch = step // self.plan.steps_per_epoch
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = parallel.replicate(order.epoch_permutation(self.seed, epoch, self.n))
    return self.dataset, self._perm

  def close(self) -> None:
    pass


def make_feed(pipeline: str, data: Any, seed: int, plan: Plan, start: int, *, workers: int = 0):
  """The feed of `pipeline` over `data`'s training set for a run that continues after step `start`.

  `workers` (``config.data.workers``): the ``stream`` pipeline's grain worker processes, 0 for threads of
  this process (`stream.host_batches`); the ``device`` pipeline reads nothing on the host and ignores it.
  """
  if workers < 0:
    raise ConfigError(f"config.data.workers={workers} must be >= 0 (0: read in threads of the training "
                      "process; N: N worker processes)")
  if pipeline == "device":
    if not isinstance(data.train_images, np.ndarray):
      raise ConfigError(f"config.data.pipeline='device' holds the training set on every device, which "
                        f"{data.dataset} does not fit: use config.data.pipeline=stream")
    return DeviceFeed(data.train_images, data.train_labels, seed, plan)
  from msdfuse_jax.data import stream  # pylint: disable=import-outside-toplevel  (needs grain)
  try:
    return stream.StreamFeed(data.train_source(seed), seed, plan, start, workers=workers)
  except ImportError as e:
    raise ConfigError(str(e)) from None


def _check_saved_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A workdir holds one model: resuming it with another would fail deep inside the restore."""
  try:
    saved = rundir.load_config(workdir)
  except FileNotFoundError:
    return
  def architecture(c):  # the compute dtype and remat may change between runs: the parameters do not
    model = c.get("model")
    if model is None:
      return None
    model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
    # A field added to the package after the run was saved has its preset value (a config.json from an
    # older version resumes); through JSON, as config.json holds it (tuples become lists).
    if model.get("name") in models.PRESETS:
      model = {**models.preset_hparams(model["name"]), **model}
    return json.loads(json.dumps({k: v for k, v in model.items() if k not in ("dtype", "remat")}))

  if architecture(saved) != architecture(config) or saved.get("dataset") != config.dataset:
    raise ConfigError(f"{workdir} holds a run of model {saved.get('model', {}).get('name')!r} on "
                      f"{saved.get('dataset')} with other hyper-parameters; use another --workdir (or "
                      "the same model config to resume it)")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       preemption: preemption_lib.Preemption | None = None) -> ts.TrainState:
  """Trains `config`'s model in `workdir`, resuming from its newest checkpoint; returns the final state.

  Raises:
    msdfuse_jax.data.sources.DataError: the data is missing or malformed (the message says what to put
      where).
    ConfigError: the config cannot describe a run.
    checkpoints.CheckpointError: no checkpoint of the workdir can be read.
    NonFiniteLossError: the loss became NaN/inf; checkpoints hold the last good state.
    Preempted: SIGTERM arrived; a checkpoint of the last finished step was saved (if a step had run).
  """
  with preemption or preemption_lib.Preemption() as stop:
    return _train(config, workdir, stop)


def _stop_before(stop: preemption_lib.Preemption, step: int, total: int, workdir: str) -> None:
  """Raises Preempted when SIGTERM arrived while the run was starting (no step taken since the start)."""
  if jax.process_count() == 1 and stop.requested():
    saved = f"the newest checkpoint is step {step}" if step else "no checkpoint was written"
    raise Preempted(f"stopped by SIGTERM before step {step + 1} of {total}; nothing to save ({saved} in "
                    f"{checkpoints.checkpoint_dir(workdir)}); run the same command to resume")


def _train(config: ml_collections.ConfigDict, workdir: str,
           stop: preemption_lib.Preemption) -> ts.TrainState:
  try:
    parallel.maybe_initialize_distributed(config.train)
  except parallel.DistributedError as e:
    raise ConfigError(str(e)) from None
  _check_saved_config(config, workdir)
  try:
    model = models.from_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  try:
    weights = metrics_lib.exit_weights(config.optim.exit_weights, model.num_exits)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  tech = techniques(config)
  pipeline = check_pipeline(config.data.get("pipeline", "device"))  # before the (slow) data loading
  if config.train.get("transfer_guard", "allow") not in TRANSFER_GUARDS:
    raise ConfigError(f"config.train.transfer_guard={config.train.transfer_guard!r} is not one of "
                      f"{', '.join(TRANSFER_GUARDS)} (jax.transfer_guard's levels)")
  # Process 0 writes the run's files (every process computes the same validation split).
  data = data_lib.load(config.dataset, config.data, workdir, save_split=jax.process_index() == 0)
  if jax.process_index() == 0:
    rundir.save_config(workdir, config)
  plan = make_plan(config.train, len(data.train_images))
  _stop_before(stop, 0, plan.total_steps, workdir)
  schedule = optim.learning_rate_schedule(config.optim, plan.steps_per_epoch, plan.total_steps)
  tx = optim.create_optimizer(config.optim, schedule)
  root = jax.random.PRNGKey(config.seed)
  with contextlib.ExitStack() as cleanup:
    # Every process opens the manager (creating the directory) before anything reads it, so that all of
    # them see the same checkpoints and make the same orbax calls.
    # Asynchronous saves: the loop goes on while orbax writes; a stop or the end waits for the write.
    mngr = checkpoints.manager(workdir, max_to_keep=config.train.keep_checkpoints,
                               enable_async=bool(config.train.get("async_checkpoints", True)),
                               commit=config.train.get("checkpoint_commit", "auto"))
    cleanup.callback(mngr.close)
    image_size = sources.image_size(config.dataset)
    meta_init = meta_initializer(tech, model.num_exits, jax.random.fold_in(root, 2))
    # A resumed run restores into the state's shapes: it neither runs nor compiles the initialiser.
    state, how = ts.restore_or_init(
        workdir, lambda: ts.init_train_state(model, tx, jax.random.fold_in(root, 0), image_size, meta_init),
        mngr, like=lambda: ts.abstract_train_state(model, tx, image_size, meta_init))
    start = int(state.step)
    logging.info("%s run in %s at step %d of %d (%d steps/epoch, %d shards of %d on %d devices, %d "
                 "processes, %s pipeline)", how, workdir, start, plan.total_steps, plan.steps_per_epoch,
                 plan.num_shards, plan.shard_batch, jax.device_count(), jax.process_count(), pipeline)
    if jax.process_index() == 0:
      count, arrays, table = rundir.write_parameter_overview(workdir, state.params)
      logging.info("%s: %s parameters in %d arrays (table: %s)", config.model.name, f"{count:,}", arrays,
                   table)
    _stop_before(stop, start, plan.total_steps, workdir)

    p_train_step, p_eval_step = make_steps(model, tx, config.aug, plan, weights, data.mean, data.std,
                                           data.num_classes, pipeline, tech)
    feed = make_feed(pipeline, data, config.seed, plan, start,
                     workers=int(config.data.get("workers", 0)))
    cleanup.callback(feed.close)
    aug_rng = parallel.replicate(jax.random.fold_in(root, 1))
    eval_sets = {}
    for name, (x, y) in (("val", (data.val_images, data.val_labels)),
                         ("test", (data.test_images, data.test_labels))):
      if len(x):
        eval_sets[name] = (*cifar.host_shard(x, y, jax.process_index(), jax.process_count(),
                                             drop_remainder=False), len(x))
    eval_every = config.train.eval_every_steps if config.train.eval_every_steps > 0 else plan.steps_per_epoch
    ckpt_every = config.train.checkpoint_every_steps

    writer = summaries.ScalarWriter(workdir, enabled=jax.process_index() == 0)
    cleanup.callback(writer.close)
    state = parallel.replicate(state)
    loop = _Loop(plan, schedule, weights, writer, mngr, start)
    if start >= plan.total_steps:
      logging.info("nothing to do: the run already finished (step %d)", start)
    _stop_before(stop, start, plan.total_steps, workdir)
    single = jax.process_count() == 1
    vote_arrays = {asked: parallel.stop_votes(asked) for asked in (False, True)}  # made once, not per step
    vote_totals: collections.deque = collections.deque()  # the newest steps' summed stop votes
    guard = config.train.get("transfer_guard", "allow")
    received = None  # the step before which this process saw SIGTERM
    for step in range(start, plan.total_steps):
      done = step + 1
      asked = bool(stop.reached(step))
      if asked and received is None:
        received = step
      agreed_stop = False
      # Only explicit transfers in a step (config.train.transfer_guard="disallow" checks it).
      with jax.transfer_guard(guard):
        # Every process votes with each step it dispatches; the step sums the votes over all devices, so
        # every process learns the same total and stops after the same step.
        state, metrics, step_votes = p_train_step(state, *feed(step), vote_arrays[asked], aug_rng)
        if not single:
          # The total of the step VOTE_LAG steps back: reading it waits for that step only, so the host
          # keeps up to VOTE_LAG steps queued, and SIGTERM (whose handler runs only between Python
          # bytecodes) is acted on within VOTE_LAG + 1 steps, on the same step in every process.
          vote_totals.append(step_votes)
          if len(vote_totals) > VOTE_LAG:
            agreed_stop = int(parallel.to_host(vote_totals.popleft())) > 0
      loop.pending.append((done, metrics))
      last = done == plan.total_steps
      if done % config.train.log_every_steps == 0 or last:
        loop.log_train(done)
      if done % eval_every == 0 or last:
        t0 = time.perf_counter()
        scalars = evaluate_all(p_eval_step, state, eval_sets, config.eval.batch_size, weights)
        loop.log_eval(done, scalars, time.perf_counter() - t0)
      if (ckpt_every > 0 and done % ckpt_every == 0) or last:
        loop.save(done, state)
      # One process: stop right after the step that saw the request. Several: after the step following
      # the one whose summed votes say some process was asked (the same step on every process).
      if (stop.reached(done) if single else agreed_stop) and not last:
        if loop.saved_step != done:
          loop.save(done, state)
        mngr.wait_until_finished()
        if received is not None:
          logging.warning("SIGTERM received before step %d; stopping after step %d", received + 1, done)
        raise Preempted(f"stopped by SIGTERM after step {done} of {plan.total_steps}; checkpoint saved "
                        f"in {checkpoints.checkpoint_dir(workdir)}; run the same command to resume")
    mngr.wait_until_finished()
    loop.write_final(workdir, plan.total_steps)
    return jax.tree.map(jnp.asarray, parallel.to_host(state))


class _Loop:
  """The host-side bookkeeping of `train_and_evaluate`: metric buffers, logging, checks and saves."""

  def __init__(self, plan: Plan, schedule, weights: np.ndarray, writer, mngr, start: int):
    self.plan, self.schedule, self.weights = plan, schedule, weights
    self.writer, self.mngr = writer, mngr
    self.pending: list[tuple[int, Metrics]] = []  # (step, device metrics) not yet fetched
    self.sums: dict[str, np.ndarray] | None = None  # host sums since the last log line
    self.latest: dict[str, float] = {}  # the newest value of every scalar, for final_metrics.json
    self.saved_step = start
    self.t_last, self.step_last, self.eval_seconds = time.perf_counter(), start, 0.0

  def _fetch(self) -> None:
    """Adds the pending metrics to the host sums (waits for their steps); stops on a non-finite loss."""
    for step, metrics in self.pending:
      sums = parallel.to_host(metrics)
      if not np.all(np.isfinite(sums["loss"])):
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (per-exit loss sums {sums['loss'].tolist()}); stopped without "
            f"saving it; the last good checkpoint is step {self.saved_step} in "
            f"{self.mngr.directory}. Lower config.optim.learning_rate, lengthen warm-up or use float32")
      self.sums = sums if self.sums is None else jax.tree.map(np.add, self.sums, sums)
    self.pending = []

  def log_train(self, step: int) -> None:
    self._fetch()
    sums, self.sums = self.sums, None
    now = time.perf_counter()
    seconds = max(now - self.t_last - self.eval_seconds, 1e-9)
    steps_per_second = (step - self.step_last) / seconds
    eta_hours = (self.plan.total_steps - step) / steps_per_second / 3600
    scalars = metrics_lib.summarize(sums, self.weights, "train")
    scalars.update(learning_rate=float(self.schedule(step - 1)), steps_per_second=steps_per_second,
                   eta_hours=eta_hours, epoch=step / self.plan.steps_per_epoch)
    self.writer.write_scalars(step, scalars)
    self.latest.update(scalars)
    k = len(self.weights)
    logging.info("step %d/%d (epoch %.2f): loss %.4f, train accuracy exit 1 %.1f%% / exit %d %.1f%%, "
                 "lr %.4g, %.2f steps/s, ETA %.2f h", step, self.plan.total_steps, scalars["epoch"],
                 scalars["train/loss"], 100 * scalars["train/accuracy_exit1"], k,
                 100 * scalars[f"train/accuracy_exit{k}"], scalars["learning_rate"], steps_per_second,
                 eta_hours)
    self.t_last, self.step_last, self.eval_seconds = now, step, 0.0

  def log_eval(self, step: int, scalars: dict[str, float], seconds: float) -> None:
    self.eval_seconds += seconds
    if not scalars:
      return
    self.writer.write_scalars(step, scalars)
    self.latest.update(scalars)
    for split in sorted({name.split("/")[0] for name in scalars}):
      accs = [scalars[f"{split}/accuracy_exit{k}"] for k in range(1, len(self.weights) + 1)]
      logging.info("step %d %s accuracy per exit: %s", step, split, " ".join(f"{100 * a:.2f}" for a in accs))

  def write_final(self, workdir: str, step: int) -> None:
    """Writes the newest train and eval scalars to ``workdir/final_metrics.json`` (process 0)."""
    if jax.process_index() == 0 and self.latest:
      path = os.path.join(workdir, rundir.FINAL_METRICS_FILE)
      with open(path + ".tmp", "w") as f:
        json.dump({"step": step, **self.latest}, f, indent=2, sort_keys=True)
      os.replace(path + ".tmp", path)

  def save(self, step: int, state: ts.TrainState) -> None:
    """Saves `state` after checking every loss since the last check, and the state itself, is finite."""
    self._fetch()  # raises on a non-finite loss
    host = parallel.to_host(state)
    if not ts.all_finite(host.params):
      raise NonFiniteLossError(f"non-finite parameters after step {step}; stopped without saving them; "
                               f"the last good checkpoint is step {self.saved_step} in "
                               f"{self.mngr.directory}")
    checkpoints.save(self.mngr, step, host.to_checkpoint(), wait=False)  # a synchronous manager waits
    self.saved_step = step
    logging.info("saved checkpoint at step %d", step)
