"""What a user sees when a run recovers: quiet output, a corrupt step set aside, a killed save survived.

Every run is the real `msdfuse-train` in a subprocess (msdnet_tiny, the CIFAR-10 subset, a checkpoint every
2 steps), as a user starts it.
"""

import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from msdfuse_jax import checkpoints
from msdfuse_jax.tools import flags_util
from tests.conftest import REPO, shared_file, tool_command

STEPS = 6
TIMEOUT = 420  # seconds per run, start-up and compilation on a loaded 2-core machine included


def _command(workdir: pathlib.Path, steps: int = STEPS, *extra: str) -> list[str]:
  data = shared_file("data", "cifar-10-python-subset.tar.gz")
  return tool_command(
      "train_main", f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal",
      "--config.data.source=archive", f"--config.data.path={data}", f"--config.train.num_steps={steps}",
      "--config.train.checkpoint_every_steps=2", "--config.train.eval_every_steps=1000",
      "--config.train.log_every_steps=2", f"--workdir={workdir}", *extra)


def _env(**extra: str) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if k != flags_util.LIBRARY_LOGS_ENV}
  return {**env, "JAX_PLATFORMS": "cpu", **extra}


def train(workdir: pathlib.Path, steps: int = STEPS, *extra: str, **env: str) -> str:
  """Runs msdfuse-train to `steps`; returns its stderr (asserting exit status 0)."""
  proc = subprocess.run(_command(workdir, steps, *extra), cwd=REPO, env=_env(**env), capture_output=True, text=True,
                        timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def saved_steps(workdir: pathlib.Path) -> list[int]:
  """The committed checkpoint steps (a step folder without its commit file is a save cut short)."""
  return sorted(int(n) for n in os.listdir(workdir / "checkpoints")
                if n.isdigit() and checkpoints.committed(str(workdir), int(n)))


# The modules whose log lines a default run shows: the project's own.
PROJECT_FILES = {p.name for p in (REPO / "msdfuse_jax").rglob("*.py")}
LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+ +\d+ ([\w.]+):\d+\] ")


def log_sources(stderr: str) -> set[str]:
  return {m.group(1) for line in stderr.splitlines() if (m := LOG_LINE.match(line))}


def test_the_log_filter_keeps_the_projects_lines_and_real_warnings():
  keep = flags_util._ProjectLogFilter()  # pylint: disable=protected-access
  project = str(REPO / "msdfuse_jax" / "train.py")
  library = "/site-packages/optax/schedules/_schedule.py"

  def record(path, level, msg):
    return logging.LogRecord("x", level, path, 1, msg, None, None)

  assert keep.filter(record(project, logging.INFO, "step 2/6"))
  assert not keep.filter(record(library, logging.INFO, "A polynomial schedule was set with ..."))
  assert keep.filter(record(library, logging.WARNING, "a real warning of a library"))
  assert not keep.filter(record("/site-packages/orbax/x.py", logging.WARNING,
                                "Given directory is read only=/run/checkpoints"))


def test_library_logs_come_back_on_request(monkeypatch):
  monkeypatch.delenv(flags_util.LIBRARY_LOGS_ENV, raising=False)
  assert not flags_util.library_logs_wanted()
  monkeypatch.setenv(flags_util.LIBRARY_LOGS_ENV, "1")
  assert flags_util.library_logs_wanted()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("recovery") / "run"
  return workdir, train(workdir, steps=4)


@pytest.mark.slow
def test_a_run_prints_only_its_own_lines(first_run):
  _, err = first_run
  sources = log_sources(err)
  assert "train.py" in sources
  # optax's constant-schedule note (warm-up of 0 epochs) and JAX's TPU probe, among others, are gone.
  assert sources <= PROJECT_FILES, sorted(sources - PROJECT_FILES)
  assert "Traceback" not in err
  assert all(LOG_LINE.match(line) for line in err.splitlines() if line.strip()), err[-3000:]


