"""SynthDyad generator: determinism, shapes, splits, and the generative rules checked on the truth."""
import concurrent.futures
import dataclasses
import functools
import multiprocessing

import numpy as np
import pytest
import scipy.fft

from avatar_jax.data.synthdyad import audio
from avatar_jax.data.synthdyad import flame
from avatar_jax.data.synthdyad import generator as sd
from avatar_jax.data.synthdyad import render

EV = {name: i for i, name in enumerate(sd.EVENT_TYPES)}
C = {name: i for i, name in enumerate(sd.MOTION_CHANNELS)}
VIDEO_KEYS = ("video", "partner_video", "reference_image")


def _equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    if isinstance(a[k], dict):
      _equal(a[k], b[k])
    elif isinstance(a[k], np.ndarray):
      assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k
    else:
      assert a[k] == b[k], k


def _short(split="train", **kw):
  return dataclasses.replace(sd.regime_for(split), **kw)


@pytest.fixture(scope="module")
def convs():
  """A few long-ish conversations (render-free) for the statistical rule checks."""
  cfg = _short(duration_s=30.0)
  return [sd.make_conversation("train", i, seed=11, config=cfg) for i in range(8)]


def _ev(events, name, who=None):
  sel = events["type"] == EV[name]
  if who is not None:
    sel &= events["who"] == who
  return events["start"][sel].astype(np.float64), events["end"][sel].astype(np.float64)


# ----------------------------------------------------------------------------------------------
# Contract: names, determinism, shapes
# ----------------------------------------------------------------------------------------------
def test_public_names():
  assert sd.MOTION_CHANNELS[:10] == ("jaw_open", "lip_round", "smile", "blink", "brow_raise",
                                     "gaze_x", "gaze_y", "head_pitch", "head_yaw", "head_roll")
  for name in ("phrase_end", "nod", "smile", "laughter", "question", "backchannel"):
    assert name in sd.EVENT_TYPES
  assert sd.SynthDyadConfig() == sd.regime_for("train")
  with pytest.raises(ValueError, match="split"):
    sd.make_sample("valid", 0)
  with pytest.raises(ValueError, match="nod_delay_range"):
    sd.SynthDyadConfig(nod_delay_range=(0.1, 0.5))


def test_determinism_and_order_independence():
  cfg = _short(duration_s=2.0, resolution=32)
  a = sd.make_sample("train", 5, seed=3, config=cfg)
  b = sd.make_sample("train", 5, seed=3, config=cfg)
  _equal(a, b)
  # Generated after others, in another order, or on other threads: identical.
  for i in (7, 0, 4, 2):
    sd.make_sample("train", i, seed=3, config=cfg)
  _equal(a, sd.make_sample("train", 5, seed=3, config=cfg))
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    many = list(pool.map(lambda i: sd.make_sample("train", i, seed=3, config=cfg), [6, 5, 4]))
  _equal(a, many[1])
  # ... and in fresh worker processes.
  spawn = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(2, mp_context=spawn) as pool:
    many = list(pool.map(functools.partial(sd.make_sample, "train", seed=3, config=cfg), [2, 5]))
  _equal(a, many[1])
  # Other seed / index / split differ.
  c = sd.make_sample("train", 5, seed=4, config=cfg)
  assert not np.array_equal(a["audio_mix"], c["audio_mix"])
  d = sd.make_sample("train", 7, seed=3, config=cfg)
  assert not np.array_equal(a["audio_mix"], d["audio_mix"])
  e = sd.make_sample("test", 5, seed=3, config=cfg)
  assert not np.array_equal(a["audio_mix"], e["audio_mix"])
  # render=False is the same sample without the frames.
  f = sd.make_sample("train", 5, seed=3, config=cfg, render=False)
  _equal({k: v for k, v in a.items() if k not in VIDEO_KEYS}, f)


