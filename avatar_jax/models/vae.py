"""Wan 2.1 video VAE (causal 3D convolutions) in Flax NNX, with import of published weights.

Layout: channel-last everywhere. Video [B, T, H, W, 3] in [-1, 1]; latents [B, t, h, w, z_dim] with
t = 1 + (T - 1) / 4 and h, w = H / 8, W / 8 for the published shape (the factors follow from the
config: 2 per spatial level, 2 per level with temporal down-sampling).

Architecture (what the published weights expect):
  encoder   causal conv_in → per level: residual blocks, then a resample (2× spatial, plus 2× time
            on the `temporal_downsample` levels) → mid block (res, single-head attention per
            frame, res) → RMS norm, SiLU, causal conv_out → 2·z_dim (mean ‖ logvar)
            → quant_conv (1×1×1)
  decoder   post_quant_conv (1×1×1) → causal conv_in → mid block → per level: residual blocks,
            then a resample (2× spatial, halving the channels; plus 2× time on the mirrored levels)
            → RMS norm, SiLU, causal conv_out → 3 channels, clamped to [-1, 1]

Causality. Every 3-tap temporal convolution sees only the present and the two previous frames
(2 frames of zero padding before the clip, none after). Frame 0 is special: it is encoded on its
own (a still image is a 1-frame video), the temporal down-sampling passes it through untouched,
and the temporal up-sampling does not double it and leaves it out of its own context. Every later
group of 4 frames (2 temporal levels × 2) makes one latent frame, and decodes back to 4 frames.

Chunked vs full. `full` runs each layer over the whole clip at once. `chunked` (the default, and
how the reference implementation runs) encodes frame 0 alone, then `lax.scan`s over groups of
4·chunk frames, carrying for every causal layer the last frames of its input (its "tail"), so
peak memory is that of one chunk whatever the clip length. Both give the same numbers (the
layers are exactly causal); tests/test_vae.py checks it, and checks the chunked path against
diffusers' `AutoencoderKLWan`.

Import: `load_diffusers(path)` reads a diffusers folder (config.json +
diffusion_pytorch_model.safetensors) or a single .safetensors with either the diffusers key names or
those of the original `Wan2.1_VAE.pth` (a .pth file needs torch to unpickle), using NumPy only.
`convert_cli(argv)` writes the weights as an Orbax checkpoint a run can `init_from`
(`load_checkpoint` reads it back); `save_diffusers` exports a model (e.g. a VAE trained here) as a
folder diffusers loads.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from avatar_jax import config_lib, sharding
from avatar_jax import system as system_lib
from avatar_jax.models import layers, weights

# The published Wan 2.1 latent statistics (diffusers config fields latents_mean / latents_std):
# latents are normalised per channel as (z - mean) / std before a diffusion model sees them.
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

PRESETS: dict[str, dict[str, Any]] = {
    # CI: a few hundred thousand parameters, 8× spatial / 4× temporal like the real one.
    "tiny": dict(base_dim=8, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    # SynthDyad 64–128 px.
    "S": dict(base_dim=32, dim_mult=(1, 2, 2, 2), num_res_blocks=1),
    # The published shape (Wan 2.1 / 2.2-A14B VAE, ~127M parameters).
    "wan2.1": dict(base_dim=96, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
                   latents_mean=WAN21_LATENTS_MEAN, latents_std=WAN21_LATENTS_STD),
}


def default_config(preset: str = "S") -> ml_collections.ConfigDict:
  """The VAE config of a preset ("tiny", "S", "wan2.1").

  Fields: base_dim, decoder_base_dim (0: base_dim), dim_mult (channel multiplier per level),
  num_res_blocks, temporal_downsample (per level transition; the decoder mirrors it), z_dim,
  in_channels / out_channels, latents_mean / latents_std (per-channel statistics used by
  `normalize`), dtype (compute) / param_dtype (storage), chunk (latent frames per scan step of
  the chunked encode/decode; 1 is what diffusers does, larger trades memory for fewer steps),
  temporal_init ("random": every kernel tap drawn alike; "inflate": the VAE starts as a per-frame
  image VAE, see `WanVAE.inflate`).
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown VAE preset {preset!r}; expected one of {sorted(PRESETS)}")
  p = dict(base_dim=96, decoder_base_dim=0, dim_mult=(1, 2, 4, 4), num_res_blocks=2,
           temporal_downsample=(False, True, True), z_dim=16, in_channels=3, out_channels=3,
           latents_mean=None, latents_std=None, dtype="float32", param_dtype="float32", chunk=1,
           temporal_init="random")
  p.update(PRESETS[preset])
  z = p["z_dim"]
  p["latents_mean"] = tuple(float(v) for v in (p["latents_mean"] or (0.0,) * z))
  p["latents_std"] = tuple(float(v) for v in (p["latents_std"] or (1.0,) * z))
  return ml_collections.ConfigDict(dict(preset=preset, **p))


def _check_config(cfg) -> None:
  levels = len(cfg.dim_mult)
  if len(cfg.temporal_downsample) != levels - 1:
    raise ValueError(f"VAE config: temporal_downsample has {len(cfg.temporal_downsample)} entries, "
                     f"expected len(dim_mult) - 1 = {levels - 1}")
  for name in ("latents_mean", "latents_std"):
    if len(cfg[name]) != cfg.z_dim:
      raise ValueError(f"VAE config: {name} has {len(cfg[name])} values, expected "
                       f"z_dim={cfg.z_dim}")
  if cfg.get("temporal_init", "random") not in ("random", "inflate"):
    raise ValueError(f"VAE config: temporal_init must be 'random' or 'inflate', found "
                     f"{cfg.temporal_init!r}")
  if int(cfg.get("chunk", 1)) < 1:
    raise ValueError(f"VAE config: chunk must be >= 1, found {cfg.chunk}")


def compression(cfg) -> tuple[int, int]:
  """(temporal, spatial) down-sampling factors of a config: (4, 8) for Wan 2.1."""
  return 2 ** sum(bool(t) for t in cfg.temporal_downsample), 2 ** (len(cfg.dim_mult) - 1)


# ============================================================================= layers
def _param(init, rngs: nnx.Rngs, shape, dtype, axes) -> nnx.Param:
  """A parameter carrying logical axis names (sharding.RULES), placed by the trainer."""
  return nnx.Param(layers.logical(init, axes)(rngs.params(), shape, dtype))


