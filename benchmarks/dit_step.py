"""Benchmark: video-DiT training steps (forward + backward), ours against diffusers, and the
Beyond Monologue model per audio-attention implementation.

  python -m benchmarks.dit_step                                   # GPU: both parts below
  python -m benchmarks.dit_step --parts wan --preset tiny --frames 3 --res 32x32 --text_len 8
                                                                  # CPU smoke test

Part "wan": the Wan 2.1 DiT at `--preset` (default the published 1.3B shape: 30 layers, 12 heads
× 128, text cross-attention to `--text_len` umT5 tokens) on `--frames` latent frames of `--res`
video (21 × 480×832 = 81 frames, 32,760 tokens), batch 1, random weights. Rows:
  ours (xla) / ours (cudnn)   models/dit.py, float32 parameters, bf16 compute, self-attention by
                              jax.nn.dot_product_attention(implementation=...), one jit of
                              value_and_grad of mean(out²)
  ours (cudnn, remat)         the same with every block rematerialised (`--remat off,on`), the
                              like-for-like row for diffusers with gradient checkpointing
  diffusers                   WanTransformer3DModel of the same shape (dit.diffusers_config),
                              float32 parameters under torch.autocast(bf16), SDPA attention,
                              loss.backward() of the same loss; when that runs out of memory
                              (it does at the 1.3B shape on a 141-GB H200), once more with
                              diffusers' gradient checkpointing, as "diffusers (grad ckpt)"
Part "bm": the Beyond Monologue model of configs/bm_synthdyad.py at `--bm_size`/`--bm_res`
(its training loss on random latents and log-mels, batch `--bm_batch`), one row per
implementation of the audio cross-attention: fused (our Pallas kernel), xla (materialised bias,
XLA attention), cudnn_bias (materialised bias through cuDNN's fused attention).

Timing: `--warmup` calls, then the median of `--reps`, each ended by a device sync. FLOPs: XLA's
cost analysis of our compiled step (for the BM rows, of its xla row, so every row is scored on
the same model FLOPs); MFU = FLOPs / step time / peak, against the 989 TF/s dense-bf16 data
sheet of an H100/H200 (`--peak_tflops`) and against the bf16 matmul rate measured here
(8192³). The diffusers row is scored on our FLOPs (same model).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # torch shares the GPU

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatar_jax.models import dit
from benchmarks.wav2vec2 import time_fn


def median_time(fn, sync, reps: int, warmup: int) -> float:
  """Median seconds of one call of fn() after `warmup` calls (benchmarks/wav2vec2.py's timer)."""
  return time_fn(fn, sync, reps, warmup=warmup)


def jax_sync(x):
  jax.block_until_ready(x)


def matmul_tflops(n: int = 8192, reps: int = 10) -> float:
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x: x @ x)
  s = median_time(lambda: f(a), jax_sync, reps, 2)
  return 2 * n ** 3 / s / 1e12


def compiled_flops(compiled) -> float:
  """XLA's FLOPs of a compiled (or lowered) step. A lowered XLA-attention step is the one to
  score: cuDNN's fused attention is a custom call whose FLOPs the cost analysis does not see."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", float("nan")))


def timed_or_none(fn, sync, args, label: str):
  """Median seconds of fn, or None (printing why) when the device runs out of memory: at the
  1.3B shape XLA's attention keeps 30 layers × 12 heads × 32,760² scores for the backward."""
  try:
    return median_time(fn, sync, args.reps, args.warmup)
  except Exception as e:  # pylint: disable=broad-except
    if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
      raise
    print(f"| {label} | out of memory: {str(e).splitlines()[0][:120]} |", flush=True)
    return None


