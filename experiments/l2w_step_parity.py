"""Records K iterations of L2W-DEN's own training loop on fixed CIFAR-10 batches: the L2W parity fixture.

Run by hand, with torch installed (never a requirement of the project), on a checkout of LeapLabTHU/L2W-DEN:

  python experiments/l2w_step_parity.py --l2w_den=/tmp/L2W-DEN --out=../shared/reference/l2w_parity.npz

The loop is the authors' ``train()`` of ``tools/main_cifar_DDP.py`` itself, imported from the checkout and
called on K fixed batches (one epoch of K iterations; nothing of it is copied here), with their
``MLP_tanh`` meta network, ``MetaSGD`` look-ahead, ``calc_target_probs`` and their optimisers
(``torch.optim.SGD(lr, momentum, weight_decay)``: no Nesterov, decay on every parameter;
``torch.optim.Adam(meta_lr, weight_decay=meta_weight_decay)``). To run it on a CPU without their data,
DistributedDataParallel or GPUs, the script only: makes ``.cuda()`` the identity, stubs the modules the loop
does not use when they are missing (torchvision, pandas), wraps the classifier in a module with a
``.module`` attribute (as DDP would), and records what the loop computes through hooks: the meta network's
inputs and outputs (forward hooks), the meta loss (their ``AverageMeter`` named MetaLoss), the meta
gradients and parameters (around ``meta_optimizer.step``), the classifier's parameters (around
``optimizer.step``) and both optimisers' states after every iteration.

The model is the ``msdnet_tiny`` preset's architecture built with the authors' ``models/msdnet.py`` (their
MSDNet is MSDNet-PyTorch's), with the 8-channel heads of experiments/torch_step_parity.py
(``--head_width``); un-augmented batches, the first K * B images of the training set, normalised with their
CIFAR-10 statistics. Their learning rates are per iteration, ``0.5 lr (1 + cos(pi i / (epochs K)))``, the
same for both halves of an iteration (``--epochs`` sets the schedule's length).

The fixture (a compressed npz of 18 arrays, 1.9 MB with the defaults: K = 5 iterations of batch 16,
schedules over 2 epochs of 5, hidden size 500; made with torch 2.13.0, CPU build, one thread) holds, with T = 2K turns (two halves per
iteration: turn 2i trains on the first half of batch i with the second as meta half, turn 2i + 1 the other
way round):

* ``config``: JSON: preset, head width, the authors' arguments, ``state_layout`` / ``param_names`` (the
  classifier's state_dict and parameters in packing order), ``meta_layout`` (the meta network's parameters),
  the torch version;
* ``images`` uint8 (K, B, 32, 32, 3), ``labels`` int32 (K, B), ``lr`` and ``meta_lr`` float64 (K,);
* ``init`` (classifier state_dict, packed) and ``meta_init`` (meta parameters, packed);
* per turn: ``meta_input`` (T, B/2, in) and ``meta_raw`` (T, B/2, K), the meta network's input and output
  in the look-ahead; ``weight_raw`` (T, B/2, K), its output for the real step (after the meta update);
  ``meta_loss`` (T,); ``meta_grads`` and ``meta_params`` (T, Pm), the gradient of the Adam step and the
  parameters after it; ``state`` (T, S), the classifier's state_dict after its SGD step;
* per iteration: ``momentum`` (K, P), SGD's buffers; ``adam_m``, ``adam_v`` (K, Pm), ``adam_step`` (K,).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.machinery
import io
import json
import os
import pathlib
import sys
import types

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "experiments"))
import torch_step_parity as tsp  # noqa: E402  (the tiny MSDNet, the batches, packing)

DEFAULT_DATA = tsp.DEFAULT_DATA


def parse_args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--l2w_den", required=True, help="checkout of LeapLabTHU/L2W-DEN")
  p.add_argument("--out", default=str(REPO.parent / "shared" / "reference" / "l2w_parity.npz"),
                 help="the fixture; it belongs in ../shared/reference")
  p.add_argument("--data", default=str(DEFAULT_DATA), help="cifar-10-python(-subset).tar.gz")
  p.add_argument("--steps", type=int, default=5, help="K, iterations recorded")
  p.add_argument("--epochs", type=int, default=2, help="the schedules' length in epochs of K iterations")
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--lr", type=float, default=0.1)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--head_width", type=int, default=8)
  p.add_argument("--meta_net_hidden_size", type=int, default=500)
  p.add_argument("--meta_net_num_layers", type=int, default=1)
  p.add_argument("--meta_net_input_type", default="loss", choices=["loss", "conf", "both"])
  p.add_argument("--constraint_dimension", default="col", choices=["row", "col", "mat"])
  p.add_argument("--epsilon", type=float, default=0.8)
  p.add_argument("--target_p_index", type=int, default=15)
  p.add_argument("--meta_lr", type=float, default=1e-4)
  p.add_argument("--meta_weight_decay", type=float, default=1e-4)
  return p.parse_args()


def import_authors_loop(checkout: str, args: argparse.Namespace):
  """tools/main_cifar_DDP.py of the checkout, imported with the command line its argparse reads."""
  import torch
  import torch.nn as nn
  for name in ("torchvision", "torchvision.transforms", "torchvision.datasets", "pandas"):
    try:
      importlib.import_module(name)
    except ImportError:  # imported at the top of their script, used only by what is not called here
      stub = types.ModuleType(name)
      stub.__spec__ = importlib.machinery.ModuleSpec(name, None)  # torch's import checks look for one
      sys.modules[name] = stub
  if "torchvision" in sys.modules and not hasattr(sys.modules["torchvision"], "transforms"):
    sys.modules["torchvision"].transforms = sys.modules["torchvision.transforms"]
    sys.modules["torchvision"].datasets = sys.modules["torchvision.datasets"]
  torch.Tensor.cuda = lambda self, *a, **k: self
  nn.Module.cuda = lambda self, *a, **k: self
  sys.path[:0] = [os.path.abspath(checkout), os.path.abspath(os.path.join(checkout, "tools"))]
  ta = tsp.TORCH_ARGS
  sys.argv = ["main_cifar_DDP.py", "--data", "cifar10", "--arch", "msdnet", "--nBlocks", str(ta["nBlocks"]),
              "--stepmode", ta["stepmode"], "--step", str(ta["step"]), "--base", str(ta["base"]),
              "--nChannels", str(ta["nChannels"]), "--growthRate", str(ta["growthRate"]),
              "--grFactor", ta["grFactor"], "--bnFactor", ta["bnFactor"], "--prune", ta["prune"],
              "--reduction", str(ta["reduction"]), "--epochs", str(args.epochs), "--batch-size",
              str(args.batch_size), "--lr", str(args.lr), "--lr-type", "cosine", "--print-freq", "1000000",
              "--meta_net_hidden_size", str(args.meta_net_hidden_size),
              "--meta_net_num_layers", str(args.meta_net_num_layers), "--meta_interval", "1",
              "--meta_lr", str(args.meta_lr), "--meta_weight_decay", str(args.meta_weight_decay),
              "--epsilon", str(args.epsilon), "--target_p_index", str(args.target_p_index),
              "--meta_net_input_type", args.meta_net_input_type,
              "--constraint_dimension", args.constraint_dimension]
  return importlib.import_module("main_cifar_DDP")


def numpy_of(tensors) -> list[np.ndarray]:
  return [t.detach().cpu().numpy().astype(np.float32).copy() for t in tensors]


def main() -> None:
  args = parse_args()
  import torch
  import torch.nn as nn
  torch.set_num_threads(1)
  loop = import_authors_loop(args.l2w_den, args)
  a = loop.args
  a.num_exits, a.gpu, a.world_size = tsp.TORCH_ARGS["nBlocks"], 0, 1
  a.print_custom = lambda *_: None

  # Their train() builds its look-ahead network as getattr(models, args.arch)(args): the narrow-head class.
  with contextlib.redirect_stdout(io.StringIO()):
    cls = type(tsp.build_torch_model(args.l2w_den, args.seed, args.head_width))
  loop.models.msdnet = cls
  torch.manual_seed(args.seed)
  with contextlib.redirect_stdout(io.StringIO()):
    net = cls(a)
  meta_in = a.num_exits * (2 if args.meta_net_input_type == "both" else 1)
  meta_net = loop.models.MLP_tanh(input_size=meta_in, hidden_size=args.meta_net_hidden_size,
                                  num_layers=args.meta_net_num_layers, output_size=a.num_exits)

  class Wrapped(nn.Module):
    """What DistributedDataParallel gives their loop: the network as ``.module``, called through."""

    def __init__(self, module):
      super().__init__()
      self.module = module

    def forward(self, x):
      return self.module(x)

  model = Wrapped(net)
  optimizer = torch.optim.SGD(model.parameters(), a.lr, momentum=a.momentum, weight_decay=a.weight_decay)
  meta_optimizer = torch.optim.Adam(meta_net.parameters(), lr=a.meta_lr, weight_decay=a.meta_weight_decay)
  init_np = tsp.state_dict_numpy(net)
  state_names = list(init_np)
  param_names = [n for n, _ in net.named_parameters()]
  meta_names = [n for n, _ in meta_net.named_parameters()]
  meta_init = np.concatenate([x.ravel() for x in numpy_of(meta_net.parameters())])

  rec: dict[str, list] = {k: [] for k in ("meta_input", "meta_raw", "weight_raw", "meta_loss", "meta_grads",
                                          "meta_params", "state", "momentum", "adam_m", "adam_v",
                                          "adam_step", "lr", "meta_lr")}

  def meta_hook(_, inputs, output):
    if torch.is_grad_enabled():  # the look-ahead's call; the real step's runs under no_grad
      rec["meta_input"].append(inputs[0].detach().numpy().copy())
      rec["meta_raw"].append(output.detach().numpy().copy())
    else:
      rec["weight_raw"].append(output.detach().numpy().copy())

  meta_net.register_forward_hook(meta_hook)

  class Meter(loop.AverageMeter):
    def update(self, val, n=1):
      if self.name == "MetaLoss":
        rec["meta_loss"].append(float(val))
      super().update(val, n)

  loop.AverageMeter = Meter
  meta_step, sgd_step = meta_optimizer.step, optimizer.step

  def recorded_meta_step(*a_, **k_):
    grads = numpy_of(p.grad for p in meta_net.parameters())
    rec["meta_grads"].append(np.concatenate([g.ravel() for g in grads]))
    out = meta_step(*a_, **k_)
    rec["meta_params"].append(np.concatenate([x.ravel() for x in numpy_of(meta_net.parameters())]))
    return out

  def recorded_sgd_step(*a_, **k_):
    out = sgd_step(*a_, **k_)
    rec["state"].append(tsp.pack(tsp.state_dict_numpy(net), state_names))
    if len(rec["state"]) % 2 == 0:  # the iteration's second half: both optimisers' states after it
      rec["lr"].append(optimizer.param_groups[0]["lr"])
      rec["meta_lr"].append(meta_optimizer.param_groups[0]["lr"])
      rec["momentum"].append(np.concatenate([optimizer.state[p]["momentum_buffer"].numpy().ravel()
                                             for p in net.parameters()]))
      states = [meta_optimizer.state[p] for p in meta_net.parameters()]
      rec["adam_m"].append(np.concatenate([s["exp_avg"].numpy().ravel() for s in states]))
      rec["adam_v"].append(np.concatenate([s["exp_avg_sq"].numpy().ravel() for s in states]))
      rec["adam_step"].append(float(states[0]["step"]))
    return out

  meta_optimizer.step, optimizer.step = recorded_meta_step, recorded_sgd_step

  images, labels = tsp.load_batches(args.data, args.steps, args.batch_size)
  loader = [(tsp.normalise(images[t]), torch.from_numpy(labels[t].astype(np.int64)))
            for t in range(args.steps)]
  target_probs = loop.calc_target_probs(a)[a.target_p_index - 1]
  loop.train(loader, model, meta_net, nn.CrossEntropyLoss(), optimizer, meta_optimizer, 0, target_probs, a)

  arrays = {"images": images, "labels": labels, "init": tsp.pack(init_np, state_names),
            "meta_init": meta_init}
  for key, values in rec.items():
    arrays[key] = np.asarray(values, np.float64 if key in ("lr", "meta_lr") else np.float32)
  turns = 2 * args.steps
  assert all(len(rec[k]) == turns for k in ("meta_input", "meta_raw", "weight_raw", "meta_loss", "state")), \
      {k: len(v) for k, v in rec.items()}
  config = dict(
      preset=tsp.PRESET, overrides={"head_width": args.head_width}, num_classes=10, torch_args=tsp.TORCH_ARGS,
      mean=tsp.MEAN, std=tsp.STD, steps=args.steps, epochs=args.epochs, total_steps=args.epochs * args.steps,
      batch_size=args.batch_size, learning_rate=args.lr, momentum=a.momentum, weight_decay=a.weight_decay,
      nesterov=False, decay_1d=True, seed=args.seed,
      l2w={k: getattr(args, k) for k in ("meta_net_hidden_size", "meta_net_num_layers", "meta_net_input_type",
                                          "constraint_dimension", "epsilon", "target_p_index", "meta_lr",
                                          "meta_weight_decay")},
      target_probs=[float(x) for x in target_probs], bn_momentum=0.1,
      bn_count=tsp.bn_counts(net, tsp.normalise(images[0][:args.batch_size // 2])),
      state_layout=[[k, list(v.shape)] for k, v in init_np.items()], param_names=param_names,
      meta_layout=[[n, list(p.shape)] for n, p in meta_net.named_parameters()], meta_names=meta_names,
      data=os.path.basename(args.data), torch_version=torch.__version__)
  arrays["config"] = np.asarray(json.dumps(config, sort_keys=True))
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(out, **arrays)
  print("meta losses per turn:", np.round(arrays["meta_loss"], 4).tolist())
  print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, {len(arrays)} arrays, torch {torch.__version__})")


if __name__ == "__main__":
  main()
