"""msdfuse-bench: it runs the training and eval steps and reports every figure (it asserts no speed)."""

import json
import os
import subprocess

import pytest

from msdfuse_jax.tools import bench_main as bench
from tests.conftest import REPO, tool_command

KEYS = {"train_images_per_s", "eval_images_per_s", "compile_s", "peak_memory_mb", "step_temp_memory_mb",
        "step_argument_memory_mb", "step_output_memory_mb"}


@pytest.mark.slow
def test_bench_cli_prints_and_writes_the_figures(tmp_path):
  out = tmp_path / "bench.json"
  proc = subprocess.run(
      tool_command("bench_main", f"--config={REPO}/configs/cifar.py:dataset=cifar100,model=msdnet_tiny",
                   "--batch_size=8", "--eval_batch_size=16", "--steps=2", "--eval_steps=1", "--compilation_cache",
                   f"--json={out}", tuned_cpu_flags=True),
      capture_output=True, text=True, cwd=tmp_path, timeout=600,
      # With the suite's compilation cache (conftest.py); nothing may cross host and device implicitly.
      env={**os.environ, "JAX_PLATFORMS": "cpu", "JAX_TRANSFER_GUARD": "disallow"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert KEYS <= set(report)
  spread = report["train_step_ms_spread"]
  assert 0 < spread["min"] <= spread["median"] <= spread["p90"] <= spread["max"]
  assert all(report[k] > 0 for k in KEYS - {"compile_s"}) and report["compile_s"] >= 0
  assert report["model"] == "msdnet_tiny" and report["batch_size"] == 8 and report["eval_batch_size"] == 16
  assert "images/s" in proc.stdout and "compile" in proc.stdout


def test_report_format_names_every_figure():
  report = dict(model="m", dataset="cifar10", dtype="float32", pipeline="device", devices=1, backend="cpu",
                batch_size=64, train_step_ms_spread={"min": 480.0, "median": 490.0, "p90": 510.0, "max": 530.0},
                eval_batch_size=256, train_images_per_s=130.0, train_step_s=0.49, compile_s=30.0,
                eval_images_per_s=400.0, eval_step_s=0.64, eval_compile_s=4.0, peak_memory_mb=2000.0,
                peak_memory_source="process peak RSS", rss_before_mb=700.0, train_cpu_s_per_step=0.9,
                eval_cpu_s_per_step=1.2, load_average=0.5, cpu_count=2, xla_flags="")
  text = bench.format_report(report)
  for figure in ("130.0 images/s", "400.0 images/s", "compile 30.0 s", "2000 MB", "device input pipeline",
                 "median 490.0, p90 510.0, max 530.0"):
    assert figure in text


@pytest.mark.parametrize("pipeline", ["device", "stream"])
def test_input_only_times_the_pipeline_alone(tmp_path, pipeline):
  out = tmp_path / "input.json"
  proc = subprocess.run(
      tool_command("bench_main", f"--config={REPO}/configs/cifar.py:dataset=cifar10,model=msdnet_tiny",
                   "--batch_size=32", "--steps=5", f"--config.data.pipeline={pipeline}", "--input_only",
                   f"--json={out}"),
      capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["pipeline"] == pipeline and report["batch_size"] == 32
  assert report["input_images_per_s"] > 0 and "train_images_per_s" not in report
  assert f"{pipeline} input pipeline" in proc.stdout and "images/s" in proc.stdout


def test_input_only_decodes_an_image_folder_in_worker_processes(tmp_path):
  from tests.test_imagenet import make_folder  # pylint: disable=import-outside-toplevel
  root = make_folder(tmp_path / "in")
  out = tmp_path / "input.json"
  proc = subprocess.run(
      tool_command("bench_main", f"--config={REPO}/configs/imagenet.py:runlocal", f"--config.data.path={root}",
                   "--config.data.workers=2", "--batch_size=4", "--steps=3", "--input_only", f"--json={out}"),
      capture_output=True, text=True, cwd=tmp_path, timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(out.read_text())
  assert report["source"] == f"folder {root}" and report["workers"] == 2 and report["pipeline"] == "stream"
  assert report["input_images_per_s"] > 0 and report["input_first_batch_s"] > 0
  assert "(folder" in proc.stdout and "2 workers" in proc.stdout
  assert "leaked" not in proc.stderr and "Traceback" not in proc.stderr
