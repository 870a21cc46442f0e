"""SynthDyad motion metrics against hand-built clips with known answers and plain references."""
import itertools
import math

import numpy as np
import pytest

from avatar_jax.evals import synthdyad_metrics as sm

EVENT_TYPES = ("phrase_end", "nod", "smile", "laughter", "question", "backchannel")
FPS = 25.0


def _nod(num_frames, start_s, freq=2.2, amp=0.12, fps=FPS):
  """Damped 2-cycle head_pitch oscillation starting at start_s; returns (track, end_s)."""
  t = np.arange(num_frames) / fps - start_s
  dur = 2.0 / freq
  on = (t >= 0) & (t <= dur)
  x = np.where(on, amp * np.sin(2 * np.pi * freq * t) * np.exp(-1.0 * t), 0.0)
  return x, start_s + dur


def make_clip(rng, num_frames=250, nod_starts=(5.5,), laugh=(1.0,), question=(6.5,)):
  """A hand-built sample: self speaks in [0, 4) s, partner in [4, 10) s."""
  t = np.arange(num_frames) / FPS
  speaking_self = t < 4.0
  speaking_partner = (t >= 4.0) & (t < 9.0)
  # Syllable-rate envelope (~5 Hz, random phases) during own speech, zero elsewhere.
  env = np.clip(np.sin(2 * np.pi * 5.0 * t + rng.uniform(0, 6)) * 0.5 + 0.5
                + 0.2 * rng.standard_normal(num_frames), 0, None) * speaking_self
  motion = np.zeros((num_frames, 12))
  motion[:-1, sm.JAW] = env[1:]          # the jaw leads the audio by one frame
  motion[:, sm.PITCH] = 0.003 * rng.standard_normal(num_frames)
  types, starts, ends, whos = [], [], [], []
  for s in nod_starts:
    x, e = _nod(num_frames, s)
    motion[:, sm.PITCH] += x
    types.append(1); starts.append(s); ends.append(e); whos.append(0)
  for s in laugh:
    motion[:, sm.SMILE] += 0.8 * ((t >= s + 0.4) & (t < s + 2.5))
    types.append(3); starts.append(s); ends.append(s + 0.8); whos.append(1)
  for e in question:
    motion[:, sm.BROW] += 0.6 * ((t >= e + 0.4) & (t < e + 1.5))
    types.append(4); starts.append(e - 0.5); ends.append(e); whos.append(1)
  events = dict(type=np.asarray(types, np.int32), start=np.asarray(starts, np.float32),
                end=np.asarray(ends, np.float32), who=np.asarray(whos, np.int32))
  return dict(motion_self=motion.astype(np.float32), speaking_self=speaking_self,
              speaking_partner=speaking_partner, envelope_self=env.astype(np.float32),
              events=events, fps=FPS)


def metrics(pred, sample, **kw):
  return sm.clip_metrics(pred, sample, event_types=EVENT_TYPES, **kw)


# ---- independent references -------------------------------------------------------------------
def ref_lag_curve(jaw, env, mask, max_lag=15, min_overlap=10):
  out = []
  for k in range(-max_lag, max_lag + 1):
    xs, ys = [], []
    for t in range(len(jaw)):
      if mask[t] and 0 <= t + k < len(jaw):
        xs.append(jaw[t]); ys.append(env[t + k])
    if len(xs) < min_overlap or np.std(xs) == 0 or np.std(ys) == 0:
      out.append(np.nan)
    else:
      out.append(np.corrcoef(xs, ys)[0, 1])
  return np.asarray(out)


def ref_matches(det, starts, ends, tol):
  """Brute force: the largest set of disjoint valid (detection, truth) pairs."""
  best = 0
  valid = [(i, j) for i in range(len(det)) for j in range(len(starts))
           if max(starts[j] - det[i], 0, det[i] - ends[j]) <= tol]
  for r in range(min(len(det), len(starts)), 0, -1):
    for combo in itertools.combinations(valid, r):
      if len({i for i, _ in combo}) == r and len({j for _, j in combo}) == r:
        return r
  return best


def ref_response(x, anchors, fps):
  vals = []
  for a in anchors:
    after = [x[i] for i in range(len(x)) if a + 0.5 <= i / fps < a + 2.0]
    before = [x[i] for i in range(len(x)) if a - 1.0 <= i / fps < a]
    vals.append(np.mean(after) - np.mean(before))
  return np.asarray(vals)


# ---- tests ------------------------------------------------------------------------------------
def test_truth_scores_perfect():
  rng = np.random.default_rng(0)
  s = make_clip(rng)
  m = metrics(s["motion_self"], s)
  assert m["lip_corr"] == pytest.approx(1.0, abs=1e-9)
  assert m["lip_offset"] == 0.0
  assert m["lip_lag"] == 1.0  # the jaw leads by a frame
  assert m["lip_conf"] > 0.5
  assert m["jaw_leak"] == pytest.approx(0.0, abs=1e-12)
  assert m["nod_f1"] == 1.0
  assert m["smile_resp"] == pytest.approx(1.0)
  assert m["brow_resp"] == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [-4, -1, 2, 6])
