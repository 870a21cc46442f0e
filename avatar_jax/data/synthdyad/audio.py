"""SynthDyad audio: syllable synthesis, per-participant tracks, background, mixture, envelope.

A syllable (SYNTHDYAD.md §2) is an optional consonant onset (band-passed noise, 30–60 ms) and a
vowel: a jittered glottal pulse train at F0 through glottal-tilt + lip-radiation filters and three formant
resonators (set by the vowel and the speaker's formant scale), under a raised-cosine (Hann)
envelope. F0 declines over the phrase, rises over the final syllable of a question and is bumped
on accented syllables. Every vowel is normalised to a fixed RMS (times a per-vowel intensity and
an accent gain) so that loudness, and hence jaw opening, is a property of the script, not of the
filter gains.

`envelope` is the one amplitude-envelope definition of the project: the generator drives jaw_open
with it and the lip-sync metrics use it as the "own-audio envelope".
"""
from __future__ import annotations

import numpy as np
from scipy import signal

from avatar_jax.data.synthdyad import identity as identity_lib
from avatar_jax.data.synthdyad import script as script_lib

ENVELOPE_WINDOW_S = 0.04  # the 40 ms smoothing of the jaw rule
SPEECH_RMS = 0.05  # vowel RMS before its Hann envelope
VOWEL_INTENSITY = {"a": 1.0, "e": 0.9, "i": 0.75, "o": 0.95, "u": 0.7}
ACCENT_GAIN = 1.35
CONSONANT_GAIN = 0.3
BACKCHANNEL_GAIN = 0.3
LAUGH_GAIN = 0.8
# Formant frequencies (Hz) of an average adult voice; multiplied by the identity's formant scale.
FORMANTS = {
    "a": (730.0, 1090.0, 2440.0),
    "e": (530.0, 1840.0, 2480.0),
    "i": (270.0, 2290.0, 3010.0),
    "o": (570.0, 840.0, 2410.0),
    "u": (300.0, 870.0, 2240.0),
}
BANDWIDTHS = (80.0, 100.0, 140.0)
NASAL_FORMANTS = ((250.0, 80.0), (1100.0, 200.0))  # the "mm" murmur
CONSONANT_BANDS = (1500.0, 2500.0, 4000.0, 5500.0)
JITTER = 0.015  # relative std of the glottal period
SHIMMER = 0.06  # relative std of the pulse amplitude
ASPIRATION = 0.03  # breath noise mixed into the voiced source
F0_DECLINATION = (1.12, 0.88)  # F0 multiplier at phrase start / end
ACCENT_F0_BUMP = 0.15
QUESTION_F0_RISE = 0.5


def envelope(wave: np.ndarray, sample_rate: int, fps: int,
             num_frames: int | None = None) -> np.ndarray:
  """Amplitude envelope per video frame: [S] -> [T] float32.

  envelope[t] is the RMS of `wave` over a 40 ms window centred on the frame time t / fps (samples
  outside the clip count as silence). T defaults to round(S * fps / sample_rate).
  """
  wave = np.asarray(wave)
  if wave.ndim != 1:
    raise ValueError(f"envelope expects a mono waveform [S], found shape {wave.shape}.")
  if num_frames is None:
    num_frames = int(round(wave.shape[0] * fps / sample_rate))
  half = int(round(ENVELOPE_WINDOW_S * sample_rate / 2))
  cum = np.concatenate([[0.0], np.cumsum(np.square(wave, dtype=np.float64))])
  centres = np.round(np.arange(num_frames) * (sample_rate / fps)).astype(np.int64)
  lo = np.clip(centres - half, 0, wave.shape[0])
  hi = np.clip(centres + half, 0, wave.shape[0])
  energy = np.maximum(cum[hi] - cum[lo], 0.0)
  return np.sqrt(energy / (2 * half)).astype(np.float32)


def _resonator(freq: float, bw: float, sr: int):
  """Klatt two-pole resonator (unit gain at DC): (b, a)."""
  r = np.exp(-np.pi * bw / sr)
  c1 = 2 * r * np.cos(2 * np.pi * freq / sr)
  c2 = -r * r
  return np.array([1.0 - c1 - c2]), np.array([1.0, -c1, -c2])


