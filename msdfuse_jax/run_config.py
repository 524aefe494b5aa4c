"""Turning a run's config into objects, and keeping the resolved config beside the run.

A workdir holds ``config.json`` (the resolved config, written at the start of a run) so that evaluation,
inference and resumption need nothing but ``--workdir``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax.numpy as jnp
import ml_collections

from msdfuse_jax import models

NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
CONFIG_FILE = "config.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def num_classes(config: ml_collections.ConfigDict) -> int:
  try:
    return NUM_CLASSES[config.dataset]
  except KeyError:
    raise ValueError(f"unknown dataset {config.dataset!r}; valid choices: {sorted(NUM_CLASSES)}") from None


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The hyper-parameter overrides in ``config.model`` (everything but ``name`` and ``dtype``)."""
  return {k: (tuple(v) if isinstance(v, list) else v)
          for k, v in config.model.to_dict().items() if k not in ("name", "dtype")}


def build_model(config: ml_collections.ConfigDict, dtype: str | None = None):
  """The model that `config` describes, computing in ``dtype`` (default: ``config.model.dtype``)."""
  name = dtype or config.model.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"unknown config.model.dtype {name!r}; valid choices: {sorted(DTYPES)}")
  return models.build_model(config.model.name, num_classes(config), dtype=DTYPES[name],
                            **model_kwargs(config))


def save_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config to ``workdir/config.json``; returns the path."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, CONFIG_FILE)
  with open(path + ".tmp", "w") as f:
    json.dump(config.to_dict(), f, indent=2, sort_keys=True, default=str)
  os.replace(path + ".tmp", path)  # never leave a half-written config behind
  return path


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads ``workdir/config.json``; raises FileNotFoundError saying what the workdir should hold."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a run directory (train with "
                            "`msdfuse-train --workdir=...` or import weights with `msdfuse-import-torch`)")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))
