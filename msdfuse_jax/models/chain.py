"""The frame the MSDNet paper's two chain baselines share (`ResNetMC`, `DenseNetMC`).

A chain network runs its units (residual blocks, dense layers) resolution after resolution. At every
resolution an intermediate exit follows the units named in `exit_after`; the last unit of the last
resolution has the final exit. Every exit gets the same kind of head (`layers.baseline_head`), so the head
settings, the exit schedule and their checks live here once.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from msdfuse_jax.models import base, layers

Dtype = Any


def exit_schedule(n_stages: int, n_units: int, exit_after: Sequence[int]) -> list[list[tuple[int, int]]]:
  """Splits the (stage, unit) sequence of a chain network into the segments that end at each exit.

  Unit u of every stage is followed by an exit when u is in `exit_after`; the last unit of the last stage
  always is. Stages and units are 1-based.
  """
  schedule, pending = [], []
  for s in range(1, n_stages + 1):
    for u in range(1, n_units + 1):
      pending.append((s, u))
      if u in exit_after or (s == n_stages and u == n_units):
        schedule.append(pending)
        pending = []
  return schedule


def check_exit_positions(exit_after: Sequence[int], n: int, n_name: str) -> None:
  """`exit_after` must be strictly increasing integers in [1, n - 1] (unit n has the final exit)."""
  ok = (isinstance(exit_after, (tuple, list)) and all(isinstance(e, int) and not isinstance(e, bool)
                                                       for e in exit_after)
        and list(exit_after) == sorted(set(exit_after)))
  if not ok or any(not 1 <= e < n for e in exit_after):
    raise ValueError(f"exit_after must hold strictly increasing integers in [1, {n_name} - 1 = {n - 1}], "
                     f"got {tuple(exit_after) if isinstance(exit_after, (tuple, list)) else exit_after!r}")


class ChainMC(base.MultiExitModule):
  """A chain network with intermediate classifiers. Subclasses give `chain_shape` and build their units.

  Attributes:
    num_classes: classes of every exit.
    exit_after: 1-based unit indices (within each resolution) followed by an intermediate exit.
    head: 'msdnet' (MSDNet's CIFAR head on the map average-pooled to `head_resolution`) or 'pool' (the
      network's own classifier, global average pool -> Linear, at every exit).
    head_width, head_resolution: the MSDNet head's width and the map size it sees.
    bn_unbiased_var: BatchNorm's running variance as PyTorch keeps it (`layers.batch_norm`).
  """

  num_classes: int = 10
  exit_after: Sequence[int] = (1,)
  head: str = "msdnet"
  head_width: int = 128
  head_resolution: int = 8
  bn_unbiased_var: bool = True
  dtype: Dtype = jnp.float32

  @property
  def chain_shape(self) -> tuple[int, int, str]:
    """(resolutions, units per resolution, the field that sets the units)."""
    raise NotImplementedError

  @property
  def num_exits(self) -> int:
    return self.chain_shape[0] * len(self.exit_after) + 1

  def schedule(self) -> list[list[tuple[int, int]]]:
    """For each exit, the (resolution, unit) pairs (both 1-based) run since the previous exit."""
    resolutions, units, _ = self.chain_shape
    return exit_schedule(resolutions, units, self.exit_after)

  def validate_chain(self) -> None:
    """Raises ValueError naming a bad head setting or exit position (after the subclass's own checks)."""
    base.check_choice("head", self.head, layers.BASELINE_HEADS)
    base.check_positive_ints(self, ("head_width", "head_resolution"))
    base.check_bools(self, ("bn_unbiased_var",))
    _, units, units_field = self.chain_shape
    check_exit_positions(self.exit_after, units, units_field)

  def setup_heads(self, pre_activation: bool, norm: Callable[..., nn.Module], init: layers.Init) -> None:
    """Creates ``exit1`` .. ``exitK`` (call it in `setup`)."""
    for k in range(1, self.num_exits + 1):
      setattr(self, f"exit{k}", layers.baseline_head(self.head, self.num_classes, self.head_width,
                                                     self.head_resolution, pre_activation, norm, init,
                                                     self.dtype))