def test_two_perspectives_of_one_conversation():
  cfg = _short(duration_s=3.0)
  a = sd.make_sample("train", 8, config=cfg, render=False)
  b = sd.make_sample("train", 9, config=cfg, render=False)
  for x, y in (("audio_self", "audio_partner"), ("motion_self", "motion_partner"),
               ("flame56_self", "flame56_partner"), ("speaking_self", "speaking_partner"),
               ("identity_self", "identity_partner")):
    assert np.array_equal(a[x], b[y]) and np.array_equal(a[y], b[x])
  assert np.array_equal(a["audio_mix"], b["audio_mix"])
  assert np.array_equal(a["events"]["start"], b["events"]["start"])
  assert np.array_equal(a["events"]["who"], 1 - b["events"]["who"])


@pytest.mark.parametrize("split", ["train", "test", "ood"])
def test_shapes_dtypes_ranges(split):
  cfg = _short(split, duration_s=2.36, resolution=32)  # T = 59, S = 37760: awkward sizes
  s = sd.make_sample(split, 3, seed=1, config=cfg)
  t, n = 59, 37760
  assert set(s) == {
      "video", "partner_video", "reference_image", "audio_self", "audio_partner",
      "audio_background", "audio_mix", "motion_self", "motion_partner", "flame56_self",
      "flame56_partner", "speaking_self", "speaking_partner", "events", "fps", "sample_rate",
      "seed", "identity_self", "identity_partner"}
  for k in ("video", "partner_video"):
    assert s[k].shape == (t, 32, 32, 3) and s[k].dtype == np.uint8
  assert s["reference_image"].shape == (32, 32, 3) and s["reference_image"].dtype == np.uint8
  for k in ("audio_self", "audio_partner", "audio_background", "audio_mix"):
    assert s[k].shape == (n,) and s[k].dtype == np.float32 and np.all(np.isfinite(s[k]))
    assert np.abs(s[k]).max() <= 1.0
  for k in ("motion_self", "motion_partner"):
    m = s[k]
    assert m.shape == (t, len(sd.MOTION_CHANNELS)) and m.dtype == np.float32
    for name in ("jaw_open", "smile", "blink", "brow_raise"):
      assert 0.0 <= m[:, C[name]].min() and m[:, C[name]].max() <= 1.0
    assert np.abs(m[:, C["lip_round"]]).max() <= 1.0
    assert np.abs(m[:, C["head_pitch"]:C["head_roll"] + 1]).max() < 0.6
  for k in ("flame56_self", "flame56_partner"):
    assert s[k].shape == (t, 56) and s[k].dtype == np.float32
  for k in ("speaking_self", "speaking_partner"):
    assert s[k].shape == (t,) and s[k].dtype == bool
  ev = s["events"]
  assert set(ev) == {"type", "start", "end", "who"}
  e = ev["type"].shape[0]
  assert ev["type"].dtype == np.int32 and ev["who"].dtype == np.int32
  assert ev["start"].dtype == np.float32 and ev["end"].dtype == np.float32
  assert all(ev[k].shape == (e,) for k in ev)
  assert np.all((ev["type"] >= 0) & (ev["type"] < len(sd.EVENT_TYPES)))
  assert np.all(ev["start"] <= ev["end"]) and np.all(ev["start"] < cfg.duration_s)
  assert set(np.unique(ev["who"])) <= {0, 1}
  assert (s["fps"], s["sample_rate"], s["seed"]) == (25, 16000, 1)
  lo, count = sd.IDENTITY_POOLS[split]
  assert lo <= s["identity_self"] < lo + count and s["identity_self"] != s["identity_partner"]


def test_any_length_without_render():
  cfg = _short(duration_s=60.0)
  s = sd.make_sample("train", 0, config=cfg, render=False)
  assert not set(VIDEO_KEYS) & set(s)
  assert s["motion_self"].shape == (1500, len(sd.MOTION_CHANNELS))
  assert s["audio_mix"].shape == (960000,)
  assert s["speaking_self"].mean() > 0.2 and s["speaking_partner"].mean() > 0.2
  assert s["events"]["start"].max() > 55.0
  # Other rates work too.
  s = sd.make_sample("train", 0, config=_short(duration_s=1.5, fps=30, sample_rate=22050),
                     render=False)
  assert s["motion_self"].shape[0] == 45 and s["audio_self"].shape == (33075,)


