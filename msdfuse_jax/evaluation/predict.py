"""Per-exit softmax probabilities of a model over a whole image set (every exit, one pass)."""

from __future__ import annotations

from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from msdfuse_jax.data import augment, threads


def make_predict_fn(model: Any, mean: Any, std: Any):
  """A compiled ``(variables, uint8 images) -> (K, B, C) float32 probabilities`` function."""
  # Host constants of the program (three numbers each), not device arrays it would take as arguments.
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)

  @jax.jit
  def predict(variables, images):
    logits = model.apply(variables, augment.eval_batch(images, mean, std), train=False)
    return jax.nn.softmax(jnp.stack(logits).astype(jnp.float32), axis=-1)

  return predict


def predict_probs(model: Any, variables: Any, images: np.ndarray, mean: Any, std: Any,
                  batch_size: int = 500, predict_fn=None) -> np.ndarray:
  """Runs every exit over `images` (uint8 NHWC) in batches; returns (K, N, C) float32 probabilities.

  `images` may be any array-like that slices like numpy (ImageNet's lazily decoded `imagenet.EvalImages`):
  only one batch is materialised at a time. The last batch is padded to `batch_size` (so one program
  serves every batch) and the padding dropped.

  Every transfer is explicit (the loop runs under ``jax.transfer_guard("disallow")``): the variables go to
  the device once (nothing is copied when they are there already), each batch is put there, and each
  result is read back with `jax.device_get`.
  """
  predict = predict_fn or make_predict_fn(model, mean, std)
  if len(images) == 0:
    raise ValueError("no images to evaluate")
  variables = jax.device_put(variables)
  outputs = []
  # The next batches are decoded (ImageNet) in the background while the device computes this one.
  for batch, real in threads.prefetched(host_batches(images, batch_size)):
    outputs.append(jax.device_get(predict(variables, jax.device_put(batch)))[:, :real])
  return np.concatenate(outputs, axis=1)


def host_batches(images: Any, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """`images` in batches of ``min(batch_size, len(images))`` as (uint8 batch, number of real images): the
  last batch padded with copies of its last image."""
  n = len(images)
  batch_size = min(batch_size, n)
  for lo in range(0, n, batch_size):
    batch = np.asarray(images[lo:lo + batch_size])
    real = len(batch)
    if real < batch_size:
      batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - real, axis=0)])
    yield batch, real
