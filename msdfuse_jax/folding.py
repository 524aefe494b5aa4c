"""BatchNorm folded away, for inference programs.

At inference a BatchNorm is a fixed per-channel affine map, ``y = x * s + t`` with
``s = scale / sqrt(var + eps)`` and ``t = bias - mean * s``. When its input is a convolution's output (every
conv -> BN pair of these networks: `layers.ConvBasic`, the residual blocks), the map goes into the
convolution itself: its kernel is multiplied by ``s`` over the output channels and ``t`` becomes the
convolution's bias, so the program holds one convolution and one add where it held a convolution and a
normalisation. A BatchNorm that follows no convolution (DenseNet^MC's pre-activation BatchNorm after a
concatenation, whose pieces other layers also read) cannot be folded that way; it becomes its affine map
with constant ``s`` and ``t``.

Which BatchNorm follows which convolution is read from the model itself, not written per architecture: one
abstract forward pass (no arithmetic) under a Flax method interceptor records, for every BatchNorm call,
whether its input is exactly the output of a convolution call. Inside `FoldedModel.apply` a second
interceptor substitutes the folded layers. Parity with the unfolded model (logits within 1e-4 in float32)
is tested per family in tests/test_export.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from msdfuse_jax.models import layers


def _get(tree: dict, path: tuple[str, ...]) -> Any:
  for name in path:
    tree = tree[name]
  return tree


def _without(tree: dict, paths: set[tuple[str, ...]]) -> dict:
  """A copy of the nested dict `tree` without the subtrees at `paths`."""
  def walk(node, prefix):
    if not isinstance(node, dict):
      return node
    return {k: walk(v, prefix + (k,)) for k, v in node.items() if prefix + (k,) not in paths}
  return walk(tree, ())


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
  for name in path[:-1]:
    tree = tree[name]
  tree[path[-1]] = value


@dataclasses.dataclass(frozen=True)
class FoldPlan:
  """What folding does to a model: BatchNorm path -> the convolution path it folds into (or None), and
  each BatchNorm's epsilon."""

  pairs: dict[tuple[str, ...], tuple[str, ...] | None]
  epsilons: dict[tuple[str, ...], float]

  @property
  def folded(self) -> int:
    return sum(conv is not None for conv in self.pairs.values())


def find_pairs(model: nn.Module, variables: Any, *args: Any, **kwargs: Any) -> FoldPlan:
  """Traces ``model.apply(variables, *args, **kwargs)`` abstractly and pairs each BatchNorm with the
  convolution whose output it normalises (None where its input is not a convolution's output).

  A BatchNorm is paired only if every one of its calls reads the output of the same convolution, that
  convolution is called exactly as often, and both are children of the same module (a conv -> norm layer).
  The last rule keeps a convolution whose output is also read elsewhere unfolded: DenseNet^MC's stem, whose
  output the first dense layer normalises and every later layer concatenates, is not folded into that
  layer's BatchNorm.
  """
  conv_outputs: list[tuple[Any, tuple[str, ...]]] = []  # (output, conv path), references kept alive
  conv_calls: dict[tuple[str, ...], int] = {}
  bn_inputs: dict[tuple[str, ...], list[tuple[str, ...] | None]] = {}
  epsilons: dict[tuple[str, ...], float] = {}

  def record(next_fun, call_args, call_kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*call_args, **call_kwargs)
    module, path = context.module, tuple(context.module.scope.path)
    if isinstance(module, nn.Conv):
      out = next_fun(*call_args, **call_kwargs)
      conv_outputs.append((out, path))
      conv_calls[path] = conv_calls.get(path, 0) + 1
      return out
    if isinstance(module, layers.BatchNorm):
      x = call_args[0]
      source = next((p for out, p in conv_outputs if out is x), None)
      bn_inputs.setdefault(path, []).append(source)
      epsilons[path] = module.epsilon
    return next_fun(*call_args, **call_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, *a: model.apply(v, *a, **kwargs), variables, *args)
  pairs: dict[tuple[str, ...], tuple[str, ...] | None] = {}
  for bn, sources in bn_inputs.items():
    conv = sources[0]
    if (conv is None or any(s != conv for s in sources) or conv_calls[conv] != len(sources)
        or conv[:-1] != bn[:-1]):
      conv = None
    pairs[bn] = conv
  convs = [c for c in pairs.values() if c is not None]
  if len(convs) != len(set(convs)):  # one convolution normalised by two BatchNorms: fold neither
    pairs = {bn: (c if convs.count(c) == 1 else None) for bn, c in pairs.items()}
  return FoldPlan(pairs, epsilons)


