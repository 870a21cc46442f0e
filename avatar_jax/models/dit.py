"""Wan 2.1 DiT backbone in Flax NNX, with import of published weights (diffusers layout).

Layout: channel-last latents x [B, T, H, W, C_in] (the VAE's output) -> velocity
[B, T, H, W, C_out], float32. Tokens are the patches of a (p_t, p_h, p_w) grid, N = F·h·w with
F = T/p_t, h = H/p_h, w = W/p_w, ordered frame-major: token n = (f·h + i)·w + j.

Architecture (what diffusers' `WanTransformer3DModel` computes):
  patch embedding   a Conv3d with stride = kernel = patch, i.e. a linear map of each flattened
                    patch (p_t, p_h, p_w, C_in) to the width D = heads·head_dim
  time embedding    sinusoid (freq_dim, [cos, sin]) of the timestep -> linear, SiLU, linear -> temb
                    [B, D]; SiLU, linear -> 6·D: shift/scale/gate of self-attention and of the FFN
                    per block, each added to the block's learned `scale_shift_table` [6, D]
  block             x += gate · SelfAttn(LN(x)·(1 + scale) + shift)           (3D RoPE on q, k)
                    x += CrossAttn(LN_affine(x), text)      (optional; no gate; LN only with
                                                            cross_attn_norm, as published)
                    x += Σ extra(x, cond, grid)                              (hook, empty here)
                    x += c_gate · FFN(LN(x)·(1 + c_scale) + c_shift)          (GELU, tanh approx.)
  head              LN(x)·(1 + scale) + shift with (shift, scale) = table [2, D] + temb (not its
                    6·D projection), linear to p_t·p_h·p_w·C_out, unpatchify
Attention: q, k, v and output projections with biases; q and k RMS-normalised over the full width
(all heads together, as Wan does) before the heads are split; RoPE over (frame, row, column) with
Wan's split of the head dim (attention.rope_split) and θ = 10000; softmax scale 1/√head_dim.
The LayerNorms (ε = 1e-6) and the modulation arithmetic run in float32 whatever the compute dtype,
and so do the time embedding and its projection (diffusers keeps the embedder in float32 too).

Time. `__call__` takes Wan's timestep (σ·1000, σ the noise fraction; [B], or [B, F] per latent
frame as for diffusion forcing) and returns what Wan predicts, noise − data. `velocity(x, t)` is
the same model in avatar_jax.diffusion.flow's convention (t = 0 noise, t = 1 data, v = data −
noise): σ = 1 − t and the sign flips, so pretrained weights plug into the project's samplers.

Audio hook. Every block holds a list `extra` (empty by default, nothing in the checkpoint) of
modules called as `update = m(x, cond, grid)` after the attentions and before the FFN (where
MultiTalk/InfiniteTalk put audio cross-attention on Wan): x [B, N, D] is the residual stream,
`cond` whatever `__call__` got as `extra=` (e.g. audio tokens and their times), `grid` the static
(F, h, w); the update [B, N, D] is added to x. A later system fills them through
`DiT(cfg, make_extra=lambda i: [...])` (block index -> modules), the backbone stays unchanged.

Sharding: parameters carry logical axes (heads/mlp on `tensor`, the width on `fsdp`); token
activations are pinned to ("batch", "time", "embed"), so the token axis can be split over the
mesh's `context` axis (XLA gathers keys/values for the global self-attention).

Import: `load_diffusers(path)` reads a local `WanTransformer3DModel` folder (config.json +
diffusion_pytorch_model.safetensors, or sharded with an index json; a pipeline snapshot's
transformer/ subfolder is found) with NumPy only; `convert_cli` writes an Orbax checkpoint
(`python -m avatar_jax.convert wan_dit --src <folder> --out <dir>`), `load_checkpoint` reads it.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from avatar_jax import config_lib, sharding
from avatar_jax.kernels.gaussian_attention import sharded as gattn_sharded
from avatar_jax.models import layers, weights
from avatar_jax.models import vae
from avatar_jax.models.attention import apply_rope

PRESETS: dict[str, dict[str, Any]] = {
    # CI: 0.11M parameters (0.15M with text).
    "tiny": dict(num_layers=2, num_heads=2, head_dim=32, ffn_dim=128, freq_dim=32, text_dim=32),
    # SynthDyad-scale backbones trained from scratch.
    "S": dict(num_layers=12, num_heads=6, head_dim=64, ffn_dim=1536),
    "B": dict(num_layers=12, num_heads=12, head_dim=64, ffn_dim=3072),
    # The published Wan2.1-T2V-1.3B shape (1.42B parameters with text, 1.13B without).
    "wan2.1-1.3B": dict(num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960),
}
ATTENTION_IMPLS = ("xla", "cudnn")


def default_config(preset: str = "S") -> ml_collections.ConfigDict:
  """The DiT config of a preset ("tiny", "S", "B", "wan2.1-1.3B").

  Fields: num_layers, num_heads, head_dim (width D = num_heads·head_dim), ffn_dim, in_channels /
  out_channels (latent channels), patch_size (p_t, p_h, p_w), freq_dim (sinusoid width of the
  time embedding), use_text (text cross-attention in every block; off by default), text_dim
  (width of the text encoder's states, umT5's 4096 for Wan), cross_attn_norm (affine LayerNorm
  before the text cross-attention), eps, rope_theta, rope_max_seq_len (kept for diffusers'
  config; positions here are not limited by it), dtype (compute) / param_dtype (storage),
  attention_impl ("xla" | "cudnn", jax.nn.dot_product_attention's), remat (recompute each block
  in the backward pass).
  """
  if preset not in PRESETS:
    raise ValueError(f"unknown DiT preset {preset!r}; expected one of {sorted(PRESETS)}")
  p = dict(num_layers=30, num_heads=12, head_dim=128, ffn_dim=8960, in_channels=16,
           out_channels=16, patch_size=(1, 2, 2), freq_dim=256, use_text=False, text_dim=4096,
           cross_attn_norm=True, eps=1e-6, rope_theta=10_000.0, rope_max_seq_len=1024,
           dtype="bfloat16", param_dtype="float32", attention_impl="xla", remat=False)
  p.update(PRESETS[preset])
  return ml_collections.ConfigDict(dict(preset=preset, **p))


def _check_config(cfg) -> None:
  if cfg.head_dim % 2:
    raise ValueError(f"DiT config: head_dim must be even for RoPE, found {cfg.head_dim}")
  if cfg.freq_dim % 2:
    raise ValueError(f"DiT config: freq_dim must be even (cos ‖ sin), found {cfg.freq_dim}")
  if len(cfg.patch_size) != 3:
    raise ValueError(f"DiT config: patch_size must be (p_t, p_h, p_w), found {cfg.patch_size}")
  if cfg.attention_impl not in ATTENTION_IMPLS:
    raise ValueError(f"DiT config: attention_impl {cfg.attention_impl!r}, expected one of "
                     f"{ATTENTION_IMPLS}")


def width(cfg) -> int:
  return cfg.num_heads * cfg.head_dim


# ============================================================================= layers
def _param(init, rngs: nnx.Rngs, shape, dtype, axes) -> nnx.Param:
  return nnx.Param(layers.logical(init, axes)(rngs.params(), shape, dtype))


def _table_init(key, shape, dtype):
  # diffusers' scale_shift_table: randn / √D, so untrained modulation is small but not zero.
  return jax.random.normal(key, shape, dtype) / math.sqrt(shape[-1])


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis in float32 (diffusers' FP32LayerNorm), returned in float32;
  `affine` adds a scale and bias [D]."""

  def __init__(self, d: int, eps: float, *, affine: bool, rngs: nnx.Rngs, param_dtype):
    self.eps = eps
    param = lambda init: _param(init, rngs, (d,), param_dtype, ("embed",)) if affine else None
    self.scale = param(nnx.initializers.ones_init())
    self.bias = param(nnx.initializers.zeros_init())

  def __call__(self, x):
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    if self.scale is not None:
      y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y


