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

from avatar_jax import config_lib, render, sharding
from avatar_jax import system as system_lib
from avatar_jax.data import features, pipeline
from avatar_jax.diffusion import flow, guidance, samplers
from avatar_jax.models import audio as audio_lib
from avatar_jax.models.attention import TimeAttention
from avatar_jax.models.layers import AdaLN, Conv1d, Mlp, dense, layer_norm, timestep_embedding


class Stats(nnx.Variable):
  """Data statistics fixed before training (not optimised, saved with the model)."""


def channel_stats(batches, key: str, channels: int, floor: float) -> dict[str, np.ndarray]:
  """{"mean", "std"} [channels] float32 of batch[key] over every frame of `batches`. The std floor
  keeps near-constant channels (blink in short clips, SynthDyad's unused jaw axes) from exploding
  when normalised."""
  m = np.concatenate([np.asarray(b[key]).reshape(-1, channels) for b in batches])
  return {"mean": m.mean(0).astype(np.float32),
          "std": np.maximum(m.std(0), floor).astype(np.float32)}


class AudioEncoder(nnx.Module):
  """log-mel [B, Ta, M] -> tokens [B, Ta, D] with ~0.3 s of local context (dilated convs);
  `causal`: the context is the past only (streaming models)."""

  def __init__(self, n_mels: int, d: int, *, rngs: nnx.Rngs, layers: int = 3, causal: bool = False,
               dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.inp = dense(n_mels, d, (None, "embed"), **kw)
    self.convs = nnx.List([Conv1d(d, d, 3, dilation=2 ** i, causal=causal, **kw)
                           for i in range(layers)])
    self.norm = layer_norm(d, **kw)

  def __call__(self, mel):
    h = sharding.constrain(self.inp(mel), ("batch", "time", "embed"))
    for conv in self.convs:
      h = h + conv(jax.nn.gelu(h))
    return self.norm(h)


class Block(nnx.Module):
  """Self-attention over motion frames, cross-attention to each audio stream, MLP.

  self_mask / cross_mask: extra TimeAttention mask arguments (causal_block, lookahead_blocks,
  history) of the self- and the cross-attentions; empty for the offline model, block-causal
  for a streaming one (models/motion/forcing.py).
  """

  def __init__(self, d: int, heads: int, cfg, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32, self_mask=None, cross_mask=None):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    attn = dict(mode=cfg.attention.mode, learn_sigma=cfg.attention.learn_sigma,
                window=cfg.attention.window, implementation=cfg.attention.implementation, **kw)
    cross = {**attn, **(cross_mask or {})}
    self.norm1 = AdaLN(d, d, **kw)
    self.self_attn = TimeAttention(d, d, heads, sigma_range=tuple(cfg.attention.self_sigma_range),
                                   **{**attn, **(self_mask or {}),
                                      "mode": "gaussian" if cfg.attention.mode != "global" else "global"})
    self.norm_a = layer_norm(d, **kw)
    self.cross_self = TimeAttention(d, d, heads, sigma_range=tuple(cfg.attention.sigma_range), **cross)
    self.norm_p = layer_norm(d, **kw)
    self.cross_partner = TimeAttention(d, d, heads, sigma_range=tuple(cfg.attention.sigma_range), **cross)
    self.norm2 = AdaLN(d, d, **kw)
    self.mlp = Mlp(d, 4 * d, **kw)

  def __call__(self, h, t_v, cond, a_self, a_partner, t_a, cache=None):
    """h [B, T, D] at frame times t_v [B, T]; cond [B, D] or per frame [B, T, D]. With a
    self-attention KVCache (streaming), returns (h, cache)."""
    h = sharding.constrain(h, ("batch", "time", "embed"))
    x, gate = self.norm1(h, cond)
    if cache is None:
      h = h + gate * self.self_attn(x, t_v, x, t_v)
    else:
      out, cache = self.self_attn(x, t_v, x, t_v, cache=cache)
      h = h + gate * out
    h = h + self.cross_self(self.norm_a(h), t_v, a_self, t_a)
    h = h + self.cross_partner(self.norm_p(h), t_v, a_partner, t_a)
    x, gate = self.norm2(h, cond)
    h = h + gate * self.mlp(x)
    return h if cache is None else (h, cache)


class MotionDiT(nnx.Module):
  """cfg: config.model; facts: the data facts (`pipeline.facts(config.data)`: fps, mel_rate,
  n_mels, sample_rate)."""

  def __init__(self, cfg, *, facts: dict, rngs: nnx.Rngs, stats=None):
    d, c = cfg.width, cfg.channels
    # Frozen: hashable, so compiled generators are cached across eval rows (evals/runner.py).
    self.cfg = config_lib.freeze(cfg)
    self.fps, self.mel_rate = float(facts["fps"]), float(facts["mel_rate"])
    stats = stats or {"mean": np.zeros(c, np.float32), "std": np.ones(c, np.float32)}
    self.mean = Stats(jnp.asarray(stats["mean"], jnp.float32))
    self.std = Stats(jnp.asarray(stats["std"], jnp.float32))
    # Compute and storage precision (config.model.dtype / param_dtype): bf16 compute lets the
    # attention run the fused GPU/TPU kernels; statistics, σ and the loss stay float32.
    self.dtype = jnp.dtype(cfg.get("dtype", "float32"))
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")))
    # Log-mel or a frozen wav2vec2 (config.model.audio), both at the mel rate.
    self.front = audio_lib.FrontEnd(audio_lib.config_of(cfg), facts, rngs=rngs)
    n_in = audio_lib.feature_dim(audio_lib.config_of(cfg), facts)
    self.enc_self = AudioEncoder(n_in, d, **kw)
    self.enc_partner = AudioEncoder(n_in, d, **kw)
    init = nnx.initializers.normal(0.02)
    self.null_self = nnx.Param(init(rngs.params(), (d,)), sharding=("embed",), eager_sharding=False)
    self.null_partner = nnx.Param(init(rngs.params(), (d,)), sharding=("embed",), eager_sharding=False)
    din = 2 * c if cfg.use_partner_motion else c
    self.inp = dense(din, d, (None, "embed"), **kw)
    self.t_mlp = Mlp(d, 2 * d, **kw)
    self.blocks = nnx.List([Block(d, cfg.heads, cfg, **kw) for _ in range(cfg.depth)])
    self.norm_out = AdaLN(d, d, **kw)
    # The output projection computes in float32: the velocity feeds a float32 loss / ODE.
    self.out = dense(d, c, ("embed", None), rngs=rngs, zero_init=True, dtype=jnp.float32)

  def encode_audio(self, batch, drop_self, drop_partner):
    """Audio tokens [B, Ta, D] per stream (from the front end's features of `batch`); a dropped
    stream becomes its null token."""
    a_s = self.enc_self(self.front(batch, "self"))
    a_p = self.enc_partner(self.front(batch, "partner"))
    a_s = jnp.where(drop_self[:, None, None], self.null_self[...].astype(a_s.dtype), a_s)
    a_p = jnp.where(drop_partner[:, None, None], self.null_partner[...].astype(a_p.dtype), a_p)
    return a_s, a_p

  def __call__(self, x_t, t, audio, motion_partner=None):
    """x_t: [B, T, C] normalised noisy motion; t: [B]; audio: (a_self, a_partner) -> velocity [B, T, C]."""
    b, n, _ = x_t.shape
    a_s, a_p = audio
    t_v = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32) / self.fps, (b, n))
    t_a = jnp.broadcast_to(features.mel_times(a_s.shape[1], self.mel_rate), (b, a_s.shape[1]))
    x = x_t
    if self.cfg.use_partner_motion:
      x = jnp.concatenate([x, self.normalize(motion_partner)], axis=-1)
    h = self.inp(x)
    cond = self.t_mlp(timestep_embedding(t, h.shape[-1]))
    for block in self.blocks:
      h = block(h, t_v, cond, a_s, a_p, t_a)
    x, _ = self.norm_out(h, cond)
    return self.out(x.astype(jnp.float32))

  def normalize(self, motion):
    return (motion - self.mean[...]) / self.std[...]

  def denormalize(self, x):
    return x * self.std[...] + self.mean[...]