class FoldedModel:
  """A model with its BatchNorms folded: ``FoldedModel(model, variables, example).apply(*args, **kwargs)``
  is ``model.apply(variables, *args, **kwargs)`` in inference mode, without BatchNorm.

  Args:
    model: any model of the package built from `layers.BatchNorm` and `flax.linen.Conv`.
    variables: its variables (``params`` and ``batch_stats``).
    example: an input batch (or a `jax.ShapeDtypeStruct`) for the abstract pass that finds the pairs; the
      full forward pass (every exit) is traced, so every layer is seen.
  """

  def __init__(self, model: nn.Module, variables: Any, example: Any):
    self.model = model
    self.plan = find_pairs(model, variables, example)
    # One compiled program folds every pair, on the device the variables are on: op by op, each
    # constant (an epsilon) would be a transfer of its own, and the weights would go through the host.
    params, stats = jax.device_put((flax.core.unfreeze(variables["params"]),
                                    variables.get("batch_stats", {})))
    self._params, self._conv_bias, self._affine = jax.jit(self._fold)(params, stats)

  def _fold(self, params: dict, stats: dict) -> tuple[dict, dict, dict]:
    """(folded params without the BatchNorms, convolution path -> bias it adds, BatchNorm path -> its
    (scale, shift) where it follows no convolution)."""
    conv_bias: dict[tuple[str, ...], jax.Array] = {}
    affine: dict[tuple[str, ...], tuple[jax.Array, jax.Array]] = {}
    for bn, conv in self.plan.pairs.items():
      bn_params, bn_stats = _get(params, bn), _get(stats, bn)
      s = bn_params["scale"] * jax.lax.rsqrt(bn_stats["var"] + self.plan.epsilons[bn])
      t = bn_params["bias"] - bn_stats["mean"] * s
      if conv is None:
        affine[bn] = (s, t)
        continue
      conv_params = dict(_get(params, conv))
      conv_params["kernel"] = conv_params["kernel"] * s
      if "bias" in conv_params:  # the convolution adds the folded bias itself
        conv_params["bias"] = conv_params["bias"] * s + t
      else:
        conv_bias[conv] = t
      _set(params, conv, conv_params)  # `params` is this trace's own copy of the tree
    return _without(params, set(self.plan.pairs)), conv_bias, affine

  @property
  def variables(self) -> dict:
    """The folded parameters (no ``batch_stats``); the biases and affine maps are held by the object."""
    return {"params": self._params}

  def _substitute(self, next_fun, args, kwargs, context):
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    module = context.module
    if isinstance(module, nn.Conv):
      path = tuple(module.scope.path)
      if path in self._conv_bias:
        y = next_fun(*args, **kwargs)
        return (y.astype(jnp.float32) + self._conv_bias[path]).astype(y.dtype)
    if isinstance(module, layers.BatchNorm):
      x = args[0]
      path = tuple(module.scope.path)
      if self.plan.pairs.get(path) is not None:
        return x.astype(module.dtype)
      s, t = self._affine[path]
      return (x.astype(jnp.float32) * s + t).astype(module.dtype)
    return next_fun(*args, **kwargs)

  def apply(self, *args: Any, **kwargs: Any) -> Any:
    """``model.apply`` with the folded layers (inference mode only)."""
    if kwargs.get("train"):
      raise ValueError("a folded model runs in inference mode only (train=False)")
    with nn.intercept_methods(self._substitute):
      return self.model.apply(self.variables, *args, **kwargs)
