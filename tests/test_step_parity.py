"""Training-step parity with MSDNet-PyTorch: this project's train step against torch.optim.SGD, step by step.

The fixture ``../shared/reference/step_parity.npz`` (2.7 MB: data lives in ../shared, not in the repository) is
made by ``experiments/torch_step_parity.py`` (by hand, with
torch and an MSDNet-PyTorch checkout; see its docstring): the ``msdnet_tiny`` architecture built by
MSDNet-PyTorch's own ``MSDNet`` class, its initial state_dict, K = 5 fixed un-augmented CIFAR-10 batches of
16, and, for every step, what PyTorch SGD (``model.train()``, loss = sum over exits of the batch-mean
cross-entropy, per-step cosine learning rate from 0.1, momentum 0.9, weight decay 1e-4) computes and leaves
behind, in two cases:

* ``sgd_decay_all``: heavy-ball momentum, weight decay on every parameter (``optim.decay_1d=True``);
* ``nesterov_decay_nd``: Nesterov momentum, no decay on 1-D parameters (``optim.decay_1d=False``).

Here the same weights go through `torch_msdnet.convert_state_dict` and the project's own code runs the same
recipe: the schedule and optimiser of `optim`, `train.loss_and_grads` and the real (global-mesh) train step.

* Step by step (the parity check): each of the K steps starts from torch's state before it (parameters,
  BatchNorm statistics, momentum, step count); compared are every exit's loss, the gradient of every
  parameter, and after the step the parameters, the momentum (optax's trace) and the BatchNorm statistics.
* Free-running: K steps from the initial weights, as training runs them. This tiny network at lr 0.1 is
  chaotic in float32: a ReLU input that lies within rounding of 0 takes the other sign in one framework,
  which moves a whole layer's gradient by ~1 / sqrt(N * H * W) (percents on the heads' 2x2 maps), and later
  steps amplify that. Measured on this fixture: per-exit losses agree to 3e-7 at steps 1-2, then 3e-4, 5e-3,
  1e-2 relative at steps 3-5 (the same growth appears between two JAX runs whose initial weights differ by
  1e-7 relative). Only steps 1-2 are compared tightly there; the rest is a bound.

The same mechanism can, rarely, hit a single step: should a step-by-step comparison ever fail by ~1e-2 in
the tensors of one or two layers only, after a change of XLA, jaxlib or CPU and not of the project's code,
suspect a pre-activation within rounding of 0 before blaming the recipe (the other layers then still agree
to ~1e-5).

BatchNorm's running variance: PyTorch updates ``running_var`` with the *unbiased* batch variance
(n / (n - 1) times the biased one, n = N * H * W elements per channel); flax's BatchNorm uses the biased
one, and the model's ``bn_unbiased_var`` switch selects PyTorch's. The comparison follows the model: with
the switch on, torch's values as they are; off (or on a model without it), torch's values with the
n / (n - 1) undone exactly (the fixture records n for every BatchNorm). That the two conventions differ
measurably on this fixture is itself checked (0.1 * v / (n - 1) after one step: 2.0e-4 on the heads' 2x2
maps, n = 64).

Every call into the project's training code goes through `run_project_steps` below: a rewrite of the train
step changes that one function only.
"""

from __future__ import annotations

import json
import os
import pathlib
import warnings

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import cifar
from msdfuse_jax import metrics, models, parallel, train
from msdfuse_jax import train_state as ts
from msdfuse_jax.interop import torch_msdnet
from tests.conftest import SHARED

from msdfuse_jax import optim as optim_lib

# MSDFUSE_STEP_PARITY_FIXTURE: another fixture, e.g. one made with --head_width=128 (the unmodified heads).
FIXTURE = pathlib.Path(os.environ.get("MSDFUSE_STEP_PARITY_FIXTURE") or
                       SHARED / "reference" / "step_parity.npz")
CASES = ("sgd_decay_all", "nesterov_decay_nd")
# About a minute on a 2-core CPU, half of it compiling the train step once per optimiser.
# cpu_exact: float32 parity with torch's CPU numbers (tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.cpu_exact]
STEPS = 5  # K, as recorded in the fixture (checked against it)


