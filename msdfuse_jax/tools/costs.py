"""msdfuse-costs: per-exit cumulative costs of a configured model.

  msdfuse-costs --config=configs/cifar.py:dataset=cifar10,model=msdnet_anytime7 [--json=FILE]

Prints a table (literature op_counter cost, MACs, XLA flops on the current backend, parameters) and
optionally writes it as JSON: ``{"model", "dataset", "backend", "exits": [{"exit", "op_counter", "macs",
"xla_flops", "params"}, ...]}``.
"""

from __future__ import annotations

import json

from absl import app, flags

from msdfuse_jax import costs, run_config
from msdfuse_jax.tools import flags_util

flags_util.define_config_flag()
flags.DEFINE_string("json", None, "Also write the table as JSON to this file.")
flags.DEFINE_bool("xla", True, "Also compile every exit prefix and report XLA's flop count.")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  if FLAGS.config is None:
    flags_util.fail("--config is required, e.g. --config=configs/cifar.py:dataset=cifar10,model=msdfuse")
  config = FLAGS.config
  try:
    model = run_config.build_model(config, dtype="float32")  # costs are counted at float32
  except ValueError as e:
    flags_util.fail(str(e))
  report = costs.costs_report(model, config.model.name, config.dataset, with_xla=FLAGS.xla)
  print(costs.format_table(report))
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump(report, f, indent=2)
    print(f"wrote {FLAGS.json}")


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
