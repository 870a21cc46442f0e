"""Benchmark: scaling of a config's train step over 1, 2, 4, ... devices, per mesh layout.

  python -m benchmarks.scaling --config configs/bm_synthdyad.py:size=B,res=128 --devices 1,2,4
  python -m benchmarks.scaling --config configs/bm_synthdyad.py:size=tiny,res=32 --devices 1,2 \
      --batch_per_device 2 --steps 2 --warmup 1                     # CPU smoke run (fake devices)

For every device count n and layout, the real sharded train step (benchmarks/train_step.py:
`trainer.setup` on a mesh of the first n devices, AOT-compiled) is timed on one batch:

  data     mesh data=n: the batch split over devices, parameters replicated
  fsdp     mesh fsdp=n: the batch split, parameters and optimiser state sharded (all-gathers)
  context  mesh context=n: every device holds the whole batch; the token axis of the
           activations is split where the model's logical axes put it on `context`

Weak scaling keeps `--batch_per_device` per device (global batch = n · that for data/fsdp; for
context, where devices share one batch, the global batch stays `--batch_per_device`: the work per
device falls instead). Strong scaling keeps the global batch `--global_batch` fixed.
Efficiency: weak t₁ / tₙ (1.0 = perfect), strong t₁ / (n · tₙ). MFU per device as in
benchmarks/train_step.py (XLA's FLOPs of the per-device program against the bf16 data-sheet peak,
or on CPU a measured float32 matmul).

Video-DiT configs (pre-encoded latents) time on a random batch of the training layout
(benchmarks/dit_step.py's `bm_batch`); other configs on one real batch of their data.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import os
import platform

import jax

from benchmarks import dit_step, train_step

LAYOUTS = ("data", "fsdp", "context")


def load_config(spec: str):
  """configs/x.py[:arg] -> its config (as the trainer's --config flag reads it)."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("scaled_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def is_video(config) -> bool:
  return str(config.model.name).startswith("video.")


def run_one(base, layout: str, n: int, batch: int, res: int, steps: int, warmup: int,
            peak_tflops: float | None) -> dict:
  config = copy.deepcopy(base)
  with config.unlocked():
    config.mesh = dict(data=1, fsdp=1, context=1, tensor=1)
    config.mesh[layout] = n
    config.data.batch_size = batch
    if is_video(config):
      config.data.source = "synthdyad"   # only data facts (fps, mel rate) are read
  host = dit_step.bm_batch(config, batch, res) if is_video(config) else None
  r = train_step.benchmark(config, steps=steps, warmup=warmup, peak_tflops=peak_tflops,
                           devices=jax.devices()[:n], host_batch=host)
  return dict(r, layout=layout, n=n, global_batch=batch)


def rows(args) -> list[dict]:
  base = load_config(args.config)
  res = int(base.data.synthdyad.resolution) if is_video(base) else 0
  counts = [n for n in args.devices if n <= jax.device_count()]
  skipped = sorted(set(args.devices) - set(counts))
  if skipped:
    print(f"(only {jax.device_count()} devices: no runs on {skipped})")
  out = []
  strong = args.global_batch or args.batch_per_device * max(counts)
  for layout in args.layouts:
    for kind in ("weak", "strong"):
      for n in counts:
        if kind == "weak":
          batch = args.batch_per_device * (1 if layout == "context" else n)
        else:
          batch = strong
        if layout != "context" and batch % n:
          print(f"| {layout} | {kind} | {n} | batch {batch} does not split over {n} devices |")
          continue
        r = run_one(base, layout, n, batch, res, args.steps, args.warmup, args.peak_tflops)
        r["kind"] = kind
        out.append(r)
        print_row(r, out, flush=True)
  return out


def efficiency(r: dict, done: list[dict]) -> float:
  one = [d for d in done if d["layout"] == r["layout"] and d["kind"] == r["kind"] and d["n"] == 1]
  if not one:
    return float("nan")
  t1, tn = one[0]["step_ms"], r["step_ms"]
  return t1 / tn if r["kind"] == "weak" else t1 / (r["n"] * tn)


HEADER = ("| layout | scaling | devices | mesh | global batch | step (ms) | examples/s | efficiency "
          "| MFU / device |\n|---|---|---:|---|---:|---:|---:|---:|---:|")


def print_row(r: dict, done: list[dict], flush: bool = False) -> None:
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
  r["efficiency"] = efficiency(r, done)
  print(f"| {r['layout']} | {r['kind']} | {r['n']} | {mesh} | {r['global_batch']} | "
        f"{r['step_ms']:.1f} | {r['examples_per_s']:.1f} | {r['efficiency']:.2f} | "
        f"{100 * r['mfu']:.1f} % |", flush=flush)


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", required=True, help="configs/x.py[:args]")
  ap.add_argument("--devices", default="1,2,4", help="device counts")
  ap.add_argument("--layouts", default=",".join(LAYOUTS))
  ap.add_argument("--batch_per_device", type=int, default=4)
  ap.add_argument("--global_batch", type=int, default=0,
                  help="strong scaling's fixed batch (default batch_per_device × most devices)")
  ap.add_argument("--steps", type=int, default=10)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--peak_tflops", type=float, default=None)
  ap.add_argument("--out_md", default="")
  args = ap.parse_args(argv)
  args.devices = [int(n) for n in args.devices.split(",")]
  args.layouts = [l for l in args.layouts.split(",") if l]
  unknown = set(args.layouts) - set(LAYOUTS)
  if unknown:
    raise SystemExit(f"--layouts: unknown {sorted(unknown)}; expected some of {LAYOUTS}")
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  title = (f"Scaling of `{args.config}`, {when}, {platform.node()}, {jax.device_count()} x "
           f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
  print(title + "\n\n" + HEADER, flush=True)
  out = rows(args)
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write(title + "\n\n" + HEADER + "\n")
      for r in out:
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
        f.write(f"| {r['layout']} | {r['kind']} | {r['n']} | {mesh} | {r['global_batch']} | "
                f"{r['step_ms']:.1f} | {r['examples_per_s']:.1f} | {r['efficiency']:.2f} | "
                f"{100 * r['mfu']:.1f} % |\n")
  return out


if __name__ == "__main__":
  if "XLA_FLAGS" not in os.environ and jax.default_backend() == "cpu":
    print("(CPU: set XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting for "
          "several devices)")
  main()
