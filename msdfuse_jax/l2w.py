"""L2W-DEN: meta-learned per-sample, per-exit loss weights (Han et al., "Learning to Weight Samples for
Dynamic Early-exiting Networks", ECCV 2022; github.com/LeapLabTHU/L2W-DEN), as a switch of the train step.

A small meta network maps each sample's per-exit losses (or confidences, or both) to per-exit weights
``1 + epsilon * (w - mean(w))``, which scale that sample's exit losses. It is trained so that a one-step
look-ahead of the classifier -- the real optimiser's update (coupled weight decay, momentum, Nesterov, as
configured), applied functionally to the gradient of the weighted loss -- does well on held-out samples
*at the exit each of them would leave by at test time*: the meta half of the batch is split among the exits
by the target exit distribution of `target_probs` (the geometric family of the authors' `calc_target_probs`),
each exit taking the most confident of the samples still left, and the meta loss is the sum over exits of
the mean cross-entropy of the samples it took. In PyTorch this needs a functional copy of the network and
``create_graph=True``; here it is ``jax.grad`` through ``tx.update``.

One train step on a batch shard runs the authors' loop body: the shard's two halves take turns as train and
meta half (first half trains, second is the meta half; then the other way round, from the updated state),
each turn being (1) an Adam step of the meta network on the look-ahead's meta loss, (2) an SGD step of the
classifier on the train half's losses weighted by the updated meta network (no gradient into it). Both SGD
steps of one train step use that step's learning rate, as the authors' per-batch schedule does, and the meta
learning rate follows their cosine ``0.5 * meta_lr * (1 + cos(pi * step / total_steps))``, without warm-up.

Where the authors' code makes choices a reader may question, this module keeps their behaviour:

* the look-ahead's forward passes run in training mode, so the meta half is normalised with its own batch
  statistics (not the running ones test time uses);
* each exit's meta cross-entropy is a mean over the samples that exit took, so an exit that takes 2 samples
  weighs as much in the meta loss as one that takes 100 (an exit that takes none contributes 0);
* the look-ahead is per batch shard (the authors': per GPU; their look-ahead network is not wrapped in
  DistributedDataParallel), the meta gradients are averaged over shards and devices (their meta network is).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

INPUT_TYPES = ("loss", "conf", "both")
CONSTRAINTS = ("row", "col", "mat")
NUM_TARGET_FAMILY = 39  # calc_target_probs: p = 1/20, 2/20, ..., 39/20


@dataclasses.dataclass(frozen=True)
class L2W:
  """``config.l2w`` (static): the authors' knobs under their names; defaults = their CIFAR command."""

  meta_net_hidden_size: int = 500
  meta_net_num_layers: int = 1
  meta_net_input_type: str = "loss"   # loss | conf | both: what the meta network reads per exit
  constraint_dimension: str = "col"   # row | col | mat: which mean is subtracted from the raw weights
  epsilon: float = 0.8
  target_p_index: int = 15            # 1..39: p = index / 20 of the geometric exit distribution
  meta_interval: int = 1              # the meta network learns on every meta_interval-th step
  meta_lr: float = 1e-4               # Adam, cosine decay to 0 over the run
  meta_weight_decay: float = 1e-4     # Adam's coupled (L2) weight decay, torch.optim.Adam's


FIELDS = tuple(f.name for f in dataclasses.fields(L2W)) + ("enabled",)


