"""Model registry: `build_model(name, num_classes, **overrides)` and the named presets.

Every preset is a multi-exit Flax module following `msdfuse_jax.models.base.MultiExitModule`:
``model.apply(variables, images, train=False, num_exits=None)`` returns one logits array per exit.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from msdfuse_jax.data import sources
from msdfuse_jax.models import base
from msdfuse_jax.models.base import MultiExitModule
from msdfuse_jax.models.densenet_mc import DenseNetMC
from msdfuse_jax.models.msdnet import MSDFuse, MSDFuseImageNet, MSDNet
from msdfuse_jax.models.ranet import RANet
from msdfuse_jax.models.resnet_mc import ResNetMC

_MSDFUSE_SWITCHES = dict(stem="efficient", fusion=True, fused_transition=True, head="msdfuse",
                         activation="gelu")

_IMAGENET = dict(n_blocks=5, step_mode="even", base=4, n_channels=32, growth_rate=16,
                 gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), imagenet=True)

# name -> (module class, hyper-parameters). Every field not given takes the class default.
PRESETS: dict[str, tuple[type[MultiExitModule], dict[str, Any]]] = {
    # MSDNet-PyTorch README, anytime CIFAR: 7 exits after layers 4, 6, ..., 16.
    "msdnet_anytime7": (MSDNet, dict(n_blocks=7, step_mode="even", step=2, base=4, n_channels=16)),
    # MSDNet-PyTorch README, budgeted CIFAR: 5 exits, blocks of 1, 2, 3, 4, 5 layers.
    "msdnet_budget5": (MSDNet, dict(n_blocks=5, step_mode="lin_grow", step=1, base=1, n_channels=16)),
    # Lua MSDNet (the MSDNet and RANet papers' figures).
    "msdnet_anytime10": (MSDNet, dict(n_blocks=10, step_mode="even", step=2, base=4, n_channels=16)),
    "msdnet_budget7": (MSDNet, dict(n_blocks=7, step_mode="lin_grow", step=1, base=1, n_channels=16)),
    # The paper's model, widths calibrated to its cost envelope: see `MSDFuse`'s docstring.
    "msdfuse": (MSDFuse, {}),
    # ImageNet mode (224x224, MSDNet-PyTorch `--data ImageNet`): the README command (step 4) and the step 6
    # and 7 models of the L2W-DEN pretrained checkpoints; 5 blocks, base 4, 4 scales.
    "msdnet_imagenet_step4": (MSDNet, dict(_IMAGENET, step=4)),
    "msdnet_imagenet_step6": (MSDNet, dict(_IMAGENET, step=6)),
    "msdnet_imagenet_step7": (MSDNet, dict(_IMAGENET, step=7)),
    # MSDFuse in ImageNet mode, widths ours (the paper reports no ImageNet model): see `MSDFuseImageNet`.
    "msdfuse_imagenet": (MSDFuseImageNet, {}),
    # Tiny variants for tests and `runlocal` runs: every code path, a fraction of the cost.
    "msdnet_imagenet_tiny": (MSDNet, dict(n_blocks=3, step_mode="even", step=2, base=2, n_channels=8,
                                          growth_rate=4, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4),
                                          imagenet=True)),
    "msdfuse_imagenet_tiny": (MSDNet, dict(n_blocks=3, step_mode="even", step=2, base=2, n_channels=8,
                                           growth_rate=4, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4),
                                           imagenet=True, **_MSDFUSE_SWITCHES)),
    "msdnet_tiny": (MSDNet, dict(n_blocks=3, step_mode="even", step=2, base=2, n_channels=4,
                                 growth_rate=2, head_width=8)),
    "msdfuse_tiny": (MSDNet, dict(n_blocks=3, step_mode="even", step=2, base=2, n_channels=4,
                                  growth_rate=2, head_width=8, **_MSDFUSE_SWITCHES)),
    # RANet-pytorch train_cifar.sh (the RANet paper's CIFAR model): 8 exits.
    "ranet_cifar": (RANet, dict(n_blocks=2, block_step=2, step=4, step_mode="even", scale_list=(1, 2, 3, 3),
                                gr_factor=(4, 2, 1, 1), bn_factor=(4, 2, 1, 1), n_channels=16,
                                growth_rate=6, compress_factor=0.25, reduction=0.5)),
    # RANet-pytorch README example: step 2, 'lg' steps, three flows; 6 exits.
    "ranet_readme": (RANet, dict(n_blocks=2, block_step=2, step=2, step_mode="lg", scale_list=(1, 2, 3),
                                 gr_factor=(4, 2, 1), bn_factor=(4, 2, 1), n_channels=16, growth_rate=6,
                                 compress_factor=0.25, reduction=0.5)),
    # The MSDNet paper's baselines: 62-layer ResNet^MC and 52-layer DenseNet-BC^MC, 7 exits each.
    "resnet_mc": (ResNetMC, dict(widths=(16, 32, 64), blocks_per_stage=10, exit_after=(4, 8))),
    "densenet_mc": (DenseNetMC, dict(growth_rate=8, layers_per_block=16, exit_after=(6, 12))),
    "ranet_tiny": (RANet, dict(n_blocks=1, block_step=1, step=2, step_mode="even", scale_list=(1, 2, 3),
                               gr_factor=(4, 2, 1), bn_factor=(4, 2, 1), n_channels=4, growth_rate=4,
                               head_width=8)),
    "resnet_mc_tiny": (ResNetMC, dict(widths=(4, 8, 16), blocks_per_stage=3, exit_after=(1, 2),
                                      head_width=8)),
    "densenet_mc_tiny": (DenseNetMC, dict(growth_rate=2, layers_per_block=3, exit_after=(1, 2),
                                          head_width=8)),
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
    # Tuples, not lists: ml_collections can override a tuple field from the command line, not a list.
    out[field.name] = tuple(value) if isinstance(value, list) else value
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
  base.check_boost_reweight(model.boost_reweight)
  base.check_bools(model, ("remat",))
  return model


# float16 is not offered: its 5-bit exponent underflows small gradients unless the loss is scaled (dynamic
# loss scaling), which the train step does not do; bfloat16 has float32's exponent range, needs no
# scaling, and is what TPUs and recent NVIDIA GPUs compute fast.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def from_config(config: Any, dtype: str | None = None) -> nn.Module:
  """The model a run's config describes: ``config.model`` (name and fields) for ``config.dataset``.

  Args:
    config: a run config (`configs/cifar.py`, or a workdir's config.json).
    dtype: the compute dtype's name; default ``config.model.dtype``.
  """
  name = dtype or config.model.get("dtype", "float32")
  if name == "float16":
    raise ValueError("config.model.dtype='float16' is not offered (float16 training needs loss scaling, "
                     "which this package does not do): use config.model.dtype=bfloat16")
  if name not in DTYPES:
    raise ValueError(f"unknown config.model.dtype {name!r}; valid choices: {sorted(DTYPES)}")
  fields = {k: v for k, v in config.model.to_dict().items() if k not in ("name", "dtype")}
  return build_model(config.model.name, sources.num_classes(config.dataset), dtype=DTYPES[name], **fields)


# XLA:CPU compiles a model's initialiser (one threefry draw per parameter; the forward pass is pruned) about
# three times faster at LLVM optimisation level 1 than at its default level, to bit-identical values
# (tests/test_models.py checks every initialiser the models use). It runs once per run, so the level does not
# matter for its speed.
_INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1}}


def initializer(model: nn.Module, image_size: int = 32):
  """``rng -> model.init(rng, images)`` on one RGB image of ``image_size`` (eval mode), to jit or to trace
  abstractly (`jax.eval_shape`)."""
  image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  return lambda rng: model.init(rng, image, train=False)


def init_variables(model: nn.Module, rng: jax.Array, image_size: int = 32) -> dict[str, Any]:
  """`initializer` as one compiled program: the values of ``jax.jit(model.init)(rng, images)``, compiled
  on CPU in a third of the time."""
  lowered = jax.jit(initializer(model, image_size)).lower(rng)
  return lowered.compile(compiler_options=_INIT_COMPILER_OPTIONS.get(jax.default_backend()))(rng)


__all__ = ["DTYPES", "from_config", "init_variables", "initializer", "MSDFuse", "MSDNet", "MultiExitModule", "PRESETS", "build_model", "preset_hparams", "preset_names"]