@pytest.mark.parametrize("res", [128, 256])
def test_large_resolutions(res):
  cfg = _short(duration_s=0.2, resolution=res)  # 5 frames
  s = sd.make_sample("test", 1, config=cfg)
  assert s["video"].shape == (5, res, res, 3) and s["partner_video"].shape == (5, res, res, 3)
  ident = sd.identity_for("test", s["identity_self"], 0)
  small = render.render(s["motion_self"], ident, 64).astype(np.float64)
  # Same picture at every resolution: block-average down to 64 and compare.
  k = res // 64
  down = s["video"].astype(np.float64).reshape(5, 64, k, 64, k, 3).mean((2, 4))
  assert np.abs(down - small).mean() < 4.0


def test_reference_image_is_neutral_render():
  for split, index in (("train", 0), ("test", 3), ("ood", 1)):
    cfg = _short(split, duration_s=0.4, resolution=48)
    s = sd.make_sample(split, index, seed=2, config=cfg)
    ident = sd.identity_for(split, s["identity_self"], 2)
    neutral = np.zeros((1, len(sd.MOTION_CHANNELS)), np.float32)
    assert np.array_equal(s["reference_image"], render.render(neutral, ident, 48)[0])
    assert np.array_equal(s["video"], render.render(s["motion_self"], ident, 48))
    partner = sd.identity_for(split, s["identity_partner"], 2)
    assert np.array_equal(s["partner_video"], render.render(s["motion_partner"], partner, 48))


def test_render_boxes_never_cut_a_part():
  rng = np.random.default_rng(3)
  n = 24
  m = np.zeros((n, len(sd.MOTION_CHANNELS)), np.float32)
  for name, lo, hi in (("jaw_open", 0, 1), ("lip_round", -1, 1), ("smile", 0, 1), ("blink", 0, 1),
                       ("brow_raise", 0, 1), ("gaze_x", -1, 1), ("gaze_y", -1, 1),
                       ("head_pitch", -0.4, 0.4), ("head_yaw", -0.5, 0.5),
                       ("head_roll", -0.4, 0.4)):
    m[:, C[name]] = rng.uniform(lo, hi, n)
  m[:4, C["jaw_open"]], m[:4, C["smile"]], m[:4, C["brow_raise"]] = 1.0, 1.0, 1.0
  for res in (23, 64):
    ident = sd.identity_for("train", int(rng.integers(1000)))
    colours = render._colours(ident)
    fast = render._render_block(m, ident, res, colours)
    full = render._render_block(m, ident, res, colours, boxes=False)
    np.testing.assert_allclose(fast, full, atol=1e-5)


def test_renderer_responds_to_each_channel():
  ident = sd.identity_for("train", 17)
  base = render.render(render.neutral_motion(1), ident, 64)[0].astype(np.float64)
  for name, value in (("jaw_open", 1.0), ("lip_round", 1.0), ("lip_round", -1.0), ("smile", 1.0),
                      ("blink", 1.0), ("brow_raise", 1.0), ("gaze_x", 1.0), ("gaze_y", 1.0),
                      ("head_pitch", 0.15), ("head_yaw", 0.3), ("head_roll", 0.3)):
    m = render.neutral_motion(1)
    m[0, C[name]] = value
    img = render.render(m, ident, 64)[0].astype(np.float64)
    assert np.abs(img - base).sum() > 300.0, name
  # Anti-aliased: edge pixels take intermediate values, not only the layer colours.
  assert len(np.unique(base.reshape(-1, 3), axis=0)) > 20
  with pytest.raises(ValueError, match="motion"):
    render.render(np.zeros((3, 4)), ident, 64)


