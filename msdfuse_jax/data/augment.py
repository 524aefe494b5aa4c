"""Device-side CIFAR augmentation: pure JAX, jittable, deterministic per key.

The train step calls `augment_batch` inside the compiled step on each shard
of the uint8 batch, with `rng = fold_in(fold_in(base, step), shard)` where
`shard` is the shard's *global* index (0..num_shards-1, over every device of
every process), so every shard is augmented differently, the augmentation
does not depend on how many devices run the shards, and a resumed run
repeats the same augmentation. Host-to-device transfers stay uint8
(4x smaller than float32).

Order of operations (the torchvision/timm order of the reference code):
  1. pad the *raw* uint8 image with 4 black (0-valued) pixels and take a random
     32x32 crop, then flip horizontally with p=0.5;
  2. normalise with the per-channel mean/std, so padded pixels become
     `-mean/std`, exactly as `RandomCrop(32, padding=4)` then `Normalize` do;
  3. smooth the labels, then mix the batch with Mixup or CutMix (timm's
     "batch" mode: one lambda per batch, each sample paired with the sample at
     the mirrored position of the batch). Mixing is linear, so smoothing first
     and mixing the smoothed targets equals timm's `mixup_target`.
All shapes are static: the per-sample crop is a `dynamic_slice` under `vmap`
and the CutMix box is a mask built from iota comparisons.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.Array | np.ndarray

# The authors' (timm) recipe: the one place these defaults live (configs/cifar.py starts from them;
# fields absent from an older config.json take them).
DEFAULTS = dict(crop_padding=4, flip=True, mixup_alpha=0.8, cutmix_alpha=1.0,
                switch_prob=0.5, mix_prob=1.0, label_smoothing=0.1)


def normalize(images: ArrayLike, mean: ArrayLike, std: ArrayLike) -> jax.Array:
  """Maps uint8 pixels to float32 `(x / 255 - mean) / std`.

  Args:
    images: uint8 (..., C) images (or floats in [0, 255]).
    mean: (C,) per-channel mean in [0, 1] units.
    std: (C,) per-channel std in [0, 1] units.

  Returns:
    float32 array of the same shape.
  """
  x = jnp.asarray(images).astype(jnp.float32) / 255.
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_crop_flip(rng: jax.Array, images: ArrayLike, padding: int = 4,
                     flip: bool = True) -> jax.Array:
  """Random crop after zero padding, and random horizontal flip, per sample.

  The padding value is 0 in the input's own units: call this on raw uint8
  images (as `augment_batch` does) to get torchvision's black padding that is
  normalised afterwards.

  Args:
    rng: PRNG key.
    images: (N, H, W, C) batch, any dtype.
    padding: pixels of zero padding on each side; the crop offset is uniform
      in [0, 2 * padding] along each axis. 0 disables cropping.
    flip: whether to flip each sample left-right with probability 0.5.

  Returns:
    (N, H, W, C) batch of the input's dtype.
  """
  images = jnp.asarray(images)
  n, h, w, c = images.shape
  crop_key, flip_key = jax.random.split(rng)
  if padding > 0:
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding),
                              (0, 0)))
    offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)

    def crop(image, offset):
      # Offsets are traced but the slice size is static, so this stays one
      # gather for the whole batch under vmap.
      return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    images = jax.vmap(crop)(padded, offsets)
  if flip:
    flip_mask = jax.random.bernoulli(flip_key, 0.5, (n,))
    images = jnp.where(flip_mask[:, None, None, None], images[:, :, ::-1, :],
                       images)
  return images


def smooth_labels(labels: ArrayLike, num_classes: int,
                  smoothing: float) -> jax.Array:
  """One-hot targets with label smoothing, as timm and torch define it.

  Args:
    labels: int (N,) class indices.
    num_classes: number of classes C.
    smoothing: mass spread uniformly over all C classes.

  Returns:
    float32 (N, C): `1 - smoothing + smoothing / C` at the label,
    `smoothing / C` elsewhere; rows sum to 1.
  """
  # Computed in Python double precision, then rounded once to float32.
  off_value = smoothing / num_classes
  on_value = 1. - smoothing + off_value
  hot = jnp.asarray(labels)[..., None] == jnp.arange(num_classes)
  return jnp.where(hot, jnp.float32(on_value), jnp.float32(off_value))


def _cutmix_mask(rng: jax.Array, lam: jax.Array, height: int,
                 width: int) -> tuple[jax.Array, jax.Array]:
  """timm's `rand_bbox` as an (H, W) mask, and lambda corrected to its area."""
  cy_key, cx_key = jax.random.split(rng)
  ratio = jnp.sqrt(1. - lam)
  # int() truncation, as timm does.
  cut_h = (height * ratio).astype(jnp.int32)
  cut_w = (width * ratio).astype(jnp.int32)
  cy = jax.random.randint(cy_key, (), 0, height)
  cx = jax.random.randint(cx_key, (), 0, width)
  y0 = jnp.clip(cy - cut_h // 2, 0, height)
  y1 = jnp.clip(cy + cut_h // 2, 0, height)
  x0 = jnp.clip(cx - cut_w // 2, 0, width)
  x1 = jnp.clip(cx + cut_w // 2, 0, width)
  ys = jnp.arange(height)[:, None]
  xs = jnp.arange(width)[None, :]
  mask = (ys >= y0) & (ys < y1) & (xs >= x0) & (xs < x1)
  # The box is clipped at the borders: use the area actually pasted.
  lam_box = 1. - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (height * width)
  return mask, lam_box


def mixup_cutmix(rng: jax.Array, images: ArrayLike, onehot_labels: ArrayLike,
                 mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0,
                 switch_prob: float = 0.5,
                 prob: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """timm-style batch Mixup / CutMix.

  With probability `prob` the batch is mixed with its reversed copy (sample i
  with sample N-1-i): CutMix with probability `switch_prob` when both alphas
  are positive (only the enabled one otherwise), lambda ~ Beta(alpha, alpha).
  CutMix pastes a box of area about (1 - lambda) and then sets lambda to the
  box's true (border-clipped) area. Targets are `lam * y + (1 - lam) * y_rev`.
  The alphas and probabilities are Python numbers (static under jit).

  Args:
    rng: PRNG key.
    images: float (N, H, W, C) batch (normalised or not: mixing is affine).
    onehot_labels: float (N, C) targets, possibly already smoothed.
    mixup_alpha: Beta parameter of Mixup; 0 disables Mixup.
    cutmix_alpha: Beta parameter of CutMix; 0 disables CutMix.
    switch_prob: probability of CutMix when both are enabled.
    prob: probability of mixing this batch at all.

  Returns:
    (images, targets): float32 (N, H, W, C) and (N, C); target rows keep the
    input rows' sums.
  """
  images = jnp.asarray(images).astype(jnp.float32)
  targets = jnp.asarray(onehot_labels).astype(jnp.float32)
  if (mixup_alpha <= 0 and cutmix_alpha <= 0) or prob <= 0:
    return images, targets
  _, height, width, _ = images.shape
  apply_key, switch_key, mix_key, cut_key, box_key = jax.random.split(rng, 5)

  apply = jax.random.uniform(apply_key) < prob
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  one = jnp.float32(1.)
  lam_mixup = (jax.random.beta(mix_key, mixup_alpha, mixup_alpha)
               if mixup_alpha > 0 else one)
  lam_cut = (jax.random.beta(cut_key, cutmix_alpha, cutmix_alpha)
             if cutmix_alpha > 0 else one)

  # Both candidates are computed and one is selected: the choice is traced,
  # and the extra elementwise work is negligible next to the model.
  partner = images[::-1]
  mask, lam_box = _cutmix_mask(box_key, lam_cut, height, width)
  cutmixed = jnp.where(mask[None, :, :, None], partner, images)
  mixed = lam_mixup * images + (1. - lam_mixup) * partner
  lam = jnp.where(apply, jnp.where(use_cutmix, lam_box, lam_mixup), one)
  out = jnp.where(apply, jnp.where(use_cutmix, cutmixed, mixed), images)
  return out, lam * targets + (1. - lam) * targets[::-1]


def _get(cfg: Any, name: str) -> Any:
  return cfg.get(name, DEFAULTS[name]) if cfg is not None else DEFAULTS[name]


def augment_batch(rng: jax.Array, images: ArrayLike, labels: ArrayLike,
                  aug_cfg: Any, mean: ArrayLike, std: ArrayLike,
                  num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Training augmentation of one (per-device) batch.

  Args:
    rng: PRNG key, e.g. `fold_in(fold_in(base, step), global_shard_id)`.
    images: uint8 (N, H, W, C).
    labels: int (N,).
    aug_cfg: ConfigDict/dict with `crop_padding` (4), `flip` (True),
      `mixup_alpha` (0.8), `cutmix_alpha` (1.0), `switch_prob` (0.5),
      `mix_prob` (1.0), `label_smoothing` (0.1); missing fields take these
      defaults. Read at trace time, so they must be Python values.
    mean: (C,) per-channel mean in [0, 1] units.
    std: (C,) per-channel std in [0, 1] units.
    num_classes: number of classes C.

  Returns:
    (images, targets): float32 (N, H, W, C) normalised images and float32
    (N, C) soft targets whose rows sum to 1.
  """
  crop_key, mix_key = jax.random.split(rng)
  x = random_crop_flip(crop_key, images, padding=int(_get(aug_cfg, "crop_padding")),
                       flip=bool(_get(aug_cfg, "flip")))
  x = normalize(x, mean, std)
  y = smooth_labels(labels, num_classes, float(_get(aug_cfg, "label_smoothing")))
  return mixup_cutmix(
      mix_key, x, y,
      mixup_alpha=float(_get(aug_cfg, "mixup_alpha")),
      cutmix_alpha=float(_get(aug_cfg, "cutmix_alpha")),
      switch_prob=float(_get(aug_cfg, "switch_prob")),
      prob=float(_get(aug_cfg, "mix_prob")))


def eval_batch(images: ArrayLike, mean: ArrayLike, std: ArrayLike) -> jax.Array:
  """Evaluation preprocessing: normalisation only.

  Args:
    images: uint8 (N, H, W, C).
    mean: (C,) per-channel mean in [0, 1] units.
    std: (C,) per-channel std in [0, 1] units.

  Returns:
    float32 (N, H, W, C).
  """
  return normalize(images, mean, std)
