"""The stream pipeline's worker processes (config.data.workers): the same batches as its threads, an
exact resume position, errors that reach the loop, and no worker left behind however the run ends.

A tiny generated image folder (tests/test_imagenet.make_folder) cropped to 32x32, so that the figures
are decoding and not resizing; every worker start costs a few seconds (a fresh Python imports grain).
"""

import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from msdfuse_jax import train
from msdfuse_jax.data import imagenet, sources, stream
from tests.conftest import REPO
from tests.test_imagenet import WNIDS, make_folder

pytest.importorskip("grain")

# 22 training images (24 less the 10% held out, as the folder source does), 5 steps of 4 per epoch.
PLAN = train.Plan(num_shards=2, shard_batch=2, batch_size=4, steps_per_epoch=5, total_steps=12)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return make_folder(tmp_path_factory.mktemp("in"))


def train_source(root, seed=3):
  reader, labels, _, _ = imagenet.read_folder(root, 1000)
  return imagenet.TrainSource(reader, labels, 32, seed)


def read_all(source, start, workers):
  batches = stream.host_batches(source, 3, PLAN, start, shards=range(2), workers=workers)
  try:
    return [{k: np.array(v) for k, v in batch.items()} for batch in batches]
  finally:
    batches.close()


def test_workers_read_the_batches_of_the_threads_from_any_start(folder):
  source = train_source(folder)
  threads = read_all(source, 3, workers=0)
  assert len(threads) == 9 and threads[0]["image"].shape == (2, 2, 32, 32, 3)
  assert not np.array_equal(threads[0]["image"], threads[5]["image"])  # steps 3 and 8 differ
  # One worker from step 3; two workers resumed at step 5 (the checkpointed position is the step).
  for start, workers in ((3, 1), (5, 2)):
    got = read_all(source, start, workers)
    assert len(got) == len(threads) - (start - 3)
    for want, batch in zip(threads[start - 3:], got):
      np.testing.assert_array_equal(batch["image"], want["image"])
      np.testing.assert_array_equal(batch["label"], want["label"])
    assert multiprocessing.active_children() == []  # closing joined every worker


def test_a_worker_error_reaches_the_loop_and_the_workers_stop(tmp_path):
  root = make_folder(tmp_path / "in")
  for path in (root / "train" / WNIDS[1]).iterdir():
    path.write_bytes(b"not a jpeg")  # a third of the images: every step reads one
  feed = stream.StreamFeed(train_source(root), 3, PLAN, 0, workers=1)
  try:
    with pytest.raises(sources.DataError, match=f"cannot decode the image .*{WNIDS[1]}_"):
      for step in range(PLAN.total_steps):
        feed(step)
  finally:
    feed.close()
  assert multiprocessing.active_children() == []
  with pytest.raises(train.ConfigError, match="config.data.workers=-1 must be >= 0"):
    train.make_feed("stream", None, 0, PLAN, 0, workers=-1)


# A process that reads with argv[3] workers, as msdfuse-train does: SIGTERM only asks it to stop.
_READER = textwrap.dedent("""
    import sys, time
    from msdfuse_jax import preemption, train
    from msdfuse_jax.data import imagenet, stream
    reader, labels, _, _ = imagenet.read_folder(sys.argv[1], 1000)
    source = imagenet.TrainSource(reader, labels, 32, 0)
    plan = train.Plan(num_shards=1, shard_batch=4, batch_size=4, steps_per_epoch=5, total_steps=100)
    with preemption.Preemption() as stop:
      workers = int(sys.argv[3])
      batches = stream.host_batches(source, 0, plan, 0, shards=range(1), workers=workers)
      for _ in range(workers):  # one from each worker: all have started (and ignore SIGTERM)
        next(batches)
      print("reading", flush=True)
      while sys.argv[2] == "wait" or not stop.requested():
        time.sleep(0.05)
      read = sum(1 for _ in zip(range(6), batches))  # the workers are still there
      batches.close()
      print("read", read, flush=True)
""")


def _alive_in_group(pgid):
  """Processes of process group `pgid` that are not zombies (an orphan's zombie waits for a reaper)."""
  alive = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[2]) == pgid and fields[0] != "Z":
      alive.append(int(pid))
  return alive


def _start_reader(folder, mode, workers):
  proc = subprocess.Popen([sys.executable, "-c", _READER, str(folder), mode, str(workers)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                          start_new_session=True)
  line = proc.stdout.readline()
  assert line == "reading\n", proc.communicate(timeout=60)[1][-3000:]
  return proc


def _wait_for_empty_group(pgid, seconds=20):
  deadline = time.time() + seconds
  while _alive_in_group(pgid) and time.time() < deadline:
    time.sleep(0.2)
  return _alive_in_group(pgid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_to_the_process_group_stops_the_run_not_the_workers(folder):
  proc = _start_reader(folder, "stop", workers=2)
  try:
    os.killpg(proc.pid, signal.SIGTERM)  # what a supervisor that signals every process does
    out, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-3000:]
  assert "read 6" in out and "leaked" not in err and "Traceback" not in err
  assert _wait_for_empty_group(proc.pid) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_of_a_killed_run_exit_by_themselves(folder):
  proc = _start_reader(folder, "wait", workers=1)
  try:
    assert len(_alive_in_group(proc.pid)) >= 2  # the reader and its worker
    proc.kill()  # SIGKILL: no cleanup runs in the reader
    proc.wait(timeout=60)
    assert _wait_for_empty_group(proc.pid) == []
  finally:
    for pid in _alive_in_group(proc.pid):  # a failed run leaves no process behind either
      os.kill(pid, signal.SIGKILL)
