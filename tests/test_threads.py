"""The host's threads: background prefetching (its order, errors and early exit) and the evaluation loops
that use it, which decode off the main thread and give exactly what a plain loop over the same batches
gives."""

import threading
import time
import types

import jax
import ml_collections
import numpy as np
import optax
import pytest

from msdfuse_jax import metrics, models, parallel, train
from msdfuse_jax.data import augment, imagenet, sources, threads
from msdfuse_jax.evaluation import predict
from tests.test_imagenet import make_folder

MEAN, STD = np.array([0.5, 0.5, 0.5], np.float32), np.array([0.25, 0.25, 0.25], np.float32)


def test_prefetched_gives_every_item_in_order_from_one_background_thread():
  seen_by = []

  def items():
    for i in range(10):
      seen_by.append(threading.get_ident())
      yield i

  assert list(threads.prefetched(items(), depth=3)) == list(range(10))
  assert len(set(seen_by)) == 1 and seen_by[0] != threading.get_ident()
  assert list(threads.prefetched(iter([]))) == []
  with pytest.raises(ValueError, match="at least 1"):
    next(threads.prefetched(range(3), depth=0))


def test_prefetched_raises_an_items_error_where_that_item_was_due():
  def items():
    yield 0
    yield 1
    raise sources.DataError("cannot decode the image x.JPEG")

  got = []
  with pytest.raises(sources.DataError, match="x.JPEG"):
    for item in threads.prefetched(items()):
      got.append(item)
  assert got == [0, 1]


def test_leaving_the_loop_early_computes_no_more_items():
  computed = []

  def items():
    for i in range(100):
      computed.append(i)
      yield i

  for item in threads.prefetched(items(), depth=2):
    if item == 1:
      break
  # Closing waited for the item in progress: at most the two taken and the two ahead were computed.
  done = len(computed)
  assert 2 <= done <= 4
  time.sleep(0.2)
  assert len(computed) == done


class DecodeThreads:
  """An image set that records which thread decodes each batch (``np.asarray`` of a slice), as
  `imagenet.EvalImages` decodes when a batch is taken."""

  def __init__(self, images):
    self.images, self.threads = images, []
    self.shape, self.dtype = images.shape, images.dtype

  def __len__(self):
    return len(self.images)

  def __getitem__(self, index):
    outer = self

    class Batch:
      def __len__(self):
        return len(outer.images[index])

      def __array__(self, dtype=None, copy=None):
        outer.threads.append(threading.get_ident())
        return np.asarray(outer.images[index], dtype)

    return Batch()


@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory):
  """msdnet_tiny at random init, and 9 lazily decoded images of a generated folder at 32x32."""
  reader, labels, _, _ = imagenet.read_folder(make_folder(tmp_path_factory.mktemp("in")), 1000)
  images = imagenet.EvalImages(reader, 32)[:9]
  model = models.build_model("msdnet_tiny", 10)
  return model, models.init_variables(model, jax.random.PRNGKey(0)), images, labels[:9]


def test_predict_probs_equals_a_plain_loop_over_its_batches(eval_setup):
  model, variables, images, _ = eval_setup
  fn = predict.make_predict_fn(model, MEAN, STD)
  recorded = DecodeThreads(images)
  got = predict.predict_probs(model, variables, recorded, MEAN, STD, batch_size=4, predict_fn=fn)
  assert got.shape == (model.num_exits, 9, 10)
  # Decoded off the thread that runs the model: the next batch while the device computes this one.
  assert len(recorded.threads) == 3 and threading.get_ident() not in recorded.threads
  want = []
  for lo in (0, 4, 8):  # the last batch of one image padded to 4 with copies of it
    batch = np.asarray(images[lo:lo + 4])
    batch = np.concatenate([batch, np.repeat(batch[-1:], 4 - len(batch), axis=0)])
    want.append(np.asarray(fn(variables, batch))[:, :min(4, 9 - lo)])
  np.testing.assert_array_equal(got, np.concatenate(want, axis=1))


def test_evaluate_all_equals_a_plain_loop_over_its_batches(eval_setup):
  model, variables, images, labels = eval_setup
  plan = train.Plan(num_shards=1, shard_batch=4, batch_size=4, steps_per_epoch=2, total_steps=2)
  weights = metrics.exit_weights(None, model.num_exits)
  aug = ml_collections.ConfigDict(dict(augment.DEFAULTS))
  _, p_eval_step = train.make_steps(model, optax.sgd(0.1), aug, plan, weights, MEAN, STD, 10, "stream")
  state = types.SimpleNamespace(variables=parallel.replicate(variables))
  recorded = DecodeThreads(images)
  got = train.evaluate_all(p_eval_step, state, {"test": (recorded, labels, 9)}, 4, weights)
  assert len(recorded.threads) == 3 and threading.get_ident() not in recorded.threads
  sums = None
  for batch in parallel.eval_batches(images, labels, 4, 9):
    out = parallel.to_host(p_eval_step(state.variables, parallel.batch(batch)))
    sums = out if sums is None else jax.tree.map(np.add, sums, out)
  assert float(sums["count"]) == 9
  assert got == metrics.summarize(sums, weights, "test")
