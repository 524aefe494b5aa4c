"""Round trip: a tiny trained checkpoint -> msdfuse-eval artifacts -> curves, figures.

The trained run (`tiny_run_dir`) is shared with tests/test_inference.py, which runs early exit on it.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from configs import cifar
from msdfuse_jax import train
from msdfuse_jax.evaluation import evaluate, report
from tests.conftest import REPO, shared_file


_TINY_RUNS: dict[int, pathlib.Path] = {}  # id(the session's tmp_path_factory) -> its trained run


def tiny_run_dir(tmp_path_factory) -> pathlib.Path:
  """msdnet_tiny trained for 6 steps on the CIFAR-10 subset, once per test session.

  Kept per session (`tmp_path_factory` is the session's), so this module and tests/test_inference.py share
  one run, trained by whichever asks first. Tests only read it; `evaluate_run` adds its ``eval/`` folder.
  """
  if id(tmp_path_factory) in _TINY_RUNS:
    return _TINY_RUNS[id(tmp_path_factory)]
  workdir = tmp_path_factory.mktemp("run")
  config = cifar.get_config("dataset=cifar10,model=msdnet_tiny,runlocal")
  config.data.source = "archive"
  config.data.path = str(shared_file("data", "cifar-10-python-subset.tar.gz"))
  config.train.num_steps = 6
  config.train.eval_every_steps = 6
  config.train.checkpoint_every_steps = 6
  train.train_and_evaluate(config, str(workdir))
  _TINY_RUNS[id(tmp_path_factory)] = workdir
  return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return tiny_run_dir(tmp_path_factory)


@pytest.mark.slow
def test_eval_writes_every_artifact(run_dir):
  # msdfuse-eval as a GPU user would check it: no implicit transfer between host and device anywhere
  # (the weights go to the device once; every batch and every result is an explicit transfer).
  proc = subprocess.run([sys.executable, "-m", "msdfuse_jax.tools.eval_main", f"--workdir={run_dir}",
                         "--noxla"], capture_output=True, text=True, cwd=REPO, timeout=600,
                        env={**os.environ, "JAX_TRANSFER_GUARD": "disallow"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 6; anytime prediction on the test set:" in proc.stdout
  out = run_dir / "eval"
  for name in ("probs_val.npz", "probs_test.npz", "costs.json", "anytime.json", "anytime.csv",
               "anytime.png", "budgeted.json", "budgeted.csv", "budgeted.png"):
    assert (out / name).stat().st_size > 0, name
  with np.load(out / "probs_test.npz") as data:
    probs, labels = data["probs"], data["labels"]
  assert probs.shape == (3, 1017, 10) and labels.shape == (1017,)
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  with np.load(out / "probs_val.npz") as data:
    # The subset's 5,170 training images give a 517-image validation split (10 %).
    assert data["probs"].shape == (3, 517, 10) and data["labels"].shape == (517,)
  costs = json.loads((out / "costs.json").read_text())
  assert [e["exit"] for e in costs["exits"]] == [1, 2, 3]
  rows = json.loads((out / "anytime.json").read_text())
  assert isinstance(rows, list) and len(rows) == 3  # `report.write_anytime` writes the list of rows
  # The anytime top-1 is recomputed from the saved probabilities.
  for k, row in enumerate(rows):
    assert row["top1"] == pytest.approx(100 * np.mean(probs[k].argmax(-1) == labels))
    assert row["op_counter"] == costs["exits"][k]["op_counter"]
  points = json.loads((out / "budgeted.json").read_text())
  assert isinstance(points, list)  # `report.write_budgeted` writes the list of points
  assert len(points) == 39 and [p["p"] for p in points] == list(range(1, 40))
  # Every point's expected cost is its exit fractions dotted with the per-exit costs; a point that mixes
  # exits costs strictly more than exit 1 and less than the whole network.
  exit_costs = np.array([e["op_counter"] for e in costs["exits"]], np.float64)
  for point in points:
    assert sum(point["exit_counts"]) == 1017
    fractions = np.asarray(point["exit_counts"]) / 1017
    assert point["expected_cost"] == pytest.approx(float(fractions @ exit_costs), rel=1e-12)
    if np.count_nonzero(point["exit_counts"]) > 1:
      assert exit_costs[0] < point["expected_cost"] < exit_costs[-1]
  assert any(np.count_nonzero(point["exit_counts"]) > 1 for point in points)
  with open(out / "budgeted.csv") as f:
    assert len(list(csv.DictReader(f))) == 39


@pytest.mark.slow
def test_plot_overlays_runs(run_dir, tmp_path):
  if not (run_dir / "eval" / "anytime.json").exists():
    evaluate.evaluate_run(str(run_dir), with_xla=False)
  out = tmp_path / "curves.png"
  report.plot_runs([run_dir, run_dir], out)
  assert out.read_bytes()[:4] == b"\x89PNG"


def test_eval_cli_without_a_run_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "msdfuse_jax.tools.eval_main", f"--workdir={tmp_path}"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode != 0
  assert "not a run directory" in proc.stderr and "Traceback" not in proc.stderr
