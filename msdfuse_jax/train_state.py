"""The state of a training run, its optimiser and learning-rate schedule (SPEC.md section 7).

`TrainState` is the one pytree the train step threads through: the step counter, the parameters, the
BatchNorm statistics and the optimiser state. Checkpoints store it as a plain dict with the same four keys
(see `msdfuse_jax.checkpoints`); `restore_or_init` resumes from the newest one, or starts a fresh optimiser
from imported weights, which have no ``opt_state``.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from msdfuse_jax import checkpoints

IMAGE_SHAPE = (32, 32, 3)  # CIFAR, NHWC without the batch dimension


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree (replicated over devices while training)."""

  step: jax.Array  # int32 scalar: the number of optimiser steps taken
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    """The model variables, as `model.apply` takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  def to_checkpoint(self) -> dict[str, Any]:
    return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
            "opt_state": self.opt_state}


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 over ``optim.warmup_epochs``, then per-step cosine decay to 0 at `total_steps`.

  The warm-up is shortened to half the run when a short run (``train.num_steps``) would not outlast it.
  """
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps:
    logging.warning("warm-up of %d steps is longer than the run (%d steps); using %d", warmup,
                    total_steps, total_steps // 2)
    warmup = total_steps // 2
  return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=optim.learning_rate,
                                            warmup_steps=warmup, decay_steps=total_steps,
                                            end_value=0.0)


def weight_decay_mask(params: Any) -> Any:
  """True for the parameters that get weight decay: every array of rank > 1 (not biases, not BatchNorm)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(optim: ml_collections.ConfigDict,
                     schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with (Nesterov) momentum and coupled weight decay, as PyTorch's ``SGD(weight_decay=...)``.

  The decay term is added to the gradient *before* momentum (``add_decayed_weights`` first in the chain),
  which is what PyTorch does and what the reference recipes were tuned with.
  """
  decay = optax.add_decayed_weights(optim.weight_decay,
                                    mask=None if optim.decay_1d else weight_decay_mask)
  return optax.chain(decay, optax.sgd(schedule, momentum=optim.momentum, nesterov=optim.nesterov))


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
  """Fresh parameters (initialised from `rng`), BatchNorm statistics and optimiser state."""
  # Jitted so that initialisation is one compiled program (cached) rather than hundreds of eager ops.
  variables = jax.jit(lambda r: model.init(r, jnp.zeros((1, *IMAGE_SHAPE), jnp.float32), train=False))(rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def restore_or_init(workdir: str, fresh: TrainState) -> tuple[TrainState, str]:
  """The newest checkpoint of `workdir` in the structure of `fresh`, or `fresh` itself.

  Returns:
    (state, how): `how` is 'fresh', 'resumed' or 'imported' (a checkpoint without optimiser state, e.g.
    from `msdfuse-import-torch`: its weights with a fresh optimiser, from step 0).

  Raises:
    checkpoints.CheckpointError: when every checkpoint is unreadable or does not fit the model.
  """
  found = checkpoints.restore(workdir)
  if found is None:
    return fresh, "fresh"
  step, raw = found
  host = jax.tree.map(np.asarray, jax.device_get(fresh.to_checkpoint()))
  if raw.get("opt_state") is None:
    target = {k: v for k, v in host.items() if k != "opt_state"}
    _, restored = checkpoints.restore(workdir, target=target, step=step)
    state = fresh.replace(params=restored["params"], batch_stats=restored.get("batch_stats") or {})
    return jax.tree.map(jnp.asarray, state), "imported"
  # Restoring into the fresh state's structure gives back optax's named tuples, not nested lists.
  _, restored = checkpoints.restore(workdir, target=host, step=step)
  state = TrainState(step=jnp.asarray(restored["step"], jnp.int32), params=restored["params"],
                     batch_stats=restored["batch_stats"], opt_state=restored["opt_state"])
  return jax.tree.map(jnp.asarray, state), "resumed"


def all_finite(tree: Any) -> bool:
  """Whether every floating-point entry of a (host) pytree is finite."""
  return all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))