class Conv(nnx.Module):
  """Convolution over channel-last input; kernel [*window, in, out] (torch's [out, in, *window]
  with the axes reversed), bias [out]. 2 window dims run on [N, H, W, C], 3 on [N, T, H, W, C]."""

  _DIMS = {2: ("NHWC", "HWIO", "NHWC"), 3: ("NDHWC", "DHWIO", "NDHWC")}

  def __init__(self, din: int, dout: int, window: Sequence[int], *, rngs: nnx.Rngs, dtype,
               param_dtype):
    window = tuple(int(k) for k in window)
    self.kernel = _param(nnx.initializers.lecun_normal(), rngs, (*window, din, dout), param_dtype,
                         (None,) * len(window) + ("conv_in", "conv_out"))
    self.bias = _param(nnx.initializers.zeros_init(), rngs, (dout,), param_dtype, ("conv_out",))
    self.dtype = dtype

  def __call__(self, x, padding, strides=None):
    """padding: one (before, after) pair per window dim; strides: one int per window dim."""
    return self._conv(x, self.kernel[...], padding, strides)

  def last_tap(self, x, padding):
    """A 3D conv of a single frame whose past is all zeros: x [B, 1, H, W, Cin]. Only the last
    temporal tap meets data, so it runs as a 2D conv with that tap (the same numbers for a
    k-times smaller convolution: every still image, and frame 0 of every clip)."""
    return self._conv(x[:, 0], self.kernel[...][-1], padding)[:, None]

  def _conv(self, x, kernel, padding, strides=None):
    n = kernel.ndim - 2
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype),
        window_strides=tuple(strides or (1,) * n), padding=tuple(padding),
        dimension_numbers=self._DIMS[n])
    return y + self.bias[...].astype(self.dtype)


class Tails:
  """The causal state of one chunk, threaded through the layers that look into the past.

  For each such layer, in call order, the last frames of its input seen so far. `prev` is the
  list left by the previous chunk, None on the first chunk (frame 0). Layers call `extend` (or
  `swap` where frame 0 gets special treatment) exactly once per chunk, so the order of `next`
  matches the order of `prev` and the list can be a `lax.scan` carry.
  """

  def __init__(self, prev: list[jax.Array] | None = None):
    self.prev = prev
    self.next: list[jax.Array] = []

  @property
  def first(self) -> bool:
    return self.prev is None

  def swap(self, tail: jax.Array) -> jax.Array | None:
    """Records this layer's new tail; returns its previous one (None on the first chunk)."""
    old = None if self.prev is None else self.prev[len(self.next)]
    self.next.append(tail)
    return old

  def extend(self, x: jax.Array, n: int) -> jax.Array:
    """x [B, T, ...] with the n frames before it prepended (zeros before frame 0)."""
    past = None if self.prev is None else self.prev[len(self.next)]
    if past is None:
      past = jnp.zeros((x.shape[0], n, *x.shape[2:]), x.dtype)
    x = jnp.concatenate([past, x], axis=1)
    self.next.append(x[:, -n:])
    return x


