"""Real-time full-duplex streaming of a block-causal motion model (models/motion/forcing.py).

    agent = DuplexAgent.from_workdir("runs/forcing")
    for a, b in chunks:                       # any chunk sizes, total length unknown
      frames = agent.push(a, b)               # uint8 [n, H, W, 3], n = 0, 10, 20, ... frames
    frames = agent.close()                    # the last (partial) block

    python -m avatar_jax.stream --workdir runs/forcing --self-audio a.wav --partner-audio b.wav \\
        [--chunk_ms 40] [--no-realtime] --out out.mp4

The agent holds a few seconds of audio and one ring KV cache per layer, so memory is constant
however long the conversation runs. A block of `block` frames is generated as soon as the
audio it may see has arrived (its last frame plus `lookahead` frames); the frames it returns
equal the offline `System.generate` of the same audio (tests/test_stream.py).

Latency (the log written next to --out): for each block, wall time from the arrival of the
audio sample that made it ready to the block's frames being out, plus the look-ahead the model
waits for by design (`lookahead` frames + one mel window half, reported separately).
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from avatar_jax.data import features

_RECEPTIVE = 14   # mel tokens of past the causal audio encoder sees (kernel 3, dilations 1, 2, 4)


class DuplexAgent:
  """Streams motion for the avatar from its own voice and the user's (partner's) voice."""

  def __init__(self, system, model, config, *, rng=None, steps=None, guidance=None,
               identity: int | None = None):
    from avatar_jax import render  # pylint: disable=g-import-not-at-top
    cfg = system.cfg
    if not hasattr(system, "generate_block"):
      raise TypeError(f"{type(system).__module__}.System does not stream (no generate_block); "
                      "train a block-causal model, e.g. configs/forcing.py")
    self.system, self.model, self.config = system, model, config
    self.facts = system.facts
    self.mel_cfg = features.mel_config_from(config.data.features)
    self.hop = self.mel_cfg.hop_length
    self.block, self.lookahead = int(cfg.block), int(cfg.lookahead)
    self.r = int(round(self.facts["mel_rate"] / self.facts["fps"]))
    self.spf = self.facts["sample_rate"] // self.facts["fps"]
    self.before, self.win = system.audio_window()
    self.scales = tuple(cfg.sample.guidance if guidance is None else guidance)
    self.steps = int(steps or cfg.sample.steps)
    self.rng = jax.random.key(0) if rng is None else rng
    drops = system.branches(self.scales)
    self.g = len(drops)
    self.da = jnp.asarray([d[0] for d in drops])
    self.du = jnp.asarray([d[1] for d in drops])
    ids = render.default_identities()
    self.identity = render.identity(config, ids[0] if identity is None else identity)
    self._step = jax.jit(self._block_fn)
    self.reset()

  @classmethod
  def from_workdir(cls, workdir: str, **kw) -> "DuplexAgent":
    from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
    system, model, config, _ = trainer.restore_model(workdir)
    return cls(system, model, config, **kw)

  def reset(self):
    """A new conversation: empty buffers and caches."""
    self.audio = {"self": np.zeros(0, np.float32), "partner": np.zeros(0, np.float32)}
    self.offset = 0                       # absolute index of audio[...][0]
    self.received = {"self": 0, "partner": 0}
    self.motion_partner = np.zeros((0, self.system.cfg.channels), np.float32)
    self._motion_offset = 0               # absolute frame of motion_partner[0]
    self.caches = self.model.init_caches(self.g)
    self.next_block = 0
    self.closed = False
    self.latency: list[dict] = []
    self.motion: list[np.ndarray] = []

  # --------------------------------------------------------------------------------- public
  def push(self, self_audio, partner_audio, partner_motion=None) -> np.ndarray:
    """Appends audio chunks (float [n] at the run's sample rate; either may be empty) and, for
    models that condition on it, the partner's motion frames [m, C]; returns the frames of every
    block that became ready, uint8 [k·block, H, W, 3]."""
    arrived = time.perf_counter()
    for name, chunk in (("self", self_audio), ("partner", partner_audio)):
      chunk = np.asarray(chunk, np.float32).reshape(-1)
      self.audio[name] = np.concatenate([self.audio[name], chunk])
      self.received[name] += len(chunk)
    if partner_motion is not None:
      self.motion_partner = np.concatenate(
          [self.motion_partner, np.asarray(partner_motion, np.float32)])
    return self._run(arrived)

  def close(self) -> np.ndarray:
    """End of the conversation: generates the blocks left (the audio ends in silence, as the
    offline model's zero padding) and returns their frames."""
    self.closed = True
    return self._run(time.perf_counter())

  @property
  def frames_out(self) -> int:
    return self.next_block * self.block

  def memory_bytes(self) -> int:
    """Bytes held by the agent's buffers and caches (constant in the stream's length)."""
    caches = sum(x.nbytes for c in self.caches for x in (c.k, c.v, c.t, c.seg))
    return caches + sum(a.nbytes for a in self.audio.values()) + self.motion_partner.nbytes

  # ------------------------------------------------------------------------------- internals
  def _total_frames(self) -> int | None:
    """Frames of the conversation once closed (the longer voice), else None."""
    if not self.closed:
      return None
    return int(round((max(self.received.values()) // self.hop) / self.r))   # as generate

  def _end_token(self) -> int:
    """Mel tokens of the conversation once closed (as the offline log-mel), else no limit."""
    if not self.closed:
      return np.iinfo(np.int32).max
    return max(self.received.values()) // self.hop

  def _ready(self, k: int) -> bool:
    f_end = (k + 1) * self.block
    total = self._total_frames()
    if total is not None:
      return k * self.block < total
    # Mel tokens the block's last frame may see, and the samples those tokens need.
    tokens = self.r * (f_end + self.lookahead)
    need = (tokens - 1) * self.hop + self.hop // 2 + (self.mel_cfg.n_fft - self.mel_cfg.n_fft // 2)
    motion_ok = (not self.system.cfg.use_partner_motion or
                 len(self.motion_partner) + self._motion_offset >= k * self.block)
    return min(self.received.values()) >= need and motion_ok

  def _run(self, arrived: float) -> np.ndarray:
    out = []
    while self._ready(self.next_block):
      t0 = time.perf_counter()
      x = self._generate(self.next_block)
      frames = self._render(x)
      done = time.perf_counter()
      self.latency.append(dict(block=self.next_block, compute_ms=1e3 * (done - t0),
                               since_audio_ms=1e3 * (done - arrived)))
      out.append(frames)
      self.next_block += 1
      self._trim()
    if not out:
      return np.zeros((0,) + self._frame_shape(), np.uint8)
    frames = np.concatenate(out)
    total = self._total_frames()
    if total is not None:   # the last block may run past the end
      keep = max(0, total - (self.frames_out - len(frames)))
      frames = frames[:keep]
    return frames

  def _frame_shape(self):
    r = int(self.config.data.synthdyad.resolution)
    return (r, r, 3)

  def _mel(self, name: str, first: int, count: int) -> np.ndarray:
    return features.log_mel_range(self.audio[name], self.offset, first, count, self.mel_cfg)

  def _generate(self, k: int) -> np.ndarray:
    f0 = k * self.block
    a0 = f0 * self.r
    first = a0 - self.before
    # The causal encoder needs _RECEPTIVE tokens before the window, or the clip's start (which
    # the offline model sees as its zero padding).
    start = max(0, first - _RECEPTIVE)
    # A fixed count (one compiled step for every block): the causal encoder ignores the extra
    # tokens at the end.
    count = _RECEPTIVE + self.win
    mels = np.stack([self._mel("self", start, count), self._mel("partner", start, count)])
    # The user's motion enters one block late: block k sees frames [f0 - block, f0).
    prev = np.zeros((self.block, self.system.cfg.channels), np.float32)
    if self.system.cfg.use_partner_motion and f0 > 0:
      lo = f0 - self.block - self._motion_offset
      prev = self.motion_partner[lo:lo + self.block]
    x = self._step(self.model, self.caches, jnp.asarray(mels), jnp.asarray(start),
                   jnp.asarray(first), jnp.asarray(f0), jnp.asarray(prev),
                   jnp.asarray(self._end_token()), jax.random.fold_in(self.rng, k))
    x, self.caches = x
    m = np.asarray(self.model.denormalize(x))[0]
    self.motion.append(m)
    return m

  def _block_fn(self, model, caches, mels, start, first, f0, prev_motion, end_token, key):
    """One block under jit: encode the audio window, then `System.generate_block`."""
    system = self.system
    g = self.g
    mel_s = jnp.broadcast_to(mels[0][None], (g,) + mels.shape[1:])
    mel_p = jnp.broadcast_to(mels[1][None], (g,) + mels.shape[1:])
    a_s, a_p = model.encode_audio(mel_s, mel_p, self.da, self.du)
    # Tokens [start, ...) -> the window [first, first + win) (zeros before the clip's start).
    lead = first - start
    pad = lambda a: jnp.pad(a, ((0, 0), (self.before + _RECEPTIVE, 0), (0, 0)))
    sl = lambda a: jax.lax.dynamic_slice_in_dim(pad(a), lead + self.before + _RECEPTIVE,
                                                self.win, axis=1)
    tok = first + jnp.arange(self.win)
    t_a = system.window_times(f0, first, self.win, (tok >= 0) & (tok < end_token))
    t_a = jnp.broadcast_to(t_a, (g, self.win))
    part = None
    if system.cfg.use_partner_motion:   # as ForcingDiT.partner_input: zeros before the start
      mp = jnp.where(f0 > 0, model.normalize(prev_motion), 0.0)
      part = jnp.where(self.du[:, None, None], 0.0, jnp.broadcast_to(mp[None], (g,) + mp.shape))
    x_noise = jax.random.normal(key, (1, self.block, system.cfg.channels))
    return system.generate_block(model, caches, x_noise, (sl(a_s), sl(a_p)), t_a, part,
                                 steps=self.steps, method=system.cfg.sample.method,
                                 scales=self.scales)

  def _trim(self):
    """Drops audio no later block can see (keeps the window and the encoder's context)."""
    f0 = self.next_block * self.block
    first = f0 * self.r - self.before - _RECEPTIVE
    keep_from = max(0, first * self.hop + self.hop // 2 - self.mel_cfg.n_fft // 2)
    if keep_from > self.offset:
      drop = keep_from - self.offset
      for name in self.audio:
        self.audio[name] = self.audio[name][drop:]
      self.offset = keep_from
    keep_motion = f0 - self.block - self._motion_offset   # the previous block stays
    if keep_motion > 0 and len(self.motion_partner) > keep_motion:
      self.motion_partner = self.motion_partner[keep_motion:]
      self._motion_offset += keep_motion

  def _render(self, motion: np.ndarray) -> np.ndarray:
    from avatar_jax.data.synthdyad import render as sd_render  # pylint: disable=g-import-not-at-top
    return sd_render.render(motion, self.identity, int(self.config.data.synthdyad.resolution))


# ============================================================================== command line
def _define_flags():
  global _WORKDIR, _SELF, _PARTNER, _OUT, _CHUNK, _REALTIME, _SEED
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a streaming model.")
  _SELF = flags.DEFINE_string("self-audio", None, "The avatar's own speech.")
  _PARTNER = flags.DEFINE_string("partner-audio", None, "The user's (partner's) speech.")
  _OUT = flags.DEFINE_string("out", None, "Output mp4 (default <workdir>/samples/stream.mp4); "
                             "the latency log goes next to it (.latency.json).")
  _CHUNK = flags.DEFINE_integer("chunk_ms", 40, "Audio pushed per call, milliseconds.")
  _REALTIME = flags.DEFINE_boolean("realtime", True, "Push chunks at their real-time pace.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def replay(agent: DuplexAgent, self_audio: np.ndarray, partner_audio: np.ndarray, *,
           chunk_ms: int = 40, realtime: bool = True) -> tuple[np.ndarray, dict]:
  """Pushes two voices chunk by chunk (padded to equal length), sleeping to keep real time
  when asked; returns (frames, latency summary)."""
  sr = agent.facts["sample_rate"]
  n = max(len(self_audio), len(partner_audio))
  a = np.pad(self_audio, (0, n - len(self_audio)))
  b = np.pad(partner_audio, (0, n - len(partner_audio)))
  step = max(1, int(sr * chunk_ms / 1000))
  frames, t_start = [], time.perf_counter()
  for i in range(0, n, step):
    if realtime:
      due = t_start + i / sr
      time.sleep(max(0.0, due - time.perf_counter()))
    frames.append(agent.push(a[i:i + step], b[i:i + step]))
  frames.append(agent.close())
  lat = agent.latency[:-1] or agent.latency     # the closing block waits for close(), not audio
  design_ms = 1e3 * (agent.lookahead / agent.facts["fps"] +
                     (agent.mel_cfg.n_fft // 2 - agent.hop // 2) / sr)
  ms = np.asarray([x["since_audio_ms"] for x in lat])
  summary = dict(blocks=len(agent.latency), block_frames=agent.block, chunk_ms=chunk_ms,
                 realtime=realtime, compute_ms_median=float(np.median(
                     [x["compute_ms"] for x in lat])),
                 since_audio_ms_median=float(np.median(ms)), since_audio_ms_p95=float(
                     np.percentile(ms, 95)), lookahead_ms=design_ms,
                 end_to_end_ms_median=float(np.median(ms) + design_ms),
                 memory_bytes=agent.memory_bytes())
  return np.concatenate(frames), summary


def main(argv):
  del argv
  from avatar_jax import render  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  agent = DuplexAgent.from_workdir(_WORKDIR.value, rng=jax.random.key(_SEED.value))
  sr = agent.facts["sample_rate"]
  a, b = media.read_audio(_SELF.value, sr), media.read_audio(_PARTNER.value, sr)
  frames, summary = replay(agent, a, b, chunk_ms=_CHUNK.value, realtime=_REALTIME.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "stream.mp4")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  n = max(len(a), len(b))
  render.write(out, frames, agent.facts["fps"], np.pad(a, (0, n - len(a))) + np.pad(b, (0, n - len(b))), sr)
  with open(os.path.splitext(out)[0] + ".latency.json", "w") as f:
    json.dump(dict(summary=summary, blocks=agent.latency), f, indent=1)
  logging.info("latency: %s", summary)
  print(json.dumps(summary))
  print(out)


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir", "self-audio", "partner-audio"])
  app.run(main)


if __name__ == "__main__":
  run()
