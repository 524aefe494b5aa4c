"""ImageNet data: the image-folder and TFDS sources, the transforms, the splits, and a generated image folder
trained, resumed and evaluated through the command-line tools."""

import io
import json
import os
import subprocess
import tarfile

import numpy as np
import pytest
from PIL import Image

from msdfuse_jax import data as data_lib
from msdfuse_jax import train
from msdfuse_jax.data import imagenet, sources
from tests.conftest import REPO, tool_command

WNIDS = ("n01440764", "n01443537", "n01484850")  # labels 0, 1, 2 of the official 1,000


def _image(rng, label):
  h, w = rng.integers(40, 90, 2)  # odd sizes, smaller than the crop: every path resizes
  return Image.fromarray((rng.random((h, w, 3)) * 80 + label * 80).astype(np.uint8))


def make_folder(root, per_class=(8, 3), seed=0):
  """DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG, a few odd-sized JPEGs per class."""
  rng = np.random.default_rng(seed)
  for split, n in zip(("train", "val"), per_class):
    for label, wnid in enumerate(WNIDS):
      os.makedirs(root / split / wnid, exist_ok=True)
      for i in range(n):
        _image(rng, label).save(root / split / wnid / f"{wnid}_{i}.JPEG", quality=90)
  return root


def folder_cfg(path, **kw):
  return {"source": "folder", "path": str(path), "val_size": 50000, "split_seed": 0, **kw}


# ---- transforms -------------------------------------------------------------------------------------------


