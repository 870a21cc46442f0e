"""SynthDyad motion: per-frame coefficients of one participant from the script and their own audio.

The rules are those of SYNTHDYAD.md §3; each channel is a sum/max of its rule terms:

  jaw_open    clip(JAW_GAIN * envelope(own track)[t + 1], 0, 1): the 40 ms RMS envelope
              (audio.envelope) one frame ahead, so the jaw leads the sound by one frame.
  lip_round   vowel target (u, o: +0.8; i, e: -0.6; a: 0; silence: 0) through a one-pole lag,
              tau = 60 ms (coarticulation), run on an 8x-frame-rate grid.
  smile       rise over 300 ms (raised cosine), hold, decay, after partner laughter.
  blink       sin² closure over 150 ms per blink.
  brow_raise  rise 120 ms / hold / decay 300 ms, starting 0.3–0.6 s after a partner question ends.
  gaze_x      looks away (±0.5) for the first 0.5–1 s of each own turn (80 ms lag), + OU noise.
  gaze_y      OU noise.
  head_pitch  OU noise − speech beats (Gaussian dips, sigma 50 ms, centred within ±80 ms of each
              accented syllable onset) − nods (A·sin(2πf·τ)·exp(−0.5·f·τ), τ ∈ [0, cycles/f]).
              Sign convention: positive pitch = head up, so dips and the first nod swing are down.
  head_yaw,   OU noise.
  head_roll
"""
from __future__ import annotations

import numpy as np
from scipy import signal

from avatar_jax.data.synthdyad import audio as audio_lib
from avatar_jax.data.synthdyad import config as config_lib
from avatar_jax.data.synthdyad import script as script_lib

MOTION_CHANNELS = ("jaw_open", "lip_round", "smile", "blink", "brow_raise", "gaze_x", "gaze_y",
                   "head_pitch", "head_yaw", "head_roll")
CHANNEL_INDEX = {name: i for i, name in enumerate(MOTION_CHANNELS)}
JAW_GAIN = 16.0  # envelope -> jaw_open: median ~0.3 over speaking frames, accented vowels ~0.8-1
JAW_LEAD_FRAMES = 1
LIP_ROUND_TARGET = {"u": 0.8, "o": 0.8, "i": -0.6, "e": -0.6, "a": 0.0}
LIP_ROUND_TAU_S = 0.06
GAZE_TAU_S = 0.08
FINE = 8  # fine grid = FINE x frame rate, for the lag filters
BEAT_SIGMA_S = 0.05
OU_THETA = 0.7  # 1/s
OU_STD = {"gaze_x": 0.05, "gaze_y": 0.04, "head_pitch": 0.02, "head_yaw": 0.03, "head_roll": 0.015}


def _ou(rng, n: int, dt: float, std: float) -> np.ndarray:
  """Stationary Ornstein–Uhlenbeck path sampled every dt: [n]."""
  a = np.exp(-OU_THETA * dt)
  eps = rng.standard_normal(n) * std
  eps[1:] *= np.sqrt(1 - a * a)
  return signal.lfilter([1.0], [1.0, -a], eps)


def _one_pole(x: np.ndarray, dt: float, tau: float) -> np.ndarray:
  a = np.exp(-dt / tau)
  return signal.lfilter([1.0 - a], [1.0, -a], x, zi=[a * x[0]] if x.size else None)[0]


def _ramp(u):
  """Raised-cosine 0 -> 1 over u in [0, 1]."""
  u = np.clip(u, 0.0, 1.0)
  return 0.5 - 0.5 * np.cos(np.pi * u)


def envelope_value(env: script_lib.Envelope, t: np.ndarray) -> np.ndarray:
  """Rise (raised cosine) – hold – decay profile of a smile / brow reaction at times t."""
  up = _ramp((t - env.start) / env.rise)
  down = 1.0 - _ramp((t - env.start - env.rise - env.hold) / env.decay)
  return env.amplitude * up * down


def nod_value(nod: script_lib.Nod, t: np.ndarray) -> np.ndarray:
  """Damped head_pitch oscillation (rad, starting downward) of a nod at times t."""
  tau = t - nod.start
  inside = (tau >= 0) & (tau <= nod.cycles / nod.freq)
  return np.where(inside, -nod.amplitude * np.sin(2 * np.pi * nod.freq * tau)
                  * np.exp(-0.5 * nod.freq * tau), 0.0)


