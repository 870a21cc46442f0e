"""Avatar Forcing (arXiv 2601.00664) in motion space: a block-causal flow transformer trained by
diffusion forcing, streamed block by block with KV caches.

The avatar's motion x [B, T, C] is cut into blocks of `block` frames (10 = 0.4 s at 25 fps):
  self-attention     over motion, block-causal (a frame sees its own block and earlier ones)
                     and bounded to `history` seconds into the past, so a ring KVCache of
                     (history + block) frames streams forever in constant memory
  cross-attention    to the avatar's own voice and to the user's (the partner's) voice, through
                     the Gaussian attention, causal per frame with `lookahead` frames of future
                     audio (frame n sees audio up to the end of frame n + lookahead), same history
  audio encoders     log-mel -> tokens with causal dilated convolutions (no future context beyond
                     the look-ahead, so streaming computes exactly what training saw)
  user motion        optional (`use_partner_motion`): the partner's motion one block late (what a
                     live system has seen when it starts a block), concatenated to the input
  timestep           one flow time per frame: adaLN conditions every frame on its own noise level

Diffusion forcing: during training every block draws its own noise level, so the model learns
to denoise a block given a past at any noise level; streaming keeps the past clean (t = 1) and
denoises one block at a time. The blocks of this file reuse the duplex motion DiT's
(motion_dit.Block with block-causal masks).

Guidance (the paper's triplet): v = v_∅ + a·(v_audio − v_∅) + u·(v_user − v_∅), with v_audio
conditioned on the avatar's voice only and v_user on the user's voice (and motion) only; the
three branches run as one batch of 3B with their own caches. `guidance=(a, u)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax import config_lib, render
from avatar_jax import system as system_lib
from avatar_jax.data import features, pipeline
from avatar_jax.diffusion import dpo, flow, samplers
from avatar_jax.models.attention import KVCache
from avatar_jax.models.layers import AdaLN, Mlp, dense, timestep_embedding
from avatar_jax.models.motion.motion_dit import AudioEncoder, Block, Stats, channel_stats


def default_config() -> ml_collections.ConfigDict:
  """config.model. block / lookahead: frames; history: seconds of past that attention sees."""
  return ml_collections.ConfigDict(dict(
      name="motion.forcing", width=128, depth=4, heads=4, channels=10,
      dtype="float32", param_dtype="float32",
      block=10, lookahead=2, history=4.0,
      use_partner_motion=False, cond_drop=dict(audio=0.1, user=0.1), t_sampler="logit_normal",
      attention=dict(mode="gaussian", sigma_range=(0.04, 2.0), self_sigma_range=(0.08, 2.0),
                     learn_sigma=True, window=0.04, implementation="auto"),
      sample=dict(steps=8, method="euler", guidance=(1.0, 1.0)),
      # Stage 2 (configs/forcing.py:dpo=<stage-1 workdir>): winners are the data, losers the
      # policy's own samples with the user's conditions dropped; a frozen copy of stage 1 is the
      # reference (aux "ref").
      dpo=dict(enabled=False, beta=500.0, loser_steps=4),
  ))


class ForcingDiT(nnx.Module):
  """Velocity of noisy motion frames given per-frame flow times and both voices (module doc)."""

  def __init__(self, cfg, *, facts: dict, rngs: nnx.Rngs, stats=None):
    d, c = cfg.width, cfg.channels
    self.cfg = config_lib.freeze(cfg)
    self.fps, self.mel_rate = float(facts["fps"]), float(facts["mel_rate"])
    stats = stats or {"mean": np.zeros(c, np.float32), "std": np.ones(c, np.float32)}
    self.mean = Stats(jnp.asarray(stats["mean"], jnp.float32))
    self.std = Stats(jnp.asarray(stats["std"], jnp.float32))
    self.dtype = jnp.dtype(cfg.dtype)
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=jnp.dtype(cfg.param_dtype))
    n_mels = int(facts["n_mels"])
    self.enc_self = AudioEncoder(n_mels, d, causal=True, **kw)
    self.enc_partner = AudioEncoder(n_mels, d, causal=True, **kw)
    init = nnx.initializers.normal(0.02)
    self.null_self = nnx.Param(init(rngs.params(), (d,)), sharding=("embed",), eager_sharding=False)
    self.null_partner = nnx.Param(init(rngs.params(), (d,)), sharding=("embed",),
                                  eager_sharding=False)
    self.inp = dense(2 * c if cfg.use_partner_motion else c, d, (None, "embed"), **kw)
    self.t_mlp = Mlp(d, 2 * d, **kw)
    # A small slack keeps frame-aligned times on the right side of the block and history edges.
    hist = float(cfg.history) + 1e-3
    self_mask = dict(causal_block=cfg.block / self.fps, history=hist)
    cross_mask = dict(causal_block=1.0 / self.fps, lookahead_blocks=int(cfg.lookahead),
                      history=hist)
    self.blocks = nnx.List([Block(d, cfg.heads, cfg, self_mask=self_mask, cross_mask=cross_mask,
                                  **kw) for _ in range(cfg.depth)])
    self.norm_out = AdaLN(d, d, **kw)
    self.out = dense(d, c, ("embed", None), rngs=rngs, zero_init=True, dtype=jnp.float32)

  # --------------------------------------------------------------------------------- pieces
  def encode_audio(self, mel_self, mel_partner, drop_audio, drop_user):
    """Audio tokens [B, Ta, D] per stream; dropped streams become their null token."""
    a_s = self.enc_self(mel_self)
    a_p = self.enc_partner(mel_partner)
    a_s = jnp.where(drop_audio[:, None, None], self.null_self[...].astype(a_s.dtype), a_s)
    a_p = jnp.where(drop_user[:, None, None], self.null_partner[...].astype(a_p.dtype), a_p)
    return a_s, a_p

  def partner_input(self, motion_partner, drop_user):
    """The partner's motion one block late, normalised, zero where the user is dropped."""
    b = int(self.cfg.block)
    mp = self.normalize(motion_partner)
    mp = jnp.concatenate([jnp.zeros_like(mp[:, :b]), mp[:, :-b]], axis=1)[:, :motion_partner.shape[1]]
    return jnp.where(drop_user[:, None, None], 0.0, mp)

  def cache_len(self) -> int:
    """Self-attention KV slots a stream needs: the history plus the block being written,
    rounded up to whole blocks (a ring buffer takes block-sized writes)."""
    b = int(self.cfg.block)
    frames = int(np.ceil(self.cfg.history * self.fps)) + b
    return -(-frames // b) * b

  def init_caches(self, batch: int) -> list[KVCache]:
    d = self.cfg.width
    return [KVCache.init(batch, self.cache_len(), self.cfg.heads, d // self.cfg.heads,
                         self.dtype, ring=True) for _ in range(self.cfg.depth)]

  # -------------------------------------------------------------------------------- forward
  def __call__(self, x_t, t, t_v, audio, t_a, partner=None, caches=None):
    """x_t [B, T, C] normalised noisy motion at frame times t_v [B, T] (seconds) and flow times
    t [B, T]; audio (a_self, a_partner) [B, Ta, D] at times t_a [B, Ta]; partner: partner_input
    [B, T, C] when use_partner_motion. With caches (one ring KVCache per block: the past
    frames' keys), x_t is the newest block and the updated caches come back too."""
    a_s, a_p = audio
    x = x_t if partner is None else jnp.concatenate([x_t, partner], axis=-1)
    h = self.inp(x)
    cond = self.t_mlp(timestep_embedding(t, h.shape[-1]))          # [B, T, D]
    new = []
    for i, block in enumerate(self.blocks):
      if caches is None:
        h = block(h, t_v, cond, a_s, a_p, t_a)
      else:
        h, c = block(h, t_v, cond, a_s, a_p, t_a, cache=caches[i])
        new.append(c)
    x, _ = self.norm_out(h, cond)
    v = self.out(x.astype(jnp.float32))
    return v if caches is None else (v, new)

  def normalize(self, motion):
    return (motion - self.mean[...]) / self.std[...]

  def denormalize(self, x):
    return x * self.std[...] + self.mean[...]


def block_times(t_blocks, block: int, num_frames: int):
  """Per-block levels [B, K] -> per-frame levels [B, T] (each block's frames share its level)."""
  return jnp.repeat(t_blocks, block, axis=1)[:, :num_frames]


class System(system_lib.System):
  """Diffusion-forcing training, block-streaming generation, SynthDyad decoding."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.cfg = config.model
    self.facts = pipeline.facts(config.data)

  def data_spec(self) -> system_lib.DataSpec:
    keys = ("motion_self", "mel_self", "mel_partner")
    if self.cfg.use_partner_motion:
      keys += ("motion_partner",)
    return system_lib.DataSpec(keys=keys)

  def build(self, *, rngs: nnx.Rngs, stats=None) -> ForcingDiT:
    return ForcingDiT(self.cfg, facts=self.facts, rngs=rngs, stats=stats)

  def fit_stats(self, batches):
    return channel_stats(batches, "motion_self", self.cfg.channels, 1e-2)

  def times(self, b: int, num_frames: int, num_audio: int, start_frame=0):
    """Frame times [B, T] and audio-token times [B, Ta] (seconds) from frame `start_frame`."""
    t_v = (start_frame + jnp.arange(num_frames, dtype=jnp.float32)) / self.facts["fps"]
    a0 = start_frame * self.facts["mel_rate"] / self.facts["fps"]
    t_a = features.mel_times(num_audio, self.facts["mel_rate"]) + a0 / self.facts["mel_rate"]
    return (jnp.broadcast_to(t_v, (b, num_frames)), jnp.broadcast_to(t_a, (b, num_audio)))

  def aux_models(self, *, rngs: nnx.Rngs) -> dict:
    if not self.cfg.dpo.enabled:
      return {}
    return {"ref": ForcingDiT(self.cfg, facts=self.facts, rngs=rngs)}

  def prepare_batch(self, model, aux, batch, rng):
    """DPO stage: the rejected motion is the current policy's sample for the same audio with
    the user's conditions (voice, motion) dropped: a listener that ignores its partner."""
    if not self.cfg.dpo.enabled:
      return batch
    loser = self.generate(model, batch, rng, steps=int(self.cfg.dpo.loser_steps), user=False,
                          num_frames=batch["motion_self"].shape[1])
    return {**batch, "motion_rejected": loser.value}

  def _flow_terms(self, model, batch, x1, x0, t, drop_a, drop_u):
    audio = model.encode_audio(batch["mel_self"], batch["mel_partner"], drop_a, drop_u)
    b, n, _ = x1.shape
    t_v, t_a = self.times(b, n, audio[0].shape[1])
    partner = (model.partner_input(batch["motion_partner"], drop_u)
               if self.cfg.use_partner_motion else None)
    return model(flow.interpolate(x1, x0, t), t, t_v, audio, t_a, partner)

  def loss(self, model: ForcingDiT, batch, rng, aux=None):
    if self.cfg.dpo.enabled:
      return self._dpo_loss(model, batch, rng, aux)
    r_t, r_n, r_a, r_u = jax.random.split(rng, 4)
    x1 = model.normalize(batch["motion_self"])
    b, n, _ = x1.shape
    blk = int(self.cfg.block)
    x0 = jax.random.normal(r_n, x1.shape, x1.dtype)
    # Diffusion forcing: an independent noise level per block.
    t = block_times(flow.sample_t(r_t, (b, -(-n // blk)), self.cfg.t_sampler), blk, n)
    drop_a = jax.random.bernoulli(r_a, self.cfg.cond_drop.audio, (b,))
    drop_u = jax.random.bernoulli(r_u, self.cfg.cond_drop.user, (b,))
    audio = model.encode_audio(batch["mel_self"], batch["mel_partner"], drop_a, drop_u)
    t_v, t_a = self.times(b, n, audio[0].shape[1])
    partner = (model.partner_input(batch["motion_partner"], drop_u)
               if self.cfg.use_partner_motion else None)
    v = model(flow.interpolate(x1, x0, t), t, t_v, audio, t_a, partner)
    loss = flow.loss(v, flow.target_velocity(x1, x0))
    return loss, {"flow_mse": loss}

  def _dpo_loss(self, model, batch, rng, aux):
    """Diffusion-DPO (diffusion/dpo.py) between the data (winner) and `motion_rejected`, both
    at the same noise and per-block levels, every condition kept."""
    ref = (aux or {}).get("ref")
    if ref is None or "motion_rejected" not in batch:
      raise ValueError("model.dpo.enabled: needs the frozen reference aux 'ref' (init_from into "
                       "aux/ref) and prepare_batch's motion_rejected")
    r_t, r_n = jax.random.split(rng)
    xw, xl = model.normalize(batch["motion_self"]), model.normalize(batch["motion_rejected"])
    b, n, _ = xw.shape
    blk = int(self.cfg.block)
    x0 = jax.random.normal(r_n, xw.shape, xw.dtype)
    t = block_times(flow.sample_t(r_t, (b, -(-n // blk)), self.cfg.t_sampler), blk, n)
    keep = jnp.zeros((b,), bool)
    err = {}
    for name, m in (("policy", model), ("ref", ref)):
      for side, x1 in (("w", xw), ("l", xl)):
        v = self._flow_terms(m, batch, x1, x0, t, keep, keep)
        e = dpo.per_example(v, flow.target_velocity(x1, x0))
        err[name, side] = jax.lax.stop_gradient(e) if name == "ref" else e
    loss, metrics = dpo.loss(err["policy", "w"], err["ref", "w"], err["policy", "l"],
                             err["ref", "l"], float(self.cfg.dpo.beta))
    return loss, metrics

  # ------------------------------------------------------------------------------- sampling
  def branches(self, scales) -> list[tuple[bool, bool]]:
    """(drop audio, drop user) per guidance branch: all conditions, or the triplet."""
    if tuple(scales) == (1.0, 1.0):
      return [(False, False)]
    return [(True, True), (False, True), (True, False)]    # v_∅, v_audio, v_user

  def combine(self, v, scales, b: int):
    if v.shape[0] == b:
      return v
    v0, va, vu = v[:b], v[b:2 * b], v[2 * b:]
    a, u = scales
    return v0 + a * (va - v0) + u * (vu - v0)

  def generate_block(self, model: ForcingDiT, caches, x_noise, a_tokens, t_a, partner, *,
                     steps: int, method: str, scales):
    """Denoises one block given the caches of the clean past, then writes its clean keys into
    them. Times are relative to the block's first frame (the caches' times are rebased by one
    block afterwards), so they stay small however long the stream runs: float32 keeps their
    precision, and the masks and Gaussian terms depend on differences only.

    x_noise [B, block, C]; a_tokens ((a_self, a_partner) [G·B, Ta', D], the guidance branches
    stacked) at relative times t_a [G·B, Ta']; partner [G·B, block, C] or None.
    Returns (normalised clean block [B, block, C], caches)."""
    b, blk, _ = x_noise.shape
    g = a_tokens[0].shape[0] // b
    t_v = jnp.broadcast_to(jnp.arange(blk, dtype=jnp.float32) / self.facts["fps"], (g * b, blk))

    def velocity(x, t):
      xs = jnp.tile(x, (g, 1, 1))
      ts = jnp.broadcast_to(jnp.tile(t, g)[:, None], (g * b, blk))
      v, _ = model(xs, ts, t_v, a_tokens, t_a, partner, caches)   # the caches stay as they were
      return self.combine(v, scales, b)

    x = samplers.sample_ode(velocity, x_noise, steps=steps, method=method)
    ones = jnp.ones((g * b, blk), jnp.float32)
    _, caches = model(jnp.tile(x, (g, 1, 1)), ones, t_v, a_tokens, t_a, partner, caches)
    shift = blk / self.facts["fps"]
    return x, [c.replace(t=c.t - shift) for c in caches]

  def audio_window(self) -> tuple[int, int]:
    """(tokens before a block's first frame, tokens in the window) of audio a block sees."""
    r = self.facts["mel_rate"] / self.facts["fps"]
    before = int(np.ceil((self.cfg.history + 0.1) * self.facts["mel_rate"]))
    after = int(np.ceil((self.cfg.block + self.cfg.lookahead + 1) * r)) + 1
    return before, before + after

  def window_times(self, f0, first_token, num_tokens: int, valid):
    """Times [Ta'] of audio tokens first_token + j, relative to video frame f0, exact for
    any stream length (integer arithmetic before the one division); invalid tokens (padding)
    get −1e4 s, outside every history."""
    fps, rate = self.facts["fps"], self.facts["mel_rate"]
    j = first_token + jnp.arange(num_tokens)
    num = (j * 2 + 1).astype(jnp.float32) * fps - 2 * jnp.asarray(f0, jnp.float32) * rate
    return jnp.where(valid, num / (2 * rate * fps), -1e4)

  def generate(self, model: ForcingDiT, batch, rng, *, steps=None, method=None,
               guidance_scales=None, num_frames=None, user=True) -> system_lib.Outputs:
    """Motion for `batch` generated block by block, exactly as a stream would (KV caches of
    the clean past, the audio each block is allowed to see): Outputs(motion [B, T, C]).
    user=False: without the user's conditions (voice, motion) and without guidance, e.g. the
    DPO stage's rejected samples."""
    s = self.cfg.sample
    steps, method = int(steps or s.steps), method or s.method
    scales = tuple(s.guidance if guidance_scales is None else guidance_scales)
    if not user:
      scales = (1.0, 1.0)
    mel_s, mel_p = batch["mel_self"], batch["mel_partner"]
    b, ta = mel_s.shape[:2]
    r = self.facts["mel_rate"] / self.facts["fps"]
    n = int(num_frames or int(round(ta / r)))
    blk = int(self.cfg.block)
    nblocks = -(-n // blk)
    drops = self.branches(scales) if user else [(False, True)]
    g = len(drops)
    da = jnp.repeat(jnp.asarray([d[0] for d in drops]), b)
    du = jnp.repeat(jnp.asarray([d[1] for d in drops]), b)
    # Causal encoders: encoding the whole clip once gives each token what streaming gives it.
    a_s, a_p = model.encode_audio(jnp.tile(mel_s, (g, 1, 1)), jnp.tile(mel_p, (g, 1, 1)), da, du)
    before, win = self.audio_window()
    pad = lambda a: jnp.pad(a, ((0, 0), (before, win), (0, 0)))
    a_s, a_p = pad(a_s), pad(a_p)
    partner = None
    if self.cfg.use_partner_motion:
      mp = batch["motion_partner"][:, :n]
      mp = jnp.pad(mp, ((0, 0), (0, nblocks * blk - mp.shape[1]), (0, 0)), mode="edge")
      partner = model.partner_input(jnp.tile(mp, (g, 1, 1)), du)
    c = self.cfg.channels

    def one_block(caches, inputs):
      k, key = inputs
      f0 = k * blk
      a0 = jnp.round(f0 * r).astype(jnp.int32)       # token index of the block's first frame
      sl = lambda a: jax.lax.dynamic_slice_in_dim(a, a0, win, axis=1)
      first = a0 - before                             # clip token index of the window's start
      tok = first + jnp.arange(win)
      t_a = jnp.broadcast_to(self.window_times(f0, first, win, (tok >= 0) & (tok < ta)),
                             (g * b, win))
      part = None if partner is None else jax.lax.dynamic_slice_in_dim(partner, f0, blk, axis=1)
      x_noise = jax.random.normal(key, (b, blk, c))
      x, caches = self.generate_block(model, caches, x_noise, (sl(a_s), sl(a_p)), t_a, part,
                                      steps=steps, method=method, scales=scales)
      return caches, x

    # Block k's noise is fold_in(rng, k): a stream of unknown length draws the same.
    keys = jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(nblocks))
    _, xs = jax.lax.scan(one_block, model.init_caches(g * b), (jnp.arange(nblocks), keys))
    x = jnp.swapaxes(xs, 0, 1).reshape(b, nblocks * blk, c)[:, :n]
    return system_lib.Outputs(value=model.denormalize(x), space="motion")

  def decode(self, outputs: system_lib.Outputs, batch) -> np.ndarray:
    if outputs.space != "motion":
      raise ValueError(f"Avatar Forcing decodes space 'motion', got {outputs.space!r}")
    return render.motion_frames(self.config, outputs.value, batch)

  def evaluators(self) -> tuple[str, ...]:
    return ("synthdyad",)
