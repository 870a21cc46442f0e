"""Audio adapters of Beyond Monologue (arXiv 2604.10367) for the Wan DiT (avatar_jax.models.dit).

Two audio streams (the avatar's own speech, "self", and the partner's, "partner") condition the
DiT through two pieces:

  QFormer             one per stream, run once per forward pass. For every latent frame i,
                      `num_queries` learned queries cross-attend to the audio tokens of that
                      frame's window (video frames 4i−3..4i at `fps`; frame 0 alone, Wan's VAE
                      compresses time 1 + 4k -> 1 + k), widened by `margin` seconds, then an MLP.
                      -> tokens [B, F·Q, Dq] at times [B, F·Q] (the latent frame's centre).
  AudioCrossAttention one per stream in every DiT block (`extra`): the residual stream x [B, N, D]
                      (token n in latent frame n // (h·w), at that frame's centre time) attends
                      to that stream's Q-Former tokens with a per-head Gaussian bias on time
                      distance (TimeAttention "gaussian", 1D RoPE on time); zero-initialised
                      output, so a loaded backbone starts unchanged.

The window of the Q-Former is the hard window of TimeAttention's "frame" mode (|t_q − t_k| ≤
stride/(2·fps) + margin around the latent frame's centre), not a narrow Gaussian: a Gaussian
never reaches zero, so the hard window is what keeps a query block to its own window. The window
has one width, so latent frame 0 (centre t = 0) sees audio up to stride/(2·fps) + margin, more
than its single video frame.

Wiring:
    cfg = adapter_config(audio_dim=80)
    dit_model = dit.DiT(dit_cfg, rngs=rngs, make_extra=make_extra(cfg, dit_cfg, rngs=rngs))
    qf = QFormers(cfg, dit_cfg, rngs=rngs)
    cond = qf(dict(self=mel_self, partner=mel_partner), num_latent=F)   # make_cond's layout
    v = dit_model(x, timestep, extra=cond)

`cond` layout: {stream: {"tokens": [B, M, Dq], "times": [B, M] seconds}} for each stream of
cfg.streams, and optionally "latent_times" [B, F] (windows that do not start a clip,
`window_latent_times`); a dict of arrays, so it goes through jit / remat as a pytree.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax.models import layers
from avatar_jax.models.attention import TimeAttention

STREAMS = ("self", "partner")


def adapter_config(**overrides) -> ml_collections.ConfigDict:
  """Fields: streams; fps (video), stride (VAE temporal compression), audio_rate (Hz of the
  audio tokens, 50 for log-mel / wav2vec2), audio_dim (feature width); Q-Former: num_queries,
  qformer_heads, qformer_mlp (hidden width multiple), margin (seconds of context either side of
  a latent frame's window), dim (token width; None = the DiT's); cross-attention: sigma_range
  (seconds, geometric over heads), learn_sigma, progressive (σ range × (1 + depth/num_blocks)),
  num_heads (None = the DiT's), mode (the cross-attention's time prior, Beyond Monologue's
  ablation: "gaussian" per-head σ, "frame" a hard window of the latent frame's own audio ± margin,
  "global" none), implementation (TimeAttention's backend: "auto" picks the fused kernel on
  GPU/TPU)."""
  c = ml_collections.ConfigDict(dict(
      streams=STREAMS, fps=25.0, stride=4, audio_rate=50.0, audio_dim=80, num_queries=4,
      qformer_heads=4, qformer_mlp=4, margin=0.04, dim=ml_collections.config_dict.placeholder(int),
      sigma_range=(0.04, 2.0), learn_sigma=True, progressive=False,
      num_heads=ml_collections.config_dict.placeholder(int), mode="gaussian",
      implementation="auto"))
  c.update(overrides)
  return c


# ============================================================================= times
def latent_times(num_latent: int, fps: float, stride: int = 4) -> np.ndarray:
  """Centre time (seconds) of each latent frame: [F]. Latent 0 is video frame 0 alone (t = 0);
  latent i ≥ 1 covers video frames stride·(i−1)+1 .. stride·i, centred at their mean."""
  i = np.arange(num_latent, dtype=np.float32)
  return np.where(i == 0, 0.0, (stride * i - (stride - 1) / 2) / fps).astype(np.float32)


def window_latent_times(first_row, num_latent: int, fps: float, stride: int = 4) -> jax.Array:
  """Centre times [B, F] (seconds from the window's first video frame) of the latent frames of
  windows cut from pre-encoded latents: window b starts at latent row `first_row[b]` of its clip,
  i.e. at video frame stride·first_row. Row r ≥ 1 stands for video frames stride·(r−1)+1 ..
  stride·r, row 0 for frame 0 alone, so `latent_times` is the case first_row = 0."""
  r = jnp.asarray(first_row, jnp.float32)[:, None] + jnp.arange(num_latent, dtype=jnp.float32)
  centre = jnp.where(r == 0, 0.0, (stride * r - (stride - 1) / 2) / fps)
  return centre - stride * jnp.asarray(first_row, jnp.float32)[:, None] / fps


def audio_times(num_tokens: int, rate: float) -> np.ndarray:
  """Time (seconds) of audio token k at `rate` Hz: [Ta] (centred frames, as the log-mel's)."""
  return (np.arange(num_tokens, dtype=np.float32) / rate).astype(np.float32)


def _batch(t, b: int) -> jax.Array:
  return jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b, t.shape[-1]))


