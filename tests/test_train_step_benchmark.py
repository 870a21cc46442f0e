"""benchmarks/train_step.py on the tiny config (8 fake CPU devices): it compiles, runs, and its
numbers hang together."""
from __future__ import annotations

import importlib.util
import math
import os

import trainer_harness as harness

_spec = importlib.util.spec_from_file_location(
    "train_step_benchmark", os.path.join(harness.REPO, "benchmarks", "train_step.py"))
train_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_step)


def test_train_step_benchmark_numbers():
  config = harness.load_quickstart()
  r = train_step.benchmark(config, steps=3, warmup=1)
  assert r["mesh"]["data"] == 8 and r["device"].startswith("8 x ")
  assert r["compile_s"] > 0 and r["step_ms"] > 0
  assert math.isclose(r["steps_per_s"], 1000.0 / r["step_ms"], rel_tol=1e-9)
  assert math.isclose(r["examples_per_s"], config.data.batch_size * r["steps_per_s"], rel_tol=1e-9)
  assert r["gflops_per_device_step"] > 0 and r["params_m"] > 0
  assert r["peak_source"] == "measured f32 matmul" and 0 < r["mfu"] < 1.5
  table = train_step.format_table(r)
  assert table.startswith("| quantity | value |") and "MFU" in table
  assert train_step.detect_peak_tflops(type("D", (), {"device_kind": "NVIDIA H100 80GB HBM3"})) == 989.0
