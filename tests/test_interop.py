"""Importing MSDNet-PyTorch weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msdfuse_jax import checkpoints, models, rundir
from msdfuse_jax.interop import torch_msdnet
from tests.conftest import shared_file

pytestmark = pytest.mark.cpu_exact  # the converted model's logits against torch's CPU logits


@pytest.fixture(scope="module")
def reference():
  with np.load(shared_file("reference", "msdnet_anytime_cifar10_seed0.npz")) as data:
    arrays = {k: data[k] for k in data.files}
  images = arrays.pop("input").transpose(0, 2, 3, 1)  # NCHW -> NHWC
  return arrays, images, arrays.pop("logits")


def test_converted_model_reproduces_reference_logits(reference):
  state_dict, images, logits = reference
  model = models.build_model("msdnet_anytime7", 10)
  variables = torch_msdnet.convert_state_dict(model, state_dict)
  out = np.stack(model.apply(variables, jnp.asarray(images)))
  np.testing.assert_allclose(out, logits, atol=1e-4, rtol=0)


def test_missing_surplus_and_misshaped_keys_are_named(reference):
  state_dict, _, _ = reference
  model = models.build_model("msdnet_anytime7", 10)
  key = "blocks.2.1.m.0.net.1.running_var"
  with pytest.raises(torch_msdnet.ConversionError, match="missing.*" + key.replace(".", r"\.")):
    torch_msdnet.convert_state_dict(model, {k: v for k, v in state_dict.items() if k != key})
  with pytest.raises(torch_msdnet.ConversionError, match="extra_layer.weight"):
    torch_msdnet.convert_state_dict(model, {**state_dict, "extra_layer.weight": np.zeros(3)})
  bad = dict(state_dict)
  bad["classifier.3.linear.weight"] = np.zeros((10, 64), np.float32)
  with pytest.raises(torch_msdnet.ConversionError, match=r"classifier\.3\.linear\.weight.*\(10, 64\)"):
    torch_msdnet.convert_state_dict(model, bad)


def test_dataparallel_prefix_and_step_counters_are_accepted(reference):
  state_dict, images, logits = reference
  prefixed = {f"module.{k}": v for k, v in state_dict.items()}
  model = models.build_model("msdnet_anytime7", 10)
  variables = torch_msdnet.convert_state_dict(model, prefixed)
  out = np.stack(model.apply(variables, jnp.asarray(images), num_exits=2))
  np.testing.assert_allclose(out, logits[:2], atol=1e-4, rtol=0)


def _torch_style(model, variables):
  """The inverse mapping: a PyTorch-layout state_dict built from flax variables."""
  names = torch_msdnet._torch_to_flax_names(model)  # pylint: disable=protected-access
  out = {}
  for key, (coll, path, _) in names.items():
    node = variables[coll]
    for p in path:
      node = node[p]
    value = np.asarray(node)
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif value.ndim == 2:
      value = value.T
    out[key] = value
  return out


@pytest.mark.parametrize("name,overrides", [("msdnet_tiny", {"step_mode": "lin_grow", "step": 1, "base": 1}),
                                            ("msdnet_tiny", {"bottleneck": False}),
                                            ("msdnet_tiny", {"gr_factor": (1, 2), "bn_factor": (1, 2)}),
                                            ("msdnet_imagenet_tiny", {"step": 3, "base": 3})])
def test_name_mapping_covers_other_msdnet_configs(name, overrides):
  model = models.build_model(name, 10, **overrides)
  variables = models.init_variables(model, jax.random.PRNGKey(3))
  state_dict = _torch_style(model, variables)
  back = torch_msdnet.convert_state_dict(model, state_dict)
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(back)):
    np.testing.assert_array_equal(a, b)


def test_msdfuse_is_refused():
  with pytest.raises(torch_msdnet.ConversionError, match="only MSDNet"):
    torch_msdnet.convert_state_dict(models.build_model("msdfuse_tiny", 10), {})


def test_import_cli_writes_a_loadable_run(tmp_path, reference):
  _, images, logits = reference
  import configs.cifar as cifar  # pylint: disable=import-outside-toplevel
  config = cifar.get_config("dataset=cifar10,model=msdnet_anytime7")
  workdir = tmp_path / "run"
  torch_msdnet.import_weights(config, str(shared_file("reference", "msdnet_anytime_cifar10_seed0.npz")),
                              str(workdir))
  loaded = rundir.load_config(str(workdir))
  assert loaded.model.name == "msdnet_anytime7"
  variables, step = checkpoints.load_variables(str(workdir))
  assert step == 0
  model = models.from_config(loaded)
  out = np.stack(model.apply(variables, jnp.asarray(images)))
  np.testing.assert_allclose(out, logits, atol=1e-4, rtol=0)


def test_converted_imagenet_model_reproduces_reference_logits():
  # MSDNet-PyTorch's ImageNet mode (7x7/2 stem conv with bias, max-pool, width-keeping classifiers), the
  # tiny configuration of ../shared/reference/model_counts_imagenet.json, 224x224 inputs, 1,000 classes.
  data = np.load(shared_file("reference", "msdnet_imagenet_tiny_seed7_bnrand.npz"))
  state_dict = {k: data[k] for k in data.files if k not in ("input", "logits")}
  model = models.build_model("msdnet_imagenet_tiny", 1000)
  variables = torch_msdnet.convert_state_dict(model, state_dict)
  images = jnp.asarray(np.transpose(data["input"], (0, 2, 3, 1)))
  out = np.stack(jax.jit(model.apply)(variables, images))
  assert out.shape == data["logits"].shape == (3, 2, 1000)
  np.testing.assert_allclose(out, data["logits"], atol=1e-4, rtol=0)


def test_training_checkpoints_are_unwrapped_and_what_is_not_weights_is_named(reference):
  state_dict, images, logits = reference
  # MSDNet-PyTorch's checkpoint (DataParallel names) and L2W-DEN's (meta-network entries beside the weights).
  msdnet_pytorch = {"epoch": 90, "arch": "msdnet", "best_prec1": 75.0, "optimizer": {"state": {}},
                    "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}
  l2w_den = {"state_dict": dict(state_dict), "optimizer": {}, "meta_state_dict": {"w": np.zeros(3)},
             "meta_optimizer": {}}
  model = models.build_model("msdnet_anytime7", 10)
  for checkpoint, extra in ((msdnet_pytorch, ["epoch", "arch", "best_prec1", "optimizer"]),
                            (l2w_den, ["optimizer", "meta_state_dict", "meta_optimizer"])):
    weights, ignored = torch_msdnet.unwrap_checkpoint(checkpoint)
    assert ignored == extra
    out = np.stack(model.apply(torch_msdnet.convert_state_dict(model, weights), jnp.asarray(images),
                               num_exits=1))
    np.testing.assert_allclose(out, logits[:1], atol=1e-4, rtol=0)
  assert torch_msdnet.unwrap_checkpoint(state_dict) == (state_dict, [])
  with pytest.raises(torch_msdnet.ConversionError, match="expected a state_dict"):
    torch_msdnet.unwrap_checkpoint([1, 2])
