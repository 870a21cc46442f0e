"""SynthDyad identities (face + voice) and the deterministic random streams.

Every random draw in SynthDyad comes from a generator built by `rng_for` out of integers that name
*what* is drawn (seed, split, conversation index, stream name), never from global state or call
order, so a sample is the same whichever worker makes it and whatever was made before it.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np

SPLITS = ("train", "test", "ood")

# Identity pools per split: [start, start + count). Disjoint, so test faces/voices are unseen.
IDENTITY_POOLS = {"train": (0, 1000), "test": (1000, 200), "ood": (1200, 200)}


def _code(name: str) -> int:
  """Stable 32-bit code of a stream name (crc32 does not change across Python runs)."""
  return zlib.crc32(name.encode("utf-8"))


def check_split(split: str) -> str:
  if split not in SPLITS:
    raise ValueError(f"SynthDyad split must be one of {SPLITS}, found {split!r}.")
  return split


def rng_for(seed: int, *path: int | str) -> np.random.Generator:
  """A generator determined only by (seed, *path); strings are hashed with crc32."""
  if int(seed) < 0:
    raise ValueError(f"SynthDyad seed must be a non-negative integer, found {seed}.")
  words = [int(seed)] + [_code(p) if isinstance(p, str) else int(p) for p in path]
  if any(w < 0 for w in words):
    raise ValueError(f"SynthDyad random-stream path must be non-negative, found {path}.")
  return np.random.default_rng(np.random.SeedSequence(words))


@dataclasses.dataclass(frozen=True)
class Identity:
  """One participant's face and voice.

  Face geometry is in head units: the head ellipse has half-height 1 and half-width
  `face_aspect`; the renderer scales head units to pixels.
  """
  identity_id: int
  skin_rgb: tuple[float, float, float]  # [0, 1]
  hair_rgb: tuple[float, float, float]  # [0, 1]
  background_rgb: tuple[float, float, float]  # [0, 1]
  face_aspect: float  # head width / height, 0.75–0.95
  eye_spacing: float  # eye-centre half distance as a fraction of head half-width, 0.30–0.42
  mouth_width: float  # mouth half-width as a fraction of head half-width, 0.25–0.40
  brow_thickness: float  # head units, 0.04–0.08
  f0_base: float  # Hz, 90–250
  formant_scale: float  # 0.85–1.15
  speaking_rate: float  # syllables / s, 3.5–6


_SKIN = np.array([[0.96, 0.80, 0.69], [0.87, 0.67, 0.52], [0.71, 0.50, 0.36],
                  [0.49, 0.33, 0.22], [0.33, 0.22, 0.15]])
_HAIR = np.array([[0.08, 0.06, 0.05], [0.30, 0.19, 0.10], [0.62, 0.45, 0.25],
                  [0.85, 0.72, 0.45], [0.55, 0.20, 0.08], [0.62, 0.62, 0.62]])


def make_identity(identity_id: int, seed: int = 0,
                  speaking_rate_range: tuple[float, float] = (3.5, 6.0)) -> Identity:
  """Identity `identity_id`; a function of (seed, identity_id, speaking_rate_range) only."""
  lo, hi = speaking_rate_range
  if not 3.5 <= lo <= hi <= 6.0:
    raise ValueError(f"speaking_rate_range must lie within [3.5, 6.0], found {speaking_rate_range}.")
  rng = rng_for(seed, "identity", int(identity_id))
  # Skin: a point on the palette polyline, so tones are plausible and varied.
  s = rng.uniform(0, len(_SKIN) - 1)
  i = min(int(s), len(_SKIN) - 2)
  skin = (1 - (s - i)) * _SKIN[i] + (s - i) * _SKIN[i + 1]
  hair = _HAIR[rng.integers(len(_HAIR))] * rng.uniform(0.85, 1.15) + rng.normal(0, 0.03, 3)
  bg = rng.uniform(0.15, 0.85, 3)
  return Identity(
      identity_id=int(identity_id),
      skin_rgb=tuple(float(x) for x in np.clip(skin + rng.normal(0, 0.02, 3), 0, 1)),
      hair_rgb=tuple(float(x) for x in np.clip(hair, 0, 1)),
      background_rgb=tuple(float(x) for x in bg),
      face_aspect=float(rng.uniform(0.75, 0.95)),
      eye_spacing=float(rng.uniform(0.30, 0.42)),
      mouth_width=float(rng.uniform(0.25, 0.40)),
      brow_thickness=float(rng.uniform(0.04, 0.08)),
      f0_base=float(np.exp(rng.uniform(np.log(90.0), np.log(250.0)))),
      formant_scale=float(rng.uniform(0.85, 1.15)),
      speaking_rate=float(rng.uniform(lo, hi)),
  )
