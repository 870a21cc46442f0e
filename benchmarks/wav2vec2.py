"""Benchmark: wav2vec2 feature extraction, our JAX model against PyTorch `transformers`.

  python -m benchmarks.wav2vec2                        # GPU: base + large_lv60, batch 8 × 10 s
  python -m benchmarks.wav2vec2 --seconds 1 --batch 1 --shapes tiny      # CPU smoke check

Both run the same random weights (a `transformers.Wav2Vec2Model` of the preset's shape, imported
with `from_hf_tensors`) on the same device, forward only, returning last_hidden_state:
  * jax:  jit of `Wav2Vec2` with float32 params, compute in float32 or bfloat16 (XLA attention;
          on GPU also bfloat16 with cuDNN fused attention, "jax cudnn-attn");
  * torch: eval + inference_mode, float32, and fp16 / bf16 autocast (fp16 on CUDA only),
          HF's default attention (sdpa).
float32 matmuls: `--fp32_precision tf32` (default) lets both use TF32 (JAX's default on GPU;
torch needs it switched on), `highest` makes both use full float32.
Timing: 3 warm-up calls, then the median of `--reps` calls, each ended by a device sync.
Throughput = seconds of audio per second of wall time; speedup is against torch float32 of the
same model (or our float32 when transformers is missing). A last line per model gives the largest
|jax fp32 − torch fp32| on last_hidden_state, a check that both compute the same function.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# Both frameworks share the GPU: JAX must not grab 75 % of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatar_jax.models import audio_wav2vec2 as w2v

SR = 16_000


def hf_config(c: w2v.Wav2Vec2Config):
  import transformers  # pylint: disable=g-import-not-at-top
  return transformers.Wav2Vec2Config(
      hidden_size=c.hidden, num_hidden_layers=c.layers, num_attention_heads=c.heads,
      intermediate_size=c.mlp, conv_dim=c.conv_dim, conv_kernel=c.conv_kernel,
      conv_stride=c.conv_stride, conv_bias=c.conv_bias, feat_extract_norm=c.feat_norm,
      num_conv_pos_embeddings=c.pos_kernel, num_conv_pos_embedding_groups=c.pos_groups,
      do_stable_layer_norm=c.stable_ln, layer_norm_eps=c.eps, hidden_act=c.act,
      feat_extract_activation=c.feat_act)


def time_fn(fn, sync, reps, warmup=3):
  """Median seconds of one call of fn() after `warmup` warm-up calls."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def jax_rows(make, wav, reps, gpu):
  """[(impl, dtype, seconds or None, output or error)] of our model; make(dtype, attention)."""
  rows = []
  variants = [("jax", "fp32", None, None), ("jax", "bf16", jnp.bfloat16, None)]
  if gpu:
    variants.append(("jax cudnn-attn", "bf16", jnp.bfloat16, "cudnn"))
  x = jnp.asarray(wav)
  for impl, name, dtype, attention in variants:
    try:
      graphdef, state = nnx.split(make(dtype, attention))
      fn = jax.jit(lambda s, w, g=graphdef: nnx.merge(g, s)(w)["last_hidden_state"])
      sec = time_fn(lambda: fn(state, x), jax.block_until_ready, reps)
      rows.append((impl, name, sec, np.asarray(fn(state, x), np.float32)))
    except Exception as e:  # pylint: disable=broad-except
      rows.append((impl, name, None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"))
  return rows


def torch_rows(ref, wav, reps, device):
  import torch  # pylint: disable=g-import-not-at-top
  ref = ref.to(device).eval()
  x = torch.tensor(wav, device=device)
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
  rows = []
  casts = [("fp32", None), ("bf16", torch.bfloat16)] + (
      [("fp16", torch.float16)] if device == "cuda" else [])
  for name, dtype in casts:
    def fn(dtype=dtype):
      with torch.inference_mode(), torch.autocast(device, dtype=dtype or torch.float32,
                                                  enabled=dtype is not None):
        return ref(x).last_hidden_state
    sec = time_fn(fn, sync, reps)
    rows.append(("torch", name if dtype is None else f"{name} autocast", sec,
                 fn().float().cpu().numpy()))
  ref.cpu()
  if device == "cuda":
    torch.cuda.empty_cache()  # give the cached blocks back for the next model's JAX rows
  return rows


def set_fp32_precision(mode: str):
  jax.config.update("jax_default_matmul_precision", "highest" if mode == "highest" else None)
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  torch.set_float32_matmul_precision("highest" if mode == "highest" else "high")
  conv = getattr(torch.backends.cudnn, "conv", None)
  if conv is not None and hasattr(conv, "fp32_precision"):
    conv.fp32_precision = "ieee" if mode == "highest" else "tf32"
  else:
    torch.backends.cudnn.allow_tf32 = mode != "highest"


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--shapes", default="base,large_lv60", help=f"of {sorted(w2v.PRESETS)}")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seconds", type=float, default=10.0)
  ap.add_argument("--reps", type=int, default=10)
  ap.add_argument("--fp32_precision", choices=("tf32", "highest"), default="tf32")
  ap.add_argument("--out_md", default="", help="also write the table here")
  args = ap.parse_args(argv)

  gpu = jax.default_backend() == "gpu"
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top
    device = "cuda" if torch.cuda.is_available() else "cpu"
    missing = None if device == "cuda" or not gpu else "torch has no CUDA device"
  except ImportError as e:
    missing, device = f"torch/transformers not importable ({e})", None
  set_fp32_precision(args.fp32_precision)
  n = int(args.seconds * SR)
  wav = np.asarray(w2v.normalize(np.random.default_rng(0).standard_normal((args.batch, n))))
  audio = args.batch * args.seconds
  lines = [f"wav2vec2 forward, batch {args.batch} × {args.seconds:g} s, "
           f"{jax.devices()[0].device_kind}, fp32 matmuls: {args.fp32_precision}", "",
           "| model | impl | dtype | s audio / s | speedup |", "|---|---|---|---:|---:|"]
  notes = []
  print("\n".join(lines), flush=True)   # rows print as they finish: a timeout keeps those done

  def add(line):
    lines.append(line)
    print(line, flush=True)

  for shape in args.shapes.split(","):
    config = w2v.PRESETS[shape]
    if missing is None:
      torch.manual_seed(0)
      ref = transformers.Wav2Vec2Model(hf_config(config))
      tensors = {k: v.detach().float().numpy() for k, v in ref.state_dict().items()}
      make = lambda d, a, t=tensors, c=config: w2v.from_hf_tensors(c, t, dtype=d, attention=a)
    else:  # our own random weights
      ref = None
      make = lambda d, a, c=config: w2v.Wav2Vec2(c, rngs=nnx.Rngs(0), dtype=d, attention=a)
    rows = jax_rows(make, wav, args.reps, gpu)
    if ref is not None:
      rows += torch_rows(ref, wav, args.reps, device)
      del ref
    base = next((r[2] for r in rows if r[0] == "torch" and r[1] == "fp32"),
                next((r[2] for r in rows if r[0] == "jax" and r[1] == "fp32"), None))
    for impl, dtype, sec, out in rows:
      if sec is None:
        add(f"| {shape} | {impl} | {dtype} | failed | {out} |")
      else:
        add(f"| {shape} | {impl} | {dtype} | {audio / sec:,.0f} | {base / sec:.2f}× |")
    outs = {(r[0], r[1]): r[3] for r in rows if r[2] is not None}
    if ("torch", "fp32") in outs and ("jax", "fp32") in outs:
      diff = np.abs(outs[("jax", "fp32")] - outs[("torch", "fp32")]).max()
      notes.append(f"{shape}: max |jax fp32 − torch fp32| = {diff:.2e} (last_hidden_state)")
  if missing:
    notes.append(f"torch rows left out: {missing}")
  text = "\n".join(lines + [""] + notes)
  print("\n".join(notes))
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
