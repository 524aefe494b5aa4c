"""Importing MSDNet-PyTorch weights."""

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msdfuse_jax import checkpoints, models, rundir
from msdfuse_jax.interop import torch_msdnet
from tests.conftest import REPO, shared_file, tool_command

sys.path.insert(0, str(REPO / "experiments"))

# How closely a converted model reproduces a reference's logits, in float32 units in the last place (ulps) of
# the largest reference logit. Measured on the project's x86-64 CPU: 2 ulps for both references jitted, 2.5
# eager at the suite's XLA optimisation level (3.0e-8 / 3.7e-8 for the CIFAR model, 3.4e-8 / 6.0e-8 for the
# ImageNet one). Convolutions on a GPU or TPU sum in other orders (and use TF32 or bfloat16 passes unless
# asked for float32): not measured here, so off the CPU only the old bound 1e-4 is asserted, in float32.
REPRODUCTION_ULPS = 4


def assert_reproduces(out, logits, bound=None):
  """`out` within `REPRODUCTION_ULPS` of the largest |logit| (or within `bound`) of the reference `logits`."""
  if bound is None:
    bound = REPRODUCTION_ULPS * float(np.spacing(np.abs(logits).max().astype(np.float32)))
  if jax.default_backend() != "cpu":
    bound = max(bound, 1e-4)
  np.testing.assert_allclose(out, logits, atol=bound, rtol=0)


def apply_float32(model, variables, images, jit=False, **kwargs):
  """The stacked logits of ``model.apply``, convolutions and matmuls in full float32 on every backend."""
  apply = functools.partial(model.apply, **kwargs)
  with jax.default_matmul_precision("float32"):
    return np.stack((jax.jit(apply) if jit else apply)(variables, jnp.asarray(images)))

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
  out = apply_float32(model, variables, images)
  assert_reproduces(out, logits)


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
  out = apply_float32(model, variables, images, num_exits=2)
  assert_reproduces(out, logits[:2])


LAYOUTS = REPO / "tests" / "fixtures" / "msdnet_pytorch_layouts.npz"


@pytest.fixture(scope="module")
def layouts():
  import record_msdnet_pytorch_layouts  # pylint: disable=import-outside-toplevel
  with np.load(LAYOUTS) as data:
    return record_msdnet_pytorch_layouts, {k: data[k] for k in data.files}


@pytest.mark.parametrize("case", ["lin_grow", "no_bottleneck", "widths", "imagenet_step3"])
def test_name_mapping_covers_other_msdnet_configs(case, layouts):
  # The names, shapes and logits are MSDNet-PyTorch's own, recorded from its models/msdnet.py by
  # experiments/record_msdnet_pytorch_layouts.py: the converter must take exactly those names (nothing
  # missing, nothing left over) and put each tensor where the logits come out the same.
  record, fixture = layouts
  assert f"{case}/names" in fixture, (f"{LAYOUTS} lacks case {case!r}: regenerate it with "
                                      "experiments/record_msdnet_pytorch_layouts.py")
  (preset, overrides), torch_args, _, _ = record.CASES[case]
  names = [str(n) for n in fixture[f"{case}/names"]]
  shapes = json.loads(str(fixture[f"{case}/shapes"]))
  model = models.build_model(preset, record.num_classes(torch_args), **overrides)
  weights = record.fill_weights(names, shapes)
  images = fixture[f"{case}/input"].astype(np.float32) / 255.0
  logits = fixture[f"{case}/logits"]
  # These deeper random nets have logits up to 8 and differ from torch by 2.5-5 ulps of that here (up to
  # 4.5e-7 of the largest |logit|); a tensor in the wrong place changes them by O(1): 1e-5 of it separates.
  bound = 1e-5 * float(np.abs(logits).max())
  out = apply_float32(model, torch_msdnet.convert_state_dict(model, weights), images, jit=True)
  assert_reproduces(out, logits, bound)
  if case == "lin_grow":  # the comparison sees two same-shaped convolutions swapped
    convs = [n for n in names if n.endswith(".weight") and weights[n].ndim == 4]
    a, b = next((a, b) for i, a in enumerate(convs) for b in convs[i + 1:]
                if weights[a].shape == weights[b].shape)
    swapped = {**weights, a: weights[b], b: weights[a]}
    out = apply_float32(model, torch_msdnet.convert_state_dict(model, swapped), images, jit=True)
    assert np.abs(out - logits).max() > 100 * bound


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
  out = apply_float32(model, variables, images)
  assert_reproduces(out, logits)


