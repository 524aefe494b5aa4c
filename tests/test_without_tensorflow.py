"""The tools on a machine without TensorFlow (a typical GPU/TPU image): TensorFlow is needed only by the
`tfds` data source; training (both pipelines) still writes TensorBoard events, and msdfuse-costs runs."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, shared_file, tool_command

# Loaded by every Python process started with this folder on PYTHONPATH (as sitecustomize).
BLOCKER = '''
import sys

# As if they were not installed: `import` raises ModuleNotFoundError and `importlib.util.find_spec` (which
# libraries use to look for TensorFlow) returns None.
for _name in ("tensorflow", "tensorflow_datasets"):
  sys.modules[_name] = None
'''


@pytest.fixture(scope="module")
def no_tf_env(tmp_path_factory):
  folder = tmp_path_factory.mktemp("no_tf")
  (folder / "sitecustomize.py").write_text(BLOCKER)
  path = os.pathsep.join([str(folder), str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
  return {**os.environ, "PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}


def run_tool(tool, *args, env, cwd):
  return subprocess.run(tool_command(tool, *args), capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=900)


def test_the_blocker_blocks(no_tf_env, tmp_path):
  proc = subprocess.run([sys.executable, "-c", "import tensorflow"], capture_output=True, text=True,
                        env=no_tf_env, cwd=tmp_path, timeout=60)
  assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr
  proc = subprocess.run([sys.executable, "-c", "import importlib.util; "
                         "assert importlib.util.find_spec('tensorflow') is None"],
                        capture_output=True, text=True, env=no_tf_env, cwd=tmp_path, timeout=60)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_train_eval_export_infer_and_bench_run_without_tensorflow(no_tf_env, tmp_path):
  config = f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal"
  workdir = tmp_path / "run"
  proc = run_tool("train_main", config, "--config.data.source=archive",
                  f"--config.data.path={shared_file('data', 'cifar-10-python-subset.tar.gz')}",
                  "--config.train.num_steps=6", "--config.train.eval_every_steps=6",
                  "--config.train.checkpoint_every_steps=6", f"--workdir={workdir}", env=no_tf_env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  events = [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]
  assert events, os.listdir(workdir)
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(workdir))
  acc.Reload()
  assert {"train/loss", "learning_rate", "test/accuracy_exit1"} <= set(acc.Tags()["scalars"])
  assert [e.step for e in acc.Scalars("train/loss")][-1] == 6

  proc = run_tool("eval_main", f"--workdir={workdir}", "--noxla", env=no_tf_env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "checkpoint step 6" in proc.stdout
  assert (workdir / "eval" / "budgeted.json").exists()

  export = tmp_path / "export"
  proc = run_tool("export_main", f"--workdir={workdir}", "--p=5", f"--out={export}", "--batch_size=32",
                  "--num_buckets=2", env=no_tf_env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = run_tool("infer_main", f"--workdir={workdir}", f"--export={export}", "--repeats=1", env=no_tf_env,
                  cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert re.search(r"equal the simulated budgeted evaluation \(.*\): True$", proc.stdout, re.M), proc.stdout

  out = tmp_path / "bench.json"
  proc = run_tool("bench_main", config, "--batch_size=8", "--eval_batch_size=8", "--steps=1", "--eval_steps=1",
                  "--compilation_cache", f"--json={out}", env=no_tf_env, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(out.read_text())["train_images_per_s"] > 0


TINY = f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal"


def test_costs_run_without_tensorflow(no_tf_env, tmp_path):
  out = tmp_path / "costs.json"
  proc = run_tool("costs_main", TINY, f"--json={out}", env=no_tf_env, cwd=tmp_path)  # XLA counts too
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert [e["exit"] for e in report["exits"]] == [1, 2, 3]
  assert all(e["op_counter"] > 0 and e["xla_flops"] > 0 for e in report["exits"])


@pytest.mark.slow
def test_the_stream_pipeline_trains_without_tensorflow(no_tf_env, tmp_path):
  # The stream pipeline (grain on the host) with the archive source: three steps, a checkpoint at step 3.
  workdir = tmp_path / "run"
  proc = run_tool("train_main", TINY, "--config.data.pipeline=stream", "--config.data.source=archive",
                  f"--config.data.path={shared_file('data', 'cifar-10-python-subset.tar.gz')}",
                  "--config.train.num_steps=3", "--config.train.eval_every_steps=1000",
                  "--config.train.checkpoint_every_steps=3", f"--workdir={workdir}", env=no_tf_env,
                  cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3"], os.listdir(workdir / "checkpoints")
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir)), os.listdir(workdir)


def test_the_tfds_source_without_tensorflow_says_what_to_install(no_tf_env, tmp_path):
  config = f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny,runlocal"
  proc = run_tool("train_main", config, f"--workdir={tmp_path}/run", env=no_tf_env, cwd=tmp_path)
  assert proc.returncode == 2, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the tfds data source needs TensorFlow and TFDS")
  assert "pip install tensorflow-cpu tensorflow-datasets" in last and "--config.data.source=archive" in last
