"""MSDNet / MSDFuse structure, switches, the multi-exit contract and errors."""

import functools
import re

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


def _variable_shapes(variables):
  """Every variable (params and batch statistics) by its full path, ``params/exit1/conv1/conv/kernel``."""
  return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(variables).items()}


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
  variables = models.init_variables(model, jax.random.PRNGKey(0))
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
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  outs, updates = jax.jit(lambda v: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables)
  assert len(outs) == 3
  before = jax.tree.leaves(variables["batch_stats"])
  after = jax.tree.leaves(updates["batch_stats"])
  assert any(not np.allclose(a, b) for a, b in zip(before, after))


def test_spatial_sizes_of_each_stem():
  for stem, sizes in (("msdnet", [32, 16, 8]), ("efficient", [16, 8, 4])):
    model = models.build_model("msdnet_tiny", 10, stem=stem)
    x = jnp.zeros((1, 32, 32, 3))
    feats, _ = jax.eval_shape(lambda v: model.apply(v, x, 1, method=model.stage), _init(model))
    assert [f.shape[1] for f in feats] == sizes


def test_fusion_widens_the_down_path_by_one_growth():
  # Down path of scale s reads (n_in + growth) * gr[s-1] channels with fusion, n_in * gr[s-1] without.
  kw = dict(bottleneck=False)
  plain_vars = _init(models.build_model("msdnet_tiny", 10, **kw))
  fused_vars = _init(models.build_model("msdnet_tiny", 10, fusion=True, **kw))
  plain, fused = _kernel_shapes(plain_vars), _kernel_shapes(fused_vars)
  model = models.build_model("msdnet_tiny", 10)
  layer = model.layer_plan()[0][1]  # layer 2: all three scales, no transition
  g, gr = model.growth_rate, model.gr_factor
  for s in (2, 3):
    key = f"block1/layer{layer.index}/scale{s}_down/conv3x3/conv"
    assert plain[key][2] == layer.n_in * gr[s - 2]
    assert fused[key][2] == (layer.n_in + g) * gr[s - 2]
  # The same variables exist, and the only shapes that change are the input widths of the down paths'
  # convolutions (here one per path), by one growth of the finer scale, wherever that finer scale has a
  # normal path in the same layer (the features fused; a pruning layer has none at its dropped scale). The
  # normal paths, the stem, the transitions, the exits and every batch norm keep their shapes.
  plain_all, fused_all = _variable_shapes(plain_vars), _variable_shapes(fused_vars)
  assert plain_all.keys() == fused_all.keys()
  widened, kept = [], []
  for key, shape in plain_all.items():
    match = re.fullmatch(r"params/(block\d+/layer\d+)/scale(\d)_down/conv3x3/conv/kernel", key)
    s = int(match.group(2)) if match else 0
    if match and f"params/{match.group(1)}/scale{s - 1}_normal/conv3x3/conv/kernel" in plain_all:
      assert fused_all[key] == shape[:2] + (shape[2] + g * gr[s - 2],) + shape[3:], key
      widened.append(key)
      continue
    assert fused_all[key] == shape, key
    if match:
      kept.append(key)
  # The pruning layers 3 and 5 (3 -> 2 and 2 -> 1 scales) keep their first kept scale's down path as it is.
  assert len(widened) == 6
  assert kept == [f"params/{path}/conv3x3/conv/kernel" for path in ("block2/layer3/scale2_down",
                                                                     "block3/layer5/scale3_down")]


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
    variables = _init(model)
    text = str(jax.make_jaxpr(lambda v: model.apply(v, x))(variables))
    assert present in text and absent not in text


def test_bfloat16_compute_keeps_float32_params():
  model = models.build_model("msdnet_tiny", 10, dtype=jnp.bfloat16)
  x = jnp.zeros((2, 32, 32, 3))
  variables = _init(model)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
  outs = jax.eval_shape(lambda v: model.apply(v, x), variables)
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
  with pytest.raises(ValueError, match="num_exits"):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3)), num_exits=4), _init(model))


def test_block_steps():
  assert msdnet.block_steps(5, "lin_grow", 1, 1) == [1, 2, 3, 4, 5]
  assert msdnet.block_steps(3, "even", 2, 4) == [4, 2, 2]


def test_a_switch_without_effect_is_an_error():
  with pytest.raises(ValueError, match="stem_pointwise=True has no effect with stem='msdnet'"):
    models.build_model("msdnet_tiny", 10, stem_pointwise=True)
  models.build_model("msdnet_tiny", 10, stem="efficient", stem_pointwise=True).validate()
  with pytest.raises(ValueError, match="fusion=True has no effect with a single scale"):
    models.build_model("msdnet_tiny", 10, gr_factor=(1,), bn_factor=(1,), fusion=True)
  for bad in (dict(bottleneck=1), dict(growth_rate=True), dict(bn_factor=(1, 2, True))):
    with pytest.raises(ValueError):
      models.build_model("msdnet_tiny", 10, **bad)


def test_num_exits_must_be_an_exit_count_not_a_bool():
  model = models.build_model("msdnet_tiny", 10)
  variables = _init(model)
  apply = lambda n: jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3)), num_exits=n), variables)
  for bad in (True, 0, 4, 1.0):
    with pytest.raises(ValueError, match="num_exits must be an integer in"):
      apply(bad)
  assert len(apply(2)) == 2


