"""Train-step throughput and MFU of a config: AOT compile, then timed steps.

    python -m benchmarks.train_step --config configs/quickstart.py
    python -m benchmarks.train_step --config configs/quickstart.py:width=256,depth=8,batch=64 \
        --config.mesh.fsdp=4 --steps 50 --peak_tflops 989

Builds exactly what `trainer.train_and_evaluate` builds (`trainer.setup`: mesh, sharded state, the
jitted step with donation and output shardings) on one real batch of the config's data, compiles it ahead of time
(`jax.jit(...).lower(...).compile()`), then times `--steps` steps on that batch after `--warmup`
untimed ones (input loading is measured separately by benchmarks/data_loader.py).

FLOPs are XLA's cost analysis of the compiled, partitioned step (per device, forward + backward
+ optimiser; the Gaussian-attention backends count what they execute). MFU = achieved FLOP/s per
device / peak FLOP/s per device; the peak is `--peak_tflops`, or for known accelerators the dense
bf16 peak from the table below (the step runs in the config's dtypes, float32 by default, so MFU
against the bf16 peak is a lower bound), or elsewhere (CPU) the measured float32 throughput of a
2048^2 matmul on the same device. Prints a markdown table.
"""
from __future__ import annotations

import datetime
import platform
import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from avatar_jax import sharding, trainer
from avatar_jax.data import pipeline

# Dense bf16 peak TFLOP/s per device, by jax `device_kind` prefix (vendor data sheets).
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0,
    "NVIDIA H100": 989.0,      # SXM; the PCIe card is 756
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
    "TPU v6": 918.0,
    "TPU v5p": 459.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v4": 275.0,
}


def detect_peak_tflops(device) -> float | None:
  kind = getattr(device, "device_kind", "")
  for prefix, peak in PEAK_TFLOPS.items():
    if kind.startswith(prefix):
      return peak
  return None


