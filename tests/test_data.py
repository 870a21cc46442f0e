"""Data layer: log-mel features, the Grain pipeline, TFDS builders."""
import math

import numpy as np
import pytest

from avatar_jax.data import features


# ===================================================================================== features
def _reference_log_mel(x: np.ndarray, cfg: features.MelConfig) -> np.ndarray:
  """float64, frame by frame, explicit DFT matrix; independent filterbank (transformers)."""
  from transformers.audio_utils import mel_filter_bank

  fb = mel_filter_bank(
      num_frequency_bins=cfg.n_fft // 2 + 1,
      num_mel_filters=cfg.n_mels,
      min_frequency=cfg.fmin,
      max_frequency=cfg.sample_rate / 2 if cfg.fmax is None else cfg.fmax,
      sampling_rate=cfg.sample_rate,
      norm="slaney",
      mel_scale="slaney",
  )
  x = np.asarray(x, np.float64)
  n = len(x) // cfg.hop_length
  # Periodic Hann of win_length, written out from its formula.
  m = np.arange(cfg.win_length)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * m / cfg.win_length)
  k = np.arange(cfg.n_fft // 2 + 1)
  dft = np.exp(-2j * np.pi * np.outer(np.arange(cfg.win_length), k) / cfg.n_fft)
  out = np.zeros((n, cfg.n_mels))
  for f in range(n):
    # Window centred on the middle of hop interval f (sample f*hop + hop//2).
    first = f * cfg.hop_length + cfg.hop_length // 2 - cfg.win_length // 2
    seg = np.zeros(cfg.win_length)
    for i in range(cfg.win_length):
      j = first + i
      if 0 <= j < len(x):
        seg[i] = x[j]
    # Zero-padding a win_length frame to n_fft around its centre only adds a linear phase, so the
    # power spectrum equals that of the window placed at the start of the FFT frame.
    power = np.abs((seg * hann) @ dft) ** 2
    out[f] = np.log(power @ fb + cfg.log_floor)
  return out


@pytest.mark.parametrize(
    "num_samples, cfg",
    [
        (16000 + 777, features.MelConfig()),
        (5 * 441 + 3, features.MelConfig(sample_rate=22050, n_mels=40, hop_length=441,
                                         win_length=882, n_fft=1024, fmin=30.0, fmax=9000.0)),
        (319, features.MelConfig()),  # shorter than one hop: zero frames
    ],
)
def test_log_mel_matches_float64_dft(num_samples, cfg):
  rng = np.random.default_rng(num_samples)
  x = (rng.standard_normal(num_samples) * rng.uniform(0.01, 1.0)).astype(np.float32)
  got = features.log_mel(x, cfg)
  assert got.dtype == np.float32
  assert got.shape == (num_samples // cfg.hop_length, cfg.n_mels)
  want = _reference_log_mel(x, cfg)
  np.testing.assert_allclose(got, want, atol=2e-3, rtol=1e-4)


def test_log_mel_batched_equals_per_row():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 3, 4001)).astype(np.float32)
  got = features.log_mel(x)
  assert got.shape == (2, 3, 12, 80)
  for i in range(2):
    for j in range(3):
      np.testing.assert_allclose(got[i, j], features.log_mel(x[i, j]), atol=1e-5)


def test_mel_filterbank_slaney_scale_and_norm():
  # Slaney scale: 1 kHz is mel 15; linear (200/3 Hz per mel) below, log step ln(6.4)/27 above.
  np.testing.assert_allclose(features.hz_to_mel([0.0, 500.0, 1000.0]), [0.0, 7.5, 15.0])
  np.testing.assert_allclose(features.hz_to_mel(6400.0), 15 + 27.0)
  hz = np.array([10.0, 700.0, 1000.0, 2500.0, 7999.0])
  np.testing.assert_allclose(features.mel_to_hz(features.hz_to_mel(hz)), hz)
  fb = features.mel_filterbank(16000, 512, 80)
  assert fb.shape == (257, 80) and (fb >= 0).all()
  # Unit area in Hz per filter (Slaney normalisation); the FFT grid samples a triangle well only
  # when it spans many bins, i.e. the upper half of the filters.
  area = fb.sum(0) * (16000 / 512)
  np.testing.assert_allclose(area[40:], 1.0, rtol=0.03)


def test_mel_times_locate_a_click():
  cfg = features.MelConfig()
  rng = np.random.default_rng(2)
  for _ in range(5):
    x = np.zeros(16000, np.float32)
    p = int(rng.integers(1000, 15000))
    x[p] = 1.0
    mel = features.log_mel(x, cfg)
    energy = np.exp(mel).sum(-1)
    t = features.mel_times(len(mel), cfg.frame_rate)
    # The Hann window peaks at the frame centre, so the loudest frame is the one centred nearest.
    assert abs(t[np.argmax(energy)] - p / 16000) <= 0.5 * cfg.hop_length / 16000 + 1e-9
  np.testing.assert_allclose(features.mel_times(3, 50.0), [0.01, 0.03, 0.05])


def test_mel_frames_per_video_frame():
  assert features.mel_frames_per_video_frame(features.MelConfig(), 25) == 2
  assert features.mel_frames_per_video_frame(features.MelConfig(), 50) == 1
  with pytest.raises(ValueError, match="integer multiple"):
    features.mel_frames_per_video_frame(features.MelConfig(), 30)


@pytest.mark.parametrize("orig_sr, target_sr", [(44100, 16000), (8000, 16000), (22050, 16000)])
def test_resample_sine(orig_sr, target_sr):
  dur = 0.537
  n = int(dur * orig_sr)
  f0 = 440.0
  x = np.sin(2 * np.pi * f0 * np.arange(n) / orig_sr).astype(np.float32)
  y = features.resample(x, orig_sr, target_sr)
  assert y.dtype == np.float32
  assert len(y) == math.ceil(n * target_sr / orig_sr)
  want = np.sin(2 * np.pi * f0 * np.arange(len(y)) / target_sr)
  mid = slice(len(y) // 10, -len(y) // 10)  # away from the filter's edge transients
  np.testing.assert_allclose(y[mid], want[mid], atol=2e-3)
  with pytest.raises(ValueError, match="positive"):
    features.resample(x, 0, 16000)


def test_log_mel_rejects_integer_audio():
  with pytest.raises(ValueError, match="float waveform"):
    features.log_mel(np.zeros(1000, np.int16))
