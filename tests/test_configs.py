"""configs/cifar.py and configs/imagenet.py: presets, runlocal, recipes, overrides through the real flag
parser, errors."""

import dataclasses
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


# The published hyper-parameters of the presets that have them, written out from ../shared/SPEC.md (which
# cites the sources), with the number of exits: the configs and models are checked against these literals,
# not against the preset table they are built from.
_MSDNET = dict(growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), prune="max", reduction=0.5,
               bottleneck=True, stem="msdnet", fusion=False, head="msdnet", head_width=128, activation="relu",
               imagenet=False)  # SPEC 2: MSDNet (CIFAR), its classifier 128 wide, ReLU
_MSDNET_IMAGENET = dict(_MSDNET, n_blocks=5, step_mode="even", base=4, n_channels=32, growth_rate=16,
                        gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), imagenet=True)  # SPEC 9.1
PUBLISHED = {
    # SPEC 2, the table of named CIFAR configurations: (hyper-parameters, exits).
    "msdnet_anytime7": (dict(_MSDNET, n_blocks=7, step_mode="even", step=2, base=4, n_channels=16), 7),
    "msdnet_budget5": (dict(_MSDNET, n_blocks=5, step_mode="lin_grow", step=1, base=1, n_channels=16), 5),
    "msdnet_anytime10": (dict(_MSDNET, n_blocks=10, step_mode="even", step=2, base=4, n_channels=16), 10),
    "msdnet_budget7": (dict(_MSDNET, n_blocks=7, step_mode="lin_grow", step=1, base=1, n_channels=16), 7),
    # SPEC 9.1: the MSDNet-PyTorch README's ImageNet command (step 4) and L2W-DEN's step 6 and 7 models.
    "msdnet_imagenet_step4": (dict(_MSDNET_IMAGENET, step=4), 5),
    "msdnet_imagenet_step6": (dict(_MSDNET_IMAGENET, step=6), 5),
    "msdnet_imagenet_step7": (dict(_MSDNET_IMAGENET, step=7), 5),
    # SPEC 3: the paper's switches and the authors' code (GELU, no pointwise after the stride-2 depthwise
    # conv, 128-wide head); its widths are not published (calibrated to the paper's costs in test_costs.py).
    "msdfuse": (dict(stem="efficient", stem_pointwise=False, fusion=True, fused_transition=True,
                     head="msdfuse", head_width=128, activation="gelu", gr_factor=(1, 2, 4),
                     bn_factor=(1, 2, 4), prune="max", reduction=0.5, bottleneck=True, imagenet=False), None),
    # SPEC 4: RANet's train_cifar.sh, 8 exits.
    "ranet_cifar": (dict(step=4, step_mode="even", scale_list=(1, 2, 3, 3), gr_factor=(4, 2, 1, 1),
                         bn_factor=(4, 2, 1, 1), n_channels=16, growth_rate=6, compress_factor=0.25,
                         reduction=0.5), 8),
    # SPEC 4: a 62-layer CIFAR ResNet (6 x 10 + 2) and a DenseNet-BC of 3 dense blocks x 16 layers.
    "resnet_mc": (dict(blocks_per_stage=10), None),
    "densenet_mc": (dict(n_blocks=3, layers_per_block=16), None),
}
# Presets with nothing published to compare with: the tiny test variants, and widths of our own choosing.
UNPUBLISHED = {"msdnet_tiny", "msdfuse_tiny", "ranet_tiny", "resnet_mc_tiny", "densenet_mc_tiny",
               "msdnet_imagenet_tiny", "msdfuse_imagenet_tiny", "msdfuse_imagenet", "ranet_readme"}


def test_every_preset_is_either_published_or_listed_as_ours():
  assert sorted(PUBLISHED.keys() | UNPUBLISHED) == models.preset_names()
  assert not PUBLISHED.keys() & UNPUBLISHED


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_presets_have_the_published_hyper_parameters(name):
  hparams, exits = PUBLISHED[name]
  config = cifar.get_config(f"dataset=cifar100,model={name}")
  model = models.from_config(config)
  assert {k: config.model[k] for k in hparams} == hparams
  assert {k: getattr(model, k) for k in hparams} == hparams
  if exits is not None:
    assert model.num_exits == exits


@pytest.mark.parametrize("name", models.preset_names())
def test_every_preset_builds_from_its_config_with_every_hyper_parameter(name):
  config = cifar.get_config(f"dataset=cifar100,model={name}")
  model = models.from_config(config)
  assert model.num_classes == 100
  # The config spells out every hyper-parameter of the model's class (so that each one can be overridden),
  # and the model built from it has the config's values.
  fields = {k: v for k, v in config.model.to_dict().items() if k not in ("name", "dtype")}
  hyper_parameters = {f.name for f in dataclasses.fields(type(model))} - {"num_classes", "dtype", "parent",
                                                                          "name"}
  assert set(fields) == hyper_parameters
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


# Every tool that takes --config (defines it through flags_util.define_config_flag), found in its source so
# that a new tool is tested too.
CONFIG_TOOLS = sorted(path.stem for path in (REPO / "msdfuse_jax" / "tools").glob("*_main.py")
                      if "flags_util.define_config_flag(" in path.read_text())


def test_the_config_tools_are_found():
  assert {"train_main", "costs_main", "bench_main", "import_torch_main"} <= set(CONFIG_TOOLS)


@pytest.mark.parametrize("tool", CONFIG_TOOLS)
def test_tools_report_an_unknown_field_in_one_line(tool, tmp_path):
  proc = subprocess.run([sys.executable, "-m", f"msdfuse_jax.tools.{tool}",
                         f"--config={CONFIG_FILE}:dataset=cifar10,model=msdnet_tiny",
                         "--config.no_such_field=1"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=300)
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
