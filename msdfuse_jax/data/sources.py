"""Readers for the two CIFAR sources: the official python archives and TFDS.

Both readers return the full official training and test sets as uint8 NHWC
images and int32 labels **in the official file order** (data_batch_1..5 then
test_batch for CIFAR-10, train then test for CIFAR-100). TFDS shuffles examples
when it writes its record files, so the TFDS reader restores the official order
from each example's `id` ("train_00012" is the 13th official training image).
Because of that, a validation split saved as indices into the training set
selects the same images whatever source a later run uses.

Nothing here downloads: the TFDS reader refuses to call `download_and_prepare`
unless the dataset is already prepared or the official binary archive is in the
manual download directory, because on a machine without internet TFDS would
otherwise retry the download for minutes before failing.
"""

from __future__ import annotations

import codecs
import dataclasses
import io
import os
import pickle
import tarfile
from typing import Any, Callable, Mapping

from absl import logging
import numpy as np

# One entry per supported dataset. `python_dir` is the folder inside the python
# archive, `binary_archive` the file TFDS' builder expects in its manual dir.
DATASETS: dict[str, dict[str, Any]] = {
    "cifar10": dict(
        title="CIFAR-10",
        num_classes=10,
        python_archive="cifar-10-python.tar.gz",
        python_dir="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        binary_archive="cifar-10-binary.tar.gz",
        image_size=32,
    ),
    "cifar100": dict(
        title="CIFAR-100",
        num_classes=100,
        python_archive="cifar-100-python.tar.gz",
        python_dir="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        binary_archive="cifar-100-binary.tar.gz",
        image_size=32,
    ),
    # Read by `msdfuse_jax.data.imagenet` (image folders, TFDS array_record), not by the readers below.
    "imagenet2012": dict(
        title="ImageNet (ILSVRC 2012)",
        num_classes=1000,
        image_size=224,
    ),
}



def num_classes(dataset: str) -> int:
  """The class count of `dataset`; ValueError naming the valid datasets otherwise."""
  try:
    return int(DATASETS[dataset]["num_classes"])
  except KeyError:
    raise ValueError(f"unknown dataset {dataset!r}; valid choices: {sorted(DATASETS)}") from None


def image_size(dataset: str) -> int:
  """The height and width the models take for `dataset` (32 for CIFAR, 224 for ImageNet)."""
  num_classes(dataset)  # the error for an unknown dataset
  return int(DATASETS[dataset]["image_size"])


_IMAGE_SHAPE_CHW = (3, 32, 32)
_ROW_SIZE = 3 * 32 * 32


class DataError(ValueError):
  """The requested data is missing, malformed or inconsistent with the run."""


@dataclasses.dataclass(frozen=True)
class RawSplits:
  """Official train and test sets, uint8 NHWC images and int32 labels."""

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray


def dataset_spec(dataset: str) -> dict[str, Any]:
  """Returns the `DATASETS` entry of `dataset`, or raises DataError."""
  if dataset not in DATASETS:
    raise DataError(
        f"Unknown dataset {dataset!r}: expected one of {sorted(DATASETS)}.")
  spec = DATASETS[dataset]
  if "python_archive" not in spec:
    raise DataError(f"{spec['title']} has no python archive or CIFAR TFDS reader: read it with "
                    "msdfuse_jax.data.load (msdfuse_jax.data.imagenet)")
  return spec


# ---------------------------------------------------------------------------
# Official python-version archives.
# ---------------------------------------------------------------------------


class _CifarUnpickler(pickle.Unpickler):
  """Unpickler that only rebuilds what the CIFAR pickles contain.

  A pickle can run arbitrary code; the official files only need numpy arrays
  (and `_codecs.encode` for bytes written by Python 3 at protocol 2), so any
  other global is refused rather than imported.
  """

  # Python-2 era pickles name `numpy.core.multiarray`, numpy 2 writes
  # `numpy._core.multiarray`; resolve both to the running numpy's function
  # without importing the deprecated module.
  _RECONSTRUCT = np.empty(0).__reduce__()[0]
  _ALLOWED: dict[tuple[str, str], Callable[..., Any]] = {
      ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
      ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): np.dtype,
      ("_codecs", "encode"): codecs.encode,
  }

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._ALLOWED[(module, name)]
    except KeyError:
      raise pickle.UnpicklingError(
          f"global {module}.{name} is not allowed in a CIFAR pickle") from None


def _expected_format(spec: Mapping[str, Any]) -> str:
  files = ", ".join(spec["train_files"] + spec["test_files"])
  return (f"the official {spec['title']} python-version archive "
          f"{spec['python_archive']} (a tar.gz holding {spec['python_dir']}/ "
          f"with the pickles {files}) or the folder it extracts to")