# ---- the adapter: the only place that calls the project's train step --------------------------------------


# The jitted gradient (per model) and the train step (per optimiser), compiled once each; the values keep the
# model and optimiser alive, so that their ids in the keys cannot be reused.
_COMPILED: dict = {}


def run_project_steps(model, tx, aug, start, images, labels, *, first_step, num_steps, mean, std, num_classes,
                      weights):
  """Runs the project's train step on batches ``first_step .. first_step + num_steps - 1`` of `images`.

  Args:
    start: dict with ``params``, ``batch_stats`` and ``momentum`` (params-shaped, or None for a fresh
      optimiser): the state before step `first_step` (0-based), whose optimiser step count is `first_step`.
    images, labels: all K batches, uint8 (K, B, H, W, C) and int (K, B).

  Returns:
    (the gradient at `start` on batch `first_step`, the (num_steps, exits) per-exit batch-mean losses of each
    step (at the parameters before its update), the host `TrainState` after the last step).
  """
  k, b = images.shape[:2]
  if ("grad", id(model)) not in _COMPILED:
    common = dict(model=model, aug=aug, mean=mean, std=std, num_classes=num_classes, weights=weights)
    _COMPILED["grad", id(model)] = (model, jax.jit(
        lambda p, s, x, y: train.loss_and_grads(p, s, x, y, jax.random.PRNGKey(0), **common)))
  if ("step", id(model), id(tx)) not in _COMPILED:
    # One shard of B on one device; step t gathers batch t = perm[t * B:(t + 1) * B] of the on-device data.
    plan = train.Plan(num_shards=1, shard_batch=b, batch_size=b, steps_per_epoch=k, total_steps=k)
    _COMPILED["step", id(model), id(tx)] = (model, tx, train.make_steps(model, tx, aug, plan, weights, mean,
                                                                        std, num_classes)[0])
  grad_fn, p_train_step = _COMPILED["grad", id(model)][-1], _COMPILED["step", id(model), id(tx)][-1]
  grads, _, _ = grad_fn(start["params"], start["batch_stats"], images[first_step], labels[first_step])

  opt_state = tx.init(start["params"])
  found = []

  def resume(s):  # the optimiser state after `first_step` steps: optax's momentum and schedule count
    if isinstance(s, optax.TraceState) and start["momentum"] is not None:
      found.append("trace")
      return s._replace(trace=start["momentum"])
    if isinstance(s, optax.ScaleByScheduleState):
      found.append("count")
      return s._replace(count=jnp.asarray(first_step, jnp.int32))
    return s

  opt_state = jax.tree.map(resume, opt_state,
                           is_leaf=lambda s: isinstance(s, (optax.TraceState, optax.ScaleByScheduleState)))
  assert found.count("count") == 1 and found.count("trace") == (start["momentum"] is not None), found

  state = ts.TrainState(step=jnp.asarray(first_step, jnp.int32), params=start["params"],
                        batch_stats=start["batch_stats"], opt_state=opt_state)
  state = parallel.replicate(state)
  dataset = parallel.replicate({"image": images.reshape(k * b, *images.shape[2:]),
                                "label": labels.reshape(k * b).astype(np.int32)})
  perm = parallel.replicate(np.arange(k * b, dtype=np.int32))
  votes = parallel.stop_votes(False)
  rng = parallel.replicate(jax.random.PRNGKey(0))
  losses = []
  for _ in range(num_steps):
    state, sums, _ = p_train_step(state, dataset, perm, votes, rng)
    sums = parallel.to_host(sums)
    losses.append(np.asarray(sums["loss"]) / float(sums["count"]))
  return grads, np.stack(losses), parallel.to_host(state)


