"""Tests for msdfuse_jax.data (sources, cifar, augment).

Hermetic: real CIFAR subsets from ../shared/data (official archive formats),
TFDS prepared offline into a temporary data_dir, nothing downloaded.
Run with JAX_PLATFORMS=cpu.
"""

import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
# Imported up front so the "fails fast" timings below exclude TF's import.
import tensorflow_datasets as tfds

from msdfuse_jax import rundir
from msdfuse_jax.data import augment, cifar, sources
from tests.conftest import SHARED

SHARED_DATA = str(SHARED / "data")
C10_PY = os.path.join(SHARED_DATA, "cifar-10-python-subset.tar.gz")
C100_PY = os.path.join(SHARED_DATA, "cifar-100-python-subset.tar.gz")
C10_BIN = os.path.join(SHARED_DATA, "cifar-10-binary-subset.tar.gz")

needs_data = pytest.mark.skipif(
    not os.path.isfile(C10_PY), reason=f"CIFAR subsets not in {SHARED_DATA}")

# Facts about the subsets, from ../shared/data/README.md.
C10_TRAIN, C10_TEST, C100_TRAIN, C100_TEST = 5170, 1017, 486, 916


def data_cfg(**kw):
  cfg = dict(source="archive", path=None, data_dir=None, manual_dir=None,
             register_checksums=False, val_size=5000, split_seed=0,
             train_includes_val=False)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def aug_cfg(**kw):
  cfg = dict(augment.DEFAULTS)
  cfg.update(kw)
  return ml_collections.ConfigDict(cfg)


def assert_same_data(a, b):
  for field in ("train_images", "train_labels", "val_images", "val_labels",
                "test_images", "test_labels", "val_indices", "mean", "std"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), field)
  assert a.num_classes == b.num_classes


@pytest.fixture(scope="module")
def c10_archive():
  if not os.path.isfile(C10_PY):
    pytest.skip(f"CIFAR subsets not in {SHARED_DATA}")
  return cifar.load_cifar("cifar10", data_cfg(path=C10_PY))


# --------------------------------------------------------------------------
# Archive source.
# --------------------------------------------------------------------------


@needs_data
def test_archive_cifar10_split_and_contents(c10_archive):
  d = c10_archive
  n_val = C10_TRAIN // 10  # val_size 5000 is too large for 5,170: 10% rule.
  assert d.num_classes == 10 and d.dataset == "cifar10"
  assert d.train_images.shape == (C10_TRAIN - n_val, 32, 32, 3)
  assert d.val_images.shape == (n_val, 32, 32, 3)
  assert d.test_images.shape == (C10_TEST, 32, 32, 3)
  for x in (d.train_images, d.val_images, d.test_images):
    assert x.dtype == np.uint8
  for y in (d.train_labels, d.val_labels, d.test_labels):
    assert y.dtype == np.int32 and y.min() >= 0 and y.max() < 10
  assert d.mean.dtype == np.float32 and d.std.dtype == np.float32
  np.testing.assert_array_equal(
      d.val_indices, np.random.default_rng(0).permutation(C10_TRAIN)[:n_val])

  full = cifar.load_cifar("cifar10", data_cfg(path=C10_PY,
                                           train_includes_val=True))
  # Official order: data_batch_1 starts frog, truck, truck, deer, automobile.
  np.testing.assert_array_equal(full.train_labels[:5], [6, 9, 9, 4, 1])
  assert len(full.train_images) == C10_TRAIN
  np.testing.assert_array_equal(full.val_images, d.val_images)
  np.testing.assert_array_equal(d.val_images,
                                full.train_images[d.val_indices])
  np.testing.assert_array_equal(d.val_labels, full.train_labels[d.val_indices])
  keep = np.setdiff1d(np.arange(C10_TRAIN), d.val_indices)
  np.testing.assert_array_equal(d.train_images, full.train_images[keep])
  np.testing.assert_array_equal(d.train_labels, full.train_labels[keep])
  # Channel means of the subset given in ../shared/data/README.md.
  np.testing.assert_allclose(full.mean, [0.494, 0.485, 0.448], atol=6e-4)
  ref = full.train_images.reshape(-1, 3).astype(np.float64) / 255.
  np.testing.assert_allclose(full.mean, ref.mean(0), rtol=1e-6)
  np.testing.assert_allclose(full.std, ref.std(0), rtol=1e-6)


