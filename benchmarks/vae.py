"""Benchmark: Wan 2.1 VAE encode / decode throughput, ours (JAX, jit) against diffusers'
`AutoencoderKLWan` (PyTorch), same random weights, same process.

  python benchmarks/vae.py                                      # GPU: the three shapes below
  python benchmarks/vae.py --shapes tiny --res 32 --frames 5    # CPU smoke test of the script

Default cases (batch 1, 17 frames = 5 latent frames): the `S` config at 64×64 and 128×128 (the
SynthDyad sizes) and the published `wan2.1` config at 480×832. `--shapes`/`--res` replace them
with their cross product (res "64" or "480x832").

Implementations (rows):
  ours (chunk c)  WanVAE.encode/decode chunked: frame 0, then `lax.scan` over chunks of c latent
                  frames (4c video frames) with the causal tails as carry; c = 1 is diffusers'
                  schedule. Parameters float32, compute `--dtype`, whole call under one jax.jit.
  ours (full)     the whole clip through each layer at once (more memory, no scan).
  diffusers       AutoencoderKLWan.encode(...).latent_dist.mode() and .decode(...).sample, the
                  model cast to `--dtype` (parameters included), torch.inference_mode,
                  cudnn.benchmark on (it only helps torch here).

Timing: compile / warm-up calls first (`--warmup`), then `--reps` timed calls, each ended by a
device sync (block_until_ready / torch.cuda.synchronize); the median is reported. encode fps =
B·T video frames / s; decode fps = B·T video frames produced / s. speedup = ours / diffusers for
encode and decode. `max|Δz|` is the largest latent difference between the implementation and
diffusers (bf16 on both sides, so ~1e-2 is expected). The JSON (`--out_json`) adds peak memory:
XLA's compiled temp + output bytes for ours, torch.cuda.max_memory_allocated for diffusers.

Needs torch + diffusers (the [convert] extra) for the reference rows; without them only ours runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

# Both frameworks share the GPU: JAX must not grab 75 % of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatar_jax.models import vae

DEFAULT_CASES = (("S", 64, 64), ("S", 128, 128), ("wan2.1", 480, 832))


def parse_res(text: str) -> tuple[int, int]:
  h, _, w = text.partition("x")
  return int(h), int(w or h)


def timed(fn, sync, reps: int, warmup: int) -> tuple[float, object]:
  """(median seconds of one call, last output)."""
  out = None
  for _ in range(warmup):
    out = fn()
    sync(out)
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    out = fn()
    sync(out)
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def reference_model(cfg, seed: int):
  """(diffusers AutoencoderKLWan with torch.manual_seed(seed) weights, its state dict as NumPy),
  or (None, None) without torch/diffusers."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from diffusers import AutoencoderKLWan  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None, None
  torch.manual_seed(seed)
  ref = AutoencoderKLWan(**vae.diffusers_config(cfg)).eval()
  return ref, {k: v.float().numpy() for k, v in ref.state_dict().items()}


def random_state(cfg, seed: int) -> dict[str, np.ndarray]:
  """Random torch-layout weights under diffusers names, when diffusers is absent."""
  rng = np.random.default_rng(seed)
  abstract = nnx.eval_shape(lambda: vae.WanVAE(cfg, rngs=nnx.Rngs(0)))
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
    name, shape = vae.diffusers_key(path), tuple(var.shape)
    if str(path[-1]) == "kernel":   # ours [*window, in, out] -> torch [out, in, *window]
      shape = (shape[-1], shape[-2], *shape[:-2])
      out[name] = rng.normal(0, 1 / np.sqrt(np.prod(shape[1:])), shape).astype(np.float32)
    else:
      fill = np.ones if str(path[-1]) == "gamma" else np.zeros
      out[name] = fill(shape, np.float32)
  return out


def bench_ours(cfg, tensors, video, *, chunked, chunk, reps, warmup):
  model = vae.from_diffusers_state(tensors, cfg)
  graphdef, state = nnx.split(model)
  enc = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v, chunked=chunked, chunk=chunk))
  dec = jax.jit(lambda s, z: nnx.merge(graphdef, s).decode(z, chunked=chunked, chunk=chunk))
  x = jnp.asarray(video)
  mem = {}
  t0 = time.perf_counter()
  compiled_enc = enc.lower(state, x).compile()
  z_shape = jax.eval_shape(lambda s, v: enc(s, v), state, x)
  compiled_dec = dec.lower(state, jnp.zeros(z_shape.shape, z_shape.dtype)).compile()
  compile_s = time.perf_counter() - t0
  for name, c in (("encode", compiled_enc), ("decode", compiled_dec)):
    m = c.memory_analysis()
    if m is not None:
      mem[name] = (m.temp_size_in_bytes + m.output_size_in_bytes) / 2**30
  sync = jax.block_until_ready
  t_enc, z = timed(lambda: compiled_enc(state, x), sync, reps, warmup)
  t_dec, _ = timed(lambda: compiled_dec(state, z), sync, reps, warmup)
  return dict(encode_s=t_enc, decode_s=t_dec, compile_s=compile_s, mem_gib=mem), np.asarray(z)


