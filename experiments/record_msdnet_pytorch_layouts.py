"""Records MSDNet-PyTorch's own state_dict layout and outputs for several configurations: the fixture of
tests/test_interop.py's mapping test (tests/fixtures/msdnet_pytorch_layouts.npz).

The converter derives its names from this project's layer plan; a test that builds the state_dict names with
that same mapping would pass whatever the mapping is. This script takes them from the reference instead: it
imports ``models/msdnet.py`` from a checkout of kalviny/MSDNet-PyTorch (nothing of it is copied here), builds
the model for each case of `CASES`, and stores, per case, every state_dict name with its shape (in the
reference's order) and the eval-mode logits of all exits for a fixed input, with the weights filled by
`fill_weights` (numpy only, so that the test makes the same weights without torch). The test converts those
weights and compares the logits, which also catches two same-shaped tensors swapped by the mapping.

  git clone https://github.com/kalviny/MSDNet-PyTorch /tmp/MSDNet-PyTorch   # f654595
  python experiments/record_msdnet_pytorch_layouts.py --msdnet_pytorch=/tmp/MSDNet-PyTorch  # with torch

The checked-in fixture was made with kalviny/MSDNet-PyTorch at f654595 and torch 2.13.0 (CPU build, x86-64).
Keys, for each case name C: ``C/names`` (str array), ``C/shapes`` (a JSON string: a list of shapes),
``C/input`` uint8 NHWC pixels (the model reads ``input / 255`` as float32, NCHW in torch), ``C/logits``
float32 (exits, N, classes). ``meta`` is a JSON string with the cases, the torch version and the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "msdnet_pytorch_layouts.npz"

# name -> (this project's preset and overrides, MSDNet-PyTorch's arguments, images, image size). The CIFAR
# classifier of MSDNet-PyTorch is 128 channels wide (hard-coded), hence head_width=128 on the JAX side.
_CIFAR = dict(nBlocks=3, stepmode="even", step=2, base=2, nChannels=4, growthRate=2, grFactor="1-2-4",
              bnFactor="1-2-4", prune="max", reduction=0.5, bottleneck=True, data="cifar10")
CASES = {
    "lin_grow": (("msdnet_tiny", dict(step_mode="lin_grow", step=1, base=1, head_width=128)),
                 dict(_CIFAR, stepmode="lin_grow", step=1, base=1), 2, 32),
    "no_bottleneck": (("msdnet_tiny", dict(bottleneck=False, head_width=128)),
                      dict(_CIFAR, bottleneck=False), 2, 32),
    # (Two scales on CIFAR is no case: the reference's head would then see 16x16 maps, 512 features.)
    "widths": (("msdnet_tiny", dict(n_blocks=4, n_channels=6, growth_rate=4, bn_factor=(1, 1, 2),
                                    reduction=0.25, head_width=128)),
               dict(_CIFAR, nBlocks=4, nChannels=6, growthRate=4, bnFactor="1-1-2", reduction=0.25), 2, 32),
    "imagenet_step3": (("msdnet_imagenet_tiny", dict(step=3, base=3)),
                       dict(nBlocks=3, stepmode="even", step=3, base=3, nChannels=8, growthRate=4,
                            grFactor="1-2-4-4", bnFactor="1-2-4-4", prune="max", reduction=0.5,
                            bottleneck=True, data="ImageNet"), 1, 224),
}


def num_classes(torch_args: dict) -> int:
  return 1000 if torch_args["data"] == "ImageNet" else int(torch_args["data"][len("cifar"):])


def fill_weights(names: list[str], shapes: list[tuple[int, ...]], seed: int = 0) -> dict[str, np.ndarray]:
  """Seeded float32 values for every state_dict entry, of moderate size so that the logits are O(1):
  He-uniform conv and Linear weights, BatchNorm scales and variances in [0.5, 1.5], biases and means in
  [-0.2, 0.2], step counters 0."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in zip(names, shapes):
    shape = tuple(shape)
    if name.endswith("num_batches_tracked"):
      out[name] = np.zeros(shape, np.int64)
    elif name.endswith(".weight") and len(shape) >= 2:
      bound = np.sqrt(6.0 / int(np.prod(shape[1:])))
      out[name] = rng.uniform(-bound, bound, shape).astype(np.float32)
    elif name.endswith((".running_var", ".weight")):
      out[name] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    else:
      out[name] = rng.uniform(-0.2, 0.2, shape).astype(np.float32)
  return out


def case_input(name: str, count: int, size: int) -> np.ndarray:
  """The case's uint8 NHWC images (seeded)."""
  seed = sorted(CASES).index(name) + 1
  return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def _torch_model(msdnet_pytorch: str, torch_args: dict):
  sys.path.insert(0, os.path.abspath(msdnet_pytorch))
  # The module itself: models/__init__.py rebinds the name `models.msdnet` to the MSDNet class.
  msdnet = importlib.import_module("models.msdnet")
  ns = types.SimpleNamespace(**torch_args)
  ns.grFactor = list(map(int, torch_args["grFactor"].split("-")))  # as MSDNet-PyTorch's args.py parses them
  ns.bnFactor = list(map(int, torch_args["bnFactor"].split("-")))
  ns.nScales = len(ns.grFactor)
  with contextlib.redirect_stdout(io.StringIO()):  # it prints its layer plan
    return msdnet.MSDNet(ns)


def main() -> None:
  import torch  # pylint: disable=import-outside-toplevel
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--msdnet_pytorch", required=True, help="checkout of kalviny/MSDNet-PyTorch")
  parser.add_argument("--out", default=str(DEFAULT_OUT))
  args = parser.parse_args()
  arrays = {}
  for name, (_, torch_args, count, size) in CASES.items():
    model = _torch_model(args.msdnet_pytorch, torch_args).eval()
    state = model.state_dict()
    names, shapes = list(state), [tuple(v.shape) for v in state.values()]
    values = fill_weights(names, shapes)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in values.items()})
    images = case_input(name, count, size)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
      logits = np.stack([y.numpy() for y in model(x)])
    arrays[f"{name}/names"] = np.array(names)
    arrays[f"{name}/shapes"] = np.array(json.dumps(shapes))
    arrays[f"{name}/input"] = images
    arrays[f"{name}/logits"] = logits.astype(np.float32)
    print(f"{name}: {len(names)} entries, logits {logits.shape}, max |logit| {np.abs(logits).max():.3g}")
  commit = subprocess.run(["git", "-C", args.msdnet_pytorch, "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True, check=False).stdout.strip() or None
  arrays["meta"] = np.array(json.dumps({"cases": {k: v[1] for k, v in CASES.items()},
                                        "torch": torch.__version__, "msdnet_pytorch_commit": commit}))
  np.savez_compressed(args.out, **arrays)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e3:.0f} KB)")


if __name__ == "__main__":
  main()