# ---- tolerances -------------------------------------------------------------------------------------------
# Both sides compute in float32 from bit-identical inputs (the same uint8 pixels normalised by the same
# float32 operations, identical weights), so every difference is float32 rounding: XLA and PyTorch's CPU
# kernels sum convolutions, BatchNorm reductions and weight-gradient reductions in different orders (and
# compute the batch variance by different formulas: Welford in PyTorch). One reduction over n terms is
# accurate to about sqrt(n) * 2^-24 ~ 1e-6 relative here, and the ~20 layers of BatchNorm, each dividing by
# a batch std, amplify that forward and backward by up to ~10.
#
# Each tensor is compared against its own scale (max |torch value|) plus a relative term: element-wise
# relative error means nothing for entries that cancel to ~0 (a gradient entry that is a sum of +-terms).
# Measured on this fixture, over both cases and all 5 steps (step by step from torch's state), with flax's
# BatchNorm and with the project's own (PyTorch-convention) one:
#
#   quantity                       max abs    max |diff| / scale   tolerance
#   per-exit losses                4.8e-7     2.0e-7 (relative)    LOSS_TOL  = 1e-5
#   gradients                      3.9e-6     2.0e-5               GRAD_TOL  = 1e-4
#   params after the step          6.9e-7     2.6e-6               STATE_TOL = 1e-4
#   momentum after the step        3.7e-6     2.0e-5               STATE_TOL
#   running_mean after the step    4.8e-8     1.1e-6               STATE_TOL
#   running_var after the step     9.5e-7     1.7e-7               STATE_TOL
#
# (with the unmodified 128-channel heads, --head_width=128: gradients up to 3.2e-5, the rest alike).
# Gradients carry the largest error (weight gradients are sums over all N * H * W positions with heavy
# cancellation), and the momentum inherits it: it *is* the gradient plus 0.9 times the previous one. The
# parameters move by lr times that, so their own error is smaller, except for BatchNorm biases (they start
# at 0, so after a step their scale is lr * their gradient). What the tolerances must still catch, checked
# by mutating the recipe: Nesterov <-> heavy ball, or the learning rate one step off (x 0.976), moves the
# params by > 1e-4 of their scale; weight decay on the wrong parameters, or none, moves the momentum
# (wd * p against gradients of 1e-3 .. 1e-1) by > 1e-4 of its scale; momentum 0.85 instead of 0.9 both. A
# wrong loss (a missing exit, a mean over exits, label smoothing, other normalisation) moves the losses
# and gradients by >= 1e-3.
LOSS_TOL = 1e-5
GRAD_TOL = 1e-4
STATE_TOL = 1e-4
# Free-running steps 3..K: the chaotic growth described in the module docstring; measured 3e-4, 4.5e-3 and
# 1.1e-2 relative at steps 3, 4 and 5, so this is a bound (same regime, nothing blew up), not parity.
FREE_RUNNING_BOUND = 0.1


def assert_close(name: str, actual, expected, tol: float) -> None:
  """``|actual - expected| <= tol * (|expected| + max|expected|)`` element-wise, naming the tensor."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
  scale = float(np.max(np.abs(expected))) if expected.size else 0.0
  np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * max(scale, 1e-12), err_msg=name)


def assert_trees_close(what: str, actual: dict, expected: dict, tol: float) -> None:
  flat_a, flat_e = traverse_util.flatten_dict(actual, sep="/"), traverse_util.flatten_dict(expected, sep="/")
  assert sorted(flat_a) == sorted(flat_e), f"{what}: different leaves"
  for path in sorted(flat_e):
    assert_close(f"{what} {path}", flat_a[path], flat_e[path], tol)


# ---- the fixture, its conversion, the project's config -----------------------------------------------------


class Fixture:
  """The recorded torch run: its config and arrays, with the packed state_dicts unpacked by name."""

  def __init__(self, path: pathlib.Path):
    with np.load(path) as data:
      self.arrays = {k: data[k] for k in data.files}
    self.config = json.loads(str(self.arrays.pop("config")))
    shapes = {name: tuple(shape) for name, shape in self.config["state_layout"]}
    self.state_layout = [(name, shapes[name]) for name, _ in self.config["state_layout"]]
    self.param_layout = [(name, shapes[name]) for name in self.config["param_names"]]

  @staticmethod
  def _unpack(vector: np.ndarray, layout) -> dict[str, np.ndarray]:
    out, i = {}, 0
    for name, shape in layout:
      n = int(np.prod(shape))
      out[name] = vector[i:i + n].reshape(shape)
      i += n
    assert i == vector.size, f"packed vector of {vector.size} values, layout of {i}"
    return out

  def state(self, case: str, t: int) -> dict[str, np.ndarray]:
    """torch's state_dict after t steps of `case` (t = 0: the initial one)."""
    vector = self.arrays["init"] if t == 0 else self.arrays[f"{case}/state"][t - 1]
    return self._unpack(vector, self.state_layout)

  def grads(self, case: str, t: int) -> dict[str, np.ndarray]:
    """``p.grad`` of step t (1-based), by torch parameter name."""
    return self._unpack(self.arrays[f"{case}/grads"][t - 1], self.param_layout)

  def momentum(self, case: str, t: int) -> dict[str, np.ndarray]:
    """The SGD momentum buffers after t steps (t >= 1), by torch parameter name."""
    return self._unpack(self.arrays[f"{case}/momentum"][t - 1], self.param_layout)


