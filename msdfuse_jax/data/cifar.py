"""CIFAR-10/100 on the host: loading, the saved validation split, statistics.

`load_cifar` returns plain numpy arrays (uint8 NHWC images, int32 labels). The
whole dataset fits in host memory (50,000 x 3,072 bytes), so training samples
batches from these arrays and augments them on the device (see `augment.py`).

Validation split (the MSDNet protocol): `val_size` images are held out from the
official training set by `np.random.default_rng(split_seed).permutation`. The
indices are saved in `workdir/val_split.json` and reused on every later call, so
training, resumption and threshold fitting all see the same split. Indices
refer to the official file order, which both sources reproduce, so a run may
switch between the TFDS and the archive source without changing its split.

Normalisation statistics are computed, per channel, on the training images the
run actually trains on (45,000 for the budgeted protocol, 50,000 for the
anytime one), rather than taken from the published constants: they are then
right for any subset as well. For the full training set they agree with the
values published with MSDNet-PyTorch (`PUBLISHED_STATS`) to within 3e-4;
those are kept for models imported from checkpoints trained with them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from absl import logging
import numpy as np

from msdfuse_jax import rundir
from msdfuse_jax.data import sources
from msdfuse_jax.data.sources import DataError


# (mean, std) in [0, 1] units as used by MSDNet-PyTorch's data loader, for
# evaluating models imported from its checkpoints.
PUBLISHED_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4824, 0.4467), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
}


@dataclasses.dataclass
class CifarData:
  """A CIFAR dataset split into train / val / test, on the host.

  Attributes:
    train_images: uint8 (N_train, 32, 32, 3), the images trained on.
    train_labels: int32 (N_train,).
    val_images: uint8 (N_val, 32, 32, 3), held out from the official training
      set (also inside `train_images` when `train_includes_val`).
    val_labels: int32 (N_val,).
    test_images: uint8 (N_test, 32, 32, 3), the official test set.
    test_labels: int32 (N_test,).
    num_classes: 10 or 100.
    mean: float32 (3,), per-channel mean of `train_images` in [0, 1] units.
    std: float32 (3,), per-channel (population) std of `train_images`.
    val_indices: int64 (N_val,), positions of the validation images in the
      official training set; `val_images` follows this order.
    dataset: 'cifar10' or 'cifar100'.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  val_indices: np.ndarray
  dataset: str = ""

  def train_source(self, seed: int):
    """The training set as the ``stream`` pipeline reads it (augmented in the step, so `seed` is unused)."""
    del seed
    from msdfuse_jax.data import stream  # pylint: disable=import-outside-toplevel  (needs grain)
    return stream.ArraySource(self.train_images, self.train_labels)


def field(cfg: Any, name: str, default: Any) -> Any:
  """Reads an optional config field; '' counts as unset (for path flags)."""
  value = cfg.get(name, default) if cfg is not None else default
  return default if value == "" else value


def effective_val_size(val_size: int, num_train: int) -> int:
  """The number of images to hold out.

  Rule: `val_size` is used as given unless it would take half of the training
  set or more (only the small test subsets, e.g. 5,000 of 5,170 images); then
  10% of the training set is held out instead, with a warning. The full
  datasets (5,000 of 50,000) are unaffected.

  Args:
    val_size: the configured size.
    num_train: size of the official training set.

  Returns:
    The size actually held out.
  """
  if val_size < 0:
    raise DataError(f"data.val_size must be >= 0, got {val_size}.")
  if val_size and val_size >= num_train // 2:
    new_size = num_train // 10
    logging.warning(
        "data.val_size=%d is too large for a training set of %d images; "
        "holding out %d (10%%) instead.", val_size, num_train, new_size)
    return new_size
  return val_size


def _check_saved_split(saved: dict[str, Any], path: str, dataset: str,
                       num_train: int) -> np.ndarray:
  """Validates a saved split against the dataset; returns its indices."""
  if saved.get("dataset") != dataset or saved.get("num_train") != num_train:
    raise DataError(
        f"{path} holds a validation split of {saved.get('dataset')} with "
        f"{saved.get('num_train')} training images, but this run loads "
        f"{dataset} with {num_train}: it belongs to another dataset or data "
        "source. Use another workdir, or delete the file to make a new split "
        "(models trained with the old one must not be evaluated with it).")
  indices = np.asarray(saved.get("val_indices", []), dtype=np.int64)
  if (indices.ndim != 1 or len(np.unique(indices)) != len(indices) or
      (len(indices) and (indices.min() < 0 or indices.max() >= num_train))):
    raise DataError(f"{path} is corrupt: val_indices must be distinct "
                    f"integers in [0, {num_train}).")
  return indices


