"""SIGTERM as a request to save and stop at the next step boundary (a preempted VM loses nothing).

`install()` is called by `msdfuse-train` before it imports anything slow (JAX, TensorFlow), so a SIGTERM
that arrives while the run starts (data loading, initialisation, compilation) is remembered too, and the
run stops at the first point where it can say so cleanly. This module imports the standard library only.

Several processes: every host must stop at the same step, so JAX's preemption service (started by
`jax.distributed.initialize`) picks the step and `multihost_utils.reached_preemption_sync_point` reports it
on every host.
"""

from __future__ import annotations

import signal
import threading

_requested = threading.Event()
_installed: list = []  # the handler that `install` replaced, to restore it


def _handle(signum, frame) -> None:  # only sets a flag: the training loop does the work
  del signum, frame
  _requested.set()


def install() -> None:
  """Turns SIGTERM into a stop request for this process (main thread only; later calls do nothing)."""
  if not _installed and threading.current_thread() is threading.main_thread():
    _installed.append(signal.signal(signal.SIGTERM, _handle))


def uninstall() -> None:
  """Restores the SIGTERM handler that `install` replaced and forgets any request."""
  if _installed:
    signal.signal(signal.SIGTERM, _installed.pop())
  _requested.clear()


def requested() -> bool:
  """Whether SIGTERM arrived since `install`."""
  return _requested.is_set()


class Preemption:
  """The training loop's view of stop requests: ``reached(step)`` after every step.

  As a context manager it installs the handler (if `install` has not already) and restores the previous
  one on exit. Tests subclass it to stop at a chosen step.
  """

  def __init__(self):
    self._owner = False

  def __enter__(self) -> "Preemption":
    if not _installed:
      install()
      self._owner = bool(_installed)
    return self

  def __exit__(self, *exc) -> None:
    if self._owner:
      uninstall()
      self._owner = False

  def requested(self) -> bool:
    """Whether this process was asked to stop (no cross-host agreement: use it before the first step)."""
    return requested()

  def reached(self, step: int) -> bool:
    """Whether to save and stop now, after `step` steps (call it at every step, on every host)."""
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return multihost_utils.reached_preemption_sync_point(step) or requested()
    return requested()
