"""configs/cifar.py and configs/imagenet.py: presets, runlocal, recipes, overrides through the real flag
parser, errors."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from configs import cifar
from msdfuse_jax import models, rundir
from msdfuse_jax.tools import flags_util
from tests.conftest import REPO, shared_file

CONFIG_FILE = str(REPO / "configs" / "cifar.py")


@pytest.mark.parametrize("name", models.preset_names())
def test_every_preset_builds_from_its_config_with_every_hyper_parameter(name):
  config = cifar.get_config(f"dataset=cifar100,model={name}")
  model = models.from_config(config)
  assert model.num_classes == 100
  # The config spells out every hyper-parameter of the preset, so that each one can be overridden.
  fields = {k: v for k, v in config.model.to_dict().items() if k not in ("name", "dtype")}
  assert fields == models.preset_hparams(name)
  assert all(getattr(model, k) == v for k, v in fields.items())


def parse_command_line(*overrides: str, arg: str = "dataset=cifar10,model=msdnet_tiny"):
  """Parses ``--config=configs/cifar.py:ARG OVERRIDES...`` with the tools' own flag definition."""
  argv = ["msdfuse-train", f"--config={CONFIG_FILE}:{arg}", *overrides]
  values = flags.FlagValues()
  flags_util.define_config_flag(values, sys_argv=argv)
  values(argv)
  return values.config


def _changed(value, field_type):
  """Another value of the field's type, as a command-line string, and the value it must parse to."""
  if field_type is bool or isinstance(value, bool):
    return str(not value), not value
  if field_type is int or isinstance(value, int):
    return str(value + 1), value + 1
  if field_type is float or isinstance(value, float):
    return repr(value / 2 + 0.25), value / 2 + 0.25
  if field_type is tuple or isinstance(value, tuple):
    new = tuple(value or (1,)) + (2,)
    return repr(new), new
  if field_type is str or isinstance(value, str):
    return "something_else", "something_else"
  if field_type is object:  # exit_weights: a scheme name or numbers
    return "lin_grow", "lin_grow"
  raise AssertionError(f"no override written for {value!r} of type {field_type}")


