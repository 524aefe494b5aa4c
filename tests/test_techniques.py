"""Training techniques: gradient equilibrium, boosted ensembles, last-exit distillation, named exit weights."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msdfuse_jax import costs, metrics, models, train
from msdfuse_jax.evaluation import budget
from msdfuse_jax.models import base
from tests import test_inference as inference_tests

FAMILIES = ("msdnet_tiny", "msdfuse_tiny", "ranet_tiny", "resnet_mc_tiny", "densenet_mc_tiny")
MEAN, STD = np.full(3, 0.5, np.float32), np.full(3, 0.25, np.float32)
NO_AUG = ml_collections.ConfigDict(dict(crop_padding=0, flip=False, mixup_alpha=0.0, cutmix_alpha=0.0,
                                        switch_prob=0.5, mix_prob=1.0, label_smoothing=0.0))


class Chain(base.MultiExitModule):
  """Two scalar stages: f1 = x * w1, exit 1 = f1 * h1; f2 = f1 * w2, exit 2 = f2 * h2."""

  @property
  def num_exits(self):
    return 2

  def setup(self):
    self.w = [self.param(f"w{k}", nn.initializers.constant(1.0), ()) for k in (1, 2)]
    self.h = [self.param(f"h{k}", nn.initializers.constant(1.0), ()) for k in (1, 2)]

  def stage(self, state, k, *, train=False):
    head_input, trunk = self.exit_branch(state * self.w[k - 1], k)
    return trunk, head_input * self.h[k - 1]


def test_gradient_equilibrium_scales_the_branch_gradients_as_stated():
  model = Chain()
  params = {"params": {"w1": 3.0, "h1": 5.0, "w2": 7.0, "h2": 11.0}}
  x = jnp.float32(2.0)
  loss = lambda x: sum(model.apply(params, x))

  # Plain: dL/dx = w1 (h1 + w2 h2). With K = 2: the features of exit 1 get 1/2 of the head's gradient and
  # 1/2 * (K - 1) = 1/2 of the trunk's; exit 2 (the last) is unscaled: dL/dx = w1 (h1 / 2 + w2 h2 / 2).
  assert float(jax.grad(loss)(x)) == 3.0 * (5.0 + 7.0 * 11.0)
  with base.gradient_equilibrium():
    assert float(jax.grad(loss)(x)) == 3.0 * (5.0 / 2 + 7.0 * 11.0 / 2)
    assert [float(v) for v in model.apply(params, x)] == [30.0, 462.0]  # forward unchanged


def _batch(n=8, size=32, classes=10, seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)),
          jnp.asarray(rng.integers(0, classes, (n,), dtype=np.int32)))


def _grads(model, variables, images, labels, tech=train.Techniques(), weights=None):
  weights = metrics.exit_weights(weights, model.num_exits)
  # The batch is an argument, not a constant of the program: another batch of the same shape reuses it.
  fn = jax.jit(lambda p, bs, x, y: train.loss_and_grads(p, bs, x, y, jax.random.PRNGKey(0), model=model,
                                                        aug=NO_AUG, mean=MEAN, std=STD, num_classes=10,
                                                        weights=weights, tech=tech)[0])
  return fn(variables["params"], variables["batch_stats"], images, labels)


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_takes_every_technique(name):
  """Gradient equilibrium (the per-family part, `exit_branch` in each `stage`): forward bit-identical, heads'
  gradients unchanged, the trunk's rescaled; with boosting and distillation too, finite gradients."""
  plain = models.build_model(name, 10)
  images, labels = _batch()
  variables = models.init_variables(plain, jax.random.PRNGKey(0))
  x = (images.astype(jnp.float32) / 255 - MEAN) / STD
  forward = lambda: jax.jit(lambda v: plain.apply(v, x))(variables)  # traced anew in each context
  with base.gradient_equilibrium():
    outputs = forward()
  for a, b in zip(outputs, forward()):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  g_plain = _grads(plain, variables, images, labels)
  g_ge = _grads(plain, variables, images, labels, train.Techniques(gradient_equilibrium=True))
  heads = [k for k in g_plain if k.startswith("exit")]
  assert len(heads) == plain.num_exits
  for head in heads:  # the rescaling acts on the features entering a head, not on the head's parameters
    for a, b in zip(jax.tree.leaves(g_plain[head]), jax.tree.leaves(g_ge[head])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  trunk_plain = [k for k in g_plain if not k.startswith("exit")]
  assert any(not np.allclose(np.asarray(a), np.asarray(b))
             for k in trunk_plain for a, b in zip(jax.tree.leaves(g_plain[k]), jax.tree.leaves(g_ge[k])))

  # Boosting and distillation live in the shared contract and loss (family-independent): all techniques
  # together are trained on one family here (compiling a third gradient per family doubles the test's time).
  if name == "msdnet_tiny":
    boosted = models.build_model(name, 10, boost_reweight=0.5)
    everything = train.Techniques(gradient_equilibrium=True, distill_alpha=0.5, distill_temperature=2.0)
    grads = _grads(boosted, variables, images, labels, everything, weights="lin_grow")
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_boosted_exits_are_the_running_ensemble_with_stopped_gradients():
  plain = models.build_model("msdnet_tiny", 10)
  boosted = models.build_model("msdnet_tiny", 10, boost_reweight=0.5)
  variables = models.init_variables(plain, jax.random.PRNGKey(1))
  x = jax.random.normal(jax.random.PRNGKey(2), (4, 32, 32, 3))
  raw = jax.jit(plain.apply)(variables, x)
  out = jax.jit(boosted.apply)(variables, x)
  ensemble = raw[0]
  np.testing.assert_array_equal(np.asarray(out[0]), np.asarray(raw[0]))
  for k in range(1, plain.num_exits):
    ensemble = raw[k] + 0.5 * ensemble
    np.testing.assert_allclose(np.asarray(out[k]), np.asarray(ensemble), rtol=1e-6, atol=1e-6)

  # Exit k's loss does not reach the heads of the exits before it.
  def exit_loss(params, k):
    logits = boosted.apply({**variables, "params": params}, x)[k - 1]
    return jnp.sum(jax.nn.log_softmax(logits)[:, 0])

  grads = jax.jit(jax.grad(exit_loss), static_argnums=1)(variables["params"], 3)
  for j in (1, 2):
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads[f"exit{j}"]))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads["exit3"]))
  # The literature cost of the ensemble's add is 0: op_counter as without boosting.
  assert ([c.op_counter for c in costs.exit_costs(boosted, with_xla=False)] ==
          [c.op_counter for c in costs.exit_costs(plain, with_xla=False)])
  with pytest.raises(ValueError, match="boost_reweight must be a number >= 0"):
    models.build_model("msdnet_tiny", 10, boost_reweight=-1.0)