class CausalConv3d(nnx.Module):
  """3D convolution, 'same' in space, causal in time: frame t sees frames t-k+1 .. t.

  x: [B, T, H, W, Cin] -> [B, T, H, W, Cout]. With `tails` (chunked mode) the k-1 previous
  frames come from the previous chunk instead of zero padding.
  """

  def __init__(self, din: int, dout: int, window=(3, 3, 3), **kw):
    self.window = tuple(window)
    self.conv = Conv(din, dout, self.window, **kw)

  def __call__(self, x, tails: Tails | None = None):
    past = self.window[0] - 1
    space = [(k // 2, k // 2) for k in self.window[1:]]
    if past and x.shape[1] == 1 and (tails is None or tails.first):
      if tails is not None:
        tails.extend(x, past)   # the next chunk's past: zeros, then this frame
      return self.conv.last_tap(x, space)
    if past and tails is not None:
      return self.conv(tails.extend(x, past), [(0, 0)] + space)
    return self.conv(x, [(past, 0)] + space)


class RMSNorm(nnx.Module):
  """x / ‖x‖ · √C · γ over channels (an L2 normalisation; statistics in float32)."""

  def __init__(self, c: int, *, rngs: nnx.Rngs, param_dtype, **_):
    self.gamma = _param(nnx.initializers.ones_init(), rngs, (c,), param_dtype, (None,))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
    scale = math.sqrt(x.shape[-1]) * self.gamma[...].astype(jnp.float32)
    return (x32 / jnp.maximum(norm, 1e-12) * scale).astype(x.dtype)


class ResBlock(nnx.Module):
  """x + conv2(silu(norm2(conv1(silu(norm1(x)))))), with a 1×1×1 conv on the skip if the width
  changes. (Dropout of the reference is 0 in every published config and is left out.)"""

  def __init__(self, din: int, dout: int, **kw):
    self.norm1 = RMSNorm(din, **kw)
    self.conv1 = CausalConv3d(din, dout, **kw)
    self.norm2 = RMSNorm(dout, **kw)
    self.conv2 = CausalConv3d(dout, dout, **kw)
    self.conv_shortcut = CausalConv3d(din, dout, (1, 1, 1), **kw) if din != dout else None

  def __call__(self, x, tails=None):
    skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
    x = self.conv1(jax.nn.silu(self.norm1(x)), tails)
    x = self.conv2(jax.nn.silu(self.norm2(x)), tails)
    return x + skip


class FrameAttention(nnx.Module):
  """Single-head self-attention over the H·W positions of each frame (no mixing across time)."""

  def __init__(self, c: int, **kw):
    self.norm = RMSNorm(c, **kw)
    self.to_qkv = Conv(c, 3 * c, (1, 1), **kw)
    self.proj = Conv(c, c, (1, 1), **kw)

  def __call__(self, x):
    b, t, h, w, c = x.shape
    y = self.norm(x).reshape(b * t, h, w, c)
    q, k, v = jnp.split(self.to_qkv(y, [(0, 0)] * 2).reshape(b * t, h * w, 3 * c), 3, axis=-1)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    o = jnp.einsum("nqk,nkc->nqc", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
    o = self.proj(o.reshape(b * t, h, w, c), [(0, 0)] * 2)
    return x + o.reshape(b, t, h, w, c)


class MidBlock(nnx.Module):
  def __init__(self, c: int, **kw):
    self.resnets = nnx.List([ResBlock(c, c, **kw), ResBlock(c, c, **kw)])
    self.attentions = nnx.List([FrameAttention(c, **kw)])

  def __call__(self, x, tails=None):
    x = self.resnets[0](x, tails)
    x = self.attentions[0](x)
    return self.resnets[1](x, tails)


def _per_frame(fn, x):
  """Applies fn ([N, H, W, C] -> [N, H', W', C']) to every frame of x [B, T, H, W, C]."""
  b, t = x.shape[:2]
  y = fn(x.reshape(b * t, *x.shape[2:]))
  return y.reshape(b, t, *y.shape[1:])


class Downsample(nnx.Module):
  """2× spatial down-sampling (3×3 stride-2 conv after one row/column of zeros on the
  bottom/right), then with `temporal`, 2× in time: frame 0 is kept as is, and each later pair
  (2j-1, 2j) becomes output frame j through a 3-tap stride-2 conv over frames 2j-2 .. 2j."""

  def __init__(self, c: int, temporal: bool, **kw):
    self.resample = Conv(c, c, (3, 3), **kw)
    self.time_conv = Conv(c, c, (3, 1, 1), **kw) if temporal else None

  def __call__(self, x, tails=None):
    x = _per_frame(lambda f: self.resample(f, [(0, 1), (0, 1)], strides=(2, 2)), x)
    if self.time_conv is None:
      return x
    conv = lambda v: self.time_conv(v, [(0, 0)] * 3, strides=(2, 1, 1))
    if tails is None:  # full clip [1 + 2m frames]: frame 0, then the m stride-2 windows.
      return x if x.shape[1] == 1 else jnp.concatenate([x[:, :1], conv(x)], axis=1)
    past = tails.swap(x[:, -1:])
    return x if past is None else conv(jnp.concatenate([past, x], axis=1))


class Upsample(nnx.Module):
  """With `temporal`, 2× in time first: a causal 3-tap conv makes two frames per frame (2·C
  channels, split in half) except for frame 0, which stays single and is not in the conv's
  context. Then 2× nearest spatial up-sampling and a 3×3 conv to `dout` (half the width)."""

  def __init__(self, c: int, dout: int, temporal: bool, **kw):
    self.time_conv = CausalConv3d(c, 2 * c, (3, 1, 1), **kw) if temporal else None
    self.resample = Conv(c, dout, (3, 3), **kw)

  @staticmethod
  def _interleave(y):
    """[B, T, H, W, 2C] -> [B, 2T, H, W, C]: the first C channels are the earlier frame."""
    b, t, h, w, c2 = y.shape
    y = y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5)
    return y.reshape(b, 2 * t, h, w, c2 // 2)

  def __call__(self, x, tails=None):
    if self.time_conv is not None:
      if tails is None:
        if x.shape[1] > 1:
          rest = self._interleave(self.time_conv(x[:, 1:]))
          x = jnp.concatenate([x[:, :1], rest], axis=1)
      elif tails.first:
        # Frame 0 stays single; what follows sees zeros, not frame 0, as its past.
        tails.swap(jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype))
      else:
        x = self._interleave(self.time_conv(x, tails))

    def up(f):
      f = jnp.repeat(jnp.repeat(f, 2, axis=1), 2, axis=2)
      return self.resample(f, [(1, 1), (1, 1)])

    return _per_frame(up, x)


class Encoder(nnx.Module):
  """video [B, T, H, W, Cin] -> [B, t, h, w, 2·z_dim] (before quant_conv)."""

  def __init__(self, cfg, **kw):
    d = cfg.base_dim
    dims = [d * m for m in (1, *cfg.dim_mult)]
    self.conv_in = CausalConv3d(cfg.in_channels, dims[0], **kw)
    # One flat list (residual blocks and resamples in order), as the published weights name it.
    blocks = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      for _ in range(cfg.num_res_blocks):
        blocks.append(ResBlock(din, dout, **kw))
        din = dout
      if i < len(cfg.dim_mult) - 1:
        blocks.append(Downsample(dout, bool(cfg.temporal_downsample[i]), **kw))
    self.down_blocks = nnx.List(blocks)
    self.mid_block = MidBlock(dims[-1], **kw)
    self.norm_out = RMSNorm(dims[-1], **kw)
    self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, **kw)

  def __call__(self, x, tails: Tails | None = None):
    x = _split_rows(self.conv_in(_split_rows(x), tails))
    for block in self.down_blocks:
      x = _split_rows(block(x, tails))
    x = self.mid_block(x, tails)
    return self.conv_out(jax.nn.silu(self.norm_out(x)), tails)


class UpBlock(nnx.Module):
  def __init__(self, din: int, dout: int, n: int, upsample: str | None, **kw):
    self.resnets = nnx.List([ResBlock(din if j == 0 else dout, dout, **kw) for j in range(n)])
    self.upsampler = (Upsample(dout, dout // 2, upsample == "3d", **kw)
                      if upsample is not None else None)

  def __call__(self, x, tails=None):
    for r in self.resnets:
      x = r(x, tails)
    return x if self.upsampler is None else self.upsampler(x, tails)


class Decoder(nnx.Module):
  """latents [B, t, h, w, z_dim] (after post_quant_conv) -> video [B, T, H, W, Cout], unclamped."""

  def __init__(self, cfg, **kw):
    d = cfg.decoder_base_dim or cfg.base_dim
    mult = tuple(cfg.dim_mult)
    dims = [d * m for m in (mult[-1], *mult[::-1])]
    temporal_up = tuple(cfg.temporal_downsample)[::-1]
    self.conv_in = CausalConv3d(cfg.z_dim, dims[0], **kw)
    self.mid_block = MidBlock(dims[0], **kw)
    blocks = []
    for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:])):
      # Every up-sampler halves the width, so each level after the first starts at half.
      din = din if i == 0 else din // 2
      last = i == len(mult) - 1
      mode = None if last else ("3d" if temporal_up[i] else "2d")
      blocks.append(UpBlock(din, dout, cfg.num_res_blocks + 1, mode, **kw))
    self.up_blocks = nnx.List(blocks)
    self.norm_out = RMSNorm(dims[-1], **kw)
    self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, **kw)

  def __call__(self, x, tails: Tails | None = None):
    x = self.conv_in(_split_rows(x), tails)
    x = self.mid_block(x, tails)
    for block in self.up_blocks:
      x = _split_rows(block(x, tails))
    return _split_rows(self.conv_out(jax.nn.silu(self.norm_out(x)), tails))


