"""TensorBoard summaries: what `ScalarWriter` writes TensorBoard reads, and TensorFlow is never imported."""

import subprocess
import sys

from tensorboard.backend.event_processing import event_accumulator

from msdfuse_jax import summaries
from tests.conftest import REPO


def test_scalars_read_back_by_tensorboard(tmp_path):
  writer = summaries.ScalarWriter(str(tmp_path / "run"))
  writer.write_scalars(1, {"train/loss": 2.5, "learning_rate": 0.125})  # exact in float32
  writer.write_scalars(3, {"train/loss": 1.25})
  acc = event_accumulator.EventAccumulator(str(tmp_path / "run"))
  acc.Reload()  # before close: every write is flushed, so a live run's curves show
  assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5), (3, 1.25)]
  assert [e.value for e in acc.Scalars("learning_rate")] == [0.125]
  writer.close()
  writer.close()  # idempotent


def test_a_second_writer_on_the_same_run_keeps_the_first_ones_events(tmp_path):
  for step in (1, 2):  # a run resumed within the same process and second
    writer = summaries.ScalarWriter(str(tmp_path))
    writer.write_scalars(step, {"train/loss": float(step)})
    writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  assert [e.step for e in acc.Scalars("train/loss")] == [1, 2]


def test_a_disabled_writer_writes_nothing(tmp_path):
  writer = summaries.ScalarWriter(str(tmp_path / "run"), enabled=False)
  writer.write_scalars(1, {"train/loss": 1.0})
  writer.close()
  assert not (tmp_path / "run").exists()


def test_writing_does_not_import_tensorflow(tmp_path):
  # TensorFlow is installed here; tensorboard's own writer would import it (seconds in every run).
  code = ("import sys; from msdfuse_jax import summaries; w = summaries.ScalarWriter(sys.argv[1]); "
          "w.write_scalars(1, {'a': 1.0}); w.close(); assert 'tensorflow' not in sys.modules, 'imported'")
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                        cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