def test_converted_imagenet_model_reproduces_reference_logits():
  # MSDNet-PyTorch's ImageNet mode (7x7/2 stem conv with bias, max-pool, width-keeping classifiers), the
  # tiny configuration of ../shared/reference/model_counts_imagenet.json, 224x224 inputs, 1,000 classes.
  data = np.load(shared_file("reference", "msdnet_imagenet_tiny_seed7_bnrand.npz"))
  state_dict = {k: data[k] for k in data.files if k not in ("input", "logits")}
  model = models.build_model("msdnet_imagenet_tiny", 1000)
  variables = torch_msdnet.convert_state_dict(model, state_dict)
  images = jnp.asarray(np.transpose(data["input"], (0, 2, 3, 1)))
  out = apply_float32(model, variables, images, jit=True)
  assert out.shape == data["logits"].shape == (3, 2, 1000)
  assert_reproduces(out, data["logits"])


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
    out = apply_float32(model, torch_msdnet.convert_state_dict(model, weights), images, num_exits=1)
    assert_reproduces(out, logits[:1])
  assert torch_msdnet.unwrap_checkpoint(state_dict) == (state_dict, [])
  with pytest.raises(torch_msdnet.ConversionError, match="expected a state_dict"):
    torch_msdnet.unwrap_checkpoint([1, 2])


# ---- reading PyTorch files: weights only, unless --allow_pickle -------------------------------------------

CIFAR_CONFIG = f"--config={REPO / 'configs' / 'cifar.py'}:dataset=cifar10,model=msdnet_anytime7"


def _import_cli(tmp_path, state_dict, *flags):
  return subprocess.run(tool_command("import_torch_main", CIFAR_CONFIG, f"--state_dict={state_dict}",
                                     f"--workdir={tmp_path / 'run'}", *flags),
                        capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)


def test_import_help_warns_that_allow_pickle_runs_the_files_code():
  proc = subprocess.run(tool_command("import_torch_main", "--help"), capture_output=True, text=True,
                        timeout=120, check=False)
  assert proc.returncode == 1 and not proc.stderr, proc.stderr  # absl's --help exits with status 1
  help_text = " ".join(proc.stdout.split())
  assert "--[no]allow_pickle: WARNING: unsafe." in help_text
  assert "runs any code the file holds" in help_text


def test_a_pytorch_file_without_torch_is_a_one_line_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(torch_msdnet.ConversionError, match=r"needs torch: `pip install torch`"):
    torch_msdnet.load_state_dict_file(str(tmp_path / "model.pth"))


@pytest.fixture(scope="module")
def torch_checkpoints():
  """The make_torch_checkpoints module (with torch) and the reference weights as torch tensors."""
  pytest.importorskip("torch")
  import make_torch_checkpoints  # pylint: disable=import-outside-toplevel
  return make_torch_checkpoints, make_torch_checkpoints.reference_state_dict(
      shared_file("reference", "msdnet_anytime_cifar10_seed0.npz"))


@pytest.mark.parametrize("legacy_format", [False, True])
def test_a_checkpoint_holding_code_is_refused_and_its_code_does_not_run(tmp_path, torch_checkpoints,
                                                                        legacy_format):
  import torch  # pylint: disable=import-outside-toplevel
  make, state_dict = torch_checkpoints
  marker = tmp_path / "marker"
  path = tmp_path / "model.pth.tar"
  # The legacy (pre-1.6, non-zip) format is what 2019 checkpoints such as MSDNet-PyTorch's were saved in.
  torch.save(make.pickled_checkpoint(state_dict, str(marker)), path,
             _use_new_zipfile_serialization=not legacy_format)
  with pytest.raises(torch_msdnet.ConversionError) as refusal:
    torch_msdnet.load_state_dict_file(str(path))
  message = str(refusal.value)
  assert "\n" not in message and "--allow_pickle" in message and "io.open" in message
  assert not marker.exists()


