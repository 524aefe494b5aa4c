"""Per-exit cost accounting, derived from the model's own computation graph.

For every exit k the costs are cumulative in execution order: blocks 1..k *and heads 1..k*, because an
early-exit network evaluates every earlier head before it reaches exit k (the MSDNet and RANet papers' convention).

Nothing here knows any architecture. Exit k's costs are those of the jaxpr of
``model.apply(variables, image, num_exits=k)`` at batch 1, walked equation by equation. That jaxpr is the
jaxprs of stages 1..k (``ensemble_stage``, the multi-exit contract) one after the other, so each stage is
traced once, on the abstract state the stage before it returns, and exit k sums stages 1..k: one trace of
the network instead of one per exit.

* **MACs**: ``conv_general_dilated`` (output elements x kernel in-features x kernel window; a grouped
  convolution's kernel already holds C_in / groups in-features) and ``dot_general`` (output elements x
  contracted size).
* **Literature convention** (MSDNet's ``op_counter``, the papers' axes): MACs, plus one op per element of
  an activation's output (``max(x, 0)`` for ReLU; the ``erf``/``erfc``/``tanh``/``logistic`` of GELU,
  sigmoid-type units), plus pooling (a windowed sum: output elements x window; a global ``reduce_sum``:
  its input elements), plus one op per Linear bias (an ``add`` fed directly by a ``dot_general``).
  BatchNorm, concatenation, residual adds and resampling written as elementwise arithmetic count 0.
* **Parameters**: the parameters that the jaxpr reads up to exit k (BatchNorm scale and bias included,
  running statistics excluded).
* **XLA flops**: ``cost_analysis()['flops']`` of the compiled function returning *all* logits up to k.
  Returning only exit k's logits would let XLA drop the earlier heads as dead code.

`jax.make_jaxpr` does not eliminate dead code, so the literature count includes, like the reference
counters, the parts of block k that only feed later blocks.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from msdfuse_jax.data import sources

try:  # JAX >= 0.4.36
  from jax.extend.core import Literal
except ImportError:  # pragma: no cover - older JAX
  from jax.core import Literal  # type: ignore

ACTIVATION_PRIMITIVES = frozenset({"erf", "erfc", "tanh", "logistic"})
WINDOW_POOL_PRIMITIVES = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window"})


@dataclasses.dataclass
class OpCount:
  """Costs of one jaxpr at batch 1."""

  macs: int = 0
  op_counter: int = 0  # literature convention: MACs + activations + pooling + Linear biases

  def add(self, other: "OpCount") -> None:
    self.macs += other.macs
    self.op_counter += other.op_counter


def _numel(aval: Any) -> int:
  return int(math.prod(aval.shape))


def _is_zero_literal(v: Any) -> bool:
  return isinstance(v, Literal) and np.ndim(v.val) == 0 and float(v.val) == 0.0


def _sub_jaxprs(eqn: Any) -> Iterable[Any]:
  """The jaxprs nested in an equation (jit, custom_jvp/vjp calls, remat, ...)."""
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "jaxpr") and hasattr(item, "consts"):   # ClosedJaxpr
        yield item.jaxpr
      elif hasattr(item, "eqns") and hasattr(item, "invars"):  # Jaxpr
        yield item


def count_jaxpr(jaxpr: Any) -> OpCount:
  """Counts MACs and literature ops of a (batch-1) jaxpr, recursing into nested jaxprs."""
  total = OpCount()
  dot_outputs = set()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    subs = list(_sub_jaxprs(eqn))
    if subs:
      for sub in subs:
        total.add(count_jaxpr(sub))
      continue
    out = eqn.outvars[0].aval if eqn.outvars else None
    ops = 0
    if name == "conv_general_dilated":
      rhs = eqn.invars[1].aval
      rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feature, in feature, *spatial)
      window = math.prod(rhs.shape[d] for d in rhs_spec[2:])
      macs = _numel(out) * rhs.shape[rhs_spec[1]] * window
      total.macs += macs
      ops = macs
    elif name == "dot_general":
      (lhs_contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval
      macs = _numel(out) * math.prod(lhs.shape[d] for d in lhs_contract)
      total.macs += macs
      ops = macs
      dot_outputs.update(eqn.outvars)
    elif name == "add" and any(v in dot_outputs for v in eqn.invars if not isinstance(v, Literal)):
      ops = _numel(out)  # a Linear's bias
    elif name == "max" and any(_is_zero_literal(v) for v in eqn.invars):
      ops = _numel(out)  # ReLU
    elif name in ACTIVATION_PRIMITIVES:
      ops = _numel(out)
    elif name in WINDOW_POOL_PRIMITIVES:
      ops = _numel(out) * math.prod(eqn.params["window_dimensions"])
    elif name == "reduce_sum":
      ops = _numel(eqn.invars[0].aval)  # global average pooling reads every input element once
    total.op_counter += ops
  return total


def _used_invars(jaxpr: Any) -> set:
  used = set(v for v in jaxpr.outvars if not isinstance(v, Literal))
  for eqn in jaxpr.eqns:
    used.update(v for v in eqn.invars if not isinstance(v, Literal))
  return used


@dataclasses.dataclass
class ExitCost:
  exit: int
  op_counter: int
  macs: int
  xla_flops: float
  params: int

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def xla_flops(fn, *args) -> float:
  """XLA's flop count of the compiled `fn(*args)` on the default backend (a MAC counts 2)."""
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX returned one dict per computation
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", float("nan")))