def _read_archive_members(path: str, spec: Mapping[str, Any]) -> dict[str, bytes]:
  """Reads the needed pickles from a tar.gz in memory (nothing is extracted)."""
  wanted = spec["train_files"] + spec["test_files"]
  found: dict[str, bytes] = {}
  try:
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        parts = member.name.replace("\\", "/").rstrip("/").split("/")
        # Accept the folder at any depth (some mirrors nest it once more).
        if (member.isfile() and len(parts) >= 2 and
            parts[-2] == spec["python_dir"] and parts[-1] in wanted):
          found[parts[-1]] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError) as e:
    reason = (str(e).splitlines() or [""])[0]
    raise DataError(
        f"Cannot read {path} as a tar archive ({type(e).__name__}: {reason}); "
        "expected "
        f"{_expected_format(spec)}.") from e
  missing = [f for f in wanted if f not in found]
  if missing:
    raise DataError(
        f"{path} does not hold {spec['python_dir']}/{{{', '.join(missing)}}}; "
        f"expected {_expected_format(spec)}.")
  return found


def _read_folder_members(path: str, spec: Mapping[str, Any]) -> dict[str, bytes]:
  """Reads the pickles from `path/<python_dir>/` or from `path/` itself."""
  wanted = spec["train_files"] + spec["test_files"]
  for folder in (os.path.join(path, spec["python_dir"]), path):
    if all(os.path.isfile(os.path.join(folder, f)) for f in wanted):
      members = {}
      for f in wanted:
        with open(os.path.join(folder, f), "rb") as fh:
          members[f] = fh.read()
      return members
  raise DataError(
      f"Folder {path} holds neither {spec['python_dir']}/ nor the pickles "
      f"{', '.join(wanted)}; expected {_expected_format(spec)}.")


def _decode_pickle(blob: bytes, name: str, path: str,
                   spec: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
  """Decodes one pickle into (uint8 NHWC images, int32 labels)."""
  try:
    # encoding='bytes': the official files were written by Python 2, so their
    # dict keys (and strings) come back as bytes.
    entry = _CifarUnpickler(io.BytesIO(blob), encoding="bytes").load()
    data = np.asarray(entry[b"data"], dtype=np.uint8)
    labels = np.asarray(entry[spec["label_key"]], dtype=np.int64)
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(
        f"{path}: {name} is not a {spec['title']} pickle ({type(e).__name__}: "
        f"{e}); expected a dict with b'data' and {spec['label_key']!r}, i.e. "
        f"{_expected_format(spec)}.") from e
  if data.ndim != 2 or data.shape[1] != _ROW_SIZE or len(labels) != len(data):
    raise DataError(
        f"{path}: {name} holds data of shape {data.shape} and "
        f"{len(labels)} labels; expected uint8 rows of {_ROW_SIZE} values "
        f"(CHW order), one label per row.")
  if len(labels) and (labels.min() < 0 or labels.max() >= spec["num_classes"]):
    raise DataError(f"{path}: {name} has labels outside "
                    f"[0, {spec['num_classes']}).")
  # Rows are channel-major (1024 R, 1024 G, 1024 B values).
  images = data.reshape((-1,) + _IMAGE_SHAPE_CHW).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def read_python_archive(dataset: str, path: str | None) -> RawSplits:
  """Reads the official python-version archive, or its extracted folder.

  Args:
    dataset: 'cifar10' or 'cifar100'.
    path: a tar.gz holding `cifar-10-batches-py/` / `cifar-100-python/`, that
      folder's parent, or the folder itself.

  Returns:
    The official train and test sets in file order.

  Raises:
    DataError: if the path is missing or does not hold the expected pickles.
  """
  spec = dataset_spec(dataset)
  if not path:
    raise DataError(
        f"data.source=archive needs data.path: the path to "
        f"{_expected_format(spec)}.")
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    members = _read_folder_members(path, spec)
  elif os.path.isfile(path):
    members = _read_archive_members(path, spec)
  else:
    raise DataError(f"{path} does not exist; expected {_expected_format(spec)}.")

  def _concat(names):
    parts = [_decode_pickle(members[n], n, path, spec) for n in names]
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))

  train_images, train_labels = _concat(spec["train_files"])
  test_images, test_labels = _concat(spec["test_files"])
  logging.info("Read %s from %s: %d train, %d test images.", spec["title"],
               path, len(train_images), len(test_images))
  return RawSplits(train_images, train_labels, test_images, test_labels)


# ---------------------------------------------------------------------------
# TensorFlow Datasets.
# ---------------------------------------------------------------------------


def _official_order(ids: np.ndarray) -> np.ndarray:
  """Permutation sorting TFDS examples by the index in their `id` field."""
  # ids look like b'train_00012': the suffix is the official file position.
  index = np.array([int(i.rsplit(b"_", 1)[-1]) for i in ids], dtype=np.int64)
  if len(np.unique(index)) != len(index):
    raise DataError("TFDS example ids are not unique; cannot restore the "
                    "official order.")
  return np.argsort(index, kind="stable")


