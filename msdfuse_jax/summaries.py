"""TensorBoard scalar summaries without TensorFlow: the `tensorboard` package's own event-file writer.

Training writes its curves (per-exit loss and accuracy, learning rate, steps/s, ETA) through
`ScalarWriter`, so that a run needs TensorFlow only for the `tfds` data source; accelerator machines
usually have jax and tensorboard but no TensorFlow.
"""

from __future__ import annotations

import time
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter


class ScalarWriter:
  """Writes ``{tag: value}`` scalars at a step into ``logdir/events.out.tfevents.*`` (TensorBoard's format).

  Args:
    logdir: the run directory (TensorBoard reads it with ``--logdir``).
    enabled: False makes every call a no-op (processes other than 0 of a multi-host run).
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = EventFileWriter(logdir) if enabled else None

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                         for tag, value in scalars.items()])
    self._writer.add_event(event_pb2.Event(summary=summary, step=int(step), wall_time=time.time()))

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
