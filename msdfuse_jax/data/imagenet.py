"""ImageNet (ILSVRC 2012) on the host: the two sources, the MSDNet protocol's splits, the transforms.

Sources (``config.data.source``):

* ``folder`` (``config.data.path=DIR``): ``DIR/train/<wnid>/*.JPEG`` and ``DIR/val/<wnid>/*.JPEG``, the
  layout torchvision's ``ImageFolder`` reads (the official validation tar is flat: sort it into class
  folders first, as PyTorch users do). Labels are the positions of the wnids in the sorted class folders
  of ``train/``, which for the 1,000 official classes is the standard label order of every published
  ImageNet model; examples are in (class, file name) order.
* ``tfds`` (``config.data.manual_dir=DIR`` holding the official ``ILSVRC2012_img_train.tar`` and
  ``ILSVRC2012_img_val.tar``): TFDS ``imagenet2012``, prepared once from those files (never downloaded)
  in the ``array_record`` format, which grain reads by index; examples are in the order TFDS wrote them.

The splits: ``val`` is ``config.data.val_size`` (50,000) images held out of the training set by a seeded
permutation saved in the workdir (the threshold-fitting set of MSDNet's budgeted protocol, as for CIFAR),
``test`` is the official validation set. Nothing is decoded ahead of time: the training images are read,
decoded and augmented per step by the ``stream`` pipeline (`TrainSource`), the evaluation images when a
batch of them is taken (`EvalImages`, an array-like the evaluation code slices like a numpy array).

Transforms (those of torchvision's ImageNet recipe, on PIL images): training, a random-resized crop
(scale 0.08-1, aspect ratio 3/4-4/3, ten tries then the centre crop) resized bilinearly to 224 and a
horizontal flip with p = 0.5, seeded per (seed, step, position in the global batch) so that a resumed run
and a run on any number of processes read the same pixels; evaluation, the shorter side resized to 256
and the centre 224x224 crop. Normalisation (ImageNet mean and std) runs in the compiled step.
"""

from __future__ import annotations

import io
import dataclasses
import math
import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from msdfuse_jax.data import cifar, sources, threads
from msdfuse_jax.data.sources import DataError

# (mean, std) in [0, 1] units: torchvision's ImageNet constants, which every published model was trained with.
STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
EXTENSIONS = (".jpeg", ".jpg", ".png")
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
TFDS_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
_LAYOUT = ("DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG (torchvision's ImageFolder layout; the "
           "official validation tar is flat and must first be sorted into its class folders)")


def _pil():
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - Pillow is a dependency
    raise DataError("reading ImageNet needs Pillow: pip install pillow") from None
  return Image


# --------------------------------------------------------------------------------------------------------
# Transforms.


def eval_resize(image_size: int) -> int:
  """The shorter side before the centre crop: 256 for 224 (the same 0.875 crop ratio at any size)."""
  return int(round(image_size * 256 / 224))


