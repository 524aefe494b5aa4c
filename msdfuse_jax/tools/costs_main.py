"""msdfuse-costs: per-exit cumulative costs of a configured model.

  msdfuse-costs --config=configs/cifar.py:dataset=cifar10,model=msdnet_anytime7 [--json=FILE]
  msdfuse-costs --config=configs/imagenet.py:model=msdnet_imagenet_step4     # 224x224, 1,000 classes

Prints a table (literature op_counter cost, MACs, XLA flops on the current backend, parameters) and
optionally writes it as JSON: ``{"model", "dataset", "backend", "exits": [{"exit", "op_counter", "macs",
"xla_flops", "params"}, ...]}``.
"""

from __future__ import annotations

from absl import flags

from msdfuse_jax import costs, models
from msdfuse_jax.data import sources
from msdfuse_jax.tools import flags_util

flags_util.define_config_flag()
flags.DEFINE_string("json", None, "Also write the table as JSON to this file.")
flags.DEFINE_bool("xla", True, "Also compile every exit prefix and report XLA's flop count.")
FLAGS = flags.FLAGS


def main(argv) -> None:
  del argv
  config = flags_util.config_or_fail()
  try:
    model = models.from_config(config, dtype="float32")  # costs are counted at float32
  except ValueError as e:
    flags_util.fail(str(e))
  report = costs.costs_report(model, config.model.name, config.dataset, with_xla=FLAGS.xla,
                              image_size=sources.image_size(config.dataset))
  flags_util.print_report(costs.format_table(report), report, FLAGS.json)


def run() -> None:
  flags_util.run_tool(main)


if __name__ == "__main__":
  run()
