"""Per-exit losses and metrics of the train and eval steps, as (sum, count) pairs.

Inside a step every exit's summed cross-entropy and number of correct predictions are computed at once on
the stacked logits, summed over devices with `lax.psum`, and divided on the host (`summarize`), so that
padding, uneven shards and several steps all average correctly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Metrics = dict[str, jax.Array]


def exit_metrics(logits: tuple[jax.Array, ...], targets: jax.Array, labels: jax.Array,
                 mask: jax.Array | None = None) -> Metrics:
  """Per-exit sums of the soft-target cross-entropy and of correct top-1 predictions.

  Args:
    logits: one (B, C) array per exit.
    targets: (B, C) soft targets (one-hot, smoothed or mixed); rows sum to 1.
    labels: (B,) int labels that accuracy is measured against.
    mask: optional (B,) weights, 0 for padding.

  Returns:
    {'loss': (K,) summed cross-entropy, 'correct': (K,) number right, 'count': () number of samples}.
  """
  stacked = jnp.stack([x.astype(jnp.float32) for x in logits])  # (K, B, C): losses in float32 always
  losses = -jnp.sum(targets * jax.nn.log_softmax(stacked, axis=-1), axis=-1)
  correct = (jnp.argmax(stacked, axis=-1) == labels).astype(jnp.float32)
  weight = jnp.ones(labels.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  return {"loss": losses @ weight, "correct": correct @ weight, "count": jnp.sum(weight)}


def summarize(sums: dict[str, np.ndarray], weights: np.ndarray, prefix: str) -> dict[str, float]:
  """Host-side means of `exit_metrics` sums: ``{prefix}/loss`` (weighted sum over exits) and per exit."""
  count = max(float(sums["count"]), 1.0)
  out = {f"{prefix}/loss": float(np.dot(weights, sums["loss"]) / count)}
  for k, (loss, correct) in enumerate(zip(sums["loss"], sums["correct"]), start=1):
    out[f"{prefix}/loss_exit{k}"] = float(loss / count)
    out[f"{prefix}/accuracy_exit{k}"] = float(correct / count)
  if float(sums.get("meta_count", 0)) > 0:  # L2W-DEN's train step: the mean meta loss
    out[f"{prefix}/meta_loss"] = float(sums["meta_loss"] / sums["meta_count"])
  return out


WEIGHT_SCHEMES = ("uniform", "lin_grow")


def exit_weights(weights: Any, num_exits: int) -> np.ndarray:
  """``config.optim.exit_weights`` as an array of K weights.

  None or ``"uniform"``: 1 for every exit (a plain sum, MSDNet's). ``"lin_grow"``: weights growing linearly
  with the exit, ``2k / (K + 1)`` for k = 1..K (they sum to K, as the uniform ones do; the Lua MSDNet
  declares these two names but always trains with uniform weights). Otherwise K numbers.
  """
  if weights is None or (isinstance(weights, str) and weights == "uniform"):
    return np.ones(num_exits, np.float32)
  if isinstance(weights, str):
    if weights == "lin_grow":
      k = np.arange(1, num_exits + 1, dtype=np.float64)
      return (2 * k / (num_exits + 1)).astype(np.float32)
    raise ValueError(f"config.optim.exit_weights={weights!r}: expected one of {WEIGHT_SCHEMES} or "
                     f"{num_exits} numbers")
  weights = np.asarray(weights, np.float32)
  if weights.shape != (num_exits,):
    raise ValueError(f"config.optim.exit_weights has {weights.size} entries but the model has "
                      f"{num_exits} exits")
  return weights
