"""A run directory: its layout and the resolved config it holds.

Every tool reads and writes a run through this module, so the layout is written down once:

  WORKDIR/
    config.json          the resolved config, written when a run starts (`save_config`)
    val_split.json       the seeded validation indices, reused by resumed runs and evaluation
    checkpoints/         orbax checkpoints, one folder per step (`msdfuse_jax.checkpoints`)
    unreadable_checkpoints/  corrupt steps that training set aside (renamed STEP-DATE), if any
    final_metrics.json   the newest value of every logged scalar, written when training ends
    eval/                what `msdfuse-eval` and `msdfuse-infer` write (probabilities, curves, infer.json)
    events.out.tfevents  TensorBoard summaries

A workdir needs nothing but itself: evaluation, inference and resumption read ``config.json`` and build
the model it describes with `msdfuse_jax.models.from_config`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np

CONFIG_FILE = "config.json"
VAL_SPLIT_FILE = "val_split.json"
CHECKPOINT_DIR = "checkpoints"
UNREADABLE_CHECKPOINT_DIR = "unreadable_checkpoints"  # unreadable steps set aside by training
FINAL_METRICS_FILE = "final_metrics.json"
EVAL_DIR = "eval"
INFER_FILE = "infer.json"  # inside EVAL_DIR
PARAMETERS_FILE = "parameters.txt"  # the model's parameter table, written at the start of every run


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def eval_dir(workdir: str) -> str:
  return os.path.join(workdir, EVAL_DIR)


def write_json(path: str, obj: Any) -> str:
  """Writes `obj` as JSON through a temporary file, so a crash never leaves half a file; returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(path + ".tmp", path)
  return path


def save_config(workdir: str, config: ml_collections.ConfigDict) -> str:
  """Writes the resolved config to ``workdir/config.json``; returns the path."""
  return write_json(os.path.join(workdir, CONFIG_FILE), config.to_dict())


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads ``workdir/config.json``; raises FileNotFoundError saying what the workdir should hold."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: {workdir} is not a run directory (train with "
                            "`msdfuse-train --workdir=...` or import weights with `msdfuse-import-torch`)")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))


def _tuples(obj: Any) -> Any:
  """JSON lists back to the tuples the config held (so that a loaded config equals the saved one)."""
  if isinstance(obj, dict):
    return {k: _tuples(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return tuple(_tuples(v) for v in obj)
  return obj


def write_parameter_overview(workdir: str, params: Any) -> tuple[int, int, str]:
  """Writes the table of `params` (clu.parameter_overview: name, shape, size, mean and std of each array) to
  ``WORKDIR/parameters.txt``; returns (parameter count, array count, the file's path)."""
  from clu import parameter_overview  # pylint: disable=import-outside-toplevel  (imports no TensorFlow)
  import jax  # pylint: disable=import-outside-toplevel
  params = jax.tree.map(np.asarray, jax.device_get(params))
  path = os.path.join(workdir, PARAMETERS_FILE)
  with open(path, "w") as f:
    f.write(parameter_overview.get_parameter_overview(params, include_stats=True) + "\n")
  return parameter_overview.count_parameters(params), len(jax.tree.leaves(params)), path