# ============================================================================= modules
class QFormer(nnx.Module):
  """Audio [B, Ta, Da] at times [B, Ta] -> tokens [B, F·Q, Dq], times [B, F·Q] (module doc)."""

  def __init__(self, cfg, dim: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.num_queries, self.fps, self.stride = cfg.num_queries, cfg.fps, cfg.stride
    self.queries = nnx.Param(layers.logical(nnx.initializers.normal(0.02), (None, "embed"))(
        rngs.params(), (cfg.num_queries, dim), param_dtype))
    self.norm_a = layers.layer_norm(cfg.audio_dim, **kw)
    self.norm_q = layers.layer_norm(dim, **kw)
    self.norm_m = layers.layer_norm(dim, **kw)
    # Hard window: the widest latent frame (stride video frames) plus the margin either side.
    self.attn = TimeAttention(dim, cfg.audio_dim, cfg.qformer_heads, mode="frame",
                              window=cfg.stride / (2 * cfg.fps) + cfg.margin, learn_sigma=False,
                              rope="1d", rope_rate=cfg.audio_rate, **kw)
    # TimeAttention zero-inits its output; here that would make the tokens audio-blind at init
    # and, behind the zero-initialised cross-attention, give this projection no gradient at
    # step 0. The cross-attention's zero output already keeps the backbone unchanged.
    o = self.attn.o.kernel
    o[...] = nnx.initializers.lecun_normal()(rngs.params(), o.shape, o.dtype)
    self.mlp = layers.Mlp(dim, cfg.qformer_mlp * dim, **kw)

  def __call__(self, audio, t_audio, num_latent: int, t_latent=None):
    """audio [B, Ta, Da]; t_audio [B, Ta] seconds; num_latent F (static); t_latent [B, F] the
    latent frames' centre times (default: `latent_times`, a clip's first window)."""
    b = audio.shape[0]
    q = jnp.tile(self.queries[...], (num_latent, 1))[None]            # [1, F·Q, Dq]
    q = jnp.broadcast_to(q, (b, *q.shape[1:]))
    if t_latent is None:
      t_latent = _batch(latent_times(num_latent, self.fps, self.stride), b)
    t = jnp.repeat(t_latent, self.num_queries, axis=1)
    x = q + self.attn(self.norm_q(q), t, self.norm_a(audio), t_audio)
    return x + self.mlp(self.norm_m(x)), t


class AudioCrossAttention(nnx.Module):
  """The per-block extra module for one stream: x [B, N, D] -> update [B, N, D] (module doc)."""

  def __init__(self, cfg, dim: int, ctx_dim: int, num_heads: int, stream: str, *,
               depth: int = 0, num_blocks: int = 1, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.stream, self.fps, self.stride = stream, cfg.fps, cfg.stride
    # Progressive: deeper blocks see wider context (Beyond Monologue's ablation).
    widen = 1.0 + depth / num_blocks if cfg.progressive else 1.0
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = layers.layer_norm(dim, **kw)
    self.attn = TimeAttention(dim, ctx_dim, num_heads, mode=cfg.mode, rope="1d",
                              sigma_range=tuple(s * widen for s in cfg.sigma_range),
                              learn_sigma=cfg.learn_sigma and cfg.mode == "gaussian",
                              window=cfg.stride / (2 * cfg.fps) + cfg.margin,
                              implementation=cfg.implementation, **kw)

  def __call__(self, x, cond: Mapping[str, Mapping[str, jax.Array]], grid: Sequence[int]):
    """x [B, N, D], N = F·h·w frame-major; cond: make_cond's layout; grid (F, h, w) static.
    Assumes the DiT's temporal patch is 1 (Wan's), so token frames are latent frames."""
    f, h, w = grid
    b = x.shape[0]
    t_latent = cond.get("latent_times")
    if t_latent is None:
      t_latent = _batch(latent_times(f, self.fps, self.stride), b)
    t = jnp.repeat(t_latent, h * w, axis=1)
    c = cond[self.stream]
    return self.attn(self.norm(x), t, c["tokens"], c["times"])


class QFormers(nnx.Module):
  """One QFormer per stream; __call__ builds the DiT's `extra=` (make_cond's layout)."""

  def __init__(self, cfg, dit_cfg, *, rngs: nnx.Rngs):
    dim, dtype, pdt = _dims(cfg, dit_cfg)
    self.streams, self.audio_rate = tuple(cfg.streams), cfg.audio_rate
    self.q = nnx.Dict({s: QFormer(cfg, dim, rngs=rngs, dtype=dtype, param_dtype=pdt)
                       for s in cfg.streams})

  def __call__(self, audio: Mapping[str, jax.Array], num_latent: int,
               times: Mapping[str, jax.Array] | None = None, latent_t=None):
    """audio {stream: [B, Ta, Da]}; times {stream: [B, Ta]} (default: k / audio_rate);
    latent_t [B, F]: the latent frames' centre times (default: `latent_times`)."""
    toks = {}
    for s in self.streams:
      a = audio[s]
      t = (times or {}).get(s)
      t = _batch(audio_times(a.shape[1], self.audio_rate), a.shape[0]) if t is None else t
      toks[s] = self.q[s](a, t, num_latent, latent_t)
    return make_cond(toks, latent_t)


def make_cond(tokens: Mapping[str, tuple[jax.Array, jax.Array]], latent_t=None):
  """{stream: (tokens [B, M, Dq], times [B, M])} -> the DiT's `extra=`:
  {stream: {"tokens": ..., "times": ...}} (what AudioCrossAttention reads), plus
  "latent_times" [B, F] when the latent frames' times are not `latent_times`' default."""
  cond = {s: {"tokens": tok, "times": jnp.asarray(t, jnp.float32)}
          for s, (tok, t) in tokens.items()}
  if latent_t is not None:
    cond["latent_times"] = jnp.asarray(latent_t, jnp.float32)
  return cond


def _dims(cfg, dit_cfg):
  d = dit_cfg.num_heads * dit_cfg.head_dim
  return cfg.dim or d, jnp.dtype(dit_cfg.dtype), jnp.dtype(dit_cfg.param_dtype)


def make_extra(cfg, dit_cfg, *, rngs: nnx.Rngs) -> Callable[[int], list[nnx.Module]]:
  """`DiT(dit_cfg, make_extra=make_extra(cfg, dit_cfg, rngs=rngs))`: every block gets one
  AudioCrossAttention per stream of cfg.streams (self, partner)."""
  if dit_cfg.patch_size[0] != 1:
    raise ValueError(f"bm_adapters: temporal patch {dit_cfg.patch_size[0]} != 1 unsupported")
  ctx, dtype, pdt = _dims(cfg, dit_cfg)
  d = dit_cfg.num_heads * dit_cfg.head_dim
  heads = cfg.num_heads or dit_cfg.num_heads
  return lambda i: [AudioCrossAttention(cfg, d, ctx, heads, s, depth=i,
                                        num_blocks=dit_cfg.num_layers, rngs=rngs, dtype=dtype,
                                        param_dtype=pdt) for s in cfg.streams]
