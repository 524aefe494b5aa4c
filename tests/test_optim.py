"""msdfuse_jax.optim: the learning-rate schedule and PyTorch-style SGD with coupled weight decay."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from msdfuse_jax import optim


def test_learning_rate_warms_up_linearly_then_decays_by_cosine():
  optim_cfg = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_epochs=2.0))
  schedule = optim.learning_rate_schedule(optim_cfg, steps_per_epoch=10, total_steps=120)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(10)), 0.05, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(20)), 0.1, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(70)), 0.05, rtol=1e-5)  # half-way through the cosine
  assert float(schedule(120)) == pytest.approx(0.0, abs=1e-9)
  # A run shorter than the warm-up warms up over half of it.
  short = optim.learning_rate_schedule(optim_cfg, steps_per_epoch=10, total_steps=8)
  np.testing.assert_allclose(float(short(4)), 0.1, rtol=1e-6)


@pytest.mark.parametrize("decay_1d", [False, True])
def test_weight_decay_exempts_biases_and_1d_parameters_unless_asked(decay_1d):
  optim_cfg = ml_collections.ConfigDict(dict(weight_decay=0.5, decay_1d=decay_1d, momentum=0.9, nesterov=True))
  tx = optim.create_optimizer(optim_cfg, lambda step: 1.0)
  params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,)), "bn": {"scale": jnp.ones((2,))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Nesterov SGD on the decay term alone: -lr * (1 + momentum) * weight_decay * p.
  np.testing.assert_allclose(updates["kernel"], -0.95 * np.ones((2, 2)), rtol=1e-6)
  expected_1d = -0.95 if decay_1d else 0.0
  np.testing.assert_allclose(updates["bias"], expected_1d, rtol=1e-6)
  np.testing.assert_allclose(updates["bn"]["scale"], expected_1d, rtol=1e-6)


@pytest.mark.parametrize("warmup_epochs", [0.0, 1.0])
def test_step_schedule_multiplies_at_the_decay_epochs(warmup_epochs):
  # MSDNet's ImageNet recipe: x0.1 at epochs 30 and 60 (here 10 steps an epoch), after an optional warm-up.
  cfg = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_epochs=warmup_epochs, schedule="step",
                                       decay_epochs=(30, 60), decay_factor=0.1))
  schedule = optim.learning_rate_schedule(cfg, steps_per_epoch=10, total_steps=900)
  lr = lambda step: float(schedule(step))
  if warmup_epochs:
    assert lr(0) == 0.0 and lr(5) == pytest.approx(0.05)
  np.testing.assert_allclose([lr(100), lr(299), lr(300), lr(599), lr(600), lr(899)],
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


def test_unknown_schedule_is_named():
  cfg = ml_collections.ConfigDict(dict(learning_rate=0.1, warmup_epochs=0.0, schedule="linear"))
  with pytest.raises(ValueError, match="config.optim.schedule='linear' is not one of"):
    optim.learning_rate_schedule(cfg, 10, 100)