def default_config() -> ml_collections.ConfigDict:
  """config.model; frame and mel rates and n_mels come from config.data (pipeline.facts)."""
  return ml_collections.ConfigDict(dict(
      name="motion.motion_dit", width=128, depth=4, heads=4, channels=10,
      dtype="float32", param_dtype="float32",
      use_partner_motion=False, cond_drop=0.1, t_sampler="logit_normal",
      attention=dict(mode="gaussian", sigma_range=(0.04, 2.0), self_sigma_range=(0.08, 2.0),
                     learn_sigma=True, window=0.04, implementation="auto"),
      sample=dict(steps=16, method="euler", guidance=(1.0, 1.0)),
      audio=audio_lib.front_end_config(),
  ))


class System(system_lib.System):
  """Flow-matching loss, data statistics and guided sampling for MotionDiT."""

  trainable = audio_lib.TRAINABLE   # everything but a frozen wav2vec2 front end

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.cfg = config.model
    self.facts = pipeline.facts(config.data)

  def data_spec(self) -> system_lib.DataSpec:
    keys = ("motion_self",) + audio_lib.keys(audio_lib.config_of(self.cfg))
    if self.cfg.use_partner_motion:
      keys += ("motion_partner",)
    return system_lib.DataSpec(keys=keys)

  def build(self, *, rngs: nnx.Rngs, stats=None) -> MotionDiT:
    return MotionDiT(self.cfg, facts=self.facts, rngs=rngs, stats=stats)

  def fit_stats(self, batches):
    return channel_stats(batches, "motion_self", self.cfg.channels, 1e-2)

  def loss(self, model: MotionDiT, batch, rng, aux=None):
    del aux
    r_t, r_noise, r_ds, r_dp = jax.random.split(rng, 4)
    x1 = model.normalize(batch["motion_self"])
    b = x1.shape[0]
    x0 = jax.random.normal(r_noise, x1.shape, x1.dtype)
    t = flow.sample_t(r_t, (b,), self.cfg.t_sampler)
    drop_s = jax.random.bernoulli(r_ds, self.cfg.cond_drop, (b,))
    drop_p = jax.random.bernoulli(r_dp, self.cfg.cond_drop, (b,))
    audio = model.encode_audio(batch, drop_s, drop_p)
    v = model(flow.interpolate(x1, x0, t), t, audio, batch.get("motion_partner"))
    loss = flow.loss(v, flow.target_velocity(x1, x0))
    return loss, {"flow_mse": loss}

  def generate(self, model: MotionDiT, batch, rng, *, steps=None, method=None, guidance_scales=None,
               num_frames=None) -> system_lib.Outputs:
    """Motion for `batch` (mel_self, mel_partner [B, Ta, M], or audio_self, audio_partner [B, S]
    with the wav2vec2 front end; motion_partner [B, T, C] when the model conditions on it)
    -> Outputs(value=motion [B, T, C], space="motion")."""
    cfg = self.cfg.sample
    steps = steps or cfg.steps
    method = method or cfg.method
    scales = tuple(cfg.guidance if guidance_scales is None else guidance_scales)
    acfg = audio_lib.config_of(self.cfg)
    b = batch[audio_lib.keys(acfg)[0]].shape[0]
    ta = audio_lib.mel_frames(acfg, batch, "self", self.facts)
    mp = batch.get("motion_partner")
    if self.cfg.use_partner_motion and mp is None:
      raise KeyError("model.use_partner_motion=True: generate needs batch['motion_partner'] [B, T, C]; "
                     f"the batch has {sorted(batch)}")
    n = num_frames or (mp.shape[1] if self.cfg.use_partner_motion else
                       int(round(ta * self.facts["fps"] / self.facts["mel_rate"])))
    if self.cfg.use_partner_motion:
      mp = mp[:, :n]
    ones = jnp.ones((b,), bool)
    # One encoder pass per guidance branch, hoisted out of the ODE loop.
    masks = guidance.nested_drop_masks(2)
    if all(s == 1.0 for s in scales):
      masks = masks[-1:]
    audios = [model.encode_audio(batch, ones & ds, ones & dp) for ds, dp in masks]

    def velocity(x, t):
      vs = [model(x, t, a, mp) for a in audios]
      return vs[0] if len(vs) == 1 else guidance.combine(vs, scales)

    x0 = jax.random.normal(rng, (b, n, self.cfg.channels))
    x = samplers.sample_ode(velocity, x0, steps=steps, method=method)
    return system_lib.Outputs(value=model.denormalize(x), space="motion")

  def decode(self, outputs: system_lib.Outputs, batch) -> np.ndarray:
    """SynthDyad drawing of the avatar (left) and its partner (right): uint8 [B, T, H, 2W, 3]."""
    if outputs.space != "motion":
      raise ValueError(f"MotionDiT decodes space 'motion', got {outputs.space!r}")
    return render.motion_frames(self.config, outputs.value, batch)

  def evaluators(self) -> tuple[str, ...]:
    return ("synthdyad",)
