"""The discrete structure of a SynthDyad conversation: turns, phrases, syllables, and reactions.

`make_script` draws everything that happens *when* (SYNTHDYAD.md §1 and the event side of §3);
audio.py turns phrases into sound and motion.py turns the script plus sound into per-frame
coefficients. Participants are 0 (A) and 1 (B). All times are seconds from the clip start.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from avatar_jax.data.synthdyad import config as config_lib
from avatar_jax.data.synthdyad import identity as identity_lib

VOWELS = "aeiou"
CONSONANT_P = 0.6  # probability that a syllable has a consonant onset
CONSONANT_RANGE = (0.03, 0.06)
ACCENT_BEAT_RANGE = (0.05, 0.10)  # head_pitch dip (rad)
ACCENT_BEAT_JITTER_S = 0.08  # beat centre within ±80 ms of the accented syllable onset
NOD_FREQ_RANGE = (2.0, 2.5)
NOD_AMP_RANGE = (0.08, 0.15)
BACKCHANNEL_NOD_AMP_RANGE = (0.05, 0.08)
BACKCHANNEL_DUR_RANGE = (0.16, 0.24)  # "mm" of ~200 ms
LAUGH_BURSTS = (3, 5)
LAUGH_RATE_RANGE = (4.5, 5.5)
LAUGH_MIN_S = 0.6  # 3-5 bursts last 0.6-1.2 s
LAUGH_GAP_S = 0.03  # between the last syllable and the first burst
SMILE_RISE_S = 0.3
SMILE_HOLD_RANGE = (1.0, 3.0)
SMILE_DECAY_RANGE = (0.4, 0.8)
BROW_RISE_S = 0.12
BROW_HOLD_RANGE = (0.4, 0.8)
BROW_DECAY_S = 0.3
BLINK_S = 0.15
GAZE_AWAY_RANGE = (0.5, 1.0)
GAZE_AWAY_X = 0.5
LISTENER_CLEARANCE_S = 0.1  # a listener reaction that speaks/nods keeps this far from own speech


@dataclasses.dataclass(frozen=True)
class Syllable:
  start: float
  end: float
  onset_s: float  # consonant onset length at the start (0: none); the vowel fills the rest
  vowel: str  # one of VOWELS
  accent: bool  # stressed: F0 bump and a head-pitch beat
  beat_time: float  # centre of the head-pitch dip (accented syllables only)
  beat_depth: float  # rad


@dataclasses.dataclass(frozen=True)
class Phrase:
  speaker: int
  turn: int
  start: float
  end: float  # includes the laughter, if any
  syllables: tuple[Syllable, ...]
  question: bool  # F0 rises over the final syllable
  laughter: tuple[float, float] | None  # (start, end) of the bursts that end the phrase
  laugh_bursts: int
  laugh_rate: float  # bursts / s


@dataclasses.dataclass(frozen=True)
class Turn:
  speaker: int
  start: float
  end: float
  gaze_side: float  # -1 / +1: which way the speaker looks away
  gaze_away_s: float  # how long (from the turn start) the speaker looks away


@dataclasses.dataclass(frozen=True)
class Nod:
  who: int
  start: float
  freq: float  # Hz
  amplitude: float  # rad
  cycles: int  # 2 for a listening nod, 1 for a backchannel nod

  @property
  def end(self) -> float:
    return self.start + self.cycles / self.freq


@dataclasses.dataclass(frozen=True)
class Envelope:
  """A rise–hold–decay reaction (smile, brow raise)."""
  who: int
  start: float
  rise: float
  hold: float
  decay: float
  amplitude: float

  @property
  def end(self) -> float:
    return self.start + self.rise + self.hold + self.decay


@dataclasses.dataclass(frozen=True)
class Backchannel:
  who: int
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class Blink:
  who: int
  start: float
  end: float


@dataclasses.dataclass(frozen=True)
class Script:
  duration: float
  turns: tuple[Turn, ...]
  phrases: tuple[Phrase, ...]
  backchannels: tuple[Backchannel, ...]
  nods: tuple[Nod, ...]
  smiles: tuple[Envelope, ...]
  brows: tuple[Envelope, ...]
  blinks: tuple[Blink, ...]

  def phrases_of(self, who: int) -> list[Phrase]:
    return [p for p in self.phrases if p.speaker == who]


def _uniform(rng, r):
  return float(rng.uniform(r[0], r[1]))


def _make_turns(rng, identities, cfg: config_lib.SynthDyadConfig):
  """Alternating turns filled with phrases, until the clip is covered."""
  turns, phrases = [], []
  t = _uniform(rng, (0.0, 0.5))
  speaker = int(rng.integers(2))
  lo_syl, hi_syl = cfg.syllables_range
  while t < cfg.duration_s:
    syl_s = 1.0 / identities[speaker].speaking_rate
    length = _uniform(rng, cfg.turn_range)
    laugh = rng.random() < cfg.p_laughter
    n_bursts = int(rng.integers(LAUGH_BURSTS[0], LAUGH_BURSTS[1] + 1))
    # Burst rate in 4.5-5.5 Hz, capped so that the laughter lasts at least LAUGH_MIN_S.
    laugh_rate = _uniform(rng, (LAUGH_RATE_RANGE[0], min(LAUGH_RATE_RANGE[1], n_bursts / LAUGH_MIN_S)))
    laugh_s = n_bursts / laugh_rate if laugh else 0.0
    laugh_total = laugh_s + LAUGH_GAP_S if laugh else 0.0
    # Speech must end early enough that the laughter still fits in the turn; the turn (speech plus
    # laughter) is never shorter than turn_range[0].
    room2 = lo_syl * syl_s * 1.2  # the longest possible minimal phrase
    speech_end = t + max(length - laugh_total, room2)
    speech_min = t + cfg.turn_range[0] - laugh_total
    turn_index = len(turns)
    turn_phrases = []
    p_start = t
    while True:
      n = int(rng.integers(lo_syl, hi_syl + 1))
      syllables = []
      s = p_start
      while True:
        d = syl_s * _uniform(rng, (0.8, 1.2))
        onset = _uniform(rng, CONSONANT_RANGE) if rng.random() < CONSONANT_P else 0.0
        vowel = VOWELS[int(rng.integers(len(VOWELS)))]
        accent = bool(rng.random() < cfg.p_accent)
        beat = s + _uniform(rng, (-ACCENT_BEAT_JITTER_S, ACCENT_BEAT_JITTER_S))
        depth = _uniform(rng, ACCENT_BEAT_RANGE)
        k = len(syllables)
        if k >= lo_syl:
          if k >= hi_syl or (s + d > speech_end and s >= speech_min):
            break
          # Past its drawn length, a phrase only grows to fill a turn end too short for another.
          if k >= n and speech_end - s >= cfg.pause_range[0] + room2:
            break
        syllables.append(Syllable(s, s + d, onset, vowel, accent, beat, depth))
        s += d
      pause = _uniform(rng, cfg.pause_range)
      question = bool(rng.random() < cfg.p_question)
      room = speech_end - s
      if room < pause + room2 and room >= cfg.pause_range[0] + room2:
        pause = room - room2  # shorten the pause so that one more phrase fits
      last = room < pause + room2 and s >= speech_min
      laughter = None
      end = s
      if last and laugh:
        laughter = (s + LAUGH_GAP_S, s + laugh_total)
        end = laughter[1]
        question = False
      turn_phrases.append(Phrase(speaker, turn_index, p_start, end, tuple(syllables), question,
                                 laughter, n_bursts if laughter else 0,
                                 laugh_rate if laughter else 0.0))
      if last:
        break
      p_start = s + pause
    end = turn_phrases[-1].end
    side = 1.0 if rng.random() < 0.5 else -1.0
    away = min(_uniform(rng, GAZE_AWAY_RANGE), max(end - t - 0.3, 0.2))
    turns.append(Turn(speaker, t, end, side, away))
    phrases.extend(turn_phrases)
    if rng.random() < cfg.p_overlap:
      t = end - _uniform(rng, (0.0, cfg.max_overlap_s))
    else:
      t = end + _uniform(rng, cfg.gap_range)
    speaker = 1 - speaker
  return turns, phrases


def _busy(phrases, who, a, b, clearance=LISTENER_CLEARANCE_S):
  """Whether `who` speaks (a phrase) anywhere in [a - clearance, b + clearance]."""
  return any(p.speaker == who and p.start < b + clearance and p.end > a - clearance
             for p in phrases)


def _reactions(rng, turns, phrases, cfg: config_lib.SynthDyadConfig):
  """Listener reactions to each partner phrase end, smiles to laughter, brows to questions."""
  nods, backchannels, smiles, brows = [], [], [], []
  last_nod_end = [-np.inf, -np.inf]
  last_bc_end = [-np.inf, -np.inf]
  for ph in sorted(phrases, key=lambda p: p.end):
    listener = 1 - ph.speaker
    # Draw every random number up front, so one decision never shifts the others' draws.
    u_nod, u_bc = rng.random(), rng.random()
    nod_delay = _uniform(rng, cfg.nod_delay_range)
    nod_freq = _uniform(rng, NOD_FREQ_RANGE)
    nod_amp = _uniform(rng, NOD_AMP_RANGE)
    bc_delay = _uniform(rng, cfg.nod_delay_range)
    bc_dur = _uniform(rng, BACKCHANNEL_DUR_RANGE)
    bc_freq = _uniform(rng, NOD_FREQ_RANGE)
    bc_amp = _uniform(rng, BACKCHANNEL_NOD_AMP_RANGE)
    brow_delay = _uniform(rng, cfg.brow_delay_range)
    brow_hold = _uniform(rng, BROW_HOLD_RANGE)
    brow_amp = _uniform(rng, (0.5, 0.9))
    smile_delay = _uniform(rng, cfg.smile_delay_range)
    smile_hold = _uniform(rng, SMILE_HOLD_RANGE)
    smile_decay = _uniform(rng, SMILE_DECAY_RANGE)
    smile_amp = _uniform(rng, (0.6, 1.0))

    turn_start = turns[ph.turn].start
    nod = None
    if ph.end - turn_start >= cfg.nod_min_partner_speech_s and u_nod < cfg.p_nod:
      cand = Nod(listener, ph.end + nod_delay, nod_freq, nod_amp, 2)
      if cand.start >= last_nod_end[listener] and not _busy(phrases, listener, cand.start, cand.end):
        nod = cand
    if u_bc < cfg.p_backchannel:
      start = nod.start if nod is not None else ph.end + bc_delay
      bc = Backchannel(listener, start, start + bc_dur)
      if bc.start >= last_bc_end[listener] + 0.1 and not _busy(phrases, listener, bc.start, bc.end):
        if nod is None:
          cand = Nod(listener, bc.start, bc_freq, bc_amp, 1)
          if cand.start >= last_nod_end[listener]:
            nod = cand
        if nod is not None:  # a backchannel always comes with its nod
          backchannels.append(bc)
          last_bc_end[listener] = bc.end
    if nod is not None:
      nods.append(nod)
      last_nod_end[listener] = nod.end
    if ph.question:
      brows.append(Envelope(listener, ph.end + brow_delay, BROW_RISE_S, brow_hold, BROW_DECAY_S,
                            brow_amp))
    if ph.laughter is not None:
      smiles.append(Envelope(listener, ph.laughter[0] + smile_delay, SMILE_RISE_S, smile_hold,
                             smile_decay, smile_amp))
  return nods, backchannels, smiles, brows


def _blinks(rng, turns, cfg: config_lib.SynthDyadConfig):
  """Poisson blinks plus extra blinks near own turn starts; overlapping blinks are merged away."""
  blinks = []
  for who in (0, 1):
    n = int(rng.poisson(cfg.blink_rate * cfg.duration_s))
    times = list(rng.uniform(0.0, cfg.duration_s, n))
    for turn in turns:
      u, dt = rng.random(), _uniform(rng, (0.0, 0.3))
      if turn.speaker == who and u < cfg.p_blink_turn_start:
        times.append(turn.start + dt)
    last_end = -np.inf
    for t in sorted(times):
      if t >= last_end:
        blinks.append(Blink(who, float(t), float(t) + BLINK_S))
        last_end = t + BLINK_S
  return blinks


def make_script(rng: np.random.Generator, identities: tuple[identity_lib.Identity, identity_lib.Identity],
                cfg: config_lib.SynthDyadConfig) -> Script:
  """Draws the whole conversation structure from `rng` (consumed in a fixed order)."""
  turns, phrases = _make_turns(rng, identities, cfg)
  nods, backchannels, smiles, brows = _reactions(rng, turns, phrases, cfg)
  blinks = _blinks(rng, turns, cfg)
  return Script(cfg.duration_s, tuple(turns), tuple(phrases), tuple(backchannels), tuple(nods),
                tuple(smiles), tuple(brows), tuple(blinks))
