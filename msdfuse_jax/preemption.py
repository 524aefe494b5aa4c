"""SIGTERM as a request to save and stop at the next step boundary (a preempted VM loses nothing).

`install()` is called by `msdfuse-train` before it imports anything slow (JAX, TensorFlow), so a SIGTERM
that arrives while the run starts (data loading, initialisation, compilation) is remembered too, and the
run stops at the first point where it can say so cleanly. This module imports the standard library only.

Several processes: every process must stop after the same step. Each one votes with every train step it
dispatches (``reached``); the step sums the votes over all devices, and the loop stops every process after
the step that follows the first non-zero sum (see `msdfuse_jax.train`). JAX's own preemption service,
which would replace this SIGTERM handler, is switched off by `parallel.maybe_initialize_distributed`.
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
    """Whether this process asks to save and stop after `step` steps (called at every step)."""
    del step
    return requested()
