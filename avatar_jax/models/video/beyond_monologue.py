"""Beyond Monologue (arXiv 2604.10367): a talking–listening video DiT on Wan VAE latents.

The model (`BeyondMonologue`):
  front     the audio front end of both voices (log-mel by default, or a frozen wav2vec2:
            config.model.audio), at the mel rate
  qf        one Q-Former per stream (models/bm_adapters.py): learned queries per latent frame
            window of its audio
  dit       the Wan 2.1 DiT (models/dit.py) with, in every block, one cross-attention per stream
            to that stream's Q-Former tokens, under the time prior of `attn`: "gaussian_learned"
            (per-head σ, learned), "gaussian_fixed" (geometric σ schedule), "frame" (hard window
            on the latent frame's own audio) or "global" (no prior); 1D RoPE on time inside
  vae       the frozen video VAE (models/vae.py), loaded by `config.init_from.vae`; only generation
            uses it (reference frames in, latents out to pixels). Training reads latents that the
            encode job wrote, so the DiT never runs the VAE per step.

Identity: the reference frame's latent is prepended as latent frame 0 and kept clean (Wan's
per-frame timestep at t = 1, data); the window's latents follow. The self-attention's 3D RoPE sees
it as the frame before the window. This is Wan-I2V's "first frame" conditioning done through the
sequence rather than extra input channels, so a Wan T2V backbone loads unchanged.

Long video: training clean-conditions the first k ∈ [1, context_frames] latent frames of a
fraction `context_prob` of windows (t = 1 there, no loss), so the sampler can generate
overlapping windows, each starting from the last `overlap` latent frames of the one before (a
`lax.scan` over windows: any length, one compiled window).

Flow matching (diffusion/flow.py): t = 0 noise, t = 1 data, logit-normal t per window. Dropout
per stream (`cond_drop`) replaces that stream's Q-Former tokens by a learned null token, which
the sampler uses for separate guidance on self and partner audio (diffusion/guidance.py:
v = v_∅ + w_self (v_self − v_∅) + w_partner (v_self,partner − v_self)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax import system as system_lib
from avatar_jax.data import pipeline
from avatar_jax.diffusion import flow, guidance, samplers
from avatar_jax.models import audio as audio_lib
from avatar_jax.models import bm_adapters as bm
from avatar_jax.models import dit as dit_lib
from avatar_jax.models import vae as vae_lib

STREAMS = bm.STREAMS
# The ablation's attention variants -> (TimeAttention mode, learn σ).
ATTN = {"gaussian_learned": ("gaussian", True), "gaussian_fixed": ("gaussian", False),
        "frame": ("frame", False), "global": ("global", False)}


def default_config(preset: str = "S", attn: str = "gaussian_learned") -> ml_collections.ConfigDict:
  """config.model. dit: a models/dit.py preset; adapters: bm_adapters.adapter_config (fps,
  audio rate and feature width are filled from config.data by the System); vae: the VAE config
  (None: no VAE, generation returns latents); stride: video frames per latent frame."""
  if attn not in ATTN:
    raise ValueError(f"Beyond Monologue attn={attn!r}: expected one of {sorted(ATTN)}")
  mode, learn = ATTN[attn]
  return ml_collections.ConfigDict(dict(
      name="video.beyond_monologue", attn=attn, stride=4,
      dit=dit_lib.default_config(preset),
      adapters=bm.adapter_config(mode=mode, learn_sigma=learn),
      vae=ml_collections.config_dict.placeholder(ml_collections.ConfigDict),
      audio=audio_lib.front_end_config(),
      cond_drop=dict(self=0.1, partner=0.1), t_sampler="logit_normal",
      context_prob=0.5, context_frames=2,
      sample=dict(steps=20, method="euler", guidance=(1.0, 1.0), window=0, overlap=2),
  ))


class BeyondMonologue(nnx.Module):
  """Latent video [B, F, h, w, z] of one participant from both voices (module docstring)."""

  def __init__(self, cfg, facts: dict, *, rngs: nnx.Rngs):
    self.stride, self.fps = int(cfg.stride), float(facts["fps"])
    acfg = audio_lib.config_of(cfg)
    self.front = audio_lib.FrontEnd(acfg, facts, rngs=rngs)
    self.adapters = ml_collections.FrozenConfigDict(dict(
        cfg.adapters.to_dict(), fps=self.fps, stride=self.stride,
        audio_rate=float(facts["mel_rate"]), audio_dim=audio_lib.feature_dim(acfg, facts)))
    dcfg = cfg.dit
    self.dit = dit_lib.DiT(dcfg, rngs=rngs, make_extra=self.make_extra(dcfg, rngs))
    self.qf = bm.QFormers(self.adapters, dcfg, rngs=rngs)
    dq = self.adapters.dim or dit_lib.width(dcfg)
    init = nnx.initializers.normal(0.02)
    self.null = nnx.Dict({s: nnx.Param(init(rngs.params(), (dq,)), sharding=("embed",),
                                       eager_sharding=False) for s in STREAMS})
    self.vae = vae_lib.WanVAE(cfg.vae, rngs=rngs) if cfg.get("vae") else None

  def make_extra(self, dcfg, rngs: nnx.Rngs):
    """Block index -> the block's audio modules (a subclass swaps in its own, e.g. ECHO's)."""
    return bm.make_extra(self.adapters, dcfg, rngs=rngs)

  def condition(self, batch, first_row, num_latent: int, drop: dict):
    """The DiT's `extra=` for windows of `num_latent` latent frames (+ the reference frame)
    starting at latent row `first_row` [B]; drop {stream: [B] bool} -> null tokens."""
    t = bm.window_latent_times(first_row, num_latent, self.fps, self.stride)      # [B, F]
    t = jnp.concatenate([t[:, :1] - self.stride / self.fps, t], axis=1)           # + reference
    feats = {s: self.front(batch, s) for s in STREAMS}
    cond = self.qf(feats, num_latent=num_latent + 1, latent_t=t)
    for s in STREAMS:
      tok = cond[s]["tokens"]
      cond[s]["tokens"] = jnp.where(drop[s][:, None, None], self.null[s][...].astype(tok.dtype),
                                    tok)
    return cond

  def __call__(self, x_t, t, reference, cond):
    """x_t [B, F, h, w, z] (normalised latents at flow time t: [B] or [B, F]); reference
    [B, 1, h, w, z] (clean) -> velocity [B, F, h, w, z] float32."""
    b, f = x_t.shape[:2]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32).reshape(b, -1), (b, f))
    x = jnp.concatenate([reference.astype(x_t.dtype), x_t], axis=1)
    t = jnp.concatenate([jnp.ones((b, 1), jnp.float32), t], axis=1)
    return self.dit.velocity(x, t, extra=cond)[:, 1:]


def _drops(b: int, pattern) -> dict:
  return {s: jnp.full((b,), d, bool) for s, d in zip(STREAMS, pattern)}


class System(system_lib.System):
  """Training on pre-encoded latents, guided windowed sampling, decoding through the VAE.

  Batch keys: latent_self [B, F, h, w, z] (normalised, one row per `stride` frames),
  reference_latent [B, 1, h, w, z], and the front end's audio keys (mel_self, mel_partner) for
  the window's T = stride·F video frames; clip_start (bookkeeping) places the window in its clip.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.cfg = config.model
    self.facts = pipeline.facts(config.data)
    # The VAE and a wav2vec2 front end are frozen.
    self.trainable = nnx.All(audio_lib.TRAINABLE, nnx.Not(nnx.PathContains("vae")))

  def data_spec(self) -> system_lib.DataSpec:
    # clip_start places a window in its clip (its latent frames' times); reference_image: a
    # user's identity frame at sampling time, encoded by the VAE.
    return system_lib.DataSpec(keys=("latent_self", "reference_latent", "clip_start")
                               + audio_lib.keys(audio_lib.config_of(self.cfg)),
                               optional_keys=("reference_image",))

  def build(self, *, rngs: nnx.Rngs, stats=None) -> BeyondMonologue:
    del stats
    return BeyondMonologue(self.cfg, self.facts, rngs=rngs)

  def _first_row(self, batch, b):
    start = batch.get("clip_start")
    if start is None:
      return jnp.zeros((b,), jnp.int32)
    return jnp.asarray(start, jnp.int32) // int(self.cfg.stride)

  def loss(self, model: BeyondMonologue, batch, rng, aux=None):
    del aux
    r_t, r_n, r_ds, r_dp, r_c, r_k = jax.random.split(rng, 6)
    x1 = batch["latent_self"].astype(jnp.float32)
    b, f = x1.shape[:2]
    x0 = jax.random.normal(r_n, x1.shape, jnp.float32)
    t = jnp.broadcast_to(flow.sample_t(r_t, (b,), self.cfg.t_sampler)[:, None], (b, f))
    # Clean context frames for long-video continuation: given, not scored.
    k = jax.random.randint(r_k, (b,), 1, int(self.cfg.context_frames) + 1)
    k = jnp.where(jax.random.bernoulli(r_c, self.cfg.context_prob, (b,)), k, 0)
    ctx = jnp.arange(f)[None] < k[:, None]                                       # [B, F]
    t = jnp.where(ctx, 1.0, t)
    drop = {"self": jax.random.bernoulli(r_ds, self.cfg.cond_drop.self, (b,)),
            "partner": jax.random.bernoulli(r_dp, self.cfg.cond_drop.partner, (b,))}
    cond = model.condition(batch, self._first_row(batch, b), f, drop)
    v = model(flow.interpolate(x1, x0, t), t, batch["reference_latent"], cond)
    loss = flow.loss(v, flow.target_velocity(x1, x0), mask=~ctx)
    return loss, {"flow_mse": loss, "context_frames": jnp.mean(k.astype(jnp.float32))}

  def reference_latent(self, model: BeyondMonologue, batch):
    """[B, 1, h, w, z]: the batch's reference_latent, or its reference_image through the VAE."""
    if "reference_latent" in batch:
      return batch["reference_latent"]
    if "reference_image" not in batch or model.vae is None:
      raise KeyError("Beyond Monologue generate needs reference_latent [B, 1, h, w, z], or "
                     "reference_image [B, H, W, 3] uint8 and a VAE (config.model.vae + "
                     f"init_from.vae); the batch has {sorted(batch)}")
    x = batch["reference_image"].astype(jnp.float32)[:, None] * (2.0 / 255.0) - 1.0
    return model.vae.normalize(model.vae.encode(x))

  def clip_inputs(self, model: BeyondMonologue, batch, reference) -> dict:
    """Arrays computed once over the batch's whole clips and handed to every window's
    `model.condition` (with `window_row` [B], the window's first latent row in them); reference
    [B, 1, h, w, z]. None here; ECHO's long-range context and face/lip masks."""
    del model, batch, reference
    return {}

  def generate(self, model: BeyondMonologue, batch, rng, *, steps=None, method=None,
               guidance_scales=None, window=None, overlap=None, decode=True,
               num_latent=None) -> system_lib.Outputs:
    """Video for the audio of `batch` (whole clips or windows; clip_start places them).

    Latent rows F = T // stride for T video frames of audio. Windows of `window` rows (default:
    the training window, config.data.clip_frames // stride) overlap by `overlap` rows: each
    window after the first starts clean from the previous one's last `overlap` rows. Returns
    Outputs(space="video", value [B, 1 + stride·(F − 1), H, W, 3] in [-1, 1]) through the VAE,
    or with decode=False (or no VAE) Outputs(space="video_latent", value [B, F, h, w, z]).
    """
    cfg, s = self.cfg, self.cfg.sample
    stride = int(cfg.stride)
    acfg = audio_lib.config_of(cfg)
    mel_per_frame = self.facts["mel_rate"] / self.facts["fps"]
    ref = self.reference_latent(model, batch).astype(jnp.float32)
    b = ref.shape[0]
    ta = audio_lib.mel_frames(acfg, batch, "self", self.facts)
    n = num_latent or int(round(ta / mel_per_frame)) // stride
    w = int(window or s.window or int(self.config.data.clip_frames) // stride)
    w = min(w, n)
    ov = int(s.overlap if overlap is None else overlap)
    if not 0 <= ov < w:
      raise ValueError(f"Beyond Monologue sampling: overlap {ov} must be in [0, window={w})")
    hop = w - ov
    num_windows = 1 + -(-(n - w) // hop)
    total = w + (num_windows - 1) * hop                     # rows covered, >= n
    scales = tuple(s.guidance if guidance_scales is None else guidance_scales)
    patterns = guidance.nested_drop_masks(2)
    if all(x == 1.0 for x in scales):
      patterns = patterns[-1:]
    first0 = self._first_row(batch, b)
    clip = self.clip_inputs(model, batch, ref)

    # Audio padded (edge) to the rows covered, sliced per window inside the scan.
    akeys = audio_lib.keys(acfg)
    per_row = {k: stride * (mel_per_frame if k.startswith("mel_") else
                            self.facts["sample_rate"] / self.facts["fps"]) for k in akeys}
    padded = {}
    for k in akeys:
      need = int(round(total * per_row[k]))
      a = batch[k][:, :need]
      pad = need - a.shape[1]
      padded[k] = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    shape = (b, w) + ref.shape[2:]

    def one_window(prev, inputs):
      i, key = inputs
      r0 = i * hop
      sub = {k: jax.lax.dynamic_slice_in_dim(v, (r0 * per_row[k]).astype(jnp.int32),
                                             int(round(w * per_row[k])), axis=1)
             for k, v in padded.items()}
      if clip:   # whole-clip inputs, and where this window starts in them (rows)
        sub.update(clip, window_row=jnp.full((b,), r0, jnp.int32))
      conds = [model.condition(sub, first0 + r0, w, _drops(b, p)) for p in patterns]
      k_ctx = jnp.where(i > 0, ov, 0)
      ctx = (jnp.arange(w) < k_ctx)[None, :, None, None, None]
      x_init = jnp.where(ctx, jnp.pad(prev, [(0, 0), (0, w - ov)] + [(0, 0)] * 3),
                         jax.random.normal(key, shape, jnp.float32))
      ctx_t = (jnp.arange(w) < k_ctx)[None]

      def velocity(x, t):
        t = jnp.where(ctx_t, 1.0, jnp.broadcast_to(t[:, None], (b, w)))
        vs = [model(x, t, ref, c) for c in conds]
        v = vs[0] if len(vs) == 1 else guidance.combine(vs, scales)
        return jnp.where(ctx, 0.0, v)   # context rows stay as given

      x = samplers.sample_ode(velocity, x_init, steps=int(steps or s.steps),
                              method=method or s.method)
      return x[:, w - ov:] if ov else prev, x

    prev0 = jnp.zeros((b, ov) + ref.shape[2:], jnp.float32)
    keys = jax.random.split(rng, num_windows)
    _, outs = jax.lax.scan(one_window, prev0, (jnp.arange(num_windows), keys))
    # Window 0 whole, then each later window's new rows.
    latents = jnp.concatenate([outs[0]] + [outs[j, :, ov:] for j in range(1, num_windows)],
                              axis=1)[:, :n]
    extras = {"windows": outs}     # [num_windows, B, window, h, w, z], before stitching
    if not decode or model.vae is None:
      return system_lib.Outputs(value=latents, space="video_latent", extras=extras)
    video = model.vae.decode(model.vae.denormalize(latents))
    return system_lib.Outputs(value=video, space="video", extras=extras)

  def reconstruct(self, model: BeyondMonologue, batch) -> system_lib.Outputs:
    """The batch's true latents (latent_self [B, F, h, w, z]) through the VAE decoder:
    Outputs(space="video", value [B, 1 + stride·(F − 1), H, W, 3]), the frames this latent space
    and decoder give back at best; the evaluators read them beside the generated video."""
    if model.vae is None:
      raise ValueError("Beyond Monologue reconstruct needs a VAE (config.model.vae + "
                       "init_from.vae)")
    z = jnp.asarray(batch["latent_self"], jnp.float32)
    return system_lib.Outputs(value=model.vae.decode(model.vae.denormalize(z)), space="video")

  def decode(self, outputs: system_lib.Outputs, batch) -> np.ndarray:
    """uint8 [B, T', H, W, 3] of generated video (space "video")."""
    if outputs.space != "video":
      raise ValueError(f"Beyond Monologue decodes space 'video' (a run with a VAE: "
                       f"config.model.vae + init_from.vae), got {outputs.space!r}")
    from avatar_jax.evals import reconstruction  # pylint: disable=g-import-not-at-top
    return reconstruction.to_uint8(outputs.value)

  def evaluators(self) -> tuple[str, ...]:
    return ("synthdyad",)
