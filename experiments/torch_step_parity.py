"""Records K training steps of MSDNet-PyTorch on fixed CIFAR-10 batches: tests/test_step_parity.py's fixture.

Run by hand, with torch installed (the checked-in fixture was made with torch 2.13.0, CPU build, one thread):

  python experiments/torch_step_parity.py --msdnet_pytorch=/tmp/MSDNet-PyTorch \
      --out=../shared/reference/step_parity.npz

``--msdnet_pytorch`` is a checkout of kalviny/MSDNet-PyTorch; its ``models/msdnet.py`` is imported from there
(nothing of it is copied here). The model is the ``msdnet_tiny`` preset's architecture (3 blocks of 2 layers,
3 scales, 4 channels, growth 2, bottleneck, prune max, reduction 0.5).

The head width: MSDNet-PyTorch's CIFAR classifier hard-codes 128 channels, which would make the heads 97 %
of this tiny model's parameters and the fixture 64 MB. By default (``--head_width=8``, the preset's own
width) the script therefore builds the torch heads with `_build_classifier_cifar` overridden in a subclass
to the same layers (MSDNet-PyTorch's own ConvBasic 3x3/2, ConvBasic 3x3/2, AvgPool2d(2), ClassifierModule)
at width 8, built in the same order; ``--head_width=128`` keeps the unmodified class. The width is recorded
in the fixture's config and the test builds the JAX model with it.

Each case starts from the same initial weights and runs K steps of ``torch.optim.SGD`` on the same K
un-augmented batches (the first K * B images of the training set, normalised with MSDNet's published
CIFAR-10 statistics), in ``model.train()`` mode, with the loss ``sum over exits of CrossEntropyLoss()``
(batch mean) and the per-step cosine learning rate ``lr_t = 0.5 * lr * (1 + cos(pi * t / T))``:

* ``sgd_decay_all``: momentum 0.9, weight decay 1e-4 on every parameter;
* ``nesterov_decay_nd``: Nesterov momentum 0.9, weight decay 1e-4 on parameters of rank > 1 only.

The fixture (a compressed npz of 13 arrays: each state_dict is packed into one float32 vector, because one
npz member per tensor would cost more in zip headers than the data) holds:

* ``config``: JSON: model preset and overrides, recipe, ``state_layout`` ([torch name, shape] of every
  state_dict entry, parameters and BatchNorm running statistics, in packing order), ``param_names`` (the
  parameters, in the order of ``named_parameters()``, which packs gradients and momenta), ``bn_count`` (the
  elements per channel N * H * W that each BatchNorm normalises over), the torch version and an
  initialisation report. Tensors keep torch's layouts (conv OIHW, Linear (out, in));
* ``images`` uint8 (K, B, 32, 32, 3) NHWC, ``labels`` int32 (K, B), ``lr`` float64 (K,);
* ``init``: the initial state_dict (packed);
* ``<case>/losses`` float32 (K, exits): every exit's loss at step t, before that step's update;
* ``<case>/grads`` (K, P): ``p.grad`` of steps 1..K (the loss gradient, without weight decay; step 1's is
  the same in both cases, which the script checks); ``<case>/state`` (K, S): the state_dict after steps
  1..K; ``<case>/momentum`` (K, P): the SGD momentum buffers after steps 1..K.

The states after every step (not only after K) let the test start each of its K steps from torch's state:
free-running trajectories of this tiny network at lr 0.1 amplify float32 rounding differences chaotically
(a ReLU input within rounding of 0 changes sign and shifts a whole layer's gradient by ~1 / sqrt(N * H * W)),
so K-step parity is only meaningful step by step.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pathlib
import sys
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar-10-python-subset.tar.gz"

# The JAX side: build_model(PRESET, 10, head_width=...) must have exactly the torch model's architecture.
PRESET = "msdnet_tiny"
TORCH_HEAD_WIDTH = 128  # MSDNet-PyTorch's CIFAR classifier width (hard-coded in _build_classifier_cifar)
TORCH_ARGS = dict(nBlocks=3, stepmode="even", step=2, base=2, nChannels=4, growthRate=2, grFactor="1-2-4",
                  bnFactor="1-2-4", prune="max", reduction=0.5, bottleneck=True, data="cifar10")
# MSDNet-PyTorch's published CIFAR-10 normalisation (dataloader.py).
MEAN = (0.4914, 0.4824, 0.4467)
STD = (0.2471, 0.2435, 0.2616)
CASES = {
    "sgd_decay_all": dict(nesterov=False, decay_1d=True),
    "nesterov_decay_nd": dict(nesterov=True, decay_1d=False),
}


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--msdnet_pytorch", required=True, help="checkout of kalviny/MSDNet-PyTorch")
  p.add_argument("--out", default=str(REPO.parent / "shared" / "reference" / "step_parity.npz"),
                 help="the fixture; it belongs in ../shared/reference, beside the other reference files")
  p.add_argument("--data", default=str(DEFAULT_DATA), help="cifar-10-python(-subset).tar.gz")
  p.add_argument("--steps", type=int, default=5, help="K, steps recorded")
  p.add_argument("--total_steps", type=int, default=10, help="T, the length of the cosine schedule")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--momentum", type=float, default=0.9)
  p.add_argument("--weight_decay", type=float, default=1e-4)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--head_width", type=int, default=8,
                 help=f"classifier width; {TORCH_HEAD_WIDTH}: MSDNet-PyTorch's class unmodified (64 MB "
                 "fixture)")
  return p.parse_args()


def torch_namespace(args: dict) -> types.SimpleNamespace:
  """MSDNet's argparse namespace, with grFactor/bnFactor parsed as main.py does."""
  ns = types.SimpleNamespace(**args)
  ns.grFactor = list(map(int, args["grFactor"].split("-")))
  ns.bnFactor = list(map(int, args["bnFactor"].split("-")))
  ns.nScales = len(ns.grFactor)
  return ns