def _flat_params(name, **overrides):
  model = models.build_model(name, 10, **overrides)
  params = models.init_variables(model, jax.random.PRNGKey(0))["params"]
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def test_weight_init_pytorch_is_pytorchs_default_and_he_fan_out_is_msdnets_intent():
  # 'pytorch' (the MSDNet presets' default): every conv and Linear U(+-1/sqrt(fan_in)), Linear biases too.
  # 'he_fan_out': N(0, sqrt(2 / (k * k * C_out))) kernels and zero Linear biases.
  for init in ("pytorch", "he_fan_out"):
    # msdnet_tiny: the same code paths as the presets at a fraction of the compile time; kernels of at
    # least 500 entries estimate the standard deviation to a few per cent.
    flat = _flat_params("msdnet_tiny", weight_init=init)
    kernels = {k: v for k, v in flat.items() if k.endswith("conv/kernel") and v.size >= 500}
    assert len(kernels) > 10
    for key, w in kernels.items():
      kh, kw, c_in, c_out = w.shape
      if init == "pytorch":
        bound = 1 / np.sqrt(kh * kw * c_in)
        assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound, key
        np.testing.assert_allclose(w.std(), bound / np.sqrt(3), rtol=0.15, err_msg=key)
      else:
        assert np.abs(w).max() > 2 * w.std()  # a normal, not a uniform
        np.testing.assert_allclose(w.std(), np.sqrt(2 / (kh * kw * c_out)), rtol=0.15, err_msg=key)
    biases = [v for k, v in flat.items() if k.endswith("linear/bias")]
    assert len(biases) == 3
    if init == "pytorch":
      assert all(np.abs(b).max() > 0 for b in biases)
    else:
      assert all(not b.any() for b in biases)


@pytest.mark.parametrize("unbiased", [True, False])
def test_batchnorm_running_variance_follows_pytorch_or_flax(unbiased):
  from msdfuse_jax.models import layers  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 3, 2)) * 2 + 1
  bn = layers.BatchNorm(unbiased_var=unbiased)
  variables = bn.init(jax.random.PRNGKey(0), x)
  y, updates = bn.apply(variables, x, mutable=["batch_stats"])
  n = 4 * 3 * 3
  xs = np.asarray(x).reshape(n, 2)
  var = xs.var(0) * (n / (n - 1) if unbiased else 1.0)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 * 1.0 + 0.1 * var, rtol=1e-5)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * xs.mean(0), rtol=1e-5, atol=1e-7)
  # The forward pass normalises with the biased batch variance either way (as both frameworks do).
  np.testing.assert_allclose(np.asarray(y).reshape(n, 2), (xs - xs.mean(0)) / np.sqrt(xs.var(0) + 1e-5),
                             rtol=1e-4, atol=1e-5)


def test_imagenet_mode_is_msdnets_and_names_what_it_needs():
  model = models.build_model("msdnet_imagenet_tiny", 1000)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3)))
  stem = variables["params"]["block1"]["layer0"]["scale1"]["conv"]
  assert stem["kernel"].shape == (7, 7, 3, 8) and stem["bias"].shape == (8,)  # 7x7/2 with bias
  # The classifiers keep their input width (n_channels * gr_factor[-1] plus growth), not 128.
  head = variables["params"]["exit1"]
  assert head["conv1"]["conv"]["kernel"].shape[-1] == head["conv1"]["conv"]["kernel"].shape[-2]
  assert head["linear"]["kernel"].shape[-1] == 1000
  with pytest.raises(ValueError, match="head_width=64 has no effect with imagenet=True"):
    models.build_model("msdnet_imagenet_tiny", 1000, head_width=64)


def test_msdfuse_imagenet_mode_strides_the_stem_and_uses_the_authors_head():
  model = models.build_model("msdfuse_imagenet_tiny", 1000)
  image = jnp.zeros((2, 224, 224, 3))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image)
  stem = variables["params"]["block1"]["layer0"]["stem"]
  assert stem["conv1"]["conv"]["kernel"].shape == (3, 3, 3, 8)
  # Stride 2 in conv1 and in the depthwise conv4: scale 1 at 56x56, the coarsest of 4 scales at 7x7.
  xs, _ = jax.eval_shape(lambda v, x: model.apply(v, x, method=lambda m, x: m.stage(x, 1)), variables, image)
  assert [x.shape[1] for x in xs] == [56, 28, 14, 7]
  head = variables["params"]["exit1"]
  width = xs[-1].shape[-1]
  assert head["conv1"]["conv"]["kernel"].shape == (1, 1, width, width)  # 1x1 convs keeping the width
  assert head["conv2"]["conv"]["kernel"].shape == (1, 1, width, width)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, image)
  assert [l.shape for l in logits] == [(2, 1000)] * 3


def test_init_variables_gives_the_values_of_the_jitted_init():
  # init_variables compiles at another XLA:CPU optimisation level; every initialiser the models use (He
  # normal and PyTorch's uniform kernels, the classifier's uniform bias, BatchNorm's constants) must still
  # draw the same values.
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  from msdfuse_jax.models import layers  # pylint: disable=import-outside-toplevel

  class EveryInit(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Conv(6, (3, 3), kernel_init=layers.conv_kernel_init)(x)
      x = nn.Conv(5, (3, 3), kernel_init=layers.torch_default_kernel_init, use_bias=False)(x)
      x = layers.BatchNorm(use_running_average=not train)(x)
      return layers.classifier_linear(10, x.mean((1, 2)), zero_bias=False)

  module = EveryInit()
  image = jnp.zeros((1, 32, 32, 3))
  # The reference compiled as a user's program is, at XLA's default level 3 (the suite's own is 0: conftest.py).
  default = {"xla_backend_optimization_level": 3} if jax.default_backend() == "cpu" else None
  for seed in (0, 7):
    key = jax.random.PRNGKey(seed)
    ours = models.init_variables(module, key)
    jitted = jax.jit(module.init).lower(key, image).compile(compiler_options=default)(key, image)
    assert jax.tree.structure(ours) == jax.tree.structure(jitted)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(jitted)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
