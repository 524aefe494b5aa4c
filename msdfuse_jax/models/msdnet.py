"""MSDNet (Huang et al., ICLR 2018) and MSDFuse (Addad et al., ICCV-W 2023) as one Flax module.

MSDFuse is MSDNet with four independent changes, each a field of `MSDNet` so that an ablation is one
override away:

* ``stem='efficient'``: conv3x3 -> depthwise 3x3 -> 1x1 with a residual add -> depthwise 3x3 stride 2;
  the scales then run at 16/8/4 instead of 32/16/8 on CIFAR;
* ``fusion=True``: the scales of one layer are computed sequentially from fine to coarse, and the down path
  of scale s reads the *updated* scale s-1 tensor (the one that already holds this layer's new features);
* ``fused_transition=True``: in a layer that drops a scale, the first kept scale uses the normal path only
  (it disregards the dropped scale) and adds the full growth of that scale;
* ``head='msdfuse'``: ConvBasic 3x3/2 -> ConvBasic 1x1 -> global average pool -> Linear;
* ``activation='gelu'``.

The network is a sequence of stages: stage k runs block k and exit k. `stage` exposes one of them, so that
early-exit inference can run stage k only on the samples that stage k-1 did not classify.
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
STEP_MODES = ("even", "lin_grow")
PRUNE_MODES = ("max",)
STEMS = ("msdnet", "efficient")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
  """What one MSD layer does (1-based layer index `index`, scales 0-based, finest first)."""

  index: int
  n_in: int            # the channel counter before the layer (scale s holds n_in * gr_factor[s])
  in_scales: int
  out_scales: int
  transition_out: int  # channel counter after the transition; 0 when the layer is not followed by one


def block_steps(n_blocks: int, step_mode: str, step: int, base: int) -> list[int]:
  """Layers per block: ``[base] + [step if even else step * i + 1 for i in 1..n_blocks-1]``."""
  if step_mode not in STEP_MODES:
    raise ValueError(f"unknown step_mode {step_mode!r}; valid choices: {list(STEP_MODES)}")
  return [base] + [step if step_mode == "even" else step * i + 1 for i in range(1, n_blocks)]


def plan_layers(n_blocks: int, step_mode: str, step: int, base: int, n_channels: int,
                growth_rate: int, n_scales: int, reduction: float) -> list[list[LayerPlan]]:
  """The layer schedule of an MSDNet with prune 'max': one list of `LayerPlan` per block."""
  steps = block_steps(n_blocks, step_mode, step, base)
  total = sum(steps)
  interval = math.ceil(total / n_scales)
  n_in, index, blocks = n_channels, 0, []
  for n_layers in steps:
    block = []
    for _ in range(n_layers):
      index += 1
      in_scales = n_scales - max(0, index - 2) // interval
      out_scales = n_scales - (index - 1) // interval
      after = n_in + growth_rate
      transition = math.floor(reduction * after) if in_scales > out_scales and reduction > 0 else 0
      block.append(LayerPlan(index, n_in, in_scales, out_scales, transition))
      n_in = transition or after
    blocks.append(block)
  return blocks


class MSDLayer(nn.Module):
  """One MSD layer over the scales `plan.out_scales` (the finest of them first), then its transition.

  Inputs and outputs are lists holding the tensors of the scales still alive, finest first.
  """

  plan: LayerPlan
  growth_rate: int
  gr_factor: Sequence[int]
  bn_factor: Sequence[int]
  bottleneck: bool = True
  fusion: bool = False
  fused_transition: bool = False
  activation: str = "relu"
  norm: Callable[..., nn.Module] = layers.BatchNorm
  param_init: layers.Init = layers.INITS["pytorch"]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, xs: list[jax.Array], *, train: bool = False) -> list[jax.Array]:
    n_scales = len(self.gr_factor)
    offset = n_scales - self.plan.out_scales
    dropped = self.plan.in_scales > self.plan.out_scales
    # Absolute scale index -> input tensor.
    inputs = {n_scales - len(xs) + i: x for i, x in enumerate(xs)}
    conv_bn = functools.partial(layers.ConvBN, bottleneck=self.bottleneck, activation=self.activation,
                                norm=self.norm, kernel_init=self.param_init.conv, dtype=self.dtype)
    outputs: dict[int, jax.Array] = {}
    for s in range(offset, n_scales):
      growth = self.growth_rate * self.gr_factor[s]
      x = inputs[s]
      if s == offset and (not dropped or self.fused_transition):
        # The finest output scale has no finer neighbour to read, or (MSDFuse transition) ignores the
        # scale that this layer drops: normal path only, with the full growth of the scale.
        new = [conv_bn(growth, bn_width=self.bn_factor[s], name=f"scale{s + 1}_normal")(x, train=train)]
      else:
        # MSDNet computes all scales in parallel from the previous layer's tensors; the fused layer
        # reads the scale-(s-1) tensor that this layer has just updated, when there is one.
        finer = outputs[s - 1] if self.fusion and (s - 1) in outputs else inputs[s - 1]
        new = [
            conv_bn(growth // 2, down=True, bn_width=self.bn_factor[s - 1],
                    name=f"scale{s + 1}_down")(finer, train=train),
            conv_bn(growth // 2, bn_width=self.bn_factor[s], name=f"scale{s + 1}_normal")(x, train=train),
        ]
      outputs[s] = jnp.concatenate([x] + new, axis=-1)
    ys = [outputs[s] for s in range(offset, n_scales)]
    if self.plan.transition_out:
      ys = [
          layers.ConvBasic(self.plan.transition_out * self.gr_factor[s], kernel=1,
                           activation=self.activation, norm=self.norm, kernel_init=self.param_init.conv,
                           dtype=self.dtype, name=f"transition_scale{s + 1}")(y, train=train)
          for s, y in zip(range(offset, n_scales), ys)
      ]
    return ys


class EfficientStem(nn.Module):
  """MSDFuse's stem: ConvBasic 3x3, depthwise 3x3, 1x1, residual add of the first conv, depthwise 3x3/2.

  The paper calls layers 2 and 4 depthwise separable; the authors' code has layer 4 depthwise only, which
  is the default here. ``pointwise_after_down=True`` adds a 1x1 ConvBasic after it. ``first_stride=2`` is
  the ImageNet mode (224 -> 112 -> 56).
  """

  features: int
  pointwise_after_down: bool = False
  first_stride: int = 1
  activation: str = "gelu"
  norm: Callable[..., nn.Module] = layers.BatchNorm
  param_init: layers.Init = layers.INITS["pytorch"]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(layers.ConvBasic, self.features, activation=self.activation, norm=self.norm,
                             kernel_init=self.param_init.conv, dtype=self.dtype)
    x1 = conv(kernel=3, stride=self.first_stride, name="conv1")(x, train=train)
    x = conv(kernel=3, groups=self.features, name="conv2_dw")(x1, train=train)
    x = conv(kernel=1, name="conv3")(x, train=train)
    x = x + x1  # after conv3's activation; no activation after the add
    x = conv(kernel=3, stride=2, groups=self.features, name="conv4_dw")(x, train=train)
    if self.pointwise_after_down:
      x = conv(kernel=1, name="conv4_pw")(x, train=train)
    return x


class FirstLayer(nn.Module):
  """The first layer: one tensor per scale, each scale a stride-2 ConvBasic of the finer one.

  ImageNet mode (224 -> 56 at scale 1): MSDNet's scale 1 is conv 7x7 stride 2 with bias -> BN -> ReLU ->
  max-pool 3x3 stride 2 instead of the CIFAR ConvBasic 3x3; the efficient stem strides its first conv.
  """

  n_channels: int
  gr_factor: Sequence[int]
  stem: str = "msdnet"
  stem_pointwise: bool = False
  activation: str = "relu"
  norm: Callable[..., nn.Module] = layers.BatchNorm
  param_init: layers.Init = layers.INITS["pytorch"]
  imagenet: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> list[jax.Array]:
    widths = [self.n_channels * g for g in self.gr_factor]
    conv = functools.partial(layers.ConvBasic, activation=self.activation, norm=self.norm,
                             kernel_init=self.param_init.conv, dtype=self.dtype)
    if self.stem == "efficient":
      x = EfficientStem(widths[0], self.stem_pointwise, 2 if self.imagenet else 1, self.activation, self.norm,
                        self.param_init, self.dtype, name="stem")(x, train=train)
    elif self.imagenet:
      x = conv(widths[0], kernel=7, stride=2, use_bias=True, name="scale1")(x, train=train)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(widths[0], name="scale1")(x, train=train)
    xs = [x]
    for s in range(1, len(widths)):
      xs.append(conv(widths[s], stride=2, name=f"scale{s + 1}")(xs[-1], train=train))
    return xs


@dataclasses.dataclass(frozen=True)
class BlockSettings:
  """The network-wide hyper-parameters that every block needs (a hashable record)."""

  n_channels: int
  growth_rate: int
  gr_factor: tuple[int, ...]
  bn_factor: tuple[int, ...]
  bottleneck: bool
  stem: str
  stem_pointwise: bool
  fusion: bool
  fused_transition: bool
  activation: str
  norm: Callable[..., nn.Module]
  param_init: layers.Init
  imagenet: bool
  dtype: Any


class MSDBlock(nn.Module):
  """The layers between two exits (with the first layer in block 1)."""

  plans: Sequence[LayerPlan]
  net: BlockSettings
  first: bool = False

  @nn.compact
  def __call__(self, xs: Any, *, train: bool = False) -> list[jax.Array]:
    net = self.net
    if self.first:
      xs = FirstLayer(net.n_channels, net.gr_factor, net.stem, net.stem_pointwise, net.activation,
                      net.norm, net.param_init, net.imagenet, net.dtype, name="layer0")(xs, train=train)
    for plan in self.plans:
      xs = MSDLayer(plan, net.growth_rate, net.gr_factor, net.bn_factor, net.bottleneck, net.fusion,
                    net.fused_transition, net.activation, net.norm, net.param_init, net.dtype,
                    name=f"layer{plan.index}")(xs, train=train)
    return xs


class MSDNet(MultiExitModule):
  """MSDNet / MSDFuse. Defaults are MSDNet-PyTorch's anytime CIFAR model (32x32 inputs).

  ``imagenet=True`` is the ImageNet mode (224x224 inputs, four times the CIFAR resolution): MSDNet-PyTorch's
  7x7/2 stem with bias and a max-pool (``stem='msdnet'``) or the efficient stem with a strided first conv,
  and classifiers that keep their input width (``head_width`` is then unused): MSDNet's (``head='msdnet'``)
  or the authors' MSDFuse ImageNet head (``head='msdfuse'``: 1x1, 1x1, global pool, Linear).

  Attributes mirror MSDNet-PyTorch's arguments plus the MSDFuse switches (`stem`, `stem_pointwise`,
  `fusion`, `fused_transition`, `head`, `activation`), the training-parity switches `weight_init` ('pytorch':
  PyTorch's default layer init, what MSDNet-PyTorch's model actually starts from; 'he_fan_out': the
  N(0, sqrt(2 / (k * k * C_out))) kernels and zero Linear biases its `_init_weights` was written to set)
  and `bn_unbiased_var` (PyTorch's running-variance update), and the compute `dtype` (parameters always
  stay float32).
  """

  num_classes: int = 10
  n_blocks: int = 7
  step_mode: str = "even"
  step: int = 2
  base: int = 4
  n_channels: int = 16
  growth_rate: int = 6
  gr_factor: Sequence[int] = (1, 2, 4)
  bn_factor: Sequence[int] = (1, 2, 4)
  prune: str = "max"
  reduction: float = 0.5
  bottleneck: bool = True
  stem: str = "msdnet"
  stem_pointwise: bool = False
  fusion: bool = False
  fused_transition: bool = False
  head: str = "msdnet"
  head_width: int = 128
  activation: str = "relu"
  weight_init: str = "pytorch"
  bn_unbiased_var: bool = True
  imagenet: bool = False
  dtype: Dtype = jnp.float32

  @property
  def num_exits(self) -> int:
    return self.n_blocks

  def validate(self) -> None:
    """Raises ValueError naming the bad hyper-parameter and its valid choices."""
    base.check_choice("prune", self.prune, PRUNE_MODES)
    base.check_choice("stem", self.stem, STEMS)
    base.check_choice("head", self.head, tuple(layers.HEADS))
    base.check_choice("step_mode", self.step_mode, STEP_MODES)
    base.check_choice("activation", self.activation, tuple(layers.ACTIVATIONS))
    base.check_choice("weight_init", self.weight_init, tuple(layers.INITS))
    base.check_positive_ints(self, ("n_blocks", "step", "base", "n_channels", "growth_rate", "head_width"))
    base.check_bools(self, ("bottleneck", "stem_pointwise", "fusion", "fused_transition",
                            "bn_unbiased_var", "imagenet"))
    base.check_int_sequence("gr_factor", self.gr_factor)
    base.check_int_sequence("bn_factor", self.bn_factor)
    if self.stem != "efficient":
      base.check_unused(self, ("stem_pointwise",), f"stem={self.stem!r} (it applies to stem='efficient')")
    if self.imagenet:
      base.check_unused(self, ("head_width",), "imagenet=True (its classifiers keep their input width)")
    if len(self.gr_factor) == 1:
      base.check_unused(self, ("fusion", "fused_transition"), "a single scale (len(gr_factor) == 1)")
    if len(self.gr_factor) != len(self.bn_factor):
      raise ValueError(f"gr_factor {tuple(self.gr_factor)} and bn_factor {tuple(self.bn_factor)} must be "
                       "non-empty and of the same length (one entry per scale)")
    if any(self.growth_rate * g % 2 for g in self.gr_factor[1:]):
      raise ValueError("growth_rate * gr_factor[s] must be even for every scale s > 1 (the down and "
                       f"normal paths each add half of it); got growth_rate={self.growth_rate}, "
                       f"gr_factor={tuple(self.gr_factor)}")
    if not 0 <= self.reduction <= 1:
      raise ValueError(f"reduction must lie in [0, 1], got {self.reduction}")

  def layer_plan(self) -> list[list[LayerPlan]]:
    """The per-block layer schedule (scales, channel counter, transitions)."""
    return plan_layers(self.n_blocks, self.step_mode, self.step, self.base, self.n_channels,
                       self.growth_rate, len(self.gr_factor), self.reduction)

  def setup(self):
    self.validate()
    head = (layers.IMAGENET_HEADS if self.imagenet else layers.HEADS)[self.head]
    norm = layers.batch_norm(self.bn_unbiased_var, self.dtype)
    init = layers.init_scheme(self.weight_init)
    settings = BlockSettings(self.n_channels, self.growth_rate, tuple(self.gr_factor),
                             tuple(self.bn_factor), self.bottleneck, self.stem, self.stem_pointwise,
                             self.fusion, self.fused_transition, self.activation, norm, init,
                             self.imagenet, self.dtype)
    head_width = 0 if self.imagenet else self.head_width  # 0: the ImageNet classifier keeps its width
    for b, plans in enumerate(self.layer_plan()):
      setattr(self, f"block{b + 1}", MSDBlock(tuple(plans), settings, first=b == 0))
      setattr(self, f"exit{b + 1}", head(self.num_classes, head_width, self.activation, norm, init,
                                         self.dtype))

  def stage(self, state: Any, k: int, *, train: bool = False) -> tuple[list[jax.Array], jax.Array]:
    """Runs block k (1-based) on `state` (the images for k = 1) and exit k on its coarsest scale."""
    xs = getattr(self, f"block{k}")(state, train=train)
    head_input, coarsest = self.exit_branch(xs[-1], k)  # the head reads the coarsest scale
    return [*xs[:-1], coarsest], getattr(self, f"exit{k}")(head_input, train=train)


class MSDFuse(MSDNet):
  """The paper's model on CIFAR, with widths calibrated to its cost envelope.

  The paper publishes no widths. It reports its last exit at about 0.645e8 FLOPs and its exits spread over
  0.25e8 .. 0.64e8 (literature convention). Chosen here: 8 exits (even, step 2, base 4, 18 layers),
  n_channels 66, growth_rate 8, gr_factor 1-2-4, bn_factor 1-2-4, with all four MSDFuse switches and GELU.
  n_channels 64 (an independent estimate from the paper's figures) puts the last exit at 61.98 M on CIFAR-10,
  just below the 62 M floor; 66 sits inside the window on both datasets.

  Per-exit costs: `msdfuse_jax/models/cost_tables.json` (checked against the code by tests/test_costs.py);
  op_counter, MACs and parameters are cumulative, the heads of earlier exits included.
  """

  n_blocks: int = 8
  n_channels: int = 66
  growth_rate: int = 8
  stem: str = "efficient"
  fusion: bool = True
  fused_transition: bool = True
  head: str = "msdfuse"
  activation: str = "gelu"


class MSDFuseImageNet(MSDFuse):
  """MSDFuse in ImageNet mode (224x224): the efficient stem with a strided first conv, four scales
  (56/28/14/7), the authors' ImageNet classifier (1x1, 1x1, global pool, Linear), GELU.

  The paper reports no ImageNet model, so the widths are ours, chosen against MSDNet's ImageNet model
  (`msdnet_imagenet_step4`, exits 0.340e9 .. 1.361e9 in the literature convention): the last exit at no
  more than 0.85x its last exit and the first at no more than its first. Chosen: 5 exits (even, step 4,
  base 4, 20 layers), n_channels 42, growth_rate 14, gr_factor 1-2-4-4, bn_factor 1-2-4-4: exit 1 costs
  0.323e9, exit 5 1.146e9 (0.842x). n_channels 32 with MSDNet's growth 16 puts the last exit at 1.327e9
  (0.975x), growth 12 at 0.813e9; growth 14 with 42 channels is the widest pair inside both bounds.

  Per-exit costs: `msdfuse_jax/models/cost_tables.json` (checked against the code by tests/test_costs.py).
  """

  n_blocks: int = 5
  step: int = 4
  base: int = 4
  n_channels: int = 42
  growth_rate: int = 14
  gr_factor: Sequence[int] = (1, 2, 4, 4)
  bn_factor: Sequence[int] = (1, 2, 4, 4)
  imagenet: bool = True