def test_shifted_jaw_gives_known_offset(shift):
  rng = np.random.default_rng(1)
  s = make_clip(rng)
  pred = s["motion_self"].copy()
  pred[:, sm.JAW] = np.roll(pred[:, sm.JAW], shift)  # pred lags truth by `shift` frames
  m = metrics(pred, s)
  assert m["lip_offset"] == abs(shift)
  assert m["lip_lag"] == 1 - shift


def test_lag_curve_and_conf_match_reference():
  rng = np.random.default_rng(2)
  for n in (37, 120, 251):
    jaw, env = rng.random(n), rng.random(n)
    mask = rng.random(n) < 0.6
    ref = ref_lag_curve(jaw, env, mask)
    got = sm.lag_correlation(jaw, env, mask)
    np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12)
  s = make_clip(rng)
  pred = s["motion_self"] + 0.3 * rng.random(s["motion_self"].shape)
  m = metrics(pred, s)
  ref = ref_lag_curve(pred[:, sm.JAW].astype(np.float64), s["envelope_self"].astype(np.float64),
                      s["speaking_self"])
  assert m["lip_conf"] == pytest.approx(np.nanmax(ref) - np.nanmedian(ref), rel=1e-9)
  sp = s["speaking_self"]
  r = np.corrcoef(pred[sp, sm.JAW], s["motion_self"][sp, sm.JAW])[0, 1]
  assert m["lip_corr"] == pytest.approx(r, rel=1e-9)


def test_jaw_leak():
  rng = np.random.default_rng(3)
  s = make_clip(rng)
  pred = s["motion_self"].copy()
  pred[:, sm.JAW] = 0
  assert metrics(pred, s)["jaw_leak"] == 0.0
  pred[:, sm.JAW] = rng.random(len(pred))
  only = s["speaking_partner"] & ~s["speaking_self"]
  assert metrics(pred, s)["jaw_leak"] == pytest.approx(pred[only, sm.JAW].mean(), rel=1e-12)
  # No partner-only frames → undefined.
  s2 = dict(s, speaking_partner=np.zeros_like(s["speaking_partner"]))
  assert math.isnan(metrics(pred, s2)["jaw_leak"])


def test_planted_nods_detected_and_f1():
  rng = np.random.default_rng(4)
  s = make_clip(rng, nod_starts=(4.5, 6.0, 8.0))
  pred = s["motion_self"].copy()
  det = sm.detect_nods(pred[:, sm.PITCH].astype(np.float64), FPS)
  assert det.size == 3
  for d, start in zip(np.sort(det), (4.5, 6.0, 8.0)):
    assert start - 0.1 <= d <= start + 1.0
  assert metrics(pred, s)["nod_f1"] == 1.0
  # A nod while the avatar itself speaks ([0, 4) s) is a talking gesture, not scored.
  pred_talk = pred.copy()
  pred_talk[:, sm.PITCH] += _nod(len(pred), 1.5)[0]
  assert sm.detect_nods(pred_talk[:, sm.PITCH].astype(np.float64), FPS).size == 4
  assert metrics(pred_talk, s)["nod_f1"] == 1.0
  # Remove one planted nod from the prediction: tp=2, fn=1 → F1 = 4/5.
  x, _ = _nod(len(pred), 6.0)
  pred[:, sm.PITCH] -= x
  m = metrics(pred, s)
  assert (m["nod_tp"], m["nod_fp"], m["nod_fn"]) == (2, 0, 1)
  assert m["nod_f1"] == pytest.approx(0.8)
  # Flat head: nothing detected; with true nods F1 = 0, with none it is undefined.
  pred[:, sm.PITCH] = 0
  assert metrics(pred, s)["nod_f1"] == 0.0
  s_none = make_clip(rng, nod_starts=())
  assert math.isnan(metrics(s_none["motion_self"] * 0, s_none)["nod_f1"])
  # A nod in the prediction where the truth has none is a false positive.
  pred = s_none["motion_self"].copy()
  pred[:, sm.PITCH] += _nod(len(pred), 5.0)[0]
  m = metrics(pred, s_none)
  assert (m["nod_tp"], m["nod_fp"], m["nod_fn"], m["nod_f1"]) == (0, 1, 0, 0.0)


def test_phrase_events_define_the_unscored_speech():
  """With 'phrase' events, detections within 0.2 s of the avatar's own phrases are dropped."""
  rng = np.random.default_rng(12)
  types = EVENT_TYPES + ("phrase",)
  s = make_clip(rng, nod_starts=(6.0,))
  ev = s["events"]
  phrase = len(EVENT_TYPES)
  s["events"] = dict(type=np.append(ev["type"], [phrase, phrase]),
                     start=np.append(ev["start"], [0.2, 7.5]), end=np.append(ev["end"], [3.0, 7.9]),
                     who=np.append(ev["who"], [0, 0]))
  pred = s["motion_self"].copy()
  # 1.0 s: inside a phrase → dropped; 3.6 s: speaking_self but > 0.2 s after the phrase → scored
  # (phrases, not the speaking mask, decide when events exist); 8.8 s: listening → scored.
  for start in (1.0, 3.6, 8.8):
    pred[:, sm.PITCH] += _nod(len(pred), start)[0]
  assert sm.detect_nods(pred[:, sm.PITCH].astype(np.float64), FPS).size == 4
  m = sm.clip_metrics(pred, s, event_types=types)
  assert (m["nod_tp"], m["nod_fp"], m["nod_fn"]) == (1, 2, 0)