def _cascade(pairs):
  b, a = np.array([1.0]), np.array([1.0])
  for bi, ai in pairs:
    b, a = np.convolve(b, bi), np.convolve(a, ai)
  return b, a


def _glottal_source(rng, f0: np.ndarray, sr: int) -> np.ndarray:
  """Pulse train with jitter + shimmer at per-sample F0 [n] (Hz), plus aspiration noise."""
  n = f0.shape[0]
  phase = rng.uniform() + np.cumsum(f0 / sr)
  idx = np.flatnonzero(np.diff(np.floor(phase), prepend=np.floor(phase[0])) > 0)
  period = sr / f0[idx]
  idx = np.clip(np.round(idx + rng.normal(0, JITTER, idx.shape) * period), 0, n - 1).astype(np.int64)
  amps = 1.0 + rng.normal(0, SHIMMER, idx.shape)
  src = np.bincount(idx, weights=amps, minlength=n)
  # Glottal flow tilt (two real poles at 0.9, -12 dB/octave) and lip radiation (a zero at DC,
  # +6 dB/octave): the usual -6 dB/octave source of a source-filter vowel, with no DC.
  src = signal.lfilter([1.0, -1.0], [1.0, -1.8, 0.81], src)
  src /= np.sqrt(np.mean(src ** 2)) + 1e-12
  return src + ASPIRATION * rng.standard_normal(n)


def _normalise(x: np.ndarray, rms: float) -> np.ndarray:
  return x * (rms / (np.sqrt(np.mean(x ** 2)) + 1e-12))


def _hann(n: int) -> np.ndarray:
  return 0.5 - 0.5 * np.cos(2 * np.pi * (np.arange(n) + 0.5) / n)


def _add(track: np.ndarray, start: int, x: np.ndarray) -> None:
  """track[start:start+len(x)] += x, clipped to the track."""
  a, b = max(start, 0), min(start + x.shape[0], track.shape[0])
  if b > a:
    track[a:b] += x[a - start:b - start]


def _phrase_f0(ph: script_lib.Phrase, f0_base: float, t: np.ndarray) -> np.ndarray:
  """F0 (Hz) at times t [n] inside phrase ph: declination, accent bumps, question rise."""
  speech_end = ph.syllables[-1].end
  prog = np.clip((t - ph.start) / max(speech_end - ph.start, 1e-3), 0, 1)
  f0 = F0_DECLINATION[0] + (F0_DECLINATION[1] - F0_DECLINATION[0]) * prog
  for syl in ph.syllables:
    if syl.accent:
      mid, width = 0.5 * (syl.start + syl.end), 0.35 * (syl.end - syl.start)
      f0 = f0 + ACCENT_F0_BUMP * np.exp(-0.5 * ((t - mid) / width) ** 2)
  if ph.question:
    last = ph.syllables[-1]
    u = np.clip((t - last.start) / (last.end - last.start), 0, 1)
    f0 = f0 * (1.0 + QUESTION_F0_RISE * u ** 2)
  return f0_base * f0