@pytest.fixture(scope="module")
def fixture():
  if not FIXTURE.exists():
    pytest.skip(f"{FIXTURE} not found: it belongs in ../shared/reference (make it with "
                "experiments/torch_step_parity.py --out=...)")
  if jax.device_count() != 1:  # the fixture's BatchNorm statistics are over one batch of 16
    pytest.skip(f"step parity runs on one device; this process has {jax.device_count()}")
  fx = Fixture(FIXTURE)
  assert fx.config["steps"] == STEPS
  return fx


def converted_params(model, values: dict, state_dict: dict) -> dict:
  """Per-parameter arrays with torch names (gradients, momenta) in the model's param layout: the converter
  wants a whole state_dict, so `state_dict`'s BatchNorm statistics complete them."""
  stats = {k: v for k, v in state_dict.items() if k.endswith(("running_mean", "running_var"))}
  return torch_msdnet.convert_state_dict(model, {**stats, **values})["params"]


def running_var_unbiased_undone(before: dict, after: dict, bn_count: dict, momentum: float) -> dict:
  """`after` (torch, one step after `before`) with running_var as flax's biased update would leave it.

  torch: ``r' = (1 - m) r + m * n / (n - 1) * v``; flax: ``r' = (1 - m) r + m * v`` (v the biased batch
  variance), so flax's value is ``(1 - m) r + (r' - (1 - m) r) * (n - 1) / n``, exactly.
  """
  out = dict(after)
  for bn, n in bn_count.items():
    key = f"{bn}.running_var"
    r0, r1 = before[key].astype(np.float64), after[key].astype(np.float64)
    out[key] = ((1 - momentum) * r0 + (r1 - (1 - momentum) * r0) * (n - 1) / n).astype(np.float32)
  return out


def expected_after_step(model, fixture, case: str, t: int) -> dict:
  """torch's variables after step t + 1, converted, with running_var in the model's convention."""
  before, after = fixture.state(case, t), fixture.state(case, t + 1)
  if not getattr(model, "bn_unbiased_var", False):  # flax's biased update: undo PyTorch's n / (n - 1)
    after = running_var_unbiased_undone(before, after, fixture.config["bn_count"],
                                        fixture.config["bn_momentum"])
  return torch_msdnet.convert_state_dict(model, after)


def project_config(config: dict, case: str) -> ml_collections.ConfigDict:
  """The project's config with the fixture's recipe (no augmentation, no warm-up)."""
  c = cifar.get_config(f"dataset=cifar10,model={config['preset']}")
  opts = config["cases"][case]
  c.optim.learning_rate = config["learning_rate"]
  c.optim.momentum = config["momentum"]
  c.optim.weight_decay = config["weight_decay"]
  c.optim.nesterov = opts["nesterov"]
  c.optim.decay_1d = opts["decay_1d"]
  c.optim.warmup_epochs = 0.0
  c.aug.crop_padding = 0
  c.aug.flip = False
  c.aug.mixup_alpha = c.aug.cutmix_alpha = c.aug.mix_prob = 0.0
  c.aug.label_smoothing = 0.0
  return c


