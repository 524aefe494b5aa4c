"""Import MSDNet-PyTorch (kalviny/MSDNet-PyTorch) weights into `msdfuse_jax.models.MSDNet`.

The name mapping is derived from the model's own layer plan, so it holds for any MSDNet configuration
(any number of blocks, step mode, scales, with or without bottleneck), not just the README presets.

PyTorch layout, for reference (``b`` a 0-based block, ``i`` the position in that block's Sequential):
``blocks.0.0.layers.{s}.net.{0: conv, 1: bn}`` is the first layer; then every MSD layer is one entry
``blocks.{b}.{i}.layers.{j}`` (j-th output scale; ``conv_normal`` and, when it reads the finer scale,
``conv_down``, each a ConvBN Sequential ``net.{0,1}`` bottleneck + ``net.{3,4}`` 3x3), followed, when it
drops a scale, by a transition entry ``blocks.{b}.{i+1}.m.{j}.net.{0,1}``; the heads are
``classifier.{b}.m.{0,1}.net.{0,1}`` and ``classifier.{b}.linear``. In ImageNet mode the first layer's
scale 1 is ``blocks.0.0.layers.0.{0: conv with bias, 1: bn}`` and the classifiers keep their input width
(same names).
"""

from __future__ import annotations

import pickle
import re
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from msdfuse_jax import checkpoints, models, rundir
from msdfuse_jax.models.msdnet import MSDNet

Path = tuple[str, ...]


class ConversionError(ValueError):
  """A state_dict that does not fit the model (missing, surplus or mis-shaped entries)."""


def _conv_bn_units(model: MSDNet) -> Iterator[tuple[str, Path, str]]:
  """Yields (torch prefix of a conv->bn pair, flax module path, kind) in network order.

  For a torch prefix ``P``: kind 'basic' means ``P.net.0`` conv and ``P.net.1`` bn; kind 'convbn' is an
  MSDNet ConvBN whose bottleneck (if any) is ``P.net.0/1`` and whose 3x3 conv is ``P.net.3/4`` (or
  ``P.net.0/1`` without bottleneck).
  """
  n_scales = len(model.gr_factor)
  for b, plans in enumerate(model.layer_plan()):
    block = f"block{b + 1}"
    position = 0
    if b == 0:
      for s in range(n_scales):
        # ImageNet mode: scale 1 is a plain Sequential (conv 7x7 with bias, bn, relu, max-pool).
        kind = "stem7x7" if model.imagenet and s == 0 else "basic"
        yield f"blocks.0.0.layers.{s}", (block, "layer0", f"scale{s + 1}"), kind
      position = 1
    for plan in plans:
      offset = n_scales - plan.out_scales
      dropped = plan.in_scales > plan.out_scales
      layer = f"layer{plan.index}"
      for j, s in enumerate(range(offset, n_scales)):
        prefix = f"blocks.{b}.{position}.layers.{j}"
        if not (s == offset and not dropped):
          yield f"{prefix}.conv_down", (block, layer, f"scale{s + 1}_down"), "convbn"
        yield f"{prefix}.conv_normal", (block, layer, f"scale{s + 1}_normal"), "convbn"
      position += 1
      if plan.transition_out:
        for j, s in enumerate(range(offset, n_scales)):
          yield f"blocks.{b}.{position}.m.{j}", (block, layer, f"transition_scale{s + 1}"), "basic"
        position += 1
    for m in range(2):
      yield f"classifier.{b}.m.{m}", (f"exit{b + 1}", f"conv{m + 1}"), "basic"


