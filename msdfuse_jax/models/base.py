"""The multi-exit contract shared by every network in the package.

A multi-exit network is a sequence of K stages. Stage k maps a state (the images for k = 1, otherwise
whatever stage k-1 returned: a list of per-scale feature maps, say) to ``(new_state, logits_k)``.
Subclasses implement `stage` and `num_exits`; `__call__` and early-exit inference are written once here
and in `msdfuse_jax.inference` against that contract.

Two training techniques live in the contract, so that every architecture has them:

* boosted ensembles (BoostNet): with ``boost_reweight = r > 0`` exit k predicts ``z_k + r * e_{k-1}``,
  where ``z_k`` are its own logits and ``e_{k-1}`` the previous exit's prediction (``e_0 = 0``), taken
  with a stopped gradient, so exit k's loss trains block k and head k only on what the ensemble still gets
  wrong. `__call__`, `ensemble_stage` (early exit) and therefore evaluation, thresholds and costs all see
  the ensembled predictions;
* gradient equilibrium (IMTA): inside ``with gradient_equilibrium():`` (the train step, when
  ``config.optim.gradient_equilibrium``), `exit_branch` rescales the gradient at each exit's branch
  point; forward values are unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax


_GRADIENT_EQUILIBRIUM = contextvars.ContextVar("gradient_equilibrium", default=False)


@contextlib.contextmanager
def gradient_equilibrium(enabled: bool = True) -> Iterator[None]:
  """Models traced inside this context rescale the gradient at their exits' branch points (`exit_branch`).

  A trace-time switch: wrap the loss function's `model.apply`; compiled programs keep what they were traced
  with.
  """
  token = _GRADIENT_EQUILIBRIUM.set(bool(enabled))
  try:
    yield
  finally:
    _GRADIENT_EQUILIBRIUM.reset(token)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def scale_gradient(x: Any, scale: float) -> Any:
  """The identity on `x` (any pytree) whose gradient is multiplied by the Python float `scale`."""
  return x


def _scale_gradient_fwd(x, scale):
  del scale
  return x, None


def _scale_gradient_bwd(scale, _, g):
  return (jax.tree.map(lambda t: t * scale, g),)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def boost(logits: jax.Array, previous: jax.Array | None, reweight: float) -> jax.Array:
  """Exit k's boosted prediction: ``logits + reweight * stop_gradient(previous)`` (`previous` None at k=1)."""
  if not reweight or previous is None:
    return logits
  return logits + reweight * jax.lax.stop_gradient(previous).astype(logits.dtype)


class MultiExitModule(nn.Module):
  """Base class: ``__call__(x, *, train=False, num_exits=None) -> tuple of per-exit predictions``.

  Attributes:
    boost_reweight: BoostNet's ensemble weight r (0.5 in BoostNet); 0 (the default) disables boosting.
    remat: rematerialise each stage in training mode (``flax.linen.remat``): the backward pass recomputes
      a stage's activations from its input instead of keeping them from the forward pass. The same
      values and gradients, less activation memory, about one more forward pass of compute.
  """

  boost_reweight: float = 0.0
  remat: bool = False

  @property
  def num_exits(self) -> int:
    raise NotImplementedError

  def stage(self, state: Any, k: int, *, train: bool = False) -> tuple[Any, jax.Array]:
    """Runs stage k (1-based) on `state`; returns the state for stage k+1 and exit k's logits.

    Implementations pass the features their exit head reads through `exit_branch`.
    """
    raise NotImplementedError

  def exit_branch(self, features: Any, k: int) -> tuple[Any, Any]:
    """(what exit k's head reads, what the trunk carries on) at exit k's branch point.

    Under `gradient_equilibrium` (IMTA): the gradient reaching `features` from the head is multiplied by
    1/(K-k+1) and the one from the trunk past the head by (K-k)/(K-k+1), i.e. the features get 1/(K-k+1)
    and the trunk copy a further (K-k). Otherwise both are `features` itself.
    """
    if not _GRADIENT_EQUILIBRIUM.get():
      return features, features
    remaining = self.num_exits - k
    x = scale_gradient(features, 1.0 / (remaining + 1))
    return x, scale_gradient(x, float(remaining))

  def ensemble_stage(self, carry: Any, k: int, *, train: bool = False) -> tuple[Any, jax.Array]:
    """Stage k with exit k's prediction boosted: `carry` is the images for k = 1, else what stage k-1
    returned; returns ``(carry for stage k+1, exit k's prediction)``. Without boosting it is `stage`."""
    check_boost_reweight(self.boost_reweight)
    if not self.boost_reweight:
      return self.stage(carry, k, train=train)
    state, previous = (carry, None) if k == 1 else carry
    state, logits = self.stage(state, k, train=train)
    prediction = boost(logits, previous, self.boost_reweight)
    return (state, prediction), prediction

  def __call__(self, x: jax.Array, *, train: bool = False,
               num_exits: int | None = None) -> tuple[jax.Array, ...]:
    """Runs exits 1..num_exits (all by default) on NHWC images; returns one prediction per exit (the
    logits, boosted when `boost_reweight` > 0).

    `num_exits` is static: the forward pass stops after that exit, so nothing beyond it is traced.
    """
    k_max = check_num_exits(num_exits, self.num_exits)
    stage = _ensemble_stage
    if self.remat and train:  # nothing to save for a backward pass in eval mode
      # k and train steer Python control flow: static. Only the stage's inputs (the carry) are kept
      # for the backward pass, which recomputes the rest one stage at a time.
      stage = nn.remat(_ensemble_stage, static_argnums=(2, 3))
    carry, outputs = x, []
    for k in range(1, k_max + 1):
      carry, prediction = stage(self, carry, k, train)
      outputs.append(prediction)
    return tuple(outputs)