def test_matching_equals_brute_force():
  rng = np.random.default_rng(5)
  for _ in range(60):
    det = np.sort(rng.uniform(0, 6, rng.integers(0, 6)))
    starts = np.sort(rng.uniform(0, 6, rng.integers(0, 6)))
    ends = starts + rng.uniform(0, 1, starts.size)
    assert sm.match_events(det, starts, ends, 0.4) == ref_matches(det, starts, ends, 0.4)


def test_responses_match_reference_and_scale():
  rng = np.random.default_rng(6)
  s = make_clip(rng, laugh=(1.0, 5.0), question=(3.0, 6.2))
  true = s["motion_self"].astype(np.float64)
  pred = true.copy()
  pred[:, sm.SMILE] = 0.5 * true[:, sm.SMILE] + 0.2   # half the reaction → 0.5
  pred[:, sm.BROW] = rng.random(len(pred))
  m = metrics(pred, s)
  assert m["smile_resp"] == pytest.approx(0.5, rel=1e-9)
  q = np.array([3.0, 6.2])
  ref = ref_response(pred[:, sm.BROW], q, FPS).mean() / ref_response(true[:, sm.BROW], q, FPS).mean()
  assert m["brow_resp"] == pytest.approx(ref, rel=1e-9)
  assert m["n_laughter"] == 2 and m["n_question"] == 2
  # No laughter → undefined.
  s2 = make_clip(rng, laugh=())
  assert math.isnan(metrics(s2["motion_self"], s2)["smile_resp"])


def test_truncation_aggregate_and_table():
  rng = np.random.default_rng(7)
  clips = [make_clip(rng), make_clip(rng, laugh=(), nod_starts=(5.0, 7.0))]
  res = [metrics(c["motion_self"][:-13], c) for c in clips]  # shorter prediction is fine
  assert res[0]["frames"] == 237
  agg = sm.aggregate(res)
  assert agg["clips"] == 2 and agg["smile_resp_n"] == 1
  assert agg["smile_resp"] == pytest.approx(res[0]["smile_resp"])
  assert agg["lip_corr"] == pytest.approx(np.mean([r["lip_corr"] for r in res]))
  assert agg["nod_f1_micro"] == 1.0
  table = sm.format_table({"truth": agg})
  assert "lip_corr ↑" in table and "| truth |" in table


def test_bad_input_errors():
  rng = np.random.default_rng(8)
  s = make_clip(rng)
  with pytest.raises(ValueError, match="motion"):
    metrics(np.zeros((10, 3)), s)
  with pytest.raises(KeyError, match="speaking_self"):
    metrics(s["motion_self"], {k: v for k, v in s.items() if k != "speaking_self"})


# ---- real SynthDyad samples -------------------------------------------------------------------
def test_truth_on_generated_samples_is_near_perfect():
  sd = pytest.importorskip("avatar_jax.data.synthdyad.generator")
  from avatar_jax.data.synthdyad import audio as sd_audio
  assert tuple(sd.MOTION_CHANNELS[:10]) == sm.CONTRACT_CHANNELS
  res, leaky = [], []
  for split, i in (("test", 0), ("test", 1), ("test", 2), ("test", 3), ("ood", 0), ("ood", 1),
                   ("ood", 2), ("ood", 3)):
    s = sd.make_sample(split, i, render=False)
    m = sm.clip_metrics(s["motion_self"], s)
    assert m["lip_corr"] == pytest.approx(1.0) and m["lip_offset"] == 0 and m["lip_lag"] == 1
    res.append(m)
    # A model that moves its jaw with the partner's audio leaks, and its lips are off.
    bad = s["motion_self"].copy()
    env_p = sd_audio.envelope(s["audio_partner"], s["sample_rate"], s["fps"])[:len(bad)]
    bad[:, sm.JAW] = env_p / max(env_p.max(), 1e-6)
    leaky.append(sm.clip_metrics(bad, s))
  agg, agg_bad = sm.aggregate(res), sm.aggregate(leaky)
  assert agg["jaw_leak"] < 0.02 and agg_bad["jaw_leak"] > 5 * agg["jaw_leak"] + 0.05
  assert agg_bad["lip_corr"] < 0.5 and agg_bad["lip_conf"] < agg["lip_conf"]
  assert agg["nod_f1_micro"] >= 0.9
  for key in ("smile_resp", "brow_resp"):
    assert agg[key + "_n"] == 0 or agg[key] == pytest.approx(1.0)
