"""A synthetic image folder in ImageNet's layout, to time the host input pipeline without ImageNet.

  python3 experiments/make_jpeg_folder.py --out=/tmp/in500 [--classes=10] [--per_class=40]

Writes ``OUT/train/<wnid>/*.JPEG`` (``per_class`` per class) and ``OUT/val/<wnid>/*.JPEG`` (an eighth as
many), photo-like 500x375 JPEGs (70%; the others 375x500) at quality 90: smooth colour fields, finer
detail and sensor-like noise, about 65 KB each, so that decoding costs what it costs on camera images
(ImageNet's average is about 110 KB at about 400x350). The figures of docs/imagenet.md were taken on the
default folder (400 training images):

  msdfuse-bench --config=configs/imagenet.py:model=msdnet_imagenet_step4 --config.data.path=/tmp/in500 \
      --config.data.workers=2 --input_only --batch_size=32 --steps=40
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image, ImageFilter


def photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
  """A colour field upsampled from 8x6 values, blended with detail at a quarter resolution, plus noise."""
  base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height),
                                                                                 Image.BICUBIC)
  detail = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8))
  image = Image.blend(base, detail.resize((width, height), Image.BILINEAR), 0.35).filter(ImageFilter.DETAIL)
  noisy = np.asarray(image).astype(np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
  return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="the folder to write (DIR/train, DIR/val)")
  parser.add_argument("--classes", type=int, default=10, help="class folders per split")
  parser.add_argument("--per_class", type=int, default=40, help="training images per class")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  for split, count in (("train", args.per_class), ("val", max(1, args.per_class // 8))):
    for c in range(args.classes):
      wnid = f"n{c:08d}"
      os.makedirs(os.path.join(args.out, split, wnid), exist_ok=True)
      for i in range(count):
        size = (500, 375) if rng.random() < 0.7 else (375, 500)
        photo_like(rng, *size).save(os.path.join(args.out, split, wnid, f"{wnid}_{i}.JPEG"), quality=90)
  print(f"wrote {args.classes * (args.per_class + max(1, args.per_class // 8))} images under {args.out}")


if __name__ == "__main__":
  main()
