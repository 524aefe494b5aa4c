"""DenseNet^MC: a 52-layer CIFAR DenseNet-BC with intermediate classifiers (the MSDNet paper's baseline).

The MSDNet paper (Huang et al., ICLR 2018, appendix) describes it as a DenseNet with 52 layers in three
dense blocks of 16 layers each, with intermediate classifiers attached to the 6th and 12th layer of each
block (reading the concatenation of every previous layer of the block, the dense connectivity): 6
intermediate classifiers plus the final one, 7 exits. 1 stem conv + 3 x 16 layers + 2 transitions + the
final classifier = 52 layers, a bottleneck ("BC") layer counting as one, as in MSDNet.

The rest is Huang et al.'s DenseNet-BC for CIFAR (2017): a 3x3 conv stem to 2k channels; pre-activation
layers BN-ReLU-conv1x1 (to 4k) -BN-ReLU-conv3x3 (to k) whose output is concatenated to the input;
transitions BN-ReLU-conv1x1 (compression 0.5) -2x2 average pool between the blocks.

Heads (not specified by the MSDNet paper; MSDNet-style here, like the MSDNet presets'): by default
(``head='msdnet'``) every exit, the final one included, is MSDNet's CIFAR head applied to the features
average-pooled to 8x8 (`layers.PooledMSDNetHead`; exactly MSDNet's head on the 8x8 maps of block 3), as in
`msdfuse_jax.models.resnet_mc`. ``head='pool'`` puts DenseNet's own classifier (BN-ReLU-global average
pool-Linear) at every exit instead.

Width: the papers do not give the growth rate k. k = 8 puts the cost on the published DenseNet^MC curve
(k = 7 lies 7-29 % below it, k = 9 6-33 % above it even with pool heads; k = 12, the usual DenseNet-BC
choice, costs about 3e8).

Per-exit costs: `msdfuse_jax/models/cost_tables.json` (checked against the code by tests/test_costs.py),
entries ``densenet_mc`` and ``densenet_mc,head=pool`` (literature convention, cumulative; C-100 differs only
in the Linear layers). The MSDNet paper's DenseNet^MC curve has its exits at 0.21, 0.64, 1.03, 1.16, 1.27,
1.30 and 1.31e8. With MSDNet heads the cost is within -9 % .. +18 % of every published point (the 8x8 heads
read up to 228 channels and cost about 5 M each, which the published late increments of 0.03 and 0.01e8 leave
no room for); with pool heads within -16 % .. +6 %, and 0.5 % at the last exit.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from msdfuse_jax.models import base, chain, layers

Dtype = Any
INIT = layers.INITS["he_fan_out"]  # He et al.'s init, zero Linear biases


def _norm_relu(norm: Callable[..., nn.Module], x: jax.Array, train: bool, name: str) -> jax.Array:
  """Pre-activation BN -> ReLU (called inside a compact method)."""
  return nn.relu(norm(use_running_average=not train, name=name)(x))


class DenseLayer(nn.Module):
  """DenseNet-BC layer: BN-ReLU-conv1x1 (bottleneck) -BN-ReLU-conv3x3 (growth), concatenated to the input."""

  growth_rate: int
  bottleneck_width: int
  norm: Callable[..., nn.Module] = layers.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, kernel_init=INIT.conv, dtype=self.dtype)
    y = conv(self.bottleneck_width, (1, 1), name="conv1")(_norm_relu(self.norm, x, train, "bn1"))
    y = conv(self.growth_rate, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(
        _norm_relu(self.norm, y, train, "bn2"))
    return jnp.concatenate([x, y], axis=-1)


class Transition(nn.Module):
  """BN-ReLU-conv1x1 to `features` channels, then a 2x2 average pool."""

  features: int
  norm: Callable[..., nn.Module] = layers.BatchNorm
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    x = nn.Conv(self.features, (1, 1), use_bias=False, kernel_init=INIT.conv,
                dtype=self.dtype, name="conv")(_norm_relu(self.norm, x, train, "bn"))
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNetMC(chain.ChainMC):
  """DenseNet^MC for 32x32 inputs. Defaults are the MSDNet paper's 52-layer, 7-exit network with k = 8.

  Attributes (and `chain.ChainMC`'s: classes, exit positions, heads):
    growth_rate: k, channels added per layer.
    n_blocks: dense blocks (one per resolution), separated by transitions.
    layers_per_block: DenseNet-BC layers per block.
    exit_after: 1-based layer indices (within each block) followed by an intermediate exit; the last
      layer of the last block always has the final exit.
    bottleneck_factor: the 1x1 conv has bottleneck_factor * k outputs (4 in DenseNet-BC).
    compression: transitions keep floor(compression * C) channels (0.5 in DenseNet-BC).
    init_channels: stem width; 0 means 2k (DenseNet-BC).
    head: 'msdnet' (MSDNet's CIFAR head on the map average-pooled to `head_resolution`) or 'pool'
      (BN-ReLU-global average pool-Linear, DenseNet's own classifier, at every exit).
  """

  growth_rate: int = 8
  n_blocks: int = 3
  layers_per_block: int = 16
  exit_after: Sequence[int] = (6, 12)
  bottleneck_factor: int = 4
  compression: float = 0.5
  init_channels: int = 0

  @property
  def chain_shape(self) -> tuple[int, int, str]:
    return self.n_blocks, self.layers_per_block, "layers_per_block"

  def validate(self) -> None:
    """Raises ValueError naming the bad hyper-parameter and its valid choices."""
    base.check_positive_ints(self, ("growth_rate", "n_blocks", "layers_per_block", "bottleneck_factor"))
    if (isinstance(self.init_channels, bool) or not isinstance(self.init_channels, int)
        or self.init_channels < 0):
      raise ValueError(f"init_channels must be a non-negative integer (0: 2 * growth_rate), got "
                       f"{self.init_channels!r}")
    if not 0 < self.compression <= 1:
      raise ValueError(f"compression must lie in (0, 1], got {self.compression}")
    self.validate_chain()

  def setup(self):
    self.validate()
    norm = layers.batch_norm(self.bn_unbiased_var, self.dtype)
    k = self.growth_rate
    channels = self.init_channels or 2 * k
    self.stem = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=False,
                        kernel_init=INIT.conv, dtype=self.dtype)
    for b in range(1, self.n_blocks + 1):
      for i in range(1, self.layers_per_block + 1):
        setattr(self, f"block{b}_layer{i}", DenseLayer(k, self.bottleneck_factor * k, norm, self.dtype))
      channels += self.layers_per_block * k
      if b < self.n_blocks:
        channels = math.floor(self.compression * channels)
        setattr(self, f"transition{b}", Transition(channels, norm, self.dtype))
    self.setup_heads(True, norm, INIT)

  def stage(self, state: Any, k: int, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Runs the dense layers (and transitions) between exit k-1 and exit k, then exit k."""
    x = self.stem(state) if k == 1 else state
    for b, i in self.schedule()[k - 1]:
      if i == 1 and b > 1:
        x = getattr(self, f"transition{b - 1}")(x, train=train)
      x = getattr(self, f"block{b}_layer{i}")(x, train=train)
    head_input, x = self.exit_branch(x, k)
    return x, getattr(self, f"exit{k}")(head_input, train=train)
