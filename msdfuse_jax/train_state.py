"""The state of a training run: `TrainState`, its initialisation and its restoration from a checkpoint.

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
import numpy as np
import optax

from msdfuse_jax import checkpoints



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


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                     image_size: int = 32) -> TrainState:
  """Fresh parameters (initialised from `rng`), BatchNorm statistics and optimiser state, for RGB inputs
  of ``image_size`` (`msdfuse_jax.data.sources.image_size`: 32 for CIFAR, 224 for ImageNet)."""
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  # Jitted so that initialisation is one compiled program (cached) rather than hundreds of eager ops.
  variables = jax.jit(lambda r: model.init(r, image, train=False))(rng)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


def restore_or_init(workdir: str, fresh: TrainState, mngr=None) -> tuple[TrainState, str]:
  """The newest checkpoint of `workdir` in the structure of `fresh`, or `fresh` itself.

  `mngr` is the run's checkpoint manager (see `checkpoints.restore`); None opens a read-only one.

  Returns:
    (state, how): `how` is 'fresh', 'resumed' or 'imported' (a checkpoint without optimiser state, e.g.
    from `msdfuse-import-torch`: its weights with a fresh optimiser, from step 0).

  Raises:
    checkpoints.CheckpointError: when every checkpoint is unreadable or does not fit the model.
  """
  host = jax.tree.map(np.asarray, jax.device_get(fresh.to_checkpoint()))
  # Restoring into the fresh state's structure gives back optax's named tuples, not nested lists.
  target = lambda keys: {k: v for k, v in host.items() if k in keys}
  found = checkpoints.restore(workdir, target=target, set_aside_unreadable=True, mngr=mngr)
  if found is None:
    return fresh, "fresh"
  _, restored = found
  if restored.get("opt_state") is None:
    state = fresh.replace(params=restored["params"], batch_stats=restored.get("batch_stats") or {})
    return jax.tree.map(jnp.asarray, state), "imported"
  state = TrainState(step=jnp.asarray(restored["step"], jnp.int32), params=restored["params"],
                     batch_stats=restored["batch_stats"], opt_state=restored["opt_state"])
  return jax.tree.map(jnp.asarray, state), "resumed"


def all_finite(tree: Any) -> bool:
  """Whether every floating-point entry of a (host) pytree is finite."""
  return all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))