@pytest.fixture(scope="module")
def boosted_run(float32_matmuls):  # early exit equals the simulation exactly at float32's own precision
  del float32_matmuls
  model = models.build_model("resnet_mc_tiny", 10, boost_reweight=0.5)
  return inference_tests.early_exit_setup(model, seed=3, num_val=48, num_test=40, predict_batch=16,
                                          num_buckets=2)


@pytest.mark.parametrize("p", [4, 20, 35])
@pytest.mark.usefixtures("float32_matmuls")
def test_early_exit_with_boosting_equals_the_simulation(boosted_run, p):
  runner, test, val_probs, test_probs = boosted_run
  thresholds = budget.fit_thresholds(val_probs, p)
  sim_exits, sim_preds = budget.apply_thresholds(test_probs, thresholds)
  result = runner.run(test, thresholds)
  np.testing.assert_array_equal(result.exits, sim_exits + 1)
  np.testing.assert_array_equal(result.predictions, sim_preds)


def test_distillation_alpha_zero_is_the_plain_loss_and_alpha_one_drops_the_labels():
  model = models.build_model("msdnet_tiny", 10)
  variables = models.init_variables(model, jax.random.PRNGKey(0))
  images, labels = _batch()
  plain = _grads(model, variables, images, labels)
  zero = _grads(model, variables, images, labels, train.Techniques(distill_alpha=0.0, distill_temperature=4.0))
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(zero)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # alpha = 1: the earlier exits learn from the last exit only, so their heads' gradients do not depend on
  # the labels (the last exit still learns from them).
  full = train.Techniques(distill_alpha=1.0, distill_temperature=2.0)
  g1 = _grads(model, variables, images, labels, full)
  g2 = _grads(model, variables, images, (labels + 1) % 10, full)
  for head in ("exit1", "exit2"):
    for a, b in zip(jax.tree.leaves(g1[head]), jax.tree.leaves(g2[head])):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-8)
  assert not np.allclose(np.asarray(g1["exit3"]["linear"]["kernel"]), np.asarray(g2["exit3"]["linear"]["kernel"]))
  # The distillation term itself: 0 for identical exits, 0 for the last exit, T^2 KL otherwise.
  z = jax.random.normal(jax.random.PRNGKey(5), (3, 4, 10))
  kd = train.distillation_losses(tuple(z), 2.0)
  assert kd.shape == (3, 4) and float(jnp.abs(kd[-1]).max()) == 0.0
  p_t, log_p_s = jax.nn.softmax(z[-1] / 2), jax.nn.log_softmax(z[0] / 2)
  np.testing.assert_allclose(kd[0], 4 * jnp.sum(p_t * (jnp.log(p_t) - log_p_s), -1), rtol=1e-5)
  assert float(jnp.abs(train.distillation_losses((z[-1], z[-1]), 3.0)).max()) < 1e-6


def test_named_exit_weights_and_bad_technique_settings():
  np.testing.assert_array_equal(metrics.exit_weights("uniform", 4), np.ones(4))
  np.testing.assert_allclose(metrics.exit_weights("lin_grow", 4), [0.4, 0.8, 1.2, 1.6])
  assert metrics.exit_weights("lin_grow", 7).sum() == pytest.approx(7)
  with pytest.raises(ValueError, match="expected one of \\('uniform', 'lin_grow'\\)"):
    metrics.exit_weights("triangle", 3)
  from configs import cifar  # pylint: disable=import-outside-toplevel
  config = cifar.get_config("model=msdnet_tiny")
  assert train.techniques(config) == train.Techniques()
  config.distill.alpha = 1.5
  with pytest.raises(train.ConfigError, match="config.distill.alpha=1.5 must lie in \\[0, 1\\]"):
    train.techniques(config)
  config.distill.alpha, config.distill.temperature = 0.5, 0.0
  with pytest.raises(train.ConfigError, match="temperature=0.0 must be > 0"):
    train.techniques(config)