def wan_rows(args) -> list[dict]:
  cfg = dit.default_config(args.preset)
  cfg.update(use_text=args.text_len > 0, dtype="bfloat16", param_dtype="float32")
  h, w = (int(v) for v in args.res.split("x"))
  lh, lw = h // 8, w // 8
  b, f = 1, args.frames
  rng = np.random.default_rng(0)
  x = rng.standard_normal((b, f, lh, lw, cfg.in_channels)).astype(np.float32)
  ts = np.full((b,), 500.0, np.float32)
  text = (rng.standard_normal((b, args.text_len, cfg.text_dim)).astype(np.float32)
          if args.text_len else None)
  tokens = f * (lh // cfg.patch_size[1]) * (lw // cfg.patch_size[2])
  # diffusers first: torch hands its cached memory back (empty_cache), whereas JAX's allocator
  # keeps what our rows used, which left diffusers out of memory at the 1.3B shape.
  rows = diffusers_rows(args, cfg, x, ts, text, tokens)
  flops = float("nan")
  for impl, remat in [(i, r) for r in args.remat for i in args.attn]:
    c = cfg.copy_and_resolve_references()
    c.attention_impl, c.remat = impl, remat == "on"
    name = f"ours ({impl}, remat)" if c.remat else f"ours ({impl})"
    model = dit.DiT(c, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)

    def loss(p, x, ts, text, graphdef=graphdef):
      out = nnx.merge(graphdef, p)(x, ts, text=text)
      return jnp.mean(jnp.square(out))

    step = jax.jit(jax.value_and_grad(loss))
    if np.isnan(flops):                    # the model's FLOPs, from its XLA-attention lowering
      c_xla = c.copy_and_resolve_references()
      c_xla.attention_impl, c_xla.remat = "xla", False
      g_xla, p_xla = nnx.split(dit.DiT(c_xla, rngs=nnx.Rngs(0)))
      lowered = jax.jit(jax.value_and_grad(functools.partial(loss, graphdef=g_xla))).lower(
          p_xla, x, ts, text)
      flops = compiled_flops(lowered)
      if np.isnan(flops) or flops <= 0:    # some backends analyse only compiled programs
        flops = compiled_flops(lowered.compile())
      del g_xla, p_xla, lowered
    try:
      compiled = step.lower(params, x, ts, text).compile()
    except Exception as e:  # pylint: disable=broad-except  (cuDNN unavailable on CPU)
      print(f"| wan {args.preset} | {name} | skipped: {type(e).__name__}: {str(e)[:80]} |",
            flush=True)
      continue
    s = timed_or_none(lambda: compiled(params, x, ts, text), jax_sync, args,
                      f"wan {args.preset} | {name}")
    if s is None:
      del model, params, compiled
      continue
    rows.append(dict(part="wan", shape=args.preset, tokens=tokens, batch=b,
                     impl=name, ms=s * 1e3, flops=flops))
    print_row(rows[-1], args, flush=True)
    del model, params, compiled
  for r in rows:
    if r["impl"].startswith("diffusers"):  # scored on our model's FLOPs, known only now
      r["flops"] = flops
      print_row(r, args, flush=True)
  return rows


def diffusers_rows(args, cfg, x, ts, text, tokens) -> list[dict]:
  """diffusers' WanTransformer3DModel of the same shape, same loss; [] when not installed."""
  b = x.shape[0]
  try:
    import diffusers  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("(diffusers or torch missing: no diffusers row)")
    return []
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True
  torch.manual_seed(0)
  ref = diffusers.WanTransformer3DModel(**dit.diffusers_config(cfg)).to(dev).train()
  xt = torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous().to(dev)   # [B, C, F, H, W]
  tt = torch.from_numpy(ts).to(dev)
  et = (torch.from_numpy(text).to(dev) if text is not None
        else torch.zeros(b, 1, cfg.text_dim, device=dev))
  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  amp = torch.bfloat16

  def ref_step():
    ref.zero_grad(set_to_none=True)
    with torch.autocast(device_type=dev, dtype=amp):
      out = ref(xt, tt, et, return_dict=False)[0]
    loss = out.float().square().mean()
    loss.backward()
    return loss

  def free():
    ref.zero_grad(set_to_none=True)
    gc.collect()   # the out-of-memory traceback's frames hold the autograd graph until collected
    if dev == "cuda":
      torch.cuda.empty_cache()

  impl = "diffusers"
  s = timed_or_none(ref_step, sync, args, f"wan {args.preset} | {impl}")
  if s is None:
    free()
    ref.enable_gradient_checkpointing()
    impl = "diffusers (grad ckpt)"
    s = timed_or_none(ref_step, sync, args, f"wan {args.preset} | {impl}")
  del ref, xt, tt, et
  gc.collect()
  if dev == "cuda":
    torch.cuda.empty_cache()
  return [] if s is None else [dict(part="wan", shape=args.preset, tokens=tokens, batch=b,
                                    impl=impl, ms=s * 1e3)]




def bm_batch(config, b: int, res: int, seed: int = 0) -> dict[str, np.ndarray]:
  """A random training batch of the video DiT of `config` (pre-encoded layout): b windows of
  config.data.clip_frames frames at `res` px, i.e. clip_frames/4 latent frames of res/8."""
  f, lat = config.data.clip_frames // 4, res // 8
  rng = np.random.default_rng(seed)
  n_mels = int(config.data.features.n_mels)
  return {"latent_self": rng.standard_normal((b, f, lat, lat, 16)).astype(np.float32),
          "reference_latent": rng.standard_normal((b, 1, lat, lat, 16)).astype(np.float32),
          "mel_self": rng.standard_normal((b, 2 * 4 * f, n_mels)).astype(np.float32),
          "mel_partner": rng.standard_normal((b, 2 * 4 * f, n_mels)).astype(np.float32),
          "clip_start": np.zeros((b,), np.int32)}


def bm_rows(args) -> list[dict]:
  import importlib.util  # pylint: disable=g-import-not-at-top

  from avatar_jax.models.video import beyond_monologue as bm  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "bm_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "bm_synthdyad.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  rows, flops = [], float("nan")
  # xla first (its FLOPs score all), the fused kernel last: on the H200 its GPU-side compile
  # took minutes and once left no time for the rows after it.
  rank = {"xla": 0, "fused": 2}
  order = sorted(args.bm_attn, key=lambda i: rank.get(i, 1))
  for impl in order:
    config = mod.get_config(f"size={args.bm_size},res={args.bm_res},vae=,batch={args.bm_batch}")
    config.data.source = "synthdyad"        # only data facts (fps, mel rate) are read
    config.model.adapters.implementation = {"fused": "pallas_gpu"}.get(impl, impl)
    system = bm.System(config)
    model = system.build(rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    b, f = args.bm_batch, config.data.clip_frames // 4
    lat = args.bm_res // 8
    batch = bm_batch(config, b, args.bm_res)

    def loss(p, batch, key, graphdef=graphdef, rest=rest, system=system):
      return system.loss(nnx.merge(graphdef, p, rest), batch, key)[0]

    step = jax.jit(jax.value_and_grad(loss))
    key = jax.random.key(0)
    try:
      compiled = step.lower(params, batch, key).compile()
    except Exception as e:  # pylint: disable=broad-except  (a GPU-only backend elsewhere)
      print(f"| bm {args.bm_size}@{args.bm_res} | {impl} | skipped: {type(e).__name__}: "
            f"{str(e)[:80]} |", flush=True)
      continue
    if np.isnan(flops):
      flops = compiled_flops(compiled)
    s = timed_or_none(lambda: compiled(params, batch, key), jax_sync, args,
                      f"bm {args.bm_size}@{args.bm_res} | {impl}")
    if s is None:
      continue
    tokens = (f + 1) * (lat // 2) ** 2
    rows.append(dict(part="bm", shape=f"{args.bm_size} @ {args.bm_res}px", tokens=tokens,
                     batch=b, impl=impl, ms=s * 1e3, flops=flops))
    print_row(rows[-1], args, flush=True)
  return rows


def print_row(r, args, flush=False):
  tflops = r["flops"] / (r["ms"] / 1e3) / 1e12
  print(f"| {r['part']} {r['shape']} | {r['tokens'] * r['batch']:,} | {r['impl']} | "
        f"{r['ms']:.1f} | {tflops:.0f} | {100 * tflops / args.peak_tflops:.1f} % | "
        f"{100 * tflops / args.matmul_tflops:.1f} % |", flush=flush)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--parts", default="wan,bm")
  ap.add_argument("--preset", default="wan2.1-1.3B")
  ap.add_argument("--frames", type=int, default=21, help="latent frames (81 video frames)")
  ap.add_argument("--res", default="480x832")
  ap.add_argument("--text_len", type=int, default=512)
  ap.add_argument("--attn", default="cudnn,xla", help="ours: self-attention implementations")
  ap.add_argument("--remat", default="off,on", help="ours: without / with per-block remat")
  ap.add_argument("--bm_size", default="B")
  ap.add_argument("--bm_res", type=int, default=128)
  ap.add_argument("--bm_batch", type=int, default=32)
  ap.add_argument("--bm_attn", default="fused,xla,cudnn_bias")
  ap.add_argument("--reps", type=int, default=5)
  ap.add_argument("--warmup", type=int, default=2)
  ap.add_argument("--peak_tflops", type=float, default=989.0)
  ap.add_argument("--out_md", default="")
  args = ap.parse_args(argv)
  args.attn = [a for a in args.attn.split(",") if a]
  args.remat = [r for r in args.remat.split(",") if r]
  if set(args.remat) - {"off", "on"}:
    ap.error(f"--remat takes off and/or on, got {args.remat}")
  args.bm_attn = [a for a in args.bm_attn.split(",") if a]
  dev = jax.devices()[0]
  args.matmul_tflops = matmul_tflops(8192 if dev.platform == "gpu" else 512)
  head = (f"DiT train step (forward + backward), {dev.device_kind}, jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
          f"{platform.node()}; measured bf16 matmul {args.matmul_tflops:.0f} TF/s")
  table = ["| model | tokens × batch | implementation | step (ms) | TF/s | MFU (data sheet) | "
           "MFU (measured matmul) |", "|---|---:|---|---:|---:|---:|---:|"]
  print(head + "\n\n" + "\n".join(table), flush=True)
  rows = []
  parts = args.parts.split(",")
  if "wan" in parts:
    rows += wan_rows(args)
  if "bm" in parts:
    rows += bm_rows(args)
  if args.out_md:
    import contextlib  # pylint: disable=g-import-not-at-top
    import io  # pylint: disable=g-import-not-at-top
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
      for r in rows:
        print_row(r, args)
    with open(args.out_md, "w") as fh:
      fh.write(head + "\n\n" + "\n".join(table) + "\n" + buf.getvalue())


if __name__ == "__main__":
  main()
