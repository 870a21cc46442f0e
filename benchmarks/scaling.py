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

Every layout must compute the same step: the first step's loss and gradient norm of each row
(columns `loss`, `grad norm`) are checked against the one-device run on the same global batch
(`--rtol`, relative; rows with no one-device run of their batch against the first row that has
it); a disagreement is listed after the table and the benchmark exits with an error. Runs with
the same mesh and global batch (the one-device runs of every layout; weak and strong scaling
where their batches coincide) are compiled and timed once and their row repeated.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import math
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
  # init_from weights (e.g. the video DiT's VAE workdir) are not needed to time the step.
  r = train_step.benchmark(config, steps=steps, warmup=warmup, peak_tflops=peak_tflops,
                           devices=jax.devices()[:n], host_batch=host, init_from=False)
  return dict(r, layout=layout, n=n, global_batch=batch)


def rows(args) -> list[dict]:
  base = load_config(args.config)
  res = int(base.data.synthdyad.resolution) if is_video(base) else 0
  counts = [n for n in args.devices if n <= jax.device_count()]
  skipped = sorted(set(args.devices) - set(counts))
  if skipped:
    print(f"(only {jax.device_count()} devices: no runs on {skipped})")
  out, measured = [], {}
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
        # One device is the same program whatever the layout: measured once.
        key = ("one" if n == 1 else layout, n, batch)
        if key not in measured:
          measured[key] = run_one(base, layout, n, batch, res, args.steps, args.warmup,
                                  args.peak_tflops)
        r = dict(measured[key], layout=layout, kind=kind)
        out.append(r)
        print_row(r, out, flush=True)
  return out


def check_agreement(done: list[dict], rtol: float) -> list[str]:
  """Rows whose first-step loss or gradient norm differs from the reference run on the same
  global batch (the one-device run, else the first row with that batch) by more than `rtol`
  (relative); also non-finite ones. Sets each row's `reference` (its row index in `done`)."""
  bad = []
  for r in done:
    same = [j for j, d in enumerate(done) if d["global_batch"] == r["global_batch"]]
    ref = next((j for j in same if done[j]["n"] == 1), same[0])
    r["reference"] = ref
    for q in ("loss", "grad_norm"):
      a, b = r[q], done[ref][q]
      if not (math.isfinite(a) and abs(a - b) <= rtol * abs(b)):
        bad.append(f"{r['layout']} {r['kind']} on {r['n']} devices: {q} {a:.7g}, but "
                   f"{done[ref]['layout']} {done[ref]['kind']} on {done[ref]['n']} "
                   f"device(s) with the same global batch {r['global_batch']}: {b:.7g}")
  return bad


def efficiency(r: dict, done: list[dict]) -> float:
  one = [d for d in done if d["layout"] == r["layout"] and d["kind"] == r["kind"] and d["n"] == 1]
  if not one:
    return float("nan")
  t1, tn = one[0]["step_ms"], r["step_ms"]
  return t1 / tn if r["kind"] == "weak" else t1 / (r["n"] * tn)


COLUMNS = ("layout", "scaling", "devices", "mesh", "global batch", "step (ms)", "examples/s",
           "efficiency", "MFU / device", "loss", "grad norm")
HEADER = ("| " + " | ".join(COLUMNS) + " |\n"
          "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")


def format_row(r: dict) -> str:
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
  return (f"| {r['layout']} | {r['kind']} | {r['n']} | {mesh} | {r['global_batch']} | "
          f"{r['step_ms']:.1f} | {r['examples_per_s']:.1f} | {r['efficiency']:.2f} | "
          f"{100 * r['mfu']:.1f} % | {r['loss']:.5g} | {r['grad_norm']:.5g} |")


def print_row(r: dict, done: list[dict], flush: bool = False) -> None:
  r["efficiency"] = efficiency(r, done)
  print(format_row(r), flush=flush)


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
  ap.add_argument("--rtol", type=float, default=1e-2,
                  help="allowed relative difference of a layout's first-step loss and gradient "
                  "norm from the one-device run on the same batch (float32 on CPU agrees to "
                  "~1e-6; bf16 compute and TF32 matmuls to less)")
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
  bad = check_agreement(out, args.rtol)
  verdict = (f"\nLayouts DISAGREE (first-step loss / gradient norm, rtol {args.rtol:g}):\n  "
             + "\n  ".join(bad) if bad else
             f"\nEvery layout's first-step loss and gradient norm match the one-device run on "
             f"the same global batch (rtol {args.rtol:g}).")
  print(verdict, flush=True)
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write(title + "\n\n" + HEADER + "\n" + "".join(format_row(r) + "\n" for r in out))
      f.write(verdict + "\n")
  if bad:
    raise SystemExit(f"{len(bad)} rows compute another step than the one-device run (see above)")
  return out


if __name__ == "__main__":
  if "XLA_FLAGS" not in os.environ and jax.default_backend() == "cpu":
    print("(CPU: set XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting for "
          "several devices)")
  main()