def test_a_file_that_is_no_pytorch_file_is_a_one_line_error(tmp_path):
  pytest.importorskip("torch")
  path = tmp_path / "model.pth"
  path.write_bytes(b"nonsense")
  with pytest.raises(torch_msdnet.ConversionError, match=r"could not be read as a weights-only PyTorch file "
                     r"\(Unsupported operand 110\).*--allow_pickle") as refusal:
    torch_msdnet.load_state_dict_file(str(path))
  assert "\n" not in str(refusal.value)
  import torch  # pylint: disable=import-outside-toplevel
  torch.save({"w": torch.zeros(3)}, path)
  path.write_bytes(path.read_bytes()[:100])  # a truncated download
  with pytest.raises(torch_msdnet.ConversionError, match=r"model\.pth is not a readable PyTorch file "
                     r"\(PytorchStreamReader failed reading zip archive.*\): download it again$"):
    torch_msdnet.load_state_dict_file(str(path))


def test_the_import_tool_refuses_a_checkpoint_holding_code_and_allow_pickle_opens_it(tmp_path,
                                                                                      torch_checkpoints):
  import torch  # pylint: disable=import-outside-toplevel
  make, state_dict = torch_checkpoints
  marker = tmp_path / "marker"
  path = tmp_path / "model.pth.tar"
  torch.save(make.pickled_checkpoint(state_dict, str(marker)), path)
  refused = _import_cli(tmp_path, path)
  assert refused.returncode == 2, refused.stderr
  assert refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: "), refused.stderr
  assert "--allow_pickle" in refused.stderr and "io.open" in refused.stderr
  assert not marker.exists() and not (tmp_path / "run").exists()
  # The same command with --allow_pickle unpickles the object (the marker appears) and imports the weights.
  opened = _import_cli(tmp_path, path, "--allow_pickle")
  assert opened.returncode == 0, opened.stderr
  assert marker.exists()
  assert "ignored what is not model weights: epoch, arch, best_prec1, optimizer, extra" in opened.stderr
  assert checkpoints.load_variables(str(tmp_path / "run"))[1] == 0


def test_the_originals_checkpoint_formats_import_weights_only(tmp_path, torch_checkpoints, reference):
  import torch  # pylint: disable=import-outside-toplevel
  make, state_dict = torch_checkpoints
  _, images, logits = reference
  model = models.build_model("msdnet_anytime7", 10)
  for name, checkpoint in (("msdnet_pytorch", make.msdnet_pytorch_checkpoint(state_dict)),
                           ("l2w_den", make.l2w_den_checkpoint(state_dict))):
    path = tmp_path / f"{name}.pth.tar"
    torch.save(checkpoint, path)
    # Nothing of either format needs more than weights-only loading.
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    weights = torch_msdnet.load_state_dict_file(str(path))
    out = apply_float32(model, torch_msdnet.convert_state_dict(model, weights), images, num_exits=2)
    assert_reproduces(out, logits[:2])


def test_make_torch_checkpoints_writes_both_formats(tmp_path):
  pytest.importorskip("torch")
  weights = shared_file("reference", "msdnet_anytime_cifar10_seed0.npz")
  proc = subprocess.run([sys.executable, str(REPO / "experiments" / "make_torch_checkpoints.py"),
                         f"--out={tmp_path}", f"--reference={weights}"],
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  import torch  # pylint: disable=import-outside-toplevel
  msdnet_pytorch = torch.load(tmp_path / "msdnet_pytorch.pth.tar", weights_only=True)
  l2w_den = torch.load(tmp_path / "l2w_den.pth.tar", weights_only=True)
  assert sorted(msdnet_pytorch) == ["arch", "best_prec1", "epoch", "optimizer", "state_dict"]
  assert all(k.startswith("module.") for k in msdnet_pytorch["state_dict"])
  assert sorted(l2w_den) == ["arch", "best_prec1", "epoch", "is_best", "meta_optimizer", "meta_state_dict",
                             "optimizer", "state_dict"]
  assert not any(k.startswith("module.") for k in l2w_den["state_dict"])
  assert msdnet_pytorch["optimizer"]["state"] and l2w_den["meta_optimizer"]["state"]
