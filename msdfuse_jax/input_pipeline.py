"""The input pipeline's public API, in one import.

Host side (numpy): `load_cifar` reads CIFAR-10/100 from TFDS or the official
python archive, holds out the saved validation split and computes the
normalisation statistics; `host_shard` gives each process of a multi-host job
its share. Device side (pure JAX, called inside the jitted train step):
`augment_batch` for training, `eval_batch` for evaluation, and their parts.

The implementation lives in `msdfuse_jax/data/`: `sources.py` (the two
readers), `cifar.py` (split, statistics, sharding), `augment.py`.

Typical use::

  data = input_pipeline.load_cifar('cifar100', config.data, workdir)
  images, labels = input_pipeline.host_shard(
      data.train_images, data.train_labels,
      jax.process_index(), jax.process_count())
  # inside the pmapped step, on a uint8 batch:
  x, y = input_pipeline.augment_batch(rng, batch['image'], batch['label'],
                                      config.aug, data.mean, data.std,
                                      data.num_classes)
"""

from msdfuse_jax.data.augment import augment_batch
from msdfuse_jax.data.augment import eval_batch
from msdfuse_jax.data.augment import mixup_cutmix
from msdfuse_jax.data.augment import normalize
from msdfuse_jax.data.augment import random_crop_flip
from msdfuse_jax.data.augment import smooth_labels
from msdfuse_jax.data.cifar import CifarData
from msdfuse_jax.data.cifar import channel_stats
from msdfuse_jax.data.cifar import effective_val_size
from msdfuse_jax.data.cifar import host_shard
from msdfuse_jax.data.cifar import load_cifar
from msdfuse_jax.data.cifar import PUBLISHED_STATS
from msdfuse_jax.data.cifar import resolve_val_split
from msdfuse_jax.data.cifar import VAL_SPLIT_FILENAME
from msdfuse_jax.data.sources import DataError

__all__ = [
    "augment_batch", "eval_batch", "mixup_cutmix", "normalize",
    "random_crop_flip", "smooth_labels", "CifarData", "channel_stats",
    "effective_val_size", "host_shard", "load_cifar", "PUBLISHED_STATS",
    "resolve_val_split", "VAL_SPLIT_FILENAME", "DataError",
]
