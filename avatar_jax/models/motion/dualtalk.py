"""DualTalk (arXiv 2505.18096): one participant's 56-d FLAME motion from both voices and the
partner's motion, by deterministic regression.

After the reference implementation (github.com/ZiqiaoPeng/DualTalk: the model file and main.py):

  mel_self [B, Ta, M]    -> own audio encoder ----+
  mel_partner [B, Ta, M] -> partner audio encoder +- shared projection -> a_self, a_partner
    [B, Ta, D] (or audio_self/partner [B, S] through a frozen wav2vec2 front end, same Ta)
  flame56_partner [B, T, 56] -> motion MLP -> m_partner [B, T, D]
  cross-modal temporal enhancer: a_partner (queries) attends to m_partner, BiLSTM -> [B, Ta, D]
  interaction: concat(a_self, enhanced) [B, Ta, 2D] -> post-norm encoder layers -> self-attention
  synthesis: frame tokens [B, T, 2D] -> decoder layer(s) (self-attention over frames, cross-
    attention to the interaction tokens) -> x + 0.1·linear(x) -> linear -> [B, T, 56]

Audio stays at the mel rate (50 Hz) and motion at `fps` (25); every attention is a TimeAttention
over times in seconds (centres of mel frames and of video frames), which is what lets the two
grids meet. "gaussian" heads (a per-head time-distance bias, narrow for lips, wide for context)
are our addition; attention.mode="global" is the reference's plain attention.

Where this differs from the reference:
  - audio: the shared front end (models/audio.py, config.model.audio): log-mels by default, or
    one frozen wav2vec2 (the reference fine-tunes two wav2vec2-large transformers, CNNs frozen),
    then a small trainable conv encoder per speaker;
  - the reference interpolates wav2vec2 features to the video frames and runs at 25 fps; here
    the enhancer and the interaction run at the audio rate and the frame tokens are the
    interaction tokens linearly interpolated at frame centres (the reference's interpolation,
    moved after the interaction), which then also cross-attend to the 50 Hz tokens;
  - MLPs are GELU (PyTorch's transformer layers: ReLU); dropout acts on attention outputs, not
    on attention weights;
  - partner motion enters normalised by the data statistics, and the output layer predicts
    normalised motion that is denormalised (mean + std ·) before the loss, a reparametrisation
    of the last linear layer: the loss itself is on raw FLAME values, as the reference's.

Loss (main.py): MSE(exp 0:50) + MSE(jaw 50:53) + MSE(pose 53:56) + MSE of first differences over
all 56 channels, each a mean over its elements, weights `loss.{exp,jaw,pose,velocity}` (all 1).
"""
from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax import config_lib, render, sharding
from avatar_jax import system as system_lib
from avatar_jax.data import features, pipeline
from avatar_jax.data.synthdyad import flame
from avatar_jax.models import audio as audio_lib
from avatar_jax.models.attention import TimeAttention
from avatar_jax.models.layers import Mlp, dense, layer_norm, logical
from avatar_jax.models.motion.motion_dit import AudioEncoder, Stats, channel_stats

CHANNELS = flame.FLAME_DIM
GROUPS = {"exp": flame.EXP_SLICE, "jaw": flame.JAW_SLICE, "pose": flame.POSE_SLICE}


# ================================================================================== helpers
def frame_times(n: int, rate: float, batch: int) -> jax.Array:
  """Centres of n frames at `rate` frames/s, in seconds: [B, n] (audio and video alike)."""
  t = jnp.asarray(features.mel_times(n, rate), jnp.float32)
  return jnp.broadcast_to(t, (batch, n))


def resample(x: jax.Array, rate_in: float, rate_out: float, n_out: int) -> jax.Array:
  """x [B, N, D] at frame centres of `rate_in` -> [B, n_out, D] at centres of `rate_out`, by
  linear interpolation (PyTorch's interpolate(mode="linear", align_corners=False), which the
  reference applies to wav2vec2 features). 50 Hz -> 25 fps averages each pair of tokens."""
  n_in = x.shape[1]
  pos = np.clip((np.arange(n_out) + 0.5) * rate_in / rate_out - 0.5, 0, n_in - 1)
  lo = np.floor(pos).astype(np.int32)
  hi = np.minimum(lo + 1, n_in - 1)
  w = jnp.asarray(pos - lo, x.dtype)[:, None]
  return x[:, lo] * (1 - w) + x[:, hi] * w