def _split_rows(x):
  """Activations [B, T, H, W, C] laid out batch-split and row-split (logical "height", the mesh's
  `context` axis under sharding.RULES), as MaxDiffusion shards its Wan VAE spatially: each device
  convolves its band of rows and XLA exchanges the halo rows. A no-op outside a mesh."""
  return sharding.constrain(x, ("batch", None, "height", None, None))


class LatentStats(nnx.Variable):
  """Per-channel latent statistics (config latents_mean / latents_std); saved, never trained."""


def _causal_scan(fn, x: jax.Array, step: int) -> jax.Array:
  """fn over x [B, 1 + n·step + r, ...] in causal chunks: frame 0, then n chunks of `step`
  frames under `lax.scan` (the tails are the carry), then the r < step frames left, if any."""
  b, t = x.shape[:2]
  tails = Tails()
  outs = [fn(x[:, :1], tails)]
  carry = tails.next
  n, r = divmod(t - 1, step)
  if n:
    xs = x[:, 1:1 + n * step].reshape(b, n, step, *x.shape[2:]).swapaxes(0, 1)

    def body(carry, chunk):
      tails = Tails(carry)
      y = fn(chunk, tails)
      return tails.next, y

    carry, ys = jax.lax.scan(body, carry, xs)  # ys: [n, B, s, ...]
    outs.append(ys.swapaxes(0, 1).reshape(b, -1, *ys.shape[3:]))
  if r:
    outs.append(fn(x[:, 1 + n * step:], Tails(carry)))
  return jnp.concatenate(outs, axis=1)


class WanVAE(nnx.Module):
  """The Wan 2.1 VAE. cfg: `default_config(...)` (or `config_from_diffusers`)."""

  def __init__(self, cfg, *, rngs: nnx.Rngs):
    _check_config(cfg)
    # Frozen: the config is a static attribute of the module, so it must hash for nnx.jit's cache
    # (an unhashable ConfigDict there made every call recompile).
    self.cfg = config_lib.freeze(cfg)
    self.dtype = jnp.dtype(cfg.get("dtype", "float32"))
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")))
    self.time_factor, self.space_factor = compression(cfg)
    self.encoder = Encoder(cfg, **kw)
    self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1), **kw)
    self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1), **kw)
    self.decoder = Decoder(cfg, **kw)
    self.latents_mean = LatentStats(jnp.asarray(cfg.latents_mean, jnp.float32))
    self.latents_std = LatentStats(jnp.asarray(cfg.latents_std, jnp.float32))
    if cfg.get("temporal_init", "random") == "inflate":
      self.inflate()

  def inflate(self) -> None:
    """Sets every temporal weight so that the VAE is a per-frame image VAE, the way Wan 2.1
    turns its image VAE into the video one (its report: a 2D VAE of the same structure trained
    on images first, then inflated and trained on video):
      causal 3-tap convolutions  past taps 0; the present tap scaled by √taps, a 2D conv's
                                 lecun-normal init (fan-in without the taps that read zeros)
      temporal down-sampling     the window's latest frame, as is (identity on the last tap,
                                 no bias)
      temporal up-sampling       both new frames copy the input frame (identity twice, no bias)
    Frame 0 never reads a past tap or a temporal resampler, so a VAE trained on still images
    (`frames=1`) keeps these weights exactly (zero gradients) and loads into video training
    (`init_from`) as an image VAE that holds each latent frame's last video frame for 4 frames.
    """
    ups = {id(m.time_conv) for _, m in nnx.iter_graph(self)
           if isinstance(m, Upsample) and m.time_conv is not None}
    for _, m in nnx.iter_graph(self):
      if isinstance(m, CausalConv3d) and id(m) in ups:   # [3, 1, 1, C, 2C]
        k = m.conv.kernel[...]
        eye = jnp.eye(k.shape[-2], dtype=k.dtype)
        m.conv.kernel[...] = jnp.zeros_like(k).at[-1, 0, 0].set(
            jnp.concatenate([eye, eye], axis=-1))
        m.conv.bias[...] = jnp.zeros_like(m.conv.bias[...])
      elif isinstance(m, CausalConv3d) and m.window[0] > 1:
        k = m.conv.kernel[...]
        m.conv.kernel[...] = jnp.zeros_like(k).at[-1].set(k[-1] * math.sqrt(m.window[0]))
      elif isinstance(m, Downsample) and m.time_conv is not None:   # [3, 1, 1, C, C]
        k = m.time_conv.kernel[...]
        m.time_conv.kernel[...] = jnp.zeros_like(k).at[-1, 0, 0].set(
            jnp.eye(k.shape[-1], dtype=k.dtype))
        m.time_conv.bias[...] = jnp.zeros_like(m.time_conv.bias[...])

  # --------------------------------------------------------------------------- encode / decode
  def _check_video(self, video):
    if video.ndim != 5 or video.shape[-1] != self.cfg.in_channels:
      raise ValueError(f"WanVAE.encode: expected video [B, T, H, W, {self.cfg.in_channels}], "
                       f"found shape {video.shape}")
    _, t, h, w, _ = video.shape
    s, tf = self.space_factor, self.time_factor
    if h % s or w % s:
      raise ValueError(f"WanVAE.encode: H and W must be multiples of {s}, found H={h}, W={w} "
                       f"(video shape {video.shape}); crop or pad the frames")
    if (t - 1) % tf:
      raise ValueError(f"WanVAE.encode: T must be 1 + {tf}·k frames (1, {1 + tf}, {1 + 2 * tf}, "
                       f"...), found T={t}; frame 0 is encoded alone, then groups of {tf}")

  def encode_moments(self, video, *, chunked: bool = True, chunk: int | None = None):
    """video [B, T, H, W, Cin] in [-1, 1] -> (mean, logvar), each [B, 1 + (T-1)/4, H/8, W/8, z],
    float32. chunk: latent frames per scan step (default config.chunk)."""
    self._check_video(video)
    x = video.astype(self.dtype)
    if chunked:
      step = self.time_factor * int(chunk or self.cfg.get("chunk", 1))
      h = _causal_scan(self.encoder, x, step)
    else:
      h = self.encoder(x)
    mean, logvar = jnp.split(self.quant_conv(h).astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def encode(self, video, *, chunked: bool = True, chunk: int | None = None,
             rng: jax.Array | None = None):
    """Latents [B, 1 + (T-1)/4, H/8, W/8, z_dim] (float32, not normalised): the posterior mean,
    or a posterior sample when `rng` is given."""
    mean, logvar = self.encode_moments(video, chunked=chunked, chunk=chunk)
    if rng is None:
      return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)

  def decode(self, latents, *, chunked: bool = True, chunk: int | None = None,
             clamp: bool = True):
    """latents [B, t, h, w, z_dim] (not normalised) -> video [B, 1 + 4(t-1), 8h, 8w, Cout],
    float32, clamped to [-1, 1] unless `clamp=False`. chunk: latent frames per scan step."""
    if latents.ndim != 5 or latents.shape[-1] != self.cfg.z_dim:
      raise ValueError(f"WanVAE.decode: expected latents [B, t, h, w, {self.cfg.z_dim}], found "
                       f"shape {latents.shape}")
    x = self.post_quant_conv(latents.astype(self.dtype))
    if chunked:
      y = _causal_scan(self.decoder, x, int(chunk or self.cfg.get("chunk", 1)))
    else:
      y = self.decoder(x)
    y = y.astype(jnp.float32)
    return jnp.clip(y, -1.0, 1.0) if clamp else y

  def __call__(self, video, *, chunked: bool = True, chunk: int | None = None):
    """Reconstruction [B, T, H, W, Cout] through the posterior mean."""
    z = self.encode(video, chunked=chunked, chunk=chunk)
    return self.decode(z, chunked=chunked, chunk=chunk)

  # --------------------------------------------------------------------------- normalisation
  def normalize(self, latents):
    """(z - latents_mean) / latents_std per channel: what a diffusion model trains on."""
    return (latents - self.latents_mean[...]) / self.latents_std[...]

  def denormalize(self, latents):
    return latents * self.latents_std[...] + self.latents_mean[...]