def random_resized_crop_box(rng: np.random.Generator, width: int, height: int,
                            scale: Sequence[float] = RRC_SCALE,
                            ratio: Sequence[float] = RRC_RATIO) -> tuple[int, int, int, int]:
  """(left, top, width, height) of a random-resized crop, torchvision's rule.

  Ten tries of an area fraction uniform in `scale` and a log-uniform aspect ratio in `ratio`; the first box
  that fits the image wins. When none fits, the centre crop with the aspect ratio clamped to `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def train_transform(image: Any, rng: np.random.Generator, image_size: int) -> np.ndarray:
  """Random-resized crop to ``image_size`` (bilinear) and a horizontal flip with p = 0.5: uint8 (S, S, 3)."""
  Image = _pil()
  left, top, w, h = random_resized_crop_box(rng, *image.size)
  out = image.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h))
  if rng.random() < 0.5:
    out = out.transpose(Image.FLIP_LEFT_RIGHT)
  return np.asarray(out, np.uint8)


def eval_transform(image: Any, image_size: int) -> np.ndarray:
  """The shorter side resized to `eval_resize` (bilinear), then the centre crop: uint8 (S, S, 3)."""
  Image = _pil()
  resize = eval_resize(image_size)
  width, height = image.size
  if width <= height:
    size = (resize, int(resize * height / width))
  else:
    size = (int(resize * width / height), resize)
  image = image.resize(size, Image.BILINEAR)
  top = int(round((size[1] - image_size) / 2.0))
  left = int(round((size[0] - image_size) / 2.0))
  return np.asarray(image.crop((left, top, left + image_size, top + image_size)), np.uint8)


# --------------------------------------------------------------------------------------------------------
# Where the encoded images come from: a list of files, or a TFDS array_record split.


class FileReader:
  """Encoded images as files: ``reader.open(i)`` is image i as an RGB PIL image."""

  def __init__(self, paths: Sequence[str]):
    self.paths = list(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def open(self, index: int) -> Any:
    path = self.paths[index]
    try:
      with _pil().open(path) as image:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
      raise DataError(f"cannot decode the image {path} ({type(e).__name__}: {e}); replace or delete the "
                      "file (a partial download or copy leaves such files)") from None


class TfdsReader:
  """Encoded images of a TFDS array_record split, read by index (the image bytes are not decoded by TFDS)."""

  def __init__(self, data_source: Any, name: str):
    self.source, self.name = data_source, name

  def __len__(self) -> int:
    return len(self.source)

  def open(self, index: int) -> Any:
    record = self.source[int(index)]
    try:
      with _pil().open(io.BytesIO(record["image"])) as image:
        return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as e:
      raise DataError(f"cannot decode example {index} of {self.name} ({type(e).__name__}: {e}); the "
                      "prepared dataset is damaged: delete it and prepare it again") from None


class EvalImages:
  """An evaluation set as a lazy uint8 array (N, S, S, 3): slicing gives another lazy view, ``np.asarray``
  decodes (in threads) and applies `eval_transform`. The evaluation code slices batches off it as it would
  off a numpy array, so only a batch is ever decoded at a time."""

  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, reader: Any, image_size: int, indices: np.ndarray | None = None):
    self.reader, self.image_size = reader, image_size
    self.indices = np.arange(len(reader)) if indices is None else np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self), self.image_size, self.image_size, 3)

  def __getitem__(self, index: Any) -> Any:
    if isinstance(index, (int, np.integer)):
      return eval_transform(self.reader.open(int(self.indices[index])), self.image_size)
    return EvalImages(self.reader, self.image_size, self.indices[index])

  def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
    del copy  # always a new array
    out = np.empty(self.shape, np.uint8)

    def load(i):
      out[i] = eval_transform(self.reader.open(int(self.indices[i])), self.image_size)

    list(threads.pool().map(load, range(len(self))))
    return out if dtype is None else out.astype(dtype)


class TrainSource:
  """The training set for the ``stream`` pipeline: ``read(rows, step, positions)`` decodes, crops and flips
  the examples `rows` of step `step`; the random numbers of each depend only on (seed, step, position in
  the global batch)."""

  def __init__(self, reader: Any, labels: np.ndarray, image_size: int, seed: int,
               rows: np.ndarray | None = None):
    self.reader, self.image_size, self.seed = reader, image_size, seed
    self.rows = np.arange(len(reader)) if rows is None else np.asarray(rows, np.int64)
    self.labels = np.asarray(labels, np.int32)
    if len(self.labels) != len(self.rows):
      raise ValueError(f"{len(self.rows)} examples but {len(self.labels)} labels")

  def __len__(self) -> int:
    return len(self.rows)

  def read(self, rows: np.ndarray, step: int, positions: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.asarray(rows).reshape(-1)
    positions = np.asarray(positions).reshape(-1)
    out = np.empty((len(rows), self.image_size, self.image_size, 3), np.uint8)

    def load(i):
      rng = np.random.default_rng((self.seed, int(step), int(positions[i])))
      out[i] = train_transform(self.reader.open(int(self.rows[rows[i]])), rng, self.image_size)

    list(threads.pool().map(load, range(len(rows))))
    return {"image": out, "label": self.labels[rows]}


# --------------------------------------------------------------------------------------------------------
# The sources.


def _class_folders(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise DataError(f"{folder} does not exist; data.source=folder reads {_LAYOUT}, with "
                    "--config.data.path=DIR")
  classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
  if not classes:
    raise DataError(f"{folder} holds no class folders; expected {_LAYOUT}")
  return classes


def _files(folder: str) -> list[str]:
  return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                if f.lower().endswith(EXTENSIONS) and os.path.isfile(os.path.join(folder, f)))


def scan_folder(root: str, split: str, classes: Sequence[str] | None = None
                ) -> tuple[list[str], np.ndarray, list[str]]:
  """The image files of ``root/split/<class>/`` in (class, file name) order, their labels and the classes.

  Args:
    root: the dataset folder.
    split: 'train' or 'val'.
    classes: the label order (the training classes); None takes the sorted class folders of this split.

  Raises:
    DataError: a missing folder, a class without images, or a class unknown to the training set.
  """
  folder = os.path.join(root, split)
  found = _class_folders(folder)
  classes = list(found if classes is None else classes)
  unknown = sorted(set(found) - set(classes))
  if unknown:
    raise DataError(f"{folder} has class folders that {os.path.join(root, 'train')} lacks: {unknown[:5]}"
                    f"{' ...' if len(unknown) > 5 else ''}; both splits must use the same wnids")
  index = {c: i for i, c in enumerate(classes)}
  paths: list[str] = []
  labels: list[int] = []
  for c in found:
    files = _files(os.path.join(folder, c))
    if not files:
      raise DataError(f"{os.path.join(folder, c)} holds no images ({', '.join(EXTENSIONS)} files); "
                      f"expected {_LAYOUT}")
    paths += files
    labels += [index[c]] * len(files)
  return paths, np.asarray(labels, np.int32), classes


def read_folder(path: str | None, num_classes: int) -> tuple[FileReader, np.ndarray, FileReader, np.ndarray]:
  """(train reader, train labels, val reader, val labels) of an image-folder dataset."""
  if not path:
    raise DataError(f"data.source=folder needs --config.data.path=DIR, where DIR holds {_LAYOUT}")
  root = os.path.expanduser(os.fspath(path))
  if not os.path.isdir(root):
    raise DataError(f"{root} does not exist; expected a folder holding {_LAYOUT}")
  train_paths, train_labels, classes = scan_folder(root, "train")
  if len(classes) > num_classes:
    raise DataError(f"{os.path.join(root, 'train')} has {len(classes)} class folders, more than the "
                    f"{num_classes} classes of the dataset")
  if len(classes) != num_classes:
    logging.warning("%s has %d class folders, not %d: labels are the positions of these folders' names "
                    "in sorted order, which match the labels of models trained on all %d classes only "
                    "when every class is there", os.path.join(root, "train"), len(classes), num_classes,
                    num_classes)
  val_paths, val_labels, _ = scan_folder(root, "val", classes)
  logging.info("ImageNet folder %s: %d classes, %d train and %d val images", root, len(classes),
               len(train_paths), len(val_paths))
  return FileReader(train_paths), train_labels, FileReader(val_paths), val_labels


def read_tfds(data_dir: str | None, manual_dir: str | None
              ) -> tuple[TfdsReader, np.ndarray, TfdsReader, np.ndarray]:
  """(train reader, train labels, val reader, val labels) of TFDS imagenet2012 (array_record format).

  The dataset is prepared from `manual_dir` when it is not prepared yet (hours for the full ImageNet); it
  is never downloaded.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"the tfds source needs TensorFlow and TFDS ({e}); or use --config.data.source=folder "
                    "--config.data.path=DIR") from None
  builder = tfds.builder("imagenet2012", data_dir=data_dir or None, file_format="array_record")
  if not builder.is_prepared():
    manual = os.path.expanduser(manual_dir or os.path.join(os.fspath(builder.data_dir_root), "downloads",
                                                           "manual"))
    missing = [f for f in TFDS_FILES if not os.path.isfile(os.path.join(manual, f))]
    if missing:
      raise DataError(f"TFDS imagenet2012 is not prepared in {builder.data_dir_root} and {manual} lacks "
                      f"{', '.join(missing)}: put the official files there (--config.data.manual_dir=DIR), "
                      "or use --config.data.source=folder --config.data.path=DIR")
    logging.info("Preparing TFDS imagenet2012 in %s from %s (array_record).", builder.data_dir_root, manual)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual, try_download_gcs=False))

  def split(name):
    try:
      source = builder.as_data_source(split=name, decoders={"image": tfds.decode.SkipDecoding()})
    except Exception as e:  # pylint: disable=broad-except  (array_record missing, damaged files, ...)
      raise DataError(f"cannot read TFDS imagenet2012 {name} in {builder.data_dir} as array_record "
                      f"({type(e).__name__}: {e}); pip install array-record, or prepare it again") from None
    labels = _tfds_labels(builder, name, source)
    return TfdsReader(source, f"TFDS imagenet2012 {name}"), labels

  train, train_labels = split("train")
  val, val_labels = split("validation")
  logging.info("TFDS imagenet2012 %s: %d train and %d val images", builder.data_dir, len(train), len(val))
  return train, train_labels, val, val_labels


