"""A thin supervisor for the processes of a multi-process run: a lost process ends the others in one line.

When a process of a run dies without warning (``kill -9``, out of memory, a host that vanishes), the others
learn it in one of two ways: a collective with it fails at once (its TCP connection is reset), or, when
nothing answers at all, JAX's coordination service misses its heartbeats for
``config.train.heartbeat_timeout_s`` seconds (default `parallel.HEARTBEAT_TIMEOUT_S`) and declares it dead.
In both cases JAX then terminates every surviving process from one of its own threads (a fatal log and
``abort()``: status 134 and pages of C++ and Python dumps), which a process cannot intercept in itself.

So ``msdfuse-train`` with ``config.train.distributed=True`` runs the training in a child process and watches
it: the child's output passes through unchanged until JAX's fatal trail begins; the trail is kept in
``WORKDIR/crash_reports/`` and replaced by one line naming the lost process and the last checkpoint, and
the command exits with `LOST_PROCESS_STATUS`. A collective that fails in the child waits for the
coordination service's verdict (at most the heartbeat timeout plus `VERDICT_MARGIN_S`), so that the line
can name the process. SIGTERM and SIGINT are passed on to the child (preemption works as without the
supervisor); the child dies with the supervisor (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import threading
import time
import traceback

from msdfuse_jax import rundir

SUPERVISED_ENV = "MSDFUSE_JAX_SUPERVISED"  # set in the child: it trains instead of supervising
LOST_PROCESS_STATUS = 4
VERDICT_MARGIN_S = 30  # beyond the heartbeat timeout: the service's polling and the abort itself
CRASH_REPORT_DIR = "crash_reports"

# Lines that begin JAX's fatal trail (the coordination service's errors, the fatal log, the dumps).
_TRAIL = re.compile(r"coordination_service|Terminating process because the JAX distributed service|"
                    r"\*\*\* Check failure stack trace|^Fatal Python error|heartbeat timeout|"
                    r"tasks are unhealthy")
_HEARTBEAT_LOST = re.compile(r"Task (\d+) heartbeat timeout")
_UNHEALTHY = re.compile(r"tasks are unhealthy \(stopped sending heartbeats\):\s*\n?([\d,\s]+)")
# The coordinator (process 0) itself unreachable, as its clients report it.
_COORDINATOR_LOST = re.compile(r"(?i)(failed to send heartbeat|heartbeat.*UNAVAILABLE|"
                               r"coordination service (is|has) (gone|shut ?down|unavailable)|"
                               r"connection refused|Socket closed)")


def supervised() -> bool:
  return os.environ.get(SUPERVISED_ENV) == "1"


def _die_with_parent() -> None:
  """In the child, before exec: SIGKILL when the supervisor dies (Linux; elsewhere nothing)."""
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
  except (OSError, AttributeError):
    pass


def last_checkpoint(workdir: str) -> int | None:
  """The newest committed checkpoint step of `workdir` (orbax's unfinished saves are not step numbers)."""
  try:
    names = os.listdir(rundir.checkpoint_dir(workdir))
  except OSError:
    return None
  steps = [int(n) for n in names if n.isdigit()
           and os.path.exists(os.path.join(rundir.checkpoint_dir(workdir), n, "commit_success.txt"))]
  return max(steps) if steps else None


def lost_processes(trail: str) -> list[str]:
  """Who JAX's trail says is lost: process ids, or "0 (the coordinator)"."""
  ids = set(_HEARTBEAT_LOST.findall(trail))
  for group in _UNHEALTHY.findall(trail):
    ids.update(re.findall(r"\d+", group))
  if ids:
    return sorted(ids, key=int)
  return ["0 (the coordinator)"] if _COORDINATOR_LOST.search(trail) else []


def message(trail: str, workdir: str, heartbeat_s: int, me: int) -> str:
  """The one line that replaces JAX's fatal trail."""
  lost = lost_processes(trail)
  who = (f"process {', '.join(lost)} of the run was lost" if len(lost) == 1 else
         f"processes {', '.join(lost)} of the run were lost" if lost else
         "JAX's distributed service stopped the run (another process was probably lost)")
  step = last_checkpoint(workdir)
  saved = (f"last checkpoint: step {step} in {rundir.checkpoint_dir(workdir)}" if step is not None else
           "no checkpoint was saved yet")
  why = (" (the coordination service it hosts went away)" if lost and lost[0].startswith("0 (") else
         f" (no heartbeat within config.train.heartbeat_timeout_s={heartbeat_s} s, or its connection was "
         "reset)" if lost else "")
  return (f"error: {who}{why}, so process {me if me >= 0 else '?'} stopped too; {saved}; re-run the same "
          "commands on every host to resume")


def _write_report(workdir: str, me: int, trail: str, kind: str = "jax") -> str | None:
  path = os.path.join(workdir, CRASH_REPORT_DIR,
                      f"{time.strftime('%Y%m%d-%H%M%S')}-process{me}-{kind}.txt")
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
      f.write(trail)
  except OSError:
    return None
  return path


def supervise(workdir: str, heartbeat_s: int, me: int) -> int:
  """Runs this command again as the child that trains; returns the exit status for the command."""
  command = [sys.executable, "-m", "msdfuse_jax.tools.train_main", *sys.argv[1:]]
  child = subprocess.Popen(command, env={**os.environ, SUPERVISED_ENV: "1"}, stderr=subprocess.PIPE,
                           preexec_fn=_die_with_parent)
  for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, _: child.send_signal(s))
  trail: list[str] = []

  def relay():
    for raw in iter(child.stderr.readline, b""):
      line = raw.decode(errors="replace")
      if trail or _TRAIL.search(line):
        trail.append(line)
      else:
        sys.stderr.write(line)
        sys.stderr.flush()

  reader = threading.Thread(target=relay, daemon=True)
  reader.start()
  while True:
    try:
      code = child.wait()
      break
    except InterruptedError:
      continue
  reader.join(timeout=10)
  if not trail:
    return code if code >= 0 else 128 - code
  text = "".join(trail)
  report = _write_report(workdir, me, text)
  line = message(text, workdir, heartbeat_s, me)
  print(line + (f" (JAX's report: {report})" if report else ""), file=sys.stderr)
  return LOST_PROCESS_STATUS


def await_verdict(error: BaseException, workdir: str, heartbeat_s: int) -> None:
  """In the child, after a collective failed: wait for the coordination service to name the lost process
  (it then ends this process, and the supervisor says so); if it never does, say what failed and exit."""
  first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
  me = int(os.environ.get("JAX_PROCESS_ID", "-1"))
  try:
    import jax  # pylint: disable=import-outside-toplevel
    me = jax.process_index()
  except Exception:  # pylint: disable=broad-except
    pass
  report = _write_report(workdir, me, "".join(traceback.format_exception(error)), "python")
  time.sleep(heartbeat_s + VERDICT_MARGIN_S)
  step = last_checkpoint(workdir)
  saved = f"last checkpoint: step {step}" if step is not None else "no checkpoint was saved yet"
  sys.stderr.write(f"error: a collective with the other processes failed ({first}); {saved} in "
                   f"{rundir.checkpoint_dir(workdir)}; re-run the same commands on every host to resume"
                   f"{f' (traceback: {report})' if report else ''}\n")
  sys.stderr.flush()
  os._exit(LOST_PROCESS_STATUS)  # pylint: disable=protected-access  (JAX's shutdown would wait and abort)