def num_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ============================================================================= import
def config_from_diffusers(d: Mapping[str, Any], **overrides) -> ml_collections.ConfigDict:
  """Our config from a diffusers `AutoencoderKLWan` config.json dict (Wan 2.1 kind only)."""
  name = d.get("_class_name", "AutoencoderKLWan")
  if name != "AutoencoderKLWan":
    raise ValueError(f"expected an AutoencoderKLWan config, found _class_name={name!r}")
  # The Wan 2.2 VAE (residual up/down blocks, 2×2 patchify) and attention inside the encoder
  # levels are other architectures sharing this class in diffusers.
  if d.get("is_residual") or d.get("patch_size") not in (None, 1) or d.get("attn_scales"):
    raise ValueError(f"AutoencoderKLWan config with is_residual={d.get('is_residual')}, patch_size="
                     f"{d.get('patch_size')}, attn_scales={d.get('attn_scales')} is not supported: "
                     "only the Wan 2.1 kind (False, None, []) imports")
  z = int(d.get("z_dim", 16))
  cfg = default_config("wan2.1")
  cfg.preset = "diffusers"
  cfg.base_dim = int(d.get("base_dim", 96))
  cfg.decoder_base_dim = int(d.get("decoder_base_dim") or 0)
  cfg.dim_mult = tuple(int(m) for m in d.get("dim_mult", (1, 2, 4, 4)))
  cfg.num_res_blocks = int(d.get("num_res_blocks", 2))
  # (sic: diffusers spells it "temperal")
  cfg.temporal_downsample = tuple(bool(t) for t in d.get("temperal_downsample",
                                                         (False, True, True)))
  cfg.z_dim = z
  cfg.in_channels = int(d.get("in_channels", 3))
  cfg.out_channels = int(d.get("out_channels", 3))
  mean, std = d.get("latents_mean"), d.get("latents_std")
  cfg.latents_mean = tuple(float(v) for v in (mean if mean is not None else (0.0,) * z))
  cfg.latents_std = tuple(float(v) for v in (std if std is not None else (1.0,) * z))
  cfg.update(overrides)
  _check_config(cfg)
  return cfg


def diffusers_config(cfg) -> dict[str, Any]:
  """The `AutoencoderKLWan(**kwargs)` of our config (for building the reference model)."""
  return dict(base_dim=cfg.base_dim, decoder_base_dim=cfg.decoder_base_dim or None,
              z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
              temperal_downsample=list(cfg.temporal_downsample), in_channels=cfg.in_channels,
              out_channels=cfg.out_channels, latents_mean=list(cfg.latents_mean),
              latents_std=list(cfg.latents_std))


def config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our config from either our own JSON (has "preset") or a diffusers config.json."""
  if "preset" in d and "temporal_downsample" in d:
    cfg = default_config("wan2.1")
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    _check_config(cfg)
    return cfg
  return config_from_diffusers(d)


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
                       "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "BOOL": np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """{name: array} of a .safetensors file, with NumPy only (bfloat16 via ml_dtypes).

  The format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape,
  data_offsets}}, then the raw little-endian buffer; read directly because
  `safetensors.numpy` cannot represent bfloat16 (the dtype of many Wan checkpoints).
  """
  import ml_dtypes  # pylint: disable=g-import-not-at-top  (a jax dependency)
  dtypes = dict(_SAFETENSORS_DTYPES, BF16=ml_dtypes.bfloat16)
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name!r} has dtype {info['dtype']}, which this reader does "
                       f"not handle (expected one of {sorted(dtypes)})")
    start, end = info["data_offsets"]
    dt = np.dtype(dtypes[info["dtype"]]).newbyteorder("<")
    out[name] = np.frombuffer(data[start:end], dtype=dt).reshape(info["shape"])
  return out


def read_weights(path: str) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors file, a diffusers folder (single or sharded) or a torch .pth."""
  if os.path.isdir(path):
    tensors = weights.read_safetensors_folder(path, "diffusion_pytorch_model.safetensors",
                                              read_safetensors)
    if tensors is not None:
      return tensors
    raise FileNotFoundError(f"{path}: expected diffusion_pytorch_model.safetensors (or its "
                            ".index.json) in the folder (save with save_pretrained)")
  if path.endswith(".safetensors"):
    return read_safetensors(path)
  if path.endswith((".pth", ".pt", ".ckpt")):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{path}: reading a torch pickle needs torch (pip install "
                        "'avatar_jax[convert]'); a .safetensors file needs only NumPy") from e
    sd = torch.load(path, map_location="cpu", weights_only=True)
    sd = sd.get("state_dict", sd) if isinstance(sd, dict) else sd
    return {k: v.float().numpy() for k, v in sd.items()}
  raise ValueError(f"{path}: expected a diffusers folder, a .safetensors file or a .pth file")


