"""Animate a trained avatar: `python -m avatar_jax.sample --workdir DIR [--self-audio a.wav
--partner-audio b.wav] --out out.mp4`.

With two audio files (any rate; resampled, mono-mixed) the avatar talks with the first and
listens to the second; a video system (e.g. configs/bm_synthdyad.py) animates `--reference
face.png` (default: the SynthDyad identity's frame). Without them it animates eval window `--index` of `--split` (whole clips;
default: the first test clip). The video shows the avatar (left) and the partner (right), with
both voices mixed into the soundtrack (library: evals/samples.py).
"""
from __future__ import annotations

import os

import jax
import ml_collections
from absl import app, flags, logging

from avatar_jax.evals import runner, samples


def _define_flags():
  """CLI flags, defined only when run as a program."""
  global _WORKDIR, _OUT, _SELF, _PARTNER, _SPLIT, _INDEX, _SEED, _REFERENCE
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (checkpoints + config).")
  _OUT = flags.DEFINE_string("out", None, "Output mp4 (default: <workdir>/samples/sample.mp4).")
  _SELF = flags.DEFINE_string("self-audio", None, "The avatar's own speech (wav or any audio file).")
  _PARTNER = flags.DEFINE_string("partner-audio", None, "The partner's speech.")
  _SPLIT = flags.DEFINE_string("split", "test", "Data split when no audio is given.")
  _INDEX = flags.DEFINE_integer("index", 0, "Clip index when no audio is given.")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _REFERENCE = flags.DEFINE_string("reference", None, "Video systems: the face to animate (an "
                                   "image file; default: the SynthDyad identity's frame).")


def main(argv):
  del argv
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  if (_SELF.value is None) != (_PARTNER.value is None):
    raise app.UsageError("give both --self-audio and --partner-audio, or neither")
  if _REFERENCE.value and not _SELF.value:
    raise app.UsageError("--reference needs --self-audio and --partner-audio (without them the "
                         "clip's own reference frame is used)")
  # Inputs are checked before the (slow) model restore, so a wrong path fails at once.
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  for flag, path, what in (("--self-audio", _SELF.value, "an audio file"),
                           ("--partner-audio", _PARTNER.value, "an audio file"),
                           ("--reference", _REFERENCE.value, "an image file")):
    if path:
      media.expect_file(path, f"{what} for {flag}")
  system, model, config, step = trainer.restore_model(_WORKDIR.value)
  out = _OUT.value or os.path.join(_WORKDIR.value, "samples", "sample.mp4")
  rng = jax.random.key(_SEED.value)
  if _SELF.value:
    samples.wav_video(system, model, config, _SELF.value, _PARTNER.value, out, rng,
                      reference=_REFERENCE.value)
  else:
    ctx = runner.Context(system, model, config, _WORKDIR.value, step=step, name="sample")
    cfg = ml_collections.ConfigDict(runner.defaults("video"))
    samples.clip_video(ctx, cfg, _SPLIT.value, _INDEX.value, out, rng)
  logging.info("Wrote %s", out)
  print(out)


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
