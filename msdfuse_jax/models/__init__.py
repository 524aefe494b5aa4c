"""Model registry: `build_model(name, num_classes, **overrides)` and the named presets.

Every preset is a multi-exit Flax module following `msdfuse_jax.models.base.MultiExitModule`:
``model.apply(variables, images, train=False, num_exits=None)`` returns one logits array per exit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from msdfuse_jax.models.base import MultiExitModule
from msdfuse_jax.models.msdnet import MSDNet

_MSDFUSE_SWITCHES = dict(stem="efficient", fusion=True, fused_transition=True, head="msdfuse",
                         activation="gelu")

# name -> (module class, hyper-parameters). Every field not given takes the class default.
PRESETS: dict[str, tuple[type[MultiExitModule], dict[str, Any]]] = {
    # MSDNet-PyTorch README, anytime CIFAR: 7 exits after layers 4, 6, ..., 16.
    "msdnet_anytime7": (MSDNet, dict(n_blocks=7, step_mode="even", step=2, base=4, n_channels=16)),
    # MSDNet-PyTorch README, budgeted CIFAR: 5 exits, blocks of 1, 2, 3, 4, 5 layers.
    "msdnet_budget5": (MSDNet, dict(n_blocks=5, step_mode="lin_grow", step=1, base=1, n_channels=16)),
    # Lua MSDNet (the MSDNet and RANet papers' figures).
    "msdnet_anytime10": (MSDNet, dict(n_blocks=10, step_mode="even", step=2, base=4, n_channels=16)),
    "msdnet_budget7": (MSDNet, dict(n_blocks=7, step_mode="lin_grow", step=1, base=1, n_channels=16)),
    # The paper's model. The paper publishes no widths; these put the per-exit cost on its envelope
    # (first exit 24-27 M, last exit 62-67 M, literature convention). See `msdfuse_preset_doc`.
    "msdfuse": (MSDNet, dict(n_blocks=8, step_mode="even", step=2, base=4, n_channels=64,
                             growth_rate=8, **_MSDFUSE_SWITCHES)),
    # Tiny variants for tests and `runlocal` runs: every code path, a fraction of the cost.
    "msdnet_tiny": (MSDNet, dict(n_blocks=3, step_mode="even", step=2, base=2, n_channels=4,
                                 growth_rate=2, head_width=8)),
    "msdfuse_tiny": (MSDNet, dict(n_blocks=3, step_mode="even", step=2, base=2, n_channels=4,
                                  growth_rate=2, head_width=8, **_MSDFUSE_SWITCHES)),
}


def preset_names() -> list[str]:
  return sorted(PRESETS)


def _lookup(name: str) -> tuple[type[MultiExitModule], dict[str, Any]]:
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; valid choices: {preset_names()}") from None


def preset_hparams(name: str) -> dict[str, Any]:
  """Every hyper-parameter of preset `name` (class defaults filled in), except num_classes and dtype."""
  cls, hparams = _lookup(name)
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in ("num_classes", "dtype", "parent", "name") or not field.init:
      continue
    value = hparams.get(field.name, field.default)
    out[field.name] = list(value) if isinstance(value, tuple) else value
  return out


def build_model(name: str, num_classes: int, **overrides: Any) -> nn.Module:
  """Builds preset `name` for `num_classes` classes, with hyper-parameters overridden by `overrides`.

  Raises:
    ValueError: for an unknown preset or hyper-parameter (naming the valid choices) or an invalid value.
  """
  cls, hparams = _lookup(name)
  valid = sorted(f.name for f in dataclasses.fields(cls)
                 if f.init and f.name not in ("parent", "name", "num_classes"))
  unknown = sorted(set(overrides) - set(valid))
  if unknown:
    raise ValueError(f"unknown hyper-parameter(s) {unknown} for model {name!r}; valid: {valid}")
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
  kwargs = {**hparams, **overrides}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  model = cls(num_classes=num_classes, **kwargs)
  model.validate()  # fail at build time, not deep inside the first trace
  return model


__all__ = ["MSDNet", "MultiExitModule", "PRESETS", "build_model", "preset_hparams", "preset_names"]
