"""msdfuse-import-torch: turn MSDNet-PyTorch weights into a run directory.

  msdfuse-import-torch --config=configs/cifar.py:dataset=cifar10,model=msdnet_anytime7 \
      --state_dict=msdnet.npz --workdir=/tmp/imported

``--state_dict`` is a ``.npz`` of state_dict names -> arrays, or (with torch installed) a ``.pth``/``.pt``
state_dict or MSDNet-PyTorch / L2W-DEN checkpoint. A PyTorch file is read weights-only (tensors, numbers,
strings, containers); one that holds other Python objects is refused unless ``--allow_pickle`` is given, since
unpickling those runs code from the file. The workdir then holds ``config.json`` and a step-0 checkpoint,
which `msdfuse-eval`, `msdfuse-infer` and `msdfuse-train` (as initial weights) load like a trained run.
"""

from __future__ import annotations

from absl import flags

from msdfuse_jax.interop import torch_msdnet
from msdfuse_jax.tools import flags_util

flags_util.define_config_flag()
flags.DEFINE_string("state_dict", None, "The PyTorch weights: .npz, or .pth/.pt when torch is installed.")
flags.DEFINE_string("workdir", None, "Directory to create the run in.")
flags.DEFINE_bool("allow_pickle", False,
                  "WARNING: unsafe. Read a .pth/.pt file with full unpickling (torch.load weights_only=False), "
                  "which runs any code the file holds. Without it a file holding more than tensors and plain "
                  "data is refused. Only for a file whose origin you trust.")
FLAGS = flags.FLAGS

def main(argv) -> None:
  del argv
  for name in ("config", "state_dict", "workdir"):
    if getattr(FLAGS, name) is None:
      flags_util.fail(f"--{name} is required")
  try:
    where = torch_msdnet.import_weights(FLAGS.config, FLAGS.state_dict, FLAGS.workdir,
                                         allow_pickle=FLAGS.allow_pickle)
  except (ValueError, FileNotFoundError) as e:
    flags_util.fail(str(e))
  print(f"imported {FLAGS.state_dict} into {where}")


def run() -> None:
  flags_util.run_tool(main)


if __name__ == "__main__":
  run()
