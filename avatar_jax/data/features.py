"""Audio features in NumPy: log-mel spectrograms, their frame times, resampling.

The default front end (`MelConfig()`) is the one every model in the project reads:

* 16 kHz mono input, 25 ms Hann window (400 samples) zero-padded to a 512-point FFT,
* hop 320 samples -> **50 frames/s, exactly two mel frames per 25 fps video frame**,
* power spectrum through 80 triangular filters on the **Slaney** mel scale (linear below 1 kHz,
  logarithmic above) with Slaney area normalisation, 0 Hz to 8 kHz (the librosa / Whisper
  convention),
* `log(mel + 1e-5)` (natural log).

Frame placement. Mel frame `k` summarises the hop interval `[k*hop, (k+1)*hop)`: its window is
centred on sample `k*hop + hop//2`, so its time is `(k + 0.5) / frame_rate` seconds
(`mel_times`). With this choice a signal of `S` samples has exactly `S // hop` frames, video frame
`j` (covering `[j/fps, (j+1)/fps)`) owns mel frames `[j*r, (j+1)*r)` with `r = frame_rate/fps`, and
slicing the mel of a whole clip gives the same frames as computing it on the window (up to the
`n_fft/2` samples of context at the window edges). Samples outside the signal are zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import scipy.fft
import scipy.signal


@dataclasses.dataclass(frozen=True)
class MelConfig:
  """Log-mel front end. Defaults: 16 kHz, 80 Slaney mels, hop 320 (50 frames/s)."""

  sample_rate: int = 16000
  n_mels: int = 80
  hop_length: int = 320
  win_length: int = 400
  n_fft: int = 512
  fmin: float = 0.0
  fmax: float | None = None  # None: sample_rate / 2
  log_floor: float = 1e-5

  @property
  def frame_rate(self) -> float:
    """Mel frames per second."""
    return self.sample_rate / self.hop_length

  def validate(self) -> None:
    if self.win_length > self.n_fft:
      raise ValueError(
          f"MelConfig.win_length={self.win_length} must be <= n_fft={self.n_fft}."
      )
    if self.hop_length <= 0 or self.n_mels <= 0 or self.sample_rate <= 0:
      raise ValueError(f"MelConfig needs positive sizes, got {self}.")
    fmax = self.sample_rate / 2 if self.fmax is None else self.fmax
    if not 0.0 <= self.fmin < fmax <= self.sample_rate / 2:
      raise ValueError(
          f"MelConfig needs 0 <= fmin < fmax <= sample_rate/2, got fmin={self.fmin}, "
          f"fmax={fmax}, sample_rate={self.sample_rate}."
      )


def mel_config_from(cfg) -> MelConfig:
  """Builds a `MelConfig` from any mapping / ConfigDict with a subset of its field names."""
  if isinstance(cfg, MelConfig):
    return cfg
  names = {f.name for f in dataclasses.fields(MelConfig)}
  items = dict(cfg.items()) if hasattr(cfg, "items") else dict(cfg)
  unknown = set(items) - names
  if unknown:
    raise ValueError(f"Unknown mel feature fields {sorted(unknown)}; known: {sorted(names)}.")
  return MelConfig(**items)


# ----------------------------------------------------------------------------- mel scale (Slaney)
_F_SP = 200.0 / 3  # Hz per mel in the linear region
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
  """Slaney mel scale: linear below 1 kHz, logarithmic above."""
  hz = np.asarray(hz, dtype=np.float64)
  lin = hz / _F_SP
  log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
  return np.where(hz >= _MIN_LOG_HZ, log, lin)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
  """Inverse of `hz_to_mel`."""
  mel = np.asarray(mel, dtype=np.float64)
  lin = mel * _F_SP
  log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
  return np.where(mel >= _MIN_LOG_MEL, log, lin)


@functools.lru_cache(maxsize=16)
def mel_filterbank(
    sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0, fmax: float | None = None
) -> np.ndarray:
  """Slaney-normalised triangular filters, `[n_fft // 2 + 1, n_mels]` float64 (read-only)."""
  fmax = sample_rate / 2 if fmax is None else fmax
  fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
  edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
  lower, centre, upper = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
  rising = (fft_hz[:, None] - lower) / (centre - lower)
  falling = (upper - fft_hz[:, None]) / (upper - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  # Slaney normalisation: each filter has unit area in Hz, so wide high filters are not louder.
  weights *= 2.0 / (upper - lower)
  weights.setflags(write=False)
  return weights


@functools.lru_cache(maxsize=16)
def _window(win_length: int, n_fft: int) -> np.ndarray:
  # Periodic Hann (the STFT convention), centred in the FFT frame.
  w = scipy.signal.get_window("hann", win_length, fftbins=True)
  left = (n_fft - win_length) // 2
  out = np.zeros(n_fft)
  out[left:left + win_length] = w
  out.setflags(write=False)
  return out


def num_frames(num_samples: int, cfg: MelConfig = MelConfig()) -> int:
  """Number of mel frames for a signal of `num_samples` samples: `num_samples // hop`."""
  return num_samples // cfg.hop_length


def _frames(x: np.ndarray, cfg: MelConfig) -> np.ndarray:
  """Framed signal `[..., n, n_fft]`; frame k is centred on sample k*hop + hop/2."""
  n = num_frames(x.shape[-1], cfg)
  half = cfg.n_fft // 2
  centre0 = cfg.hop_length // 2
  left = max(0, half - centre0)
  right = max(0, (n - 1) * cfg.hop_length + centre0 + (cfg.n_fft - half) - x.shape[-1])
  pad = [(0, 0)] * (x.ndim - 1) + [(left, right)]
  xp = np.pad(x, pad)
  start = centre0 - half + left  # index of frame 0's first sample in xp
  view = np.lib.stride_tricks.sliding_window_view(xp, cfg.n_fft, axis=-1)
  return view[..., start:start + n * cfg.hop_length:cfg.hop_length, :]


def log_mel(audio: np.ndarray, cfg: MelConfig = MelConfig()) -> np.ndarray:
  """Log-mel spectrogram.

  Args:
    audio: `[..., S]` float waveform at `cfg.sample_rate` (any leading batch dims).
    cfg: front-end parameters.

  Returns:
    `[..., S // hop, n_mels]` float32, `log(mel_power + log_floor)`.
  """
  cfg.validate()
  audio = np.asarray(audio)
  if audio.ndim < 1 or not np.issubdtype(audio.dtype, np.floating):
    raise ValueError(
        f"log_mel expects a float waveform [..., S]; got dtype {audio.dtype}, shape {audio.shape}."
    )
  if num_frames(audio.shape[-1], cfg) == 0:
    return np.zeros(audio.shape[:-1] + (0, cfg.n_mels), np.float32)
  # float32 end to end: scipy's FFT keeps complex64 (numpy's upcasts to complex128), and a matmul
  # of two float32 operands goes to BLAS (mixed dtypes fall back to a slow loop); ~10x faster.
  return _log_mel_of_frames(_frames(audio.astype(np.float32), cfg), cfg)


def log_mel_range(audio: np.ndarray, offset: int, first: int, count: int,
                  cfg: MelConfig = MelConfig()) -> np.ndarray:
  """Mel frames `first .. first + count - 1` of a longer signal of which `audio` [S] holds the
  samples from index `offset` on (zeros elsewhere, as `log_mel` pads): `[count, n_mels]`, equal
  to `log_mel(whole)[first:first + count]` for a signal that starts at sample 0. What a stream
  computes from a buffer that keeps only recent samples."""
  cfg.validate()
  half, c0, hop = cfg.n_fft // 2, cfg.hop_length // 2, cfg.hop_length
  lo = first * hop + c0 - half                      # first sample of frame `first`
  hi = (first + count - 1) * hop + c0 + (cfg.n_fft - half)
  x = np.zeros(hi - lo, np.float32)
  a, b = max(lo, offset), min(hi, offset + len(audio))
  if b > a:
    x[a - lo:b - lo] = audio[a - offset:b - offset]
  frames = np.lib.stride_tricks.sliding_window_view(x, cfg.n_fft)[::hop][:count]
  return _log_mel_of_frames(frames, cfg)


def _log_mel_of_frames(frames: np.ndarray, cfg: MelConfig) -> np.ndarray:
  """[..., n, n_fft] framed samples -> [..., n, n_mels] log-mel."""
  frames = frames * _window(cfg.win_length, cfg.n_fft).astype(np.float32)
  spec = scipy.fft.rfft(frames, n=cfg.n_fft, axis=-1)
  power = np.square(spec.real) + np.square(spec.imag)
  fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.fmin, cfg.fmax)
  mel = power @ fb.astype(np.float32)
  return np.log(mel + np.float32(cfg.log_floor), dtype=np.float32)


def mel_times(n: int, rate: float = 50.0) -> np.ndarray:
  """Times in seconds `[n]` of the centres of mel frames `0..n-1` at `rate` frames/s."""
  return ((np.arange(n, dtype=np.float64) + 0.5) / rate)


def mel_frames_per_video_frame(cfg: MelConfig, fps: float) -> int:
  """Integer number of mel frames per video frame; raises if the rates do not divide evenly."""
  r = cfg.frame_rate / fps
  if abs(r - round(r)) > 1e-9 or round(r) < 1:
    raise ValueError(
        f"Mel frame rate {cfg.frame_rate} Hz (sample_rate {cfg.sample_rate} / hop "
        f"{cfg.hop_length}) must be an integer multiple of the video fps {fps}."
    )
  return int(round(r))


def resample(audio: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
  """Polyphase resampling along the last axis (`scipy.signal.resample_poly`), float32 out.

  Output length is `ceil(S * target_sr / orig_sr)`.
  """
  if orig_sr <= 0 or target_sr <= 0:
    raise ValueError(f"Sample rates must be positive, got {orig_sr} -> {target_sr}.")
  orig_sr, target_sr = int(orig_sr), int(target_sr)
  audio = np.asarray(audio, dtype=np.float32)
  if orig_sr == target_sr:
    return audio
  g = math.gcd(orig_sr, target_sr)
  return scipy.signal.resample_poly(
      audio, target_sr // g, orig_sr // g, axis=-1
  ).astype(np.float32)