def _resolve_folder(path: str) -> str:
  # A whole pipeline snapshot (e.g. Wan2.1-T2V-1.3B-Diffusers) keeps the VAE under vae/.
  if (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
      and os.path.exists(os.path.join(path, "vae", "config.json"))):
    return os.path.join(path, "vae")
  return path


def is_original_layout(names) -> bool:
  """True for the key names of the original Wan2.1_VAE.pth (encoder.downsamples..., conv1, ...)."""
  return any(k.startswith(("encoder.downsamples.", "decoder.upsamples.", "encoder.conv1."))
             for k in names)


_RESIDUAL = {"residual.0": "norm1", "residual.2": "conv1", "residual.3": "norm2",
             "residual.6": "conv2", "shortcut": "conv_shortcut"}


def original_to_diffusers_names(names, cfg) -> dict[str, str]:
  """{original Wan2.1_VAE.pth key: diffusers key} for a config.

  The original decoder keeps residual blocks and up-samplers in one flat list (num_res_blocks + 1
  blocks, then an up-sampler, per level); diffusers groups them per level. The encoder's flat list
  is the same in both. Keys that match no rule map to themselves, so they show up as unknown.
  """
  per_level = cfg.num_res_blocks + 1
  flat = {}  # decoder flat index -> diffusers prefix
  i = 0
  for level in range(len(cfg.dim_mult)):
    for j in range(per_level):
      flat[i] = f"decoder.up_blocks.{level}.resnets.{j}"
      i += 1
    if level < len(cfg.dim_mult) - 1:
      flat[i] = f"decoder.up_blocks.{level}.upsamplers.0"
      i += 1
  fixed = {"conv1": "quant_conv", "conv2": "post_quant_conv", "encoder.conv1": "encoder.conv_in",
           "decoder.conv1": "decoder.conv_in", "encoder.head.0": "encoder.norm_out",
           "encoder.head.2": "encoder.conv_out", "decoder.head.0": "decoder.norm_out",
           "decoder.head.2": "decoder.conv_out"}
  middle = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
  out = {}
  for key in names:
    module, _, leaf = key.rpartition(".")
    new = fixed.get(module)
    if new is None:
      m = re.fullmatch(r"(encoder|decoder)\.middle\.(\d)(\..+)?", module)
      if m and m.group(2) in middle:
        new = f"{m.group(1)}.mid_block.{middle[m.group(2)]}{m.group(3) or ''}"
      m = re.fullmatch(r"encoder\.downsamples\.(\d+)(\..+)?", module)
      if m:
        new = f"encoder.down_blocks.{m.group(1)}{m.group(2) or ''}"
      m = re.fullmatch(r"decoder\.upsamples\.(\d+)(\..+)?", module)
      if m and int(m.group(1)) in flat:
        new = flat[int(m.group(1))] + (m.group(2) or "")
    if new is None:
      out[key] = key
      continue
    for a, b in _RESIDUAL.items():   # inside a residual block: always the end of the path
      if new.endswith("." + a):
        new = new[:-len(a)] + b
    out[key] = f"{new}.{leaf}"
  return out


# Our module tree mirrors diffusers' names except for two containers: the spatial conv of a
# resample is `resample.1` there (index 1 of a Sequential) and the decoder's single up-sampler is
# `upsamplers.0`. Causal convs hold their Conv as `.conv`; "weight" is our "kernel".
def diffusers_key(path: Sequence[Any]) -> str:
  """Our param path ('decoder', 'up_blocks', 0, 'upsampler', 'resample', 'kernel') -> its key."""
  parts = [str(p) for p in path]
  if parts[-2] == "conv":
    del parts[-2]
  out = []
  for p in parts[:-1]:
    out += {"upsampler": ["upsamplers", "0"], "resample": ["resample", "1"]}.get(p, [p])
  return ".".join(out + [{"kernel": "weight"}.get(parts[-1], parts[-1])])


def diffusers_names(model: WanVAE) -> list[str]:
  """The diffusers state-dict keys of this model's parameters (sorted)."""
  return sorted(diffusers_key(path) for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)))


