"""Benchmark: Gaussian time-distance attention on one GPU against its peers.

  python benchmarks/attention.py --out_md /tmp/attention_table.md --out_json /tmp/attention.json

Times forward and forward+backward (VJP w.r.t. q, k, v and σ) of
  * ours: avatar_jax pallas_gpu kernels (bias computed on the fly, band skipping optional),
    called through `api.gaussian_attention` as a user would: the forward row is the
    undifferentiated call (row sums on the tensor cores, no float32 lse kept), the
    forward+backward row the differentiated one (float32 row sums for the backward);
  * cudnn_nobias: jax.nn.dot_product_attention(implementation="cudnn"), no bias (a ceiling);
  * cudnn_bias / xla_bias / tokamax_bias: the same attention with the Gaussian bias
    materialised as a [1, H, Nq, Nk] array from σ inside the timed function, so dσ comes from
    autodiff through the bias;
  * tokamax_bias_tuned: tokamax_bias compiled under the configs `tokamax.autotune` picks for
    the shape (forward and VJP kernels); tokamax_bias uses its default heuristics.

Timing: after 3 warm-up calls, `--reps` rounds; in each round every implementation of the shape
is sampled once (interleaved, so clock drift hits all alike), in an order shuffled anew each
round (seeded), because a sample's time depends on what ran just before it (likely the clock
after a power-hungry peer): in a fixed order, two copies of one forward kernel, which time
the same when shuffled, measured 5 % apart. A sample is the wall time of k back-to-back calls (k ≈ `--sample_ms` worth,
20 ms by default, and at most that many calls; rotating over up to 3 input sets of fresh
random normal data so repeated calls do not hit in L2) ended by block_until_ready, divided by
k. Each sample also carries one host dispatch and one sync (≈ 0.3–0.6 ms for every
implementation here), so short samples of slow calls (k = 3–4 at 20 ms for forward+backward)
read a few % high; `--sample_ms 100` gives numbers closer to back-to-back throughput
(docs/notes/attention_gpu_runs.md, runs 89–92). The median sample is reported, with the (max −
min)/median spread in the JSON. FLOP convention: forward = 4·B·H·Nq·Nk·D (two matmuls, every
pair counted, no causal discount — the benchmark shapes have no mask), forward+backward = 3.5×
that (the usual 2 + 5 matmul count). Band skipping is reported against the dense FLOP count, so
its "TF/s" is an effective rate. Memory: XLA's compiled temp + output bytes of the timed
function (inputs excluded), from `compiled.memory_analysis()`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from avatar_jax.kernels.gaussian_attention import api

SHAPES = {
    # name: (B, Nq, Nk, H, D, fps_q, fps_k, sigma range (s), bias_cutoff)
    "self_b4_n4096": (4, 4096, 4096, 16, 128, 25.0, 25.0, (0.04, 2.0), None),
    "self_b1_n8192": (1, 8192, 8192, 16, 128, 25.0, 25.0, (0.04, 2.0), None),
    "cross_b2_q8448_k1056_d64": (2, 8448, 1056, 16, 64, 25.0, 25.0 / 8, (0.04, 2.0), None),
    "long_b1_n32768": (1, 32768, 32768, 16, 128, 25.0, 25.0, (0.04, 2.0), None),
    "band_b1_n32768_sigma_le_2fr": (1, 32768, 32768, 16, 128, 25.0, 25.0, (0.02, 0.08), 20.0),
    # grouped heads: 16 query heads on 4 K/V heads (same FLOPs as self_b4_n4096)
    "gqa_b4_n4096_hkv4": (4, 4096, 4096, 16, 128, 25.0, 25.0, (0.04, 2.0), None),
    # a length that is not a multiple of the tiles (160 s of video at 25 fps)
    "ragged_b4_n4000": (4, 4000, 4000, 16, 128, 25.0, 25.0, (0.04, 2.0), None),
    "smoke": (1, 256, 256, 2, 64, 25.0, 25.0, (0.04, 2.0), None),  # script check, not reported
}
KV_HEADS = {"gqa_b4_n4096_hkv4": 4}  # K/V heads where fewer than the query heads
PEERS = ("ours", "cudnn_nobias", "cudnn_bias", "xla_bias", "tokamax_bias", "tokamax_bias_tuned")


def gaussian_bias(t_q, t_k, sigma, dtype):
  """[1, H, Nq, Nk] bias −(t_q − t_k)²/(2σ²) from the first batch row's times."""
  dt = t_q[0][:, None] - t_k[0][None, :]
  inv = 0.5 / jnp.square(sigma)
  return (-(dt * dt)[None] * inv[:, None, None]).astype(dtype)[None]


