"""Checkpoints of a run: orbax `CheckpointManager` under ``WORKDIR/checkpoints``.

Every checkpoint holds one item, ``state``: a dict with ``step``, ``params``, ``batch_stats`` and, for
checkpoints written by training, ``opt_state``. Imported weights (`msdfuse-import-torch`) have no
``opt_state``; training started from them begins a fresh optimiser.

A step that cannot be read (a half-written or corrupted folder) never loses a run: readers fall back to the
previous step, and training moves the unreadable folder to ``WORKDIR/unreadable_checkpoints/`` (with a
warning naming it), so that the run can save that step again when it gets there.
"""

from __future__ import annotations

import logging as logging_std
import os
import shutil
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from msdfuse_jax import rundir

checkpoint_dir = rundir.checkpoint_dir


class CheckpointError(RuntimeError):
  """No usable checkpoint in a workdir."""


# How a save is committed: "rename" (orbax's default: written in a temporary folder, renamed when complete;
# atomic on local disks and NFS), "commit_file" (written in place, complete once commit_success.txt is
# written: for filesystems whose rename is not atomic, such as a bucket mounted with gcsfuse), or "auto"
# (commit_file on a FUSE mount, rename elsewhere).
COMMIT_MODES = ("auto", "rename", "commit_file")
COMMIT_FILE = "commit_success.txt"  # orbax writes it into a step's folder when the step is complete


def _mount_type(path: str) -> str:
  """The filesystem type of the mount that holds `path` (Linux /proc/mounts; "" elsewhere)."""
  path = os.path.realpath(path)
  best, kind = "", ""
  try:
    with open("/proc/mounts") as f:
      for line in f:
        fields = line.split()
        if len(fields) >= 3 and (path == fields[1] or path.startswith(fields[1].rstrip("/") + "/")):
          if len(fields[1]) >= len(best):
            best, kind = fields[1], fields[2]
  except OSError:
    return ""
  return kind


def commit_mode(workdir: str, requested: str = "auto") -> str:
  """`requested`, with "auto" resolved for `workdir`'s filesystem ("commit_file" on a FUSE mount)."""
  if requested not in COMMIT_MODES:
    raise CheckpointError(f"config.train.checkpoint_commit={requested!r} is not one of {', '.join(COMMIT_MODES)}")
  if requested != "auto":
    return requested
  probe = os.path.abspath(workdir)
  while not os.path.exists(probe) and os.path.dirname(probe) != probe:
    probe = os.path.dirname(probe)
  return "commit_file" if _mount_type(probe).startswith("fuse") else "rename"


def manager(workdir: str, *, max_to_keep: int | None = 3, read_only: bool = False,
            enable_async: bool = False, commit: str = "auto") -> ocp.CheckpointManager:
  """The run's checkpoint manager. Saves are synchronous unless `enable_async` (training's default: the
  loop goes on while orbax writes; `save` with ``wait=False``); `commit` is one of `COMMIT_MODES`."""
  if "://" in workdir:
    raise CheckpointError(f"--workdir={workdir}: give a local path; for a bucket, mount it (gcsfuse) and "
                          "pass the mount's path (see experiments/tpu_vm.md)")
  extra = {}
  if not read_only and commit_mode(workdir, commit) == "commit_file":
    from orbax.checkpoint._src.path import atomicity  # pylint: disable=import-outside-toplevel
    extra["temporary_path_class"] = atomicity.CommitFileTemporaryPath
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only,
                                         read_only=read_only,
                                         enable_async_checkpointing=enable_async, **extra)
  # The handler is named up front (not inferred from the first save), so that a reader's manager can
  # read a step's metadata before restoring it.
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_handlers={"state": ocp.StandardCheckpointHandler()})


def save(mngr: ocp.CheckpointManager, step: int, state: dict[str, Any], *, wait: bool = True) -> None:
  """Saves `state` (a pytree of arrays; replicated arrays must be un-replicated first) at `step`. The
  arrays are copied to host memory first; with an asynchronous manager and ``wait=False`` the files are
  written in the background (`mngr.wait_until_finished` waits for them)."""
  state = jax.tree.map(np.asarray, jax.device_get(state))
  mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
  if wait:
    mngr.wait_until_finished()