def from_config(l2w: Any) -> L2W | None:
  """The `L2W` of ``config.l2w`` (None when absent or not enabled).

  Raises:
    ValueError: an unknown field or a value out of range (the message names the field).
  """
  if not l2w or not l2w.get("enabled", False):
    return None
  fields = dict(l2w.items() if hasattr(l2w, "items") else l2w)
  unknown = sorted(set(fields) - set(FIELDS))
  if unknown:
    raise ValueError(f"unknown config field(s) config.l2w.{', config.l2w.'.join(unknown)}; valid fields "
                     f"of config.l2w: {', '.join(sorted(FIELDS))}")
  fields.pop("enabled")
  out = L2W(**{k: type(getattr(L2W, k))(v) for k, v in fields.items()})
  checks = [
      (out.meta_net_input_type in INPUT_TYPES, f"meta_net_input_type={out.meta_net_input_type!r} is not "
       f"one of {INPUT_TYPES}"),
      (out.constraint_dimension in CONSTRAINTS, f"constraint_dimension={out.constraint_dimension!r} is "
       f"not one of {CONSTRAINTS}"),
      (out.meta_net_hidden_size >= 1, f"meta_net_hidden_size={out.meta_net_hidden_size} must be >= 1"),
      (out.meta_net_num_layers >= 1, f"meta_net_num_layers={out.meta_net_num_layers} must be >= 1"),
      (1 <= out.target_p_index <= NUM_TARGET_FAMILY,
       f"target_p_index={out.target_p_index} must lie in [1, {NUM_TARGET_FAMILY}]"),
      (out.meta_interval >= 1, f"meta_interval={out.meta_interval} must be >= 1"),
      (out.meta_lr >= 0 and out.meta_weight_decay >= 0, "meta_lr and meta_weight_decay must be >= 0"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(f"config.l2w.{message}")
  return out


# --------------------------------------------------------------------------------------------------------
# The pure pieces.


def _torch_bias_init(fan_in: int):
  """torch.nn.Linear's bias initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class MetaNet(nn.Module):
  """The authors' ``MLP_tanh``: ``num_layers`` ReLU layers of ``hidden_size``, then a linear layer to one
  output per exit and tanh. Initialised as torch.nn.Linear (kernel and bias U(+-1/sqrt(fan_in)))."""

  hidden_size: int
  num_layers: int
  num_exits: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")  # = U(+-1/sqrt(fan_in))
    names = ["first_hidden_layer"] + [f"rest_hidden_layers_{i}" for i in range(self.num_layers - 1)]
    for name in names:
      x = nn.relu(nn.Dense(self.hidden_size, kernel_init=kernel_init,
                           bias_init=_torch_bias_init(x.shape[-1]), name=name)(x))
    x = nn.Dense(self.num_exits, kernel_init=kernel_init, bias_init=_torch_bias_init(x.shape[-1]),
                 name="output_layer")(x)
    return jnp.tanh(x)


def meta_net(cfg: L2W, num_exits: int) -> MetaNet:
  return MetaNet(cfg.meta_net_hidden_size, cfg.meta_net_num_layers, num_exits)


def input_size(cfg: L2W, num_exits: int) -> int:
  return 2 * num_exits if cfg.meta_net_input_type == "both" else num_exits


def meta_optimizer(cfg: L2W) -> optax.GradientTransformation:
  """torch.optim.Adam(weight_decay=...) without its learning rate: decay added to the gradient, then
  Adam's bias-corrected moments (its step count advances with every meta step, two per train step)."""
  return optax.chain(optax.add_decayed_weights(cfg.meta_weight_decay), optax.scale_by_adam())


def meta_learning_rate(cfg: L2W, step: jax.Array, total_steps: int) -> jax.Array:
  """The authors' ``adjust_meta_learning_rate``: cosine from ``meta_lr`` to 0 over the run, per step."""
  return 0.5 * cfg.meta_lr * (1 + jnp.cos(jnp.pi * step / max(total_steps, 1)))


def init_meta(cfg: L2W, num_exits: int, rng: jax.Array) -> dict[str, Any]:
  """Fresh meta network parameters and Adam state: ``{"params": ..., "opt_state": ...}``."""
  params = meta_net(cfg, num_exits).init(rng, jnp.zeros((1, input_size(cfg, num_exits))))["params"]
  return {"params": params, "opt_state": meta_optimizer(cfg).init(params)}


def meta_input(cfg: L2W, ce: jax.Array, logits: tuple[jax.Array, ...]) -> jax.Array:
  """(B, in) input of the meta network from the (K, B) per-sample losses and the exits' logits; no
  gradient flows back through it (the authors detach it)."""
  if cfg.meta_net_input_type == "loss":
    out = ce.T
  else:
    conf = jnp.stack([jnp.max(jax.nn.softmax(x.astype(jnp.float32), axis=-1), axis=-1) for x in logits]).T
    out = conf if cfg.meta_net_input_type == "conf" else jnp.concatenate([ce.T, conf], axis=1)
  return jax.lax.stop_gradient(out)


def sample_weights(raw: jax.Array, constraint: str, epsilon: float) -> jax.Array:
  """``1 + epsilon * (raw - mean)`` of the (B, K) meta network outputs: the mean over the batch per exit
  (``row``), over the exits per sample (``col``) or over everything (``mat``)."""
  if constraint == "row":
    centred = raw - jnp.mean(raw, axis=0, keepdims=True)
  elif constraint == "col":
    centred = raw - jnp.mean(raw, axis=1, keepdims=True)
  elif constraint == "mat":
    centred = raw - jnp.mean(raw)
  else:
    raise ValueError(f"constraint_dimension={constraint!r} is not one of {CONSTRAINTS}")
  return 1.0 + epsilon * centred


def target_probs(num_exits: int, p_index: int) -> np.ndarray:
  """Row ``p_index - 1`` of the authors' ``calc_target_probs``: ``q_k = p^k / sum_j p^j`` for
  ``p = p_index / 20`` and k = 1..K, in float32 as theirs (the geometric family the budgeted curve of
  MSDNet sweeps: p < 1 sends most samples to the first exits)."""
  p = np.float32(p_index / 20)
  probs = np.exp(np.log(p) * np.arange(1, num_exits + 1, dtype=np.float32)).astype(np.float32)
  return (probs / probs.sum(dtype=np.float32)).astype(np.float32)


def target_counts(n: int, probs: np.ndarray) -> list[int]:
  """How many of `n` samples each exit but the last takes: ``floor(n * q_k)`` (float32, as the authors'
  ``math.floor(n_target * target_probs[j])``); the last exit takes every sample left."""
  return [int(math.floor(np.float32(n) * np.float32(q))) for q in probs[:-1]]


def target_exit_masks(confidence: jax.Array, counts: list[int]) -> jax.Array:
  """(K, B) 0/1 masks of the samples each exit takes under the target exit distribution.

  Exit k (in order) takes the ``counts[k]`` samples of highest confidence (max softmax) at exit k among
  those no earlier exit took; the last exit takes the rest: what thresholds fitted to the distribution would
  do at test time.

  Args:
    confidence: (K, B) each exit's maximum softmax probability.
    counts: `target_counts` (K - 1 numbers).
  """
  num_exits, n = confidence.shape
  available = jnp.ones((n,), bool)
  masks = []
  for k in range(num_exits):
    if k == num_exits - 1:
      taken = available
    else:
      score = jnp.where(available, confidence[k], -jnp.inf)
      order = jnp.argsort(-score, stable=True)  # most confident first; the ones taken already last
      rank = jnp.zeros((n,), jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
      taken = available & (rank < counts[k])
    masks.append(taken)
    available = available & ~taken
  return jnp.stack(masks).astype(jnp.float32)


def meta_loss(ce: jax.Array, masks: jax.Array) -> jax.Array:
  """Sum over exits of the mean (K, B) cross-entropy over the samples each exit takes (0 for none)."""
  taken = masks.sum(axis=1)
  return jnp.sum(jnp.where(taken > 0, (masks * ce).sum(axis=1) / jnp.maximum(taken, 1.0), 0.0))


def keep_counts(new: Any, old: Any) -> Any:
  """`new` optimiser state with the integer leaves (optax's step counts, hence the schedule) of `old`."""
  return jax.tree.map(lambda n, o: o if jnp.issubdtype(jnp.result_type(n), jnp.integer) else n, new, old)


# --------------------------------------------------------------------------------------------------------
# One turn of the step: the meta update, then the classifier's update.


LossesFn = Callable[[tuple[jax.Array, ...], jax.Array], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Turn:
  """What one turn needs besides the data (static; bound by `train.make_steps`).

  forward: ``(params, batch_stats, x, with_techniques) -> (logits, new batch_stats)`` in training mode;
    with_techniques applies the step's gradient techniques (gradient equilibrium) around the forward.
  losses: ``(logits, targets) -> (ce, loss)``, (K, B) per-sample cross-entropies and training losses.
  """

  cfg: L2W
  forward: Callable[..., Any]
  losses: LossesFn
  tx: optax.GradientTransformation
  exit_weights: np.ndarray
  num_exits: int

  def weighted_loss(self, params, batch_stats, meta_params, x, targets):
    """``sum_k exit_weight_k mean_b(w_bk loss_bk)`` on a train half, and (new stats, logits, ce, w)."""
    logits, new_stats = self.forward(params, batch_stats, x, True)
    ce, loss = self.losses(logits, targets)
    raw = meta_net(self.cfg, self.num_exits).apply({"params": meta_params}, meta_input(self.cfg, ce, logits))
    w = sample_weights(raw, self.cfg.constraint_dimension, self.cfg.epsilon)  # (B, K)
    total = jnp.dot(self.exit_weights, jnp.sum(w.T * loss, axis=1)) / x.shape[0]
    return total, (new_stats, logits, ce, w)

  def look_ahead_loss(self, meta_params, params, batch_stats, opt_state, train_half, meta_half):
    """The meta loss of the classifier after one functional optimiser step on the train half weighted by
    `meta_params`; and (the weights, the look-ahead parameters, the meta half's exit masks)."""
    grads, (_, _, _, w) = jax.grad(self.weighted_loss, has_aux=True)(params, batch_stats, meta_params,
                                                                      *train_half)
    updates, _ = self.tx.update(grads, opt_state, params)
    look = optax.apply_updates(params, updates)
    x, targets = meta_half
    # The meta objective is the look-ahead's true loss: no gradient technique on this forward.
    logits, _ = self.forward(look, batch_stats, x, False)
    stacked = jnp.stack([z.astype(jnp.float32) for z in logits])
    ce = -jnp.sum(targets * jax.nn.log_softmax(stacked, axis=-1), axis=-1)
    confidence = jax.lax.stop_gradient(jnp.max(jax.nn.softmax(stacked, axis=-1), axis=-1))
    masks = target_exit_masks(confidence, target_counts(x.shape[0], target_probs(self.num_exits,
                                                                                 self.cfg.target_p_index)))
    return meta_loss(ce, masks), (w, look, masks)

  def meta_gradient(self, meta_params, params, batch_stats, opt_state, train_half, meta_half):
    """(meta loss, its gradient w.r.t. the meta parameters, aux of `look_ahead_loss`) of one shard."""
    (value, aux), grads = jax.value_and_grad(self.look_ahead_loss, has_aux=True)(
        meta_params, params, batch_stats, opt_state, train_half, meta_half)
    return value, grads, aux
