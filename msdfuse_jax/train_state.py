"""The state of a training run: `TrainState`, its initialisation and its restoration from a checkpoint.

`TrainState` is the one pytree the train step threads through: the step counter, the parameters, the
BatchNorm statistics and the optimiser state, and with L2W-DEN (`msdfuse_jax.l2w`) the meta network's
parameters and Adam state. Checkpoints store it as a plain dict with the same keys (see
`msdfuse_jax.checkpoints`; ``meta`` only when there is one); `restore_or_init` resumes from the newest one,
or starts a fresh optimiser from imported weights, which have no ``opt_state``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from msdfuse_jax import checkpoints, models



@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes; a pytree (replicated over devices while training)."""

  step: jax.Array  # int32 scalar: the number of optimiser steps taken
  params: Any
  batch_stats: Any
  opt_state: Any
  meta: Any = None  # L2W-DEN: {"params": meta network, "opt_state": its Adam state}; None without it

  @property
  def variables(self) -> dict[str, Any]:
    """The model variables, as `model.apply` takes them."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  def to_checkpoint(self) -> dict[str, Any]:
    out = {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
           "opt_state": self.opt_state}
    if self.meta is not None:
      out["meta"] = self.meta
    return out


def _state_of(variables: dict[str, Any], tx: optax.GradientTransformation, meta: Any = None) -> TrainState:
  params = variables["params"]
  # One program for the whole optimiser state: made leaf by leaf, each shape of zeros compiles its own.
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=jax.jit(tx.init)(params),
                    meta=meta)


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                     image_size: int = 32, meta_init: Callable[[], Any] | None = None) -> TrainState:
  """Fresh parameters (initialised from `rng`), BatchNorm statistics and optimiser state, for RGB inputs
  of ``image_size`` (`msdfuse_jax.data.sources.image_size`: 32 for CIFAR, 224 for ImageNet); ``meta``
  from `meta_init` (L2W-DEN's `l2w.init_meta`, bound), None without it."""
  return _state_of(models.init_variables(model, rng, image_size), tx, meta_init() if meta_init else None)


def abstract_train_state(model: nn.Module, tx: optax.GradientTransformation, image_size: int = 32,
                         meta_init: Callable[[], Any] | None = None) -> TrainState:
  """The shapes and dtypes of `init_train_state`'s state (`jax.ShapeDtypeStruct` leaves), computing
  nothing: what a resumed run restores into without initialising (and compiling the initialiser)."""
  init = models.initializer(model, image_size)
  meta = jax.eval_shape(meta_init) if meta_init else None
  return jax.eval_shape(lambda r: _state_of(init(r), tx), jax.random.PRNGKey(0)).replace(meta=meta)


def restore_or_init(workdir: str, fresh: TrainState | Callable[[], TrainState], mngr=None, *,
                    like: TrainState | Callable[[], TrainState] | None = None) -> tuple[TrainState, str]:
  """The newest checkpoint of `workdir` in the structure of the fresh state, or the fresh state itself.

  Args:
    workdir: the run directory.
    fresh: the fresh state, or a function that makes it (`init_train_state`), called only when it is
      needed: no checkpoint, or imported weights. A function needs `like`.
    mngr: the run's checkpoint manager (see `checkpoints.restore`); None opens a read-only one.
    like: the fresh state's shapes and dtypes (`abstract_train_state`), or a function that gives them,
      called only when there is a checkpoint to read; default `fresh` itself.

  Returns:
    (state, how): `how` is 'fresh', 'resumed' or 'imported' (a checkpoint without optimiser state, e.g.
    from `msdfuse-import-torch`: its weights with a fresh optimiser, from step 0).

  Raises:
    checkpoints.CheckpointError: when every checkpoint is unreadable or does not fit the model.
    ValueError: `fresh` is a function and `like` is not given.
  """
  make = fresh if callable(fresh) else lambda: fresh
  if like is None:
    if callable(fresh):
      raise ValueError("restore_or_init: give `like` (abstract_train_state) when `fresh` is a function")
    like = fresh

  @functools.cache
  def host():
    # Restoring into the fresh state's structure gives back optax's named tuples, not nested lists; host
    # arrays of its shapes are all the restore needs of it.
    state = like() if callable(like) else like
    return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), state.to_checkpoint())

  target = lambda keys: {k: v for k, v in host().items() if k in keys}  # read only if there is a checkpoint

  found = checkpoints.restore(workdir, target=target, set_aside_unreadable=True, mngr=mngr)
  if found is None:
    return make(), "fresh"
  _, restored = found
  if restored.get("opt_state") is None:
    state = make().replace(params=restored["params"], batch_stats=restored.get("batch_stats") or {})
    return jax.tree.map(jnp.asarray, state), "imported"
  meta = restored.get("meta")
  if meta is None and (like() if callable(like) else like).meta is not None:
    meta = make().meta  # a run that switches L2W-DEN on: a fresh meta network (what else could it have)
  state = TrainState(step=jnp.asarray(restored["step"], jnp.int32), params=restored["params"],
                     batch_stats=restored["batch_stats"], opt_state=restored["opt_state"], meta=meta)
  return jax.tree.map(jnp.asarray, state), "resumed"


def all_finite(tree: Any) -> bool:
  """Whether every floating-point entry of a (host) pytree is finite."""
  return all(bool(np.isfinite(x).all()) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))
