r"""CIFAR-10 / CIFAR-100 configs for every model of the package (the MSDFuse paper's recipe).

Train the paper's model on CIFAR-100 (300 epochs, batch 512; about 76 % top-1 at the last exit in the
paper, on GPUs):

  msdfuse-train --config=configs/cifar.py:dataset=cifar100,model=msdfuse --workdir=/tmp/msdfuse_c100

A tiny model for a few steps on a CPU, on the real CIFAR-10 subset shipped beside the repo (a minute):

  msdfuse-train --config=configs/cifar.py:dataset=cifar10,model=msdfuse,runlocal \
    --config.data.source=archive --config.data.path=../shared/data/cifar-10-python-subset.tar.gz \
    --workdir=/tmp/runlocal

The argument is a comma-separated list: ``dataset=cifar10|cifar100``, ``model=<preset>`` (see
`msdfuse_jax.models.preset_names()`), and the flag ``runlocal``. Any field can then be overridden with
``--config.<field>=<value>``, e.g. ``--config.model.growth_rate=6`` or ``--config.train.num_steps=100``.
"""

from __future__ import annotations

import ml_collections

from msdfuse_jax import models
from msdfuse_jax.data import augment
from msdfuse_jax.tools import flags_util


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """Parses ``"dataset=cifar100,model=msdfuse,runlocal"`` into a dict (flags map to True)."""
  return flags_util.parse_config_arg(arg, {"dataset": "dataset=cifar10|cifar100", "model": "model=<preset>",
                                           "runlocal": "runlocal"})


def tiny_preset(model: str) -> str:
  """The tiny variant of a preset used by `runlocal` (the preset itself when there is none)."""
  for candidate in (f"{model}_tiny", f"{model.split('_')[0]}_tiny"):
    if candidate in models.PRESETS:
      return candidate
  return model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the config for ``arg`` (see the module docstring)."""
  args = parse_arg(arg)
  # An unknown dataset or model is reported by the tools as a one-line error (raising here would make
  # ml_collections print the config file's traceback instead).
  dataset = str(args.get("dataset", "cifar10"))
  model = str(args.get("model", "msdfuse"))
  runlocal = bool(args.get("runlocal", False))
  if runlocal:
    model = tiny_preset(model)

  config = ml_collections.ConfigDict()
  config.dataset = dataset  # cifar10 | cifar100; the number of classes follows from it
  config.seed = 0  # parameter init and augmentation randomness

  known = model in models.PRESETS
  config.model = ml_collections.ConfigDict(models.preset_hparams(model) if known else {})  # its fields
  config.model.name = model  # a preset of msdfuse_jax.models; fields above override it
  config.model.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"  # tfds | archive (the official python-version archive or its folder)
  config.data.path = ""  # archive source: cifar-10-python.tar.gz / cifar-100-python.tar.gz or folder
  config.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir
  config.data.manual_dir = ml_collections.FieldReference(None, field_type=str)  # holds the binary archive
  config.data.register_checksums = False  # accept an archive whose checksum differs (subsets, tests)
  config.data.val_size = 5000  # validation images held out of the training set (seeded, saved)
  config.data.split_seed = 0  # seed of the validation permutation
  config.data.train_includes_val = False  # True: train on all 50,000 (anytime); False: 45,000 (budgeted)
  config.data.normalization = "train"  # train: mean/std of the training images; published: MSDNet's
  # device: the whole training set on every device, batches gathered inside the step (fastest for CIFAR);
  # stream: this process's batches read on the host (grain) and prefetched to the devices (any size).
  config.data.pipeline = "device"
  # CIFAR's records are uint8 arrays with nothing to decode: worker processes would only copy them.
  config.data.workers = 0  # stream pipeline: grain worker processes reading the batches; 0: threads
  config.data.allow_download = False  # let TFDS download CIFAR when it is not prepared (needs internet)

  # crop_padding: zero padding before the random 32x32 crop; flip: horizontal flip with p = 0.5;
  # mixup_alpha / cutmix_alpha: 0 disables each; switch_prob: probability of cutmix rather than mixup when
  # both are on; mix_prob: probability of mixing a batch at all; label_smoothing.
  config.aug = ml_collections.ConfigDict(dict(augment.DEFAULTS))

  config.optim = ml_collections.ConfigDict()
  config.optim.learning_rate = 0.1  # peak LR, for the global batch size below
  config.optim.momentum = 0.9
  config.optim.nesterov = True  # the authors' code uses Nesterov
  config.optim.weight_decay = 1e-4
  config.optim.decay_1d = False  # False: biases and other 1-D parameters (BatchNorm) get no decay
  config.optim.warmup_epochs = 20.0  # linear warm-up from 0, then the schedule
  config.optim.schedule = "cosine"  # cosine: per-step decay to 0; step: x decay_factor at decay_epochs
  config.optim.decay_epochs = ()  # step schedule only
  config.optim.decay_factor = 0.1
  config.optim.exit_weights = ml_collections.FieldReference(None, field_type=object)  # uniform|lin_grow|K numbers

  # optim.gradient_equilibrium, distill.alpha / distill.temperature (the training techniques, off):
  flags_util.technique_fields(config)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 512  # global batch, split over all devices and hosts
  config.train.num_epochs = 300
  config.train.num_steps = -1  # > 0 overrides num_epochs
  # log_every_steps, eval_every_steps (<= 0: once per epoch and at the end), checkpoint_every_steps,
  # keep_checkpoints, distributed / coordinator_address / num_processes / process_id (multi-process
  # start-up: see the README), num_shards (batch shards; 0: one per device), grad_accum_steps (shards run
  # in that many sequential groups: less activation memory, the same step):
  flags_util.run_loop_fields(config.train)

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 500
  config.eval.augment_val = False  # True reproduces the reference code's augmented threshold fitting

  if runlocal:
    config.train.batch_size = 32
    config.train.num_steps = 20
    config.train.log_every_steps = 5
    config.train.eval_every_steps = 10
    config.train.checkpoint_every_steps = 10
    config.optim.warmup_epochs = 0.0
    config.eval.batch_size = 256
  return config