def _torch_to_ours(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == "kernel":    # conv weight [out, in, *window] -> [*window, in, out]
    return value.transpose(*range(2, value.ndim), 1, 0)
  if leaf == "gamma":     # RMS-norm scale stored channel-first as [C, 1, 1(, 1)]
    return value.reshape(-1)
  return value


def from_diffusers_state(tensors: Mapping[str, np.ndarray], cfg, *,
                         source: str = "checkpoint") -> WanVAE:
  """A WanVAE holding `tensors` (diffusers or original Wan key names, torch layouts).

  Raises ValueError listing the keys with no counterpart in the model (unknown), the
  parameters with no tensor (missing), and any shape mismatch.
  """
  if is_original_layout(tensors):
    names = original_to_diffusers_names(tensors, cfg)
    tensors = {names[k]: v for k, v in tensors.items()}
  # An abstract model: nothing is randomly initialised only to be overwritten.
  abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  flat = list(nnx.to_flat_state(params))
  keys = {diffusers_key(path): (path, var) for path, var in flat}
  unknown = sorted(set(tensors) - set(keys))
  missing = sorted(set(keys) - set(tensors))
  if unknown or missing:
    raise ValueError(
        f"{source}: the weights do not match the VAE config (base_dim={cfg.base_dim}, dim_mult="
        f"{tuple(cfg.dim_mult)}, num_res_blocks={cfg.num_res_blocks}, z_dim={cfg.z_dim}):\n"
        f"  unknown keys ({len(unknown)}): {unknown[:20]}\n"
        f"  missing keys ({len(missing)}): {missing[:20]}")
  param_dtype = jnp.dtype(cfg.get("param_dtype", "float32"))
  loaded, bad = [], []
  for key, (path, var) in keys.items():
    value = _torch_to_ours(np.asarray(tensors[key], np.float32), str(path[-1]))
    if value.shape != tuple(var.shape):
      bad.append(f"{key}: {tuple(tensors[key].shape)} in the checkpoint, the config implies "
                 f"{tuple(var.shape)} (channel-last)")
      continue
    loaded.append((path, var.replace(jnp.asarray(value, param_dtype))))
  if bad:
    raise ValueError(f"{source}: shape mismatches against the config:\n  " + "\n  ".join(bad[:20]))
  # Non-Param variables (the latent statistics) come from the config.
  stats = [(path, var.replace(jnp.asarray(cfg[str(path[-1])], jnp.float32)))
           for path, var in nnx.to_flat_state(rest)]
  return nnx.merge(graphdef, nnx.from_flat_state(loaded), nnx.from_flat_state(stats))


def load_diffusers(path: str, *, config: Mapping[str, Any] | None = None,
                   **overrides) -> tuple[ml_collections.ConfigDict, WanVAE]:
  """(config, WanVAE) from local weights, without torch (except to unpickle a .pth).

  path: a diffusers `AutoencoderKLWan` folder (config.json + diffusion_pytorch_model.safetensors,
    or its sharded index; a pipeline snapshot's vae/ subfolder is found), or a single
    .safetensors / .pth file in diffusers or original Wan2.1_VAE key layout.
  config: the config for a single file (a diffusers config.json dict or ours); by default the
    config.json beside the file, else the published wan2.1 shape.
  overrides: config fields to set, e.g. dtype="bfloat16", chunk=2.
  """
  path = _resolve_folder(os.path.expanduser(path))
  if config is None:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    cfg_file = os.path.join(folder, "config.json")
    if os.path.exists(cfg_file):
      with open(cfg_file) as f:
        config = json.load(f)
    elif os.path.isdir(path):
      raise FileNotFoundError(f"{path}: no config.json (a diffusers AutoencoderKLWan folder has "
                              "one)")
    else:
      logging.info("%s: no config.json beside it; assuming the published wan2.1 shape", path)
  if config is None:
    cfg = default_config("wan2.1")
  elif isinstance(config, ml_collections.ConfigDict):
    cfg = ml_collections.ConfigDict(config.to_dict())
  else:
    cfg = config_from_dict(config)
  cfg.update(overrides)
  _check_config(cfg)
  return cfg, from_diffusers_state(read_weights(path), cfg, source=path)


def to_diffusers_state(model: WanVAE) -> dict[str, np.ndarray]:
  """The model's parameters under diffusers names, in torch layouts (the inverse of the import)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    value = np.asarray(var[...], np.float32)
    leaf = str(path[-1])
    if leaf == "kernel":      # [*window, in, out] -> [out, in, *window]
      value = value.transpose(value.ndim - 1, value.ndim - 2, *range(value.ndim - 2))
    elif leaf == "gamma":     # channel-first broadcast shape: [C, 1, 1] per frame, [C, 1, 1, 1] 3D
      value = value.reshape(-1, *(1,) * (2 if "attentions" in map(str, path) else 3))
    # Contiguous: safetensors writes an array's memory as is, whatever its strides.
    out[diffusers_key(path)] = np.ascontiguousarray(value)
  return out


def save_diffusers(model: WanVAE, folder: str) -> str:
  """Writes config.json + diffusion_pytorch_model.safetensors that diffusers'
  `AutoencoderKLWan.from_pretrained(folder)` (and `load_diffusers`) read."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(_class_name="AutoencoderKLWan", **diffusers_config(model.cfg)), f, indent=2)
  save_file(to_diffusers_state(model), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  return folder


# ============================================================================= saving
def save_checkpoint(model: WanVAE, out_dir: str) -> str:
  """Writes `model` as an Orbax checkpoint under out_dir/checkpoints/0 (the project's layout:
  parameters as "frozen", latent statistics as "rest", the config as JSON), plus
  out_dir/vae_config.json. A run loads it with `config.init_from` (workdir=out_dir,
  into="model/<vae submodule>"); `load_checkpoint` reads it back."""
  _, params, rest = nnx.split(model, nnx.Param, ...)
  return weights.save_converted(out_dir, {"frozen": params, "rest": rest}, model.cfg,
                                "vae_config.json")


def load_checkpoint(out_dir: str, **overrides) -> tuple[ml_collections.ConfigDict, WanVAE]:
  """(config, WanVAE) from a `save_checkpoint` / `convert_cli` output folder."""
  with open(os.path.join(out_dir, "vae_config.json")) as f:
    cfg = config_from_dict(json.load(f))
  cfg.update(overrides)
  abstract = nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0)))
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  state = weights.restore_converted(out_dir, {"frozen": params, "rest": rest})
  return cfg, nnx.merge(graphdef, state["frozen"], state["rest"])


def convert_cli(argv: Sequence[str] | None = None) -> str:
  """`python -m avatar_jax.convert wan_vae --src <folder | .safetensors | .pth> --out <dir>`."""
  parser = argparse.ArgumentParser(
      prog="python -m avatar_jax.convert wan_vae",
      description="Import diffusers AutoencoderKLWan (or original Wan2.1_VAE) weights as an Orbax "
                  "checkpoint of avatar_jax.models.vae.WanVAE.")
  parser.add_argument("--src", required=True, help="diffusers folder, .safetensors or .pth file")
  parser.add_argument("--out", required=True,
                      help="output folder (checkpoints/0 + vae_config.json)")
  parser.add_argument("--config", default=None,
                      help="config.json for a single weights file (default: the one beside it, "
                           "else the wan2.1 shape)")
  args = parser.parse_args(argv)
  config = None
  if args.config:
    with open(args.config) as f:
      config = json.load(f)
  cfg, model = load_diffusers(args.src, config=config)
  save_checkpoint(model, args.out)
  logging.info("wrote %s (%.1fM parameters, z_dim=%d)", args.out, num_params(model) / 1e6,
               cfg.z_dim)
  return args.out