def trace_of(opt_state):
  """The momentum (optax `TraceState.trace`) inside the project's optimiser state."""
  traces = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.TraceState))
            if isinstance(s, optax.TraceState)]
  assert len(traces) == 1, f"expected one optax TraceState in the optimiser state, found {len(traces)}"
  return traces[0].trace


@pytest.fixture(scope="module")
def project(fixture):
  """(model, run): ``run(case, t, free_running=False)`` is `run_project_steps` from torch's state after t
  steps (one step), or from the initial weights for all K steps; results are cached."""
  config, arrays = fixture.config, fixture.arrays
  model = models.build_model(config["preset"], config["num_classes"], **config["overrides"])
  optimizers, cache = {}, {}

  def run(case, t, free_running=False):
    key = (case, t, free_running)
    if key not in cache:
      c = project_config(config, case)
      if case not in optimizers:
        schedule = optim_lib.learning_rate_schedule(c.optim, steps_per_epoch=config["steps"],
                                                    total_steps=config["total_steps"])
        optimizers[case] = optim_lib.create_optimizer(c.optim, schedule)
      state_dict = fixture.state(case, t)
      variables = torch_msdnet.convert_state_dict(model, state_dict)
      momentum = None if t == 0 else converted_params(model, fixture.momentum(case, t), state_dict)
      start = {"params": variables["params"], "batch_stats": variables["batch_stats"], "momentum": momentum}
      cache[key] = run_project_steps(
          model, optimizers[case], c.aug, start, arrays["images"], arrays["labels"], first_step=t,
          num_steps=config["steps"] - t if free_running else 1,
          mean=np.asarray(config["mean"], np.float32), std=np.asarray(config["std"], np.float32),
          num_classes=config["num_classes"], weights=metrics.exit_weights(None, model.num_exits))
    return cache[key]

  return model, run


# ---- the comparisons ---------------------------------------------------------------------------------------


def test_fixture_matches_the_preset(fixture):
  config, arrays = fixture.config, fixture.arrays
  model = models.build_model(config["preset"], config["num_classes"], **config["overrides"])
  assert model.num_exits == config["torch_args"]["nBlocks"] == arrays[f"{CASES[0]}/losses"].shape[1]
  assert arrays["images"].dtype == np.uint8 and arrays["images"].shape == (STEPS, 16, 32, 32, 3)
  # Step 1's gradient excludes weight decay, so both cases start identically (the harness checks it too).
  np.testing.assert_array_equal(arrays[f"{CASES[0]}/grads"][0], arrays[f"{CASES[1]}/grads"][0])


@pytest.mark.parametrize("case", CASES)
def test_learning_rate_schedule_matches(fixture, case):
  config = fixture.config
  c = project_config(config, case)
  schedule = optim_lib.learning_rate_schedule(c.optim, steps_per_epoch=config["steps"],
                                              total_steps=config["total_steps"])
  np.testing.assert_allclose([float(schedule(t)) for t in range(config["steps"])], fixture.arrays["lr"],
                             rtol=1e-6)