def _tfds_labels(builder: Any, split: str, source: Any) -> np.ndarray:
  """The labels of a TFDS split (its data `source`), read once (the images are not decoded) and cached
  beside the prepared files."""
  cache = os.path.join(os.fspath(builder.data_dir), f"msdfuse_labels_{split}.npy")
  if os.path.isfile(cache):
    return np.load(cache)
  labels = np.fromiter((source[i]["label"] for i in range(len(source))), np.int32, len(source))
  try:
    np.save(cache, labels)
  except OSError:  # a read-only dataset dir: read again next time
    pass
  return labels


@dataclasses.dataclass
class ImageNetData:
  """ImageNet split as the training and evaluation code take it (the fields of `cifar.CifarData`).

  The image fields are `EvalImages` (lazy arrays); `train_images` is the training set for `len` and for
  `train_source`, which the ``stream`` pipeline reads.
  """

  train_images: EvalImages
  train_labels: np.ndarray
  val_images: EvalImages
  val_labels: np.ndarray
  test_images: EvalImages
  test_labels: np.ndarray
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  val_indices: np.ndarray
  dataset: str = "imagenet2012"

  def train_source(self, seed: int) -> TrainSource:
    """The training examples with the training augmentation (see `TrainSource`)."""
    images = self.train_images
    return TrainSource(images.reader, self.train_labels, images.image_size, seed, images.indices)


