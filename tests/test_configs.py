"""configs/cifar.py: presets, runlocal, overrides, errors."""

import pytest

from configs import cifar
from msdfuse_jax import models, run_config


@pytest.mark.parametrize("name", [n for n in models.preset_names() if not n.endswith("_tiny")])
def test_every_preset_builds_from_its_config(name):
  config = cifar.get_config(f"dataset=cifar100,model={name}")
  model = run_config.build_model(config)
  assert model.num_classes == 100
  assert config.train.num_epochs == 300 and config.train.batch_size == 512
  assert config.optim.learning_rate == 0.1 and config.optim.warmup_epochs == 20


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
  model = run_config.build_model(config)
  assert (model.growth_rate, model.stem) == (8, "efficient")
  config.model.dtype = "bfloat16"
  assert run_config.build_model(config).dtype.__name__ == "bfloat16"


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown config argument"):
    cifar.get_config("dataset=cifar10,modle=msdfuse")
  config = cifar.get_config("dataset=svhn,model=msdfuse")
  with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
    run_config.build_model(config)
  config = cifar.get_config("model=nope")
  with pytest.raises(ValueError, match="unknown model 'nope'"):
    run_config.build_model(config)
  config = cifar.get_config("model=msdfuse")
  config.model.dtype = "int8"
  with pytest.raises(ValueError, match="dtype"):
    run_config.build_model(config)


def test_saved_config_round_trips(tmp_path):
  config = cifar.get_config("dataset=cifar100,model=msdfuse")
  run_config.save_config(str(tmp_path), config)
  loaded = run_config.load_config(str(tmp_path))
  assert loaded.model.to_dict() == config.model.to_dict()
  assert run_config.build_model(loaded).num_exits == 8
  with pytest.raises(FileNotFoundError, match="not a run directory"):
    run_config.load_config(str(tmp_path / "missing"))
