"""Animate a trained avatar: `python -m avatar_jax.sample --workdir DIR [--self-audio a.wav
--partner-audio b.wav] --out out.mp4`.

With two wav files (any rate; resampled to 16 kHz, mono-mixed) the avatar talks with the first
and listens to the second. Without them it animates SynthDyad clip `--index` of `--split`
(default: the first test clip). The video shows the avatar (left) and the partner (right), with
both voices mixed into the soundtrack. For wav input the partner is drawn with the SynthDyad
rule for a speaker's jaw (its own audio envelope), since no partner motion exists.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from avatar_jax.data import features, media, pipeline
from avatar_jax.data.synthdyad import audio as sd_audio
from avatar_jax.data.synthdyad import generator as sd
from avatar_jax.data.synthdyad import render as sd_render


def _identity(config, split: str, identity_id: int):
  return sd.identity_for(split, int(identity_id), seed=config.data.synthdyad.seed)


def _write(path, frames, fps, audio, sample_rate):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  media.write_mp4(path, frames, fps=fps, audio=audio, sample_rate=sample_rate)


def dyad_frames(motion_self, motion_partner, identity_self, identity_partner, resolution: int):
  """Avatar | partner side by side: uint8 [T, H, 2W, 3]."""
  n = min(len(motion_self), len(motion_partner))
  a = sd_render.render(np.asarray(motion_self[:n]), identity_self, resolution)
  b = sd_render.render(np.asarray(motion_partner[:n]), identity_partner, resolution)
  return media.side_by_side(a, b)


def generate(system, model, mel_self, mel_partner, rng) -> np.ndarray:
  """Motion [T, C] for one pair of log-mel streams [Ta, M]."""
  batch = {"mel_self": jnp.asarray(mel_self)[None], "mel_partner": jnp.asarray(mel_partner)[None]}
  return np.asarray(system.generate(model, batch, rng)["motion"][0])


def clip_video(system, model, config, path: str, rng, *, split: str = "test", index: int = 0):
  """Generates and writes the video of SynthDyad clip `index` of `split`; returns its frames."""
  sample = pipeline.make_source(config.data, split)[index]
  mel_cfg = features.mel_config_from(config.data.features)
  motion = generate(system, model, features.log_mel(sample["audio_self"], mel_cfg),
                    features.log_mel(sample["audio_partner"], mel_cfg), rng)
  frames = dyad_frames(motion, sample["motion_partner"], _identity(config, split, sample["identity_self"]),
                       _identity(config, split, sample["identity_partner"]),
                       config.data.synthdyad.resolution)
  audio = sample["audio_self"] + sample["audio_partner"]
  _write(path, frames, int(sample["fps"]), audio, int(sample["sample_rate"]))
  return frames


def wav_video(system, model, config, self_wav: str, partner_wav: str, path: str, rng, *,
              identity_split: str = "test", identity_self=None, identity_partner=None):
  """The avatar talking with `self_wav` and listening to `partner_wav`; returns the frames."""
  sr = int(config.data.synthdyad.sample_rate)
  fps = int(config.data.synthdyad.fps)
  a_self = media.read_audio(self_wav, sr)
  a_partner = media.read_audio(partner_wav, sr)
  n = max(len(a_self), len(a_partner))
  a_self, a_partner = np.pad(a_self, (0, n - len(a_self))), np.pad(a_partner, (0, n - len(a_partner)))
  mel_cfg = features.mel_config_from(config.data.features)
  motion = generate(system, model, features.log_mel(a_self, mel_cfg), features.log_mel(a_partner, mel_cfg), rng)
  partner = np.zeros_like(motion)
  env = sd_audio.envelope(a_partner, sr, fps)[:len(partner)]
  partner[:len(env), sd.MOTION_CHANNELS.index("jaw_open")] = np.clip(env, 0.0, 1.0)
  pool = sd.IDENTITY_POOLS[identity_split][0]
  ids = (pool if identity_self is None else identity_self,
         pool + 1 if identity_partner is None else identity_partner)
  frames = dyad_frames(motion, partner, _identity(config, identity_split, ids[0]),
                       _identity(config, identity_split, ids[1]), config.data.synthdyad.resolution)
  _write(path, frames, fps, a_self + a_partner, sr)
  return frames


# ------------------------------------------------------------------------------------------ CLI


def _define_flags():
  """CLI flags, defined only when run as a program (the module is also a library)."""
  global _WORKDIR, _OUT, _SELF, _PARTNER, _SPLIT, _INDEX, _SEED
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints + config).")
  _OUT = flags.DEFINE_string("out", None, "Output mp4 (default: <workdir>/samples/sample.mp4).")
  _SELF = flags.DEFINE_string("self-audio", None, "The avatar's own speech (wav or any audio file).")
  _PARTNER = flags.DEFINE_string("partner-audio", None, "The partner's speech.")
  _SPLIT = flags.DEFINE_string("split", "test", "SynthDyad split when no audio is given.")
  _INDEX = flags.DEFINE_integer("index", 0, "SynthDyad clip index when no audio is given.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")


def main(argv):
  del argv
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  if (_SELF.value is None) != (_PARTNER.value is None):
    raise app.UsageError("give both --self-audio and --partner-audio, or neither")
  system, model, config, _ = trainer.restore_model(_WORKDIR.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "sample.mp4")
  rng = jax.random.key(_SEED.value)
  if _SELF.value:
    wav_video(system, model, config, _SELF.value, _PARTNER.value, out, rng)
  else:
    clip_video(system, model, config, out, rng, split=_SPLIT.value, index=_INDEX.value)
  logging.info("Wrote %s", out)
  print(out)


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