def test_random_resized_crop_boxes_follow_the_torchvision_rule():
  rng = np.random.default_rng(0)
  for _ in range(300):
    width, height = (int(v) for v in rng.integers(50, 600, 2))
    left, top, w, h = imagenet.random_resized_crop_box(rng, width, height)
    assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
    if (w, h) != (width, height):  # not the fallback: area and aspect ratio in range (up to rounding)
      assert 0.08 * width * height * 0.9 <= w * h <= width * height
      assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # A 1000x10 strip fits no box of the allowed ratios: the centre crop with the ratio clamped to 4/3.
  assert imagenet.random_resized_crop_box(rng, 1000, 10) == ((1000 - 13) // 2, 0, 13, 10)
  assert imagenet.random_resized_crop_box(rng, 10, 1000) == (0, (1000 - 13) // 2, 10, 13)


def test_eval_transform_takes_the_centre_crop_after_resizing_the_shorter_side():
  pixels = np.random.default_rng(1).integers(0, 256, (256, 512, 3), dtype=np.uint8)  # shorter side 256
  out = imagenet.eval_transform(Image.fromarray(pixels), 224)
  np.testing.assert_array_equal(out, pixels[16:240, 144:368])
  out = imagenet.eval_transform(Image.fromarray(pixels[:, :300]), 224)  # 300x256 -> 300x256, crop
  np.testing.assert_array_equal(out, pixels[16:240, 38:262])
  small = imagenet.eval_transform(Image.fromarray(pixels[:50, :70]), 224)  # upscaled
  assert small.shape == (224, 224, 3) and small.dtype == np.uint8
  assert imagenet.eval_resize(224) == 256 and imagenet.eval_resize(112) == 128


def test_training_examples_depend_on_seed_step_and_position_only(tmp_path):
  reader, labels, _, _ = imagenet.read_folder(make_folder(tmp_path), 1000)
  source = imagenet.TrainSource(reader, labels, 64, seed=3)
  rows, positions = np.array([0, 5, 9, 17]), np.array([0, 1, 2, 3])
  first = source.read(rows, 7, positions)
  assert first["image"].shape == (4, 64, 64, 3) and first["image"].dtype == np.uint8
  np.testing.assert_array_equal(first["label"], labels[rows])
  np.testing.assert_array_equal(source.read(rows, 7, positions)["image"], first["image"])
  # The same example at another step or position, or with another seed, gets another crop/flip.
  assert not np.array_equal(source.read(rows, 8, positions)["image"], first["image"])
  assert not np.array_equal(source.read(rows, 7, positions + 4)["image"], first["image"])
  other = imagenet.TrainSource(reader, labels, 64, seed=4)
  assert not np.array_equal(other.read(rows, 7, positions)["image"], first["image"])
  # Positions, not the order of the request, key each example (the layout over processes is free).
  swapped = source.read(rows[::-1], 7, positions[::-1])["image"]
  np.testing.assert_array_equal(swapped[::-1], first["image"])


# ---- the folder source and the splits -----------------------------------------------------------------------


def test_folder_source_labels_splits_and_lazy_images(tmp_path):
  root = make_folder(tmp_path / "in")
  data = data_lib.load("imagenet2012", folder_cfg(root), str(tmp_path / "run"))
  assert isinstance(data, imagenet.ImageNetData) and data.num_classes == 1000
  # 24 training images, 10% held out (50,000 is more than half of them), the official val set as test.
  assert len(data.val_images) == 2 and len(data.train_images) == 22 and len(data.test_images) == 9
  assert sorted(np.concatenate([data.train_images.indices, data.val_indices]).tolist()) == list(range(24))
  np.testing.assert_array_equal(data.test_labels, np.repeat([0, 1, 2], 3))
  np.testing.assert_allclose(data.mean, [0.485, 0.456, 0.406])
  np.testing.assert_allclose(data.std, [0.229, 0.224, 0.225])
  saved = json.loads((tmp_path / "run" / "val_split.json").read_text())
  assert saved["dataset"] == "imagenet2012/folder" and saved["val_indices"] == data.val_indices.tolist()
  again = data_lib.load("imagenet2012", folder_cfg(root, split_seed=5), str(tmp_path / "run"))
  np.testing.assert_array_equal(again.val_indices, data.val_indices)  # the saved split wins
  # Slicing is lazy; np.asarray decodes exactly what indexing one image gives.
  part = data.test_images[2:5]
  assert isinstance(part, imagenet.EvalImages) and part.shape == (3, 224, 224, 3)
  decoded = np.asarray(part)
  np.testing.assert_array_equal(decoded[1], data.test_images[3])
  path = data.test_images.reader.paths[3]
  np.testing.assert_array_equal(decoded[1], imagenet.eval_transform(Image.open(path).convert("RGB"), 224))


@pytest.mark.parametrize("mutate,match", [
    (lambda root: None, "needs --config.data.path"),
    (lambda root: os.rename(root / "val", root / "validation"), "val does not exist"),
    (lambda root: [os.remove(p) for p in (root / "train" / WNIDS[1]).iterdir()], f"{WNIDS[1]} holds no images"),
    (lambda root: os.makedirs(root / "val" / "n99999999"), "lacks: \\['n99999999'\\]"),
])
def test_folder_source_errors_name_what_to_provide(tmp_path, mutate, match):
  root = make_folder(tmp_path / "in", per_class=(2, 1))
  mutate(root)
  cfg = folder_cfg(root) if "path" not in match else folder_cfg("")
  with pytest.raises(sources.DataError, match=match):
    data_lib.load("imagenet2012", cfg)


def test_a_corrupt_image_is_named(tmp_path):
  root = make_folder(tmp_path / "in", per_class=(2, 1))
  bad = root / "val" / WNIDS[0] / f"{WNIDS[0]}_0.JPEG"
  bad.write_bytes(b"not a jpeg")
  data = data_lib.load("imagenet2012", folder_cfg(root))
  with pytest.raises(sources.DataError, match=f"cannot decode the image {bad}"):
    np.asarray(data.test_images)


def test_the_device_pipeline_refuses_imagenet(tmp_path):
  data = data_lib.load("imagenet2012", folder_cfg(make_folder(tmp_path / "in", per_class=(2, 1))))
  plan = train.Plan(1, 2, 2, 2, 4)
  with pytest.raises(train.ConfigError, match="pipeline=stream"):
    train.make_feed("device", data, 0, plan, 0)


# ---- TFDS imagenet2012 from the official tars -----------------------------------------------------------------


def _add(tar, name, payload):
  info = tarfile.TarInfo(name)
  info.size = len(payload)
  tar.addfile(info, io.BytesIO(payload))


def make_manual_dir(path, per_class=4, num_val=6):
  """ILSVRC2012_img_train.tar (one tar per wnid inside) and a flat ILSVRC2012_img_val.tar, as published."""
  rng = np.random.default_rng(0)

  def jpeg(label):
    out = io.BytesIO()
    _image(rng, label).save(out, "JPEG")
    return out.getvalue()

  os.makedirs(path, exist_ok=True)
  with tarfile.open(path / "ILSVRC2012_img_train.tar", "w") as outer:
    for label, wnid in enumerate(WNIDS):
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as tar:
        for i in range(per_class):
          _add(tar, f"{wnid}_{i}.JPEG", jpeg(label))
      _add(outer, f"{wnid}.tar", inner.getvalue())
  with tarfile.open(path / "ILSVRC2012_img_val.tar", "w") as tar:
    for i in range(1, num_val + 1):
      _add(tar, f"ILSVRC2012_val_{i:08d}.JPEG", jpeg(i % 3))
  return path


def test_tfds_source_prepares_from_the_manual_dir_and_reads_by_index(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("array_record")
  cfg = {"source": "tfds", "data_dir": str(tmp_path / "tfds"), "val_size": 2}
  with pytest.raises(sources.DataError, match="lacks ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar"):
    data_lib.load("imagenet2012", {**cfg, "manual_dir": str(tmp_path / "empty")})
  cfg["manual_dir"] = str(make_manual_dir(tmp_path / "manual"))
  data = data_lib.load("imagenet2012", cfg, str(tmp_path / "run"))
  assert len(data.train_images) + len(data.val_images) == 12 and len(data.test_images) == 6
  assert sorted(np.concatenate([data.train_labels, data.val_labels]).tolist()) == [0] * 4 + [1] * 4 + [2] * 4
  batch = np.asarray(data.test_images[:3])
  assert batch.shape == (3, 224, 224, 3) and batch.std() > 0
  example = data.train_source(0).read(np.array([0, 1]), 0, np.array([0, 1]))
  assert example["image"].shape == (2, 224, 224, 3)
  saved = json.loads((tmp_path / "run" / "val_split.json").read_text())
  assert saved["dataset"] == "imagenet2012/tfds"
  # Prepared once: a second load reads the prepared files (the manual dir may be gone).
  again = data_lib.load("imagenet2012", {**cfg, "manual_dir": str(tmp_path / "gone")}, str(tmp_path / "run"))
  np.testing.assert_array_equal(again.test_labels, data.test_labels)


# ---- the command-line tools on a generated image folder ---------------------------------------------------------


def _tool(module, *args, cwd):
  return subprocess.run(tool_command(module, *args), capture_output=True,
                        text=True, cwd=cwd, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})


@pytest.mark.slow
def test_train_resume_and_evaluate_on_an_image_folder(tmp_path):
  root = make_folder(tmp_path / "in")
  workdir = tmp_path / "run"
  common = [f"--config={REPO}/configs/imagenet.py:model=msdfuse_imagenet,runlocal", f"--config.data.path={root}",
            f"--workdir={workdir}", "--config.train.batch_size=4", "--config.train.checkpoint_every_steps=2",
            "--config.train.eval_every_steps=100", "--config.eval.batch_size=8"]
  # Two grain worker processes decode the first part, threads of the training process the second.
  first = _tool("train_main", *common, "--config.train.num_steps=2", "--config.data.workers=2",
                cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "fresh run" in first.stderr and "saved checkpoint at step 2" in first.stderr
  assert "leaked" not in first.stderr and "Traceback" not in first.stderr
  second = _tool("train_main", *common, "--config.train.num_steps=4", "--config.data.workers=0",
                 cwd=tmp_path)
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"resumed run in {workdir} at step 2 of 4" in second.stderr
  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["step"] == 4 and 0 <= final["test/accuracy_exit3"] <= 1
  config = json.loads((workdir / "config.json").read_text())
  assert config["model"]["name"] == "msdfuse_imagenet_tiny" and config["dataset"] == "imagenet2012"

  evaluated = _tool("eval_main", f"--workdir={workdir}", cwd=tmp_path)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  probs = np.load(workdir / "eval" / "probs_test.npz")
  assert probs["probs"].shape == (3, 9, 1000)
  np.testing.assert_array_equal(probs["labels"], np.repeat([0, 1, 2], 3))
  costs = json.loads((workdir / "eval" / "costs.json").read_text())
  assert costs["dataset"] == "imagenet2012"
  rows = json.loads((workdir / "eval" / "anytime.json").read_text())
  assert [r["op_counter"] for r in rows] == [e["op_counter"] for e in costs["exits"]]
  assert rows[0]["op_counter"] > 5e6  # counted at 224x224 (at 32x32 it would be 49 times less)


def test_train_cli_on_a_missing_folder_is_one_line_naming_it(tmp_path):
  proc = _tool("train_main", f"--config={REPO}/configs/imagenet.py:runlocal",
               f"--config.data.path={tmp_path}/nowhere", f"--workdir={tmp_path}/run", cwd=tmp_path)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and f"{tmp_path}/nowhere does not exist" in last