def build_torch_model(msdnet_pytorch: str, seed: int, head_width: int):
  """MSDNet-PyTorch's MSDNet, imported from the checkout; heads of `head_width` channels (see above)."""
  import contextlib
  import io

  import torch
  import torch.nn as nn
  sys.path.insert(0, os.path.abspath(msdnet_pytorch))
  # The module itself: models/__init__.py rebinds the name `models.msdnet` to the MSDNet class.
  msdnet = importlib.import_module("models.msdnet")
  cls = msdnet.MSDNet
  if head_width != TORCH_HEAD_WIDTH:
    class NarrowHeadMSDNet(msdnet.MSDNet):
      """MSDNet with its CIFAR classifier's two 128-channel ConvBasic layers at `head_width` channels."""

      def _build_classifier_cifar(self, nIn, num_classes):  # pylint: disable=invalid-name
        conv = nn.Sequential(msdnet.ConvBasic(nIn, head_width, kernel=3, stride=2, padding=1),
                             msdnet.ConvBasic(head_width, head_width, kernel=3, stride=2, padding=1),
                             nn.AvgPool2d(2))
        return msdnet.ClassifierModule(conv, head_width, num_classes)

    cls = NarrowHeadMSDNet
  torch.manual_seed(seed)
  with contextlib.redirect_stdout(io.StringIO()):  # it prints its layer plan
    return cls(torch_namespace(TORCH_ARGS))


