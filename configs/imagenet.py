r"""ImageNet (ILSVRC 2012, 224x224, 1,000 classes) configs for the ImageNet-mode models.

Train MSDNet with MSDNet-PyTorch's recipe on an image folder (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG):

  msdfuse-train --config=configs/imagenet.py:model=msdnet_imagenet_step4 --config.data.path=DIR \
    --workdir=/tmp/msdnet_in

or from TFDS, prepared once (never downloaded) from the official tars in a manual dir:

  msdfuse-train --config=configs/imagenet.py:model=msdfuse_imagenet,recipe=l2w_den \
    --config.data.source=tfds --config.data.manual_dir=DIR --workdir=/tmp/msdfuse_in

The argument is a comma-separated list: ``model=<preset>`` (an ImageNet-mode preset:
``msdnet_imagenet_step4|6|7``, ``msdfuse_imagenet``, their ``_tiny`` variants), ``recipe=msdnet|l2w_den|
l2w_den_300`` and the flag ``runlocal`` (the tiny variant, batch 8, a few steps). Recipes:

- ``msdnet`` (the default; MSDNet-PyTorch's ImageNet command): 90 epochs, batch 256, SGD 0.1, momentum 0.9,
  weight decay 1e-4 on every parameter, LR x0.1 at epochs 30 and 60.
- ``l2w_den`` (the L2W-DEN pretrained checkpoints): 100 epochs, batch 4096, LR 0.8 (0.1 per 512 images,
  scaled linearly), per-step cosine; ``l2w_den_300``: 300 epochs with label smoothing 0.1.

Augmentation is on the host (the ``stream`` pipeline, in ``config.data.workers`` processes, by default one
per CPU; docs/imagenet.md): random-resized crop to 224 and a horizontal flip; evaluation resizes the
shorter side to 256 and takes the centre crop. The step only normalises (ImageNet
mean and std), so the CIFAR crop, flip and Mixup/CutMix fields of ``config.aug`` are off.
"""

from __future__ import annotations

import os

import ml_collections

from msdfuse_jax import models
from msdfuse_jax.data import augment
from msdfuse_jax.tools import flags_util

RECIPES = ("msdnet", "l2w_den", "l2w_den_300")


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """Parses ``"model=msdnet_imagenet_step4,recipe=l2w_den,runlocal"`` (flags map to True)."""
  return flags_util.parse_config_arg(arg, {"model": "model=<preset>", "recipe": f"recipe={'|'.join(RECIPES)}",
                                           "runlocal": "runlocal"})


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  model = str(args.get("model", "msdnet_imagenet_step4"))
  recipe = str(args.get("recipe", "msdnet"))
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; valid: {RECIPES}")
  if args.get("runlocal"):
    model = "msdfuse_imagenet_tiny" if model.startswith("msdfuse") else "msdnet_imagenet_tiny"
  if model not in models.PRESETS:
    raise ValueError(f"unknown model {model!r}; valid choices: {models.preset_names()}")
  hparams = models.preset_hparams(model)
  if not hparams.get("imagenet"):
    raise ValueError(f"model {model!r} is not an ImageNet-mode preset (imagenet=True); use one of "
                     f"{[n for n in models.preset_names() if models.preset_hparams(n).get('imagenet')]}")

  config = ml_collections.ConfigDict()
  config.dataset = "imagenet2012"
  config.seed = 0
  config.model = ml_collections.ConfigDict(hparams)
  config.model.name = model
  config.model.dtype = "float32"

  config.data = ml_collections.ConfigDict()
  config.data.source = "folder"  # folder (DIR/train/<wnid>/*.JPEG, DIR/val/<wnid>/*.JPEG) | tfds
  config.data.path = ""  # folder source: DIR
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir
  config.data.manual_dir = ml_collections.FieldReference(None, field_type=str)  # the official tars (tfds)
  config.data.pipeline = "stream"  # the only one: the training set is read and augmented on the host
  # Each worker holds about 3 steps of images; any value reads the same batches.
  config.data.workers = os.cpu_count() or 1  # processes decoding the training set; 0: threads in this one
  config.data.val_size = 50000  # held out of the training set for threshold fitting (MSDNet's protocol)
  config.data.split_seed = 0
  config.data.train_includes_val = False  # True: train on all 1,281,167 (anytime protocol)
  config.data.normalization = "published"  # the ImageNet mean and std

  config.optim = ml_collections.ConfigDict()
  config.optim.momentum = 0.9
  config.optim.nesterov = False
  config.optim.weight_decay = 1e-4
  config.optim.decay_1d = True  # MSDNet-PyTorch decays every parameter
  config.optim.warmup_epochs = 0.0
  config.optim.decay_factor = 0.1
  config.optim.exit_weights = ml_collections.FieldReference(None, field_type=object)
  # optim.gradient_equilibrium, distill.alpha / distill.temperature (the training techniques, off):
  flags_util.technique_fields(config)

  config.train = ml_collections.ConfigDict()
  flags_util.run_loop_fields(config.train)
  config.train.checkpoint_every_steps = 2000
  # Crop and flip run on the host (data.imagenet); the step's CIFAR crop/flip and Mixup/CutMix are off.
  config.aug = ml_collections.ConfigDict(dict(augment.DEFAULTS))
  config.aug.update(crop_padding=0, flip=False, mixup_alpha=0.0, cutmix_alpha=0.0, label_smoothing=0.0)
  if recipe == "msdnet":
    config.optim.learning_rate = 0.1
    config.optim.schedule = "step"
    config.optim.decay_epochs = (30, 60)
    config.train.batch_size = 256
    config.train.num_epochs = 90
  else:
    config.optim.learning_rate = 0.8  # batch 4096
    config.optim.schedule = "cosine"
    config.optim.decay_epochs = ()
    config.train.batch_size = 4096
    config.train.num_epochs = 300 if recipe == "l2w_den_300" else 100
    config.aug.label_smoothing = 0.1 if recipe == "l2w_den_300" else 0.0
  config.train.num_steps = -1
  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 250
  config.eval.augment_val = False
  if args.get("runlocal"):
    config.train.batch_size = 8
    config.train.num_steps = 10
    config.train.log_every_steps = 5
    config.train.eval_every_steps = 10
    config.train.checkpoint_every_steps = 5
    config.eval.batch_size = 16
  return config