# ----------------------------------------------------------------------------------------------
# Splits and regimes
# ----------------------------------------------------------------------------------------------
def test_splits_identities_and_regimes():
  ids = {split: set() for split in ("train", "test", "ood")}
  for split in ids:
    for i in range(30):
      c = sd.make_conversation(split, i, seed=5, config=_short(split, duration_s=0.5))
      ids[split].update(x.identity_id for x in c.identities)
  assert not ids["train"] & ids["test"] and not ids["train"] & ids["ood"]
  assert not ids["test"] & ids["ood"]
  with pytest.raises(ValueError, match="pool"):
    sd.identity_for("test", 3)
  # Identity = f(seed, id); voice and face parameters inside the documented ranges.
  for i in range(0, 1000, 97):
    x = sd.identity_for("train", i, seed=5)
    assert x == sd.identity_for("train", i, seed=5)
    assert 0.75 <= x.face_aspect <= 0.95 and 90 <= x.f0_base <= 250
    assert 0.85 <= x.formant_scale <= 1.15 and 3.5 <= x.speaking_rate <= 6.0
  train, ood = sd.regime_for("train"), sd.regime_for("ood")
  assert ood.duration_s > train.duration_s
  assert ood.speaking_rate_range[0] >= train.speaking_rate_range[0]
  assert ood.nod_delay_range != train.nod_delay_range
  assert sd.regime_for("test") == train

  def syllable_rate(split, n=6):
    c = dataclasses.replace(sd.regime_for(split), duration_s=10.0)
    rates = []
    for i in range(n):
      for ph in sd.make_conversation(split, i, config=c).script.phrases:
        speech = ph.syllables[-1].end - ph.syllables[0].start
        rates.append(len(ph.syllables) / speech)
    return np.mean(rates)
  assert syllable_rate("ood") > syllable_rate("train") * 1.1
  s = sd.make_sample("ood", 0, render=False)
  assert s["motion_self"].shape[0] == round(ood.duration_s * 25)


# ----------------------------------------------------------------------------------------------
# The script (SYNTHDYAD.md §1)
# ----------------------------------------------------------------------------------------------
def test_script_structure(convs):
  n_q = n_ph = n_laugh_turns = n_turns = 0
  for c in convs:
    sc = c.script
    turns = sc.turns
    for i, turn in enumerate(turns):
      n_turns += 1
      assert turn.speaker == (turns[0].speaker + i) % 2  # alternation
      assert 1.5 - 1e-9 <= turn.end - turn.start <= 4.0 + 1e-9
      if i:
        gap = turn.start - turns[i - 1].end
        assert -0.3 - 1e-9 <= gap <= 0.6 + 1e-9 and not 0.0 < gap < 0.1 - 1e-9
    by_turn = {}
    for ph in sc.phrases:
      by_turn.setdefault(ph.turn, []).append(ph)
      n_ph += 1
      n_q += ph.question
      assert 2 <= len(ph.syllables) <= 8
      if ph.laughter is not None:
        assert 3 <= ph.laugh_bursts <= 5 and 4.5 <= ph.laugh_rate <= 5.5
        assert 0.6 - 1e-9 <= ph.laughter[1] - ph.laughter[0] <= 1.2
        assert not ph.question
    for phs in by_turn.values():
      n_laugh_turns += any(p.laughter is not None for p in phs)
      for p, q in zip(phs, phs[1:]):
        assert q.start - p.end >= 0.25 - 1e-9  # pauses between phrases
    for bc in sc.backchannels:
      assert 0.15 <= bc.end - bc.start <= 0.25
  assert 0.08 < n_q / n_ph < 0.35
  assert 0.03 < n_laugh_turns / n_turns < 0.35


# ----------------------------------------------------------------------------------------------
# Audio (§2)
# ----------------------------------------------------------------------------------------------
def test_envelope_matches_reference_loop():
  rng = np.random.default_rng(0)
  for n, sr, fps in ((12345, 16000, 25), (7001, 8000, 30)):
    wave = rng.standard_normal(n).astype(np.float32)
    env = audio.envelope(wave, sr, fps)
    t = round(n * fps / sr)
    assert env.shape == (t,)
    half = round(0.02 * sr)
    ref = np.empty(t)
    for k in range(t):
      c = round(k * sr / fps)
      seg = wave[max(c - half, 0):max(min(c + half, n), 0)].astype(np.float64)
      ref[k] = np.sqrt(np.sum(seg ** 2) / (2 * half))
    np.testing.assert_allclose(env, ref, rtol=1e-5, atol=1e-7)


