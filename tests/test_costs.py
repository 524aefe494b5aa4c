"""Cost accounting: single-op known answers, the MSDNet reference table, the MSDFuse envelope, the CLI."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from msdfuse_jax import costs, models
from msdfuse_jax.data import sources
from msdfuse_jax.models.base import MultiExitModule
from tests.conftest import REPO, shared_file

# Reference integers, the stored cost tables and XLA:CPU's flop counts (another backend counts its own).
pytestmark = pytest.mark.cpu_exact


class OneOp(MultiExitModule):
  """A one-exit model wrapping a single op, for known answers."""

  op: str = "conv"

  @property
  def num_exits(self):
    return 1

  def stage(self, x, k, *, train=False):
    if self.op == "conv":
      y = nn.Conv(8, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)(x)
    elif self.op == "depthwise":
      y = nn.Conv(3, (3, 3), padding=((1, 1), (1, 1)), feature_group_count=3, use_bias=False)(x)
    elif self.op == "dense":
      y = nn.Dense(10)(x.reshape((x.shape[0], -1)))
    elif self.op == "relu":
      y = nn.relu(x)
    elif self.op == "gelu":
      y = nn.gelu(x, approximate=False)
    elif self.op == "avgpool":
      y = nn.avg_pool(x, (2, 2), strides=(2, 2))
    elif self.op == "global_pool":
      y = jnp.mean(x, axis=(1, 2))
    elif self.op == "batchnorm_concat_add":
      y = nn.BatchNorm(use_running_average=True)(x)
      y = jnp.concatenate([y, x], -1) + 1.0
    return y, y.reshape((y.shape[0], -1))

  __call__ = MultiExitModule.__call__
  stage = nn.compact(stage)


@pytest.mark.parametrize("op,macs,ops", [
    # conv 3x3 stride 2, 3 -> 8 channels, 32x32 -> 16x16: C_in*C_out*kh*kw*H_out*W_out.
    ("conv", 3 * 8 * 9 * 16 * 16, 3 * 8 * 9 * 16 * 16),
    # depthwise: divided by groups.
    ("depthwise", 3 * 3 * 9 * 32 * 32 // 3, 3 * 3 * 9 * 32 * 32 // 3),
    # Linear: weight MACs plus one op per bias.
    ("dense", 3072 * 10, 3072 * 10 + 10),
    ("relu", 0, 3072),
    ("gelu", 0, 3072),
    # AvgPool 2x2: C * H_out * W_out * k * k; global pool: input elements.
    ("avgpool", 0, 3 * 16 * 16 * 4),
    ("global_pool", 0, 3072),
    ("batchnorm_concat_add", 0, 0),
])
def test_single_op_against_its_formula(op, macs, ops):
  (cost,) = costs.exit_costs(OneOp(op=op), with_xla=False)
  assert (cost.macs, cost.op_counter) == (macs, ops)


def test_parameters_and_xla_flops_of_a_single_conv():
  (cost,) = costs.exit_costs(OneOp(op="conv"))
  assert cost.params == 3 * 3 * 3 * 8
  # XLA counts a MAC as two flops, and on the CPU backend it skips the window positions that fall on
  # the zero padding (here 4 % of them), which the literature convention counts.
  assert 0.9 * 2 * cost.macs <= cost.xla_flops <= 2 * cost.macs


@pytest.mark.parametrize("preset,ref_name", [("msdnet_anytime7", "msdnet_anytime"),
                                             ("msdnet_budget5", "msdnet_budgeted")])
@pytest.mark.parametrize("dataset,num_classes", [("cifar10", 10), ("cifar100", 100)])
def test_msdnet_reproduces_reference_counts(preset, ref_name, dataset, num_classes):
  ref = json.loads(shared_file("reference", "model_counts.json").read_text())[f"{ref_name}/{dataset}"]
  got = costs.exit_costs(models.build_model(preset, num_classes), with_xla=False)
  assert [c.op_counter for c in got] == [int(v) for v in ref["op_counter_flops"]]
  assert [c.params for c in got] == ref["op_counter_params"]
  assert [c.macs for c in got] == ref["hook_cum_mac"]
  assert got[-1].params == ref["total_params"]


@pytest.mark.parametrize("preset", ["msdnet_imagenet_tiny", "msdnet_imagenet_step4"])
def test_msdnet_imagenet_mode_reproduces_reference_counts(preset):
  # 224x224, 1,000 classes; the max-pool of the ImageNet stem counts like average pooling, the stem conv's
  # bias adds parameters but no ops, and the jaxpr walk needs nothing ImageNet-specific.
  ref = json.loads(shared_file("reference", "model_counts_imagenet.json").read_text())[preset]
  model = models.build_model(preset, 1000)
  args = ref["args"]
  assert (model.n_blocks, model.n_channels, model.base, model.step, model.growth_rate) == (
      args["nBlocks"], args["nChannels"], args["base"], args["step"], args["growthRate"])
  assert tuple(model.gr_factor) == tuple(args["grFactor"]) and tuple(model.bn_factor) == tuple(args["bnFactor"])
  got = costs.exit_costs(model, image_size=224, with_xla=False)
  assert [c.op_counter for c in got] == [int(v) for v in ref["op_counter_flops"]]
  assert [c.params for c in got] == ref["op_counter_params"]


@pytest.mark.parametrize("num_classes", [10, 100])
def test_msdfuse_sits_on_the_papers_envelope(num_classes):
  got = costs.exit_costs(models.build_model("msdfuse", num_classes), with_xla=False)
  assert 24e6 <= got[0].op_counter <= 27e6
  assert 62e6 <= got[-1].op_counter <= 67e6
  assert all(a.op_counter < b.op_counter for a, b in zip(got, got[1:]))


def test_msdfuse_imagenet_sits_inside_the_bounds_set_by_msdnet_imagenet():
  # Its last exit at most 0.85x msdnet_imagenet_step4's last, its first no more than MSDNet's first
  # (the reference integers), increasing in between. The table test below pins the exact integers.
  ref = json.loads(shared_file("reference", "model_counts_imagenet.json").read_text())["msdnet_imagenet_step4"]
  msdnet = [int(v) for v in ref["op_counter_flops"]]
  got = [r["op_counter"] for r in _cost_tables()["msdfuse_imagenet"]["imagenet2012"]]
  assert got[0] <= msdnet[0] and got[-1] <= 0.85 * msdnet[-1]
  assert all(a < b for a, b in zip(got, got[1:]))
  model = models.build_model("msdfuse_imagenet", 1000)
  assert model.imagenet and model.stem == "efficient" and model.head == "msdfuse" and model.activation == "gelu"


def test_xla_flops_cover_every_head_up_to_the_exit():
  got = costs.exit_costs(models.build_model("msdnet_tiny", 10))
  flops = [c.xla_flops for c in got]
  assert all(f > 0 for f in flops) and flops == sorted(flops)
  assert all(c.xla_flops >= c.macs for c in got)


def test_costs_cli_writes_json(tmp_path):
  out = tmp_path / "costs.json"
  proc = subprocess.run(
      [sys.executable, "-m", "msdfuse_jax.tools.costs_main",
       f"--config={REPO}/configs/cifar.py:dataset=cifar100,model=msdnet_tiny", "--noxla",
       f"--json={out}"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["model"] == "msdnet_tiny" and report["dataset"] == "cifar100"
  assert report["backend"] == jax.default_backend()
  assert [e["exit"] for e in report["exits"]] == [1, 2, 3]
  assert set(report["exits"][0]) == {"exit", "op_counter", "macs", "xla_flops", "params"}
  assert "op_counter" in proc.stdout


def test_costs_cli_unknown_model_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "msdfuse_jax.tools.costs_main",
       f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=nope"],
      capture_output=True, text=True, cwd=tmp_path, timeout=300)
  assert proc.returncode != 0
  assert "unknown model 'nope'" in proc.stderr
  assert "Traceback" not in proc.stderr


def _cost_tables() -> dict:
  import importlib.resources  # the file ships with the package (setup.cfg package_data)
  return json.loads((importlib.resources.files("msdfuse_jax.models") / "cost_tables.json").read_text())


# The tables quoted by the model docstrings; a "preset,field=value" entry overrides a string field.
# Written by experiments/make_cost_tables.py. A jaxpr walk takes 4-30 s on a busy 2-core CPU, so only
# a few entries run by default (the MSDNet presets are also pinned by the reference test above).
_CIFAR = ("cifar10", "cifar100")
_COST_TABLES = {**{e: _CIFAR for e in ("msdfuse", "msdnet_anytime7", "msdnet_budget5", "ranet_cifar",
                                       "ranet_readme", "resnet_mc", "resnet_mc,head=pool", "densenet_mc",
                                       "densenet_mc,head=pool")},
                "msdfuse_imagenet": ("imagenet2012",)}
_FAST_TABLES = (("msdfuse", "cifar100"), ("resnet_mc", "cifar10"), ("resnet_mc,head=pool", "cifar100"))


def _table_model(entry: str, dataset: str):
  name, *overrides = entry.split(",")
  return models.build_model(name, sources.num_classes(dataset), **dict(o.split("=", 1) for o in overrides))


def test_cost_tables_cover_every_documented_model():
  tables = _cost_tables()
  assert sorted(tables) == sorted(_COST_TABLES)
  for entry, per_dataset in tables.items():
    assert sorted(per_dataset) == sorted(_COST_TABLES[entry]), entry
    for dataset, rows in per_dataset.items():
      model = _table_model(entry, dataset)
      assert [r["exit"] for r in rows] == list(range(1, model.num_exits + 1)), (entry, dataset)
      assert all(set(r) == {"exit", "op_counter", "macs", "params"} for r in rows), (entry, dataset)


@pytest.mark.parametrize("entry,dataset", [
    pytest.param(e, d, marks=() if (e, d) in _FAST_TABLES else pytest.mark.slow)
    for e, datasets in _COST_TABLES.items() for d in datasets])
def test_cost_tables_match_the_code(entry, dataset):
  got = costs.exit_costs(_table_model(entry, dataset), image_size=sources.image_size(dataset), with_xla=False)
  want = _cost_tables()[entry][dataset]
  assert [{"exit": c.exit, "op_counter": c.op_counter, "macs": c.macs, "params": c.params}
          for c in got] == want
