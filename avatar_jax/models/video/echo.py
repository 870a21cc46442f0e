"""ECHO (arXiv 2603.17427) on the Beyond Monologue video DiT (models/video/beyond_monologue.py).

ECHO's two claims, and what answers them here:

  role-agnostic fusion  Beyond Monologue adds both voices' cross-attentions to every token, so the
                        partner's audio can move the avatar's lips. `SDCM` (one per DiT block,
                        in the block's `extra` hook) routes them by region instead:
                            h' = h + M_f ⊙ [g ⊙ h_avatar + (1 − g) ⊙ h_user] + M_lip ⊙ h_avatar
                            g  = sigmoid(W_u conv(h_user) + W_a conv(h_avatar) + b)
                        h_avatar: cross-attention to the own audio's Q-Former tokens; h_user: to
                        the partner's Q-Former tokens plus the long-range context tokens; conv a
                        depthwise 3×3×3 convolution over the (frame, row, column) token grid;
                        M_lip the soft lip mask, M_f = M_face ⊙ (1 − M_lip) the rest of the face,
                        so the mouth is driven by the own audio alone and nothing outside the
                        face is driven by audio at all.
  short windows         `UserContext` summarises minutes of the partner's audio (and motion,
                        and optional per-frame labels: emotion, transcript features) in chunks
                        of `chunk_s` seconds: pooled (mean, std) -> linear -> a gated linear
                        recurrence (causal, `lax.associative_scan`) -> residual MLP. Each window
                        reads the `tokens` latest chunk states that end by its last frame, at
                        their times, through one more cross-attention (no time prior) in the
                        user stream.

Two stages (configs/echo_synthdyad.py). Stage 1 is the Beyond-Monologue-style base: per block,
h' = h + h_avatar + h_user, the two cross-attentions reading the same residual. Stage 2 adds SDCM
and the context and starts from stage 1 by `config.init_from`. Everything new starts at zero:
the context cross-attention's output projection (TimeAttention zero-initialises it), and the
blend `mix` (a scalar per block) in
    update = (h_avatar + h_user) + mix · (SDCM − (h_avatar + h_user)),
so a loaded stage 1 gives exactly its own outputs, and `mix` → 1 is ECHO's formula above.

Masks. Per latent token (the DiT's patch grid h × w, shared by all frames), in [0, 1]: the
fraction of the token's pixels inside the face (the head ellipse) and inside the lip region
(the mouth at every opening, rounding and smile), each dilated by `masks.margin` (image units,
the image spans [-1, 1]) for head motion and softened over `masks.soft`. Sources:
  "synthdyad"  the renderer's geometry (data/synthdyad/render.py) and the identity's face aspect
               and mouth width, looked up from the batch's `identity_self` (no identity: the
               mean face). The neutral pose: the truth's head motion would leak nods.
  "centred"    the mean SynthDyad face, for centred face crops.
  "batch"      real video: per-clip `face_mask` and `lip_mask` [B, Hm, Wm] float (e.g. from
               landmarks or a face parser on the reference frame), Hm, Wm multiples of the token
               grid, averaged per token. Required in training batches; at generation any source
               uses them when the batch has them.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax.data.synthdyad import motion as motion_lib
from avatar_jax.data.synthdyad import masks as masks_lib
from avatar_jax.data.synthdyad.masks import synthdyad_masks
from avatar_jax.models import audio as audio_lib
from avatar_jax.models import bm_adapters as bm
from avatar_jax.models import dit as dit_lib
from avatar_jax.models import layers
from avatar_jax.models.video import beyond_monologue as bm_video

MASK_SOURCES = ("synthdyad", "centred", "batch")
# SynthDyad partner events that stand in for emotion / dialogue-act labels (`synthdyad_labels`).
LABEL_EVENTS = ("laughter", "question", "phrase_end", "backchannel")


def default_config(preset: str = "S", attn: str = "gaussian_learned", *, sdcm: bool = True,
                   context: bool = True) -> ml_collections.ConfigDict:
  """config.model: Beyond Monologue's (bm_video.default_config) plus
  sdcm          the region-routed fusion (False: role-agnostic, h + h_avatar + h_user)
  window        latent rows denoised per training example; the batch's clip_frames (the span)
                may be longer, the rows before the window are its long-range history
  context       enabled; chunk_s (seconds per chunk: a whole number of video and audio
                frames); tokens (chunk states read per window); motion (also the partner's
                motion, batch key motion_partner); labels (a per-frame key [B, T, E] of partner
                labels, "" = none) and labels_dim E
  masks         source (MASK_SOURCES), margin and soft (image units)."""
  c = bm_video.default_config(preset, attn)
  c.name = "video.echo"
  c.sdcm = sdcm
  c.window = 12
  c.context = ml_collections.ConfigDict(dict(enabled=context, chunk_s=0.64, tokens=8, motion=True,
                                             labels="", labels_dim=0))
  c.masks = ml_collections.ConfigDict(dict(source="synthdyad", margin=0.08, soft=0.04))
  return c


def check_config(cfg, facts: dict) -> None:
  """Raises on config.model values ECHO cannot run (names the key)."""
  if cfg.masks.source not in MASK_SOURCES:
    raise ValueError(f"config.model.masks.source={cfg.masks.source!r}: expected one of "
                     f"{MASK_SOURCES}")
  if int(cfg.window) < 1:
    raise ValueError(f"config.model.window={cfg.window}: expected >= 1 latent rows")
  c = cfg.context
  if c.enabled:
    for rate, name in ((facts["fps"], "video fps"), (facts["mel_rate"], "audio feature rate")):
      n = c.chunk_s * rate
      if n < 1 or abs(n - round(n)) > 1e-6:
        raise ValueError(f"config.model.context.chunk_s={c.chunk_s}: must be a whole number "
                         f"(>= 1) of frames at the {name} {rate} Hz")
    if int(c.tokens) < 1:
      raise ValueError(f"config.model.context.tokens={c.tokens}: expected >= 1")
    if bool(c.labels) != (int(c.labels_dim) > 0):
      raise ValueError(f"config.model.context: labels={c.labels!r} needs labels_dim > 0 (and "
                       f"labels_dim={c.labels_dim} a labels key)")


# ============================================================================= masks
# lip_box and synthdyad_masks: data/synthdyad/masks.py (shared with the VAE's lip-weighted loss).
def pool_masks(mask, grid_hw, key: str):
  """[B, Hm, Wm] -> [B, h, w]: the mean over each cell (Hm, Wm multiples of h, w)."""
  h, w = grid_hw
  if mask.ndim != 3 or mask.shape[1] % h or mask.shape[2] % w:
    raise ValueError(f"ECHO: batch[{key!r}] must be [B, Hm, Wm] with Hm, Wm multiples of the "
                     f"token grid {h}×{w}; found shape {mask.shape}")
  b, hm, wm = mask.shape
  return mask.astype(jnp.float32).reshape(b, h, hm // h, w, wm // w).mean(axis=(2, 4))


def synthdyad_labels(events: dict, num_frames: int, fps: float, who: int = 1) -> np.ndarray:
  """Per-frame labels [T, len(LABEL_EVENTS)] float32 of one participant's SynthDyad events
  (`who` 1: the partner): 1 on the frames an event spans (a point event: its frame). A stand-in
  for emotion / dialogue-act labels, for `config.model.context.labels`."""
  from avatar_jax.data.synthdyad import generator  # pylint: disable=g-import-not-at-top
  out = np.zeros((num_frames, len(LABEL_EVENTS)), np.float32)
  for j, name in enumerate(LABEL_EVENTS):
    sel = (events["type"] == generator.EVENT_INDEX[name]) & (events["who"] == who)
    for s, e in zip(events["start"][sel], events["end"][sel]):
      a = int(np.floor(s * fps))
      out[a:max(int(np.ceil(e * fps)), a + 1), j] = 1.0
  return out


# ============================================================================= modules
class UserContext(nnx.Module):
  """The partner's history -> causal chunk states [B, 1 + C, D]; state j summarises chunks
  0..j−1 (state 0: nothing heard yet). Module docstring."""

  def __init__(self, ccfg, *, audio_dim: int, audio_rate: float, fps: float, motion_dim: int,
               dim: int, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.chunk_s = float(ccfg.chunk_s)
    self.audio_chunk = int(round(ccfg.chunk_s * audio_rate))
    self.frame_chunk = int(round(ccfg.chunk_s * fps))
    self.labels, self.motion_dim = str(ccfg.labels), motion_dim
    self.norm_a = layers.layer_norm(2 * audio_dim, **kw)
    self.audio_in = layers.dense(2 * audio_dim, dim, (None, "embed"), **kw)
    self.motion_in = (layers.dense(2 * motion_dim, dim, (None, "embed"), **kw)
                      if ccfg.motion else None)
    self.labels_in = (layers.dense(int(ccfg.labels_dim), dim, (None, "embed"), **kw)
                      if ccfg.labels else None)
    self.scan_in = layers.dense(dim, 2 * dim, ("embed", None), **kw)
    self.norm_o = layers.layer_norm(dim, **kw)
    self.mlp = layers.Mlp(dim, 2 * dim, **kw)

  @staticmethod
  def _pool(x, per: int, n: int, stats: bool = True):
    """[B, T, E] -> [B, n, 2E] (mean ‖ std over chunks of `per` rows) or [B, n, E] (mean)."""
    x = x[:, :n * per].astype(jnp.float32).reshape(x.shape[0], n, per, -1)
    m = x.mean(axis=2)
    return jnp.concatenate([m, x.std(axis=2)], axis=-1) if stats else m

  def num_chunks(self, num_audio: int, num_frames: int | None = None) -> int:
    n = num_audio // self.audio_chunk
    return n if num_frames is None else min(n, num_frames // self.frame_chunk)

  def __call__(self, audio, motion=None, labels=None):
    """audio [B, Ta, Da] (front-end features); motion [B, T, C], labels [B, T, E] at the video
    rate, each used when given and configured."""
    frames = [v.shape[1] for v in (motion, labels) if v is not None]
    n = self.num_chunks(audio.shape[1], min(frames) if frames else None)
    if n < 1:
      raise ValueError(f"ECHO context: {audio.shape[1]} audio frames hold no whole chunk of "
                       f"{self.audio_chunk}")
    u = self.audio_in(self.norm_a(self._pool(audio, self.audio_chunk, n)))
    if self.motion_in is not None and motion is not None:
      u = u + self.motion_in(self._pool(motion[..., :self.motion_dim], self.frame_chunk, n))
    if self.labels_in is not None and labels is not None:
      u = u + self.labels_in(self._pool(labels, self.frame_chunk, n, stats=False))
    z, cand = jnp.split(self.scan_in(jax.nn.gelu(u)).astype(jnp.float32), 2, axis=-1)
    # h_c = (1 − σ(z_c)) h_{c−1} + σ(z_c) cand_c, from h_{−1} = 0: a linear recurrence, scanned
    # in parallel (log C depth), so minutes of history cost little.
    keep = 1.0 - jax.nn.sigmoid(z)
    new = jax.nn.sigmoid(z) * cand
    combine = lambda p, q: (p[0] * q[0], q[0] * p[1] + q[1])
    _, states = jax.lax.associative_scan(combine, (keep, new), axis=1)
    states = jnp.concatenate([jnp.zeros_like(states[:, :1]), states], axis=1)
    return states + self.mlp(self.norm_o(states)).astype(jnp.float32)

  def window_tokens(self, states, window_row, num_latent: int, count: int, fps: float,
                    stride: int):
    """The `count` latest states whose chunks end by the window's last video frame:
    tokens [B, count, D] and their times [B, count] (seconds from the window's first frame).
    window_row [B]: the window's first latent row in the audio `states` were made from."""
    r0 = jnp.asarray(window_row, jnp.int32)
    end = (r0 + num_latent) * stride                                       # video frames
    last = jnp.minimum(end // self.frame_chunk, states.shape[1] - 1)       # [B]
    idx = jnp.clip(last[:, None] - jnp.arange(count - 1, -1, -1)[None], 0)  # oldest first
    tok = jnp.take_along_axis(states, idx[..., None], axis=1)
    t = idx.astype(jnp.float32) * self.chunk_s - (r0 * stride / fps).astype(jnp.float32)[:, None]
    return tok, t


class SDCM(nnx.Module):
  """One DiT block's audio update x [B, N, D] -> [B, N, D] (module docstring): Beyond
  Monologue's two cross-attentions (bm_adapters.make_extra), the user stream's context
  cross-attention, the gate and the masked routing."""

  def __init__(self, adapters, dit_cfg, *, depth: int, sdcm: bool, context: bool,
               rngs: nnx.Rngs):
    self.avatar, self.user = bm.make_extra(adapters, dit_cfg, rngs=rngs)(depth)
    # Chunk states far from the window: a Gaussian time prior would hide them.
    ccfg = adapters.as_configdict()
    ccfg.update(streams=("context",), mode="global", learn_sigma=False)
    self.context = bm.make_extra(ccfg, dit_cfg, rngs=rngs)(depth)[0] if context else None
    self.sdcm = sdcm
    if sdcm:
      d = dit_lib.width(dit_cfg)
      kw = dict(rngs=rngs, dtype=jnp.dtype(dit_cfg.dtype),
                param_dtype=jnp.dtype(dit_cfg.param_dtype))
      conv = lambda: nnx.Conv(
          d, d, (3, 3, 3), feature_group_count=d, padding="SAME",
          kernel_init=layers.logical(nnx.initializers.lecun_normal(),
                                     (None, None, None, None, "embed")),
          bias_init=layers.logical(nnx.initializers.zeros_init(), ("embed",)), **kw)
      self.conv_user, self.conv_avatar = conv(), conv()
      self.gate_user = layers.dense(d, d, ("embed", None), use_bias=False, **kw)
      self.gate_avatar = layers.dense(d, d, ("embed", None), **kw)
      self.mix = nnx.Param(jnp.zeros((), jnp.float32))

  def streams(self, x, cond, grid):
    """(h_avatar, h_user) [B, N, D] in the compute dtype."""
    h_a = self.avatar(x, cond, grid)
    h_u = self.user(x, cond, grid)
    if self.context is not None:
      h_u = h_u + self.context(x, cond, grid)
    return h_a, h_u

  def gate(self, h_a, h_u, grid):
    """g [B, N, D] float32."""
    b, n, d = h_a.shape
    conv = lambda m, h: m(h.reshape(b, *grid, d)).reshape(b, n, d)
    z = self.gate_user(conv(self.conv_user, h_u)) + self.gate_avatar(conv(self.conv_avatar, h_a))
    return jax.nn.sigmoid(z.astype(jnp.float32))

  def __call__(self, x, cond, grid):
    h_a, h_u = self.streams(x, cond, grid)
    fused = h_a + h_u                          # role-agnostic: the stage-1 update
    if not self.sdcm:
      return fused
    f, h, w = grid
    tok = lambda m: jnp.tile(m.reshape(m.shape[0], h * w), (1, f))[..., None]
    lip = tok(cond["lip_mask"])
    face = tok(cond["face_mask"]) * (1.0 - lip)
    g = self.gate(h_a, h_u, grid)
    a32, u32 = h_a.astype(jnp.float32), h_u.astype(jnp.float32)
    routed = face * (g * a32 + (1.0 - g) * u32) + lip * a32
    # mix = 0 adds an exact zero: a loaded stage 1 keeps its outputs bit for bit.
    return fused + (self.mix[...] * (routed - fused.astype(jnp.float32))).astype(fused.dtype)


class Echo(bm_video.BeyondMonologue):
  """Beyond Monologue's model with SDCM blocks and the user context (module docstring)."""

  def __init__(self, cfg, facts: dict, *, rngs: nnx.Rngs):
    # Read by make_extra during the parent's construction of the DiT.
    self.use_sdcm, self.use_context = bool(cfg.sdcm), bool(cfg.context.enabled)
    super().__init__(cfg, facts, rngs=rngs)
    self.num_tokens = int(cfg.context.tokens)
    dq = self.adapters.dim or dit_lib.width(cfg.dit)
    self.context_encoder = UserContext(
        cfg.context, audio_dim=audio_lib.feature_dim(audio_lib.config_of(cfg), facts),
        audio_rate=float(facts["mel_rate"]), fps=self.fps,
        motion_dim=len(motion_lib.MOTION_CHANNELS), dim=dq, rngs=rngs,
        dtype=jnp.dtype(cfg.dit.dtype), param_dtype=jnp.dtype(cfg.dit.param_dtype),
    ) if self.use_context else None
    self.null_context = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (dq,)),
                                  sharding=("embed",), eager_sharding=False
                                  ) if self.use_context else None

  def make_extra(self, dcfg, rngs: nnx.Rngs):
    return lambda i: [SDCM(self.adapters, dcfg, depth=i, sdcm=self.use_sdcm,
                           context=self.use_context, rngs=rngs)]

  def context_states(self, batch):
    """Chunk states [B, 1 + C, Dq] of the partner's whole audio in `batch` (+ its motion and
    labels where the batch has them)."""
    enc = self.context_encoder
    return enc(self.front(batch, "partner"), batch.get("motion_partner"),
               batch.get(enc.labels) if enc.labels else None)

  def condition(self, batch, first_row, num_latent: int, drop: dict):
    """Beyond Monologue's condition plus "context" tokens (from batch["context_states"] at
    batch["window_row"]; the partner's null token when the partner is dropped) and the token
    masks batch["face_mask"], batch["lip_mask"] [B, h·w]."""
    cond = super().condition(batch, first_row, num_latent, drop)
    if self.use_context:
      for k in ("context_states", "window_row"):
        if k not in batch:
          raise KeyError(f"ECHO condition needs {k!r} (System.clip_inputs); batch has "
                         f"{sorted(batch)}")
      tok, t = self.context_encoder.window_tokens(batch["context_states"], batch["window_row"],
                                                  num_latent, self.num_tokens, self.fps,
                                                  self.stride)
      tok = jnp.where(drop["partner"][:, None, None], self.null_context[...].astype(tok.dtype),
                      tok)
      cond["context"] = {"tokens": tok, "times": t}
    if self.use_sdcm:
      if "face_mask" not in batch or "lip_mask" not in batch:
        raise KeyError(f"ECHO condition needs the token masks face_mask, lip_mask [B, h·w] "
                       f"(System.clip_inputs); batch has {sorted(batch)}")
      cond["face_mask"], cond["lip_mask"] = batch["face_mask"], batch["lip_mask"]
    return cond