def committed(workdir: str, step: int) -> bool:
  """Whether step `step`'s folder is complete (its commit file exists)."""
  return os.path.exists(os.path.join(checkpoint_dir(workdir), str(step), COMMIT_FILE))


def set_aside(workdir: str, step: int) -> str:
  """Moves step `step`'s folder out of ``checkpoints/`` into ``unreadable_checkpoints/``; returns the
  new path. The manager then no longer lists the step, and a later save of it starts afresh."""
  source = os.path.join(checkpoint_dir(workdir), str(step))
  target_dir = os.path.join(os.path.abspath(workdir), rundir.UNREADABLE_CHECKPOINT_DIR)
  os.makedirs(target_dir, exist_ok=True)
  target = os.path.join(target_dir, f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
  shutil.move(source, target)
  return target


# The folders of the steps found unreadable in this process: errors that name one of them come from reads
# orbax abandoned when the restore failed (and already reported in one warning line).
_abandoned_steps: set[str] = set()


def _is_abandoned_read(exc: BaseException | None) -> bool:
  """An error of a read that orbax gave up on: RuntimeError('Event loop is closed') raised by asyncio's
  ``_check_closed`` (the read's remaining tensorstore futures complete after orbax closed their event loop),
  or an error whose message names the folder of a step found unreadable (a read of it that finished later,
  on another thread)."""
  if exc is None:
    return False
  text = str(exc)
  if any(folder in text for folder in _abandoned_steps):
    return True
  if not isinstance(exc, RuntimeError) or text != "Event loop is closed":
    return False
  tb = exc.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  return tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"


class _QuietAbandonedReads(logging_std.Filter):
  """Drops log records (asyncio's "Task exception was never retrieved", a library's logged error) whose
  exception is an abandoned read's."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return not (record.exc_info and _is_abandoned_read(record.exc_info[1]))


_quiet_installed = threading.Lock()
_quiet_done = False


def _quiet_abandoned_reads(step_folder: str | None = None) -> None:
  """From now on, the process prints no traceback for `_is_abandoned_read` errors (each abandoned array
  read of a corrupt step printed one, hundreds in all, through sys.excepthook, sys.unraisablehook,
  threading.excepthook or a logged exception, from tensorstore's and asyncio's threads); every other error
  is printed as before. Installed once a step is unreadable; `step_folder` is that step's folder."""
  global _quiet_done
  if step_folder:
    _abandoned_steps.add(os.path.join(step_folder if "://" in step_folder else os.path.abspath(step_folder), ""))
  with _quiet_installed:
    if _quiet_done:
      return
    _quiet_done = True
  excepthook, unraisablehook, thread_hook = sys.excepthook, sys.unraisablehook, threading.excepthook

  def quiet_excepthook(kind, value, tb):
    if not _is_abandoned_read(value):
      excepthook(kind, value, tb)

  def quiet_unraisablehook(unraisable):
    if not _is_abandoned_read(unraisable.exc_value):
      unraisablehook(unraisable)

  def quiet_thread_hook(args):
    if not _is_abandoned_read(args.exc_value):
      thread_hook(args)

  sys.excepthook, sys.unraisablehook, threading.excepthook = quiet_excepthook, quiet_unraisablehook, \
      quiet_thread_hook
  quiet = _QuietAbandonedReads()
  for handler in logging_std.getLogger().handlers:
    handler.addFilter(quiet)
  logging_std.getLogger("asyncio").addFilter(quiet)


def restore(workdir: str, target: Any | Callable[[set[str]], Any] | None = None, step: int | None = None,
            *, set_aside_unreadable: bool = False, mngr: ocp.CheckpointManager | None = None
            ) -> tuple[int, dict[str, Any]] | None:
  """Restores the newest readable checkpoint (or `step`); None when the workdir has none.

  Each checkpoint is read once: its metadata says which entries it holds, and the arrays are restored
  straight into the structure `target` gives for them.

  Args:
    workdir: the run directory.
    target: the pytree to restore into (e.g. a fresh train state as a dict), or a function from the
      checkpoint's top-level keys (``{"step", "params", ...}``) to that pytree; None restores plain arrays.
    step: a specific step; None for the newest readable one.
    set_aside_unreadable: once an older step has been read, move the unreadable newer ones out of the
      way (training, which will save those steps again) instead of only skipping them (evaluation,
      which leaves the workdir as it is). Nothing is moved when no step can be read. With several
      processes, process 0 moves them and the others wait for it.
    mngr: the run's own manager (training: every process of a multi-process run must make the same
      orbax calls in the same order, so the restore goes through the manager that will save); None opens
      a read-only one.

  Raises:
    CheckpointError: when there are checkpoints but none of them can be read.
  """
  if mngr is None:
    if not os.path.isdir(checkpoint_dir(workdir)):
      return None
    mngr = manager(workdir, max_to_keep=None, read_only=True)
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True)
  errors, unreadable = [], []
  for s in steps:
    if not committed(workdir, s):  # a save cut short (commit-file mode writes in place)
      errors.append(f"step {s}: not committed (a save that was cut short)")
      unreadable.append(s)
      logging.warning("checkpoint step %s in %s was never committed (a save cut short); trying an older "
                      "one", s, checkpoint_dir(workdir))
      continue
    try:
      keys = set(mngr.item_metadata(s)["state"].keys())
      tree = target(keys) if callable(target) else target
      restore_args = ocp.args.StandardRestore(tree) if tree is not None else ocp.args.StandardRestore()
      restored = mngr.restore(s, args=ocp.args.Composite(state=restore_args))
    except Exception as e:  # orbax raises many types for unreadable files  # pylint: disable=broad-except
      _quiet_abandoned_reads(os.path.join(checkpoint_dir(workdir), str(s)))
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}" if str(e) else type(e).__name__
      errors.append(f"step {s}: {reason}")
      unreadable.append(s)
      logging.warning("checkpoint step %s in %s is unreadable (%s); trying an older one", s,
                      checkpoint_dir(workdir), reason)
      continue
    if unreadable and not set_aside_unreadable:  # else the set-aside's own warning says it
      logging.warning("using checkpoint step %s of %s (newer steps %s are unreadable)", s,
                      checkpoint_dir(workdir), unreadable)
    if set_aside_unreadable and unreadable:
      if jax.process_index() == 0:
        for bad in unreadable:
          logging.warning("moved unreadable checkpoint step %s to %s; the run will save that step anew",
                          bad, set_aside(workdir, bad))
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("msdfuse_jax:set_aside_unreadable")
      mngr.reload()
    return int(s), restored["state"]
  never_committed = [s for s in unreadable if not committed(workdir, s)]
  if errors and len(never_committed) == len(unreadable):  # only saves cut short: as if none was made
    if set_aside_unreadable and jax.process_index() == 0:
      for bad in never_committed:
        logging.warning("moved uncommitted checkpoint step %s to %s", bad, set_aside(workdir, bad))
    if set_aside_unreadable:
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
        multihost_utils.sync_global_devices("msdfuse_jax:set_aside_uncommitted")
      mngr.reload()
    return None
  if errors:
    raise CheckpointError(f"no readable checkpoint in {checkpoint_dir(workdir)}: " + "; ".join(errors)
                          + ". Move the unreadable step folders away (or use another --workdir) to start "
                          "over.")
  return None


def load_variables(workdir: str) -> tuple[dict[str, Any], int]:
  """The model variables (``params``, ``batch_stats``) of a run's newest readable checkpoint, and its step."""
  found = restore(workdir)
  if found is None:
    raise CheckpointError(f"no checkpoint in {checkpoint_dir(workdir)}: train first (`msdfuse-train "
                          f"--workdir={workdir}`) or import weights (`msdfuse-import-torch`)")
  step, state = found
  variables = {"params": state["params"]}
  if state.get("batch_stats"):
    variables["batch_stats"] = state["batch_stats"]
  return variables, step
