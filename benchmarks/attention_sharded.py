"""Benchmark: the Gaussian-attention kernels sharded over the GPUs of one host.

  python benchmarks/attention_sharded.py --out_md /tmp/attention_sharded.md

Times forward+backward (VJP w.r.t. q, k, v and σ) of `sharded_gaussian_attention` at
B8 N4096 H16 D128 (bf16, no mask unless --causal) on one GPU and on all GPUs of the host with
the work split over the batch (`data`), the heads (`tensor`) or the sequence: `context`
(queries split, K/V passed round the ring under the kernels, steps merged by lse; dK/dV travel
back the same way) or `context_all_gather` (K/V all-gathered inside the map, dK/dV
reduce-scattered back). Inputs are placed with the layout's
sharding before timing, so the time is the step's, not the host-to-device or resharding copy.
Timing as in benchmarks/attention.py: warm-up, then `--reps` rounds in a shuffled order, each
sample ~20 ms of back-to-back calls; median reported. Speedup = one GPU's time / this time.
"""
from __future__ import annotations

import argparse
import datetime
import os
import random
import statistics
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from attention import sample  # pylint: disable=g-import-not-at-top,wrong-import-position

from avatar_jax import sharding as shd  # pylint: disable=wrong-import-position
from avatar_jax.kernels.gaussian_attention import sharded  # pylint: disable=wrong-import-position

# Layout → (mesh axis, PartitionSpec of q/k/v [B, N, H, D], context schedule).
LAYOUTS = {"data": ("data", P("data"), "ring"),
           "tensor": ("tensor", P(None, None, "tensor"), "ring"),
           "context": ("context", P(None, "context"), "ring"),
           "context_all_gather": ("context", P(None, "context"), "all_gather")}


def step_fn(mesh, t, implementation, schedule="ring", causal=False):
  def loss(q, k, v, sigma):
    o = sharded.sharded_gaussian_attention(q, k, v, t, t, sigma, mesh=mesh,
                                           implementation=implementation,
                                           context_schedule=schedule, causal=causal)
    # dL/do = q: a cotangent sharded like the output, non-zero and not a broadcast.
    return jnp.sum(o.astype(jnp.float32) * q.astype(jnp.float32))
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--seq", type=int, default=4096)
  p.add_argument("--heads", type=int, default=16)
  p.add_argument("--dim", type=int, default=128)
  p.add_argument("--layouts", default="data,tensor,context,context_all_gather")
  p.add_argument("--causal", action="store_true")
  p.add_argument("--implementation", default="pallas_gpu")
  p.add_argument("--reps", type=int, default=15)
  p.add_argument("--out_md", default=None)
  args = p.parse_args(argv)
  devs = jax.devices()
  n = len(devs)
  if n < 2:
    raise SystemExit(f"attention_sharded.py needs at least 2 devices, found {n}")
  b, s, h, d = args.batch, args.seq, args.heads, args.dim
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((b, s, h, d)), jnp.bfloat16) for _ in range(3))
  t = jnp.asarray(np.broadcast_to(np.arange(s) / 25.0, (b, s)), jnp.float32)
  sigma = jnp.asarray(np.geomspace(0.04, 2.0, h), jnp.float32)

  runs = [("1 device", shd.make_mesh({"data": 1}, devices=devs[:1]), P(), "ring")]
  for name in (x for x in args.layouts.split(",") if x):
    if name not in LAYOUTS:
      raise SystemExit(f"unknown layout {name!r}; expected some of {sorted(LAYOUTS)}")
    axis, spec, schedule = LAYOUTS[name]
    runs.append((f"{n} devices, {name}", shd.make_mesh({axis: n}, devices=devs), spec,
                 schedule))
  live = []
  for label, mesh, spec, schedule in runs:
    fn = step_fn(mesh, t, args.implementation, schedule, args.causal)
    call_args = tuple(jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v)) + (
        jax.device_put(sigma, NamedSharding(mesh, P())),)
    for _ in range(3):
      jax.block_until_ready(fn(*call_args))
    t1 = sample(fn, [call_args], 1)
    live.append((label, fn, [call_args], max(1, min(20, int(0.02 / max(t1, 1e-6))))))
  samples = {label: [] for label, *_ in live}
  order = random.Random(0)
  for _ in range(args.reps):
    for label, fn, call_args, inner in order.sample(live, len(live)):
      samples[label].append(sample(fn, call_args, inner))
  ms = {label: statistics.median(x) * 1e3 for label, x in samples.items()}
  flops = 3.5 * 4.0 * b * h * s * s * d * (0.5 if args.causal else 1.0)
  header = (f"Device: {n} × {devs[0].device_kind}; jax {jax.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; bf16 "
            f"B{b} N{s} H{h} D{d}{', causal' if args.causal else ''}, fwd+bwd; median of {args.reps}; command: "
            f"`python benchmarks/attention_sharded.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`")
  lines = [header, "", "| layout | fwd+bwd ms | TF/s (all devices) | speedup over 1 device |",
           "|---|---:|---:|---:|"]
  for label, *_ in live:
    lines.append(f"| {label} | {ms[label]:.3f} | {flops / ms[label] / 1e9:.0f} | "
                 f"{ms['1 device'] / ms[label]:.2f}× |")
  table = "\n".join(lines) + "\n"
  print(table)
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write(table)


if __name__ == "__main__":
  main()
