"""SynthDyad generator parameters and the per-split regimes.

The defaults are the train regime. `regime_for(split)` gives the regime of each split: train and test
share it (they differ in identities); ood shifts it — faster speech, longer clips and other reaction
delays, each still inside the ranges of SYNTHDYAD.md.
"""
from __future__ import annotations

import dataclasses

from avatar_jax.data.synthdyad import identity as identity_lib

Range = tuple[float, float]


@dataclasses.dataclass(frozen=True)
class SynthDyadConfig:
  """Generator parameters. Times in seconds, rates in 1/s, probabilities in [0, 1]."""
  duration_s: float = 8.0
  fps: int = 25
  sample_rate: int = 16000
  resolution: int = 64
  # Script.
  speaking_rate_range: Range = (3.5, 5.5)  # syllables / s, drawn per identity
  turn_range: Range = (1.5, 4.0)
  gap_range: Range = (0.1, 0.6)
  p_overlap: float = 0.1
  max_overlap_s: float = 0.3
  pause_range: Range = (0.25, 0.5)  # between phrases of a turn (>= 250 ms)
  syllables_range: tuple[int, int] = (2, 8)  # per phrase, inclusive
  p_question: float = 0.2
  p_laughter: float = 0.15  # per turn
  p_backchannel: float = 0.3  # per partner phrase end
  p_accent: float = 0.3  # per syllable
  # Reactions (delays measured from the trigger; see SYNTHDYAD.md §3).
  p_nod: float = 0.7
  nod_min_partner_speech_s: float = 1.5
  nod_delay_range: Range = (0.2, 0.5)
  smile_delay_range: Range = (0.2, 0.6)
  brow_delay_range: Range = (0.3, 0.5)
  blink_rate: float = 0.3
  p_blink_turn_start: float = 0.5
  # Background mixing.
  snr_db_range: Range = (10.0, 30.0)

  def __post_init__(self):
    def bad(name, expected):
      raise ValueError(f"SynthDyadConfig.{name}: expected {expected}, found {getattr(self, name)!r}.")
    if not self.duration_s > 0:
      bad("duration_s", "> 0")
    if int(self.fps) != self.fps or self.fps <= 0:
      bad("fps", "a positive integer")
    if int(self.sample_rate) != self.sample_rate or self.sample_rate < 8000:
      bad("sample_rate", "an integer >= 8000")
    if int(self.resolution) != self.resolution or self.resolution < 16:
      bad("resolution", "an integer >= 16")
    checks = {
        "speaking_rate_range": (3.5, 6.0), "turn_range": (1.5, 4.0), "gap_range": (0.1, 0.6),
        "nod_delay_range": (0.2, 0.6), "smile_delay_range": (0.2, 0.8),
        "brow_delay_range": (0.3, 0.6), "snr_db_range": (10.0, 30.0), "pause_range": (0.25, 5.0),
    }
    for name, (lo, hi) in checks.items():
      a, b = getattr(self, name)
      if not lo <= a <= b <= hi:
        bad(name, f"a range inside [{lo}, {hi}]")
    a, b = self.syllables_range
    if not 1 <= a <= b:
      bad("syllables_range", "1 <= low <= high")
    for name in ("p_overlap", "p_question", "p_laughter", "p_backchannel", "p_accent", "p_nod",
                 "p_blink_turn_start"):
      if not 0.0 <= getattr(self, name) <= 1.0:
        bad(name, "a probability in [0, 1]")

  @property
  def num_frames(self) -> int:
    return int(round(self.duration_s * self.fps))

  @property
  def num_samples(self) -> int:
    return int(round(self.duration_s * self.sample_rate))


def regime_for(split: str) -> SynthDyadConfig:
  """The default configuration of `split` ('train', 'test' or 'ood')."""
  identity_lib.check_split(split)
  if split in ("train", "test"):
    return SynthDyadConfig()
  return SynthDyadConfig(
      duration_s=16.0,
      speaking_rate_range=(5.0, 6.0),
      nod_delay_range=(0.4, 0.6),
      smile_delay_range=(0.5, 0.8),
      brow_delay_range=(0.45, 0.6),
  )
