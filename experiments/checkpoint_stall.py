"""How long the training loop stops at a checkpoint save, synchronous vs asynchronous (issue 22, item 5).

  python3 experiments/checkpoint_stall.py --model=msdnet_anytime7 --saves=5

Saves a real train state of the model (parameters, BatchNorm statistics, SGD momentum) with the project's
`checkpoints.save` as training calls it, and prints the seconds each call blocks the caller: with a
synchronous manager the whole write, with the asynchronous one (training's default) the copy to host memory
and orbax's start of the write only.
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np

from configs import cifar
from msdfuse_jax import checkpoints, models, optim, train_state


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="msdnet_anytime7")
  parser.add_argument("--saves", type=int, default=5)
  args = parser.parse_args()
  config = cifar.get_config(f"dataset=cifar100,model={args.model}")
  model = models.from_config(config)
  tx = optim.create_optimizer(config.optim, optim.learning_rate_schedule(config.optim, 100, 1000))
  state = train_state.init_train_state(model, tx, jax.random.PRNGKey(0), 32)
  host = jax.device_get(state.to_checkpoint())
  size = sum(np.asarray(x).nbytes for x in jax.tree.leaves(host)) / 2**20
  print(f"{args.model}: train state of {size:.1f} MiB; load {os.getloadavg()[0]:.1f}")
  for enable_async in (False, True):
    with tempfile.TemporaryDirectory() as workdir:
      mngr = checkpoints.manager(workdir, max_to_keep=2, enable_async=enable_async)
      blocked = []
      for i in range(args.saves):
        t0 = time.perf_counter()
        checkpoints.save(mngr, i + 1, state.to_checkpoint(), wait=not enable_async)
        blocked.append(time.perf_counter() - t0)
        time.sleep(1.0)  # the steps that would run meanwhile
      mngr.wait_until_finished()
      mngr.close()
    kind = "async" if enable_async else "sync "
    print(f"{kind}: blocked {np.median(blocked) * 1e3:.1f} ms per save (median of {args.saves}; "
          f"max {max(blocked) * 1e3:.1f} ms)")


if __name__ == "__main__":
  main()
