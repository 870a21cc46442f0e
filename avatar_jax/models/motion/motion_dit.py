"""Duplex motion DiT: flow matching over the avatar's motion coefficients from BOTH audio streams.

The avatar's motion x [B, T, C] (video frames at `fps`) is generated from its own audio (lips,
speech beats) and its partner's audio (nods, smiles, brows), each a log-mel stream at
`mel_rate` tokens/s. Every attention carries a multi-head Gaussian time-distance bias, so
narrow heads align frames with the audio under them and wide heads see seconds of context;
times are in seconds, which is what lets the 25 fps and 50 Hz grids meet.

Classifier-free guidance per stream: during training each stream is replaced by a learned null
token with probability `cond_drop`; at sampling, `guidance=(w_self, w_partner)` (see
diffusion/guidance.py for the nested combination).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax.data import features
from avatar_jax.diffusion import flow, guidance, samplers
from avatar_jax.models import registry
from avatar_jax.models.attention import TimeAttention
from avatar_jax.models.layers import AdaLN, Conv1d, Mlp, dense, layer_norm, timestep_embedding


class Stats(nnx.Variable):
  """Data statistics fixed before training (not optimised, saved with the model)."""


class AudioEncoder(nnx.Module):
  """log-mel [B, Ta, M] -> tokens [B, Ta, D] with ~0.3 s of local context (dilated convs)."""

  def __init__(self, n_mels: int, d: int, *, rngs: nnx.Rngs, layers: int = 3):
    self.inp = dense(n_mels, d, (None, "embed"), rngs=rngs)
    self.convs = nnx.List([Conv1d(d, d, 3, dilation=2 ** i, rngs=rngs) for i in range(layers)])
    self.norm = layer_norm(d, rngs=rngs)

  def __call__(self, mel):
    h = self.inp(mel)
    for conv in self.convs:
      h = h + conv(jax.nn.gelu(h))
    return self.norm(h)


class Block(nnx.Module):
  """Self-attention over motion frames, cross-attention to each audio stream, MLP."""

  def __init__(self, d: int, heads: int, cfg, *, rngs: nnx.Rngs):
    attn = dict(mode=cfg.attention.mode, learn_sigma=cfg.attention.learn_sigma,
                window=cfg.attention.window, implementation=cfg.attention.implementation)
    self.norm1 = AdaLN(d, d, rngs=rngs)
    self.self_attn = TimeAttention(d, d, heads, rngs=rngs, sigma_range=tuple(cfg.attention.self_sigma_range),
                                   **{**attn, "mode": "gaussian" if cfg.attention.mode != "global" else "global"})
    self.norm_a = layer_norm(d, rngs=rngs)
    self.cross_self = TimeAttention(d, d, heads, rngs=rngs, sigma_range=tuple(cfg.attention.sigma_range), **attn)
    self.norm_p = layer_norm(d, rngs=rngs)
    self.cross_partner = TimeAttention(d, d, heads, rngs=rngs, sigma_range=tuple(cfg.attention.sigma_range), **attn)
    self.norm2 = AdaLN(d, d, rngs=rngs)
    self.mlp = Mlp(d, 4 * d, rngs=rngs)

  def __call__(self, h, t_v, cond, a_self, a_partner, t_a):
    x, gate = self.norm1(h, cond)
    h = h + gate * self.self_attn(x, t_v, x, t_v)
    h = h + self.cross_self(self.norm_a(h), t_v, a_self, t_a)
    h = h + self.cross_partner(self.norm_p(h), t_v, a_partner, t_a)
    x, gate = self.norm2(h, cond)
    return h + gate * self.mlp(x)


class MotionDiT(nnx.Module):
  def __init__(self, cfg, *, rngs: nnx.Rngs, stats=None):
    d, c = cfg.width, cfg.channels
    self.cfg = cfg
    stats = stats or {"mean": np.zeros(c, np.float32), "std": np.ones(c, np.float32)}
    self.mean = Stats(jnp.asarray(stats["mean"], jnp.float32))
    self.std = Stats(jnp.asarray(stats["std"], jnp.float32))
    self.enc_self = AudioEncoder(cfg.n_mels, d, rngs=rngs)
    self.enc_partner = AudioEncoder(cfg.n_mels, d, rngs=rngs)
    init = nnx.initializers.normal(0.02)
    self.null_self = nnx.Param(init(rngs.params(), (d,)), sharding=("embed",), eager_sharding=False)
    self.null_partner = nnx.Param(init(rngs.params(), (d,)), sharding=("embed",), eager_sharding=False)
    din = 2 * c if cfg.use_partner_motion else c
    self.inp = dense(din, d, (None, "embed"), rngs=rngs)
    self.t_mlp = Mlp(d, 2 * d, rngs=rngs)
    self.blocks = nnx.List([Block(d, cfg.heads, cfg, rngs=rngs) for _ in range(cfg.depth)])
    self.norm_out = AdaLN(d, d, rngs=rngs)
    self.out = dense(d, c, ("embed", None), rngs=rngs, zero_init=True)

  def encode_audio(self, mel_self, mel_partner, drop_self, drop_partner):
    """Audio tokens [B, Ta, D] per stream; a dropped stream becomes its null token."""
    a_s = self.enc_self(mel_self)
    a_p = self.enc_partner(mel_partner)
    a_s = jnp.where(drop_self[:, None, None], self.null_self[...].astype(a_s.dtype), a_s)
    a_p = jnp.where(drop_partner[:, None, None], self.null_partner[...].astype(a_p.dtype), a_p)
    return a_s, a_p

  def __call__(self, x_t, t, audio, motion_partner=None):
    """x_t: [B, T, C] normalised noisy motion; t: [B]; audio: (a_self, a_partner) -> velocity [B, T, C]."""
    b, n, _ = x_t.shape
    a_s, a_p = audio
    t_v = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32) / self.cfg.fps, (b, n))
    t_a = jnp.broadcast_to(features.mel_times(a_s.shape[1], self.cfg.mel_rate), (b, a_s.shape[1]))
    x = x_t
    if self.cfg.use_partner_motion:
      x = jnp.concatenate([x, self.normalize(motion_partner)], axis=-1)
    h = self.inp(x)
    cond = self.t_mlp(timestep_embedding(t, h.shape[-1]))
    for block in self.blocks:
      h = block(h, t_v, cond, a_s, a_p, t_a)
    x, _ = self.norm_out(h, cond)
    return self.out(x)

  def normalize(self, motion):
    return (motion - self.mean[...]) / self.std[...]

  def denormalize(self, x):
    return x * self.std[...] + self.mean[...]


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="motion_dit", width=128, depth=4, heads=4, channels=10, n_mels=80, fps=25, mel_rate=50,
      use_partner_motion=False, cond_drop=0.1, t_sampler="logit_normal",
      attention=dict(mode="gaussian", sigma_range=(0.04, 2.0), self_sigma_range=(0.08, 2.0),
                     learn_sigma=True, window=0.04, implementation="auto"),
      sample=dict(steps=16, method="euler", guidance=(1.0, 1.0)),
  ))


@registry.register("motion_dit")
class MotionDiTSystem:
  """Flow-matching loss, data statistics and guided sampling for MotionDiT."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config

  def build(self, *, rngs: nnx.Rngs, stats=None) -> MotionDiT:
    return MotionDiT(self.config, rngs=rngs, stats=stats)

  def fit_stats(self, batches):
    m = np.concatenate([np.asarray(b["motion_self"]).reshape(-1, self.config.channels) for b in batches])
    # The floor keeps near-constant channels (e.g. blink in short clips) from exploding.
    return {"mean": m.mean(0).astype(np.float32), "std": np.maximum(m.std(0), 1e-2).astype(np.float32)}

  def loss(self, model: MotionDiT, batch, rng):
    r_t, r_noise, r_ds, r_dp = jax.random.split(rng, 4)
    x1 = model.normalize(batch["motion_self"])
    b = x1.shape[0]
    x0 = jax.random.normal(r_noise, x1.shape, x1.dtype)
    t = flow.sample_t(r_t, (b,), self.config.t_sampler)
    drop_s = jax.random.bernoulli(r_ds, self.config.cond_drop, (b,))
    drop_p = jax.random.bernoulli(r_dp, self.config.cond_drop, (b,))
    audio = model.encode_audio(batch["mel_self"], batch["mel_partner"], drop_s, drop_p)
    v = model(flow.interpolate(x1, x0, t), t, audio, batch.get("motion_partner"))
    loss = flow.loss(v, flow.target_velocity(x1, x0))
    return loss, {"flow_mse": loss}

  def generate(self, model: MotionDiT, batch, rng, *, steps=None, method=None, guidance_scales=None,
               num_frames=None):
    """Samples motion for `batch` (mel_self, mel_partner [B, Ta, M]) -> {'motion': [B, T, C]}."""
    cfg = self.config.sample
    steps = steps or cfg.steps
    method = method or cfg.method
    scales = tuple(cfg.guidance if guidance_scales is None else guidance_scales)
    b, ta = batch["mel_self"].shape[:2]
    n = num_frames or int(round(ta * self.config.fps / self.config.mel_rate))
    ones = jnp.ones((b,), bool)
    # One encoder pass per guidance branch, hoisted out of the ODE loop.
    masks = guidance.nested_drop_masks(2)
    if all(s == 1.0 for s in scales):
      masks = masks[-1:]
    audios = [model.encode_audio(batch["mel_self"], batch["mel_partner"], ones & ds, ones & dp)
              for ds, dp in masks]
    mp = batch.get("motion_partner")

    def velocity(x, t):
      vs = [model(x, t, a, mp) for a in audios]
      return vs[0] if len(vs) == 1 else guidance.combine(vs, scales)

    x0 = jax.random.normal(rng, (b, n, self.config.channels))
    x = samplers.sample_ode(velocity, x0, steps=steps, method=method)
    return {"motion": model.denormalize(x)}

  def evaluate(self, model, config, workdir, *, writer=None, step=None):
    from avatar_jax import evaluate  # pylint: disable=g-import-not-at-top
    return evaluate.evaluate_motion_system(self, model, config, workdir, writer=writer, step=step)

  def sample_video(self, model, config, path, rng):
    from avatar_jax import sample  # pylint: disable=g-import-not-at-top
    return sample.clip_video(self, model, config, path, rng)
