"""Building blocks shared by every multi-exit network in the package.

Every convolution here follows the PyTorch reference implementations' conventions, because exact parity
with them (costs, parameter counts, converted weights, training steps) depends on them:

* convolutions have no bias and are followed by BatchNorm and an activation;
* padding is explicit and symmetric (``k // 2`` on every side), as in PyTorch. XLA's ``'SAME'`` padding
  would pad a stride-2 convolution on an even input asymmetrically (0 before, 1 after) and shift every
  feature map by half a pixel with respect to the PyTorch model;
* `BatchNorm` is PyTorch's ``BatchNorm2d``: momentum 0.1 (``0.9`` here: the weight of the old value),
  eps 1e-5 and, by default, running variances updated with the *unbiased* batch variance. Every model
  builds one `norm` partial (`batch_norm`) and hands it to its layers, so these settings live here only;
* the initial values come from an `Init` (`INITS`): MSDNet-PyTorch's model, as it actually runs, keeps
  PyTorch's default layer initialisation ('pytorch'); its `_init_weights` (meant to set
  N(0, sqrt(2 / (kh * kw * C_out))) kernels and zero Linear biases, 'he_fan_out') never reaches a layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Dtype = Any
Initializer = Callable[..., jax.Array]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    # PyTorch's nn.GELU default is the exact (erf) form, which the MSDFuse authors use.
    "gelu": functools.partial(nn.gelu, approximate=False),
}

# N(0, sqrt(2 / (kh * kw * C_out))), untruncated: the Lua MSDNet's and ResNet/DenseNet's He init.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default Conv2d and Linear weight init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
linear_kernel_init = torch_default_kernel_init


def torch_default_bias_init(fan_in: int) -> Initializer:
  """PyTorch's default Linear bias init, U(+-1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


@dataclasses.dataclass(frozen=True)
class Init:
  """How a network's trainable parameters start (BatchNorm always starts at scale 1, bias 0)."""

  conv: Initializer  # every convolution kernel
  zero_linear_bias: bool  # False: PyTorch's default U(+-1/sqrt(fan_in))


INITS = {
    "pytorch": Init(conv=torch_default_kernel_init, zero_linear_bias=False),
    "he_fan_out": Init(conv=conv_kernel_init, zero_linear_bias=True),
}


def init_scheme(name: str) -> Init:
  """The `Init` called `name`; raises ValueError listing the valid names."""
  try:
    return INITS[name]
  except KeyError:
    raise ValueError(f"unknown init {name!r}; valid choices: {sorted(INITS)}") from None


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """Returns the activation called `name`; raises ValueError listing the valid names."""
  try:
    return ACTIVATIONS[name]
  except KeyError:
    raise ValueError(f"unknown activation {name!r}; valid choices: {sorted(ACTIVATIONS)}") from None


class BatchNorm(nn.Module):
  """PyTorch's ``BatchNorm2d`` over the last axis, with flax's variable names (``scale``, ``bias``;
  ``batch_stats``: ``mean``, ``var``) so that checkpoints and converted weights are unaffected.

  In training mode it normalises with the biased batch variance (two-pass, in float32) and updates the
  running statistics as ``momentum * old + (1 - momentum) * new``, where the new variance is the unbiased
  one (``n / (n - 1)`` times the biased one, n = values per channel) when `unbiased_var` is set, as
  PyTorch does, or the biased one, as flax's ``nn.BatchNorm`` does.
  """

  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  unbiased_var: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      axes = tuple(range(x.ndim - 1))
      xf = x.astype(jnp.float32)
      mean = jnp.mean(xf, axes)
      var = jnp.mean(jnp.square(xf - mean), axes)
      if not self.is_initializing():
        n = x.size // features
        new_var = var * (n / (n - 1)) if self.unbiased_var and n > 1 else var
        ra_mean.value = self.momentum * ra_mean.value + (1.0 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1.0 - self.momentum) * new_var
    mul = scale * lax.rsqrt(var + self.epsilon)
    y = (x.astype(jnp.float32) - mean) * mul + bias
    return y.astype(self.dtype)


