"""Tests for the baselines: RANet (msdfuse_jax.models.ranet), ResNet^MC and DenseNet^MC.

RANet's per-exit costs and parameter counts are compared, every integer, with those of RANet-pytorch's own
op counter (../shared/reference/model_counts.json). ResNet^MC and DenseNet^MC have no reference code; their
costs are compared with the MSDNet paper's published curves within stated tolerances.
"""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msdfuse_jax import costs
from msdfuse_jax.models import build_model, layers, ranet
from tests.conftest import shared_file

RANET_REFERENCE = {"ranet_cifar": "ranet_train_cifar_sh", "ranet_readme": "ranet_readme_lg"}
DATASETS = {"cifar10": 10, "cifar100": 100}
# Points read off the MSDNet paper's anytime-prediction figures (units of 1e8 ops).
PUBLISHED = {
    "resnet_mc": [0.08, 0.28, 0.56, 0.76, 1.04, 1.23, 1.33],
    "densenet_mc": [0.21, 0.64, 1.03, 1.16, 1.27, 1.30, 1.31],
}
TINY = ("ranet_tiny", "resnet_mc_tiny", "densenet_mc_tiny")


def _images(batch: int = 2, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, 32, 32, 3), jnp.float32)


@functools.lru_cache(maxsize=None)
def _costs(name: str, num_classes: int, **overrides) -> list[costs.ExitCost]:
  return costs.exit_costs(build_model(name, num_classes, **overrides), with_xla=False)


# --- Bilinear resampling -------------------------------------------------------------------------------


def _torch_bilinear_reference(x: np.ndarray, size: tuple[int, int], align_corners: bool) -> np.ndarray:
  """PyTorch's upsample_bilinear2d (CPU), pixel by pixel, on an NHWC array.

  Source coordinates in float32, as PyTorch computes them (its `area_pixel_compute_scale` and
  `area_pixel_compute_source_index`); the blend in float64.
  """
  f32 = np.float32

  def source(dst: int, n_in: int, n_out: int) -> tuple[int, int, float]:
    if align_corners:
      src = f32(dst) * (f32(n_in - 1) / f32(n_out - 1)) if n_out > 1 else f32(0)
    else:
      src = max(f32(n_in) / f32(n_out) * (f32(dst) + f32(0.5)) - f32(0.5), f32(0))
    i0 = min(int(math.floor(src)), n_in - 1)
    i1 = i0 + (1 if i0 < n_in - 1 else 0)
    return i0, i1, float(f32(src - f32(i0)))

  n, h, w, c = x.shape
  out = np.zeros((n, size[0], size[1], c))
  for oh in range(size[0]):
    h0, h1, lh = source(oh, h, size[0])
    for ow in range(size[1]):
      w0, w1, lw = source(ow, w, size[1])
      out[:, oh, ow] = ((1 - lh) * ((1 - lw) * x[:, h0, w0] + lw * x[:, h0, w1])
                        + lh * ((1 - lw) * x[:, h1, w0] + lw * x[:, h1, w1]))
  return out


@pytest.mark.cpu_exact
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("in_size,out_size", [((8, 8), (16, 16)), ((16, 16), (32, 32)), ((16, 16), (8, 8)),
                                              ((5, 7), (9, 4)), ((8, 8), (8, 8)), ((1, 3), (4, 6))])
def test_bilinear_resize_matches_pytorch_formula(align_corners, in_size, out_size):
  x = np.random.default_rng(0).normal(size=(2, *in_size, 3)).astype(np.float32)
  got = layers.bilinear_resize(jnp.asarray(x), out_size, align_corners=align_corners)
  want = _torch_bilinear_reference(x.astype(np.float64), out_size, align_corners)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6, rtol=1e-6)


def test_bilinear_resize_known_weights():
  x = jnp.asarray([0.0, 1.0]).reshape(1, 1, 2, 1)
  # 2x upsampling, align_corners=False: the fixed 0.25 / 0.75 weights (edges clamped).
  np.testing.assert_allclose(layers.bilinear_resize(x, (1, 4), align_corners=False).ravel(),
                             [0.0, 0.25, 0.75, 1.0])
  # align_corners=True (RANet): corners kept, interior at 1/3 and 2/3.
  np.testing.assert_allclose(layers.bilinear_resize(x, (1, 4), align_corners=True).ravel(),
                             [0.0, 1 / 3, 2 / 3, 1.0], rtol=1e-6)