def test_mixture_and_snr(convs):
  for c in convs:
    speech = c.audio.astype(np.float64).sum(0)
    snr = 10 * np.log10(np.mean(speech ** 2) / np.mean(c.background.astype(np.float64) ** 2))
    assert 10.0 <= snr <= 30.0 and abs(snr - c.snr_db) < 0.01
    np.testing.assert_allclose(c.mixture, np.clip(speech + c.background, -1, 1), atol=1e-6)
    # Clean tracks are silent outside own phrases and backchannels.
    for who in (0, 1):
      t = np.arange(c.audio.shape[1]) / c.config.sample_rate
      inside = np.zeros(t.shape, bool)
      for ph in c.script.phrases_of(who):
        inside |= (t >= ph.start - 1e-3) & (t < ph.end + 1e-3)
      for bc in c.script.backchannels:
        if bc.who == who:
          inside |= (t >= bc.start - 1e-3) & (t < bc.end + 1e-3)
      assert np.all(c.audio[who][~inside] == 0.0)


def _f0(x, sr):
  """Autocorrelation F0 estimate (Hz) of a short voiced frame, search 70–450 Hz."""
  x = x - x.mean()
  r = np.correlate(x, x, "full")[x.size - 1:]
  lo, hi = int(sr / 450), int(sr / 70)
  return sr / (lo + np.argmax(r[lo:hi]))


def test_question_f0_rises_and_declination():
  cfg = _short(duration_s=30.0, p_question=0.5)
  rises, falls = [], []
  for i in range(4):
    c = sd.make_conversation("train", i, config=cfg)
    sr = cfg.sample_rate
    for ph in c.script.phrases:
      last = ph.syllables[-1]
      v0 = last.start + last.onset_s
      dur = last.end - v0
      if last.end > cfg.duration_s or dur < 0.12 or ph.laughter is not None:
        continue
      w = int(0.04 * sr)

      def at(frac, ph=ph, v0=v0, dur=dur):
        a = int((v0 + frac * dur) * sr) - w // 2
        return _f0(c.audio[ph.speaker, a:a + w].astype(np.float64), sr)
      ratio = at(0.75) / at(0.3)
      (rises if ph.question else falls).append(ratio)
  assert len(rises) >= 10 and len(falls) >= 10
  assert np.median(rises) > 1.12 and np.median(falls) < 1.03


# ----------------------------------------------------------------------------------------------
# Motion rules (§3), checked on the generated truth
# ----------------------------------------------------------------------------------------------
def _dilate(mask, k):
  out = mask.copy()
  for s in range(1, k + 1):
    out[:-s] |= mask[s:]
    out[s:] |= mask[:-s]
  return out


def test_jaw_follows_own_envelope_one_frame_ahead(convs):
  for c in convs:
    for who in (0, 1):
      jaw = c.motion[who, :, C["jaw_open"]].astype(np.float64)
      env = audio.envelope(c.audio[who], c.config.sample_rate, c.config.fps).astype(np.float64)
      # The rule, exactly (the last frame looks past the clip end).
      np.testing.assert_allclose(jaw[:-1], np.clip(16.0 * env[1:], 0, 1), atol=1e-6)
      lags = list(range(-5, 6))
      r = [np.corrcoef(jaw[max(0, -k):len(jaw) - max(0, k)],
                       env[max(0, k):len(env) - max(0, -k)])[0, 1] for k in lags]
      assert lags[int(np.argmax(r))] == 1 and max(r) > 0.95


def test_listener_jaw_stays_closed(convs):
  for c in convs:
    for who in (0, 1):
      own = _dilate(c.speaking[who], 2)
      only_partner = c.speaking[1 - who] & ~own
      assert only_partner.sum() > 50
      assert np.abs(c.motion[who, only_partner, C["jaw_open"]]).max() < 1e-3
      # Speaking frames do open the jaw.
      assert c.motion[who, c.speaking[who], C["jaw_open"]].mean() > 0.15