def make_fn(peer, t_q, t_k, cutoff, dtype, blocks):
  """(q, k, v, sigma) -> out for one implementation."""
  if peer == "ours_dense":  # band-skipping shapes: the same kernel without the cutoff
    peer, cutoff = "ours", None
  if peer == "ours":
    def f(q, k, v, sigma):
      return api.gaussian_attention(q, k, v, t_q, t_k, sigma, implementation="pallas_gpu",
                                    bias_cutoff=cutoff, **blocks)
  elif peer == "cudnn_nobias":
    def f(q, k, v, sigma):
      del sigma
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
  elif peer in ("cudnn_bias", "xla_bias"):
    impl = peer.split("_")[0]

    def f(q, k, v, sigma):
      bias = gaussian_bias(t_q, t_k, sigma, dtype)
      return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation=impl)
  elif peer in ("tokamax_bias", "tokamax_bias_tuned"):  # tuned: see compile_fn
    import tokamax  # pylint: disable=g-import-not-at-top

    def f(q, k, v, sigma):
      bias = gaussian_bias(t_q, t_k, sigma, dtype)
      return tokamax.dot_product_attention(q, k, v, bias=bias, implementation="mosaic")
  else:
    raise ValueError(peer)
  return f


def compile_fn(fn, arg_sets, tune=False):
  """Compiled fn; tune=True first runs tokamax.autotune on it and compiles under the configs
  it picked (what a tokamax user does for a fixed shape)."""
  lowered = jax.jit(fn).lower(*arg_sets[0])
  if tune:
    import tokamax  # pylint: disable=g-import-not-at-top
    with tokamax.autotune(lowered, progress_bar=False):
      compiled = jax.jit(fn).lower(*arg_sets[0]).compile()
  else:
    compiled = lowered.compile()
  mem = None
  try:
    ma = compiled.memory_analysis()
    mem = (ma.temp_size_in_bytes + ma.output_size_in_bytes) / 2**30
  except Exception:  # pylint: disable=broad-except
    pass
  for i in range(3):  # warm-up (also surfaces run-time OOM before timing)
    jax.block_until_ready(compiled(*arg_sets[i % len(arg_sets)]))
  return compiled, mem


def sample(compiled, arg_sets, inner):
  """Seconds per call over `inner` back-to-back calls (rotating inputs), one sync at the end."""
  t0 = time.perf_counter()
  outs = [compiled(*arg_sets[i % len(arg_sets)]) for i in range(inner)]
  jax.block_until_ready(outs)
  return (time.perf_counter() - t0) / inner


def run_shape(name, variants, reps, dtype, log, sample_ms=20.0):
  """variants: list of (label, peer, blocks). Rows of all variants, timed in interleaved rounds
  (each round samples every variant once, in a shuffled order) so clock or thermal drift and
  the power draw of the variant before hit all of them alike."""
  b, nq, nk, h, d, fq, fk, (s_lo, s_hi), cutoff = SHAPES[name]
  hkv = KV_HEADS.get(name, h)
  t_q = jnp.broadcast_to(jnp.arange(nq, dtype=jnp.float32) / fq, (b, nq))
  t_k = jnp.broadcast_to(jnp.arange(nk, dtype=jnp.float32) / fk, (b, nk))
  sigma = jnp.asarray(np.geomspace(s_lo, s_hi, h), jnp.float32)
  per_set = 2 * (b * nq * h * d + 2 * b * nk * hkv * d) * 2  # q,k,v,do bytes (bf16)
  n_sets = 3 if per_set * 3 < 6 * 2**30 else 1
  rng = jax.random.split(jax.random.key(0), n_sets)

  def inputs(key):
    kq, kk, kv, kd = jax.random.split(key, 4)
    return tuple(jax.random.normal(kx, shp, dtype) for kx, shp in (
        (kq, (b, nq, h, d)), (kk, (b, nk, hkv, d)), (kv, (b, nk, hkv, d)), (kd, (b, nq, h, d))))

  sets = [inputs(r) for r in rng]
  flops_fwd = 4.0 * b * h * nq * nk * d
  rows, live = [], []
  for label, peer, blocks in variants:
    try:
      fwd = make_fn(peer, t_q, t_k, cutoff, dtype, blocks)
    except Exception as e:  # pylint: disable=broad-except
      for mode in ("fwd", "fwd+bwd"):
        rows.append(dict(shape=name, peer=label, mode=mode, error=f"{type(e).__name__}: {e}"))
      continue

    def fwd_bwd(q, k, v, sigma, do, fwd=fwd):
      _, vjp = jax.vjp(fwd, q, k, v, sigma)
      return vjp(do)

    for mode in ("fwd", "fwd+bwd"):
      row = dict(shape=name, peer=label, mode=mode)
      rows.append(row)
      try:
        if mode == "fwd":
          args = [(q, k, v, sigma) for q, k, v, _ in sets]
          compiled, mem = compile_fn(fwd, args, tune=peer.endswith("_tuned"))
          row["flops"] = flops_fwd
        else:
          args = [(q, k, v, sigma, do) for q, k, v, do in sets]
          compiled, mem = compile_fn(fwd_bwd, args, tune=peer.endswith("_tuned"))
          row["flops"] = 3.5 * flops_fwd
        row["mem_gib"] = mem
        t1 = sample(compiled, args, 1)
        inner = max(1, min(int(sample_ms), int(sample_ms * 1e-3 / max(t1, 1e-6))))
        live.append((row, compiled, args, inner))
      except Exception as e:  # pylint: disable=broad-except
        msg = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
          msg = "OOM: " + msg
        row["error"] = msg
        traceback.print_exc(file=log)
  samples = {id(r): [] for r, *_ in live}
  order = random.Random(0)
  for _ in range(reps):
    for row, compiled, args, inner in order.sample(live, len(live)):
      samples[id(row)].append(sample(compiled, args, inner))
  for row, *_ in live:
    t = statistics.median(samples[id(row)])
    row.update(ms=t * 1e3, tflops=row["flops"] / t / 1e12,
               spread=(max(samples[id(row)]) - min(samples[id(row)])) / t)
  for row in rows:
    print(json.dumps(row), flush=True)
  return rows


