"""MSDNet / MSDFuse structure, switches, the multi-exit contract and errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from msdfuse_jax import models
from msdfuse_jax.models import msdnet


def _init(model, size=32, batch=1):
  x = jnp.zeros((batch, size, size, 3))
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))


def _kernel_shapes(variables):
  flat = traverse_util.flatten_dict(variables["params"])
  return {"/".join(k[:-1]): v.shape for k, v in flat.items() if k[-1] == "kernel"}


def test_anytime7_layout_matches_spec():
  model = models.build_model("msdnet_anytime7", 10)
  plans = model.layer_plan()
  assert [len(b) for b in plans] == [4, 2, 2, 2, 2, 2, 2]
  flat = [p for b in plans for p in b]
  assert [(p.index, p.transition_out) for p in flat if p.transition_out] == [(7, 29), (13, 32)]
  # 58 -> 29 at layer 7 and 65 -> 32 at layer 13.
  assert flat[6].n_in + 6 == 58 and flat[12].n_in + 6 == 65
  kernels = _kernel_shapes(_init(model))
  head_inputs = [kernels[f"exit{k}/conv1/conv"][2] for k in range(1, 8)]
  assert head_inputs == [160, 208, 140, 188, 236, 152, 200]


def test_shapes_and_truncation():
  model = models.build_model("msdfuse_tiny", 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  full = jax.jit(model.apply)(variables, x)
  assert isinstance(full, tuple) and len(full) == model.num_exits == 3
  assert all(o.shape == (2, 10) and o.dtype == jnp.float32 for o in full)
  two = jax.jit(functools.partial(model.apply, num_exits=2))(variables, x)
  assert len(two) == 2
  np.testing.assert_allclose(np.stack(two), np.stack(full[:2]), rtol=1e-6, atol=1e-6)
  # Stage by stage gives the same logits as the whole network.
  state = x
  for k in range(1, 4):
    stage = jax.jit(functools.partial(model.apply, k=k, method=model.stage))
    state, logits = stage(variables, state)
    np.testing.assert_allclose(logits, full[k - 1], rtol=1e-6, atol=1e-6)


def test_train_mode_updates_batch_stats():
  model = models.build_model("msdnet_tiny", 10)
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  outs, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert len(outs) == 3
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_spatial_sizes_of_each_stem():
  for stem, sizes in (("msdnet", [32, 16, 8]), ("efficient", [16, 8, 4])):
    model = models.build_model("msdnet_tiny", 10, stem=stem)
    x = jnp.zeros((1, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x)
    feats, _ = model.apply(variables, x, 1, method=model.stage)
    assert [f.shape[1] for f in feats] == sizes


def test_fusion_widens_the_down_path_by_one_growth():
  # Down path of scale s reads (n_in + growth) * gr[s-1] channels with fusion, n_in * gr[s-1] without.
  kw = dict(bottleneck=False)
  plain = _kernel_shapes(_init(models.build_model("msdnet_tiny", 10, **kw)))
  fused = _kernel_shapes(_init(models.build_model("msdnet_tiny", 10, fusion=True, **kw)))
  model = models.build_model("msdnet_tiny", 10)
  layer = model.layer_plan()[0][1]  # layer 2: all three scales, no transition
  g, gr = model.growth_rate, model.gr_factor
  for s in (2, 3):
    key = f"block1/layer{layer.index}/scale{s}_down/conv3x3/conv"
    assert plain[key][2] == layer.n_in * gr[s - 2]
    assert fused[key][2] == (layer.n_in + g) * gr[s - 2]
  # The normal paths and everything else keep their widths.
  same = [k for k in plain if "_down" not in k and "exit" not in k and "layer0" not in k]
  changed = [k for k in same if "scale1" in k and plain[k] != fused[k]]
  assert not changed


def test_fused_transition_drops_the_down_path_of_the_first_kept_scale():
  base = models.build_model("msdnet_tiny", 10)
  dropping = [p for b in base.layer_plan() for p in b if p.in_scales > p.out_scales]
  assert dropping
  plan = dropping[0]
  first_kept = len(base.gr_factor) - plan.out_scales + 1  # 1-based scale name
  path = lambda b: {k for k in _kernel_shapes(_init(b)) if f"layer{plan.index}/" in k}
  without = path(base)
  with_switch = path(models.build_model("msdnet_tiny", 10, fused_transition=True))
  assert any(f"scale{first_kept}_down" in k for k in without)
  assert not any(f"scale{first_kept}_down" in k for k in with_switch)
  # The normal-only path adds the full growth of that scale.
  shapes = _kernel_shapes(_init(models.build_model("msdnet_tiny", 10, fused_transition=True,
                                                   bottleneck=False)))
  key = f"block{_block_of(base, plan.index)}/layer{plan.index}/scale{first_kept}_normal/conv3x3/conv"
  assert shapes[key][3] == base.growth_rate * base.gr_factor[first_kept - 1]


def _block_of(model, index):
  for b, plans in enumerate(model.layer_plan()):
    if any(p.index == index for p in plans):
      return b + 1
  raise AssertionError(index)


def test_msdfuse_head_and_stem_switches():
  kernels = _kernel_shapes(_init(models.build_model("msdnet_tiny", 10, head="msdfuse")))
  assert kernels["exit1/conv2/conv"][:2] == (1, 1)
  kernels = _kernel_shapes(_init(models.build_model("msdnet_tiny", 10, stem="efficient")))
  c = 4  # n_channels * gr_factor[0] of the tiny preset
  assert kernels["block1/layer0/stem/conv2_dw/conv"] == (3, 3, 1, c)
  assert kernels["block1/layer0/stem/conv4_dw/conv"] == (3, 3, 1, c)
  assert "block1/layer0/stem/conv4_pw/conv" not in kernels
  kernels = _kernel_shapes(_init(models.build_model("msdnet_tiny", 10, stem="efficient",
                                                    stem_pointwise=True)))
  assert kernels["block1/layer0/stem/conv4_pw/conv"] == (1, 1, c, c)


def test_activation_switch():
  x = jnp.zeros((1, 32, 32, 3))
  for act, present, absent in (("gelu", "erfc", "max"), ("relu", "max", "erfc")):
    model = models.build_model("msdnet_tiny", 10, activation=act)
    variables = model.init(jax.random.PRNGKey(0), x)
    text = str(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))
    assert present in text and absent not in text


def test_bfloat16_compute_keeps_float32_params():
  model = models.build_model("msdnet_tiny", 10, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  outs = model.apply(variables, x)
  assert all(o.dtype == jnp.float32 for o in outs)
  assert "bf16" in str(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))


@pytest.mark.parametrize("name", ["msdnet_anytime7", "msdnet_budget5", "msdnet_anytime10",
                                  "msdnet_budget7", "msdfuse"])
def test_presets_exit_counts(name):
  model = models.build_model(name, 100)
  expected = {"msdnet_anytime7": 7, "msdnet_budget5": 5, "msdnet_anytime10": 10, "msdnet_budget7": 7,
              "msdfuse": 8}[name]
  assert model.num_exits == expected
  shapes = _init(model)
  assert sum(1 for k in shapes["params"] if k.startswith("exit")) == expected


def test_bad_input_raises_value_error_naming_choices():
  with pytest.raises(ValueError, match="valid choices.*msdnet_anytime7"):
    models.build_model("resnet1000", 10)
  with pytest.raises(ValueError, match="unknown hyper-parameter.*growth"):
    models.build_model("msdnet_tiny", 10, growth=3)
  with pytest.raises(ValueError, match="step_mode.*even"):
    models.build_model("msdnet_tiny", 10, step_mode="fast")
  with pytest.raises(ValueError, match="activation.*gelu"):
    models.build_model("msdnet_tiny", 10, activation="swish")
  with pytest.raises(ValueError, match="stem.*efficient"):
    models.build_model("msdnet_tiny", 10, stem="resnet")
  with pytest.raises(ValueError, match="prune"):
    models.build_model("msdnet_tiny", 10, prune="min")
  with pytest.raises(ValueError, match="num_classes"):
    models.build_model("msdnet_tiny", 0)
  model = models.build_model("msdnet_tiny", 10)
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match="num_exits"):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)), num_exits=4)


def test_block_steps():
  assert msdnet.block_steps(5, "lin_grow", 1, 1) == [1, 2, 3, 4, 5]
  assert msdnet.block_steps(3, "even", 2, 4) == [4, 2, 2]