def test_backchannels_small_jaw_and_one_nod(convs):
  n = 0
  for c in convs:
    nods = {(x.who, round(x.start, 6)): x for x in c.script.nods}
    for bc in c.script.backchannels:
      if bc.end > c.config.duration_s - 0.1:
        continue
      n += 1
      assert (bc.who, round(bc.start, 6)) in nods  # each "mm" comes with a nod starting with it
      f = np.arange(int(np.ceil(bc.start * 25)) - 1, int(bc.end * 25) + 1)
      jaw = c.motion[bc.who, f, C["jaw_open"]]
      assert 0.0 < jaw.max() < 0.45
  assert n >= 5


def _turn_start_at(events, t, who):
  ts, te = _ev(events, "turn", who)
  inside = (ts <= t + 1e-5) & (te >= t - 1e-5)
  return ts[inside]


def test_nod_trigger_and_timing(convs):
  n_rule = 0
  for c in convs:
    ev = c.events
    for who in (0, 1):
      nod_s, nod_e = _ev(ev, "nod", who)
      pe, _ = _ev(ev, "phrase_end", 1 - who)
      bc_s, _ = _ev(ev, "backchannel", who)
      for s, e in zip(nod_s, nod_e):
        if e >= c.config.duration_s - 1e-4:
          continue  # clipped by the clip end
        d = s - pe
        cands = pe[(d >= 0.2 - 1e-4) & (d <= 0.6 + 1e-4)]
        assert cands.size, f"nod at {s:.2f} is not 0.2-0.6 s after a partner phrase end"
        if e - s < 0.6:  # one cycle at 2-2.5 Hz: the nod of a backchannel, starting with it
          assert 0.4 - 1e-4 <= e - s <= 0.5 + 1e-4
          assert np.any(np.abs(bc_s - s) < 1e-5), f"one-cycle nod at {s:.2f} without an 'mm'"
          continue
        n_rule += 1
        assert 0.8 - 1e-4 <= e - s <= 1.0 + 1e-4  # listening nod: two cycles at 2-2.5 Hz
        ok = [p - ts.min() >= 1.5 - 1e-4 for p in cands
              for ts in [_turn_start_at(ev, p, 1 - who)] if ts.size]
        assert any(ok), f"nod at {s:.2f} after < 1.5 s of partner speech"
        # The head really nods: a downward swing of >= 0.05 rad in the first half cycle.
        f = np.arange(int(s * 25), min(int(s * 25) + 8, c.motion.shape[1]))
        pitch = c.motion[who, f, C["head_pitch"]]
        assert pitch.min() - pitch[0] < -0.05
  assert n_rule >= 10


def test_nod_probability_given_trigger(convs):
  eligible = nodded = 0
  for c in convs:
    turn_start = {i: t.start for i, t in enumerate(c.script.turns)}
    for ph in c.script.phrases:
      listener = 1 - ph.speaker
      if ph.end - turn_start[ph.turn] < 1.5 or ph.end > c.config.duration_s - 1.5:
        continue
      busy = any(p.speaker == listener and p.start < ph.end + 1.2 and p.end > ph.end
                 for p in c.script.phrases)
      if busy:
        continue
      eligible += 1
      nodded += any(n.who == listener and n.cycles == 2 and 0.2 <= n.start - ph.end <= 0.6
                    for n in c.script.nods)
  assert eligible >= 20
  assert 0.45 <= nodded / eligible <= 0.9