class RMSNorm(nnx.Module):
  """x / √(mean(x²) + ε) · scale over the last axis (torch.nn.RMSNorm); statistics float32."""

  def __init__(self, d: int, eps: float, *, rngs: nnx.Rngs, param_dtype):
    self.eps = eps
    self.scale = _param(nnx.initializers.ones_init(), rngs, (d,), param_dtype, ("heads",))

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Embedder(nnx.Module):
  """linear_1 -> activation -> linear_2 ([..., din] -> [..., D]): the time embedder (SiLU) and
  the text projection (GELU, tanh approximation)."""

  def __init__(self, din: int, d: int, act: Callable, *, rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.linear_1 = layers.dense(din, d, (None, "embed"), **kw)
    self.linear_2 = layers.dense(d, d, ("embed", None), **kw)
    self.act = act

  def __call__(self, x):
    return self.linear_2(self.act(self.linear_1(x)))


class Attention(nnx.Module):
  """Wan attention. x [B, N, D] attends to ctx [B, M, D] (itself when None) -> [B, N, D]."""

  def __init__(self, d: int, num_heads: int, *, eps: float, impl: str, rope_theta: float,
               rngs: nnx.Rngs, dtype, param_dtype):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_heads, self.impl, self.rope_theta = num_heads, impl, rope_theta
    self.to_q = layers.dense(d, d, ("embed", "heads"), **kw)
    self.to_k = layers.dense(d, d, ("embed", "heads"), **kw)
    self.to_v = layers.dense(d, d, ("embed", "heads"), **kw)
    self.to_out = layers.dense(d, d, ("heads", "embed"), **kw)
    # Over the full width, not per head: Wan's "rms_norm_across_heads".
    self.norm_q = RMSNorm(d, eps, rngs=rngs, param_dtype=param_dtype)
    self.norm_k = RMSNorm(d, eps, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x, ctx=None, pos=None):
    """pos: [1 or B, N, 3] (frame, row, column) rotates q and k (self-attention only)."""
    ctx = x if ctx is None else ctx
    b, n, d = x.shape
    heads = lambda y: y.reshape(*y.shape[:2], self.num_heads, d // self.num_heads)
    q = heads(self.norm_q(self.to_q(x)))
    k = heads(self.norm_k(self.to_k(ctx)))
    v = heads(self.to_v(ctx))
    if pos is not None:
      q = apply_rope(q, pos, "3d", self.rope_theta)
      k = apply_rope(k, pos, "3d", self.rope_theta)
    n_ctx = sharding.mesh_axis_size("context")
    if ctx is x and n_ctx > 1 and n % n_ctx == 0:
      # Long videos: the tokens stay split over `context` and keys/values travel the ring
      # (the Gaussian attention without its bias, σ = inf), so no device holds all N keys or
      # an [N, N] score block: per-device memory falls with the context size.
      times = jnp.zeros((b, n), jnp.float32)
      out = gattn_sharded.sharded_gaussian_attention(
          q, k, v, times, times, jnp.full((self.num_heads,), jnp.inf, jnp.float32))
    else:
      out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
    out = sharding.constrain(out.reshape(b, n, d), ("batch", "time", "heads"))
    return self.to_out(out)


def _by_frame(fn, x, *per_frame):
  """fn(x, *v) with each v [B, F', D] broadcast over the tokens of its frame: x [B, N, D] is seen
  as [B, F', N/F', D]. F' = 1 is one value per example."""
  b, n, d = x.shape
  f = per_frame[0].shape[1]
  y = fn(x.reshape(b, f, n // f, d), *(v[:, :, None] for v in per_frame))
  return y.reshape(b, n, y.shape[-1])


def _adaln(norm, x, shift, scale):
  """norm(x)·(1 + scale) + shift, float32: x [B, N, D]; shift, scale [B, F', D] per frame."""
  return _by_frame(lambda a, s, c: norm(a) * (1.0 + c) + s, x, shift, scale)


class Block(nnx.Module):
  """One Wan transformer block on tokens x [B, N, D] (module docstring)."""

  def __init__(self, cfg, *, extra: Sequence[nnx.Module] = (), rngs: nnx.Rngs, dtype, param_dtype):
    d = width(cfg)
    norm = dict(rngs=rngs, param_dtype=param_dtype)
    attn = dict(eps=cfg.eps, impl=cfg.attention_impl, rope_theta=cfg.rope_theta, rngs=rngs,
                dtype=dtype, param_dtype=param_dtype)
    self.dtype = dtype
    self.norm1 = LayerNorm(d, cfg.eps, affine=False, **norm)
    self.attn1 = Attention(d, cfg.num_heads, **attn)
    # Without cross_attn_norm the text cross-attention sees x itself (diffusers' nn.Identity).
    text_norm = cfg.use_text and cfg.cross_attn_norm
    self.norm2 = LayerNorm(d, cfg.eps, affine=True, **norm) if text_norm else None
    self.attn2 = Attention(d, cfg.num_heads, **attn) if cfg.use_text else None
    self.extra = nnx.List(list(extra))
    self.norm3 = LayerNorm(d, cfg.eps, affine=False, **norm)
    self.ffn = layers.Mlp(d, cfg.ffn_dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.scale_shift_table = _param(_table_init, rngs, (6, d), param_dtype, (None, "embed"))

  def __call__(self, x, mod, pos, text=None, cond=None, grid=None):
    """x [B, N, D]; mod [B, F', 6, D] float32 (time projection); pos [1, N, 3]; text [B, L, D]
    (embedded) when the block has cross-attention; cond, grid: for the extra modules."""
    mod = self.scale_shift_table[...].astype(jnp.float32) + mod
    shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, :, i] for i in range(6))
    h = _adaln(self.norm1, x, shift, scale)
    x = self._add(x, self.attn1(h.astype(self.dtype), pos=pos), gate)
    if self.attn2 is not None:
      h = x if self.norm2 is None else self.norm2(x)
      x = x + self.attn2(h.astype(self.dtype), text).astype(x.dtype)
    for m in self.extra:
      x = x + m(x, cond, grid).astype(x.dtype)
    h = _adaln(self.norm3, x, c_shift, c_scale)
    x = self._add(x, self.ffn(h.astype(self.dtype)), c_gate)
    return sharding.constrain(x, ("batch", "time", "embed"))

  @staticmethod
  def _add(x, update, gate):
    """x + update · gate, the sum in float32, returned in x's dtype; gate [B, F', D]."""
    y = _by_frame(lambda u, g: u * g, update.astype(jnp.float32), gate)
    return (x.astype(jnp.float32) + y).astype(x.dtype)


def patchify(x, patch: Sequence[int]):
  """[B, T, H, W, C] -> tokens [B, N, p_t·p_h·p_w·C], frame-major, each patch flattened in
  (p_t, p_h, p_w, C) order."""
  b, t, h, w, c = x.shape
  pt, ph, pw = patch
  x = x.reshape(b, t // pt, pt, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, -1, pt * ph * pw * c)


def unpatchify(tokens, grid: Sequence[int], patch: Sequence[int]):
  """tokens [B, N, p_t·p_h·p_w·C] on grid (F, h, w) -> [B, F·p_t, h·p_h, w·p_w, C]."""
  b = tokens.shape[0]
  (f, h, w), (pt, ph, pw) = grid, patch
  x = tokens.reshape(b, f, h, w, pt, ph, pw, -1).transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(b, f * pt, h * ph, w * pw, -1)


def grid_positions(grid: Sequence[int]) -> jax.Array:
  """(frame, row, column) of every token of grid (F, h, w): [1, N, 3] float32 (RoPE's input)."""
  axes = jnp.meshgrid(*(jnp.arange(n, dtype=jnp.float32) for n in grid), indexing="ij")
  return jnp.stack(axes, axis=-1).reshape(1, -1, 3)


class DiT(nnx.Module):
  """The Wan 2.1 DiT. cfg: `default_config(...)` (or `config_from_diffusers`).

  make_extra: block index -> modules for that block's `extra` list (the audio hook, module
  docstring); None: none.
  """

  def __init__(self, cfg, *, rngs: nnx.Rngs,
               make_extra: Callable[[int], Sequence[nnx.Module]] | None = None):
    _check_config(cfg)
    # Frozen: hashable, so nnx.jit's cache keys on it (as in vae.WanVAE).
    self.cfg = config_lib.freeze(cfg)
    self.dtype = jnp.dtype(cfg.dtype)
    param_dtype = jnp.dtype(cfg.param_dtype)
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=param_dtype)
    d, patch = width(cfg), math.prod(cfg.patch_size)
    self.patch_embedding = layers.dense(patch * cfg.in_channels, d, (None, "embed"), **kw)
    # The timestep path stays float32: it is tiny, and bf16 would quantise the modulation.
    f32 = dict(kw, dtype=jnp.float32)
    self.time_embedder = Embedder(cfg.freq_dim, d, jax.nn.silu, **f32)
    self.time_proj = layers.dense(d, 6 * d, ("embed", None), **f32)
    self.text_embedder = (Embedder(cfg.text_dim, d, jax.nn.gelu, **kw)  # gelu: tanh approx.
                          if cfg.use_text else None)
    self.blocks = nnx.List([Block(cfg, extra=make_extra(i) if make_extra else (), **kw)
                            for i in range(cfg.num_layers)])
    self.norm_out = LayerNorm(d, cfg.eps, affine=False, rngs=rngs, param_dtype=param_dtype)
    # Zero-initialised output layer, as Wan initialises its head.
    self.proj_out = layers.dense(d, patch * cfg.out_channels, ("embed", None), zero_init=True,
                                 **kw)
    self.scale_shift_table = _param(_table_init, rngs, (2, d), param_dtype, (None, "embed"))

  def _check(self, x, timestep, text):
    cfg = self.cfg
    if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
      raise ValueError(f"DiT: expected latents [B, T, H, W, {cfg.in_channels}], found shape "
                       f"{x.shape}")
    b, t, h, w, _ = x.shape
    if t % cfg.patch_size[0] or h % cfg.patch_size[1] or w % cfg.patch_size[2]:
      raise ValueError(f"DiT: T, H, W = {t}, {h}, {w} (latents {x.shape}) must be multiples of "
                       f"the patch size {tuple(cfg.patch_size)}; crop or pad the latents")
    frames = t // cfg.patch_size[0]
    if timestep.shape not in ((b,), (b, frames)):
      raise ValueError(f"DiT: timestep of shape {timestep.shape}, expected [B] = ({b},) or one "
                       f"per latent frame [B, F] = ({b}, {frames})")
    if cfg.use_text and (text is None or text.ndim != 3 or text.shape[-1] != cfg.text_dim):
      shape = None if text is None else text.shape
      raise ValueError(f"DiT: use_text is on, so text [B, L, {cfg.text_dim}] is needed; found "
                       f"{shape}")
    if not cfg.use_text and text is not None:
      raise ValueError("DiT: text given, but the config has use_text=False (no cross-attention)")

  def __call__(self, x, timestep, *, text=None, extra=None):
    """Wan's prediction (noise − data) [B, T, H, W, C_out] float32.

    x: latents [B, T, H, W, C_in]; timestep: Wan's σ·1000, [B] or per latent frame [B, F]
    (F = T / p_t), a scalar broadcasts; text: [B, L, text_dim] encoder states when use_text;
    extra: `cond` handed to the blocks' extra modules.
    """
    cfg = self.cfg
    timestep = jnp.asarray(timestep, jnp.float32)
    if timestep.ndim == 0:
      timestep = jnp.broadcast_to(timestep, x.shape[:1])
    self._check(x, timestep, text)
    b, t, h, w, _ = x.shape
    grid = (t // cfg.patch_size[0], h // cfg.patch_size[1], w // cfg.patch_size[2])
    tokens = self.patch_embedding(patchify(x.astype(self.dtype), cfg.patch_size))
    tokens = sharding.constrain(tokens, ("batch", "time", "embed"))

    steps = timestep.reshape(b, -1)                                  # [B, F'], F' ∈ {1, F}
    # layers.timestep_embedding takes flow time in [0, 1] and scales it by 1000 itself.
    temb = self.time_embedder(layers.timestep_embedding(steps / 1000.0, cfg.freq_dim))
    mod = self.time_proj(jax.nn.silu(temb)).reshape(b, steps.shape[1], 6, -1)
    if text is not None:
      text = sharding.constrain(self.text_embedder(text.astype(self.dtype)),
                                ("batch", None, "embed"))
    pos = grid_positions(grid)

    def run(block, tokens, mod, pos, text, cond):
      return block(tokens, mod, pos, text, cond, grid)   # grid: static ints, closed over

    if cfg.remat:
      run = nnx.remat(run)
    for block in self.blocks:
      tokens = run(block, tokens, mod, pos, text, extra)

    shift, scale = jnp.unstack(self.scale_shift_table[...].astype(jnp.float32)[None, None]
                               + temb[:, :, None], axis=2)
    h = _adaln(self.norm_out, tokens, shift, scale)
    out = self.proj_out(h.astype(self.dtype))
    return unpatchify(out, grid, cfg.patch_size).astype(jnp.float32)

  def velocity(self, x, t, **kw):
    """The flow velocity in avatar_jax.diffusion.flow's convention (t = 0 noise, t = 1 data,
    v = data − noise): t [B] or [B, F] -> [B, T, H, W, C_out]. Wan's σ is 1 − t and it predicts
    noise − data, hence the sign."""
    return -self(x, (1.0 - jnp.asarray(t, jnp.float32)) * 1000.0, **kw)


def num_params(model: nnx.Module) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def count_params(cfg) -> int:
  """Parameters of a config, counted on an abstract model (nothing is allocated)."""
  return num_params(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))


# ============================================================================= import
def config_from_diffusers(d: Mapping[str, Any], **overrides) -> ml_collections.ConfigDict:
  """Our config from a diffusers `WanTransformer3DModel` config.json dict (Wan 2.1 text-to-video
  kind; text cross-attention on, as the published weights have it)."""
  name = d.get("_class_name", "WanTransformer3DModel")
  if name != "WanTransformer3DModel":
    raise ValueError(f"expected a WanTransformer3DModel config, found _class_name={name!r}")
  # Image conditioning (Wan 2.1 I2V: image_dim / added_kv_proj_dim) and per-head q/k norms are
  # other variants of the class.
  unsupported = {k: d.get(k) for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
                 if d.get(k) is not None}
  if unsupported or d.get("qk_norm", "rms_norm_across_heads") != "rms_norm_across_heads":
    raise ValueError(f"WanTransformer3DModel config with {unsupported}, qk_norm="
                     f"{d.get('qk_norm', 'rms_norm_across_heads')!r} is not supported: only the "
                     "text-to-video kind (no image inputs, qk_norm='rms_norm_across_heads') "
                     "imports")
  cfg = default_config("wan2.1-1.3B")
  cfg.preset = "diffusers"
  cfg.num_layers = int(d.get("num_layers", 40))
  cfg.num_heads = int(d.get("num_attention_heads", 40))
  cfg.head_dim = int(d.get("attention_head_dim", 128))
  cfg.ffn_dim = int(d.get("ffn_dim", 13824))
  cfg.in_channels = int(d.get("in_channels", 16))
  cfg.out_channels = int(d.get("out_channels") or cfg.in_channels)
  cfg.patch_size = tuple(int(p) for p in d.get("patch_size", (1, 2, 2)))
  cfg.freq_dim = int(d.get("freq_dim", 256))
  cfg.use_text = True
  cfg.text_dim = int(d.get("text_dim", 4096))
  cfg.cross_attn_norm = bool(d.get("cross_attn_norm", True))
  cfg.eps = float(d.get("eps", 1e-6))
  cfg.rope_max_seq_len = int(d.get("rope_max_seq_len", 1024))
  cfg.update(overrides)
  _check_config(cfg)
  return cfg


def diffusers_config(cfg) -> dict[str, Any]:
  """The `WanTransformer3DModel(**kwargs)` of our config (for building the reference model)."""
  return dict(patch_size=list(cfg.patch_size), num_attention_heads=cfg.num_heads,
              attention_head_dim=cfg.head_dim, in_channels=cfg.in_channels,
              out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
              ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm,
              qk_norm="rms_norm_across_heads", eps=cfg.eps, rope_max_seq_len=cfg.rope_max_seq_len)


def config_from_dict(d: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Our config from either our own JSON (has "preset") or a diffusers config.json."""
  if "preset" in d and "num_heads" in d:
    cfg = default_config("wan2.1-1.3B")
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    _check_config(cfg)
    return cfg
  return config_from_diffusers(d)


# Our module tree mirrors diffusers' names but for these containers (ours -> theirs).
_RENAMES = {"time_embedder": "condition_embedder.time_embedder",
            "time_proj": "condition_embedder.time_proj",
            "text_embedder": "condition_embedder.text_embedder",
            "to_out": "to_out.0", "up": "net.0.proj", "down": "net.2"}
_TEXT_KEY = re.compile(r"condition_embedder\.text_embedder\.|blocks\.\d+\.(attn2|norm2)\.")


def diffusers_key(path: Sequence[Any]) -> str:
  """Our param path ('blocks', 0, 'ffn', 'up', 'kernel') -> its diffusers key
  ('blocks.0.ffn.net.0.proj.weight')."""
  parts = [_RENAMES.get(str(p), str(p)) for p in path[:-1]]
  leaf = str(path[-1])
  return ".".join(parts + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])


def _torch_to_ours(key: str, value: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  if key == "patch_embedding.weight":    # Conv3d [D, C, p_t, p_h, p_w] -> [p_t·p_h·p_w·C, D]
    return value.transpose(2, 3, 4, 1, 0).reshape(shape)
  if key.endswith("scale_shift_table"):  # [1, k, D] -> [k, D]
    return value.reshape(shape)
  if value.ndim == 2:                    # Linear [out, in] -> [in, out]
    return value.T
  return value


def _ours_to_torch(key: str, value: np.ndarray, cfg) -> np.ndarray:
  if key == "patch_embedding.weight":
    return value.reshape(*cfg.patch_size, cfg.in_channels, -1).transpose(4, 3, 0, 1, 2)
  if key.endswith("scale_shift_table"):
    return value[None]
  return value.T if value.ndim == 2 else value


def from_diffusers_state(tensors: Mapping[str, np.ndarray], cfg, *, ignore_text: bool = False,
                         source: str = "checkpoint") -> DiT:
  """A DiT holding `tensors` (diffusers key names, torch layouts).

  ignore_text: with cfg.use_text off, leave out the text embedder and cross-attention tensors
  (logged) instead of reporting them as unknown. Raises ValueError listing the keys with no
  counterpart in the model (unknown), the parameters with no tensor (missing), and any shape
  mismatch.
  """
  abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
  graphdef, params = nnx.split(abstract)
  keys = {diffusers_key(path): (path, var) for path, var in nnx.to_flat_state(params)}
  extra = set(tensors) - set(keys)
  ignored = sorted(k for k in extra if _TEXT_KEY.match(k)) if ignore_text else []
  unknown = sorted(extra - set(ignored))
  missing = sorted(set(keys) - set(tensors))
  if unknown or missing:
    raise ValueError(
        f"{source}: the weights do not match the DiT config (num_layers={cfg.num_layers}, "
        f"heads={cfg.num_heads}×{cfg.head_dim}, use_text={cfg.use_text}):\n"
        f"  unknown keys ({len(unknown)}): {unknown[:20]}\n"
        f"  missing keys ({len(missing)}): {missing[:20]}")
  if ignored:
    logging.info("%s: left out %d text tensors (use_text=False)", source, len(ignored))
  param_dtype = jnp.dtype(cfg.param_dtype)
  loaded, bad = [], []
  for key, (path, var) in keys.items():
    value = np.asarray(tensors[key], np.float32)
    want = tuple(var.shape)
    try:
      value = _torch_to_ours(key, value, want)
    except ValueError:  # a reshape that cannot hold: reported below like any mismatch
      pass
    if value.shape != want:
      bad.append(f"{key}: {tuple(tensors[key].shape)} in the checkpoint, the config implies "
                 f"{want} (ours, [in, out] for linears)")
      continue
    loaded.append((path, var.replace(jnp.asarray(value, param_dtype))))
  if bad:
    raise ValueError(f"{source}: shape mismatches against the config:\n  " + "\n  ".join(bad[:20]))
  return nnx.merge(graphdef, nnx.from_flat_state(loaded))


def _resolve_folder(path: str) -> str:
  # A whole pipeline snapshot (e.g. Wan2.1-T2V-1.3B-Diffusers) keeps the DiT under transformer/.
  if (os.path.isdir(path) and not os.path.exists(os.path.join(path, "config.json"))
      and os.path.exists(os.path.join(path, "transformer", "config.json"))):
    return os.path.join(path, "transformer")
  return path


def load_diffusers(path: str, *, use_text: bool = True,
                   **overrides) -> tuple[ml_collections.ConfigDict, DiT]:
  """(config, DiT) from a local diffusers `WanTransformer3DModel` folder, without torch.

  path: the folder (config.json + diffusion_pytorch_model.safetensors or its sharded index), or a
    pipeline snapshot holding it under transformer/.
  use_text: False builds the backbone without text cross-attention and leaves the checkpoint's
    text embedder / cross-attention tensors out (for systems conditioned on audio only).
  overrides: config fields to set, e.g. dtype="float32", attention_impl="cudnn".
  """
  path = _resolve_folder(os.path.expanduser(path))
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isdir(path) or not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{path}: expected a diffusers WanTransformer3DModel folder with "
                            "config.json and diffusion_pytorch_model.safetensors (save_pretrained)")
  with open(cfg_file) as f:
    cfg = config_from_diffusers(json.load(f), use_text=use_text, **overrides)
  # The VAE's reader: single or sharded safetensors, NumPy only (bfloat16 via ml_dtypes).
  tensors = vae.read_weights(path)
  return cfg, from_diffusers_state(tensors, cfg, ignore_text=not use_text, source=path)


def to_diffusers_state(model: DiT) -> dict[str, np.ndarray]:
  """The backbone's parameters (extra modules excluded) under diffusers names, torch layouts."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    if "extra" in map(str, path):
      continue
    key = diffusers_key(path)
    value = _ours_to_torch(key, np.asarray(var[...], np.float32), model.cfg)
    out[key] = np.ascontiguousarray(value)   # safetensors writes memory as is, whatever strides
  return out


def save_diffusers(model: DiT, folder: str) -> str:
  """Writes config.json + diffusion_pytorch_model.safetensors that diffusers'
  `WanTransformer3DModel.from_pretrained(folder)` (and `load_diffusers`) read; text-free models
  have no counterpart there (diffusers' Wan always has text cross-attention)."""
  if not model.cfg.use_text:
    raise ValueError("save_diffusers: diffusers' WanTransformer3DModel always has text "
                     "cross-attention; this model has use_text=False")
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(dict(_class_name="WanTransformer3DModel", **diffusers_config(model.cfg)), f, indent=2)
  save_file(to_diffusers_state(model), os.path.join(folder, "diffusion_pytorch_model.safetensors"))
  return folder


# ============================================================================= saving
def save_checkpoint(model: DiT, out_dir: str) -> str:
  """Writes `model` as an Orbax checkpoint under out_dir/checkpoints/0 (parameters as "frozen",
  the config as JSON, the project's layout, as vae.save_checkpoint), plus out_dir/dit_config.json.
  A run loads it with `config.init_from` (workdir=out_dir, into="model/<dit submodule>")."""
  return weights.save_converted(out_dir, {"frozen": nnx.state(model, nnx.Param)}, model.cfg,
                                "dit_config.json")


def load_checkpoint(out_dir: str, **overrides) -> tuple[ml_collections.ConfigDict, DiT]:
  """(config, DiT) from a `save_checkpoint` / `convert_cli` output folder."""
  with open(os.path.join(out_dir, "dit_config.json")) as f:
    cfg = config_from_dict(json.load(f))
  cfg.update(overrides)
  graphdef, params = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
  state = weights.restore_converted(out_dir, {"frozen": params})
  return cfg, nnx.merge(graphdef, state["frozen"])


def convert_cli(argv: Sequence[str] | None = None) -> str:
  """`python -m avatar_jax.convert wan_dit --src <diffusers folder> --out <dir> [--no_text]`."""
  parser = argparse.ArgumentParser(
      prog="python -m avatar_jax.convert wan_dit",
      description="Import diffusers WanTransformer3DModel (Wan 2.1 DiT) weights as an Orbax "
                  "checkpoint of avatar_jax.models.dit.DiT.")
  parser.add_argument("--src", required=True,
                      help="diffusers folder (or a pipeline snapshot with transformer/)")
  parser.add_argument("--out", required=True,
                      help="output folder (checkpoints/0 + dit_config.json)")
  parser.add_argument("--no_text", action="store_true",
                      help="leave out the text embedder and text cross-attention")
  args = parser.parse_args(argv)
  cfg, model = load_diffusers(args.src, use_text=not args.no_text)
  save_checkpoint(model, args.out)
  logging.info("wrote %s (%.1fM parameters, %d layers, use_text=%s)", args.out,
               num_params(model) / 1e6, cfg.num_layers, cfg.use_text)
  return args.out
