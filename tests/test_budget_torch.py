"""The budgeted algorithm against a literal torch transcription of the reference (needs torch)."""

import math

import numpy as np
import pytest

from msdfuse_jax.evaluation import budget

torch = pytest.importorskip("torch")


def reference_dynamic_evaluation(val_probs, val_labels, test_probs, test_labels, costs):
  """The reference's steps, one sample at a time, on torch float32 tensors (SPEC.md section 8)."""
  val_probs, test_probs = torch.from_numpy(val_probs), torch.from_numpy(test_probs)
  n_stage, n_val, _ = val_probs.size()
  n_test = test_probs.size(1)
  points = []
  for p in range(1, 40):
    q = torch.FloatTensor(1).fill_(p * 1.0 / 20)
    prior = torch.exp(torch.log(q) * torch.arange(1, n_stage + 1, dtype=torch.float32))
    prior /= prior.sum()
    max_preds, _ = val_probs.max(dim=2)
    _, sorted_idx = max_preds.sort(dim=1, descending=True)
    filtered = torch.zeros(n_val)
    thresholds = torch.Tensor(n_stage).fill_(1e8)
    for k in range(n_stage - 1):
      count, out_n = 0, math.floor(n_val * prior[k])
      for i in range(n_val):
        idx = sorted_idx[k][i]
        if filtered[idx] == 0:
          count += 1
          if count == out_n:
            thresholds[k] = max_preds[k][idx]
            break
      filtered.add_(max_preds[k].ge(thresholds[k]).type_as(filtered))
    thresholds[n_stage - 1] = -1e8
    test_max, test_arg = test_probs.max(dim=2)
    correct, counts = 0, [0] * n_stage
    for i in range(n_test):
      for k in range(n_stage):
        if test_max[k][i].item() >= thresholds[k]:
          correct += int(test_arg[k][i].item()) == int(test_labels[i])
          counts[k] += 1
          break
    expected = sum(counts[k] / n_test * costs[k] for k in range(n_stage))
    points.append((thresholds.numpy(), correct * 100.0 / n_test, expected, counts))
  return points


def _probs(rng, k, n, c, sharp):
  logits = rng.normal(size=(k, n, c)) * np.linspace(1, sharp, k)[:, None, None]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k,n_val,n_test,c,seed", [(7, 500, 300, 10, 0), (5, 517, 1017, 100, 1),
                                                    (11, 500, 200, 10, 2), (3, 21, 40, 4, 3)])
def test_matches_reference_number_for_number(k, n_val, n_test, c, seed):
  rng = np.random.default_rng(seed)
  val, test = _probs(rng, k, n_val, c, 4.0), _probs(rng, k, n_test, c, 4.0)
  val_labels, test_labels = rng.integers(0, c, n_val), rng.integers(0, c, n_test)
  costs = list(np.cumsum(rng.uniform(1e6, 1e7, k)))
  ours = budget.dynamic_evaluation(val, val_labels, test, test_labels, costs)
  ref = reference_dynamic_evaluation(val, val_labels, test, test_labels, costs)
  for point, (thresholds, accuracy, expected, counts) in zip(ours, ref):
    np.testing.assert_array_equal(np.asarray(point["thresholds"], np.float32), thresholds)
    assert point["accuracy"] == accuracy
    assert point["exit_counts"] == counts
    assert point["expected_cost"] == pytest.approx(expected, rel=1e-6)


def test_prior_table_is_torchs():
  for k in (1, 5, 7, 10, 24):
    for p in range(1, 40):
      q = torch.FloatTensor(1).fill_(p / 20)
      prior = torch.exp(torch.log(q) * torch.arange(1, k + 1, dtype=torch.float32))
      prior /= prior.sum()
      np.testing.assert_array_equal(budget.exit_prior(p, k), prior.numpy())
