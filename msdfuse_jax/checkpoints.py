"""Checkpoints of a run: orbax `CheckpointManager` under ``WORKDIR/checkpoints``.

Every checkpoint holds one item, ``state``: a dict with ``step``, ``params``, ``batch_stats`` and, for
checkpoints written by training, ``opt_state``. Imported weights (`msdfuse-import-torch`) have no
``opt_state``; training started from them begins a fresh optimiser.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(RuntimeError):
  """No usable checkpoint in a workdir."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def manager(workdir: str, *, max_to_keep: int | None = 3, read_only: bool = False,
            enable_async: bool = False) -> ocp.CheckpointManager:
  """The run's checkpoint manager. Saves are synchronous by default: a run that stops keeps its save."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=enable_async)
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=("state",))


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any]) -> None:
  """Saves `state` (a pytree of arrays; replicated arrays must be un-replicated first) at `step`."""
  state = jax.tree.map(np.asarray, jax.device_get(state))
  mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  mngr.wait_until_finished()


def restore(workdir: str, target: Any | None = None, step: int | None = None
            ) -> tuple[int, dict[str, Any]] | None:
  """Restores the newest readable checkpoint (or `step`); None when the workdir has none.

  A checkpoint that cannot be read (a half-written or corrupted step) is reported and skipped in favour of
  the previous one, so one bad file never loses a whole run.

  Args:
    workdir: the run directory.
    target: an optional pytree with the structure to restore into (e.g. a fresh train state as a dict).
    step: a specific step; None for the newest readable one.
  """
  if not os.path.isdir(checkpoint_dir(workdir)):
    return None
  mngr = manager(workdir, max_to_keep=None, read_only=True)
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  errors = []
  for s in steps:
    try:
      restore_args = ocp.args.StandardRestore(target) if target is not None else ocp.args.StandardRestore()
      restored = mngr.restore(s, args=ocp.args.Composite(state=restore_args))
      return int(s), restored["state"]
    except Exception as e:  # orbax raises many types for unreadable files  # pylint: disable=broad-except
      logging.warning("checkpoint step %s in %s is unreadable (%s); trying an older one", s,
                      checkpoint_dir(workdir), e)
      errors.append(f"step {s}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
  if errors:
    raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(workdir)}: " + "; ".join(errors)
                          + ". Delete the corrupt step folders to start over.")
  return None


def load_variables(workdir: str) -> tuple[dict[str, Any], int]:
  """The model variables (``params``, ``batch_stats``) of a run's newest checkpoint, and its step."""
  found = restore(workdir)
  if found is None:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first (`msdfuse-train "
                          f"--workdir={workdir}`) or import weights (`msdfuse-import-torch`)")
  step, state = found
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  return variables, step
