"""SynthDyad: procedural two-person conversations with a known causal structure.

    from avatar_jax.data.synthdyad import generator as sd
    sample = sd.make_sample("train", index=7, seed=0)           # one perspective of conversation 3
    sample = sd.make_sample("train", 7, render=False)           # audio + motion only (fast path)

Sample `index` is conversation `index // 2` seen from participant `index % 2` (0: A is "self",
1: B is "self"). Everything is a function of (split, seed, index) and the config: every random
stream is seeded from those integers plus a stream name, so samples do not depend on which worker
makes them or on what was generated before.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from avatar_jax.data.synthdyad import audio as audio_lib
from avatar_jax.data.synthdyad import config as config_lib
from avatar_jax.data.synthdyad import flame as flame_lib
from avatar_jax.data.synthdyad import identity as identity_lib
from avatar_jax.data.synthdyad import motion as motion_lib
from avatar_jax.data.synthdyad import render as render_lib
from avatar_jax.data.synthdyad import script as script_lib

SynthDyadConfig = config_lib.SynthDyadConfig
regime_for = config_lib.regime_for
Identity = identity_lib.Identity
SPLITS = identity_lib.SPLITS
IDENTITY_POOLS = identity_lib.IDENTITY_POOLS
MOTION_CHANNELS = motion_lib.MOTION_CHANNELS
EVENT_TYPES = ("phrase_end", "nod", "smile", "laughter", "question", "backchannel", "brow_raise",
               "turn", "phrase", "blink", "accent")
EVENT_INDEX = {name: i for i, name in enumerate(EVENT_TYPES)}


@dataclasses.dataclass(frozen=True)
class Conversation:
  """Both participants' tracks. Arrays are indexed by participant: 0 = A, 1 = B.

  audio: [2, S] clean voice tracks; background: [S] (already at the drawn SNR); mixture: [S] =
  clip(A + B + background); motion: [2, T, C]; speaking: [2, T] bool; events: dict of [E] arrays
  (type, start, end, who) with who = participant index.
  """
  split: str
  index: int
  seed: int
  config: SynthDyadConfig
  identities: tuple[Identity, Identity]
  script: script_lib.Script
  audio: np.ndarray
  background: np.ndarray
  mixture: np.ndarray
  snr_db: float
  motion: np.ndarray
  speaking: np.ndarray
  events: dict[str, np.ndarray]


def _check_index(name: str, value: int) -> int:
  if int(value) != value or value < 0:
    raise ValueError(f"SynthDyad {name} must be a non-negative integer, found {value!r}.")
  return int(value)


def identity_for(split: str, identity_id: int, seed: int = 0,
                 config: SynthDyadConfig | None = None) -> Identity:
  """The identity `identity_id` of `split` (ids lie in IDENTITY_POOLS[split])."""
  identity_lib.check_split(split)
  start, count = IDENTITY_POOLS[split]
  if not start <= identity_id < start + count:
    raise ValueError(f"identity {identity_id} is not in the {split!r} pool "
                     f"[{start}, {start + count}).")
  cfg = config if config is not None else regime_for(split)
  return identity_lib.make_identity(identity_id, seed, cfg.speaking_rate_range)


def _events(script: script_lib.Script) -> dict[str, np.ndarray]:
  rows = []  # (type, start, end, who)
  for turn in script.turns:
    rows.append(("turn", turn.start, turn.end, turn.speaker))
  for ph in script.phrases:
    rows.append(("phrase", ph.start, ph.end, ph.speaker))
    rows.append(("phrase_end", ph.end, ph.end, ph.speaker))
    if ph.question:
      rows.append(("question", ph.syllables[-1].start, ph.end, ph.speaker))
    if ph.laughter is not None:
      rows.append(("laughter", ph.laughter[0], ph.laughter[1], ph.speaker))
    for syl in ph.syllables:
      if syl.accent:
        rows.append(("accent", syl.start, syl.end, ph.speaker))
  rows += [("backchannel", b.start, b.end, b.who) for b in script.backchannels]
  rows += [("nod", n.start, n.end, n.who) for n in script.nods]
  rows += [("smile", s.start, s.end, s.who) for s in script.smiles]
  rows += [("brow_raise", b.start, b.end, b.who) for b in script.brows]
  rows += [("blink", b.start, b.end, b.who) for b in script.blinks]
  # Events that begin inside the clip; ends are clipped to it.
  rows = [r for r in rows if r[1] < script.duration]
  rows.sort(key=lambda r: (r[1], EVENT_INDEX[r[0]], r[3]))
  return {
      "type": np.array([EVENT_INDEX[r[0]] for r in rows], np.int32),
      "start": np.array([r[1] for r in rows], np.float32),
      "end": np.array([min(r[2], script.duration) for r in rows], np.float32),
      "who": np.array([r[3] for r in rows], np.int32),
  }


def make_conversation(split: str, conv_index: int, *, seed: int = 0,
                      config: SynthDyadConfig | None = None) -> Conversation:
  """Conversation `conv_index` of `split`: script, both voices, background, mixture, motion."""
  identity_lib.check_split(split)
  conv_index = _check_index("conversation index", conv_index)
  seed = _check_index("seed", seed)
  cfg = config if config is not None else regime_for(split)
  if not isinstance(cfg, SynthDyadConfig):
    raise TypeError(f"config must be a SynthDyadConfig, found {type(cfg).__name__}.")
  key = (seed, split, conv_index)

  start, count = IDENTITY_POOLS[split]
  pick = identity_lib.rng_for(*key, "identities").choice(count, size=2, replace=False)
  identities = tuple(identity_for(split, start + int(i), seed, cfg) for i in pick)

  script = script_lib.make_script(identity_lib.rng_for(*key, "script"), identities, cfg)
  n_samples, sr = cfg.num_samples, cfg.sample_rate
  tracks = np.stack([
      audio_lib.synthesize_track(identity_lib.rng_for(*key, "audio", who), script, who,
                                 identities[who], n_samples, sr) for who in (0, 1)])
  bg_rng = identity_lib.rng_for(*key, "background")
  snr_db = float(bg_rng.uniform(*cfg.snr_db_range))
  background, mixture = audio_lib.mix(
      list(tracks), audio_lib.synthesize_background(bg_rng, n_samples, sr), snr_db)
  motion = np.stack([
      motion_lib.make_motion(identity_lib.rng_for(*key, "motion", who), script, who, tracks[who],
                             cfg) for who in (0, 1)])
  speaking = np.stack([motion_lib.speaking_mask(script, who, cfg) for who in (0, 1)])
  return Conversation(split, conv_index, seed, cfg, identities, script, tracks, background,
                      mixture, snr_db, motion, speaking, _events(script))


def make_sample(split: str, index: int, *, seed: int = 0, config: SynthDyadConfig | None = None,
                render: bool = True) -> dict:
  """Sample `index` of `split` (see the module docstring for the keys and the index mapping).

  Keys: video, partner_video [T, H, W, 3] uint8 and reference_image [H, W, 3] uint8 (only when
  render=True); audio_self, audio_partner, audio_background, audio_mix [S] float32; motion_self,
  motion_partner [T, C] float32; flame56_self, flame56_partner [T, 56] float32; speaking_self,
  speaking_partner [T] bool; events {type, start, end, who} [E] (who: 0 = self, 1 = partner);
  fps, sample_rate, seed, identity_self, identity_partner int.
  """
  index = _check_index("sample index", index)
  conv = make_conversation(split, index // 2, seed=seed, config=config)
  return sample_from_conversation(conv, index, seed=seed, render=render)


def sample_from_conversation(conv, index: int, *, seed: int = 0, render: bool = False) -> dict:
  """Sample `index` (side `index % 2`) of `conv = make_conversation(split, index // 2, ...)`.

  Lets a reader that holds the conversation build both of its samples without generating it
  twice; `make_sample` is this after `make_conversation`.
  """
  me, other = index % 2, 1 - index % 2
  events = dict(conv.events)
  events["who"] = (events["who"] != me).astype(np.int32)
  sample = {
      "audio_self": conv.audio[me],
      "audio_partner": conv.audio[other],
      "audio_background": conv.background,
      "audio_mix": conv.mixture,
      "motion_self": conv.motion[me],
      "motion_partner": conv.motion[other],
      "flame56_self": flame_lib.to_flame56(conv.motion[me]),
      "flame56_partner": flame_lib.to_flame56(conv.motion[other]),
      "speaking_self": conv.speaking[me],
      "speaking_partner": conv.speaking[other],
      "events": events,
      "fps": int(conv.config.fps),
      "sample_rate": int(conv.config.sample_rate),
      "seed": int(seed),
      "identity_self": conv.identities[me].identity_id,
      "identity_partner": conv.identities[other].identity_id,
  }
  if render:
    res = conv.config.resolution
    sample["video"] = render_lib.render(conv.motion[me], conv.identities[me], res)
    sample["partner_video"] = render_lib.render(conv.motion[other], conv.identities[other], res)
    sample["reference_image"] = render_lib.reference_image(conv.identities[me], res)
  return sample
