"""experiments/device_check.py: every part's figures in device_check.json and .md, failing soft."""

import json
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import device_check  # noqa: E402  pylint: disable=wrong-import-position

PARTS = ("device", "bench", "train", "costs", "infer", "tests")


def test_a_failing_part_is_recorded_and_the_check_goes_on(tmp_path):
  check = device_check.Check(tmp_path, smoke=True, budget_s=600)

  def broken():
    raise FileNotFoundError("no such tool")
  failed = check.part("bench", broken)
  assert failed["ok"] is False and failed["error"] == "FileNotFoundError: no such tool"
  assert check.part("costs", lambda: {"exits": []}) == {"ok": True, "result": {"exits": []},
                                                        "seconds": pytest.approx(0, abs=1)}
  # A run that fails names its last line of stderr and its log; one past its share of the time stops.
  with pytest.raises(device_check.PartError, match=r"exit status 3: boom \(log: .*costs.log\)"):
    check.run("costs", ["-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
  check.pending, check.deadline = [], device_check.time.monotonic() + 12  # 7 s left for the last run
  with pytest.raises(device_check.PartError, match="ran past its 7 s budget"):
    check.run("tests", ["-c", "import time; time.sleep(120)"])
  check.deadline = device_check.time.monotonic() + 8
  with pytest.raises(device_check.PartError, match="skipped: 8 s of the check's budget left"):
    check.run("tests", ["-c", "pass"])


def test_markdown_shows_failed_parts():
  report = {"smoke": True, "budget_s": 175.0, "commit": "abc", "date": "today", "seconds": 12.0,
            "load_average": 1.5,
            "device": {"ok": True, "result": {"count": 1, "kind": "H100", "backend": "gpu",
                                              "memory_bytes": 80 * 2**30, "jax": "0.11", "jaxlib": "0.11",
                                              "python": "3.12", "cpu_count": 16}}}
  report.update({name: {"ok": False, "error": f"{name} broke"} for name in PARTS[1:]})
  text = device_check.markdown(report)
  assert "1 x H100 (gpu, 80 GiB)" in text
  for name in PARTS[1:]:
    assert f"failed: {name} broke" in text


@pytest.mark.slow
def test_smoke_run_writes_every_part(tmp_path):
  # --smoke fits 3 minutes on an idle 2-core CPU with the compilation cache warm; the budget here leaves
  # room for a loaded machine and a cold cache, since the test checks the figures, not the time.
  done = subprocess.run([sys.executable, str(REPO / "experiments" / "device_check.py"), f"--out={tmp_path}",
                         "--smoke", "--budget_s=600"], capture_output=True, text=True, cwd=REPO, timeout=700)
  assert done.returncode == 0, done.stderr[-3000:]
  report = json.loads((tmp_path / "device_check.json").read_text())
  assert set(PARTS) <= set(report) and report["smoke"] is True
  for name in PARTS:
    assert report[name]["ok"], (name, report[name])
  assert report["device"]["result"]["backend"] == "cpu"
  bench = report["bench"]["result"]
  assert sorted(bench) == ["msdfuse_tiny/bfloat16", "msdfuse_tiny/float32", "msdnet_tiny/bfloat16",
                           "msdnet_tiny/float32"]
  for key, run in bench.items():
    assert run["ok"], (key, run)
    assert run["result"]["dtype"] == key.split("/")[1] and run["result"]["train_images_per_s"] > 0
  train = report["train"]["result"]
  assert train["steps"] == 5 and train["images_per_s"] > 0
  assert train["step_ms_spread"]["min"] <= train["step_ms_spread"]["max"]
  costs = report["costs"]["result"]
  assert [e["exit"] for e in costs["exits"]] == [1, 2, 3] and all(e["xla_flops"] > 0 for e in costs["exits"])
  infer = report["infer"]["result"]
  assert infer["transfer_guard"] == "disallow" and infer["matches_simulation"] is True
  assert infer["matmul_precision"]["matches_simulation"] == "highest"
  timed, deadline = infer["budget_ms"], infer["deadline"]
  full_ms = 1e3 / infer["full_network_images_per_s"]
  assert timed["budget_ms"] == pytest.approx(0.9 * full_ms, rel=1e-5) and timed["matches_simulation"] is True
  assert 0 < timed["predicted_ms_per_image"] <= timed["budget_ms"] and timed["realised_ms_per_image"] > 0
  assert deadline["deadline_ms"] == pytest.approx(0.5 * full_ms * 32, rel=1e-5)
  assert deadline["deadline_chunk_size"] == 32 and 0 <= deadline["deadline_met_fraction"] <= 1
  assert deadline["deadline_sweep_range_ms"][0] < deadline["deadline_sweep_range_ms"][1]
  tests = report["tests"]["result"]
  assert tests["passed"] == tests["tests"] == 2 and tests["failed"] == []
  text = (tmp_path / "device_check.md").read_text()
  for heading in ("## msdfuse-bench (CIFAR-100)", "## Training", "## XLA flops per exit", "## msdfuse-infer",
                  "## Tests"):
    assert heading in text
  assert "| msdfuse_tiny | bfloat16 | 4 |" in text and "failed:" not in text
  assert "Time budget " in text and "% of chunks within it" in text