def measure_matmul_tflops(device, n: int = 2048, reps: int = 10) -> float:
  """Achieved float32 TFLOP/s of an n x n matmul on `device` (a stand-in peak for CPUs)."""
  a = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), device)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  t0 = time.perf_counter()
  for _ in range(reps):
    out = mm(a)
  jax.block_until_ready(out)
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e12


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per partition program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def benchmark(config, *, steps: int, warmup: int, peak_tflops: float | None = None,
              devices=None, host_batch=None, init_from: bool = True) -> dict:
  """Compiles and times the train step of `config`; returns the measured numbers.

  devices: the devices of the mesh (default all); host_batch: the batch to time on (default one
  real batch of the config's data; a given batch skips the data statistics too); init_from:
  load `config.init_from` weights (False: the initialised ones; the step is the same program).
  """
  mesh = sharding.make_mesh(dict(config.mesh), devices)
  s = trainer.setup(config, mesh, fit=host_batch is None, init_from=init_from)
  n_params = s.num_params["trainable"]
  if host_batch is None:
    host_batch = next(pipeline.make(config.data, "train", keys=s.system.data_spec().keys,
                                    seed=config.seed))
  batch = s.batch(host_batch)
  state, jitted = s.state, s.train_step
  impls = attention_implementations(s.model(state), config)

  with trainer.use_mesh(mesh):   # as in the trainer's loop
    t0 = time.perf_counter()
    lowered = jitted.lower(state, batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    flops = float(_cost(compiled).get("flops", float("nan")))

    first = None   # the metrics of the first step (from the initial state): what layouts share
    for _ in range(warmup):
      state, metrics = compiled(state, batch)
      first = metrics if first is None else first
    jax.block_until_ready((state, metrics))
    t3 = time.perf_counter()
    for _ in range(steps):
      state, metrics = compiled(state, batch)
      first = metrics if first is None else first
    jax.block_until_ready((state, metrics))
    t4 = time.perf_counter()
  if not np.isfinite(float(metrics["loss"])):
    logging.warning("the benchmarked step produced a non-finite loss")

  step_s = (t4 - t3) / steps
  device = mesh.devices.flat[0]
  peak, peak_source = peak_tflops, "given"
  if peak is None:
    peak, peak_source = detect_peak_tflops(device), "bf16 data sheet"
  if peak is None:
    peak, peak_source = measure_matmul_tflops(device), "measured f32 matmul"
  achieved = flops / step_s / 1e12   # TFLOP/s per device (the cost is of the per-device program)
  return dict(
      device=f"{mesh.size} x {getattr(device, 'device_kind', device.platform)}",
      mesh=dict(mesh.shape), params_m=n_params / 1e6, batch=int(config.data.batch_size),
      frames=int(config.data.clip_frames), trace_s=t1 - t0, compile_s=t2 - t1,
      step_ms=1000 * step_s, steps_per_s=1.0 / step_s,
      examples_per_s=config.data.batch_size / step_s, gflops_per_device_step=flops / 1e9,
      tflops_per_device=achieved, peak_tflops=peak, peak_source=peak_source,
      mfu=achieved / peak, attention=impls,
      # The first step's loss and gradient norm: on the same batch, any mesh computes these
      # (benchmarks/scaling.py checks that its layouts agree).
      loss=float(first["loss"]), grad_norm=float(first["grad_norm"]))


def attention_implementations(model, config) -> str:
  """Which Gaussian-attention backend the model's attention layers resolve to in this step
  (per-device batch; self-attention over the clip's frames, cross-attention to its audio)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from avatar_jax.models import attention  # pylint: disable=g-import-not-at-top
  layers = [m for _, m in nnx.iter_graph(model) if isinstance(m, attention.TimeAttention)]
  if not layers:
    return "none"
  b = max(1, int(config.data.batch_size) // jax.device_count())
  n = int(config.data.clip_frames)
  found = sorted({l.implementation_for(b, n, n) for l in layers}
                 | {l.implementation_for(b, n, 2 * n) for l in layers})
  dtype = layers[0].dtype or "float32"
  return f"{', '.join(found)} ({jax.numpy.dtype(dtype).name}, head dim {layers[0].head_dim})"


def format_table(r: dict) -> str:
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
  mfu = f"{100 * r['mfu']:.1f} % of {r['peak_tflops']:.3g} ({r['peak_source']})"
  rows = [
      ("device", r["device"]), ("mesh", mesh), ("parameters", f"{r['params_m']:.3f} M"),
      ("batch x frames", f"{r['batch']} x {r['frames']}"),
      ("trace + lower", f"{r['trace_s']:.2f} s"), ("compile", f"{r['compile_s']:.2f} s"),
      ("step", f"{r['step_ms']:.1f} ms"), ("steps/s", f"{r['steps_per_s']:.2f}"),
      ("examples/s", f"{r['examples_per_s']:.1f}"),
      ("GFLOP / step / device (XLA cost analysis)", f"{r['gflops_per_device_step']:.3f}"),
      ("achieved TFLOP/s / device", f"{r['tflops_per_device']:.4f}"),
      ("MFU (peak TFLOP/s / device)", mfu),
      ("attention implementation", r["attention"]),
  ]
  return "\n".join(["| quantity | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _define_flags():
  """CLI flags, defined only when run as a program (the module is also a library)."""
  global _CONFIG, _STEPS, _WARMUP, _PEAK, _VS_XLA
  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:args]).",
                                            lock_config=True)
  _STEPS = flags.DEFINE_integer("steps", 20, "Timed steps.")
  _WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
  _VS_XLA = flags.DEFINE_bool("vs_xla", False, "Also time the step with the attention forced to "
                               "implementation='xla' (the unfused reference) and print both.")
  _PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device (default: the table "
                             "of known accelerators, else a measured float32 matmul).")
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  r = benchmark(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value, peak_tflops=_PEAK.value)
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  print(f"Train step, {when}, {platform.node()} ({platform.processor() or platform.machine()}), "
        f"jax {jax.__version__}, {jax.default_backend()}\n")
  print(format_table(r))
  if _VS_XLA.value:
    import copy  # pylint: disable=g-import-not-at-top
    config = copy.deepcopy(_CONFIG.value)
    with config.unlocked():
      config.model.attention.implementation = "xla"
    x = benchmark(config, steps=_STEPS.value, warmup=_WARMUP.value, peak_tflops=_PEAK.value)
    print(f"\n| attention | step ms | steps/s |\n|---|---|---|\n"
          f"| {r['attention']} | {r['step_ms']:.2f} | {r['steps_per_s']:.1f} |\n"
          f"| {x['attention']} | {x['step_ms']:.2f} | {x['steps_per_s']:.1f} |\n"
          f"speed-up of the configured attention over xla: {x['step_ms'] / r['step_ms']:.2f}x")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