@pytest.mark.slow
def test_a_corrupt_step_is_set_aside_quietly(first_run, tmp_path):
  source, _ = first_run
  workdir = tmp_path / "run"
  subprocess.run(["cp", "-r", str(source), str(workdir)], check=True)
  assert saved_steps(workdir) == [2, 4]
  # Step 4's array data overwritten in place, sizes kept (the metadata still reads): every array read fails.
  rng = np.random.default_rng(0)
  data_files = [p for p in (workdir / "checkpoints" / "4").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert data_files
  for path in data_files:
    path.write_bytes(rng.integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())
  err = train(workdir, steps=STEPS)
  assert err.count("Traceback") == 0 and "Event loop is closed" not in err, err[-3000:]
  warnings = [line for line in err.splitlines() if line.startswith("W") and "checkpoints.py" in line]
  assert len(warnings) == 2, warnings
  assert "checkpoint step 4" in warnings[0] and "is unreadable" in warnings[0]
  assert "moved unreadable checkpoint step 4" in warnings[1]
  assert "resumed run" in err and "at step 2 of 6" in err
  assert saved_steps(workdir) == [2, 4, 6]
  assert len(os.listdir(workdir / "unreadable_checkpoints")) == 1


# Loaded by the run below through PYTHONPATH: holds the commit that ends step 4's save (orbax's rename, or
# its commit file) until the test kills the process; a marker file says the save got there.
_HOLD_FINALIZE = '''
import asyncio, os, pathlib
from orbax.checkpoint._src.path import atomicity

def _hold(cls):
  original = cls.finalize
  async def held(self, *args, **kwargs):
    if pathlib.Path(str(self._final_path)).name == os.environ["HOLD_STEP"]:
      pathlib.Path(os.environ["HOLD_MARKER"]).write_text(cls.__name__)
      await asyncio.sleep(3600)
    return await original(self, *args, **kwargs)
  cls.finalize = held

_hold(atomicity.AtomicRenameTemporaryPath)
_hold(atomicity.CommitFileTemporaryPath)
'''


@pytest.mark.slow
@pytest.mark.parametrize("commit", ["rename", "commit_file"])
def test_a_kill_during_a_save_resumes_from_the_previous_step(tmp_path, commit):
  """With asynchronous saves (the default), in both commit modes: kill -9 while step 4 is being committed
  (training goes on meanwhile); the same command resumes from step 2 and saves step 4 anew."""
  hook = tmp_path / "hook"
  hook.mkdir()
  (hook / "sitecustomize.py").write_text(_HOLD_FINALIZE)
  marker, workdir = tmp_path / "holding", tmp_path / "run"
  mode = f"--config.train.checkpoint_commit={commit}"
  env = _env(HOLD_STEP="4", HOLD_MARKER=str(marker),
             PYTHONPATH=os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.Popen(_command(workdir, STEPS, mode), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + TIMEOUT
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    assert marker.exists(), proc.communicate(timeout=60)[1][-3000:] if proc.poll() is not None else "timeout"
    assert marker.read_text() == {"rename": "AtomicRenameTemporaryPath",
                                  "commit_file": "CommitFileTemporaryPath"}[commit]
    proc.send_signal(signal.SIGKILL)  # step 4's arrays are written, its folder not yet committed
    proc.communicate(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == -signal.SIGKILL
  assert saved_steps(workdir) == [2]
  err = train(workdir, STEPS, mode)  # the same command, without the hold
  assert "resumed run" in err and "at step 2 of 6" in err, err[-3000:]
  assert "Traceback" not in err
  assert saved_steps(workdir) == [2, 4, 6]


def test_commit_modes_resolve_and_bad_ones_are_named(tmp_path, monkeypatch):
  assert checkpoints.commit_mode(str(tmp_path), "auto") == "rename"  # pytest's tmp: a local disk
  assert checkpoints.commit_mode(str(tmp_path), "commit_file") == "commit_file"
  monkeypatch.setattr(checkpoints, "_mount_type", lambda path: "fuse.gcsfuse")
  assert checkpoints.commit_mode(str(tmp_path / "new" / "run"), "auto") == "commit_file"
  assert checkpoints.commit_mode(str(tmp_path), "rename") == "rename"
  with pytest.raises(checkpoints.CheckpointError, match="checkpoint_commit"):
    checkpoints.commit_mode(str(tmp_path), "atomic")
  with pytest.raises(checkpoints.CheckpointError, match="gcsfuse"):
    checkpoints.manager("gs://bucket/run")


if __name__ == "__main__":
  sys.exit(pytest.main([__file__, "-v"]))


_ABANDONED = """
import logging, sys, threading
from msdfuse_jax import checkpoints
folder = sys.argv[1]
checkpoints._quiet_abandoned_reads(folder)
def fail(message):
  raise ValueError(message)
for message in (f'DATA_LOSS: Error reading local file "{folder}/state/d/81599e": Error decoding b-tree node',
                "an error of something else"):
  thread = threading.Thread(target=fail, args=(message,))
  thread.start()
  thread.join()
try:
  fail(f'DATA_LOSS: Error reading "{folder}/state/d/81599e"')
except ValueError as e:
  logging.getLogger("asyncio").error("Task exception was never retrieved", exc_info=e)
"""


def test_late_reads_of_an_unreadable_step_print_no_traceback(tmp_path):
  """Once a step is found unreadable, an error of a read of its folder that finishes later, on a thread or
  logged by asyncio, prints nothing; any other error still prints its traceback."""
  folder = str(tmp_path / "checkpoints" / "4")
  done = subprocess.run([sys.executable, "-c", _ABANDONED, folder], capture_output=True, text=True,
                        cwd=REPO, timeout=120, check=False)
  assert done.returncode == 0, done.stderr
  assert done.stderr.count("Traceback") == 1 and "an error of something else" in done.stderr, done.stderr
  assert "b-tree" not in done.stderr and "never retrieved" not in done.stderr, done.stderr
