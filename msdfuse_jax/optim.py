"""The optimiser and learning-rate schedules of the recipes: SGD with momentum, warm-up, cosine or step decay.

Both follow PyTorch, which the reference recipes were tuned with: weight decay is coupled (added to the
gradient before momentum, as ``torch.optim.SGD(weight_decay=...)``), the momentum buffer starts at the
first gradient, and the learning rate changes every step.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax
from absl import logging


SCHEDULES = ("cosine", "step")


def learning_rate_schedule(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """The learning rate of every step, after a linear warm-up from 0 over ``optim.warmup_epochs``.

  ``optim.schedule``: ``cosine`` (the default) decays per step to 0 at `total_steps`; ``step`` multiplies
  the rate by ``optim.decay_factor`` at each epoch of ``optim.decay_epochs`` (MSDNet's ImageNet recipe:
  x0.1 at epochs 30 and 60). The warm-up is shortened to half the run when a short run
  (``train.num_steps``) would not outlast it.

  Raises:
    ValueError: an unknown ``optim.schedule``.
  """
  kind = optim.get("schedule", "cosine")
  if kind not in SCHEDULES:
    raise ValueError(f"config.optim.schedule={kind!r} is not one of {SCHEDULES}")
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  if warmup >= total_steps:
    logging.warning("warm-up of %d steps is longer than the run (%d steps); using %d", warmup,
                    total_steps, total_steps // 2)
    warmup = total_steps // 2
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=optim.learning_rate,
                                              warmup_steps=warmup, decay_steps=total_steps,
                                              end_value=0.0)
  boundaries = {int(round(e * steps_per_epoch)): float(optim.get("decay_factor", 0.1))
                for e in (optim.get("decay_epochs") or ())}
  steps = optax.piecewise_constant_schedule(optim.learning_rate, boundaries)
  if not warmup:
    return steps
  ramp = optax.linear_schedule(0.0, optim.learning_rate, warmup)
  return optax.join_schedules([ramp, lambda n: steps(n + warmup)], [warmup])


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