def _syllable(rng, syl: script_lib.Syllable, ph: script_lib.Phrase, ident: identity_lib.Identity,
              sr: int) -> tuple[int, np.ndarray]:
  start = int(round(syl.start * sr))
  n = max(int(round(syl.end * sr)) - start, 8)
  out = np.zeros(n)
  n_on = min(int(round(syl.onset_s * sr)), n // 2)
  gain = VOWEL_INTENSITY[syl.vowel] * (ACCENT_GAIN if syl.accent else 1.0)
  if n_on > 0:
    fc = CONSONANT_BANDS[int(rng.integers(len(CONSONANT_BANDS)))]
    b, a = _resonator(fc, 0.6 * fc, sr)
    noise = signal.lfilter(b, a, rng.standard_normal(n_on))
    out[:n_on] = _normalise(noise, CONSONANT_GAIN * SPEECH_RMS) * _hann(n_on)
  nv = n - n_on
  t = (start + n_on + np.arange(nv)) / sr
  src = _glottal_source(rng, _phrase_f0(ph, ident.f0_base, t), sr)
  fs = ident.formant_scale
  b, a = _cascade([_resonator(f * fs, bw, sr) for f, bw in zip(FORMANTS[syl.vowel], BANDWIDTHS)])
  vowel = signal.lfilter(b, a, src)
  out[n_on:] = _normalise(vowel, gain * SPEECH_RMS) * _hann(nv)
  return start, out


def _laughter(rng, ph: script_lib.Phrase, ident: identity_lib.Identity, sr: int):
  """Breathy bursts: mostly noise, some voicing at a raised F0, through an open 'a'."""
  start_s, _ = ph.laughter
  fs = ident.formant_scale
  b, a = _cascade([_resonator(f * fs, 2 * bw, sr) for f, bw in zip(FORMANTS["a"], BANDWIDTHS)])
  pieces = []
  for k in range(ph.laugh_bursts):
    s = start_s + k / ph.laugh_rate
    n = int(round(0.55 / ph.laugh_rate * sr))
    f0 = np.full(n, 1.4 * ident.f0_base)
    src = 0.4 * _glottal_source(rng, f0, sr) + rng.standard_normal(n)
    burst = _normalise(signal.lfilter(b, a, src), LAUGH_GAIN * SPEECH_RMS) * _hann(n)
    pieces.append((int(round(s * sr)), burst))
  return pieces


def _backchannel(rng, bc: script_lib.Backchannel, ident: identity_lib.Identity, sr: int):
  start = int(round(bc.start * sr))
  n = max(int(round(bc.end * sr)) - start, 8)
  f0 = ident.f0_base * np.linspace(1.0, 0.9, n)
  src = _glottal_source(rng, f0, sr)
  b, a = _cascade([_resonator(f * ident.formant_scale, bw, sr) for f, bw in NASAL_FORMANTS])
  return start, _normalise(signal.lfilter(b, a, src), BACKCHANNEL_GAIN * SPEECH_RMS) * _hann(n)


def synthesize_track(rng: np.random.Generator, script: script_lib.Script, who: int,
                     ident: identity_lib.Identity, num_samples: int, sample_rate: int) -> np.ndarray:
  """The clean voice track of participant `who`: [S] float32, silent where they do not speak."""
  track = np.zeros(num_samples)
  limit = num_samples / sample_rate
  for ph in script.phrases_of(who):
    if ph.start >= limit:
      continue
    for syl in ph.syllables:
      if syl.start < limit:
        _add(track, *_syllable(rng, syl, ph, ident, sample_rate))
    if ph.laughter is not None and ph.laughter[0] < limit:
      for start, burst in _laughter(rng, ph, ident, sample_rate):
        _add(track, start, burst)
  for bc in script.backchannels:
    if bc.who == who and bc.start < limit:
      _add(track, *_backchannel(rng, bc, ident, sample_rate))
  return track.astype(np.float32)


def synthesize_background(rng: np.random.Generator, num_samples: int, sample_rate: int) -> np.ndarray:
  """Unit-RMS background: coloured noise or a tonal bed (slowly modulated partials + hiss)."""
  n = num_samples
  if n == 0:
    return np.zeros(0, np.float32)
  t = np.arange(n) / sample_rate
  if rng.random() < 0.5:
    pole = rng.uniform(0.5, 0.98)
    bg = signal.lfilter([1.0], [1.0, -pole], rng.standard_normal(n))
  else:
    bg = 0.2 * rng.standard_normal(n)
    for _ in range(int(rng.integers(2, 5))):
      f, fm = rng.uniform(80, 600), rng.uniform(0.1, 0.5)
      am = 1.0 + 0.5 * np.sin(2 * np.pi * fm * t + rng.uniform(0, 2 * np.pi))
      bg = bg + am * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
  return _normalise(bg, 1.0).astype(np.float32)


def mix(speech: list[np.ndarray], background_unit: np.ndarray, snr_db: float):
  """Scales the unit background to `snr_db` below the summed speech; returns (background, mixture).

  Speech power is the mean power of the summed tracks over the clip (a silent clip uses the
  nominal speech level). The mixture is clipped to [-1, 1], which the levels make rare.
  """
  total = np.sum(speech, axis=0, dtype=np.float64)
  power = float(np.mean(total ** 2)) if total.size else 0.0
  if power <= 0.0:
    power = SPEECH_RMS ** 2
  background = (background_unit * np.sqrt(power / 10 ** (snr_db / 10))).astype(np.float32)
  mixture = np.clip(total + background, -1.0, 1.0).astype(np.float32)
  return background, mixture