def init_report(model) -> dict:
  """Which initialisation the torch model really has: MSDNet's `_init_weights` or PyTorch's defaults.

  `MSDNet.__init__` calls `_init_weights` on the elements of `self.blocks` (and their children one level
  down: MSDNFirstLayer / MSDNLayer / ParallelModule) and on the ClassifierModules, none of which is a
  Conv2d / BatchNorm2d / Linear itself; this measures what that leaves.
  """
  import torch.nn as nn
  convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
  big = [(n, m) for n, m in convs if m.weight.numel() >= 10000]
  rows = []
  for name, m in big:
    k, out = m.kernel_size[0] * m.kernel_size[1], m.out_channels
    fan_in = k * m.in_channels
    rows.append(dict(name=name, numel=m.weight.numel(), std=float(m.weight.std()),
                     msdnet_init_std=math.sqrt(2.0 / (k * out)),
                     torch_default_std=1.0 / math.sqrt(3.0 * fan_in),
                     max_abs=float(m.weight.abs().max()), torch_default_bound=1.0 / math.sqrt(fan_in)))
  ratios = [float(m.weight.std()) * math.sqrt(3.0 * m.kernel_size[0] * m.kernel_size[1] * m.in_channels)
            for _, m in convs]
  linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
  bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
  return dict(
      large_convs=rows,
      conv_std_over_torch_default_std=dict(min=min(ratios), max=max(ratios), count=len(ratios)),
      linear_bias_all_zero=all(bool((m.bias == 0).all()) for m in linears),
      linear_bias_max_abs=max(float(m.bias.abs().max()) for m in linears),
      bn_weight_all_one=all(bool((m.weight == 1).all()) for m in bns),
      bn_bias_all_zero=all(bool((m.bias == 0).all()) for m in bns))