def split_rng(rng: jax.Array | None, n: int):
  """n keys from rng; None (no dropout) gives n Nones."""
  return (None,) * n if rng is None else tuple(jax.random.split(rng, n))


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
  """Inverted dropout; identity without rng (generation). Explicit keys keep the train step a
  pure function of (state, batch, rng)."""
  if rng is None or rate <= 0:
    return x
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def motion_loss(pred: jax.Array, target: jax.Array, weights: Mapping[str, float]
                ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DualTalk's loss on raw FLAME 56-d pred, target [B, T, 56] (float32): per-group MSE on
  exp / jaw / pose plus the MSE of first differences over all channels."""
  pred, target = pred.astype(jnp.float32), target.astype(jnp.float32)
  terms = {g: jnp.mean(jnp.square(pred[..., s] - target[..., s])) for g, s in GROUPS.items()}
  if pred.shape[1] > 1:
    vel = jnp.diff(pred, axis=1) - jnp.diff(target, axis=1)
    terms["velocity"] = jnp.mean(jnp.square(vel))
  else:  # a single frame has no velocity
    terms["velocity"] = jnp.zeros((), jnp.float32)
  total = sum(weights[k] * v for k, v in terms.items())
  return total, {f"mse_{k}": v for k, v in terms.items()}


# ================================================================================== modules
def attention(d: int, dctx: int, cfg, *, residual: bool = True, rngs: nnx.Rngs, **kw
              ) -> TimeAttention:
  """TimeAttention with cfg.heads and cfg.attention's mode and σ range.

  residual=False: the reference uses this attention without a residual around it; TimeAttention
  zero-initialises its output projection (right for residual branches), which there would cut
  the path at initialisation, so the projection is drawn like any other layer.
  """
  a = cfg.attention
  attn = TimeAttention(d, dctx, cfg.heads, mode=a.mode, sigma_range=tuple(a.sigma_range),
                       learn_sigma=a.learn_sigma, window=a.window,
                       implementation=a.implementation, rngs=rngs, **kw)
  if not residual:
    k = attn.o.kernel
    k[...] = nnx.initializers.lecun_normal()(rngs.params(), k.shape, k.dtype)
  return attn


class BiLSTM(nnx.Module):
  """x [B, N, Din] -> [B, N, 2H]: stacked bidirectional LSTMs (PyTorch's nn.LSTM with
  bidirectional=True, batch_first=True); both directions advance in one scan."""

  def __init__(self, din: int, hidden: int, layers: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.hidden, self.dtype = hidden, dtype
    # Input-to-gate weights of both directions in one matmul: [Din, 2 · 4H] (gates i, f, g, o).
    self.inp = nnx.List([dense(din if i == 0 else 2 * hidden, 8 * hidden, ("embed", "mlp"),
                               rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                         for i in range(layers)])
    init = logical(nnx.initializers.orthogonal(), (None, None, "mlp"))
    self.rec = nnx.List([nnx.Param(init(rngs.params(), (2, hidden, 4 * hidden), param_dtype))
                         for _ in range(layers)])

  def __call__(self, x):
    b, n, _ = x.shape
    g4 = 4 * self.hidden
    for inp, rec in zip(self.inp, self.rec):
      gx = inp(x).reshape(b, n, 2, g4)
      # The backward direction reads time reversed: [N, 2, B, 4H], scanned over N.
      gx = jnp.stack([gx[:, :, 0], gx[:, ::-1, 1]], axis=0).transpose(2, 0, 1, 3)
      w = rec[...].astype(gx.dtype)

      def step(carry, g, w=w):
        h, c = carry   # [2, B, H] each, float32
        z = (g + jnp.einsum("dbh,dhg->dbg", h.astype(w.dtype), w)).astype(jnp.float32)
        i, f, u, o = jnp.split(z, 4, axis=-1)
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        return (h, c), h

      zero = jnp.zeros((2, b, self.hidden), jnp.float32)
      _, hs = jax.lax.scan(step, (zero, zero), gx)        # [N, 2, B, H]
      x = jnp.concatenate([hs[:, 0], hs[::-1, 1]], axis=-1).transpose(1, 0, 2)
      x = x.astype(self.dtype or jnp.float32)
    return x


class Layer(nnx.Module):
  """Post-norm transformer layer (PyTorch's TransformerEncoderLayer defaults, as the reference):
  x = LN(x + attn(x)) [, x = LN(x + cross(x, memory))], x = LN(x + mlp(x)); dropout on each
  branch. With cross=True it is the decoder layer."""

  def __init__(self, d: int, cfg, *, cross: bool = False, rngs: nnx.Rngs, **kw):
    self.rate = cfg.dropout
    self.attn = attention(d, d, cfg, rngs=rngs, **kw)
    self.norm1 = layer_norm(d, rngs=rngs, **kw)
    self.cross = attention(d, d, cfg, rngs=rngs, **kw) if cross else None
    self.norm_c = layer_norm(d, rngs=rngs, **kw) if cross else None
    self.mlp = Mlp(d, cfg.mlp_ratio * d, rngs=rngs, **kw)
    self.norm2 = layer_norm(d, rngs=rngs, **kw)

  def __call__(self, x, t, rng=None, memory=None, t_memory=None):
    """x: [B, N, D] at times t [B, N]; memory: [B, M, D] at t_memory [B, M] (cross only)."""
    r_attn, r_cross, r_mlp = split_rng(rng, 3)
    x = sharding.constrain(x, ("batch", "time", "embed"))
    x = self.norm1(x + dropout(self.attn(x, t, x, t), self.rate, r_attn))
    if self.cross is not None:
      x = self.norm_c(x + dropout(self.cross(x, t, memory, t_memory), self.rate, r_cross))
    return self.norm2(x + dropout(self.mlp(x), self.rate, r_mlp))


class DualTalk(nnx.Module):
  """cfg: config.model; facts: the data facts (`pipeline.facts(config.data)`: fps, mel_rate,
  n_mels, sample_rate)."""

  def __init__(self, cfg, *, facts: dict, rngs: nnx.Rngs, stats=None):
    d, d2 = cfg.width, 2 * cfg.width
    # Frozen: hashable, so compiled generators are cached across eval rows (evals/runner.py).
    self.cfg = config_lib.freeze(cfg)
    self.fps, self.audio_rate = float(facts["fps"]), float(facts["mel_rate"])
    stats = stats or {"mean": np.zeros(CHANNELS, np.float32), "std": np.ones(CHANNELS, np.float32)}
    self.mean = Stats(jnp.asarray(stats["mean"], jnp.float32))
    self.std = Stats(jnp.asarray(stats["std"], jnp.float32))
    # bf16 compute (config.model.dtype) with float32 parameters, statistics, output and loss.
    self.dtype = jnp.dtype(cfg.get("dtype", "float32"))
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")))
    # Joint encoder: features at the mel rate (log-mel or frozen wav2vec2, config.model.audio),
    # one encoder per speaker and one projection shared by both (as the reference), and a
    # two-layer ReLU MLP over the partner's motion.
    acfg = audio_lib.config_of(cfg)
    self.front = audio_lib.FrontEnd(acfg, facts, rngs=rngs)
    n_in = audio_lib.feature_dim(acfg, facts)
    self.enc_self = AudioEncoder(n_in, cfg.audio_width, layers=cfg.audio_layers, **kw)
    self.enc_partner = AudioEncoder(n_in, cfg.audio_width, layers=cfg.audio_layers, **kw)
    self.audio_proj = dense(cfg.audio_width, d, (None, "embed"), **kw)
    self.motion_in = dense(CHANNELS, d // 2, (None, "mlp"), **kw)
    self.motion_out = dense(d // 2, d, ("mlp", "embed"), **kw)
    # Cross-modal temporal enhancer: partner audio queries partner motion, then a BiLSTM.
    self.enhance = attention(d, d, cfg, residual=False, **kw)
    self.lstm = BiLSTM(d, d // 2, cfg.lstm_layers, **kw)
    # Dual-speaker interaction over [own audio, enhanced partner] channels.
    self.interaction = nnx.List([Layer(d2, cfg, **kw) for _ in range(cfg.interaction_layers)])
    self.interaction_attn = attention(d2, d2, cfg, residual=False, **kw)
    # Expressive synthesis: decoder over frames, modulation, linear head (float32 output).
    self.decoder = nnx.List([Layer(d2, cfg, cross=True, **kw) for _ in range(cfg.decoder_layers)])
    self.modulation = dense(d2, d2, ("embed", None), **kw)
    self.out = dense(d2, CHANNELS, ("embed", None), rngs=rngs, dtype=jnp.float32)

  def encode_audio(self, batch):
    """Both speakers' audio in `batch` -> tokens a_self, a_partner [B, Ta, D] at the mel rate."""
    a_s = self.audio_proj(self.enc_self(self.front(batch, "self")))
    a_p = self.audio_proj(self.enc_partner(self.front(batch, "partner")))
    return a_s, a_p

  def __call__(self, batch, rng=None):
    """batch: the front end's audio keys (mel_self, mel_partner [B, Ta, M], or audio_self,
    audio_partner [B, S]) and flame56_partner [B, T, 56] (raw) -> the self participant's raw
    FLAME [B, T, 56] float32. rng: dropout key (None: no dropout)."""
    cfg = self.cfg
    motion_partner = batch["flame56_partner"]
    b, n = motion_partner.shape[:2]
    r_int, r_out, r_dec = split_rng(rng, 3)
    a_s, a_p = self.encode_audio(batch)
    t_a = frame_times(a_s.shape[1], self.audio_rate, b)
    t_v = frame_times(n, self.fps, b)
    m_p = self.normalize(motion_partner).astype(self.dtype)
    m_p = jax.nn.relu(self.motion_out(jax.nn.relu(self.motion_in(m_p))))
    enhanced = self.lstm(self.enhance(a_p, t_a, m_p, t_v))
    h = jnp.concatenate([a_s, enhanced.astype(a_s.dtype)], axis=-1)    # [B, Ta, 2D]
    for i, layer in enumerate(self.interaction):
      h = layer(h, t_a, None if r_int is None else jax.random.fold_in(r_int, i))
    h = dropout(self.interaction_attn(h, t_a, h, t_a), cfg.interaction_dropout, r_out)
    x = resample(h, self.audio_rate, self.fps, n)                        # [B, T, 2D]
    for i, layer in enumerate(self.decoder):
      x = layer(x, t_v, None if r_dec is None else jax.random.fold_in(r_dec, i), h, t_a)
    x = x + cfg.modulation * self.modulation(x)
    return self.denormalize(self.out(x.astype(jnp.float32)))

  def normalize(self, motion):
    return (motion - self.mean[...]) / self.std[...]

  def denormalize(self, x):
    return x * self.std[...] + self.mean[...]


def default_config() -> ml_collections.ConfigDict:
  """config.model at the reference's sizes (feature_dim 256, interaction width 512, 4 heads,
  3 interaction layers, 1 decoder layer, 2-layer BiLSTM, FFN 4x)."""
  return ml_collections.ConfigDict(dict(
      name="motion.dualtalk", width=256, heads=4, audio=audio_lib.front_end_config(),
      audio_width=256, audio_layers=3, lstm_layers=2, interaction_layers=3, decoder_layers=1,
      mlp_ratio=4, dropout=0.1, interaction_dropout=0.5, modulation=0.1,
      dtype="float32", param_dtype="float32",
      attention=dict(mode="gaussian", sigma_range=(0.04, 2.0), learn_sigma=True, window=0.04,
                     implementation="auto"),
      loss=dict(exp=1.0, jaw=1.0, pose=1.0, velocity=1.0),
  ))


class System(system_lib.System):
  """DualTalk's regression loss, data statistics and full-clip generation."""

  trainable = audio_lib.TRAINABLE   # everything but a frozen wav2vec2 front end

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.cfg = config.model
    self.facts = pipeline.facts(config.data)

  def data_spec(self) -> system_lib.DataSpec:
    audio = audio_lib.keys(audio_lib.config_of(self.cfg))
    return system_lib.DataSpec(keys=("flame56_self", "flame56_partner") + audio)

  def build(self, *, rngs: nnx.Rngs, stats=None) -> DualTalk:
    return DualTalk(self.cfg, facts=self.facts, rngs=rngs, stats=stats)

  def fit_stats(self, batches):
    return channel_stats(batches, "flame56_self", CHANNELS, 1e-2)

  def loss(self, model: DualTalk, batch, rng, aux=None):
    del aux
    return motion_loss(model(batch, rng=rng), batch["flame56_self"], self.cfg.loss)

  def generate(self, model: DualTalk, batch, rng) -> system_lib.Outputs:
    """Whole clips of any length: both audio streams and flame56_partner [B, T, 56] ->
    Outputs(value=FLAME [B, T, 56] (raw), space="flame56"). Deterministic (rng unused)."""
    del rng
    if "flame56_partner" not in batch:
      raise KeyError("DualTalk generates from the partner's motion: the batch needs "
                     f"'flame56_partner' [B, T, 56]; it has {sorted(batch)}")
    return system_lib.Outputs(value=model(batch), space="flame56")

  def decode(self, outputs: system_lib.Outputs, batch) -> np.ndarray:
    """SynthDyad drawing of the avatar (left) and the partner (right): uint8 [B, T, H, 2W, 3]."""
    if outputs.space != "flame56":
      raise ValueError(f"DualTalk decodes space 'flame56', got {outputs.space!r}")
    return render.flame56_frames(self.config, outputs.value, batch)

  def evaluators(self) -> tuple[str, ...]:
    return ("flame56",)