def load_imagenet(dataset: str, data_cfg: Any, workdir: str | None = None, *,
                  save_split: bool = True) -> ImageNetData:
  """Reads ImageNet's file lists and labels from `data_cfg`'s source and makes the run's splits.

  Args:
    dataset: 'imagenet2012'.
    data_cfg: ConfigDict with `source` ('folder' | 'tfds'), `path` (folder), `data_dir` / `manual_dir`
      (tfds), `val_size` (50000), `split_seed` (0), `train_includes_val` (False) and `normalization`
      ('published', the ImageNet constants: the only choice, statistics of 1.28M images are not
      recomputed per run).
    workdir: where the validation split is saved and reused.
    save_split: see `cifar.resolve_val_split`.

  Raises:
    DataError: a missing or malformed dataset (the message names what to provide), or a saved split
      that belongs to another source.
  """
  spec = sources.DATASETS[dataset]
  image_size = int(spec["image_size"])
  source = cifar.field(data_cfg, "source", "folder")
  if source == "folder":
    train, train_labels, test, test_labels = read_folder(cifar.field(data_cfg, "path", None),
                                                         spec["num_classes"])
  elif source == "tfds":
    train, train_labels, test, test_labels = read_tfds(cifar.field(data_cfg, "data_dir", None),
                                                       cifar.field(data_cfg, "manual_dir", None))
  else:
    raise DataError(f"data.source must be 'folder' or 'tfds' for {spec['title']}, got {source!r}")
  normalization = cifar.field(data_cfg, "normalization", "published")
  if normalization != "published":
    raise DataError(f"data.normalization={normalization!r}: ImageNet runs use the published ImageNet "
                    "mean and std ('published')")
  num_train = len(train)
  # The split is recorded with its source: the two sources order the same images differently.
  val_indices = cifar.resolve_val_split(f"{dataset}/{source}", num_train,
                                        int(cifar.field(data_cfg, "val_size", 50000)),
                                        int(cifar.field(data_cfg, "split_seed", 0)), workdir, save=save_split)
  if cifar.field(data_cfg, "train_includes_val", False):
    keep = np.arange(num_train)
  else:
    mask = np.ones(num_train, bool)
    mask[val_indices] = False
    keep = np.flatnonzero(mask)
  if not len(keep):
    raise DataError(f"No training images left after holding out {len(val_indices)} for validation.")
  mean, std = (np.asarray(v, np.float32) for v in STATS)
  logging.info("%s: %d train, %d val, %d test images.", spec["title"], len(keep), len(val_indices),
               len(test))
  return ImageNetData(
      train_images=EvalImages(train, image_size, keep), train_labels=train_labels[keep],
      val_images=EvalImages(train, image_size, val_indices), val_labels=train_labels[val_indices],
      test_images=EvalImages(test, image_size), test_labels=test_labels,
      num_classes=int(spec["num_classes"]), mean=mean, std=std, val_indices=val_indices, dataset=dataset)
