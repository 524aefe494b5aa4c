"""RANet (Yang et al., CVPR 2020), CIFAR version, with RANet-pytorch's semantics.

RANet runs one dense sub-network ("flow") per resolution, from the lowest resolution to the highest. Flow 1
is a plain dense network at 8x8 whose every block ends in a classifier. Flow f > 1 starts at a finer
resolution; its first blocks are *fused* blocks that mirror the blocks of flow f-1 layer by layer: every
fused layer adds a few channels computed from flow f-1's features of the same depth (a 3x3 ConvBN at the
low resolution, then bilinear upsampling) next to its own ConvBN, and the block ends by appending a 1x1
ConvBasic of flow f-1's block output (upsampled too). Some fused blocks end with a stride-2 layer, so that
the flow reaches 8x8 before its own plain blocks, each of which ends in a classifier (MSDNet's CIFAR head).

Facts ported from RANet-pytorch (models/RANet.py, be0f25a) and relied on by the exact cost parity:

* flow f (0-based, lowest resolution first) has ``n_blocks + block_step * f`` blocks; its first
  ``n_blocks + block_step * (f - 1)`` blocks are fused, the others plain, one exit after each plain block;
* one list of layers-per-block is shared by all flows: block b has ``step`` layers ('even') or
  ``step * b`` layers ('lg');
* a block ends with a 1x1 transition (``floor(reduction * C)`` channels) when its 1-based index equals
  ``floor(i * n_blocks_of_flow / scale_list[f])`` for some i in 1..scale_list[f]-1;
* fused block b of flow f ends with a stride-2 layer when b is among the last ``scale_list[f] - 1`` entries
  of the flows' block counts ``[0, n_blocks, n_blocks + block_step, ...][:f + 1]``;
* a fused layer of output width g adds ``floor(g * compress_factor)`` channels from the lower flow
  (bottleneck width ``bn_factor[f - 1]``) and ``g - floor(g * compress_factor)`` of its own; the block's
  final 1x1 conv of the lower flow has ``floor(C * compress_factor)`` outputs;
* every resampling is ``F.interpolate(size=..., mode='bilinear', align_corners=True)``; in a stride-2
  fused layer this also *down*-samples the layer's input before the concatenation;
* the first layer is MSDNet's (a 3x3 ConvBasic per resolution, stride 2 where the resolution changes) and
  keeps PyTorch's default conv init: RANet's `_init_weights` skips it;
* the forward pass runs flow by flow, and a classifier right after its block: exit k's cumulative cost is
  everything before it in that order.

Per-exit costs: `msdfuse_jax/models/cost_tables.json` (checked against the code by tests/test_costs.py).
They are `msdfuse_jax.costs.exit_costs` (literature convention, cumulative) and equal, every integer, the
reference `op_counter` of RANet-pytorch (tests/test_baselines.py compares with
../shared/reference/model_counts.json), for both presets:

* ``ranet_cifar`` (train_cifar.sh: step 4, even, scale list 1-2-3-3, gr 4-2-1-1, bn 4-2-1-1), 8 exits;
* ``ranet_readme`` (README: step 2, 'lg', scale list 1-2-3, gr 4-2-1, bn 4-2-1), 6 exits.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msdfuse_jax.models import base, layers
from msdfuse_jax.models.base import MultiExitModule

Dtype = Any
STEP_MODES = ("even", "lg")

# RANet's `_init_weights` re-initialises the flows and classifiers (He fan-out kernels, zero Linear biases)
# but not the first layer, which keeps PyTorch's default conv init.
INIT = layers.INITS["he_fan_out"]


@dataclasses.dataclass(frozen=True)
class RABlockPlan:
  """One block of one flow (flows 0-based from the lowest resolution; blocks 1-based within a flow)."""

  flow: int
  index: int
  n_in: int                       # input channels
  n_layers: int
  growth: int                     # channels added per layer (growth_rate * gr_factor[flow])
  bn_width: int                   # bottleneck factor of the flow's own ConvBN
  fused: bool                     # reads the lower flow (RANet's '_BlockUpNormal')
  low_channels: tuple[int, ...]   # fused only: widths of the lower block's per-layer outputs (n_layers+1)
  low_bn_width: int               # fused only: bottleneck factor of the lower-flow ConvBN
  down: bool                      # fused only: the last layer has stride 2
  last_channels: int              # fused only: outputs of the 1x1 conv of the lower block's output
  transition_out: int             # channels after the 1x1 transition; 0 when there is none
  has_exit: bool
  n_out: int                      # output channels (after the transition, if any)


def plan_ranet(n_blocks: int, block_step: int, step: int, step_mode: str, scale_list: Sequence[int],
               gr_factor: Sequence[int], bn_factor: Sequence[int], n_channels: int, growth_rate: int,
               compress_factor: float, reduction: float) -> list[list[RABlockPlan]]:
  """RANet's block schedule: one list of `RABlockPlan` per flow, in forward order."""
  n_flows = len(scale_list)
  flow_blocks = [0] + [block_step * f + n_blocks for f in range(n_flows)]
  steps = [step]  # layers per block index, shared by every flow and grown by each new plain block
  flows, low_widths = [], []
  for f in range(n_flows):
    n_in, growth = n_channels * gr_factor[f], growth_rate * gr_factor[f]
    widths, blocks = [], []
    for b in range(1, flow_blocks[f + 1] + 1):
      fused = b <= flow_blocks[f]
      n_layers = steps[b - 1]
      outs = [n_in + i * growth for i in range(n_layers + 1)]
      if fused:
        last = math.floor(outs[-1] * compress_factor)
        n_out = outs[-1] + last
        # RANet-pytorch: `n_block_curr in nBlocks[:ii+1][-(scale_list[ii]-1):]`.
        down = b in flow_blocks[:f + 1][-(scale_list[f] - 1):]
      else:
        last, n_out, down = 0, outs[-1], False
        steps.append(step if step_mode == "even" else steps[-1] + step)
      transition = any(b == math.floor((i + 1) * flow_blocks[f + 1] / scale_list[f])
                       for i in range(scale_list[f] - 1))
      transition_out = math.floor(1.0 * reduction * n_out) if transition else 0
      blocks.append(RABlockPlan(
          flow=f, index=b, n_in=n_in, n_layers=n_layers, growth=growth, bn_width=bn_factor[f],
          fused=fused, low_channels=tuple(low_widths[b - 1]) if fused else (),
          low_bn_width=bn_factor[f - 1] if fused else 0, down=down, last_channels=last,
          transition_out=transition_out, has_exit=not fused, n_out=transition_out or n_out))
      widths.append(outs)
      n_in = transition_out or n_out
    flows.append(blocks)
    low_widths = widths
  return flows


