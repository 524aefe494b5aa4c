"""Data: host-side reading (`sources`: CIFAR's TFDS builders and official archives; `imagenet`: image
folders and TFDS imagenet2012), the saved validation split and statistics (`cifar`), the order of the
global batches (`order`), the host input pipeline (`stream`) and device-side augmentation (`augment`)."""

from __future__ import annotations

from typing import Any


def load(dataset: str, data_cfg: Any, workdir: str | None = None, *, save_split: bool = True) -> Any:
  """The run's train / val / test data of `dataset` (`cifar.CifarData` or `imagenet.ImageNetData`, which
  have the same fields).

  Raises:
    msdfuse_jax.data.sources.DataError: unknown dataset, missing or malformed data.
  """
  from msdfuse_jax.data import cifar, imagenet, sources  # pylint: disable=import-outside-toplevel
  if dataset not in sources.DATASETS:
    raise sources.DataError(f"Unknown dataset {dataset!r}: expected one of {sorted(sources.DATASETS)}.")
  if dataset == "imagenet2012":
    return imagenet.load_imagenet(dataset, data_cfg, workdir, save_split=save_split)
  return cifar.load_cifar(dataset, data_cfg, workdir, save_split=save_split)