@needs_data
def test_archive_extracted_folder_equals_targz(tmp_path, c10_archive):
  with tarfile.open(C10_PY) as tar:
    tar.extractall(tmp_path, filter="data")
  for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
    assert_same_data(cifar.load_cifar("cifar10", data_cfg(path=str(path))),
                     c10_archive)


@needs_data
def test_archive_cifar100_uses_fine_labels():
  d = cifar.load_cifar("cifar100", data_cfg(path=C100_PY,
                                         train_includes_val=True))
  with tarfile.open(C100_PY) as tar:
    raw = {
        name: pickle.load(tar.extractfile(f"cifar-100-python/{name}"),
                          encoding="bytes") for name in ("train", "test")
    }
  assert d.num_classes == 100
  assert len(d.train_images) == C100_TRAIN and len(d.test_images) == C100_TEST
  assert len(d.val_images) == C100_TRAIN // 10
  np.testing.assert_array_equal(d.train_labels, raw["train"][b"fine_labels"])
  np.testing.assert_array_equal(d.test_labels, raw["test"][b"fine_labels"])
  assert d.train_labels.max() >= 20  # not the 20 coarse labels
  # CHW rows -> HWC images.
  first = raw["train"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
  np.testing.assert_array_equal(d.train_images[0], first)


@needs_data
def test_archive_errors_name_the_path(tmp_path):
  missing = str(tmp_path / "nowhere.tar.gz")
  with pytest.raises(sources.DataError, match="nowhere.tar.gz.*cifar-10-python"):
    cifar.load_cifar("cifar10", data_cfg(path=missing))

  corrupt = tmp_path / "corrupt.tar.gz"
  corrupt.write_bytes(b"this is not a tar file" * 100)
  with pytest.raises(sources.DataError, match="corrupt.tar.gz.*cifar-10-python"):
    cifar.load_cifar("cifar10", data_cfg(path=str(corrupt)))

  # The CIFAR-100 archive given for CIFAR-10.
  with pytest.raises(sources.DataError, match="cifar-10-batches-py"):
    cifar.load_cifar("cifar10", data_cfg(path=C100_PY))

  # An archive whose pickle is not a CIFAR dict.
  bad = tmp_path / "bad.tar.gz"
  with tarfile.open(bad, "w:gz") as tar:
    for name in ("train", "test"):
      blob = pickle.dumps({b"data": np.zeros((2, 5), np.uint8)})
      info = tarfile.TarInfo(f"cifar-100-python/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  with pytest.raises(sources.DataError, match="bad.tar.gz"):
    cifar.load_cifar("cifar100", data_cfg(path=str(bad)))

  with pytest.raises(sources.DataError, match="data.path"):
    cifar.load_cifar("cifar10", data_cfg(path=None))
  with pytest.raises(sources.DataError, match="source"):
    cifar.load_cifar("cifar10", data_cfg(source="nfs"))
  with pytest.raises(sources.DataError, match="Unknown dataset"):
    cifar.load_cifar("mnist", data_cfg(path=C10_PY))


@needs_data
def test_pickle_with_foreign_globals_is_refused(tmp_path):
  evil = tmp_path / "evil"
  evil.mkdir()
  blob = pickle.dumps({b"data": os.getcwd, b"fine_labels": []})
  for name in ("train", "test"):
    (evil / name).write_bytes(blob)
  with pytest.raises(sources.DataError, match="not allowed"):
    cifar.load_cifar("cifar100", data_cfg(path=str(evil)))


# --------------------------------------------------------------------------
# Validation split.
# --------------------------------------------------------------------------


@needs_data
def test_val_split_is_saved_and_reused(tmp_path, c10_archive):
  workdir = str(tmp_path / "run")
  d = cifar.load_cifar("cifar10", data_cfg(path=C10_PY), workdir)
  np.testing.assert_array_equal(d.val_indices, c10_archive.val_indices)
  path = os.path.join(workdir, rundir.VAL_SPLIT_FILE)
  saved = json.load(open(path))
  assert saved["dataset"] == "cifar10" and saved["num_train"] == C10_TRAIN
  assert saved["split_seed"] == 0 and saved["val_size"] == len(d.val_indices)
  np.testing.assert_array_equal(saved["val_indices"], d.val_indices)

  # A later call with another seed still gets the saved split.
  again = cifar.load_cifar("cifar10", data_cfg(path=C10_PY, split_seed=7),
                        workdir)
  np.testing.assert_array_equal(again.val_indices, d.val_indices)
  other = cifar.load_cifar("cifar10", data_cfg(path=C10_PY, split_seed=7))
  assert not np.array_equal(other.val_indices, d.val_indices)


@needs_data
def test_val_split_disagreeing_with_dataset_is_an_error(tmp_path):
  workdir = str(tmp_path)
  cifar.load_cifar("cifar10", data_cfg(path=C10_PY), workdir)
  with pytest.raises(sources.DataError, match="cifar10.*cifar100"):
    cifar.load_cifar("cifar100", data_cfg(path=C100_PY), workdir)

  path = os.path.join(workdir, rundir.VAL_SPLIT_FILE)
  saved = json.load(open(path))
  saved["num_train"] = 50000
  json.dump(saved, open(path, "w"))
  with pytest.raises(sources.DataError, match="50000.*5170"):
    cifar.load_cifar("cifar10", data_cfg(path=C10_PY), workdir)

  with open(path, "w") as f:
    f.write("{not json")
  with pytest.raises(sources.DataError, match="val_split.json"):
    cifar.load_cifar("cifar10", data_cfg(path=C10_PY), workdir)


def test_effective_val_size_rule():
  assert cifar.effective_val_size(5000, 50000) == 5000
  assert cifar.effective_val_size(5000, 5170) == 517
  assert cifar.effective_val_size(5000, 486) == 48
  assert cifar.effective_val_size(0, 486) == 0
  with pytest.raises(sources.DataError):
    cifar.effective_val_size(-1, 100)


# --------------------------------------------------------------------------
# TFDS source, prepared offline from the binary subset.
# --------------------------------------------------------------------------


def _installed_checksums():
  path = os.path.join(os.path.dirname(tfds.__file__), "url_checksums",
                      "cifar10.txt")
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def tfds_c10(tmp_path_factory):
  """Prepares cifar10 from the binary subset once per session (~10 s)."""
  if not os.path.isfile(C10_BIN):
    pytest.skip(f"CIFAR subsets not in {SHARED_DATA}")
  root = tmp_path_factory.mktemp("tfds")
  manual = root / "manual"
  manual.mkdir()
  shutil.copy(C10_BIN, manual / "cifar-10-binary.tar.gz")
  before = _installed_checksums()
  cfg = data_cfg(source="tfds", data_dir=str(root / "data"),
                 manual_dir=str(manual), register_checksums=True)
  data = cifar.load_cifar("cifar10", cfg)
  # The subset's checksum must not leak into the installed package.
  assert _installed_checksums() == before
  return data, cfg


def test_tfds_source_matches_archive_source(tfds_c10, c10_archive):
  data, _ = tfds_c10
  assert len(data.train_images) + len(data.val_images) == C10_TRAIN
  assert len(data.test_images) == C10_TEST
  # Same images, same official order, hence the same split and statistics.
  assert_same_data(data, c10_archive)


def test_tfds_reuses_prepared_data_without_manual_dir(tfds_c10):
  data, cfg = tfds_c10
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.manual_dir = None
  cfg.register_checksums = False
  assert_same_data(cifar.load_cifar("cifar10", cfg), data)


@pytest.mark.parametrize("dataset,archive", [
    ("cifar10", "cifar-10-binary.tar.gz"),
    ("cifar100", "cifar-100-binary.tar.gz"),
])
def test_tfds_missing_data_fails_fast(tmp_path, dataset, archive):
  start = time.monotonic()
  with pytest.raises(sources.DataError, match=archive) as info:
    cifar.load_cifar(dataset, data_cfg(source="tfds", data_dir=str(tmp_path)))
  assert "source=archive" in str(info.value)
  manual = tmp_path / "my_manual"
  with pytest.raises(sources.DataError, match=str(manual)):
    cifar.load_cifar(dataset, data_cfg(source="tfds", data_dir=str(tmp_path),
                                    manual_dir=str(manual)))
  # A download attempt would hang for minutes on this offline machine.
  assert time.monotonic() - start < 5


@needs_data
def test_tfds_subset_needs_register_checksums(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  shutil.copy(C10_BIN, manual / "cifar-10-binary.tar.gz")
  with pytest.raises(sources.DataError, match="checksum"):
    cifar.load_cifar("cifar10", data_cfg(source="tfds",
                                      data_dir=str(tmp_path / "data"),
                                      manual_dir=str(manual)))


def test_tfds_manual_file_that_is_not_a_tar(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "cifar-10-binary.tar.gz").write_bytes(b"garbage" * 10)
  with pytest.raises(sources.DataError, match="not a tar"):
    cifar.load_cifar("cifar10", data_cfg(source="tfds",
                                      data_dir=str(tmp_path / "data"),
                                      manual_dir=str(manual)))


# --------------------------------------------------------------------------
# Multi-host sharding.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_host_shard_is_a_disjoint_partition(drop_remainder):
  images = np.arange(103)[:, None] * np.ones((1, 2), np.int64)
  labels = np.arange(103)
  shards = [cifar.host_shard(images, labels, p, 4, drop_remainder)
            for p in range(4)]
  sizes = [len(s[1]) for s in shards]
  seen = np.concatenate([s[1] for s in shards])
  assert len(np.unique(seen)) == len(seen)
  for x, y in shards:
    np.testing.assert_array_equal(x[:, 0], y)
  if drop_remainder:
    assert sizes == [25] * 4
  else:
    assert sizes == [26, 26, 26, 25]
    np.testing.assert_array_equal(seen, labels)
  with pytest.raises(ValueError):
    cifar.host_shard(images, labels, 4, 4)


# --------------------------------------------------------------------------
# Device-side augmentation.
# --------------------------------------------------------------------------

# Jitted once per configuration: eager Beta sampling dispatches (and compiles)
# dozens of small programs.
mix = jax.jit(augment.mixup_cutmix, static_argnames=("mixup_alpha", "cutmix_alpha",
                                                "switch_prob", "prob"))

MEAN = np.array([0.49, 0.48, 0.45], np.float32)
STD = np.array([0.25, 0.24, 0.26], np.float32)


def _images(n, seed=0):
  # Values >= 1, so the zero padding is recognisable after a crop.
  return np.random.default_rng(seed).integers(1, 256, (n, 32, 32, 3),
                                              dtype=np.uint8)


def test_normalize_and_eval_batch():
  x = _images(4)
  expected = (x.astype(np.float32) / 255. - MEAN) / STD
  out = augment.normalize(x, MEAN, STD)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(augment.eval_batch(x, MEAN, STD), out)


def test_smooth_labels_exact():
  y = augment.smooth_labels(jnp.array([0, 3, 9]), 10, 0.1)
  assert y.shape == (3, 10) and y.dtype == jnp.float32
  expected = np.full((3, 10), np.float32(0.01))
  expected[[0, 1, 2], [0, 3, 9]] = np.float32(0.91)
  np.testing.assert_array_equal(y, expected)
  np.testing.assert_allclose(y.sum(-1), 1., rtol=1e-6)
  np.testing.assert_array_equal(augment.smooth_labels(jnp.array([2]), 4, 0.),
                                [[0., 0., 1., 0.]])


def test_random_crop_flip_gives_shifted_copies():
  x = _images(64)
  out = np.asarray(jax.jit(augment.random_crop_flip)(jax.random.key(0), x))
  assert out.shape == x.shape and out.dtype == np.uint8
  padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
  found = []
  for i in range(len(x)):
    matches = [(dy, dx, f) for dy in range(9) for dx in range(9)
               for f in (False, True)
               if np.array_equal(
                   out[i], (lambda c: c[:, ::-1] if f else c)(
                       padded[i, dy:dy + 32, dx:dx + 32]))]
    assert len(matches) == 1, f"sample {i} is not a shifted copy"
    found.append(matches[0])
  flips = [f for _, _, f in found]
  assert 0 < sum(flips) < len(flips)
  assert len({(dy, dx) for dy, dx, _ in found}) > 10
  # No crop, no flip: the identity.
  same = augment.random_crop_flip(jax.random.key(0), x, padding=0, flip=False)
  np.testing.assert_array_equal(same, x)


def test_mixup_only_is_a_convex_combination_with_the_reversed_batch():
  x = augment.normalize(_images(8), MEAN, STD)
  labels = jnp.arange(8)
  y = augment.smooth_labels(labels, 10, 0.)
  for seed in range(3):
    out, t = mix(jax.random.key(seed), x, y, mixup_alpha=0.8,
                             cutmix_alpha=0.)
    lam = float(t[0, 0])
    assert 0. <= lam <= 1.
    np.testing.assert_allclose(t[0, 7], 1. - lam, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out, lam * x + (1. - lam) * x[::-1], atol=1e-5)
    np.testing.assert_allclose(t.sum(-1), 1., rtol=1e-6)


def test_cutmix_only_pastes_one_box_with_lambda_of_its_area():
  x = augment.normalize(_images(8), MEAN, STD)
  y = augment.smooth_labels(jnp.arange(8), 10, 0.)
  lams = []
  for seed in range(10):
    out, t = mix(jax.random.key(seed), x, y, mixup_alpha=0.,
                             cutmix_alpha=1.)
    out, xn = np.asarray(out), np.asarray(x)
    from_partner = np.all(out == xn[::-1], axis=-1)
    from_self = np.all(out == xn, axis=-1)
    assert np.all(from_partner | from_self)
    mask = from_partner[0]
    assert np.all(from_partner == mask)  # the same box for the whole batch
    if mask.any():
      rows, cols = np.where(mask.any(1))[0], np.where(mask.any(0))[0]
      assert mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()
    lam = float(t[0, 0])
    np.testing.assert_allclose(lam, 1. - mask.mean(), atol=1e-6)
    np.testing.assert_allclose(t[0, 7], 1. - lam, atol=1e-6)
    lams.append(lam)
  assert min(lams) < 0.9  # boxes of varying, non-trivial size


def test_mix_prob_zero_and_disabled_alphas_are_the_identity():
  x = augment.normalize(_images(4), MEAN, STD)
  y = augment.smooth_labels(jnp.arange(4), 10, 0.1)
  for kw in (dict(prob=0.), dict(mixup_alpha=0., cutmix_alpha=0.)):
    out, t = mix(jax.random.key(0), x, y, **kw)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(t, y)


def test_switch_prob_chooses_between_mixup_and_cutmix():
  x = augment.normalize(_images(4), MEAN, STD)
  y = augment.smooth_labels(jnp.arange(4), 10, 0.)
  kinds = set()
  for seed in range(16):
    out, _ = mix(jax.random.key(seed), x, y)
    out, xn = np.asarray(out), np.asarray(x)
    cut = np.all((out == xn) | (out == xn[::-1]))
    kinds.add("cutmix" if cut else "mixup")
  assert kinds == {"cutmix", "mixup"}


def test_augment_batch_shapes_determinism_and_targets():
  x = _images(16)
  labels = np.arange(16) % 10
  fn = jax.jit(lambda rng, im, lab: augment.augment_batch(
      rng, im, lab, aug_cfg(), MEAN, STD, 10))
  a_img, a_t = fn(jax.random.key(1), x, labels)
  b_img, b_t = fn(jax.random.key(1), x, labels)
  c_img, _ = fn(jax.random.key(2), x, labels)
  assert a_img.shape == (16, 32, 32, 3) and a_img.dtype == jnp.float32
  assert a_t.shape == (16, 10) and a_t.dtype == jnp.float32
  np.testing.assert_array_equal(a_img, b_img)
  np.testing.assert_array_equal(a_t, b_t)
  assert not np.array_equal(a_img, c_img)
  np.testing.assert_allclose(a_t.sum(-1), 1., rtol=1e-5)
  assert float(a_t.min()) >= 0.01 - 1e-6  # smoothing floor survives mixing

  # Everything off: exactly the evaluation preprocessing and plain one-hots.
  off = aug_cfg(crop_padding=0, flip=False, mixup_alpha=0., cutmix_alpha=0.,
                label_smoothing=0.)
  img, t = augment.augment_batch(jax.random.key(0), x, labels, off, MEAN, STD, 10)
  np.testing.assert_array_equal(img, augment.eval_batch(x, MEAN, STD))
  np.testing.assert_array_equal(t, np.eye(10, dtype=np.float32)[labels])


def _position_images(n):
  """Images whose channel 0 holds row + 1 and channel 1 column + 1 (0 is reserved for the padding)."""
  rows, cols = np.meshgrid(np.arange(1, 33), np.arange(1, 33), indexing="ij")
  image = np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
  return np.broadcast_to(image, (n, 32, 32, 3)).copy()


def _raw_pixels(x):
  """The uint8 values back from `augment_batch`'s output when mean = 0 and std = 1."""
  return np.rint(np.asarray(x) * 255.0).astype(np.int64)


def test_augmentation_in_distribution_uniform_crops_black_padding_fair_independent_flips():
  # What the train step does to every sample (mixing and smoothing off), observed on 4,500 samples:
  # crop offsets uniform over 0..8 on both axes, independent of each other; padded pixels black before
  # normalisation; flips with p = 0.5, independent per sample and per step.
  n = 4500
  zero, one = np.zeros(3, np.float32), np.ones(3, np.float32)
  images, labels = _position_images(n), np.zeros(n, np.int32)
  cfg = aug_cfg(mixup_alpha=0., cutmix_alpha=0., label_smoothing=0.)
  run = jax.jit(lambda key: augment.augment_batch(key, images, labels, cfg, zero, one, 10)[0])
  raw = _raw_pixels(run(jax.random.PRNGKey(0)))
  flipped = raw[:, 16, 15, 1] > raw[:, 16, 16, 1]  # columns run backwards (both always inside)
  dy = raw[:, 16, 16, 0] - 13  # output row 16 shows input row 16 + dy - 4
  # The flip comes after the crop: undo it on the whole image to read the crop.
  unflipped = np.where(flipped[:, None, None, None], raw[:, :, ::-1, :], raw)
  dx = unflipped[:, 16, 16, 1] - 13
  assert set(np.unique(dy)) == set(range(9)) and set(np.unique(dx)) == set(range(9))
  expected, sd = n / 9, np.sqrt(n * (1 / 9) * (8 / 9))
  for offsets in (dy, dx):
    counts = np.bincount(offsets, minlength=9)
    assert np.all(np.abs(counts - expected) < 5 * sd), counts
  assert abs(np.corrcoef(dy, dx)[0, 1]) < 5 / np.sqrt(n)
  # Padding: where the crop reaches outside the image every channel is the raw value 0.
  top = unflipped[dy == 0]  # offset 0: the first 4 rows come from the padding
  assert np.all(top[:, :4] == 0) and np.all(top[:, 4:, 16, 0] > 0)
  # Flips: fair, and independent per sample (runs of equal neighbours as for coin tosses) and per step.
  sd_flip = np.sqrt(n * 0.25)
  assert abs(flipped.sum() - n / 2) < 5 * sd_flip
  assert abs(np.sum(flipped[1:] == flipped[:-1]) - (n - 1) / 2) < 5 * sd_flip
  raw_next = _raw_pixels(run(jax.random.PRNGKey(1)))
  flipped_next = raw_next[:, 16, 15, 1] > raw_next[:, 16, 16, 1]
  assert abs(np.sum(flipped == flipped_next) - n / 2) < 5 * sd_flip
