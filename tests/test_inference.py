"""Real early-exit inference equals the simulated budgeted evaluation, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msdfuse_jax import inference, models
from msdfuse_jax.evaluation import budget, predict

MEAN, STD = np.array([0.5, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)


@pytest.fixture(scope="module")
def setup():
  model = models.build_model("msdnet_tiny", 10)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  rng = np.random.default_rng(0)
  # Structured images (class-dependent colour) so that confidences spread out across exits.
  val = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
  test = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8)
  fn = predict.make_predict_fn(model, MEAN, STD)
  val_probs = predict.predict_probs(model, variables, val, MEAN, STD, 32, predict_fn=fn)
  test_probs = predict.predict_probs(model, variables, test, MEAN, STD, 32, predict_fn=fn)
  preprocess = lambda x: (x.astype(jnp.float32) / 255.0 - MEAN) / STD
  runner = inference.EarlyExitRunner(model, variables, preprocess, batch_size=16, num_buckets=3,
                                     chunk_batches=2)
  return model, runner, test, val_probs, test_probs


def test_bucket_sizes():
  assert inference.bucket_sizes(256) == [256, 128, 64, 32, 16]
  assert inference.bucket_sizes(100, 3) == [100, 50, 25]


@pytest.mark.parametrize("p", [1, 4, 10, 20, 39])
def test_early_exit_equals_simulation(setup, p):
  model, runner, test, val_probs, test_probs = setup
  thresholds = budget.fit_thresholds(val_probs, p)
  sim_exits, sim_preds = budget.apply_thresholds(test_probs, thresholds)
  result = runner.run(test, thresholds)
  np.testing.assert_array_equal(result.exits, sim_exits + 1)
  np.testing.assert_array_equal(result.predictions, sim_preds)
  assert result.images_per_second > 0


def test_later_stages_see_only_survivors(setup):
  model, runner, test, val_probs, _ = setup
  thresholds = budget.fit_thresholds(val_probs, 2)  # most samples leave at exit 1
  runner.calls.clear()
  result = runner.run(test, thresholds)
  counts = np.bincount(result.exits - 1, minlength=model.num_exits)
  survivors_2 = len(test) - counts[0]
  images_at_stage_2 = sum(b * n for (k, b), n in runner.calls.items() if k == 2)
  # Stage 2 ran on the survivors only, padded at most to the next bucket once per chunk.
  assert survivors_2 <= images_at_stage_2 < survivors_2 + 2 * 16
  assert set(b for (_, b) in runner.calls) <= set(runner.buckets)


def test_no_recompilation_after_warmup(setup):
  _, runner, test, val_probs, _ = setup
  runner.warmup(test)
  sizes = (runner._first._cache_size(), runner._later._cache_size())  # pylint: disable=protected-access
  for p in (3, 15, 30):
    runner.run(test[: 50 - p], budget.fit_thresholds(val_probs, p))
  assert (runner._first._cache_size(), runner._later._cache_size()) == sizes  # pylint: disable=protected-access


def test_wrong_number_of_thresholds(setup):
  _, runner, test, _, _ = setup
  with pytest.raises(ValueError, match="3 thresholds"):
    runner.run(test, [0.5, -1e8])