def batch_norm(unbiased_var: bool = True, dtype: Dtype = jnp.float32) -> Callable[..., BatchNorm]:
  """The `norm` partial a network hands to its layers: ``norm(use_running_average=..., name=...)``."""
  return functools.partial(BatchNorm, unbiased_var=unbiased_var, dtype=dtype)


class ConvBasic(nn.Module):
  """conv -> `norm` -> activation, with PyTorch-style symmetric padding.

  The conv has no bias unless `use_bias` (MSDNet's ImageNet stem), whose init is then PyTorch's default,
  U(+-1/sqrt(fan_in)).
  """

  features: int
  kernel: int = 3
  stride: int = 1
  groups: int = 1
  activation: str = "relu"
  norm: Callable[..., nn.Module] = BatchNorm
  kernel_init: Initializer = conv_kernel_init
  use_bias: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    pad = self.kernel // 2
    fan_in = self.kernel * self.kernel * x.shape[-1] // self.groups
    x = nn.Conv(
        self.features,
        (self.kernel, self.kernel),
        strides=(self.stride, self.stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=self.groups,
        use_bias=self.use_bias,
        bias_init=torch_default_bias_init(fan_in),
        kernel_init=self.kernel_init,
        dtype=self.dtype,
        name="conv",
    )(x)
    x = self.norm(use_running_average=not train, name="bn")(x)
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
  norm: Callable[..., nn.Module] = BatchNorm
  kernel_init: Initializer = conv_kernel_init
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(ConvBasic, activation=self.activation, norm=self.norm,
                             kernel_init=self.kernel_init, dtype=self.dtype)
    if self.bottleneck:
      inner = min(x.shape[-1], self.bn_width * self.features)
      x = conv(inner, kernel=1, name="bottleneck")(x, train=train)
    return conv(self.features, kernel=3, stride=2 if self.down else 1, name="conv3x3")(x, train=train)


def classifier_linear(num_classes: int, x: jax.Array, zero_bias: bool = True) -> jax.Array:
  """The final Linear of a head (called inside a compact method, so it is named ``linear`` there).

  It runs in float32 even under bfloat16 compute: it is tiny and the loss wants float32 logits.
  """
  bias_init = nn.initializers.zeros if zero_bias else torch_default_bias_init(x.shape[-1])
  return nn.Dense(num_classes, kernel_init=linear_kernel_init, bias_init=bias_init, name="linear")(
      x.astype(jnp.float32))


class Head(nn.Module):
  """The settings every exit head takes: classes, width of its convolutions, and the network's toolkit."""

  num_classes: int
  width: int = 128
  activation: str = "relu"
  norm: Callable[..., nn.Module] = BatchNorm
  param_init: Init = INITS["he_fan_out"]
  dtype: Dtype = jnp.float32


class MSDNetHead(Head):
  """MSDNet's classifier: two 3x3 stride-2 ConvBasic to `width` (128 on CIFAR; 0 keeps the input width, as
  MSDNet's ImageNet classifier does), 2x2 average pool, Linear.

  On a map smaller than 8x8 (the efficient stem halves every scale) the two convolutions leave a 1x1 map
  that a 2x2 pool cannot take, so a global average pool is used there instead.
  """

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(ConvBasic, self.width or x.shape[-1], kernel=3, stride=2,
                             activation=self.activation,
                             norm=self.norm, kernel_init=self.param_init.conv, dtype=self.dtype)
    x = conv(name="conv1")(x, train=train)
    x = conv(name="conv2")(x, train=train)
    if x.shape[1] >= 2 and x.shape[2] >= 2:
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    else:
      x = jnp.mean(x, axis=(1, 2), keepdims=True)
    x = x.reshape((x.shape[0], -1))
    return classifier_linear(self.num_classes, x, self.param_init.zero_linear_bias)


class MSDFuseHead(Head):
  """The MSDFuse classifier: ConvBasic 3x3 stride 2, ConvBasic 1x1, global average pool, Linear."""

  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(ConvBasic, self.width, activation=self.activation, norm=self.norm,
                             kernel_init=self.param_init.conv, dtype=self.dtype)
    x = conv(kernel=3, stride=2, name="conv1")(x, train=train)
    x = conv(kernel=1, name="conv2")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return classifier_linear(self.num_classes, x, self.param_init.zero_linear_bias)


class MSDFuseImageNetHead(Head):
  """The authors' MSDFuse classifier in ImageNet mode: ConvBasic 1x1 twice at `width` (0 keeps the input
  width), global average pool, Linear."""

  activation: str = "gelu"

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    conv = functools.partial(ConvBasic, self.width or x.shape[-1], kernel=1, activation=self.activation,
                             norm=self.norm, kernel_init=self.param_init.conv, dtype=self.dtype)
    x = conv(name="conv1")(x, train=train)
    x = conv(name="conv2")(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return classifier_linear(self.num_classes, x, self.param_init.zero_linear_bias)


HEADS = {"msdnet": MSDNetHead, "msdfuse": MSDFuseHead}
IMAGENET_HEADS = {"msdnet": MSDNetHead, "msdfuse": MSDFuseImageNetHead}  # the same names, ImageNet mode


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
  `jax.image.resize`, which lowers to `dot_general`: resampling costs 0 in the literature convention,
  and the jaxpr cost counter counts every `dot_general` as MACs. Resizing to the
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


class PooledMSDNetHead(Head):
  """MSDNet's CIFAR head on a map of any size: average-pool it to `resolution` first, then `MSDNetHead`.

  On an 8x8 map (the default `resolution`) this is exactly `MSDNetHead` and costs the same; a 32x32 or
  16x16 map is first average-pooled with window = stride = H / 8, so every head sees an 8x8 map as in
  MSDNet and RANet. Used by the ResNet^MC / DenseNet^MC baselines, whose heads read 32x32 and 16x16 maps.
  """

  resolution: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    factor = x.shape[1] // self.resolution
    if factor > 1:
      x = nn.avg_pool(x, (factor, factor), strides=(factor, factor))
    return MSDNetHead(self.num_classes, self.width, self.activation, self.norm, self.param_init, self.dtype,
                      name="head")(x, train=train)


class GlobalPoolHead(nn.Module):
  """A ResNet / DenseNet final classifier: [BN -> ReLU ->] global average pool -> Linear.

  `pre_activation` adds the BN-ReLU that a pre-activation network (DenseNet) applies before its pool.
  """

  num_classes: int
  pre_activation: bool = False
  norm: Callable[..., nn.Module] = BatchNorm
  param_init: Init = INITS["he_fan_out"]

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
    if self.pre_activation:
      x = nn.relu(self.norm(use_running_average=not train, name="bn")(x))
    return classifier_linear(self.num_classes, jnp.mean(x, axis=(1, 2)), self.param_init.zero_linear_bias)


BASELINE_HEADS = ("msdnet", "pool")


def baseline_head(kind: str, num_classes: int, width: int, resolution: int, pre_activation: bool,
                  norm: Callable[..., nn.Module], init: Init, dtype: Dtype) -> nn.Module:
  """The exit head of ResNet^MC / DenseNet^MC: 'msdnet' (`PooledMSDNetHead`) or 'pool'
  (`GlobalPoolHead`, the network's own final classifier, BN-ReLU first if `pre_activation`)."""
  if kind == "pool":
    return GlobalPoolHead(num_classes, pre_activation, norm, init)
  return PooledMSDNetHead(num_classes, width, norm=norm, param_init=init, dtype=dtype, resolution=resolution)