def step_mismatches(fixture, project, case: str, t: int) -> list[tuple[str, float]]:
  """Every tensor of step t + 1 (from torch's state after t steps) outside its tolerance, as (name, its
  |difference| / scale): the per-exit losses, the gradients, and the params / momentum / BatchNorm statistics
  after the step. Empty when the step agrees within LOSS_TOL / GRAD_TOL / STATE_TOL."""
  model, run = project
  grads, losses, state = run(case, t)
  where = f"{case} step {t + 1}"
  before, after = fixture.state(case, t), fixture.state(case, t + 1)
  expected = expected_after_step(model, fixture, case, t)
  pairs = [(f"{where} per-exit losses", {"": losses[0]}, {"": fixture.arrays[f"{case}/losses"][t]}, LOSS_TOL),
           (f"{where} gradient", grads, converted_params(model, fixture.grads(case, t + 1), before), GRAD_TOL),
           (f"{where} params", state.params, expected["params"], STATE_TOL),
           (f"{where} momentum", trace_of(state.opt_state),
            converted_params(model, fixture.momentum(case, t + 1), after), STATE_TOL),
           (f"{where} batch_stats", state.batch_stats, expected["batch_stats"], STATE_TOL)]
  assert int(state.step) == t + 1
  out = []
  for what, actual, wanted, tol in pairs:
    flat_a, flat_e = traverse_util.flatten_dict(actual, sep="/"), traverse_util.flatten_dict(wanted, sep="/")
    assert sorted(flat_a) == sorted(flat_e), f"{what}: different leaves"
    for path in sorted(flat_e):
      try:
        assert_close(f"{what} {path}", flat_a[path], flat_e[path], tol)
      except AssertionError:
        a, e = np.asarray(flat_a[path], np.float64), np.asarray(flat_e[path], np.float64)
        out.append((f"{what} {path}".rstrip(), float(np.max(np.abs(a - e)) / max(np.max(np.abs(e)), 1e-12))))
  return out


# A single step may fall outside the tolerances by the mechanism of the module docstring (a pre-activation
# within rounding of 0 that takes the other sign in one framework: seen once, on CI's CPU, as 1.5e-3 of its
# scale in a BatchNorm bias gradient at step 4 of sgd_decay_all, every other step agreeing). A fault of the
# recipe (the mutations listed above the tolerances) moves every step; so a case passes when each step is
# within the tolerances, or all but one are and that one is within FLIP_BOUND of each tensor's scale.
FLIP_BOUND = 2e-2


@pytest.mark.parametrize("case", CASES)
def test_step_from_torch_state_matches(fixture, project, case):
  """Each step t + 1 from torch's state after t steps: losses, gradients, and params / momentum / BN after it."""
  failing = {t: m for t in range(STEPS) if (m := step_mismatches(fixture, project, case, t))}
  detail = "; ".join(f"{name}: {rel:.2e}" for m in failing.values() for name, rel in m[:8])
  assert len(failing) <= 1, f"{len(failing)} of {STEPS} steps outside the tolerances: {detail}"
  for t, m in failing.items():
    assert max(rel for _, rel in m) <= FLIP_BOUND, f"beyond the single-step bound {FLIP_BOUND}: {detail}"
    warnings.warn(f"{case} step {t + 1} agrees only within {FLIP_BOUND} (a rounding flip, module docstring), "
                  f"the other {STEPS - 1} steps within the tolerances: {detail}")


def test_running_var_conventions_differ_measurably(fixture):
  """The fixture tells PyTorch's unbiased running_var update from flax's biased one (so the comparisons
  above do check the model's convention): after step 1 they differ by 0.1 * v / (n - 1), up to 2.0e-4
  (2.2e-4 of the tensor's scale) on the heads' 2x2 maps, n = 64; 2e-6 on the 32x32 maps, n = 16384."""
  config = fixture.config
  before, after = fixture.state(CASES[0], 0), fixture.state(CASES[0], 1)
  biased = running_var_unbiased_undone(before, after, config["bn_count"], config["bn_momentum"])
  worst = max(float(np.max(np.abs(after[k] - biased[k]) / np.max(np.abs(after[k]))))
              for k in after if k.endswith("running_var"))
  assert worst > 2 * STATE_TOL, worst
  assert min(config["bn_count"].values()) == 16 * 2 * 2  # the heads' last BatchNorm


@pytest.mark.parametrize("case", CASES)
def test_free_running_losses_track_torch(fixture, project, case):
  """K steps from the initial weights, the state threaded by the project's step itself."""
  _, run = project
  _, losses, state = run(case, 0, free_running=True)
  expected = fixture.arrays[f"{case}/losses"]
  assert losses.shape == expected.shape and int(state.step) == STEPS
  assert_close(f"{case} free-running losses, steps 1-2", losses[:2], expected[:2], LOSS_TOL)
  np.testing.assert_allclose(losses[2:], expected[2:], rtol=FREE_RUNNING_BOUND,
                             err_msg=f"{case} free-running losses, steps 3..K (chaotic: a bound only)")
