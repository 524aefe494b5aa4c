"""The budgeted algorithm against a literal torch transcription of the reference.

The transcription (`reference_dynamic_evaluation`) and its random cases live in
experiments/make_budget_torch_fixture.py, which also stores torch's outputs on those cases in
``tests/fixtures/budget_torch.npz``. `test_matches_stored_torch_outputs` compares `budget` with that fixture
and needs no torch (it runs in CI); the live tests run the transcription itself when torch is installed and
check that the fixture is what it produces today.
"""

import pathlib
import sys

import numpy as np
import pytest

from msdfuse_jax.evaluation import budget
from tests.conftest import REPO

pytestmark = pytest.mark.cpu_exact  # number for number against torch's outputs

sys.path.insert(0, str(REPO / "experiments"))
import make_budget_torch_fixture as torch_ref  # noqa: E402  pylint: disable=wrong-import-position

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "budget_torch.npz"
CASE_IDS = [f"K{k}-Nval{nv}-Ntest{nt}-C{c}-seed{s}" for k, nv, nt, c, s in torch_ref.CASES]


def _assert_points_equal(ours, thresholds, accuracy, exit_counts, expected_cost):
  """`budget.dynamic_evaluation`'s points against torch's per-p outputs, to the reference's precision."""
  assert len(ours) == len(thresholds) == budget.NUM_BUDGET_POINTS
  for i, point in enumerate(ours):
    assert point["p"] == i + 1
    np.testing.assert_array_equal(np.asarray(point["thresholds"], np.float32), thresholds[i],
                                  err_msg=f"p={point['p']}")
    assert point["accuracy"] == accuracy[i], point["p"]
    assert point["exit_counts"] == list(exit_counts[i]), point["p"]
    assert point["expected_cost"] == pytest.approx(expected_cost[i], rel=1e-6), point["p"]


def _load_case(index):
  if not FIXTURE.exists():
    pytest.skip(f"{FIXTURE} not found: regenerate it with `python experiments/make_budget_torch_fixture.py` "
                "(needs torch)")
  prefix = f"case{index}/"
  with np.load(FIXTURE) as data:
    case = {key[len(prefix):]: data[key] for key in data.files if key.startswith(prefix)}
  assert tuple(case.get("params", ())) == torch_ref.CASES[index], (
      f"{FIXTURE} does not hold case {index} of CASES: regenerate it with "
      "`python experiments/make_budget_torch_fixture.py`")
  return case


@pytest.mark.parametrize("index", range(len(torch_ref.CASES)), ids=CASE_IDS)
def test_matches_stored_torch_outputs(index):
  case = _load_case(index)
  c = int(case["params"][3])
  probs = {}
  for split in ("val", "test"):
    probs[split] = torch_ref.probs_from_confidences(case[f"{split}_conf"], case[f"{split}_pred"], c)
    # The rebuilt probabilities read as the stored inputs (max and argmax are all the reference uses).
    np.testing.assert_array_equal(probs[split].max(axis=2), case[f"{split}_conf"])
    np.testing.assert_array_equal(probs[split].argmax(axis=2), case[f"{split}_pred"])
  ours = budget.dynamic_evaluation(probs["val"], case["val_labels"].astype(np.int64), probs["test"],
                                   case["test_labels"].astype(np.int64), case["costs"])
  _assert_points_equal(ours, case["thresholds"], case["accuracy"], case["exit_counts"],
                       case["expected_cost"])


@pytest.mark.parametrize("index", range(len(torch_ref.CASES)), ids=CASE_IDS)
def test_matches_reference_number_for_number(index):
  pytest.importorskip("torch")
  case = torch_ref.make_case(*torch_ref.CASES[index])
  ours = budget.dynamic_evaluation(**case)
  ref = torch_ref.reference_dynamic_evaluation(**case)
  thresholds, accuracy, expected, counts = (list(column) for column in zip(*ref))
  _assert_points_equal(ours, thresholds, accuracy, counts, expected)
  if FIXTURE.exists():
    # The stored fixture must be what the transcription produces today; if not (the comparison above
    # passing), CASES, make_case or the transcription changed since it was written.
    stored = _load_case(index)
    stale = f"{FIXTURE} is stale: regenerate it with `python experiments/make_budget_torch_fixture.py`"
    for key, value in (("val_conf", case["val_probs"].max(axis=2)),
                       ("test_conf", case["test_probs"].max(axis=2)),
                       ("test_pred", case["test_probs"].argmax(axis=2)), ("test_labels", case["test_labels"]),
                       ("thresholds", np.stack(thresholds)), ("accuracy", accuracy), ("exit_counts", counts)):
      np.testing.assert_array_equal(stored[key], value, err_msg=f"{key}: {stale}")
    np.testing.assert_allclose(stored["expected_cost"], expected, rtol=1e-12, err_msg=stale)


def test_prior_table_is_torchs():
  torch = pytest.importorskip("torch")
  for k in (1, 5, 7, 10, 24):
    for p in range(1, budget.NUM_BUDGET_POINTS + 1):
      q = torch.FloatTensor(1).fill_(p / 20)
      prior = torch.exp(torch.log(q) * torch.arange(1, k + 1, dtype=torch.float32))
      prior /= prior.sum()
      np.testing.assert_array_equal(budget.exit_prior(p, k), prior.numpy())