# ============================================================================= system
class System(bm_video.System):
  """Beyond Monologue's system with ECHO's model. Training batches are spans of
  config.data.clip_frames video frames; the loss denoises `config.model.window` latent rows at a
  random place in each span, the rows before it being the context's history. Generation is
  Beyond Monologue's windowed sampler; the context and masks are computed once per clip
  (`clip_inputs`)."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    check_config(self.cfg, self.facts)
    stride = int(self.cfg.stride)
    span = int(config.data.clip_frames)
    if span and (span % stride or span // stride < int(self.cfg.window)):
      raise ValueError(f"ECHO: config.data.clip_frames={span} (the training span) must be a "
                       f"multiple of stride {stride} holding config.model.window="
                       f"{self.cfg.window} latent rows")
    # Face aspect and mouth width of every SynthDyad identity (all splits' pools).
    self.geometry = masks_lib.identity_geometry(int(config.data.synthdyad.seed))

  def data_spec(self):
    base = super().data_spec()
    c = self.cfg
    keys = base.keys
    if c.sdcm:
      keys += ("face_mask", "lip_mask") if c.masks.source == "batch" else ("identity_self",)
    if c.context.enabled:
      keys += ("motion_partner",) if c.context.motion else ()
      keys += (c.context.labels,) if c.context.labels else ()
    return type(base)(keys=tuple(dict.fromkeys(keys)),
                      optional_keys=base.optional_keys + ("face_mask", "lip_mask"))

  def build(self, *, rngs: nnx.Rngs, stats=None) -> Echo:
    del stats
    return Echo(self.cfg, self.facts, rngs=rngs)

  def masks(self, batch, grid_hw, b: int) -> dict:
    """{"face_mask", "lip_mask"}: [B, h·w] per token of the grid (module docstring)."""
    if "face_mask" in batch and "lip_mask" in batch:
      face, lip = (pool_masks(batch[k], grid_hw, k) for k in ("face_mask", "lip_mask"))
    elif self.cfg.masks.source == "batch":
      raise KeyError(f"ECHO masks.source='batch' needs face_mask and lip_mask [B, Hm, Wm]; the "
                     f"batch has {sorted(batch)}")
    else:
      ident = batch.get("identity_self") if self.cfg.masks.source == "synthdyad" else None
      geo = masks_lib.lookup(self.geometry, ident, b)
      m = self.cfg.masks
      face, lip = synthdyad_masks(geo[:, 0], geo[:, 1], grid_hw, margin=m.margin, soft=m.soft)
    flat = lambda x: x.reshape(x.shape[0], -1)
    return {"face_mask": flat(face), "lip_mask": flat(lip)}

  def clip_inputs(self, model: Echo, batch, reference) -> dict:
    out = {}
    if model.use_context:
      out["context_states"] = model.context_states(batch)
    if model.use_sdcm:
      p = model.dit.cfg.patch_size
      out.update(self.masks(batch, (reference.shape[2] // p[1], reference.shape[3] // p[2]),
                            reference.shape[0]))
    return out

  def loss(self, model: Echo, batch, rng, aux=None):
    r_win, rng = jax.random.split(rng)
    lat = batch["latent_self"]
    b, rows = lat.shape[:2]
    w = min(int(self.cfg.window), rows)
    r0 = jax.random.randint(r_win, (b,), 0, rows - w + 1)
    stride = int(self.cfg.stride)
    akeys = audio_lib.keys(audio_lib.config_of(self.cfg))
    per_frame = {k: (self.facts["mel_rate"] if k.startswith("mel_")
                     else self.facts["sample_rate"]) / self.facts["fps"] for k in akeys}
    cut = lambda x, start, n: jax.vmap(
        lambda xi, si: jax.lax.dynamic_slice_in_dim(xi, si, n, axis=0))(x, start)
    window = dict(batch)
    window["latent_self"] = cut(lat, r0, w)
    for k in akeys:
      rate = stride * per_frame[k]
      window[k] = cut(batch[k], (r0 * rate).astype(jnp.int32), int(round(w * rate)))
    start = batch.get("clip_start")
    window["clip_start"] = (0 if start is None else jnp.asarray(start, jnp.int32)) + stride * r0
    window.update(self.clip_inputs(model, batch, batch["reference_latent"]), window_row=r0)
    loss, metrics = super().loss(model, window, rng, aux)
    return loss, {**metrics, "window_row": jnp.mean(r0.astype(jnp.float32))}