def bench_diffusers(ref, video, *, dtype, device, reps, warmup):
  import torch  # pylint: disable=g-import-not-at-top
  torch.backends.cudnn.benchmark = True
  tdtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
  model = ref.to(device=device, dtype=tdtype)
  x = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 4, 1, 2, 3))).to(device, tdtype)
  cuda = device == "cuda"
  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  mem = {}
  with torch.inference_mode():
    if cuda:
      torch.cuda.reset_peak_memory_stats()
    t_enc, z = timed(lambda: model.encode(x).latent_dist.mode(), sync, reps, warmup)
    if cuda:
      mem["encode"] = torch.cuda.max_memory_allocated() / 2**30
      torch.cuda.reset_peak_memory_stats()
    t_dec, _ = timed(lambda: model.decode(z).sample, sync, reps, warmup)
    if cuda:
      mem["decode"] = torch.cuda.max_memory_allocated() / 2**30
  z_np = z.float().cpu().numpy().transpose(0, 2, 3, 4, 1)
  model.to("cpu")
  if cuda:
    torch.cuda.empty_cache()
  return dict(encode_s=t_enc, decode_s=t_dec, mem_gib=mem), z_np


def run_case(preset, h, w, args):
  cfg = vae.default_config(preset)
  cfg.dtype = args.dtype
  frames, b = args.frames, args.batch
  video = np.random.default_rng(0).uniform(-1, 1, (b, frames, h, w, 3)).astype(np.float32)
  ref, tensors = reference_model(cfg, args.seed) if "diffusers" in args.impls else (None, None)
  if tensors is None:
    tensors = random_state(cfg, args.seed)
  rows = []
  z_ref = None
  if ref is not None:
    import torch  # pylint: disable=g-import-not-at-top
    device = "cuda" if torch.cuda.is_available() else "cpu"
    r, z_ref = bench_diffusers(ref, video, dtype=args.torch_dtype, device=device, reps=args.reps,
                               warmup=args.warmup)
    rows.append(dict(impl=f"diffusers ({device}, {args.torch_dtype})", **r))
  variants = [(f"ours (chunk {c})", True, c) for c in args.chunks]
  if "full" in args.impls:
    variants.append(("ours (full)", False, None))
  for name, chunked, chunk in variants:
    r, z = bench_ours(cfg, tensors, video, chunked=chunked, chunk=chunk, reps=args.reps,
                      warmup=args.warmup)
    if z_ref is not None:
      r["max_abs_dz"] = float(np.abs(z - z_ref).max())
    rows.append(dict(impl=f"{name}, {args.dtype}", **r))
  base = rows[0] if ref is not None else None
  for r in rows:
    r.update(shape=preset, res=f"{h}x{w}", frames=frames, batch=b,
             encode_fps=b * frames / r["encode_s"], decode_fps=b * frames / r["decode_s"])
    if base is not None and r is not base:
      r["speedup_encode"] = base["encode_s"] / r["encode_s"]
      r["speedup_decode"] = base["decode_s"] / r["decode_s"]
  return rows


def format_table(rows) -> str:
  lines = ["| shape | res | frames | impl | encode fps | decode fps | speedup (enc / dec) "
           "| max\\|Δz\\| |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    speed = (f"{r['speedup_encode']:.2f}× / {r['speedup_decode']:.2f}×" if "speedup_encode" in r
             else ("1.00× / 1.00×" if r["impl"].startswith("diffusers") else "–"))
    dz = f"{r['max_abs_dz']:.2e}" if "max_abs_dz" in r else "–"
    lines.append(f"| {r['shape']} | {r['res']} | {r['frames']} | {r['impl']} | "
                 f"{r['encode_fps']:.1f} | {r['decode_fps']:.1f} | {speed} | {dz} |")
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default=None, help="comma list of presets (tiny,S,wan2.1)")
  p.add_argument("--res", default=None, help="comma list of H or HxW (with --shapes)")
  p.add_argument("--frames", type=int, default=17, help="1 + 4k video frames")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--chunks", default="1", help="comma list of latent frames per scan step")
  p.add_argument("--impls", default="diffusers,full", help="extra rows: diffusers, full")
  p.add_argument("--dtype", default=None,
                 help="compute dtype of both (default bfloat16 on GPU, float32 on CPU)")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out_json", default=None)
  p.add_argument("--out_md", default=None)
  args = p.parse_args(argv)
  on_accel = jax.default_backend() != "cpu"
  args.dtype = args.dtype or ("bfloat16" if on_accel else "float32")
  args.torch_dtype = args.dtype
  args.chunks = [int(c) for c in args.chunks.split(",") if c]
  args.impls = set(args.impls.split(","))
  if args.shapes:
    res = [parse_res(r) for r in (args.res or "64").split(",")]
    cases = [(s, h, w) for s in args.shapes.split(",") for h, w in res]
  else:
    cases = DEFAULT_CASES
  rows = []
  for preset, h, w in cases:
    rows += run_case(preset, h, w, args)
  when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  header = (f"Wan VAE encode/decode, {when}, {platform.node()}, jax {jax.__version__} on "
            f"{jax.devices()[0].device_kind}, batch {args.batch}, median of {args.reps}")
  table = format_table(rows)
  print(header)
  print(table)
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write(header + "\n\n" + table + "\n")
  if args.out_json:
    with open(args.out_json, "w") as f:
      json.dump(dict(header=header, rows=rows), f, indent=2)


if __name__ == "__main__":
  main()