def test_bilinear_resize_costs_nothing():
  # The literature convention counts resampling as 0: no dot_general may appear in its jaxpr.
  x = jnp.zeros((1, 8, 8, 4))
  jaxpr = jax.make_jaxpr(lambda v: layers.bilinear_resize(v, (16, 16), align_corners=True))(x)
  assert costs.count_jaxpr(jaxpr.jaxpr) == costs.OpCount(0, 0)


# --- RANet: exact parity with RANet-pytorch's op counter -------------------------------------------------


@pytest.mark.cpu_exact
@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("name", list(RANET_REFERENCE))
def test_ranet_costs_match_reference_exactly(name, dataset):
  ref = json.loads(shared_file("reference", "model_counts.json").read_text())[f"{RANET_REFERENCE[name]}/{dataset}"]
  got = _costs(name, DATASETS[dataset])
  assert len(got) == ref["n_exits"]
  assert [c.op_counter for c in got] == [int(v) for v in ref["op_counter_flops"]]
  assert [c.params for c in got] == ref["op_counter_params"]
  assert [c.macs for c in got] == ref["hook_cum_mac"]  # conv + Linear multiply-accumulates only
  assert got[-1].params == ref["total_params"]


def test_ranet_cifar_plan_facts():
  """RANet-pytorch's schedule for train_cifar.sh (flows lowest resolution first)."""
  plan = build_model("ranet_cifar", 10).plan()
  assert [len(f) for f in plan] == [2, 4, 6, 8]
  assert [[b.index for b in f if b.has_exit] for f in plan] == [[1, 2], [3, 4], [5, 6], [7, 8]]
  assert [[b.index for b in f if b.down] for f in plan] == [[], [2], [2, 4], [4, 6]]
  assert [[b.index for b in f if b.transition_out] for f in plan] == [[], [2], [2, 4], [2, 5]]
  assert [b.n_layers for b in plan[3]] == [4] * 8
  assert [b.n_layers for b in build_model("ranet_readme", 10).plan()[2]] == [2, 4, 6, 8, 10, 12]


# --- Every baseline: exits, shapes, truncation, training mode ---------------------------------------------


@pytest.mark.parametrize("name,exits", [("ranet_cifar", 8), ("ranet_readme", 6), ("resnet_mc", 7),
                                        ("densenet_mc", 7)])
def test_full_size_exit_count_and_shapes(name, exits):
  model = build_model(name, 100)
  assert model.num_exits == exits
  x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  outputs, _ = jax.eval_shape(lambda v: model.init_with_output(jax.random.PRNGKey(0), v), x)
  assert [o.shape for o in outputs] == [(2, 100)] * exits