def test_smiles_follow_partner_laughter(convs):
  n = 0
  for c in convs:
    ev, T = c.events, c.motion.shape[1]
    for who in (0, 1):
      sm_s, sm_e = _ev(ev, "smile", who)
      la_s, _ = _ev(ev, "laughter", 1 - who)
      for s in sm_s:
        d = s - la_s
        assert np.any((d >= 0.2 - 1e-4) & (d <= 0.8 + 1e-4))
      for la in la_s:
        if la + 1.2 > c.config.duration_s:
          continue
        n += 1
        d = sm_s - la
        assert np.any((d >= 0.2 - 1e-4) & (d <= 0.8 + 1e-4)), "partner laughter without smile"
      smile = c.motion[who, :, C["smile"]]
      t = np.arange(T) / 25
      active = np.zeros(T, bool)
      for s, e in zip(sm_s, sm_e):
        active |= (t >= s) & (t <= e)
        held = (t >= s + 0.3) & (t <= s + 1.3)
        assert smile[held].min() > 0.3
      assert np.all(smile[~active] == 0.0)
  assert n >= 3


def test_brows_follow_partner_questions(convs):
  n = 0
  for c in convs:
    ev, T = c.events, c.motion.shape[1]
    for who in (0, 1):
      br_s, br_e = _ev(ev, "brow_raise", who)
      _, q_end = _ev(ev, "question", 1 - who)
      for s in br_s:
        d = s - q_end
        assert np.any((d >= 0.3 - 1e-4) & (d <= 0.6 + 1e-4))
      for q in q_end:
        if q + 0.8 > c.config.duration_s:
          continue
        n += 1
        d = br_s - q
        assert np.any((d >= 0.3 - 1e-4) & (d <= 0.6 + 1e-4)), "partner question without brow"
        f = int(np.ceil((q + 0.75) * 25))
        assert c.motion[who, f, C["brow_raise"]] > 0.3
      t = np.arange(T) / 25
      active = np.zeros(T, bool)
      for s, e in zip(br_s, br_e):
        active |= (t >= s) & (t <= e)
      assert np.all(c.motion[who, ~active, C["brow_raise"]] == 0.0)
  assert n >= 5


def test_lip_round_speech_beats_gaze_blinks(convs):
  rounds = {"u": [], "o": [], "i": [], "e": [], "a": []}
  beat_dips, gaze_away, blinks, dur = [], [], 0, 0.0
  for c in convs:
    m = c.motion
    for ph in c.script.phrases:
      for syl in ph.syllables:
        f = int(np.ceil((syl.end - 0.01) * 25)) - 1  # the last frame in the syllable
        if syl.end - syl.start > 0.15 and syl.end < c.config.duration_s:
          rounds[syl.vowel].append(m[ph.speaker, f, C["lip_round"]])
        if syl.accent and syl.beat_time + 0.5 < c.config.duration_s and syl.beat_time > 0.5:
          f0 = int(round(syl.beat_time * 25))
          pitch = m[ph.speaker, :, C["head_pitch"]]
          beat_dips.append(pitch[f0] - 0.5 * (pitch[f0 - 10] + pitch[f0 + 10]))
    for turn in c.script.turns:
      if turn.end < c.config.duration_s:
        f = int(np.ceil((turn.start + 0.4) * 25))
        gaze_away.append(m[turn.speaker, f, C["gaze_x"]] * turn.gaze_side)
    blinks += int((c.events["type"] == EV["blink"]).sum())
    dur += 2 * c.config.duration_s
  assert np.mean(rounds["u"] + rounds["o"]) > 0.4 and np.mean(rounds["i"] + rounds["e"]) < -0.3
  assert abs(np.mean(rounds["a"])) < 0.25
  assert np.median(beat_dips) < -0.03  # accented syllables dip the head
  assert np.median(gaze_away) > 0.3  # speakers look away early in their turn
  assert 0.3 <= blinks / dur <= 0.6  # Poisson 0.3/s plus turn-start blinks


