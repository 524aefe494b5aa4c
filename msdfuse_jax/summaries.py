"""TensorBoard scalar summaries without TensorFlow: event records framed by the `tensorboard` package.

Training writes its curves (per-exit loss and accuracy, learning rate, steps/s, ETA) through
`ScalarWriter`, so that a run needs TensorFlow only for the `tfds` data source; accelerator machines
usually have jax and tensorboard but no TensorFlow. The events file is a plain local file (run directories
are local, as everywhere in the package): tensorboard's own `EventFileWriter` opens its file through
``tf.io.gfile``, which imports TensorFlow whenever it is installed (seconds of start-up in every run).
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from typing import Mapping

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.record_writer import RecordWriter

# The last part of an events file's name: two writers of one process in one second (a run resumed in
# process) write two files, as TensorBoard's own writer does, instead of the second truncating the first.
_WRITER_IDS = itertools.count()


class ScalarWriter:
  """Writes ``{tag: value}`` scalars at a step into ``logdir/events.out.tfevents.*`` (TensorBoard's format).

  Args:
    logdir: the run directory (TensorBoard reads it with ``--logdir``).
    enabled: False makes every call a no-op (processes other than 0 of a multi-host run).
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if not enabled:
      return
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
            f"{next(_WRITER_IDS)}")
    self._writer = RecordWriter(open(os.path.join(logdir, name), "wb"))  # pylint: disable=consider-using-with
    self._write(event_pb2.Event(file_version="brain.Event:2"))

  def _write(self, event: event_pb2.Event) -> None:
    event.wall_time = time.time()
    self._writer.write(event.SerializeToString())

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))
                                         for tag, value in scalars.items()])
    self._write(event_pb2.Event(summary=summary, step=int(step)))
    self.flush()  # TensorBoard shows the curve as it grows

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