def _ensemble_stage(module: MultiExitModule, carry: Any, k: int, train: bool) -> tuple[Any, jax.Array]:
  """`MultiExitModule.ensemble_stage` with positional arguments, as `nn.remat`'s static_argnums needs."""
  return module.ensemble_stage(carry, k, train=train)


def check_boost_reweight(value: Any) -> None:
  """`boost_reweight` must be a number >= 0."""
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
    raise ValueError(f"boost_reweight must be a number >= 0 (0 disables boosting; BoostNet uses 0.5), "
                     f"got {value!r}")


def check_num_exits(num_exits: int | None, total: int) -> int:
  """Resolves `num_exits` (None = all) and raises ValueError when it is out of range."""
  if num_exits is None:
    return total
  if isinstance(num_exits, bool) or not isinstance(num_exits, int) or not 1 <= num_exits <= total:
    raise ValueError(f"num_exits must be an integer in [1, {total}] (or None for all), got {num_exits!r}")
  return num_exits


# --- Validation of hyper-parameters: every model's `validate` is written with these. -------------------


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
  """Raises ValueError unless `value` is one of `choices`."""
  if value not in choices:
    raise ValueError(f"unknown {field} {value!r}; valid choices: {list(choices)}")


def check_positive_ints(module: nn.Module, fields: Sequence[str]) -> None:
  """Raises ValueError unless every named field of `module` is an integer >= 1 (not a bool)."""
  for field in fields:
    value = getattr(module, field)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{field} must be a positive integer, got {value!r}")


def check_int_sequence(field: str, values: Sequence[Any], minimum: int = 1) -> None:
  """Raises ValueError unless `values` is a non-empty sequence of integers >= `minimum`."""
  if (not isinstance(values, (tuple, list)) or not values
      or any(isinstance(v, bool) or not isinstance(v, int) or v < minimum for v in values)):
    raise ValueError(f"{field} must be a non-empty sequence of integers >= {minimum}, got {values!r}")


def check_bools(module: nn.Module, fields: Sequence[str]) -> None:
  """Raises ValueError unless every named field of `module` is True or False."""
  for field in fields:
    value = getattr(module, field)
    if not isinstance(value, bool):
      raise ValueError(f"{field} must be True or False, got {value!r}")


def check_unused(module: nn.Module, fields: Sequence[str], reason: str) -> None:
  """A switch without effect in this configuration is an error: each named field must keep its default.

  Args:
    module: the model.
    fields: the fields that `reason` makes irrelevant.
    reason: why they have no effect (e.g. "stem='msdnet'"), for the message.
  """
  defaults = {f.name: f.default for f in dataclasses.fields(module)}
  for field in fields:
    value = getattr(module, field)
    if value != defaults[field]:
      raise ValueError(f"{field}={value!r} has no effect with {reason}; leave it at {defaults[field]!r} "
                       "or change the setting that disables it")

