"""Does the input pipeline keep the accelerator busy? Trainer loop vs pure step vs pipeline alone.

    python -m benchmarks.train_loop --config configs/quickstart.py:width=256,depth=4,batch=64,clip_frames=200

Builds what `trainer.train_and_evaluate` builds (`trainer.setup`, the pipeline with the system's
keys behind `pipeline.prefetch_to_device`) and times, after `--warmup` steps:
  * loop: the trainer's loop body — next batch from the prefetching iterator, then the jitted
    step — with the metrics read back every `train.log_every` steps as the trainer does;
  * step: the same compiled step on one batch already on the device (no input at all);
  * pipeline: host batches per second of the same pipeline alone, and through
    `prefetch_to_device` (global device arrays), with no step running.
Prints a markdown table; loop/step is the fraction of the pure step rate the trainer reaches.
"""
from __future__ import annotations

import datetime
import platform
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from avatar_jax import sharding, trainer
from avatar_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:args]).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 200, "Timed steps of the loop and of the pure step.")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed steps first (compilation included).")
_BATCHES = flags.DEFINE_integer("batches", 200, "Timed batches of the pipeline alone.")


def _rate(fn, n: int) -> float:
  t0 = time.perf_counter()
  out = None
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return n / (time.perf_counter() - t0)


def run(config, *, steps: int, warmup: int, batches: int) -> dict:
  mesh = sharding.make_mesh(dict(config.mesh))
  s = trainer.setup(config, mesh)
  keys = s.system.data_spec().keys
  make = lambda seed: pipeline.make(config.data, "train", keys=keys, seed=seed)
  log_every = int(config.train.log_every)
  r = {}
  with trainer.use_mesh(mesh):
    # Pipeline alone: host batches, then global device batches.
    it = make(config.seed)
    next(it)
    r["pipeline_host"] = _rate(lambda: next(it), batches)
    dev = pipeline.prefetch_to_device(make(config.seed), mesh, size=2)
    next(dev)
    r["pipeline_device"] = _rate(lambda: next(dev), batches)
    dev.close()

    # The trainer's loop body.
    state = s.state
    train_iter = pipeline.prefetch_to_device(make(config.seed), mesh, size=2)
    for _ in range(warmup):
      state, metrics = s.train_step(state, next(train_iter))
    jax.block_until_ready(state)
    t0 = time.perf_counter()
    for i in range(1, steps + 1):
      state, metrics = s.train_step(state, next(train_iter))
      if i % log_every == 0:
        float(metrics["loss"])  # the trainer reads its metrics back at every log step
    jax.block_until_ready(state)
    r["loop"] = steps / (time.perf_counter() - t0)
    batch = next(train_iter)
    train_iter.close()

    # The pure step on one device-resident batch.
    def step():
      nonlocal state
      state, m = s.train_step(state, batch)
      return m["loss"]
    for _ in range(3):
      step()
    r["step"] = _rate(step, steps)
  r["batch"] = int(config.data.batch_size)
  r["params_m"] = s.num_params["trainable"] / 1e6
  r["device"] = f"{mesh.size} x {getattr(mesh.devices.flat[0], 'device_kind', 'cpu')}"
  return r


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  r = run(_CONFIG.value, steps=_STEPS.value, warmup=_WARMUP.value, batches=_BATCHES.value)
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  print(f"Train loop, {when}, {platform.node()}, {r['device']}, jax {jax.__version__}, "
        f"{r['params_m']:.2f}M params, batch {r['batch']}\n")
  rows = [("pure step (batch on device)", r["step"]),
          ("trainer loop (prefetch_to_device + step)", r["loop"]),
          ("pipeline alone, host batches", r["pipeline_host"]),
          ("pipeline alone, through prefetch_to_device", r["pipeline_device"])]
  print("| what | steps or batches / s | examples / s |\n|---|---|---|")
  for name, rate in rows:
    print(f"| {name} | {rate:.1f} | {rate * r['batch']:.0f} |")
  print(f"\nloop / pure step: {100 * r['loop'] / r['step']:.0f} %; "
        f"pipeline (device) / pure step: {r['pipeline_device'] / r['step']:.1f}x")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main)
