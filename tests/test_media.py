"""Media I/O: WAV/audio reading and writing, mp4 muxing read back with PyAV, PNG, strips."""
import av
import numpy as np
import pytest
import scipy.io.wavfile

from avatar_jax.data import media


def _decode_mp4(path):
  with av.open(str(path)) as c:
    v = c.streams.video[0]
    frames = [f.to_ndarray(format="rgb24") for f in c.decode(v)]
    meta = dict(width=v.codec_context.width, height=v.codec_context.height,
                codec=v.codec_context.name, rate=v.average_rate,
                duration=float(c.duration) / av.time_base if c.duration else None,
                n_audio=len(c.streams.audio))
  audio, sr = None, None
  if meta["n_audio"]:
    with av.open(str(path)) as c:
      a = c.streams.audio[0]
      sr, meta["audio_codec"], meta["channels"] = a.rate, a.codec_context.name, a.channels
      audio = np.concatenate([f.to_ndarray() for f in c.decode(a)], axis=1)  # [C, S]
  return np.stack(frames), meta, audio, sr


def _moving_square(t, h, w, seed):
  rng = np.random.default_rng(seed)
  frames = np.full((t, h, w, 3), rng.integers(30, 90, 3), np.uint8)
  for i in range(t):
    y, x = (i * 2) % (h - 8), (i * 3) % (w - 8)
    frames[i, y:y + 8, x:x + 8] = (230, 200, 40)
  return frames


@pytest.mark.parametrize("stereo", [False, True])
def test_write_mp4_with_audio_reads_back(tmp_path, stereo):
  t, h, w, fps, sr = 30, 33, 47, 25, 16000  # odd sizes: padded to 34 x 48
  frames = _moving_square(t, h, w, seed=int(stereo))
  n = t * sr // fps
  tt = np.arange(n) / sr
  tone = 0.3 * np.sin(2 * np.pi * 440 * tt).astype(np.float32)
  audio = np.stack([tone, 0.5 * tone], 1) if stereo else tone
  path = tmp_path / "clip.mp4"
  media.write_mp4(path, frames, fps, audio=audio, sample_rate=sr)
  got, meta, dec, dec_sr = _decode_mp4(path)
  assert got.shape == (t, h + 1, w + 1, 3)  # padded, not resized
  assert meta["codec"] == "h264" and meta["rate"] == fps
  assert (got[:, h, :, :] < 40).all() and (got[:, :, w, :] < 40).all()  # the pad is black
  # Lossy, but the picture is the picture: mean abs error small.
  assert np.abs(got[:, :h, :w].astype(float) - frames).mean() < 6
  assert meta["n_audio"] == 1 and meta["audio_codec"] == "aac" and dec_sr == sr
  assert meta["channels"] == (2 if stereo else 1)
  assert abs(meta["duration"] - t / fps) < 0.15
  # Energy roughly preserved (AAC adds a priming delay, so compare RMS, not samples).
  want = audio.reshape(n, -1).T
  for ch in range(want.shape[0]):
    rms_in, rms_out = np.sqrt(np.mean(want[ch] ** 2)), np.sqrt(np.mean(dec[ch] ** 2))
    assert abs(rms_out / rms_in - 1) < 0.1
  assert abs(dec.shape[1] - n) < 3 * 1024


def test_write_mp4_video_only_and_bad_input(tmp_path):
  frames = _moving_square(5, 16, 24, seed=3)
  path = tmp_path / "v.mp4"
  media.write_mp4(path, frames, 12.5)
  got, meta, _, _ = _decode_mp4(path)
  assert got.shape == frames.shape and meta["n_audio"] == 0
  with pytest.raises(ValueError, match=r"uint8 \[T, H, W, 3\]"):
    media.write_mp4(path, frames.astype(np.float32), 25)
  with pytest.raises(ValueError, match=r"\[S\] or \[S, 2\]"):
    media.write_mp4(path, frames, 25, audio=np.zeros((100, 3), np.float32))


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.float32, np.uint8])
def test_read_wav_types_and_stereo(tmp_path, dtype):
  rng = np.random.default_rng(0)
  x = rng.uniform(-0.9, 0.9, (1234, 2))
  if dtype == np.int16:
    raw = np.round(x * 32768).astype(np.int16)
  elif dtype == np.int32:
    raw = np.round(x * 2**31).astype(np.int32)
  elif dtype == np.uint8:
    raw = np.round(x * 128 + 128).astype(np.uint8)
  else:
    raw = x.astype(np.float32)
  scipy.io.wavfile.write(tmp_path / "a.wav", 22050, raw)
  audio, sr = media.read_wav(tmp_path / "a.wav")
  assert sr == 22050 and audio.dtype == np.float32 and audio.shape == (1234,)
  tol = 1 / 120 if dtype == np.uint8 else 1e-4
  np.testing.assert_allclose(audio, x.mean(1), atol=tol)