def markdown(rows, header):
  out = [header, "", "| shape | implementation | mode | ms | TF/s | temp+out GiB |",
         "|---|---|---|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['shape']} | {r['peer']} | {r['mode']} | — | — | {r['error']} |")
    else:
      mem = "—" if r.get("mem_gib") is None else f"{r['mem_gib']:.2f}"
      out.append(f"| {r['shape']} | {r['peer']} | {r['mode']} | {r['ms']:.3f} | "
                 f"{r['tflops']:.0f} | {mem} |")
  return "\n".join(out) + "\n"


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--shapes", default=",".join(SHAPES))
  p.add_argument("--peers", default=",".join(PEERS))
  p.add_argument("--reps", type=int, default=20)
  p.add_argument("--dtype", default="bfloat16")
  p.add_argument("--sample_ms", type=float, default=20.0,
                 help="wall time one sample aims at, in ms (k back-to-back calls, k <= this number)")
  p.add_argument("--blocks", default="", help="ours' block sizes, e.g. block_q=64,block_kv=128")
  p.add_argument("--sweep", default="",
                 help="';'-separated [shape:]k=v,k=v block configs of ours, timed with the peers")
  p.add_argument("--sweep_shape", default="self_b4_n4096")
  p.add_argument("--out_md", default=None)
  p.add_argument("--out_json", default=None)
  args = p.parse_args(argv)
  blocks = {k: int(v) for k, v in (kv.split("=") for kv in args.blocks.split(",") if kv)}
  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  header = (f"Device: {dev.device_kind}; jax {jax.__version__}; "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; "
            f"dtype {args.dtype}; median of {args.reps}; command: "
            f"`python benchmarks/attention.py {' '.join(argv if argv is not None else sys.argv[1:])}`")
  rows = []
  sweep = {}
  for item in (v for v in args.sweep.split(";") if v):
    shape, cfg = item.split(":") if ":" in item else (args.sweep_shape, item)
    sweep.setdefault(shape, []).append(cfg)
  for name in (x for x in args.shapes.split(",") if x):
    if SHAPES[name][-1] is not None:  # band skipping: ours with and without the cutoff
      variants = [("ours", "ours", blocks), ("ours_dense", "ours_dense", blocks)]
    else:
      variants = [(p, p, blocks) for p in args.peers.split(",")]
    for cfg in sweep.get(name, []):
      vb = dict(blocks, **{k: int(x) for k, x in (kv.split("=") for kv in cfg.split(",") if kv)})
      variants.append((f"ours[{cfg}]", "ours", vb))
    rows += run_shape(name, variants, args.reps, dtype, sys.stderr, args.sample_ms)
  table = markdown(rows, header)
  print(table)
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write(table)
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump(dict(header=header, rows=rows), f, indent=1)


if __name__ == "__main__":
  main()
