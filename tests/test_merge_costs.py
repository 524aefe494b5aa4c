"""experiments/merge_costs.py: one table from costs.json files of several backends."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import merge_costs  # noqa: E402  pylint: disable=wrong-import-position


def _report(backend, flops, macs=(10, 20)):
  return {"model": "m", "dataset": "cifar10", "backend": backend,
          "exits": [{"exit": i + 1, "op_counter": m + 1, "macs": m, "xla_flops": f, "params": 5}
                    for i, (m, f) in enumerate(zip(macs, flops))]}


def test_merge_puts_backends_side_by_side():
  header, rows = merge_costs.merge([_report("cpu", [18.0, 36.0]), _report("gpu", [20.0, 40.0])])
  assert header == ["exit", "op_counter", "macs", "params", "xla_flops[cpu]", "xla/2macs[cpu]",
                    "xla_flops[gpu]", "xla/2macs[gpu]"]
  assert rows[1] == [2, 21, 20, 5, 36.0, 0.9, 40.0, 1.0]


def test_different_models_are_refused():
  with pytest.raises(ValueError, match="not the same model"):
    merge_costs.merge([_report("cpu", [1.0, 2.0]), _report("gpu", [1.0, 2.0], macs=(10, 30))])


def test_cli(tmp_path):
  files = []
  for b in ("cpu", "tpu"):
    files.append(tmp_path / f"{b}.json")
    files[-1].write_text(json.dumps(_report(b, [18.0, 36.0])))
  out = tmp_path / "merged.csv"
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / "merge_costs.py"), *map(str, files),
                         f"--csv={out}"], capture_output=True, text=True, check=True)
  assert "xla_flops[tpu]" in proc.stdout and out.read_text().startswith("exit,op_counter")