def bn_counts(model, x) -> dict[str, int]:
  """Elements per channel (N * H * W) each BatchNorm2d normalises over, from one forward pass."""
  import torch
  import torch.nn as nn
  counts, hooks = {}, []
  for name, m in model.named_modules():
    if isinstance(m, nn.BatchNorm2d):
      hooks.append(m.register_forward_hook(
          lambda mod, inp, out, name=name: counts.__setitem__(name, int(inp[0].numel() // inp[0].shape[1]))))
  state = {k: v.clone() for k, v in model.state_dict().items()}
  with torch.no_grad():
    model.train()
    model(x)
  model.load_state_dict(state)  # the pass above moved the running statistics
  for h in hooks:
    h.remove()
  return counts


def load_batches(path: str, steps: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
  """The first steps * batch training images (uint8 NHWC) and labels, in the official order."""
  from msdfuse_jax.data import sources  # pylint: disable=import-outside-toplevel
  raw = sources.read_python_archive("cifar10", path)
  n = steps * batch
  images = raw.train_images[:n].reshape(steps, batch, 32, 32, 3)
  labels = raw.train_labels[:n].astype(np.int32).reshape(steps, batch)
  return np.ascontiguousarray(images), labels


def normalise(images_uint8: np.ndarray):
  """uint8 NHWC -> float32 NCHW ``(x / 255 - mean) / std``, in float32 as the JAX side computes it."""
  import torch
  x = images_uint8.astype(np.float32) / np.float32(255.0)
  x = (x - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def pack(values: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
  """The arrays `values[name]` for `names`, flattened and concatenated into one float32 vector."""
  return np.concatenate([values[n].astype(np.float32).ravel() for n in names])


def state_dict_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()
          if not k.endswith("num_batches_tracked")}


def run_case(model, init_state, images, labels, lrs, *, nesterov, decay_1d, momentum, weight_decay):
  """K SGD steps from `init_state`: losses (K, exits) and, per step, (grads, state_dict, momenta after it)."""
  import torch
  model.load_state_dict(init_state)
  model.train()
  named = list(model.named_parameters())
  if decay_1d:
    groups = [{"params": [p for _, p in named], "weight_decay": weight_decay}]
  else:
    groups = [{"params": [p for _, p in named if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.ndim <= 1], "weight_decay": 0.0}]
  opt = torch.optim.SGD(groups, lr=lrs[0], momentum=momentum, nesterov=nesterov)
  criterion = torch.nn.CrossEntropyLoss()
  losses, steps = [], []
  for t in range(len(images)):
    x = normalise(images[t])
    y = torch.from_numpy(labels[t].astype(np.int64))
    outputs = model(x)
    per_exit = [criterion(o, y) for o in outputs]
    loss = sum(per_exit)
    opt.zero_grad()
    loss.backward()
    losses.append([float(l.detach()) for l in per_exit])
    grads = {n: p.grad.detach().numpy().copy() for n, p in named}
    for g in opt.param_groups:
      g["lr"] = float(lrs[t])
    opt.step()
    momenta = {n: opt.state[p]["momentum_buffer"].detach().numpy().copy() for n, p in named}
    steps.append((grads, state_dict_numpy(model), momenta))
  return np.asarray(losses, np.float32), steps


def main() -> None:
  args = parse_args()
  import torch
  torch.set_num_threads(1)
  # What initialisation MSDNet-PyTorch's (unmodified) class really ends up with.
  report = init_report(build_torch_model(args.msdnet_pytorch, args.seed, TORCH_HEAD_WIDTH))
  print(json.dumps(report, indent=1))
  model = build_torch_model(args.msdnet_pytorch, args.seed, args.head_width)
  overrides = {"head_width": args.head_width}

  init_state = {k: v.clone() for k, v in model.state_dict().items()}
  init_np = state_dict_numpy(model)

  # Fail here, not in CI, when the config does not fit the JAX model.
  from msdfuse_jax import models  # pylint: disable=import-outside-toplevel
  from msdfuse_jax.interop import torch_msdnet  # pylint: disable=import-outside-toplevel
  torch_msdnet.convert_state_dict(models.build_model(PRESET, 10, **overrides), init_np)

  images, labels = load_batches(args.data, args.steps, args.batch_size)
  lrs = np.asarray([0.5 * args.lr * (1 + math.cos(math.pi * t / args.total_steps))
                    for t in range(args.steps)], np.float64)
  counts = bn_counts(model, normalise(images[0]))

  arrays: dict[str, np.ndarray] = {"images": images, "labels": labels, "lr": lrs}
  state_names = list(init_np)
  param_names = [n for n, _ in model.named_parameters()]
  arrays["init"] = pack(init_np, state_names)
  grads_ref = None
  for case, opts in CASES.items():
    losses, steps = run_case(model, init_state, images, labels, lrs, momentum=args.momentum,
                             weight_decay=args.weight_decay, **opts)
    if grads_ref is None:
      grads_ref = steps[0][0]
    else:  # p.grad excludes weight decay: the first step's gradient must be the same in every case
      for k, v in steps[0][0].items():
        np.testing.assert_array_equal(v, grads_ref[k], err_msg=f"step-1 gradient of {k} differs by case")
    arrays[f"{case}/losses"] = losses
    arrays[f"{case}/grads"] = np.stack([pack(grads, param_names) for grads, _, _ in steps])
    arrays[f"{case}/state"] = np.stack([pack(state, state_names) for _, state, _ in steps])
    arrays[f"{case}/momentum"] = np.stack([pack(momenta, param_names) for _, _, momenta in steps])
    print(f"{case}: losses per step and exit\n{losses}")

  config = dict(
      preset=PRESET, overrides=overrides, head_width=args.head_width,
      torch_head_modified=args.head_width != TORCH_HEAD_WIDTH, num_classes=10, torch_args=TORCH_ARGS,
      mean=MEAN, std=STD, steps=args.steps, total_steps=args.total_steps, batch_size=args.batch_size,
      learning_rate=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed,
      cases={k: dict(v) for k, v in CASES.items()}, bn_momentum=0.1, bn_count=counts,
      state_layout=[[k, list(v.shape)] for k, v in init_np.items()], param_names=param_names,
      data=os.path.basename(args.data), torch_version=torch.__version__, init_report=report)
  arrays["config"] = np.asarray(json.dumps(config, sort_keys=True))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(arrays)} arrays, torch {torch.__version__})")


if __name__ == "__main__":
  main()