class RAFirstLayer(nn.Module):
  """One 3x3 ConvBasic per flow from the finest to the coarsest, stride 2 where the resolution changes.

  Returns the flows' inputs lowest resolution first.
  """

  n_channels: int
  gr_factor: Sequence[int]
  scale_list: Sequence[int]
  norm: Callable[..., nn.Module] = layers.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
    n_flows = len(self.scale_list)
    outs = []
    for j in range(n_flows):  # j = 0 is the finest flow (the last one)
      f = n_flows - 1 - j
      stride = 2 if j > 0 and self.scale_list[f] != self.scale_list[f + 1] else 1
      x = layers.ConvBasic(self.n_channels * self.gr_factor[f], stride=stride, norm=self.norm,
                           kernel_init=layers.torch_default_kernel_init, dtype=self.dtype,
                           name=f"flow{f + 1}")(x, train=train)
      outs.append(x)
    return outs[::-1]


class RAPlainBlock(nn.Module):
  """A dense block of one flow (RANet's `_BlockNormal`): `n_layers` ConvBN layers, optional transition.

  Returns the block output and the list [input, after layer 1, ..., after layer n] that the next flow's
  fused block of the same index reads.
  """

  plan: RABlockPlan
  norm: Callable[..., nn.Module] = layers.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    p = self.plan
    outputs = [x]
    for i in range(p.n_layers):
      new = layers.ConvBN(p.growth, bn_width=p.bn_width, norm=self.norm, kernel_init=INIT.conv,
                          dtype=self.dtype, name=f"layer{i + 1}")(x, train=train)
      x = jnp.concatenate([x, new], axis=-1)
      outputs.append(x)
    if p.transition_out:
      x = layers.ConvBasic(p.transition_out, kernel=1, norm=self.norm, kernel_init=INIT.conv,
                           dtype=self.dtype, name="transition")(x, train=train)
    return x, outputs