def _torch_to_flax_names(model: MSDNet) -> dict[str, tuple[str, Path, Any]]:
  """torch key -> (collection, flax path, transform) for every entry the model needs."""
  names: dict[str, tuple[str, Path, Any]] = {}
  oihw_to_hwio = lambda w: np.transpose(w, (2, 3, 1, 0))
  identity = lambda w: w

  def conv_bn(conv: str, bn: str, flax_path: Path) -> None:
    names[f"{conv}.weight"] = ("params", flax_path + ("conv", "kernel"), oihw_to_hwio)
    names[f"{bn}.weight"] = ("params", flax_path + ("bn", "scale"), identity)
    names[f"{bn}.bias"] = ("params", flax_path + ("bn", "bias"), identity)
    names[f"{bn}.running_mean"] = ("batch_stats", flax_path + ("bn", "mean"), identity)
    names[f"{bn}.running_var"] = ("batch_stats", flax_path + ("bn", "var"), identity)

  for prefix, path, kind in _conv_bn_units(model):
    if kind == "stem7x7":
      conv_bn(f"{prefix}.0", f"{prefix}.1", path)
      names[f"{prefix}.0.bias"] = ("params", path + ("conv", "bias"), identity)
    elif kind == "basic":
      conv_bn(f"{prefix}.net.0", f"{prefix}.net.1", path)
    elif model.bottleneck:
      # Bottleneck conv, bn, relu at net.0-2, then the 3x3 conv and its bn at net.3 / net.4.
      conv_bn(f"{prefix}.net.0", f"{prefix}.net.1", path + ("bottleneck",))
      conv_bn(f"{prefix}.net.3", f"{prefix}.net.4", path + ("conv3x3",))
    else:
      conv_bn(f"{prefix}.net.0", f"{prefix}.net.1", path + ("conv3x3",))
  for b in range(model.n_blocks):
    names[f"classifier.{b}.linear.weight"] = ("params", (f"exit{b + 1}", "linear", "kernel"), np.transpose)
    names[f"classifier.{b}.linear.bias"] = ("params", (f"exit{b + 1}", "linear", "bias"), identity)
  return names


def _strip(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Drops BatchNorm's step counters and the ``module.`` prefix that nn.DataParallel adds."""
  out = {}
  for key, value in state_dict.items():
    key = key[len("module."):] if key.startswith("module.") else key
    if key.endswith("num_batches_tracked"):
      continue
    out[key] = np.asarray(value)
  return out


def convert_state_dict(model: MSDNet, state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """Converts an MSDNet-PyTorch state_dict into variables for `model`.

  Args:
    model: an MSDNet module with MSDNet-PyTorch's structure (stem 'msdnet', no fusion, head 'msdnet').
    state_dict: PyTorch state_dict names -> numpy arrays (conv weights OIHW, Linear weights (out, in),
      BatchNorm running statistics included). Extra non-tensor entries such as ``input``/``logits`` in a
      reference file must be removed by the caller.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``model.apply``.

  Raises:
    ConversionError: naming the first missing key, surplus key or shape mismatch.
  """
  if model.stem != "msdnet" or model.fusion or model.fused_transition or model.head != "msdnet":
    raise ConversionError("only MSDNet-PyTorch's architecture can be imported (stem='msdnet', "
                          "fusion=False, fused_transition=False, head='msdnet')")
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  expected = {coll: traverse_util.flatten_dict(jax.tree.map(lambda s: s.shape, tree,
                                                            is_leaf=lambda s: hasattr(s, "shape")))
              for coll, tree in shapes.items()}
  names = _torch_to_flax_names(model)
  given = _strip(state_dict)
  missing = [k for k in names if k not in given]
  if missing:
    raise ConversionError(f"state_dict is missing {len(missing)} entries, first: {missing[0]!r}")
  surplus = [k for k in given if k not in names]
  if surplus:
    raise ConversionError(f"state_dict has {len(surplus)} entries the model does not have, first: "
                          f"{surplus[0]!r}")
  flat: dict[str, dict[Path, np.ndarray]] = {coll: {} for coll in expected}
  for key, (coll, path, transform) in names.items():
    value = transform(given[key]).astype(np.float32)
    want = expected[coll].get(path)
    if want is None:
      raise ConversionError(f"{key!r} maps to {coll}/{'/'.join(path)}, which the model does not have")
    if tuple(value.shape) != tuple(want):
      raise ConversionError(f"shape mismatch for {key!r}: {tuple(given[key].shape)} in the state_dict, "
                            f"the model needs {tuple(want)} (after layout conversion)")
    flat[coll][path] = value
  for coll, leaves in expected.items():
    unfilled = sorted(set(leaves) - set(flat[coll]))
    if unfilled:  # pragma: no cover - would mean the name map above is incomplete
      raise ConversionError(f"no state_dict entry for {coll}/{'/'.join(unfilled[0])}")
  return {coll: traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in leaves.items()})
          for coll, leaves in flat.items()}