def resolve_val_split(dataset: str, num_train: int, val_size: int,
                      split_seed: int, workdir: str | None = None, *,
                      save: bool = True) -> np.ndarray:
  """Returns the validation indices, reusing `workdir/val_split.json` if any.

  Args:
    dataset: dataset name, recorded with the split.
    num_train: size of the official training set.
    val_size: configured number of held-out images (see `effective_val_size`).
    split_seed: seed of `np.random.default_rng` for the permutation.
    workdir: where the split is saved; None keeps it in memory only.
    save: False only reads a saved split (the processes of a multi-process
      run other than process 0, which compute the same split and leave the
      writing to it).

  Returns:
    int64 indices into the official training set: the first `val_size`
    entries of the seeded permutation (or the saved ones).

  Raises:
    DataError: if the saved split was made for another dataset or size.
  """
  path = os.path.join(workdir, rundir.VAL_SPLIT_FILE) if workdir else None
  if path and os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
    except (OSError, ValueError) as e:
      raise DataError(f"Cannot read the saved validation split {path}: {e}. "
                      "Restore it, or delete it to make a new split.") from e
    if not isinstance(saved, dict):
      raise DataError(f"{path} is corrupt: expected a JSON object.")
    indices = _check_saved_split(saved, path, dataset, num_train)
    if (saved.get("split_seed") != split_seed or
        saved.get("val_size") != effective_val_size(val_size, num_train)):
      logging.warning(
          "Reusing the validation split saved in %s (seed %s, %d images); the "
          "config asks for seed %s, size %d, which is ignored so that this "
          "run matches the earlier ones.", path, saved.get("split_seed"),
          len(indices), split_seed, val_size)
    logging.info("Reusing the validation split in %s.", path)
    return indices

  size = effective_val_size(val_size, num_train)
  indices = np.random.default_rng(split_seed).permutation(num_train)[:size]
  indices = indices.astype(np.int64)
  if path and save:
    os.makedirs(workdir, exist_ok=True)
    record = dict(dataset=dataset, num_train=num_train, val_size=size,
                  split_seed=split_seed, val_indices=indices.tolist())
    # Write then rename: a reader (another process) must never see half a
    # file.
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
      json.dump(record, f)
    os.replace(tmp, path)
    logging.info("Saved the validation split (%d images) to %s.", size, path)
  return indices


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and population std of uint8 NHWC images, in [0, 1].

  Exact: pixel-value histograms are accumulated over chunks, so no float copy
  of the whole dataset is ever made.

  Args:
    images: uint8 (N, H, W, C), N > 0.

  Returns:
    (mean, std), float32 arrays of shape (C,).
  """
  if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
    raise DataError("channel_stats needs a non-empty uint8 NHWC array, got "
                    f"{images.dtype} {images.shape}.")
  channels = images.shape[-1]
  counts = np.zeros((channels, 256), dtype=np.int64)
  for start in range(0, len(images), 4096):
    chunk = images[start:start + 4096].reshape(-1, channels)
    for c in range(channels):
      counts[c] += np.bincount(chunk[:, c], minlength=256)
  values = np.arange(256, dtype=np.float64)
  n = counts.sum(axis=1)
  mean = counts @ values / n
  var = counts @ (values ** 2) / n - mean ** 2
  return ((mean / 255.).astype(np.float32),
          (np.sqrt(np.maximum(var, 0.)) / 255.).astype(np.float32))


def load_cifar(dataset: str, data_cfg: Any,
               workdir: str | None = None, *, save_split: bool = True) -> CifarData:
  """Loads CIFAR-10/100 with the run's validation split.

  Args:
    dataset: 'cifar10' or 'cifar100'.
    data_cfg: ConfigDict (or dict) with the optional fields
      `source` ('tfds' | 'archive', default 'tfds'),
      `path` (archive source: the python-version tar.gz or its folder),
      `data_dir` (TFDS data dir, None = TFDS default),
      `manual_dir` (where the official binary tar.gz was put),
      `register_checksums` (False; True accepts a non-official archive),
      `allow_download` (False; let TFDS download, machines with internet only),
      `val_size` (5000), `split_seed` (0),
      `train_includes_val` (False: train on the rest, budgeted protocol;
      True: train on the whole training set, anytime protocol),
      `normalization` ('train': statistics of the training images used;
      'published': MSDNet-PyTorch's constants, for imported weights).
    workdir: if given, the validation split is saved there and reused.
    save_split: False reads a saved split but never writes one (see
      `resolve_val_split`).

  Returns:
    A `CifarData`.

  Raises:
    DataError: missing or malformed data, or a saved split that disagrees.
  """
  spec = sources.dataset_spec(dataset)
  source = field(data_cfg, "source", "tfds")
  if source == "archive":
    raw = sources.read_python_archive(dataset, field(data_cfg, "path", None))
  elif source == "tfds":
    raw = sources.read_tfds(
        dataset,
        data_dir=field(data_cfg, "data_dir", None),
        manual_dir=field(data_cfg, "manual_dir", None),
        register_checksums=bool(field(data_cfg, "register_checksums", False)),
        allow_download=bool(field(data_cfg, "allow_download", False)))
  else:
    raise DataError(
        f"data.source must be 'tfds' or 'archive', got {source!r}.")

  num_train = len(raw.train_images)
  val_indices = resolve_val_split(
      dataset, num_train, int(field(data_cfg, "val_size", 5000)),
      int(field(data_cfg, "split_seed", 0)), workdir, save=save_split)
  if field(data_cfg, "train_includes_val", False):
    train_images, train_labels = raw.train_images, raw.train_labels
  else:
    keep = np.ones(num_train, dtype=bool)
    keep[val_indices] = False
    train_images, train_labels = raw.train_images[keep], raw.train_labels[keep]
  if not len(train_images):
    raise DataError(f"No training images left after holding out "
                    f"{len(val_indices)} for validation.")
  normalization = field(data_cfg, "normalization", "train")
  if normalization == "train":
    mean, std = channel_stats(train_images)
  elif normalization == "published":  # MSDNet-PyTorch's constants, for imported models
    mean, std = (np.asarray(v, np.float32) for v in PUBLISHED_STATS[dataset])
  else:
    raise DataError(f"data.normalization must be 'train' or 'published', got {normalization!r}.")
  logging.info("%s: %d train, %d val, %d test images; mean %s, std %s.",
               spec["title"], len(train_images), len(val_indices),
               len(raw.test_images), mean, std)
  return CifarData(
      train_images=train_images,
      train_labels=train_labels,
      val_images=raw.train_images[val_indices],
      val_labels=raw.train_labels[val_indices],
      test_images=raw.test_images,
      test_labels=raw.test_labels,
      num_classes=spec["num_classes"],
      mean=mean,
      std=std,
      val_indices=val_indices,
      dataset=dataset)


def host_shard(images: np.ndarray, labels: np.ndarray, process_index: int,
               process_count: int,
               drop_remainder: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """This process's disjoint share of a dataset, for multi-host training.

  How the global batch is formed: process p keeps the p-th of `process_count`
  contiguous, equal blocks of the data (the official CIFAR order is already
  class-mixed, so every block has about the same class balance). Each process
  shuffles only its own block, draws `global_batch // process_count` examples
  per step and splits them over its local devices; the global batch is the
  concatenation of the per-process batches, in process order. Equal block
  sizes (the last `len % process_count` examples are dropped, fewer than
  `process_count`) give every process the same number of steps, which the
  cross-process collectives of the train step require.

  Args:
    images: (N, ...) array.
    labels: (N, ...) array, same N.
    process_index: `jax.process_index()`.
    process_count: `jax.process_count()`.
    drop_remainder: if False (evaluation, where every example counts), the
      first `N % process_count` processes get one extra example; the caller
      must then pad batches to a common size.

  Returns:
    (images, labels) of this process; views, not copies.
  """
  if len(images) != len(labels):
    raise ValueError(f"{len(images)} images but {len(labels)} labels.")
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index {process_index} not in [0, {process_count}).")
  n = len(images)
  if drop_remainder:
    per = n // process_count
    start, stop = process_index * per, (process_index + 1) * per
  else:
    per, extra = divmod(n, process_count)
    start = process_index * per + min(process_index, extra)
    stop = start + per + (1 if process_index < extra else 0)
  return images[start:stop], labels[start:stop]