def jaw_from_envelope(env_plus_one: np.ndarray) -> np.ndarray:
  """jaw_open [T] from the own-audio envelope over T + 1 frames (one-frame lead)."""
  return np.clip(JAW_GAIN * env_plus_one[JAW_LEAD_FRAMES:], 0.0, 1.0)


def make_motion(rng: np.random.Generator, script: script_lib.Script, who: int, track: np.ndarray,
                cfg: config_lib.SynthDyadConfig) -> np.ndarray:
  """Motion of participant `who`: [T, C] float32, C = len(MOTION_CHANNELS)."""
  n_frames, fps = cfg.num_frames, cfg.fps
  t = np.arange(n_frames) / fps
  fine_dt = 1.0 / (fps * FINE)
  tf = np.arange(n_frames * FINE) / (fps * FINE)
  m = np.zeros((n_frames, len(MOTION_CHANNELS)))
  c = CHANNEL_INDEX

  env = audio_lib.envelope(track, cfg.sample_rate, fps, num_frames=n_frames + JAW_LEAD_FRAMES)
  m[:, c["jaw_open"]] = jaw_from_envelope(env)

  def fine_index(seconds):
    return int(np.clip(np.ceil(seconds / fine_dt - 1e-9), 0, tf.size))

  own = script.phrases_of(who)
  target = np.zeros(tf.size)
  for ph in own:
    for syl in ph.syllables:
      target[fine_index(syl.start + syl.onset_s):fine_index(syl.end)] = LIP_ROUND_TARGET[syl.vowel]
  if tf.size:
    m[:, c["lip_round"]] = _one_pole(target, fine_dt, LIP_ROUND_TAU_S)[::FINE]

  gaze = np.zeros(tf.size)
  for turn in script.turns:
    if turn.speaker == who:
      gaze[fine_index(turn.start):fine_index(turn.start + turn.gaze_away_s)] = (
          script_lib.GAZE_AWAY_X * turn.gaze_side)
  if tf.size:
    m[:, c["gaze_x"]] = _one_pole(gaze, fine_dt, GAZE_TAU_S)[::FINE]

  for env_ in script.smiles:
    if env_.who == who:
      m[:, c["smile"]] = np.maximum(m[:, c["smile"]], envelope_value(env_, t))
  for env_ in script.brows:
    if env_.who == who:
      m[:, c["brow_raise"]] = np.maximum(m[:, c["brow_raise"]], envelope_value(env_, t))
  for b in script.blinks:
    if b.who == who:
      u = (t - b.start) / (b.end - b.start)
      m[:, c["blink"]] = np.maximum(m[:, c["blink"]],
                                    np.where((u >= 0) & (u <= 1), np.sin(np.pi * u) ** 2, 0.0))

  pitch = np.zeros(n_frames)
  for ph in own:
    for syl in ph.syllables:
      if syl.accent:
        pitch -= syl.beat_depth * np.exp(-0.5 * ((t - syl.beat_time) / BEAT_SIGMA_S) ** 2)
  for nod in script.nods:
    if nod.who == who:
      pitch += nod_value(nod, t)
  m[:, c["head_pitch"]] = pitch

  for name, std in OU_STD.items():
    m[:, c[name]] += _ou(rng, n_frames, 1.0 / fps, std)
  m[:, c["gaze_x"]] = np.clip(m[:, c["gaze_x"]], -1.0, 1.0)
  m[:, c["gaze_y"]] = np.clip(m[:, c["gaze_y"]], -1.0, 1.0)
  m[:, c["lip_round"]] = np.clip(m[:, c["lip_round"]], -1.0, 1.0)
  return m.astype(np.float32)


def speaking_mask(script: script_lib.Script, who: int, cfg: config_lib.SynthDyadConfig) -> np.ndarray:
  """[T] bool: frame time t / fps lies inside one of `who`'s phrases or backchannels."""
  t = np.arange(cfg.num_frames) / cfg.fps
  out = np.zeros(t.shape, bool)
  spans = [(p.start, p.end) for p in script.phrases_of(who)]
  spans += [(b.start, b.end) for b in script.backchannels if b.who == who]
  for a, b in spans:
    out |= (t >= a) & (t < b)
  return out