class RAFusedLayer(nn.Module):
  """RANet's `ConvUpNormal`: [x resized, upsampled ConvBN(low), ConvBN(x) (stride 2 if `down`)]."""

  growth: int
  up_features: int
  bn_width: int
  low_bn_width: int
  down: bool = False
  align_corners: bool = True
  norm: Callable[..., nn.Module] = layers.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, low: jax.Array, *, train: bool = False) -> jax.Array:
    conv_bn = functools.partial(layers.ConvBN, norm=self.norm, kernel_init=INIT.conv, dtype=self.dtype)
    own = conv_bn(self.growth - self.up_features, down=self.down, bn_width=self.bn_width,
                  name="conv_normal")(x, train=train)
    up = conv_bn(self.up_features, bn_width=self.low_bn_width, name="conv_up")(low, train=train)
    size = own.shape[1:3]
    # In a stride-2 layer the dense input itself is bilinearly *down*-sampled (as RANet-pytorch does).
    resize = functools.partial(layers.bilinear_resize, size=size, align_corners=self.align_corners)
    return jnp.concatenate([resize(x), resize(up), own], axis=-1)


class RAFusedBlock(nn.Module):
  """RANet's `_BlockUpNormal`: fused layers, the lower block's output appended, optional transition."""

  plan: RABlockPlan
  compress_factor: float
  align_corners: bool = True
  norm: Callable[..., nn.Module] = layers.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, low: Sequence[jax.Array], *,
               train: bool = False) -> tuple[jax.Array, list[jax.Array]]:
    p = self.plan
    outputs = [x]
    for i in range(p.n_layers):
      x = RAFusedLayer(p.growth, math.floor(p.growth * self.compress_factor), p.bn_width, p.low_bn_width,
                       down=p.down and i == p.n_layers - 1, align_corners=self.align_corners,
                       norm=self.norm, dtype=self.dtype, name=f"layer{i + 1}")(x, low[i], train=train)
      outputs.append(x)
    conv1x1 = functools.partial(layers.ConvBasic, kernel=1, norm=self.norm, kernel_init=INIT.conv,
                                dtype=self.dtype)
    last = conv1x1(p.last_channels, name="conv_last")(low[p.n_layers], train=train)
    x = jnp.concatenate(
        [x, layers.bilinear_resize(last, x.shape[1:3], align_corners=self.align_corners)], axis=-1)
    if p.transition_out:
      x = conv1x1(p.transition_out, name="transition")(x, train=train)
    return x, outputs


