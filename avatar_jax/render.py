"""Frames and mp4s of generated motion: the SynthDyad drawing of a dyad (avatar | partner).

Library code shared by `System.decode` of motion-space systems, the sample-video evaluator
(evals/samples.py) and `python -m avatar_jax.sample`. Identities are drawn from their ids alone:
the SynthDyad identity pools of the splits are disjoint, so an id names its split.
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import ml_collections
import numpy as np

from avatar_jax.data import media
from avatar_jax.data.synthdyad import audio as sd_audio
from avatar_jax.data.synthdyad import generator as sd
from avatar_jax.data.synthdyad import render as sd_render


def split_of(identity_id: int) -> str:
  """The SynthDyad split whose identity pool holds `identity_id`."""
  for split, (start, count) in sd.IDENTITY_POOLS.items():
    if start <= int(identity_id) < start + count:
      return split
  raise ValueError(f"identity {int(identity_id)} lies in no SynthDyad pool {dict(sd.IDENTITY_POOLS)}")


def identity(config: ml_collections.ConfigDict, identity_id: int):
  """The SynthDyad identity `identity_id` of the run's generator seed (config.data.synthdyad)."""
  return sd.identity_for(split_of(identity_id), int(identity_id), seed=config.data.synthdyad.seed)


def dyad_frames(motion_self, motion_partner, identity_self, identity_partner,
                resolution: int) -> np.ndarray:
  """Avatar | partner side by side: uint8 [T, H, 2W, 3] (T: the shorter of the two motions).

  motion_self, motion_partner: [T, C] SynthDyad coefficients; identities: `identity(...)`.
  """
  n = min(len(motion_self), len(motion_partner))
  a = sd_render.render(np.asarray(motion_self[:n]), identity_self, resolution)
  b = sd_render.render(np.asarray(motion_partner[:n]), identity_partner, resolution)
  return media.side_by_side(a, b)


def motion_frames(config: ml_collections.ConfigDict, motion, batch: Mapping[str, np.ndarray]
                  ) -> np.ndarray:
  """Decodes generated motion [B, T, C] of `batch` into uint8 frames [B, T, H, 2W, 3].

  The partner (right half) is `batch['motion_partner']` [B, T', C] where the batch has it (its
  true motion), else drawn still (zero motion); identities come from batch['identity_self'] and
  batch['identity_partner'] [B].
  """
  motion = np.asarray(motion, np.float32)
  for key in ("identity_self", "identity_partner"):
    if key not in batch:
      raise KeyError(f"decoding motion needs batch[{key!r}]; the batch has {sorted(batch)}")
  partner = batch.get("motion_partner")
  partner = np.zeros_like(motion) if partner is None else np.asarray(partner, np.float32)
  res = int(config.data.synthdyad.resolution)
  return np.stack([
      dyad_frames(m, p, identity(config, i), identity(config, j), res)
      for m, p, i, j in zip(motion, partner, batch["identity_self"], batch["identity_partner"])])


def flame56_frames(config: ml_collections.ConfigDict, flame56, batch: Mapping[str, np.ndarray]
                   ) -> np.ndarray:
  """Decodes FLAME 56-d outputs [B, T, 56] (exp 0:50, jaw 50:53, pose 53:56) into uint8 frames
  [B, T, H, 2W, 3] through the inverse of SynthDyad's export map (`synthdyad.flame.from_flame56`:
  the least-squares read-back of the six expression channels, jaw and head pose).

  The partner (right half) is batch['flame56_partner'] (or 'motion_partner') where the batch has
  it, else drawn still; identities come from batch['identity_self'/'identity_partner'] where they
  are SynthDyad ids (>= 0), else the first two test identities (data without SynthDyad identities,
  e.g. DualTalk).
  """
  from avatar_jax.data.synthdyad import flame  # pylint: disable=g-import-not-at-top
  motion = flame.from_flame56(np.asarray(flame56, np.float32))
  if "flame56_partner" in batch:
    partner = flame.from_flame56(np.asarray(batch["flame56_partner"], np.float32))
  elif "motion_partner" in batch:
    partner = np.asarray(batch["motion_partner"], np.float32)
  else:
    partner = np.zeros_like(motion)
  b = len(motion)
  fallback = default_identities()
  ids = {}
  for n, key in enumerate(("identity_self", "identity_partner")):
    got = np.asarray(batch.get(key, np.full(b, -1)), np.int64).reshape(b)
    ids[key] = np.where(got >= 0, got, fallback[n])
  return motion_frames(config, motion, {"motion_partner": partner, **ids})


def partner_from_audio(audio: np.ndarray, num_frames: int, sample_rate: int, fps: int) -> np.ndarray:
  """Motion [T, C] of a partner known only by its voice: SynthDyad's rule for a speaker's jaw
  (its own audio envelope), everything else at rest."""
  partner = np.zeros((num_frames, len(sd.MOTION_CHANNELS)), np.float32)
  env = sd_audio.envelope(audio, sample_rate, fps)[:num_frames]
  partner[:len(env), sd.MOTION_CHANNELS.index("jaw_open")] = np.clip(env, 0.0, 1.0)
  return partner


def default_identities(split: str = "test") -> tuple[int, int]:
  """(avatar, partner) identity ids for audio without SynthDyad identities: the first two of `split`."""
  pool = sd.IDENTITY_POOLS[split][0]
  return pool, pool + 1


def write(path: str, frames: np.ndarray, fps: int, audio: np.ndarray | None = None,
          sample_rate: int | None = None) -> str:
  """Writes frames [T, H, W, 3] (and a mono soundtrack [S]) to `path`; returns the path."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  media.write_mp4(path, frames, fps=fps, audio=audio, sample_rate=sample_rate)
  return path
