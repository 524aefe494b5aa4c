"""Round trip: a tiny trained checkpoint -> msdfuse-eval artifacts -> curves, figures, early exit."""

import csv
import json
import subprocess
import sys

import numpy as np
import pytest

from configs import cifar
from msdfuse_jax import train
from msdfuse_jax.evaluation import evaluate, report
from tests.conftest import REPO, shared_file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  config = cifar.get_config("dataset=cifar10,model=msdnet_tiny,runlocal")
  config.data.source = "archive"
  config.data.path = str(shared_file("data", "cifar-10-python-subset.tar.gz"))
  config.train.num_steps = 6
  config.train.eval_every_steps = 6
  config.train.checkpoint_every_steps = 6
  train.train_and_evaluate(config, str(workdir))
  return workdir


def test_eval_writes_every_artifact(run_dir):
  summary = evaluate.evaluate_run(str(run_dir), with_xla=False)
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
  anytime = json.loads((out / "anytime.json").read_text())
  rows = anytime["exits"] if isinstance(anytime, dict) else anytime
  # The anytime top-1 is recomputed from the saved probabilities.
  for k, row in enumerate(rows):
    assert row["top1"] == pytest.approx(100 * np.mean(probs[k].argmax(-1) == labels))
    assert row["op_counter"] == costs["exits"][k]["op_counter"]
  budgeted = json.loads((out / "budgeted.json").read_text())
  points = budgeted["points"] if isinstance(budgeted, dict) else budgeted
  assert len(points) == 39 and [p["p"] for p in points] == list(range(1, 40))
  with open(out / "budgeted.csv") as f:
    assert len(list(csv.DictReader(f))) == 39
  assert summary["step"] == 6


def test_plot_overlays_runs(run_dir, tmp_path):
  if not (run_dir / "eval" / "anytime.json").exists():
    evaluate.evaluate_run(str(run_dir), with_xla=False)
  out = tmp_path / "curves.png"
  report.plot_runs([run_dir, run_dir], out)
  assert out.read_bytes()[:4] == b"\x89PNG"


def test_infer_matches_simulation(run_dir):
  out = evaluate.run_inference(str(run_dir), p=8, cost_budget=None, batch_size=64, repeats=1)
  assert out["matches_simulation"] is True
  assert sum(out["exit_counts"]) == out["num_images"] == 1017
  assert out["expected_cost"] <= out["full_cost"]
  by_budget = evaluate.run_inference(str(run_dir), p=None, cost_budget=out["full_cost"] * 0.9,
                                  batch_size=64, repeats=1)
  assert by_budget["matches_simulation"] is True


def test_eval_cli_without_a_run_is_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "msdfuse_jax.tools.eval", f"--workdir={tmp_path}"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode != 0
  assert "not a run directory" in proc.stderr and "Traceback" not in proc.stderr