def _random_variables(model, x: jax.Array, seed: int = 0):
  """Variables of `model` filled with random values (jit-compiling `model.init` takes half a minute)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    if "batch_stats" in jax.tree_util.keystr(path) and "var" in jax.tree_util.keystr(path):
      return jnp.asarray(rng.uniform(0.5, 1.5, s.shape), s.dtype)
    return jnp.asarray(rng.normal(0.0, 0.3, s.shape), s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_truncation_and_training(name):
  model = build_model(name, 10)
  x = _images()
  variables = _random_variables(model, x)
  full = jax.jit(model.apply)(variables, x)
  assert len(full) == model.num_exits >= 3
  assert all(o.shape == (2, 10) and bool(jnp.all(jnp.isfinite(o))) for o in full)
  # num_exits is static and stops the forward pass: exit 1 alone gives exit 1's logits.
  first = jax.jit(functools.partial(model.apply, num_exits=1))(variables, x)
  assert len(first) == 1
  np.testing.assert_allclose(first[0], full[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="num_exits"):
    model.apply(variables, x, num_exits=model.num_exits + 1)
  # Training mode (batch statistics, updated running averages): traced only, compiling it is slow.
  train = functools.partial(model.apply, train=True, mutable=["batch_stats"])
  outputs, updates = jax.eval_shape(train, variables, x)
  assert [o.shape for o in outputs] == [(2, 10)] * model.num_exits
  assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(variables["batch_stats"])


def test_ranet_first_layer_keeps_pytorch_default_init():
  # RANet-pytorch's _init_weights skips the first layer: PyTorch's U(+-1/sqrt(fan_in)) stays there.
  first = ranet.RAFirstLayer(4, (4, 2, 1), (1, 2, 3))
  params = first.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))["params"]
  for flow, fan_in in (("flow3", 27), ("flow2", 9 * 4), ("flow1", 9 * 8)):
    kernel = params[flow]["conv"]["kernel"]
    bound = 1 / math.sqrt(fan_in)
    assert float(jnp.max(jnp.abs(kernel))) <= bound
    assert float(jnp.std(kernel)) == pytest.approx(bound / math.sqrt(3), rel=0.25)  # uniform, not normal


# --- ResNet^MC / DenseNet^MC against the published curves ------------------------------------------------


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_mc_baselines_near_published_curves(name):
  got = np.array([c.op_counter for c in _costs(name, 10)]) / 1e8
  published = np.array(PUBLISHED[name])
  assert len(got) == 7 and np.all(np.diff(got) > 0)
  if name == "resnet_mc":
    # The published first point is below what any network of the description can cost (see the module
    # docstring); the increments between exits fix the widths: within 0.02e8 of the published ones.
    np.testing.assert_allclose(np.diff(got), np.diff(published), atol=0.02)
    np.testing.assert_allclose(got[2:], published[2:], rtol=0.25)
  else:
    np.testing.assert_allclose(got, published, rtol=0.20)
  assert 1.3 <= got[-1] <= 1.6


def test_mc_pool_heads_fit_published_curves_closer():
  dense = np.array([c.op_counter for c in _costs("densenet_mc", 10, head="pool")]) / 1e8
  np.testing.assert_allclose(dense, PUBLISHED["densenet_mc"], rtol=0.16)
  np.testing.assert_allclose(dense[-1], 1.31, rtol=0.01)
  res = np.array([c.op_counter for c in _costs("resnet_mc", 10, head="pool")]) / 1e8
  np.testing.assert_allclose(np.diff(res), np.diff(PUBLISHED["resnet_mc"]), atol=0.012)


@pytest.mark.parametrize("name", ["resnet_mc_tiny", "densenet_mc_tiny"])
def test_mc_cifar100_adds_only_linear_cost(name):
  c10, c100 = _costs(name, 10), _costs(name, 100)
  width = build_model(name, 10).head_width
  for k, (a, b) in enumerate(zip(c10, c100), start=1):
    assert b.op_counter - a.op_counter == k * 90 * (width + 1)  # 90 more classes x (weights + bias)
    assert b.params - a.params == k * 90 * (width + 1)


# --- Hyper-parameter validation ----------------------------------------------------------------------------


@pytest.mark.parametrize("name,overrides,match", [
    ("ranet_cifar", dict(step=1), "step"),
    ("ranet_cifar", dict(step_mode="lin_grow"), "step_mode"),
    ("ranet_cifar", dict(scale_list=(1, 3, 3, 3)), "scale_list"),
    ("ranet_cifar", dict(scale_list=(1, 2, 2, 2)), "scale_list"),
    ("ranet_cifar", dict(gr_factor=(4, 2, 1)), "gr_factor"),
    ("ranet_cifar", dict(compress_factor=0.0), "compress_factor"),
    ("ranet_cifar", dict(growth_rate=1), "compress_factor"),
    ("ranet_cifar", dict(reduction=0.0), "reduction"),
    ("ranet_cifar", dict(block_step=0), "block_step"),
    ("resnet_mc", dict(shortcut="B"), "shortcut"),
    ("resnet_mc", dict(head="linear"), "head"),
    ("resnet_mc", dict(exit_after=(8, 4)), "exit_after"),
    ("resnet_mc", dict(exit_after=(4, 10)), "exit_after"),
    ("resnet_mc", dict(widths=(32, 16, 64)), "widths"),
    ("resnet_mc", dict(blocks_per_stage=0), "blocks_per_stage"),
    ("densenet_mc", dict(growth_rate=0), "growth_rate"),
    ("densenet_mc", dict(exit_after=(0, 6)), "exit_after"),
    ("densenet_mc", dict(compression=1.5), "compression"),
    ("densenet_mc", dict(head="gap"), "head"),
])
def test_bad_hyper_parameters_raise(name, overrides, match):
  with pytest.raises(ValueError, match=match):
    build_model(name, 10, **overrides)


def test_ranet_exit_schedule_follows_forward_order():
  model = build_model("ranet_readme", 10)
  blocks = [[(p.flow + 1, p.index) for p in seg] for seg in model.exit_schedule()]
  assert blocks == [[(1, 1)], [(1, 2)], [(2, 1), (2, 2), (2, 3)], [(2, 4)],
                    [(3, 1), (3, 2), (3, 3), (3, 4), (3, 5)], [(3, 6)]]
  assert isinstance(model, ranet.RANet)