class RANet(MultiExitModule):
  """RANet for 32x32 inputs. Defaults are RANet-pytorch's train_cifar.sh (the paper's CIFAR model).

  Attributes mirror RANet-pytorch's arguments: `n_blocks` (nBlocks: blocks of the lowest-resolution flow),
  `block_step` (extra blocks per flow), `step`, `step_mode` ('even' or 'lg'), `scale_list` (resolution
  level of each flow, 1 = lowest), `gr_factor`, `bn_factor` (per flow, lowest resolution first),
  `n_channels`, `growth_rate`, `compress_factor`, `reduction`; plus `head_width` (MSDNet's 128),
  `align_corners` (True in RANet-pytorch), `bn_unbiased_var` (PyTorch's running-variance update) and the
  compute `dtype`.
  """

  num_classes: int = 10
  n_blocks: int = 2
  block_step: int = 2
  step: int = 4
  step_mode: str = "even"
  scale_list: Sequence[int] = (1, 2, 3, 3)
  gr_factor: Sequence[int] = (4, 2, 1, 1)
  bn_factor: Sequence[int] = (4, 2, 1, 1)
  n_channels: int = 16
  growth_rate: int = 6
  compress_factor: float = 0.25
  reduction: float = 0.5
  head_width: int = 128
  align_corners: bool = True
  bn_unbiased_var: bool = True
  dtype: Dtype = jnp.float32

  @property
  def num_exits(self) -> int:
    # One exit per plain block: flow f adds block_step plain blocks to the n_blocks of flow 1.
    return self.n_blocks + self.block_step * (len(self.scale_list) - 1)

  def validate(self) -> None:
    """Raises ValueError naming the bad hyper-parameter and its valid choices."""
    base.check_choice("step_mode", self.step_mode, STEP_MODES)
    base.check_positive_ints(self, ("n_blocks", "block_step", "n_channels", "growth_rate", "head_width"))
    base.check_bools(self, ("align_corners", "bn_unbiased_var"))
    for field in ("scale_list", "gr_factor", "bn_factor"):
      base.check_int_sequence(field, getattr(self, field))
    if isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 2:
      # RANet-pytorch's fused block indexes its last layer through the loop variable of the others.
      raise ValueError(f"step must be an integer >= 2 (a fused block needs 2 layers), got {self.step!r}")
    n = len(self.scale_list)
    if not n or len(self.gr_factor) != n or len(self.bn_factor) != n:
      raise ValueError(f"scale_list {tuple(self.scale_list)}, gr_factor {tuple(self.gr_factor)} and "
                       f"bn_factor {tuple(self.bn_factor)} must be non-empty and of the same length "
                       "(one entry per flow)")
    s = list(self.scale_list)
    if s[0] != 1 or s[-1] != 3 or any(b - a not in (0, 1) for a, b in zip(s, s[1:])) or 1 in s[1:]:
      raise ValueError(f"scale_list must start at 1, end at 3 (CIFAR: 8x8, 16x16, 32x32) and grow by 0 or "
                       f"1 per flow, with only the first flow at level 1; got {tuple(s)}")
    if not 0 < self.compress_factor < 1:
      raise ValueError(f"compress_factor must lie in (0, 1), got {self.compress_factor}")
    if n > 1 and any(math.floor(self.growth_rate * g * self.compress_factor) < 1 for g in self.gr_factor[1:]):
      raise ValueError("growth_rate * gr_factor[f] * compress_factor must be >= 1 for every fused flow, got "
                       f"growth_rate={self.growth_rate}, gr_factor={tuple(self.gr_factor)}, "
                       f"compress_factor={self.compress_factor}")
    if not 0 < self.reduction <= 1:
      raise ValueError(f"reduction must lie in (0, 1], got {self.reduction}")

  def plan(self) -> list[list[RABlockPlan]]:
    """The block schedule, one list per flow (lowest resolution first)."""
    return plan_ranet(self.n_blocks, self.block_step, self.step, self.step_mode, tuple(self.scale_list),
                      tuple(self.gr_factor), tuple(self.bn_factor), self.n_channels, self.growth_rate,
                      self.compress_factor, self.reduction)

  def exit_schedule(self) -> list[list[RABlockPlan]]:
    """For each exit, the blocks that run between the previous exit and it, in forward order."""
    schedule, pending = [], []
    for flow in self.plan():
      for block in flow:
        pending.append(block)
        if block.has_exit:
          schedule.append(pending)
          pending = []
    return schedule

  def setup(self):
    self.validate()
    norm = layers.batch_norm(self.bn_unbiased_var, self.dtype)
    self.first_layer = RAFirstLayer(self.n_channels, tuple(self.gr_factor), tuple(self.scale_list), norm,
                                    self.dtype)
    k = 0
    for flow in self.plan():
      for p in flow:
        if p.fused:
          block = RAFusedBlock(p, self.compress_factor, self.align_corners, norm, self.dtype)
        else:
          block = RAPlainBlock(p, norm, self.dtype)
        setattr(self, f"flow{p.flow + 1}_block{p.index}", block)
        if p.has_exit:
          k += 1
          setattr(self, f"exit{k}", layers.MSDNetHead(self.num_classes, self.head_width, "relu", norm,
                                                      INIT, self.dtype))

  def stage(self, state: Any, k: int, *, train: bool = False) -> tuple[dict[str, Any], jax.Array]:
    """Runs the blocks between exit k-1 and exit k (1-based) in RANet's order, then exit k.

    The state is a dict: ``inputs`` (the first layer's output per flow), ``x`` (the current flow's
    tensor), ``low`` (the previous flow's per-block layer outputs) and ``cur`` (the current flow's).
    """
    if k == 1:
      state = dict(inputs=self.first_layer(state, train=train), x=None, low=[], cur=[])
    inputs, x, low, cur = state["inputs"], state["x"], list(state["low"]), list(state["cur"])
    for p in self.exit_schedule()[k - 1]:
      if p.index == 1:  # a new flow starts from its own first-layer features
        low, cur, x = (cur if p.flow else []), [], inputs[p.flow]
      block = getattr(self, f"flow{p.flow + 1}_block{p.index}")
      x, outputs = block(x, low[p.index - 1], train=train) if p.fused else block(x, train=train)
      cur.append(outputs)
    head_input, x = self.exit_branch(x, k)
    logits = getattr(self, f"exit{k}")(head_input, train=train)
    return dict(inputs=inputs, x=x, low=low, cur=cur), logits
