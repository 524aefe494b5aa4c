"""ResNet^MC: a 62-layer CIFAR ResNet with intermediate classifiers (the MSDNet paper's baseline).

The MSDNet paper (Huang et al., ICLR 2018, appendix) describes it as a ResNet with 62 layers, 10 residual
blocks at each of the three resolutions, and early-exit classifiers on the outputs of the 4th and 8th
residual block of each resolution: 6 intermediate classifiers plus the final one, 7 exits. The rest is
He et al.'s CIFAR ResNet (2016): a 3x3 conv stem, basic blocks of two 3x3 conv-BN layers (ReLU after the
first and after the residual add), widths 16/32/64 at 32x32/16x16/8x8, the first block of resolutions 2
and 3 strided, and a parameter-free identity shortcut where the shape changes (option A: subsample and
zero-pad the channels; ``shortcut='conv'`` gives option B, a 1x1 conv + BN projection).
1 + 3 * 10 * 2 + 1 = 62 layers.

Heads (not specified by the MSDNet paper; MSDNet-style here, like the MSDNet presets'): by default
(``head='msdnet'``) every exit, the final one included, is MSDNet's CIFAR head (ConvBasic 3x3/2 -> 128,
ConvBasic 3x3/2 -> 128, 2x2 average pool, Linear) applied to the block output average-pooled to 8x8
(`layers.PooledMSDNetHead`): window and stride 4 on 32x32 maps, 2 on 16x16 maps, nothing on 8x8 maps, where
the head is exactly MSDNet's. Feeding a 32x32 map to the strided head directly would cost 14 M ops per head,
far off the published curve. ``head='pool'`` puts the ResNet's own classifier (global average pool -> Linear)
at every exit instead.

Widths: He et al.'s 16/32/64 (the MSDNet paper gives none).

Per-exit costs: `msdfuse_jax/models/cost_tables.json` (checked against the code by tests/test_costs.py),
entries ``resnet_mc`` and ``resnet_mc,head=pool`` (literature convention, cumulative; C-100 differs only in
the Linear layers). The MSDNet paper's ResNet^MC curve has its exits at 0.08, 0.28, 0.56, 0.76, 1.04, 1.23 and
1.33e8. The increments between exits, 0.199, 0.285, 0.201, 0.290, 0.207, 0.112 e8 (MSDNet heads) or 0.190,
0.273, 0.189, 0.272, 0.189, 0.095 e8 (pool heads), match the published ones, 0.20, 0.28, 0.20, 0.28, 0.19,
0.10, which these widths reproduce; the absolute values sit about 0.1e8 above the published ones. No network
of this description can reach the published first point: exit 1 (stem + 4 blocks + head) costs more than
exit 2 - exit 1 (4 identical blocks + an identical head), whereas the published curve has 0.08 < 0.20.
Narrower widths would shrink the increments rather than the offset (widths 15/30/60 give 0.18 ... 1.325e8
with MSDNet heads).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msdfuse_jax.models import base, chain, layers

Dtype = Any
SHORTCUTS = ("pad", "conv")
INIT = layers.INITS["he_fan_out"]  # He et al.'s init, zero Linear biases


class BasicBlock(nn.Module):
  """conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut, then ReLU (He et al., 2016)."""

  features: int
  stride: int = 1
  shortcut: str = "pad"
  norm: Callable[..., nn.Module] = layers.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                             kernel_init=INIT.conv, dtype=self.dtype)
    norm = functools.partial(self.norm, use_running_average=not train)
    y = nn.relu(norm(name="bn1")(conv(strides=(self.stride, self.stride), name="conv1")(x)))
    y = norm(name="bn2")(conv(name="conv2")(y))
    if self.stride != 1 or x.shape[-1] != self.features:
      if self.shortcut == "conv":
        x = nn.Conv(self.features, (1, 1), strides=(self.stride, self.stride), use_bias=False,
                    kernel_init=INIT.conv, dtype=self.dtype, name="shortcut_conv")(x)
        x = norm(name="shortcut_bn")(x)
      else:  # option A: subsample, zero-pad the new channels (no parameters, no cost)
        x = x[:, ::self.stride, ::self.stride, :]
        extra = self.features - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + x)


class ResNetMC(chain.ChainMC):
  """ResNet^MC for 32x32 inputs. Defaults are the MSDNet paper's 62-layer, 7-exit network.

  Attributes (and `chain.ChainMC`'s: classes, exit positions, heads):
    widths: channels at each resolution (one resolution per entry; every resolution after the first
      starts with a stride-2 block).
    blocks_per_stage: residual blocks per resolution.
    exit_after: 1-based block indices (within each resolution) followed by an intermediate exit; the
      last block of the last resolution always has the final exit.
    shortcut: 'pad' (option A, He et al.'s CIFAR choice) or 'conv' (1x1 projection) where shapes change.
    head: 'msdnet' (MSDNet's CIFAR head on the map average-pooled to `head_resolution`) or 'pool'
      (global average pool -> Linear, the ResNet's own classifier, at every exit).
  """

  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 10
  exit_after: Sequence[int] = (4, 8)
  shortcut: str = "pad"

  @property
  def chain_shape(self) -> tuple[int, int, str]:
    return len(self.widths), self.blocks_per_stage, "blocks_per_stage"

  def validate(self) -> None:
    """Raises ValueError naming the bad hyper-parameter and its valid choices."""
    base.check_choice("shortcut", self.shortcut, SHORTCUTS)
    base.check_positive_ints(self, ("blocks_per_stage",))
    base.check_int_sequence("widths", self.widths)
    if any(b < a for a, b in zip(self.widths, self.widths[1:])):
      raise ValueError(f"widths must be non-decreasing (the 'pad' shortcut only adds channels), got "
                       f"{tuple(self.widths)}")
    self.validate_chain()

  def setup(self):
    self.validate()
    norm = layers.batch_norm(self.bn_unbiased_var, self.dtype)
    self.stem = layers.ConvBasic(self.widths[0], norm=norm, kernel_init=INIT.conv, dtype=self.dtype)
    for s, width in enumerate(self.widths, start=1):
      for b in range(1, self.blocks_per_stage + 1):
        stride = 2 if s > 1 and b == 1 else 1
        setattr(self, f"stage{s}_block{b}", BasicBlock(width, stride, self.shortcut, norm, self.dtype))
    self.setup_heads(False, norm, INIT)

  def stage(self, state: Any, k: int, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs the residual blocks between exit k-1 and exit k (the stem too for k = 1), then exit k."""
    x = self.stem(state, train=train) if k == 1 else state
    for s, b in self.schedule()[k - 1]:
      x = getattr(self, f"stage{s}_block{b}")(x, train=train)
    head_input, x = self.exit_branch(x, k)
    return x, getattr(self, f"exit{k}")(head_input, train=train)
