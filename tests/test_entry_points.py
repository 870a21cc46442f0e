"""`python -m avatar_jax.evaluate` and `python -m avatar_jax.sample` on a tiny trained workdir:
metrics JSON + markdown, and mp4s (SynthDyad clip, or two wav files at different rates) that
decode with PyAV to the expected frames and soundtrack."""
from __future__ import annotations

import json
import math
import os
import sys
import wave

import av
import numpy as np
import pytest

import trainer_harness as harness

FPS, SR, RES = 25, 16000, 64   # SynthDyad defaults used by the quickstart config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return harness.trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return harness.cache_dir(tmp_path_factory)


def _write_tone_wav(path, freq, seconds, rate, amplitude=0.3):
  """16-bit mono PCM with the standard library, independent of the project's writers."""
  t = np.arange(int(round(seconds * rate))) / rate
  pcm = np.round(amplitude * 32767 * np.sin(2 * np.pi * freq * t)).astype("<i2")
  with wave.open(str(path), "wb") as w:
    w.setnchannels(1)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(pcm.tobytes())


def _decode(path):
  """(video frames [T, H, W, 3] uint8, video fps, mono audio float, audio rate) of an mp4."""
  with av.open(str(path)) as c:
    assert len(c.streams.video) == 1 and len(c.streams.audio) == 1, "expected one video + one audio stream"
    vs = c.streams.video[0]
    fps = float(vs.average_rate)
    frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
  with av.open(str(path)) as c:
    rate = c.streams.audio[0].rate
    chunks = []
    for f in c.decode(audio=0):
      a = f.to_ndarray().astype(np.float64)
      chunks.append(a.mean(0) if f.format.is_planar else a.reshape(-1, len(f.layout.channels)).mean(1))
    audio = np.concatenate(chunks)
  return frames, fps, audio, rate


def _band_energy(audio, rate, freq, width=15.0):
  spec = np.abs(np.fft.rfft(audio * np.hanning(len(audio)))) ** 2
  f = np.fft.rfftfreq(len(audio), 1.0 / rate)
  return spec[(f > freq - width) & (f < freq + width)].sum() / spec.sum()


def test_evaluate_writes_metrics(workdir, cache):
  # 3 clips: two conversations, which the crosstalk row (switched on here) needs.
  out = harness.run([sys.executable, "-m", "avatar_jax.evaluate", f"--workdir={workdir}",
                     "--num_clips=3", "--crosstalk"], cache)
  assert out.returncode == 0, out.stderr[-4000:]
  with open(os.path.join(workdir, "eval", "test.json")) as f:
    result = json.load(f)
  assert result["split"] == "test" and result["step"] == harness.NUM_STEPS
  rows = result["rows"]
  assert set(rows) == {"model", "shuffled audio", "mean motion", "ground truth",
                       "crosstalk (another conversation's partner)"}
  # The generator's own motion scores perfectly on the lip metrics by definition.
  truth = rows["ground truth"]
  assert truth["lip_corr"] == pytest.approx(1.0, abs=1e-6) and truth["lip_offset"] == 0
  for name, row in rows.items():
    assert row["clips"] == 3, name
    for key in ("lip_corr", "jaw_leak", "nod_f1"):
      v = row[key]
      assert v is None or (isinstance(v, float) and (math.isnan(v) or -1.0 <= v <= 1.0 + 1e-9)) \
          or name == "mean motion", (name, key, v)
    assert row["jaw_leak"] is not None and math.isfinite(row["jaw_leak"])
  with open(os.path.join(workdir, "eval", "test.md")) as f:
    md = f.read()
  assert f"step {harness.NUM_STEPS}" in md
  table = [l for l in md.splitlines() if l.startswith("|")]
  assert len(table) == 2 + len(rows) and "lip_corr" in table[0]
  assert {l.split("|")[1].strip() for l in table[2:]} == set(rows)
  assert "| model |" in out.stdout   # the table is printed too

  # Another split and clip count from the command line.
  out = harness.run([sys.executable, "-m", "avatar_jax.evaluate", f"--workdir={workdir}",
                     "--split=ood", "--num_clips=2"], cache)
  assert out.returncode == 0, out.stderr[-4000:]
  with open(os.path.join(workdir, "eval", "ood.json")) as f:
    assert json.load(f)["rows"]["model"]["clips"] == 2


def test_sample_from_two_wavs_at_different_rates(workdir, cache, tmp_path):
  # The avatar's voice at 16 kHz (1.6 s), the partner's at 22.05 kHz (1.2 s): the partner is
  # resampled; read at the wrong rate its 1 kHz tone would land at 1000 * 16000/22050 = 726 Hz.
  self_wav, partner_wav = tmp_path / "a.wav", tmp_path / "b.wav"
  _write_tone_wav(self_wav, 440.0, 1.6, 16000)
  _write_tone_wav(partner_wav, 1000.0, 1.2, 22050)
  out_mp4 = tmp_path / "out.mp4"
  out = harness.run([sys.executable, "-m", "avatar_jax.sample", f"--workdir={workdir}",
                     f"--self-audio={self_wav}", f"--partner-audio={partner_wav}",
                     f"--out={out_mp4}"], cache)
  assert out.returncode == 0, out.stderr[-4000:]
  assert out.stdout.strip().endswith(str(out_mp4))
  frames, fps, audio, rate = _decode(out_mp4)
  assert fps == FPS
  assert abs(len(frames) - 1.6 * FPS) <= 2, len(frames)
  assert frames.shape[1:] == (RES, 2 * RES, 3)         # avatar | partner
  assert frames.std() > 5                               # faces, not a blank frame
  assert abs(len(audio) / rate - 1.6) < 0.1, len(audio) / rate
  part = audio[int(0.1 * rate):int(1.1 * rate)]         # both voices present
  assert _band_energy(part, rate, 440.0) > 0.2
  assert _band_energy(part, rate, 1000.0) > 0.2
  assert _band_energy(part, rate, 726.0) < 0.01


def test_sample_default_synthdyad_clip(workdir, cache):
  out = harness.run([sys.executable, "-m", "avatar_jax.sample", f"--workdir={workdir}"], cache)
  assert out.returncode == 0, out.stderr[-4000:]
  path = os.path.join(workdir, "samples", "sample.mp4")
  frames, fps, audio, rate = _decode(path)
  clip_seconds = 8.0        # SynthDyad test clips (SYNTHDYAD.md §1)
  assert fps == FPS and len(frames) == clip_seconds * FPS
  assert frames.shape[1:] == (RES, 2 * RES, 3)
  assert abs(len(audio) / rate - clip_seconds) < 0.1
  assert np.sqrt(np.mean(audio ** 2)) > 1e-3           # the conversation is audible
  # The partner's half follows its true motion: it changes over the clip.
  partner = frames[..., RES:, :].astype(np.float32)
  assert np.abs(np.diff(partner, axis=0)).mean() > 0.1


def test_sample_needs_both_wavs(workdir, cache, tmp_path):
  a = tmp_path / "a.wav"
  _write_tone_wav(a, 300.0, 0.5, 16000)
  out = harness.run([sys.executable, "-m", "avatar_jax.sample", f"--workdir={workdir}",
                     f"--self-audio={a}"], cache)
  assert out.returncode != 0 and "--partner-audio" in out.stderr


def test_missing_checkpoint_is_a_clear_error(tmp_path, cache):
  out = harness.run([sys.executable, "-m", "avatar_jax.evaluate", f"--workdir={tmp_path}"], cache)
  assert out.returncode != 0 and "no checkpoint under" in out.stderr and "train first" in out.stderr
