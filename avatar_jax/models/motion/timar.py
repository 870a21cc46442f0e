"""TIMAR (arXiv 2512.15340): turn-level interleaved masked autoregression of FLAME 56-d motion.

The conversation is cut into turns of `turn_seconds` (1 s = F = 25 frames). Each turn contributes
four groups of F per-frame tokens, in this order (window slot w, frame f):

    [user speech | user motion | agent speech | agent motion]      G = 4 groups, G·F tokens

user = the partner (mel_partner, flame56_partner), agent = the avatar itself (mel_self, and the
flame56_self it generates). Audio is encoded per turn (no look into the next turn) and mean-pooled
from `mel_rate` to `fps`. Every token of window slot w gets the time w·turn_seconds + f/fps, so
TimeAttention's `causal_block=turn_seconds` is the turn-level causal mask: bidirectional within a
turn, causal across turns. The history limit (`max_turns`, 8 = the current turn + 7) is a window:
training cuts clips into independent windows of at most `max_turns` turns ("chunking"), generation
slides a window over the last `history_turns` turns.

MAR: in training every turn of the window masks its own random subset of agent-motion tokens
(ratio ~ a truncated normal on [ratio_min, 1] peaked at 1) with a learned mask token; unmasked
agent motion of every turn is ground truth (teacher forcing), so later turns see the past turns'
visible ground truth. A small MLP diffusion head with adaLN, conditioned on the transformer output
at each masked token, predicts x0 under the cosine schedule (diffusion/cosine.py); the loss counts
masked tokens only. Generation runs turn by turn: MAR iterations unmask the current turn's agent
tokens in a random order on a cosine schedule, each new token drawn by the head with a few DDIM
steps. CFG on user motion: the current turn's user-motion tokens become a learned null token in
the unconditional branch (in training, dropped per turn with probability `cond_drop`).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax import config_lib, render, sharding
from avatar_jax import system as system_lib
from avatar_jax.data import pipeline
from avatar_jax.diffusion import cosine
from avatar_jax.models.attention import TimeAttention
from avatar_jax.models.layers import AdaLN, Mlp, dense, layer_norm, logical, timestep_embedding
from avatar_jax.models import audio as audio_lib
from avatar_jax.models.motion.motion_dit import AudioEncoder, Stats, channel_stats

USER_SPEECH, USER_MOTION, AGENT_SPEECH, AGENT_MOTION = range(4)
GROUPS = 4
RATIO_STD = 0.25  # the reference's left-half normal around 1 (full masking)


def default_config() -> ml_collections.ConfigDict:
  """config.model; fps, mel_rate and n_mels come from config.data (pipeline.facts)."""
  return ml_collections.ConfigDict(dict(
      name="motion.timar", width=256, depth=8, heads=4, channels=56,
      dtype="float32", param_dtype="float32",
      turn_seconds=1.0, max_turns=8,
      attention=dict(mode="global", sigma_range=(0.04, 2.0), learn_sigma=False,
                     implementation="auto"),
      head=dict(width=256, depth=3, batch_mul=4),
      ratio_min=0.7, cond_drop=0.1, std_floor=1e-3,
      sample=dict(iters=4, steps=8, cfg=1.0, cfg_schedule="linear", temperature=1.0,
                  history_turns=7, mask_history=True, random_order=True),
      audio=audio_lib.front_end_config(),
  ))


# ================================================================================ diffusion head
class DiffusionHead(nnx.Module):
  """Per-token x0 denoiser: (x_t [B, N, C], level t [B, N], z [B, N, Dz]) -> x0 [B, N, C].

  Residual MLP blocks whose adaLN reads (level embedding + projected z), as MAR's head.
  """

  def __init__(self, c: int, dz: int, width: int, depth: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.inp = dense(c, width, (None, "embed"), **kw)
    self.level = Mlp(width, width, **kw)
    self.cond = dense(dz, width, ("embed", None), **kw)
    self.norms = nnx.List([AdaLN(width, width, **kw) for _ in range(depth)])
    self.mlps = nnx.List([Mlp(width, width, **kw) for _ in range(depth)])
    self.norm_out = AdaLN(width, width, **kw)
    # float32 output: x0 feeds the float32 DDIM update and loss.
    self.out = dense(width, c, ("embed", None), rngs=rngs, zero_init=True, dtype=jnp.float32)

  def __call__(self, x_t, t, z):
    h = self.inp(x_t)
    y = self.level(timestep_embedding(t, h.shape[-1]).astype(h.dtype)) + self.cond(z)
    for norm, mlp in zip(self.norms, self.mlps):
      x, gate = norm(h, y)
      h = h + gate * mlp(x)
    x, _ = self.norm_out(h, y)
    return self.out(x.astype(jnp.float32))


def sample_head(head: DiffusionHead, z, rng, *, channels: int, steps: int, temperature=1.0,
                z_uncond=None, cfg=1.0):
  """Deterministic DDIM draw of x0 [B, N, C] per token from z [B, N, Dz].

  With `z_uncond`, x0 = x0(z_uncond) + cfg·(x0(z) − x0(z_uncond)) at every step (x0-space CFG,
  as the reference combines its x0 outputs). `temperature` scales the starting noise (DDIM
  has no per-step noise to scale).
  """
  x_noise = temperature * jax.random.normal(rng, z.shape[:-1] + (channels,), jnp.float32)

  def denoise(x, t):
    t = jnp.broadcast_to(t[:, None], x.shape[:2])
    x0 = head(x, t, z)
    if z_uncond is None:
      return x0
    x0_u = head(x, t, z_uncond)
    return x0_u + cfg * (x0 - x0_u)

  return cosine.ddim_sample(denoise, x_noise, steps=steps)


def head_loss(head: DiffusionHead, rng, z, x0, mask, batch_mul: int = 1):
  """Masked x0 loss: z [B, N, Dz], x0 [B, N, C], mask [B, N] (True = counts). Each token is
  noised `batch_mul` times at independent levels (the reference's diffusion_batch_mul)."""
  # Copies next to their original ([B·m], batch outermost): concatenating along the batch axis
  # would move examples between the devices that hold batch shards.
  z, x0, mask = (jnp.repeat(a, batch_mul, axis=0) for a in (z, x0, mask))
  r_t, r_eps = jax.random.split(rng)
  t = cosine.sample_t(r_t, x0.shape[:2])
  x_t = cosine.q_sample(x0, jax.random.normal(r_eps, x0.shape, x0.dtype), t)
  return cosine.loss_x0(head(x_t, t, z), x0, mask)


def mar_mask(rng, shape, frames: int, ratio_min: float):
  """Masks [*shape, frames] bool (True = hidden) and their ratios [*shape] in [ratio_min, 1].

  Each entry of `shape` (an example's turn) draws its own ratio from a normal around 1 with
  σ = 0.25 truncated to [ratio_min, 1], and hides ceil(ratio·frames) tokens in a random order.
  """
  r_ratio, r_order = jax.random.split(rng)
  lo = (ratio_min - 1.0) / RATIO_STD
  ratio = 1.0 + RATIO_STD * jax.random.truncated_normal(r_ratio, lo, 0.0, shape)
  ratio = jnp.clip(ratio, ratio_min, 1.0)
  count = jnp.ceil(ratio * frames - 1e-4)   # float32 ratio·frames may land just above an integer
  return random_ranks(r_order, shape, frames) < count[..., None], ratio


def random_ranks(rng, shape, frames: int):
  """A random permutation of 0..frames-1 per entry of `shape`: [*shape, frames] int32."""
  return jnp.argsort(jnp.argsort(jax.random.uniform(rng, (*shape, frames)), axis=-1), axis=-1)


def unmask_schedule(frames: int, iters: int) -> np.ndarray:
  """Tokens known before MAR iteration i (i = 0..iters): [iters + 1] int, 0 ... frames.

  After iteration i, floor(frames·cos(π/2·(i+1)/iters)) tokens stay masked, but every
  iteration unmasks at least one and the last unmasks the rest (the reference's schedule).
  """
  if not 1 <= iters <= frames:
    raise ValueError(f"sample.iters must be in [1, {frames}] (tokens per turn), got {iters}")
  masked, done = frames, [0]
  for i in range(iters):
    target = math.floor(frames * math.cos(0.5 * math.pi * (i + 1) / iters))
    target = min(max(1, masked - 1), target) if i < iters - 1 else 0
    masked -= max(masked - target, 1)
    done.append(frames - masked)
  return np.asarray(done, np.int32)


# =================================================================================== the model
class Block(nnx.Module):
  """Pre-norm transformer block over turn tokens: turn-causal self-attention, MLP."""

  def __init__(self, d: int, heads: int, cfg, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    a = cfg.attention
    self.norm1 = layer_norm(d, **kw)
    self.attn = TimeAttention(d, d, heads, mode=a.mode, sigma_range=tuple(a.sigma_range),
                              learn_sigma=a.learn_sigma, implementation=a.implementation,
                              causal_block=float(cfg.turn_seconds), **kw)
    self.norm2 = layer_norm(d, **kw)
    self.mlp = Mlp(d, 4 * d, **kw)

  def __call__(self, h, t):
    h = sharding.constrain(h, ("batch", "time", "embed"))
    x = self.norm1(h)
    h = h + self.attn(x, t, x, t)
    return h + self.mlp(self.norm2(h))


class Timar(nnx.Module):
  """cfg: config.model; facts: the data facts (`pipeline.facts(config.data)`: fps, mel_rate,
  n_mels, sample_rate)."""

  def __init__(self, cfg, *, facts: dict, rngs: nnx.Rngs, stats=None):
    fps, mel_rate = float(facts["fps"]), float(facts["mel_rate"])
    d, c = cfg.width, cfg.channels
    # Frozen: hashable, so compiled generators are cached across eval rows (evals/runner.py).
    self.cfg = config_lib.freeze(cfg)
    self.fps, self.turn_seconds = float(fps), float(cfg.turn_seconds)
    self.frames = int(round(fps * cfg.turn_seconds))   # F: tokens per group and turn
    self.mel_per_frame = int(round(mel_rate / fps))
    if self.frames < 1 or abs(self.frames - fps * cfg.turn_seconds) > 1e-6:
      raise ValueError(f"model.turn_seconds={cfg.turn_seconds} must hold a whole number of "
                       f"frames at {fps} fps")
    if self.mel_per_frame < 1 or abs(self.mel_per_frame * fps - mel_rate) > 1e-6:
      raise ValueError(f"TIMAR pools mel frames to video frames: mel_rate ({mel_rate}) must be a "
                       f"whole multiple of fps ({fps}); check config.data.features")
    stats = stats or {"mean": np.zeros(c, np.float32), "std": np.ones(c, np.float32)}
    self.mean = Stats(jnp.asarray(stats["mean"], jnp.float32))
    self.std = Stats(jnp.asarray(stats["std"], jnp.float32))
    self.dtype = jnp.dtype(cfg.get("dtype", "float32"))
    kw = dict(rngs=rngs, dtype=self.dtype, param_dtype=jnp.dtype(cfg.get("param_dtype", "float32")))
    # One audio encoder and one motion encoder for both people (the reference shares its
    # wav2vec2 and motion MLP too); the slot embeddings say whose token it is.
    # Log-mel or a frozen wav2vec2 (config.model.audio), both at the mel rate.
    self.front = audio_lib.FrontEnd(audio_lib.config_of(cfg), facts, rngs=rngs)
    self.audio = AudioEncoder(audio_lib.feature_dim(audio_lib.config_of(cfg), facts), d, **kw)
    self.motion_in = dense(c, d, (None, "embed"), **kw)
    self.motion_mlp = Mlp(d, 2 * d, **kw)
    init = nnx.initializers.normal(0.02)
    param = lambda shape, axes: nnx.Param(logical(init, axes)(rngs.params(), shape))
    self.mask_token = param((d,), ("embed",))
    self.null_user = param((d,), ("embed",))
    # Learned positions, factorised: slot within a turn (group, frame) + turn index in the window.
    self.slot_pos = param((GROUPS * self.frames, d), (None, "embed"))
    self.turn_pos = param((cfg.max_turns, d), (None, "embed"))
    self.norm_in = layer_norm(d, **kw)
    self.blocks = nnx.List([Block(d, cfg.heads, cfg, **kw) for _ in range(cfg.depth)])
    self.norm_out = layer_norm(d, **kw)
    self.head = DiffusionHead(c, d, cfg.head.width, cfg.head.depth, **kw)

  def normalize(self, motion):
    return (motion - self.mean[...]) / self.std[...]

  def denormalize(self, x):
    return x * self.std[...] + self.mean[...]

  def embed_motion(self, x):
    """Normalised motion [..., C] -> tokens [..., D]."""
    return self.motion_mlp(jax.nn.gelu(self.motion_in(x.astype(self.dtype))))

  def embed_turns(self, mel_user, x_user, mel_agent):
    """Conditioning tokens of C whole turns [B, C, 3, F, D]: user speech, user motion, agent speech.

    mel_*: [B, C·F·r, M] (r mel frames per video frame); x_user: normalised [B, C·F, C_m].
    Audio is encoded turn by turn, so no token sees audio of a later turn.
    """
    b, n, _ = x_user.shape
    f, r = self.frames, self.mel_per_frame
    turns = n // f
    # Both speakers stacked inside each example (batch outermost, so batch shards stay put).
    mel = jnp.stack([mel_user, mel_agent], axis=1).reshape(b * 2 * turns, f * r, -1)
    a = self.audio(mel.astype(self.dtype))
    a = a.reshape(b, 2, turns, f, r, -1).mean(axis=4)   # [B, 2, C, F, D]
    m = self.embed_motion(x_user).reshape(b, turns, f, -1)
    return jnp.stack([a[:, 0], m, a[:, 1]], axis=2)

  def agent_tokens(self, x_agent, known):
    """Agent-motion tokens [B, W, F, D]: the motion x_agent [B, W, F, C] where `known`
    [B, W, F], the mask token elsewhere."""
    tok = self.embed_motion(x_agent)
    return jnp.where(known[..., None], tok, self.mask_token[...].astype(tok.dtype))

  def token_times(self, turns: int):
    """Times of a window's tokens [W·G·F] (seconds): slot w, frame f -> w·turn + f/fps."""
    w = jnp.arange(turns, dtype=jnp.float32)[:, None, None] * self.turn_seconds
    f = jnp.arange(self.frames, dtype=jnp.float32)[None, None, :] / self.fps
    return jnp.broadcast_to(w + f, (turns, GROUPS, self.frames)).reshape(-1)

  def __call__(self, cond, agent):
    """Transformer features at the agent-motion tokens: [B, W, F, D].

    cond: [B, W, 3, F, D] from `embed_turns` (window slots w = 0..W-1, oldest first);
    agent: [B, W, F, D] from `agent_tokens`.
    """
    b, w, _, f, d = cond.shape
    h = jnp.concatenate([cond, agent[:, :, None].astype(cond.dtype)], axis=2)  # [B, W, G, F, D]
    pos = self.slot_pos[...].reshape(GROUPS, f, d) + self.turn_pos[...][:w, None, None]
    h = self.norm_in((h + pos.astype(h.dtype)).reshape(b, w * GROUPS * f, d))
    t = jnp.broadcast_to(self.token_times(w), (b, w * GROUPS * f))
    for block in self.blocks:
      h = block(h, t)
    return self.norm_out(h).reshape(b, w, GROUPS, f, d)[:, :, AGENT_MOTION]


# ================================================================================== the system
def _fit(x, n, axis=1):
  """Crops or edge-pads `axis` of x to length n (padding repeats the last frame)."""
  if x.shape[axis] >= n:
    return jax.lax.slice_in_dim(x, 0, n, axis=axis)
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, n - x.shape[axis])
  return jnp.pad(x, widths, mode="edge")


class System(system_lib.System):
  """MAR loss over turn windows, turn-by-turn generation, FLAME 56-d outputs."""

  trainable = audio_lib.TRAINABLE   # everything but a frozen wav2vec2 front end

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.cfg = config.model
    self.facts = pipeline.facts(config.data)

  def data_spec(self) -> system_lib.DataSpec:
    return system_lib.DataSpec(keys=("flame56_self", "flame56_partner")
                               + audio_lib.keys(audio_lib.config_of(self.cfg)))

  def build(self, *, rngs: nnx.Rngs, stats=None) -> Timar:
    return Timar(self.cfg, facts=self.facts, rngs=rngs, stats=stats)

  def fit_stats(self, batches):
    return channel_stats(batches, "flame56_self", self.cfg.channels, self.cfg.std_floor)

  def loss(self, model: Timar, batch, rng, aux=None):
    del aux
    r_mask, r_drop, r_head = jax.random.split(rng, 3)
    f, r = model.frames, model.mel_per_frame
    b, n = batch["flame56_self"].shape[:2]
    turns = n // f
    if turns < 1:
      raise ValueError(f"TIMAR trains on whole {model.turn_seconds}-s turns: windows of "
                       f"{n} frames are shorter than one turn ({f} frames); raise data.clip_frames")
    # History limit by chunking: independent windows of at most max_turns turns.
    w = min(turns, self.cfg.max_turns)
    turns = turns // w * w
    n = turns * f
    x_agent = model.normalize(batch["flame56_self"][:, :n])
    cond = model.embed_turns(_fit(model.front(batch, "partner"), n * r),
                             model.normalize(batch["flame56_partner"][:, :n]),
                             _fit(model.front(batch, "self"), n * r))
    bw = b * turns // w
    cond = cond.reshape(bw, w, 3, f, -1)
    x0 = x_agent.reshape(bw, w, f, -1)
    hidden, ratio = mar_mask(r_mask, (bw, w), f, self.cfg.ratio_min)
    drop = jax.random.bernoulli(r_drop, self.cfg.cond_drop, (bw, w))
    null = model.null_user[...].astype(cond.dtype)
    cond = cond.at[:, :, USER_MOTION].set(
        jnp.where(drop[..., None, None], null, cond[:, :, USER_MOTION]))
    z = model(cond, model.agent_tokens(x0, ~hidden))
    c = x0.shape[-1]
    loss = head_loss(model.head, r_head, z.reshape(bw, w * f, -1), x0.reshape(bw, w * f, c),
                     hidden.reshape(bw, w * f), self.cfg.head.batch_mul)
    return loss, {"x0_mse": loss, "mask_ratio": jnp.mean(ratio)}

  def generate(self, model: Timar, batch, rng, *, history_turns=None, iters=None, steps=None,
               cfg=None, temperature=None, mask_history=None, random_order=None,
               num_frames=None) -> system_lib.Outputs:
    """Agent motion for `batch` (mel_self, mel_partner [B, Ta, M]; flame56_partner [B, T, 56])
    -> Outputs(value=flame56 [B, T, 56], space="flame56"), generated turn by turn.

    history_turns: previous turns in context (0: each turn alone; at most max_turns − 1).
    mask_history: hide the history's agent motion (the reference's evaluation setting, which
    matches training, where >= ratio_min of every turn is hidden); False shows what was generated.
    """
    s = self.cfg.sample
    pick = lambda v, d: d if v is None else v
    hist = int(pick(history_turns, s.history_turns))
    iters, steps = int(pick(iters, s.iters)), int(pick(steps, s.steps))
    scale, temperature = float(pick(cfg, s.cfg)), float(pick(temperature, s.temperature))
    mask_history = bool(pick(mask_history, s.mask_history))
    random_order = bool(pick(random_order, s.random_order))
    if not 0 <= hist < self.cfg.max_turns:
      raise ValueError(f"history_turns={hist}: expected 0 .. max_turns - 1 = "
                       f"{self.cfg.max_turns - 1}")
    user = batch["flame56_partner"]
    b = user.shape[0]
    n = int(pick(num_frames, user.shape[1]))
    f, r, c = model.frames, model.mel_per_frame, self.cfg.channels
    turns = -(-n // f)   # whole turns; the padding past n is cropped at the end
    cond = model.embed_turns(_fit(model.front(batch, "partner"), turns * f * r),
                             model.normalize(_fit(user, turns * f)),
                             _fit(model.front(batch, "self"), turns * f * r))
    w = hist + 1
    # Slots past the current turn are later turns: the turn-causal mask hides them, so padding
    # `hist` turns at the end lets every window be a static-size slice.
    cond = _fit(cond, turns + hist)
    if s.cfg_schedule not in ("linear", "constant"):
      raise ValueError(f"sample.cfg_schedule={s.cfg_schedule!r}: expected 'linear' or 'constant'")
    done = jnp.asarray(unmask_schedule(f, iters))
    # "linear": guidance grows with the fraction of the turn unmasked after the iteration.
    cfg_at = (1.0 + (scale - 1.0) * done[1:] / f if s.cfg_schedule == "linear"
              else jnp.full((iters,), scale))
    r_order, r_noise = jax.random.split(rng)
    ranks = (random_ranks(r_order, (b, turns), f) if random_order
             else jnp.broadcast_to(jnp.arange(f), (b, turns, f)))
    slot = jnp.arange(w)[None, :, None]

    def turn(i, gen):
      start = jnp.maximum(i - hist, 0)
      cur = i - start                      # the current turn's slot in the window
      win_cond = jax.lax.dynamic_slice_in_dim(cond, start, w, axis=1)
      win_x = jax.lax.dynamic_slice_in_dim(gen, start, w, axis=1)
      rank = jax.lax.dynamic_index_in_dim(ranks, i, axis=1, keepdims=False)   # [B, F]
      if scale != 1.0:   # unconditional branch: the current turn's user motion is dropped
        uncond = win_cond.at[:, :, USER_MOTION].set(jnp.where(
            (slot == cur)[..., None], model.null_user[...].astype(win_cond.dtype),
            win_cond[:, :, USER_MOTION]))
        win_cond = jnp.concatenate([win_cond, uncond])

      def step(k, x):
        known = jnp.where(slot < cur, not mask_history, (slot == cur) & (rank < done[k])[:, None])
        xs = jax.lax.dynamic_update_slice_in_dim(win_x, x[:, None], cur, axis=1)
        agent = model.agent_tokens(xs, known)
        if scale != 1.0:
          agent = jnp.concatenate([agent, agent])
        z = jax.lax.dynamic_index_in_dim(model(win_cond, agent), cur, axis=1, keepdims=False)
        key = jax.random.fold_in(jax.random.fold_in(r_noise, i), k)
        z_c, z_u = (z[:b], z[b:]) if scale != 1.0 else (z, None)
        x0 = sample_head(model.head, z_c, key, channels=c, steps=steps, temperature=temperature,
                         z_uncond=z_u, cfg=cfg_at[k])
        new = (rank >= done[k]) & (rank < done[k + 1])
        return jnp.where(new[..., None], x0, x)

      x = jax.lax.fori_loop(0, iters, step, jnp.zeros((b, f, c), jnp.float32))
      return jax.lax.dynamic_update_slice_in_dim(gen, x[:, None], i, axis=1)

    gen = jax.lax.fori_loop(0, turns, turn, jnp.zeros((b, turns + hist, f, c), jnp.float32))
    value = model.denormalize(gen[:, :turns].reshape(b, turns * f, c)[:, :n])
    return system_lib.Outputs(value=value, space="flame56")

  def decode(self, outputs: system_lib.Outputs, batch) -> np.ndarray:
    """SynthDyad drawing of the avatar (left) and its partner (right): uint8 [B, T, H, 2W, 3]."""
    if outputs.space != "flame56":
      raise ValueError(f"TIMAR decodes space 'flame56', got {outputs.space!r}")
    return render.flame56_frames(self.config, outputs.value, batch)

  def evaluators(self) -> tuple[str, ...]:
    return ("flame56",)
