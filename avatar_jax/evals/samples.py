"""Sample videos: the "video" evaluator (a generated eval clip as mp4 + TensorBoard video) and the
library behind `python -m avatar_jax.sample` (a clip of a split, or two audio files).

Frames come from `system.decode(outputs, batch)` (uint8 [B, T, H, W, 3]), so any system that can
decode its outputs gets videos; the soundtrack is both voices mixed. The "video" evaluator writes
<workdir>/samples/step_<step>.mp4 (`every` steps) and logs it as the TensorBoard video "sample".
"""
from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from absl import logging

from avatar_jax import render
from avatar_jax import system as system_lib
from avatar_jax.data import features, media, pipeline
from avatar_jax.data.synthdyad import flame
from avatar_jax.data.synthdyad import render as synthdyad_render
from avatar_jax.evals import runner

AUDIO_KEYS = ("audio_self", "audio_partner")


def clip_video(ctx: runner.Context, cfg: ml_collections.ConfigDict, split: str, index: int,
               path: str, rng: jax.Array) -> np.ndarray:
  """Generates eval window `index` of `split`, writes it to `path` with both voices; returns its
  frames uint8 [T, H, W, 3]."""
  # The partner is drawn from its true motion: SynthDyad coefficients where the source has them,
  # else its FLAME 56-d track (recorded data such as DualTalk).
  raw = pipeline.make_source(ctx.config.data, split).keys
  partner = ("motion_partner",) if "motion_partner" in raw else ("flame56_partner",)
  keys = ctx.system.data_spec().keys + AUDIO_KEYS + partner
  cfg = ml_collections.ConfigDict({**cfg.to_dict(), "num_clips": index + 1, "batch_size": 1})
  batch = list(runner.batches(ctx, cfg, keys, split))[index]
  out = runner.generator(ctx.system, ctx.model, **runner.options(cfg))(batch, rng)
  frames = ctx.system.decode(out, batch)[0]
  facts = pipeline.facts(ctx.config.data)
  render.write(path, frames, facts["fps"], batch["audio_self"][0] + batch["audio_partner"][0],
               facts["sample_rate"])
  return frames


def wav_video(system: system_lib.System, model, config: ml_collections.ConfigDict, self_wav: str,
              partner_wav: str, path: str, rng: jax.Array, *,
              identities: tuple[int, int] | None = None, reference: str | None = None
              ) -> np.ndarray:
  """The avatar talking with `self_wav` and listening to `partner_wav` (any rate, resampled);
  writes `path` and returns the frames uint8 [T, H, W, 3].

  Video systems animate the face of `reference` (an image file, centre-cropped and resized to
  the run's resolution) or, by default, the SynthDyad identity's reference frame.

  The partner is drawn with SynthDyad's rule for a speaker's jaw (its audio envelope), as no
  partner motion exists; a model that conditions on partner motion gets that motion too.
  """
  facts = pipeline.facts(config.data)
  sr, fps = facts["sample_rate"], facts["fps"]
  a_self, a_partner = media.read_audio(self_wav, sr), media.read_audio(partner_wav, sr)
  n = max(len(a_self), len(a_partner))
  a_self, a_partner = np.pad(a_self, (0, n - len(a_self))), np.pad(a_partner, (0, n - len(a_partner)))
  mel_cfg = features.mel_config_from(config.data.features)
  ids = identities or render.default_identities()
  num_frames = int(round(n * fps / sr))
  partner = render.partner_from_audio(a_partner, num_frames, sr, fps)
  batch = {"mel_self": features.log_mel(a_self, mel_cfg)[None],
           "mel_partner": features.log_mel(a_partner, mel_cfg)[None],
           "audio_self": a_self[None], "audio_partner": a_partner[None],   # wav2vec2 front ends
           "motion_partner": partner[None],
           "flame56_partner": flame.to_flame56(partner)[None],
           "identity_self": np.array([ids[0]], np.int32),
           "identity_partner": np.array([ids[1]], np.int32)}
  res = int(config.data.synthdyad.resolution)
  batch["reference_image"] = (media.read_image(reference, res) if reference else
                              synthdyad_render.reference_image(render.identity(config, ids[0]),
                                                               res))[None]
  out = runner.generator(system, model)(batch, rng)
  frames = system.decode(out, batch)[0]
  render.write(path, frames, fps, a_self + a_partner, sr)
  return frames


@runner.register("video", num_clips=1, batch_size=1, index=0)
def video(ctx: runner.Context, cfg: ml_collections.ConfigDict) -> dict[str, str]:
  """{split: mp4 path}: eval window `index` of each split, sampled with seed `step`."""
  out = {}
  if jax.process_index() > 0:
    return out
  if type(ctx.system).decode is system_lib.System.decode:
    logging.warning("config.evals.%s: %s.System cannot decode its outputs; no sample video.",
                    ctx.name, type(ctx.system).__module__)
    return out
  step = ctx.step or 0
  for split in runner.splits(cfg):
    suffix = "" if len(runner.splits(cfg)) == 1 else f"_{split}"
    path = os.path.join(ctx.workdir, "samples", f"step_{step:07d}{suffix}.mp4")
    rng = jax.random.key(step if cfg.seed is None else int(cfg.seed))
    frames = clip_video(ctx, cfg, split, int(cfg.index), path, rng)
    if ctx.writer is not None:
      ctx.writer.write_videos(step, {f"sample{suffix}": frames})
    logging.info("Wrote sample video %s", path)
    out[split] = path
  return out
