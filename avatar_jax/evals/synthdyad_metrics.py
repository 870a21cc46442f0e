"""SynthDyad motion metrics (SYNTHDYAD.md §6), computed from motion coefficients.

Every metric compares a generated motion track `pred_motion: [T, C]` (channel order of
`avatar_jax.data.synthdyad.generator.MOTION_CHANNELS`) with the truth carried by a SynthDyad sample.
Exact definitions, with the reasoning behind each choice, are in docs/metrics.md; they are repeated
briefly in each function's docstring. All computations are float64 NumPy; nothing here is jitted
because a clip is a few hundred frames and the metrics are dominated by branching on events.

Public API:
  clip_metrics(pred_motion, sample) -> dict[str, float]   (NaN where undefined for the clip)
  aggregate(list_of_clip_dicts) -> dict                    (nan-means, counts, micro nod F1)
  format_table(aggregated_or_rows) -> str                  (markdown)
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import optimize, signal

# The first ten channels are fixed by the SynthDyad contract (SYNTHDYAD.md §3); the generator may
# append more after them, which the metrics ignore.
CONTRACT_CHANNELS = (
    "jaw_open", "lip_round", "smile", "blink", "brow_raise",
    "gaze_x", "gaze_y", "head_pitch", "head_yaw", "head_roll",
)
JAW, SMILE, BROW, PITCH = (CONTRACT_CHANNELS.index(n)
                           for n in ("jaw_open", "smile", "brow_raise", "head_pitch"))
SELF, PARTNER = 0, 1

# Metric names in table order, with the direction that is better.
METRICS = (
    ("lip_corr", "↑"), ("lip_offset", "↓"), ("lip_conf", "↑"), ("jaw_leak", "↓"),
    ("nod_f1", "↑"), ("smile_resp", "↑"), ("brow_resp", "↑"),
)
TALKING = ("lip_corr", "lip_offset", "lip_conf")
LISTENING = ("jaw_leak", "nod_f1", "smile_resp", "brow_resp")

# Defaults of the definitions (docs/metrics.md §SynthDyad). Changing one changes the metric.
MAX_LAG = 15                 # frames, ± range of the lip cross-correlation (SyncNet's ±15)
MIN_OVERLAP = 10             # frames a lag needs in the correlation to count
NOD_BAND_HZ = (1.5, 3.0)     # nod oscillation band (truth nods are 2-2.5 Hz)
NOD_THRESHOLD = 0.015        # rad, minimum band amplitude (Hilbert envelope) of a detected nod
NOD_SPEECH_MARGIN_S = 0.2    # s, detections this close to the avatar's own phrases are ignored
NOD_MIN_SEPARATION_S = 0.8   # s, two detections closer than this are one nod
NOD_TOLERANCE_S = 0.4        # s, allowed distance between a detection and a true nod interval
RESP_AFTER_S = (0.5, 2.0)    # s after the anchor, the response window
RESP_BEFORE_S = 1.0          # s before the anchor, the baseline window
RESP_MIN_TRUE = 1e-3         # below this |true response| the ratio is undefined


def _event_types() -> tuple[str, ...]:
  from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top
  return tuple(sd.EVENT_TYPES)


def _own_envelope(sample: Mapping[str, Any], num_frames: int) -> np.ndarray:
  """Own-audio envelope `[T]` per video frame: `sample['envelope_self']` or computed from audio."""
  if "envelope_self" in sample:
    env = np.asarray(sample["envelope_self"], np.float64)
  else:
    if "audio_self" not in sample:
      raise KeyError("clip_metrics needs sample['audio_self'] (or a precomputed "
                     "sample['envelope_self']) for lip_offset / lip_conf; found keys "
                     f"{sorted(sample)}")
    from avatar_jax.data.synthdyad import audio as sd_audio  # pylint: disable=g-import-not-at-top
    env = np.asarray(sd_audio.envelope(np.asarray(sample["audio_self"]),
                                       int(sample["sample_rate"]), float(sample["fps"])),
                     np.float64)
  if env.ndim != 1 or env.shape[0] < num_frames:
    raise ValueError(f"own-audio envelope: expected shape [>= {num_frames}], found {env.shape}")
  return env[:num_frames]


# ----------------------------------------------------------------------------------------------
# Talking
# ----------------------------------------------------------------------------------------------
def pearson(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson r of two 1-D arrays; NaN when either is constant or fewer than 3 points."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f"pearson: expected two equal 1-D arrays, found {x.shape} and {y.shape}")
  if x.size < 3:
    return math.nan
  xc = x - x.mean()
  yc = y - y.mean()
  den = math.sqrt(float(xc @ xc) * float(yc @ yc))
  if den <= 1e-12 * max(1.0, x.size):
    return math.nan
  return float(xc @ yc) / den


def lag_correlation(jaw: np.ndarray, env: np.ndarray, mask: np.ndarray,
                    max_lag: int = MAX_LAG, min_overlap: int = MIN_OVERLAP) -> np.ndarray:
  """c[k + max_lag] = Pearson(jaw[t], env[t + k]) over t with mask[t] and 0 <= t + k < T.

  A positive peak lag k means the jaw leads the audio by k frames (the truth leads by 1).
  Lags with fewer than `min_overlap` frames, or a constant side, are NaN.
  """
  num_frames = jaw.shape[0]
  t = np.arange(num_frames)
  out = np.full(2 * max_lag + 1, np.nan)
  for i, k in enumerate(range(-max_lag, max_lag + 1)):
    sel = mask & (t + k >= 0) & (t + k < num_frames)
    if sel.sum() < min_overlap:
      continue
    out[i] = pearson(jaw[sel], env[t[sel] + k])
  return out


def _peak(c: np.ndarray, max_lag: int) -> tuple[float, float]:
  """(peak lag, peak - median) of a lag-correlation curve; NaNs if the curve is undefined."""
  if np.all(np.isnan(c)):
    return math.nan, math.nan
  i = int(np.nanargmax(c))  # ties → the most negative lag, deterministic
  return float(i - max_lag), float(c[i] - np.nanmedian(c))


# ----------------------------------------------------------------------------------------------
# Listening: nods
# ----------------------------------------------------------------------------------------------
def nod_band_amplitude(pitch: np.ndarray, fps: float, band: tuple[float, float] = NOD_BAND_HZ
                       ) -> np.ndarray:
  """Amplitude `[T]` (rad) of head_pitch in the nod band: |analytic signal| of the band-passed track.

  Zero-phase 2nd-order Butterworth band-pass (so peaks are not delayed), then the Hilbert envelope,
  which is smooth for a narrow-band oscillation (a squared signal would ripple at twice the nod rate).
  """
  pitch = np.asarray(pitch, np.float64)
  lo, hi = band
  if not 0 < lo < hi < fps / 2:
    raise ValueError(f"nod band {band} Hz must lie inside (0, fps/2 = {fps / 2})")
  sos = signal.butter(2, [lo, hi], btype="bandpass", fs=fps, output="sos")
  pad = min(3 * (2 * len(sos) + 1), pitch.shape[0] - 1)
  if pad < 1:
    return np.zeros_like(pitch)
  band_sig = signal.sosfiltfilt(sos, pitch - pitch.mean(), padlen=pad)
  return np.abs(signal.hilbert(band_sig))


def detect_nods(pitch: np.ndarray, fps: float, threshold: float = NOD_THRESHOLD,
                min_separation_s: float = NOD_MIN_SEPARATION_S,
                exclude: np.ndarray | None = None) -> np.ndarray:
  """Times (s) of detected nods: peaks of the nod-band amplitude above `threshold` rad.

  Peaks are found on the whole track, then those at frames where `exclude [T]` is set are dropped
  (dropping after peak picking keeps a masked region from creating peaks at its border).
  """
  if pitch.shape[0] < 4:
    return np.zeros(0)
  amp = nod_band_amplitude(pitch, fps)
  peaks, _ = signal.find_peaks(amp, height=threshold,
                               distance=max(1, int(round(min_separation_s * fps))))
  if exclude is not None:
    peaks = peaks[~np.asarray(exclude, bool)[peaks]]
  return peaks.astype(np.float64) / fps


def own_phrase_mask(num_frames: int, fps: float, starts: np.ndarray, ends: np.ndarray,
                    margin_s: float = NOD_SPEECH_MARGIN_S) -> np.ndarray:
  """[T] bool: frame time within `margin_s` of any interval [start, end]."""
  t = np.arange(num_frames) / fps
  mask = np.zeros(num_frames, bool)
  for a, b in zip(starts, ends):
    mask |= (t >= a - margin_s) & (t <= b + margin_s)
  return mask


def match_events(detections: np.ndarray, starts: np.ndarray, ends: np.ndarray,
                 tolerance: float = NOD_TOLERANCE_S) -> int:
  """Maximum one-to-one matching of detection times to true intervals; returns the match count.

  A detection at time d matches the interval [s, e] if its distance to the interval,
  max(s - d, 0, d - e), is at most `tolerance`. Among maximum matchings, the assignment with the
  smallest total distance is taken (it does not change the count, only which pairs).
  """
  if detections.size == 0 or starts.size == 0:
    return 0
  d = detections[:, None]
  dist = np.maximum(np.maximum(starts[None, :] - d, 0.0), d - ends[None, :])
  ok = dist <= tolerance + 1e-9
  # A cost larger than any sum of valid costs makes the minimum-cost assignment maximise the number
  # of valid pairs first.
  big = (tolerance + 1.0) * (ok.sum() + 1)
  cost = np.where(ok, dist, big)
  rows, cols = optimize.linear_sum_assignment(cost)
  return int(ok[rows, cols].sum())


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
  """F1 = 2tp / (2tp + fp + fn); NaN when there is nothing to detect and nothing detected."""
  den = 2 * tp + fp + fn
  return math.nan if den == 0 else 2 * tp / den


# ----------------------------------------------------------------------------------------------
# Listening: responses to partner events
# ----------------------------------------------------------------------------------------------
def _window_mean(x: np.ndarray, t0: float, t1: float, fps: float) -> float:
  """Mean of x over frames with t0 <= frame_time < t1; NaN if under half the window is in range."""
  n = x.shape[0]
  a = int(math.ceil(t0 * fps - 1e-9))
  b = int(math.ceil(t1 * fps - 1e-9))
  nominal = b - a
  a, b = max(a, 0), min(b, n)
  if b <= a or (b - a) * 2 < nominal:
    return math.nan
  return float(x[a:b].mean())


def response(x: np.ndarray, anchors: np.ndarray, fps: float) -> np.ndarray:
  """Per anchor (s): mean x over [a + 0.5, a + 2.0) s minus mean x over [a - 1.0, a) s."""
  out = []
  for a in anchors:
    after = _window_mean(x, a + RESP_AFTER_S[0], a + RESP_AFTER_S[1], fps)
    before = _window_mean(x, a - RESP_BEFORE_S, a, fps)
    out.append(after - before)
  return np.asarray(out, np.float64)


def response_ratio(pred: np.ndarray, true: np.ndarray, anchors: np.ndarray, fps: float
                   ) -> tuple[float, int]:
  """mean_over_anchors(response(pred)) / mean_over_anchors(response(true)); (ratio, #anchors used).

  Anchors whose windows do not fit in the clip are dropped. NaN if none remain or the true response
  is below RESP_MIN_TRUE in magnitude.
  """
  rp = response(pred, anchors, fps)
  rt = response(true, anchors, fps)
  ok = ~(np.isnan(rp) | np.isnan(rt))
  if not ok.any():
    return math.nan, 0
  den = float(rt[ok].mean())
  if abs(den) < RESP_MIN_TRUE:
    return math.nan, int(ok.sum())
  return float(rp[ok].mean()) / den, int(ok.sum())


# ----------------------------------------------------------------------------------------------
# Per clip
# ----------------------------------------------------------------------------------------------
def _as_motion(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[1] < len(CONTRACT_CHANNELS):
    raise ValueError(f"{name}: expected motion [T, C>={len(CONTRACT_CHANNELS)}], found {x.shape}")
  return x


def clip_metrics(pred_motion: Any, sample: Mapping[str, Any], *,
                 event_types: Sequence[str] | None = None,
                 nod_threshold: float = NOD_THRESHOLD) -> dict[str, float]:
  """All SynthDyad §6 coefficient metrics for one clip.

  Args:
    pred_motion: [T', C] generated motion of the avatar ("self"), SynthDyad channel order.
    sample: a SynthDyad sample (generator.make_sample): motion_self [T, C], speaking_self/partner
      [T] bool, events, fps, and audio_self + sample_rate (or a precomputed envelope_self [T]).
    event_types: names indexed by events['type']; defaults to generator.EVENT_TYPES.
    nod_threshold: band amplitude (rad) of a detected nod.

  Returns:
    lip_corr, lip_offset, lip_conf, jaw_leak, nod_f1, smile_resp, brow_resp (NaN where undefined:
    no speech, no partner-only frames, no nods and no detections, no laughter / question), plus
    the counts aggregate() needs: frames, nod_tp, nod_fp, nod_fn, n_laughter, n_question,
    n_speaking, n_partner_only. Prediction and truth are cut to their common length.
  """
  for key in ("motion_self", "speaking_self", "speaking_partner", "events", "fps"):
    if key not in sample:
      raise KeyError(f"clip_metrics: sample lacks '{key}'; found keys {sorted(sample)}")
  pred = _as_motion(pred_motion, "pred_motion")
  true = _as_motion(sample["motion_self"], "sample['motion_self']")
  fps = float(sample["fps"])
  n = min(pred.shape[0], true.shape[0])
  pred, true = pred[:n], true[:n]
  sp_self = np.asarray(sample["speaking_self"], bool)[:n]
  sp_partner = np.asarray(sample["speaking_partner"], bool)[:n]
  if sp_self.shape[0] != n or sp_partner.shape[0] != n:
    raise ValueError(f"speaking_self/partner: expected >= {n} frames, found "
                     f"{sp_self.shape[0]} / {sp_partner.shape[0]}")
  names = tuple(event_types) if event_types is not None else _event_types()
  ev = sample["events"]
  ev_type = np.asarray(ev["type"], np.int64).reshape(-1)
  ev_start = np.asarray(ev["start"], np.float64).reshape(-1)
  ev_end = np.asarray(ev["end"], np.float64).reshape(-1)
  ev_who = np.asarray(ev["who"], np.int64).reshape(-1)
  if not ev_type.size == ev_start.size == ev_end.size == ev_who.size:
    raise ValueError("events: type/start/end/who must have equal length, found "
                     f"{ev_type.size}/{ev_start.size}/{ev_end.size}/{ev_who.size}")
  if ev_type.size and (ev_type.min() < 0 or ev_type.max() >= len(names)):
    raise ValueError(f"events['type'] indexes outside event_types ({len(names)} names)")
  duration = n / fps

  def select(kind: str, who: int) -> np.ndarray:
    if kind not in names:
      raise KeyError(f"event type '{kind}' not in event_types {names}")
    return (ev_type == names.index(kind)) & (ev_who == who)

  out: dict[str, float] = {"frames": float(n)}

  # Talking.
  out["n_speaking"] = float(sp_self.sum())
  out["lip_corr"] = pearson(pred[sp_self, JAW], true[sp_self, JAW]) if sp_self.any() else math.nan
  env = _own_envelope(sample, n)
  c_pred = lag_correlation(pred[:, JAW], env, sp_self)
  c_true = lag_correlation(true[:, JAW], env, sp_self)
  lag_pred, conf = _peak(c_pred, MAX_LAG)
  lag_true, _ = _peak(c_true, MAX_LAG)
  out["lip_offset"] = abs(lag_pred - lag_true)
  out["lip_conf"] = conf
  out["lip_lag"] = lag_pred

  # Listening: jaw leak.
  partner_only = sp_partner & ~sp_self
  out["n_partner_only"] = float(partner_only.sum())
  out["jaw_leak"] = float(pred[partner_only, JAW].mean()) if partner_only.any() else math.nan

  # Listening: nods of the avatar that start inside the clip. While the avatar speaks its head
  # makes beat gestures (sharp pitch dips) with energy in the nod band; nods are a listening
  # behaviour, so detections near its own phrases are not scored ("mm" backchannels are not
  # phrases, so their nods are).
  sel = select("nod", SELF) & (ev_start < duration)
  if "phrase" in names:
    ph = select("phrase", SELF)
    speech = own_phrase_mask(n, fps, ev_start[ph], ev_end[ph])
  else:
    speech = own_phrase_mask(n, fps, np.flatnonzero(sp_self) / fps, np.flatnonzero(sp_self) / fps)
  detections = detect_nods(pred[:, PITCH], fps, nod_threshold, exclude=speech)
  tp = match_events(detections, ev_start[sel], ev_end[sel])
  out["nod_tp"], out["nod_fp"], out["nod_fn"] = float(tp), float(detections.size - tp), float(
      sel.sum() - tp)
  out["nod_f1"] = f1_from_counts(tp, detections.size - tp, sel.sum() - tp)

  # Listening: smile after partner laughter onsets, brow after partner question ends.
  out["smile_resp"], k = response_ratio(pred[:, SMILE], true[:, SMILE],
                                        ev_start[select("laughter", PARTNER)], fps)
  out["n_laughter"] = float(k)
  out["brow_resp"], k = response_ratio(pred[:, BROW], true[:, BROW],
                                       ev_end[select("question", PARTNER)], fps)
  out["n_question"] = float(k)
  return out


# ----------------------------------------------------------------------------------------------
# Over clips
# ----------------------------------------------------------------------------------------------
def aggregate(clips: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Nan-mean of every metric over clips, with `<metric>_n` = clips where it was defined.

  Also `nod_f1_micro` = F1 of the summed nod counts (robust to clips with one or no nods) and
  `clips` = number of clips.
  """
  if not clips:
    raise ValueError("aggregate: no clip results")
  out: dict[str, float] = {"clips": float(len(clips))}
  for name, _ in METRICS + (("lip_lag", ""),):
    vals = np.asarray([c.get(name, math.nan) for c in clips], np.float64)
    ok = ~np.isnan(vals)
    out[name] = float(vals[ok].mean()) if ok.any() else math.nan
    out[name + "_n"] = float(ok.sum())
  tp, fp, fn = (float(sum(c.get(k, 0.0) for c in clips)) for k in ("nod_tp", "nod_fp", "nod_fn"))
  out["nod_tp"], out["nod_fp"], out["nod_fn"] = tp, fp, fn
  out["nod_f1_micro"] = f1_from_counts(tp, fp, fn)
  return out


def _fmt(x: float, digits: int = 3) -> str:
  return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def format_table(rows: Mapping[str, Mapping[str, float]] | Mapping[str, float]) -> str:
  """Markdown table of aggregated SynthDyad metrics: {run name: aggregate()} or one aggregate()."""
  if rows and all(isinstance(v, (int, float)) for v in rows.values()):
    rows = {"": rows}  # a single aggregate
  cols = [m for m, _ in METRICS] + ["nod_f1_micro"]
  arrows = dict(METRICS, nod_f1_micro="↑", fd_face="↓", fvd_face="↓")
  # Generated video (read by the face reader) also has its distribution distances.
  cols += [c for c in ("fd_face", "fvd_face") if any(c in agg for agg in rows.values())]
  head = "| run | " + " | ".join(f"{c} {arrows[c]}" for c in cols) + " | clips |"
  sep = "|" + "---|" * (len(cols) + 2)
  lines = [head, sep]
  for name, agg in rows.items():
    lines.append(f"| {name} | " + " | ".join(_fmt(agg.get(c, math.nan)) for c in cols)
                 + f" | {int(agg.get('clips', 0))} |")
  return "\n".join(lines)
