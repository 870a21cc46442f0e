"""Streaming (avatar_jax/stream.py): pushed chunks of any size give the offline model's motion,
memory stays constant over a long conversation, and the command replays wavs."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avatar_jax import stream
from avatar_jax.data import features

sys.path.insert(0, os.path.dirname(__file__))
from test_forcing import _config, _model  # noqa: E402  pylint: disable=g-import-not-at-top


def _voices(seconds, seed=0):
  r = np.random.default_rng(seed)
  n = int(16000 * seconds)
  t = np.arange(n) / 16000
  env = (np.sin(2 * np.pi * 0.7 * t) > 0).astype(np.float32)    # turns of speech and silence
  return ((0.2 * r.standard_normal(n) * env).astype(np.float32),
          (0.2 * r.standard_normal(n) * (1 - env)).astype(np.float32))


def _offline(system, model, config, a, b, rng, motion=None):
  mel = features.mel_config_from(config.data.features)
  batch = {"mel_self": jnp.asarray(features.log_mel(a, mel)[None]),
           "mel_partner": jnp.asarray(features.log_mel(b, mel)[None])}
  if motion is not None:
    batch["motion_partner"] = jnp.asarray(motion[None])
  return np.asarray(system.generate(model, batch, rng).value)[0]


@pytest.mark.parametrize("arg,chunks", [
    ("block=10,lookahead=2,history=1.0", "random"),        # 1 to 4000 samples per push
    ("block=5,lookahead=1,history=0.5,user_motion=true,nfe=2", "320ms"),
])
def test_pushed_chunks_give_the_offline_motion(arg, chunks):
  c = _config(f"size=tiny,{arg}")
  system, model = _model(c)
  a, b = _voices(3.04)                       # 76 frames: not a whole number of blocks
  motion = np.random.default_rng(1).standard_normal((76, 10)).astype(np.float32)
  rng = jax.random.key(5)
  want = _offline(system, model, c, a, b, rng, motion if system.cfg.use_partner_motion else None)
  agent = stream.DuplexAgent(system, model, c, rng=rng)
  r = np.random.default_rng(2)
  i, frames, sent = 0, [], 0
  while i < len(a):
    n = {"40ms": 640, "320ms": 5120}.get(chunks) or int(r.integers(1, 4000))
    m = None
    if system.cfg.use_partner_motion:        # the user's camera: frames as their audio arrives
      upto = min(76, (i + n) // 640)
      m, sent = motion[sent:upto], upto
    frames.append(agent.push(a[i:i + n], b[i:i + n], m))
    i += n
  frames.append(agent.close())
  frames = np.concatenate(frames)
  got = np.concatenate(agent.motion)[:76]
  assert frames.shape == (76, 64, 64, 3) and frames.dtype == np.uint8
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  # A block is out as soon as its look-ahead audio is in: never more than one block late.
  assert len(agent.latency) == -(-76 // system.cfg.block)


def test_an_hour_scaled_down_runs_in_constant_memory():
  """60 s pushed in 40 ms chunks: the buffers and caches stop growing after the history fills."""
  c = _config("size=tiny,block=10,lookahead=2,history=1.0,nfe=1")
  system, model = _model(c)
  a, b = _voices(60.0)
  agent = stream.DuplexAgent(system, model, c)
  early, late = [], []
  for i in range(0, len(a), 640):
    agent.push(a[i:i + 640], b[i:i + 640])
    (early if i < 16000 * 15 else late if i > 16000 * 45 else []).append(agent.memory_bytes())
  agent.close()
  assert agent.frames_out >= 1500
  # The buffers breathe within a block's worth of audio; the peak does not grow.
  assert max(late) <= max(early[len(early) // 2:]), (max(early), max(late))
  assert max(len(x) for x in agent.audio.values()) < 16000 * 2.5   # ~history + window of audio


def test_stream_command_replays_wavs(tmp_path, tmp_path_factory):
  import trainer_harness  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  workdir = trainer_harness.streaming_workdir(tmp_path_factory)
  a, b = _voices(1.6)
  media.write_wav(tmp_path / "a.wav", a)
  media.write_wav(tmp_path / "b.wav", b)
  out = str(tmp_path / "s.mp4")
  res = subprocess.run([sys.executable, "-m", "avatar_jax.stream", "--workdir", workdir,
                        "--self-audio", str(tmp_path / "a.wav"), "--partner-audio",
                        str(tmp_path / "b.wav"), "--out", out, "--norealtime"],
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert res.returncode == 0, res.stderr[-2000:]
  assert os.path.getsize(out) > 0
  with open(os.path.splitext(out)[0] + ".latency.json") as f:
    log = json.load(f)
  assert log["summary"]["blocks"] == 4 and len(log["blocks"]) == 4
  assert log["summary"]["lookahead_ms"] > 80


def test_streaming_benchmark_prints_latency_and_quality(tmp_path, tmp_path_factory):
  """benchmarks/streaming.py on the shared tiny workdir: one latency row per chunk size, and the
  streamed motion scores what the offline System.generate scores on the same clip."""
  import trainer_harness  # pylint: disable=g-import-not-at-top
  from benchmarks import streaming  # pylint: disable=g-import-not-at-top
  workdir = trainer_harness.streaming_workdir(tmp_path_factory)
  out = tmp_path / "bench.md"
  streaming.main(["--workdir", workdir, "--clips", "1", "--chunks", "320", "--out_md", str(out)])
  text = out.read_text()
  latency = [l for l in text.splitlines() if l.startswith("| 320 |")]
  assert len(latency) == 1
  frames_per_s = float(latency[0].split("|")[7])
  assert frames_per_s > 0
  rows = {l.split("|")[1].strip(): [float(v) for v in l.split("|")[2:-1]]
          for l in text.splitlines() if l.startswith("| streamed") or l.startswith("| offline")}
  assert set(rows) == {"streamed, 320-ms chunks", "offline (System.generate)"}
  streamed, offline = rows["streamed, 320-ms chunks"], rows["offline (System.generate)"]
  lip_corr = streamed[0]
  assert -1.0 <= lip_corr <= 1.0
  np.testing.assert_allclose(streamed[:3], offline[:3], atol=2e-3)   # lip_corr, lip_conf, jaw_leak