# ----------------------------------------------------------------------------------------------
# The 56-d DualTalk layout
# ----------------------------------------------------------------------------------------------
def test_flame56_map_and_round_trip():
  # Independent reference: the orthonormal DCT-II matrix from scipy.
  dct = scipy.fft.dct(np.eye(50), norm="ortho", axis=0)  # rows = basis vectors
  basis = dct[:6].T
  np.testing.assert_allclose(flame.EXP_BASIS, basis, atol=1e-12)
  np.testing.assert_allclose(flame.EXP_BASIS.T @ flame.EXP_BASIS, np.eye(6), atol=1e-12)
  rng = np.random.default_rng(1)
  m = rng.uniform(-1, 1, (3, 7, len(sd.MOTION_CHANNELS))).astype(np.float32)
  f = flame.to_flame56(m)
  assert f.shape == (3, 7, 56) and f.dtype == np.float32
  expr = m[..., [C[k] for k in ("lip_round", "smile", "blink", "brow_raise", "gaze_x", "gaze_y")]]
  np.testing.assert_allclose(f[..., :50], expr.astype(np.float64) @ basis.T, atol=1e-6)
  np.testing.assert_allclose(f[..., 50], 0.3 * m[..., C["jaw_open"]], atol=1e-6)
  assert np.all(f[..., 51:53] == 0)
  np.testing.assert_allclose(f[..., 53:], m[..., C["head_pitch"]:C["head_roll"] + 1], atol=1e-7)
  np.testing.assert_allclose(flame.from_flame56(f), m, atol=1e-6)
  s = sd.make_sample("ood", 4, config=_short("ood", duration_s=1.0), render=False)
  np.testing.assert_allclose(flame.from_flame56(s["flame56_partner"]), s["motion_partner"],
                             atol=1e-6)
  with pytest.raises(ValueError, match="56"):
    flame.from_flame56(np.zeros((4, 55)))


def test_syllable_spectra_consonants_and_laughter_rhythm():
  from avatar_jax.data.synthdyad import script as script_lib
  sr = 16000
  ident = dataclasses.replace(sd.identity_for("train", 3), f0_base=120.0, formant_scale=1.0)
  rng = np.random.default_rng(0)

  def vowel_spectrum(v):
    syl = script_lib.Syllable(0.0, 0.3, 0.0, v, False, 0.0, 0.0)
    ph = script_lib.Phrase(0, 0, 0.0, 0.3, (syl,), False, None, 0, 0.0)
    x = np.concatenate([audio._syllable(rng, syl, ph, ident, sr)[1] for _ in range(4)])
    f = np.fft.rfftfreq(x.size, 1 / sr)
    return f, np.abs(np.fft.rfft(x)) ** 2

  def band(f, p, lo, hi):
    return p[(f >= lo) & (f < hi)].sum() / p.sum()
  f, pa = vowel_spectrum("a")
  _, pi = vowel_spectrum("i")
  _, pu = vowel_spectrum("u")
  assert band(f, pi, 2000, 2600) > 5 * band(f, pa, 2000, 2600)  # F2 of /i/ ~2.3 kHz
  assert band(f, pa, 600, 1200) > 2 * band(f, pi, 600, 1200)  # F1-F2 of /a/ ~0.7-1.1 kHz
  assert band(f, pu, 200, 400) > 2 * band(f, pa, 200, 400)  # F1 of /u/ ~300 Hz
  # Consonant onsets are noisy: many more zero crossings than the vowel after them.
  syl = script_lib.Syllable(0.0, 0.25, 0.05, "a", False, 0.0, 0.0)
  ph = script_lib.Phrase(0, 0, 0.0, 0.25, (syl,), False, None, 0, 0.0)
  x = audio._syllable(rng, syl, ph, ident, sr)[1]

  def zcr(y):
    return np.mean(np.abs(np.diff(np.sign(y))) > 0)
  assert zcr(x[:800]) > 3 * zcr(x[800:])
  # Laughter: the envelope is modulated at the burst rate.
  for rate, n in ((4.6, 5), (5.4, 4)):
    ph = script_lib.Phrase(0, 0, 0.0, 2.0, (), False, (0.5, 0.5 + n / rate), n, rate)
    track = np.zeros(2 * sr)
    for start, burst in audio._laughter(rng, ph, ident, sr):
      track[start:start + burst.size] += burst
    env = audio.envelope(track, sr, 100)[50:50 + int(100 * n / rate)]
    spec = np.abs(np.fft.rfft(env - env.mean(), 1024))
    peak = np.fft.rfftfreq(1024, 0.01)[np.argmax(spec)]
    assert abs(peak - rate) < 0.3, (peak, rate)