def _leaves(config: ml_collections.ConfigDict, prefix: str = ""):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _leaves(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value, config.get_type(key)


@pytest.mark.parametrize("name", models.preset_names())
def test_every_field_of_every_preset_is_overridden_by_the_flag_parser(name):
  config = cifar.get_config(f"dataset=cifar10,model={name}")
  expected, overrides = {}, []
  for path, value, field_type in _leaves(config):
    text, new = _changed(value, field_type)
    overrides.append(f"--config.{path}={text}")
    expected[path] = new
  parsed = parse_command_line(*overrides, arg=f"dataset=cifar10,model={name}")
  for path, new in expected.items():
    got = parsed
    for key in path.split("."):
      got = got[key]
    assert got == new, (path, got, new)


def test_list_valued_model_fields_take_tuples_and_lists_from_the_command_line():
  assert parse_command_line("--config.model.bn_factor=(1,2,2)").model.bn_factor == (1, 2, 2)
  assert parse_command_line("--config.model.gr_factor=[1,2,4]").model.gr_factor == (1, 2, 4)
  config = parse_command_line("--config.optim.exit_weights=(1,1,2)")
  assert tuple(config.optim.exit_weights) == (1, 1, 2)
  assert parse_command_line("--config.optim.exit_weights=lin_grow").optim.exit_weights == "lin_grow"


def test_an_unknown_field_is_described_with_the_valid_fields_of_its_sub_dict():
  argv = ["prog", f"--config={CONFIG_FILE}:model=msdnet_tiny", "--config.train.no_such_field=1"]
  message = flags_util.describe_override_error(argv)
  assert "config.train.no_such_field" in message and "valid fields of config.train:" in message
  assert "batch_size" in message and "num_steps" in message
  argv[-1] = "--config.nosub.x=1"
  assert "valid fields of config:" in flags_util.describe_override_error(argv)
  argv[-1] = "--config.train.batch_size.x=1"
  assert "config.train.batch_size is a int" in flags_util.describe_override_error(argv)


@pytest.mark.parametrize("tool", ["train_main", "costs_main"])
def test_tools_report_an_unknown_field_in_one_line(tool, tmp_path):
  proc = subprocess.run([sys.executable, "-m", f"msdfuse_jax.tools.{tool}",
                         f"--config={CONFIG_FILE}:dataset=cifar10,model=msdnet_tiny",
                         "--config.no_such_field=1", f"--workdir={tmp_path}"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1].startswith("error: unknown config field config.no_such_field; valid fields of config:")
  assert "Traceback" not in proc.stderr


def test_float16_is_refused_for_bfloat16(tmp_path):
  """float16 without loss scaling underflows small gradients: the config and msdfuse-train refuse it."""
  config = cifar.get_config("dataset=cifar10,model=msdnet_tiny")
  config.model.dtype = "float16"
  with pytest.raises(ValueError, match=r"float16 training needs loss scaling.*use config.model.dtype=bfloat16"):
    models.from_config(config)
  assert "float16" not in models.DTYPES
  proc = subprocess.run([sys.executable, "-m", "msdfuse_jax.tools.train_main",
                         f"--config={CONFIG_FILE}:dataset=cifar10,model=msdnet_tiny",
                         "--config.model.dtype=float16", f"--workdir={tmp_path}"],
                        capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert lines[-1] == ("error: config.model.dtype='float16' is not offered (float16 training needs loss "
                       "scaling, which this package does not do): use config.model.dtype=bfloat16")
  assert "Traceback" not in proc.stderr


def test_runlocal_picks_the_tiny_variant_and_few_steps():
  for name, tiny in (("msdfuse", "msdfuse_tiny"), ("msdnet_anytime7", "msdnet_tiny"),
                     ("resnet_mc", "resnet_mc_tiny"), ("ranet_cifar", "ranet_tiny")):
    config = cifar.get_config(f"dataset=cifar10,model={name},runlocal")
    assert config.model.name == tiny
    assert 0 < config.train.num_steps <= 100


def test_model_fields_are_overridable():
  config = cifar.get_config("dataset=cifar10,model=msdnet_anytime7")
  config.model.growth_rate = 8
  config.model.stem = "efficient"
  model = models.from_config(config)
  assert (model.growth_rate, model.stem) == (8, "efficient")
  config.model.dtype = "bfloat16"
  assert models.from_config(config).dtype.__name__ == "bfloat16"


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown config argument"):
    cifar.get_config("dataset=cifar10,modle=msdfuse")
  config = cifar.get_config("dataset=svhn,model=msdfuse")
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    models.from_config(config)
  config = cifar.get_config("model=nope")
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    models.from_config(config)
  config = cifar.get_config("model=msdfuse")
  config.model.dtype = "int8"
  with pytest.raises(ValueError, match="dtype"):
    models.from_config(config)


def test_saved_config_round_trips(tmp_path):
  config = cifar.get_config("dataset=cifar100,model=msdfuse")
  rundir.save_config(str(tmp_path), config)
  loaded = rundir.load_config(str(tmp_path))
  assert loaded.model.to_dict() == config.model.to_dict()
  assert models.from_config(loaded).num_exits == 8
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    rundir.load_config(str(tmp_path / "missing"))


IMAGENET_CONFIG = str(REPO / "configs" / "imagenet.py")


def test_imagenet_recipes_and_costs_cli(tmp_path):
  from configs import imagenet  # pylint: disable=import-outside-toplevel
  msdnet = imagenet.get_config("model=msdnet_imagenet_step4")
  assert (msdnet.optim.schedule, tuple(msdnet.optim.decay_epochs), msdnet.train.num_epochs,
          msdnet.train.batch_size, msdnet.optim.learning_rate) == ("step", (30, 60), 90, 256, 0.1)
  l2w = imagenet.get_config("model=msdnet_imagenet_step6,recipe=l2w_den_300")
  assert (l2w.optim.schedule, l2w.train.num_epochs, l2w.train.batch_size, l2w.optim.learning_rate,
          l2w.aug.label_smoothing) == ("cosine", 300, 4096, 0.8, 0.1)
  with pytest.raises(ValueError, match="not an ImageNet-mode preset"):
    imagenet.get_config("model=msdnet_anytime7")
  # runlocal takes the tiny variant of either family; the step's CIFAR crop, flip and mixing are off (the
  # host crops and flips ImageNet), and the loop fields are those of the CIFAR config.
  assert imagenet.get_config("model=msdfuse_imagenet,runlocal").model.name == "msdfuse_imagenet_tiny"
  assert imagenet.get_config("model=msdnet_imagenet_step7,runlocal").model.name == "msdnet_imagenet_tiny"
  assert (msdnet.aug.crop_padding, msdnet.aug.flip, msdnet.aug.mixup_alpha, msdnet.aug.cutmix_alpha) == (
      0, False, 0.0, 0.0)
  from configs import cifar  # pylint: disable=import-outside-toplevel
  assert set(msdnet.train) == set(cifar.get_config("model=msdfuse").train)
  assert set(msdnet.data) - set(cifar.get_config("model=msdfuse").data) == set()
  # msdfuse-costs counts at 224x224 with 1,000 classes: the reference integers of the tiny config.
  ref = json.loads(shared_file("reference", "model_counts_imagenet.json").read_text())["msdnet_imagenet_tiny"]
  out = tmp_path / "costs.json"
  proc = subprocess.run([sys.executable, "-m", "msdfuse_jax.tools.costs_main",
                         f"--config={IMAGENET_CONFIG}:runlocal", "--noxla", f"--json={out}"],
                        capture_output=True, text=True, cwd=REPO, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["dataset"] == "imagenet2012" and report["model"] == "msdnet_imagenet_tiny"
  assert [e["op_counter"] for e in report["exits"]] == [int(v) for v in ref["op_counter_flops"]]