def test_write_wav_read_audio_resamples(tmp_path):
  sr = 44100
  tone = 0.5 * np.sin(2 * np.pi * 300 * np.arange(sr // 2) / sr).astype(np.float32)
  media.write_wav(tmp_path / "t.wav", tone, sr)
  back, got_sr = media.read_wav(tmp_path / "t.wav")
  assert got_sr == sr
  np.testing.assert_allclose(back, tone, atol=1 / 32767)
  y = media.read_audio(tmp_path / "t.wav", target_sr=16000)
  assert len(y) == 8000
  want = 0.5 * np.sin(2 * np.pi * 300 * np.arange(8000) / 16000)
  np.testing.assert_allclose(y[800:-800], want[800:-800], atol=3e-3)


def test_read_audio_from_mp4_and_errors(tmp_path):
  sr = 16000
  tone = 0.4 * np.sin(2 * np.pi * 500 * np.arange(sr) / sr).astype(np.float32)
  media.write_mp4(tmp_path / "a.mp4", _moving_square(25, 16, 16, 0), 25, audio=tone)
  y = media.read_audio(tmp_path / "a.mp4", target_sr=8000)
  assert abs(len(y) - 8000) < 1024
  assert abs(np.sqrt(np.mean(y**2)) / np.sqrt(np.mean(tone**2)) - 1) < 0.1
  with pytest.raises(FileNotFoundError):
    media.read_audio(tmp_path / "missing.wav")
  (tmp_path / "junk.wav").write_bytes(b"not a wav at all")
  with pytest.raises(ValueError, match="junk.wav: not a readable WAV"):
    media.read_wav(tmp_path / "junk.wav")
  (tmp_path / "junk.m4a").write_bytes(b"\x00" * 64)
  with pytest.raises(ValueError, match="junk.m4a"):
    media.read_audio(tmp_path / "junk.m4a")
  scipy.io.wavfile.write(tmp_path / "six.wav", sr, np.zeros((100, 6), np.int16))
  with pytest.raises(ValueError, match="six.wav: expected mono or stereo"):
    media.read_wav(tmp_path / "six.wav")
  with pytest.raises(ValueError, match="no audio stream"):
    media.write_mp4(tmp_path / "v.mp4", _moving_square(3, 16, 16, 0), 25)
    media.read_audio(tmp_path / "v.mp4")


def test_side_by_side_frame_strip_png(tmp_path):
  rng = np.random.default_rng(5)
  a = rng.integers(0, 256, (4, 6, 5, 3), dtype=np.uint8)
  b = rng.integers(0, 256, (4, 3, 7, 3), dtype=np.uint8)
  s = media.side_by_side(a, b)
  assert s.shape == (4, 6, 12, 3)
  np.testing.assert_array_equal(s[:, :, :5], a)
  np.testing.assert_array_equal(s[:, :3, 5:], b)
  assert (s[:, 3:, 5:] == 0).all()
  with pytest.raises(ValueError, match="frame counts differ"):
    media.side_by_side(a, b[:3])
  frames = rng.integers(0, 256, (10, 5, 4, 3), dtype=np.uint8)
  strip = media.frame_strip(frames, 4)
  assert strip.shape == (5, 16, 3)
  for j, i in enumerate([0, 3, 6, 9]):
    np.testing.assert_array_equal(strip[:, 4 * j:4 * j + 4], frames[i])
  # PNG decoded by an independent decoder (ffmpeg through PyAV) equals the image exactly.
  for img in (strip, frames[0, :, :, 0]):
    media.write_png(tmp_path / "s.png", img)
    with av.open(str(tmp_path / "s.png")) as c:
      fmt = "rgb24" if img.ndim == 3 else "gray"
      dec = next(c.decode(video=0)).to_ndarray(format=fmt)
    np.testing.assert_array_equal(dec, img)
