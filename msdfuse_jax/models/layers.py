"""Building blocks shared by every multi-exit network in the package.

Every convolution here follows MSDNet-PyTorch's conventions, because exact parity with the reference
implementations (costs, parameter counts, converted weights) depends on them:

* convolutions have no bias and are followed by BatchNorm and an activation;
* padding is explicit and symmetric (``k // 2`` on every side), as in PyTorch. XLA's ``'SAME'`` padding
  would pad a stride-2 convolution on an even input asymmetrically (0 before, 1 after) and shift every
  feature map by half a pixel with respect to the PyTorch model;
* conv kernels are initialised from N(0, sqrt(2 / (kh * kw * C_out))), BatchNorm scale 1 / bias 0;
* BatchNorm uses PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9, and eps 1e-5).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    # PyTorch's nn.GELU default is the exact (erf) form, which the MSDFuse authors use.
    "gelu": functools.partial(nn.gelu, approximate=False),
}

# N(0, sqrt(2 / (kh * kw * C_out))), untruncated, as MSDNet-PyTorch's `_init_weights`.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear weight init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation called `name`; raises ValueError listing the valid names."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; valid choices: {sorted(ACTIVATIONS)}") from None


class ConvBasic(nn.Module):
  """conv (no bias) -> BatchNorm -> activation, with PyTorch-style symmetric padding."""

  features: int
  kernel: int = 3
  stride: int = 1
  groups: int = 1
  activation: str = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    pad = self.kernel // 2
    x = nn.Conv(
        self.features,
        (self.kernel, self.kernel),
        strides=(self.stride, self.stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=self.groups,
        use_bias=False,
        kernel_init=conv_kernel_init,
        dtype=self.dtype,
        name="conv",
    )(x)
    x = nn.BatchNorm(
        use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype, name="bn"
    )(x)
    return activation_fn(self.activation)(x)


class ConvBN(nn.Module):
  """MSDNet's ConvBN: optional 1x1 bottleneck, then a 3x3 conv of stride 1 ('normal') or 2 ('down').

  The bottleneck width is ``min(C_in, bn_width * features)``, as in MSDNet-PyTorch.
  """

  features: int
  down: bool = False
  bottleneck: bool = True
  bn_width: int = 1
  activation: str = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(ConvBasic, activation=self.activation, dtype=self.dtype)
    if self.bottleneck:
      inner = min(x.shape[-1], self.bn_width * self.features)
      x = conv(inner, kernel=1, name="bottleneck")(x, train=train)
    return conv(self.features, kernel=3, stride=2 if self.down else 1, name="conv3x3")(x, train=train)


def classifier_linear(num_classes: int, x: jax.Array) -> jax.Array:
  """The final Linear of a head (called inside a compact method, so it is named ``linear`` there).

  It runs in float32 even under bfloat16 compute: it is tiny and the loss wants float32 logits.
  """
  return nn.Dense(num_classes, kernel_init=linear_kernel_init, name="linear")(x.astype(jnp.float32))


class MSDNetHead(nn.Module):
  """MSDNet's CIFAR classifier: two 3x3 stride-2 ConvBasic to 128, 2x2 average pool, Linear.

  On a map smaller than 8x8 (the efficient stem halves every scale) the two convolutions leave a 1x1 map
  that a 2x2 pool cannot take, so a global average pool is used there instead (SPEC section 3.7).
  """

  num_classes: int
  width: int = 128
  activation: str = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(ConvBasic, self.width, kernel=3, stride=2, activation=self.activation,
                             dtype=self.dtype)
    x = conv(name="conv1")(x, train=train)
    x = conv(name="conv2")(x, train=train)
    if x.shape[1] >= 2 and x.shape[2] >= 2:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    else:
      x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = x.reshape((x.shape[0], -1))
    return classifier_linear(self.num_classes, x)


class MSDFuseHead(nn.Module):
  """The MSDFuse classifier: ConvBasic 3x3 stride 2, ConvBasic 1x1, global average pool, Linear."""

  num_classes: int
  width: int = 128
  activation: str = "gelu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(ConvBasic, self.width, activation=self.activation, dtype=self.dtype)
    x = conv(kernel=3, stride=2, name="conv1")(x, train=train)
    x = conv(kernel=1, name="conv2")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return classifier_linear(self.num_classes, x)


HEADS = {"msdnet": MSDNetHead, "msdfuse": MSDFuseHead}


# --- Resampling and heads shared by the RANet / ResNet^MC / DenseNet^MC baselines. ---------------------


def _linear_taps(n_in: int, n_out: int, align_corners: bool):
  """Source indices and weights of PyTorch's 1-D linear interpolation from `n_in` to `n_out` samples.

  PyTorch (``F.interpolate(..., size=, mode='bilinear')``, CPU kernel) maps output index d to the source
  coordinate ``d * (n_in - 1) / (n_out - 1)`` (align_corners=True) or ``max((d + 0.5) * n_in / n_out - 0.5,
  0)`` (align_corners=False), reads the two neighbours ``i0 = floor(src)`` and ``min(i0 + 1, n_in - 1)``
  and weights them ``1 - (src - i0)`` and ``src - i0``. The arithmetic is float32, as PyTorch's.
  """
  dst = np.arange(n_out, dtype=np.float32)
  if align_corners:
    scale = np.float32((n_in - 1) / (n_out - 1)) if n_out > 1 else np.float32(0)
    src = dst * scale
  else:
    src = np.maximum((dst + np.float32(0.5)) * np.float32(n_in / n_out) - np.float32(0.5), np.float32(0))
  i0 = np.minimum(np.floor(src).astype(np.int32), n_in - 1)
  i1 = np.minimum(i0 + 1, n_in - 1)
  w1 = (src - i0.astype(np.float32)).astype(np.float32)
  return i0, i1, (np.float32(1) - w1).astype(np.float32), w1


def bilinear_resize(x: jax.Array, size: tuple[int, int], align_corners: bool) -> jax.Array:
  """PyTorch's ``F.interpolate(x, size=size, mode='bilinear', align_corners=...)`` on an NHWC array.

  Written as two gathers and a weighted sum per axis (fixed, precomputed taps) rather than with
  `jax.image.resize`, which lowers to `dot_general`: resampling costs 0 in the literature convention
  (SPEC.md section 5), and the jaxpr cost counter counts every `dot_general` as MACs. Resizing to the
  same size is the identity in both conventions and returns `x` itself.
  """
  for axis, n_out in ((2, size[1]), (1, size[0])):  # width first, then height, as PyTorch's kernel
    n_in = x.shape[axis]
    if n_in == n_out:
      continue
    i0, i1, w0, w1 = _linear_taps(n_in, n_out, align_corners)
    shape = [1] * x.ndim
    shape[axis] = n_out
    x = (jnp.take(x, i0, axis=axis) * jnp.asarray(w0.reshape(shape), x.dtype)
         + jnp.take(x, i1, axis=axis) * jnp.asarray(w1.reshape(shape), x.dtype))
  return x


class PooledMSDNetHead(nn.Module):
  """MSDNet's CIFAR head on a map of any size: average-pool it to `resolution` first, then `MSDNetHead`.

  On an 8x8 map (the default `resolution`) this is exactly `MSDNetHead` and costs the same; a 32x32 or
  16x16 map is first average-pooled with window = stride = H / 8, so every head sees an 8x8 map as in
  MSDNet and RANet. Used by the ResNet^MC / DenseNet^MC baselines, whose heads read 32x32 and 16x16 maps.
  """

  num_classes: int
  width: int = 128
  resolution: int = 8
  activation: str = "relu"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    factor = x.shape[1] // self.resolution
    if factor > 1:
      x = nn.avg_pool(x, (factor, factor), strides=(factor, factor))
    return MSDNetHead(self.num_classes, self.width, self.activation, self.dtype, name="head")(
        x, train=train)


class GlobalPoolHead(nn.Module):
  """A ResNet / DenseNet final classifier: [BN -> ReLU ->] global average pool -> Linear.

  `pre_activation` adds the BN-ReLU that a pre-activation network (DenseNet) applies before its pool.
  """

  num_classes: int
  pre_activation: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.pre_activation:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                       name="bn")(x)
      x = nn.relu(x)
    return classifier_linear(self.num_classes, jnp.mean(x, axis=(1, 2)))