def load_state_dict_file(path: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """Reads a state_dict from ``.npz`` (names -> arrays) or, when torch is installed, a PyTorch file
  (``.pth``, ``.pt``, ``.pth.tar``).

  A PyTorch file is read with ``torch.load(..., weights_only=True)``: tensors, numbers, strings and plain
  containers only, which is all that MSDNet-PyTorch's and L2W-DEN's checkpoints hold. A file that needs more
  (any other Python object) is refused before anything in it runs, since unpickling such an object can run
  code of the file's author.

  A training checkpoint (a dict holding ``state_dict``) is unwrapped (`unwrap_checkpoint`); what is not model
  weights is ignored, with one warning line naming it.

  Args:
    path: the file.
    allow_pickle: read a PyTorch file with full unpickling (``weights_only=False``), which runs whatever code
      the file holds: only for a file whose origin is trusted.

  Raises:
    ConversionError: torch missing for a PyTorch file, or a file that weights-only loading refuses.
  """
  if path.endswith(".npz"):
    with np.load(path) as data:
      return {k: data[k] for k in data.files}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError(f"{path} is a PyTorch file, which needs torch: `pip install torch`, or save "
                          "the state_dict as .npz ({name: tensor.numpy()}) and pass that") from None
  if allow_pickle:
    logging.warning("%s: loading with full unpickling (--allow_pickle): code in the file runs", path)
    obj = torch.load(path, map_location="cpu", weights_only=False)
  else:
    obj = _load_weights_only(torch, path)
  weights, ignored = unwrap_checkpoint(obj)
  if ignored:
    logging.warning("%s: ignored what is not model weights: %s", path, ", ".join(ignored))
  return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in weights.items()}


def _load_weights_only(torch, path: str) -> Any:
  """``torch.load`` restricted to tensors and plain data; a refusal becomes one ConversionError line."""
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    reason = str(e)
  except RuntimeError as e:  # a zip archive that is truncated or corrupt
    raise ConversionError(f"{path} is not a readable PyTorch file ({str(e).split('. ')[0]}): download it "
                          "again") from None
  # Name what the file needs: torch lists a zip checkpoint's globals without running anything; for the
  # legacy format its error message names the first one.
  names: list[str] = []
  find_globals = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)
  if find_globals is not None:
    try:
      names = list(find_globals(path))
    except Exception:  # pylint: disable=broad-except - the legacy (non-zip) format is not supported there
      names = []
  if not names:
    names = re.findall(r"Unsupported global: GLOBAL (\S+)", reason)
  if names:
    raise ConversionError(
        f"{path} holds Python objects beyond tensors and plain data ({', '.join(names)}), and loading them "
        "could run code from the file, so it was not loaded; pass --allow_pickle (allow_pickle=True) to "
        "load it anyway, only if you trust where the file came from") from None
  detail = re.findall(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\n|$)", reason, flags=re.S)
  detail = detail[0].strip() if detail else "unreadable"
  raise ConversionError(
      f"{path} could not be read as a weights-only PyTorch file ({detail}); if it is a PyTorch file you "
      "trust, --allow_pickle (allow_pickle=True) reads it with full unpickling, which runs any code it "
      "holds") from None


def unwrap_checkpoint(obj: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
  """The weights of a loaded PyTorch file, and the names of the entries that are not weights.

  A training checkpoint holds its weights under ``state_dict`` (MSDNet-PyTorch: beside ``epoch``, ``arch``,
  ``best_prec1``, ``optimizer``; L2W-DEN: beside ``optimizer``, ``meta_state_dict``, ``meta_optimizer``);
  a bare state_dict is the weights itself. Entries that are not arrays (tensors) are ignored too.
  """
  if not isinstance(obj, Mapping):
    raise ConversionError(f"expected a state_dict or a checkpoint dict, got a {type(obj).__name__}")
  ignored: list[str] = []
  if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
    ignored = [k for k in obj if k != "state_dict"]
    obj = obj["state_dict"]
  weights = {k: v for k, v in obj.items() if hasattr(v, "shape")}
  ignored += [k for k in obj if k not in weights]
  return weights, ignored


# Entries of the reference .npz files that are data, not weights.
NON_WEIGHT_KEYS = ("input", "logits")


def import_weights(config, state_dict_path: str, workdir: str, allow_pickle: bool = False) -> str:
  """Converts the weights at `state_dict_path` for `config`'s model into a run at `workdir`.

  `allow_pickle` as in `load_state_dict_file`: False refuses a PyTorch file that holds more than weights.
  """
  model = models.from_config(config, dtype="float32")
  state_dict = load_state_dict_file(state_dict_path, allow_pickle=allow_pickle)
  for key in NON_WEIGHT_KEYS:
    state_dict.pop(key, None)
  variables = convert_state_dict(model, state_dict)
  config = config.copy_and_resolve_references()
  with config.unlocked():
    # MSDNet-PyTorch normalises with fixed published statistics; evaluation must do the same.
    config.data.normalization = "published"
  rundir.save_config(workdir, config)
  mngr = checkpoints.manager(workdir)
  checkpoints.save(mngr, 0, {"step": 0, **variables})
  return checkpoints.checkpoint_dir(workdir)