# ============================================================================= the trainer's system
class System(system_lib.System):
  """The VAE trained by the one trainer on SynthDyad renders (`configs/vae_synthdyad.py`).

  config.model: a `default_config(preset)` plus name="vae" and `loss` (l1, l2, kl weights;
  posterior: "sample" decodes a posterior sample, "mean" the posterior mean; lip: extra weight
  of the lip region's pixels, from each clip's SynthDyad identity, data/synthdyad/masks.py).
  Training clips: both participants' windows (batch["video"] and batch["partner_video"], uint8
  [B, T, H, W, 3], T = 1 + 4k), so one batch holds 2B clips. Loss: reconstruction through a
  posterior sample, l1·|x̂ − x| + l2·(x̂ − x)², mean over pixels, + kl·KL(q(z|x) ‖ N(0, I)) per
  latent value (Wan trains with L1 + KL + perceptual + GAN terms; no perceptual network or
  discriminator is used here, see docs/vae.md for what that costs in PSNR).

  generate: reconstruction through the posterior mean, Outputs(space="video", value=[B, T, H, W, 3]
  in [-1, 1]) for clips of any length (padded to 1 + 4k by repeating the last frame, then cut).
  decode: original | reconstruction side by side. encode: the posterior means of whole clips for
  pre-encoded DiT training, normalised with the model's latent statistics: latent_self and
  latent_partner [B, T/4, H/8, W/8, z] of the first 1 + 4(T/4 − 1) frames (T % 4 == 0, so a latent
  frame stands for 4 video frames and windows cut at 1/4 row per frame).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.cfg = config.model
    self._geometry = None   # SynthDyad identities' face geometry, for loss.lip > 0

  def data_spec(self) -> system_lib.DataSpec:
    return system_lib.DataSpec(keys=("video", "partner_video"), optional_keys=("reference_image",))

  def build(self, *, rngs: nnx.Rngs, stats=None) -> WanVAE:
    del stats
    return WanVAE(self.cfg, rngs=rngs)

  @staticmethod
  def _pixels(frames):
    return frames.astype(jnp.float32) * (2.0 / 255.0) - 1.0

  def loss(self, model: WanVAE, batch, rng, aux=None):
    del aux
    w = self.cfg.loss
    x = self._pixels(jnp.concatenate([batch["video"], batch["partner_video"]], axis=0))
    mean, logvar = model.encode_moments(x, chunked=False)
    if w.posterior == "sample":
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    elif w.posterior == "mean":   # a deterministic autoencoder: no sampling noise in the decoder
      z = mean
    else:
      raise ValueError(f"config.model.loss.posterior: 'sample' or 'mean', got {w.posterior!r}")
    rec = model.decode(z, chunked=False, clamp=False)
    # Per-pixel weights [2B, 1, H, W, 1]: 1, plus `lip` on the mouth region (a 64-px face's
    # mouth is a few percent of the pixels, so a plain mean barely asks for it; the face reader
    # must read jaw and smile from the reconstruction, docs/vae.md).
    weight = self._pixel_weights(batch, x.shape, float(w.get("lip", 0.0)))
    mean_w = lambda e: jnp.mean(weight * e) / jnp.mean(weight)
    l1 = mean_w(jnp.abs(rec - x))
    l2 = mean_w(jnp.square(rec - x))
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    total = w.l1 * l1 + w.l2 * l2 + w.kl * kl
    err = jnp.square(jnp.clip(rec, -1, 1) - x)
    psnr = 10.0 * jnp.log10(4.0 / jnp.maximum(jnp.mean(err), 1e-10))
    metrics = {"l1": l1, "l2": l2, "kl": kl, "psnr": psnr}
    if weight.ndim > 1:   # the reconstruction where it matters most, logged beside the whole
      lips = weight - 1.0
      metrics["psnr_lips"] = 10.0 * jnp.log10(
          4.0 / jnp.maximum(jnp.sum(lips * err) / (3.0 * x.shape[1] * jnp.sum(lips)), 1e-10))
    return total, metrics

  def _pixel_weights(self, batch, shape, lip: float):
    """1 + lip · (soft lip mask of each clip's identity, neutral pose): [2B, 1, H, W, 1]
    (self clips then partner clips, as the loss stacks them); the scalar 1 when lip is 0."""
    if lip < 0:
      raise ValueError(f"config.model.loss.lip must be >= 0, got {lip}")
    if lip == 0:
      return jnp.ones(())
    from avatar_jax.data.synthdyad import masks  # pylint: disable=g-import-not-at-top
    if self._geometry is None:
      self._geometry = masks.identity_geometry(int(self.config.data.synthdyad.seed))
    b2, _, h, wd, _ = shape
    idents = [batch.get("identity_self"), batch.get("identity_partner")]
    geo = jnp.concatenate([masks.lookup(self._geometry, i, b2 // 2) for i in idents])
    _, lips = masks.synthdyad_masks(geo[:, 0], geo[:, 1], (h, wd))
    return 1.0 + lip * lips[:, None, :, :, None]

  def generate(self, model: WanVAE, batch, rng, *, stills: bool = False) -> system_lib.Outputs:
    """The reconstruction of batch["video"] [B, T, H, W, 3] as a clip; with `stills`, of every
    frame as a still image (a one-frame video each: what an image-stage VAE, `frames=1`, is
    trained to do, scored by the same evaluator)."""
    del rng
    x = self._pixels(batch["video"])
    if stills:
      b, t = x.shape[:2]
      rec = model(x.reshape(b * t, 1, *x.shape[2:]))
      return system_lib.Outputs(value=rec.reshape(x.shape), space="video")
    t = x.shape[1]
    tf = model.time_factor
    pad = (-(t - 1)) % tf
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[:, -1:], pad, axis=1)], axis=1)
    rec = model(x)[:, :t]
    return system_lib.Outputs(value=rec, space="video")

  def decode(self, outputs: system_lib.Outputs, batch) -> np.ndarray:
    if outputs.space != "video":
      raise ValueError(f"the VAE decodes space 'video', got {outputs.space!r}")
    from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
    from avatar_jax.evals import reconstruction  # pylint: disable=g-import-not-at-top
    rec = reconstruction.to_uint8(outputs.value)
    return np.stack([media.side_by_side(o, r) for o, r in zip(np.asarray(batch["video"]), rec)])

  def encode(self, model: WanVAE, batch) -> dict[str, jax.Array]:
    out = {}
    for key, name in (("video", "latent_self"), ("partner_video", "latent_partner")):
      t = batch[key].shape[1]
      if t % model.time_factor:
        raise ValueError(f"VAE encode: clips of {t} frames; the encode job needs a multiple of "
                         f"{model.time_factor} (each latent frame stands for that many frames)")
      x = self._pixels(batch[key][:, :t - model.time_factor + 1])
      out[name] = model.normalize(model.encode(x))
    if "reference_image" in batch:   # the identity frame, as a one-frame video: [B, 1, h, w, z]
      out["reference_latent"] = model.normalize(
          model.encode(self._pixels(batch["reference_image"])[:, None]))
    return out

  def evaluators(self) -> tuple[str, ...]:
    return ("reconstruction",)
