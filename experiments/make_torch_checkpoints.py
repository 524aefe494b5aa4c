"""Writes, with torch, training checkpoints in the formats of the two original code bases.

`msdfuse-import-torch` reads them with ``torch.load(..., weights_only=True)``; tests/test_interop.py makes
them with the functions below (torch installed) and imports them. The model weights are those of the
reference MSDNet anytime-7 CIFAR-10 model (../shared/reference/msdnet_anytime_cifar10_seed0.npz), as torch
tensors.

* MSDNet-PyTorch (kalviny/MSDNet-PyTorch at f654595, ``main.py``): the model is wrapped in
  ``nn.DataParallel`` and every epoch saves ``{"epoch", "arch", "state_dict": model.state_dict(),
  "best_prec1", "optimizer": optimizer.state_dict()}``, so the weights carry DataParallel's ``module.``
  prefix; the optimizer is SGD (lr 0.1, momentum 0.9, weight decay 1e-4); ``best_prec1`` is a Python float.
* L2W-DEN (LeapLabTHU/L2W-DEN at c49d575, ``tools/main_cifar_DDP.py``): saves ``{"epoch": epoch + 1, "arch",
  "state_dict": model.module.state_dict(), "optimizer", "best_prec1", "is_best", "meta_state_dict":
  meta_net.module.state_dict(), "meta_optimizer"}``: no ``module.`` prefix (the DistributedDataParallel
  wrapper is taken off), a meta-network (an MLP: ``first_hidden_layer.fc``, ``output_layer``; 100 hidden units
  for the 7 exits' losses) and its Adam optimizer (lr 1e-5).

Both optimizers have taken one step, so their state holds momentum / moment tensors as a real checkpoint's
does. `pickled_checkpoint` adds, to the MSDNet-PyTorch format, an object whose unpickling creates a file:
what a checkpoint that runs code looks like to a loader.

  /work/venv_torch/bin/python experiments/make_torch_checkpoints.py --out=/tmp/ckpts
  # writes /tmp/ckpts/msdnet_pytorch.pth.tar and /tmp/ckpts/l2w_den.pth.tar
"""

from __future__ import annotations

import argparse
import builtins
import pathlib
from collections import OrderedDict

import numpy as np
import torch

REPO = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = REPO.parent / "shared" / "reference" / "msdnet_anytime_cifar10_seed0.npz"
NUM_EXITS = 7  # the reference model's
BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def reference_state_dict(path: pathlib.Path = REFERENCE) -> "OrderedDict[str, torch.Tensor]":
  """The reference model's state_dict as torch tensors, in the file's order (without ``input``/``logits``)."""
  with np.load(path) as data:
    return OrderedDict((k, torch.from_numpy(data[k].copy()))
                       for k in data.files if k not in ("input", "logits"))


def _stepped_optimizer_state(tensors: list[torch.Tensor], make_optimizer) -> dict:
  """``optimizer.state_dict()`` after one step on `tensors` (as parameters) with a fixed gradient."""
  params = [torch.nn.Parameter(t.detach().clone().float()) for t in tensors]
  optimizer = make_optimizer(params)
  for p in params:
    p.grad = torch.full_like(p, 1e-3)
  optimizer.step()
  return optimizer.state_dict()


def _sgd_state(state_dict: "OrderedDict[str, torch.Tensor]") -> dict:
  trainable = [v for k, v in state_dict.items() if not k.endswith(BUFFERS)]
  return _stepped_optimizer_state(
      trainable, lambda ps: torch.optim.SGD(ps, 0.1, momentum=0.9, weight_decay=1e-4))


def msdnet_pytorch_checkpoint(state_dict: "OrderedDict[str, torch.Tensor]", epoch: int = 299) -> dict:
  """What MSDNet-PyTorch's ``main.py`` saves after `epoch` (0-based)."""
  return {
      "epoch": epoch,
      "arch": "msdnet",
      "state_dict": OrderedDict((f"module.{k}", v) for k, v in state_dict.items()),
      "best_prec1": 94.21,
      "optimizer": _sgd_state(state_dict),
  }


def _meta_net_state(hidden: int = 100, seed: int = 0) -> "OrderedDict[str, torch.Tensor]":
  """An L2W-DEN meta-network's state_dict (one hidden layer, inputs and outputs one per exit)."""
  generator = torch.Generator().manual_seed(seed)
  shapes = {"first_hidden_layer.fc.weight": (hidden, NUM_EXITS), "first_hidden_layer.fc.bias": (hidden,),
            "output_layer.weight": (NUM_EXITS, hidden), "output_layer.bias": (NUM_EXITS,)}
  return OrderedDict((k, torch.randn(s, generator=generator) * 0.1) for k, s in shapes.items())


def l2w_den_checkpoint(state_dict: "OrderedDict[str, torch.Tensor]", epoch: int = 299) -> dict:
  """What L2W-DEN's ``tools/main_cifar_DDP.py`` saves after `epoch` (0-based)."""
  meta = _meta_net_state()
  return {
      "epoch": epoch + 1,
      "arch": "msdnet",
      "state_dict": OrderedDict(state_dict),
      "optimizer": _sgd_state(state_dict),
      "best_prec1": 94.43,
      "is_best": True,
      "meta_state_dict": meta,
      "meta_optimizer": _stepped_optimizer_state(
          list(meta.values()), lambda ps: torch.optim.Adam(ps, lr=1e-5, weight_decay=0.0)),
  }


class CreatesFileWhenUnpickled:
  """Pickles as a call of ``open(path, "w")``: unpickling it creates `path`, as any code could run there."""

  def __init__(self, path: str):
    self.path = path

  def __reduce__(self):
    return (builtins.open, (self.path, "w"))


def pickled_checkpoint(state_dict: "OrderedDict[str, torch.Tensor]", marker: str) -> dict:
  """The MSDNet-PyTorch format plus one entry whose unpickling creates the file `marker`."""
  return {**msdnet_pytorch_checkpoint(state_dict), "extra": CreatesFileWhenUnpickled(marker)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--out", required=True, help="directory to write the .pth.tar files to")
  parser.add_argument("--reference", default=str(REFERENCE), help="the reference .npz (weights)")
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  state_dict = reference_state_dict(pathlib.Path(args.reference))
  for name, checkpoint in (("msdnet_pytorch", msdnet_pytorch_checkpoint(state_dict)),
                           ("l2w_den", l2w_den_checkpoint(state_dict))):
    torch.save(checkpoint, out / f"{name}.pth.tar")
    print(f"wrote {out / f'{name}.pth.tar'}")


if __name__ == "__main__":
  main()