def _prepare_tfds(builder: Any, spec: Mapping[str, Any], manual_dir: str | None,
                  register_checksums: bool, allow_download: bool) -> None:
  """Prepares the TFDS dataset from the manual archive.

  The network is used only when `allow_download` is set and no manual archive
  is there.

  Raises:
    DataError: if the archive is not there, or is not the official one.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # Not re-exported by `tfds.download`; a TFDS that moves it only loses the
  # friendlier message below.
  from tensorflow_datasets.core.download import download_manager  # pylint: disable=g-import-not-at-top
  checksum_error = getattr(download_manager, "NonMatchingChecksumError", ())

  downloads = os.path.join(os.fspath(builder.data_dir_root), "downloads")
  # TFDS' own default when no manual dir is configured.
  manual_dir = os.path.expanduser(manual_dir or os.path.join(downloads, "manual"))
  archive = os.path.join(manual_dir, spec["binary_archive"])
  if not os.path.isfile(archive) and allow_download:
    logging.info("Downloading and preparing %s in %s.", builder.name,
                 builder.data_dir_root)
    builder.download_and_prepare(download_dir=downloads)
    return
  if not os.path.isfile(archive):
    raise DataError(
        f"{spec['title']} is not prepared in {builder.data_dir_root} and this "
        f"machine cannot download it: put {spec['binary_archive']} in "
        f"{manual_dir} (--config.data.manual_dir), or use "
        "--config.data.source=archive "
        f"--config.data.path=/path/to/{spec['python_archive']} "
        "(or, on a machine with internet access, "
        "--config.data.allow_download=True). "
        f"Expected file: {archive}")
  if not tarfile.is_tarfile(archive):
    raise DataError(f"{archive} is not a tar archive; expected the official "
                    f"{spec['title']} binary version {spec['binary_archive']}.")

  config = tfds.download.DownloadConfig(
      manual_dir=manual_dir,
      # GCS is disabled in TFDS today; say so explicitly so a future default
      # cannot make preparation reach for the network.
      try_download_gcs=False,
      # Registration is redirected below, never asked of the builder.
      register_checksums=False)
  if register_checksums:
    # With `register_checksums=True` the builder would write the subset's
    # checksum into the *installed* tensorflow_datasets package
    # (url_checksums/<name>.txt), after which the genuine archive fails
    # verification. Build the download manager ourselves, recording into a
    # file beside the downloads instead.
    checksums_path = os.path.join(downloads, f"{builder.name}_checksums.tsv")

    def _make_download_manager(download_dir, download_config):
      del download_config
      return tfds.download.DownloadManager(
          download_dir=download_dir or downloads,
          manual_dir=manual_dir,
          url_infos=builder.url_infos,
          dataset_name=builder.name,
          register_checksums=True,
          register_checksums_path=checksums_path)

    builder._make_download_manager = _make_download_manager  # pylint: disable=protected-access
  logging.info("Preparing %s in %s from %s.", builder.name,
               builder.data_dir_root, archive)
  try:
    builder.download_and_prepare(download_dir=downloads, download_config=config)
  except checksum_error as e:
    raise DataError(
        f"{archive} is not the official {spec['binary_archive']} (checksum "
        "mismatch). A deliberately different file (e.g. a subset) needs "
        "data.register_checksums=True.") from e


def read_tfds(dataset: str, data_dir: str | None, manual_dir: str | None,
              register_checksums: bool = False,
              allow_download: bool = False) -> RawSplits:
  """Reads CIFAR through TFDS, preparing it offline from the manual archive.

  Args:
    dataset: 'cifar10' or 'cifar100' (the TFDS builder names).
    data_dir: TFDS data dir; None uses TFDS' default.
    manual_dir: where the official binary archive was put; None uses TFDS'
      default `<data_dir>/downloads/manual`.
    register_checksums: accept an archive whose checksum differs from the
      official one (test subsets); the checksum is recorded beside the
      downloads, not in the installed package.
    allow_download: let TFDS download when nothing is available locally (only
      for machines with internet access).

  Returns:
    The official train and test sets, in the official order.

  Raises:
    DataError: if the dataset is neither prepared nor preparable offline.
  """
  spec = dataset_spec(dataset)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"the tfds data source needs TensorFlow and TFDS ({e}): pip install tensorflow-cpu "
                    "tensorflow-datasets, or read the official archive with --config.data.source=archive "
                    "--config.data.path=PATH") from None

  builder = tfds.builder(dataset, data_dir=data_dir or None)
  if not builder.is_prepared():
    _prepare_tfds(builder, spec, manual_dir, register_checksums, allow_download)

  def _split(split):
    # batch_size=-1 returns the whole split as one batch of tensors.
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    order = _official_order(ex["id"])
    return (np.ascontiguousarray(ex["image"][order], dtype=np.uint8),
            ex["label"][order].astype(np.int32))

  train_images, train_labels = _split("train")
  test_images, test_labels = _split("test")
  logging.info("Read %s from TFDS %s: %d train, %d test images.", spec["title"],
               builder.data_dir, len(train_images), len(test_images))
  return RawSplits(train_images, train_labels, test_images, test_labels)