def exit_costs(model: Any, variables: Any | None = None, image_size: int = 32, channels: int = 3,
               with_xla: bool = True) -> list[ExitCost]:
  """Per-exit cumulative costs of a multi-exit model (see the module docstring for the conventions).

  Args:
    model: a `MultiExitModule` (its stages are traced one by one through `ensemble_stage`).
    variables: its variables, or their shapes (`jax.ShapeDtypeStruct`s); when None, the shapes of
      ``model.init`` (costs do not depend on values).
    image_size: input height and width; channels: input channels.
    with_xla: also compile each prefix and read XLA's flop count (slower).

  Returns:
    One `ExitCost` per exit, in order.
  """
  image = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
  if variables is None:  # shapes are all a trace needs: nothing is materialised
    variables = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), image)
  params = variables.get("params", {})
  rest = {k: v for k, v in variables.items() if k != "params"}
  leaves = jax.tree.leaves(params)
  total, used, results = OpCount(), [False] * len(leaves), []
  if with_xla:  # XLA is given the running statistics as constants, which it folds into the convolutions
    constants = jax.tree.map(lambda v: np.zeros(v.shape, v.dtype) if isinstance(v, jax.ShapeDtypeStruct)
                             else v, rest)
  carry: Any = image
  for k in range(1, model.num_exits + 1):
    def stage(p, r, c, k=k):
      return model.apply({"params": p, **r}, c, k, train=False, method=model.ensemble_stage)

    closed, (carry, _) = jax.make_jaxpr(stage, return_shape=True)(params, rest, carry)
    total.add(count_jaxpr(closed.jaxpr))
    reads = _used_invars(closed.jaxpr)  # the parameters are the first invars
    used = [u or v in reads for u, v in zip(used, closed.jaxpr.invars)]
    n_params = sum(int(np.prod(leaf.shape)) for u, leaf in zip(used, leaves) if u)
    flops = float("nan")
    if with_xla:
      flops = xla_flops(lambda p, x, k=k: model.apply({"params": p, **constants}, x, train=False, num_exits=k),
                        params, image)
    results.append(ExitCost(k, total.op_counter, total.macs, flops, n_params))
  return results


def costs_report(model: Any, model_name: str, dataset: str, **kwargs) -> dict[str, Any]:
  """The JSON document of `msdfuse-costs` and `eval/costs.json`, at `dataset`'s image size unless
  `image_size` is given."""
  kwargs.setdefault("image_size", sources.image_size(dataset))
  return {
      "model": model_name,
      "dataset": dataset,
      "backend": jax.default_backend(),
      "exits": [c.as_dict() for c in exit_costs(model, **kwargs)],
  }


def format_table(report: dict[str, Any]) -> str:
  """A fixed-width text table of a `costs_report`."""
  lines = [f"{report['model']} on {report['dataset']} (XLA backend: {report['backend']})",
           f"{'exit':>4} {'op_counter':>14} {'MACs':>14} {'xla_flops':>16} {'params':>11}"]
  for e in report["exits"]:
    lines.append(f"{e['exit']:>4} {e['op_counter']:>14,d} {e['macs']:>14,d} {e['xla_flops']:>16,.0f} "
                 f"{e['params']:>11,d}")
  return "\n".join(lines)
