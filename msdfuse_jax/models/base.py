"""The multi-exit contract shared by every network in the package.

A multi-exit network is a sequence of K stages. Stage k maps a state (the images for k = 1, otherwise
whatever stage k-1 returned: a list of per-scale feature maps, say) to ``(new_state, logits_k)``.
Subclasses implement `stage` and `num_exits`; `__call__` and early-exit inference are written once here
and in `msdfuse_jax.inference` against that contract.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax


class MultiExitModule(nn.Module):
  """Base class: ``__call__(x, *, train=False, num_exits=None) -> tuple of per-exit logits``."""

  @property
  def num_exits(self) -> int:
    raise NotImplementedError

  def stage(self, state: Any, k: int, *, train: bool = False) -> tuple[Any, jax.Array]:
    """Runs stage k (1-based) on `state`; returns the state for stage k+1 and exit k's logits."""
    raise NotImplementedError

  def __call__(self, x: jax.Array, *, train: bool = False,
               num_exits: int | None = None) -> tuple[jax.Array, ...]:
    """Runs exits 1..num_exits (all by default) on NHWC images; returns one logits array per exit.

    `num_exits` is static: the forward pass stops after that exit, so nothing beyond it is traced.
    """
    k_max = check_num_exits(num_exits, self.num_exits)
    state, outputs = x, []
    for k in range(1, k_max + 1):
      state, logits = self.stage(state, k, train=train)
      outputs.append(logits)
    return tuple(outputs)


def check_num_exits(num_exits: int | None, total: int) -> int:
  """Resolves `num_exits` (None = all) and raises ValueError when it is out of range."""
  if num_exits is None:
    return total
  if not isinstance(num_exits, int) or not 1 <= num_exits <= total:
    raise ValueError(f"num_exits must be an integer in [1, {total}] (or None for all), got {num_exits!r}")
  return num_exits
