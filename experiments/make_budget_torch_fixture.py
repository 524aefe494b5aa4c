"""Records a literal torch transcription of the budgeted reference: the fixture of tests/test_budget_torch.py.

`reference_dynamic_evaluation` below is MSDNet-PyTorch's `dynamic_eval_find_threshold` +
`dynamic_eval_with_threshold`, step by step, one sample at a time, on torch float32
tensors. It is the project's only torch transcription of that algorithm: tests/test_budget_torch.py runs it
live against `msdfuse_jax.evaluation.budget` when torch is installed, and without torch compares `budget`
with what this script stored. Regenerate the fixture by hand, with torch installed, after changing
`CASES`, `make_case` or the transcription (the checked-in fixture was made with torch 2.13.0, CPU build,
on an x86-64 machine):

  python experiments/make_budget_torch_fixture.py  # writes tests/fixtures/budget_torch.npz

The fixture (a compressed npz, about 105 KB) holds, for case i of `CASES`, under ``case{i}/``:

* ``params`` int64 (5,): ``(K, N_val, N_test, C, seed)``, the entry of `CASES`;
* the inputs as the reference reads them, ``probs.max(dim=2)``: ``val_conf`` / ``test_conf`` float32 (K, N)
  (the per-exit max softmax probability) and ``val_pred`` / ``test_pred`` uint8 (K, N) (its class), with
  ``val_labels`` / ``test_labels`` uint8 (N,) (C <= 256 in every case) and ``costs`` float64 (K,). The
  (K, N, C) probabilities themselves (3.6 MB for these cases) are not stored, since the reference uses
  nothing else of them; `probs_from_confidences` rebuilds probabilities with the same max at the same class;
* torch's outputs per p = 1..39: ``thresholds`` float32 (39, K), ``accuracy`` float64 (39,) (percent),
  ``exit_counts`` int64 (39, K) and ``expected_cost`` float64 (39,).

``meta`` is a JSON string with the torch version and the number of cases.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "budget_torch.npz"
NUM_POINTS = 39  # p = 1..39, as in the reference

# (K, N_val, N_test, C, seed): 7 exits; the CIFAR subset's split sizes with 100 classes; 11 exits (where
# torch's prior table matters most); a tiny case.
CASES = ((7, 500, 300, 10, 0), (5, 517, 1017, 100, 1), (11, 500, 200, 10, 2), (3, 21, 40, 4, 3))


def reference_dynamic_evaluation(val_probs, val_labels, test_probs, test_labels, costs):
  """The reference's steps, one sample at a time, on torch float32 tensors."""
  import torch  # pylint: disable=import-outside-toplevel  (the cases and fixture format need no torch)

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


def _probs(rng: np.random.Generator, k: int, n: int, c: int, sharp: float) -> np.ndarray:
  logits = rng.normal(size=(k, n, c)) * np.linspace(1, sharp, k)[:, None, None]
  e = np.exp(logits - logits.max(-1, keepdims=True))
  return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def make_case(k: int, n_val: int, n_test: int, c: int, seed: int) -> dict:
  """One random case of `CASES`: float32 (K, N, C) probabilities (later exits sharper), labels, costs."""
  rng = np.random.default_rng(seed)
  val, test = _probs(rng, k, n_val, c, 4.0), _probs(rng, k, n_test, c, 4.0)
  val_labels, test_labels = rng.integers(0, c, n_val), rng.integers(0, c, n_test)
  costs = list(np.cumsum(rng.uniform(1e6, 1e7, k)))
  return dict(val_probs=val, val_labels=val_labels, test_probs=test, test_labels=test_labels, costs=costs)


def probs_from_confidences(conf: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
  """(K, N, C) float32 probabilities whose max over classes is `conf`, at class `pred` (the only max).

  The rest of each row, ``1 - conf``, is spread evenly over the other classes; every value there is below
  `conf`, since a probability vector's max is at least 1 / C (checked: ValueError otherwise).
  """
  conf = np.asarray(conf, np.float32)
  rest = ((1.0 - conf.astype(np.float64)) / max(num_classes - 1, 1)).astype(np.float32)
  probs = np.repeat(rest[..., None], num_classes, axis=-1)
  np.put_along_axis(probs, np.asarray(pred, np.int64)[..., None], conf[..., None], axis=-1)
  if num_classes > 1 and not np.all(rest < conf):
    raise ValueError("a confidence is not above the even share of the rest; the max would not be unique")
  return probs


def record_case(index: int) -> dict[str, np.ndarray]:
  """Runs the transcription on case `index` of `CASES`; returns its fixture arrays (keys without prefix)."""
  import torch  # pylint: disable=import-outside-toplevel

  params = CASES[index]
  assert params[3] <= 256, "classes are stored as uint8"
  case = make_case(*params)
  out = {"params": np.asarray(params, np.int64), "costs": np.asarray(case["costs"], np.float64)}
  for split in ("val", "test"):
    probs = case[f"{split}_probs"]
    t_conf, t_pred = torch.from_numpy(probs).max(dim=2)
    conf, pred = t_conf.numpy(), t_pred.numpy()
    # What is stored must be what the reference reads, and must rebuild into probabilities that read the same.
    np.testing.assert_array_equal(conf, probs.max(axis=2))
    np.testing.assert_array_equal(pred, probs.argmax(axis=2))
    rebuilt = probs_from_confidences(conf, pred, params[3])
    np.testing.assert_array_equal(rebuilt.max(axis=2), conf)
    np.testing.assert_array_equal(rebuilt.argmax(axis=2), pred)
    out[f"{split}_conf"] = conf.astype(np.float32)
    out[f"{split}_pred"] = pred.astype(np.uint8)
    out[f"{split}_labels"] = np.asarray(case[f"{split}_labels"]).astype(np.uint8)
  points = reference_dynamic_evaluation(**case)
  out["thresholds"] = np.stack([t for t, _, _, _ in points]).astype(np.float32)
  out["accuracy"] = np.asarray([a for _, a, _, _ in points], np.float64)
  out["expected_cost"] = np.asarray([e for _, _, e, _ in points], np.float64)
  out["exit_counts"] = np.asarray([c for _, _, _, c in points], np.int64)
  assert out["thresholds"].shape == (NUM_POINTS, params[0])
  return out


def main() -> None:
  import torch  # pylint: disable=import-outside-toplevel

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=str(DEFAULT_OUT), help="the npz to write")
  args = parser.parse_args()
  arrays = {"meta": np.asarray(json.dumps({"torch": torch.__version__, "num_cases": len(CASES)}))}
  for i in range(len(CASES)):
    arrays.update({f"case{i}/{key}": value for key, value in record_case(i).items()})
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB, {len(CASES)} cases, torch {torch.__version__})")


if __name__ == "__main__":
  main()
