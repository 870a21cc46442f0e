"""Video metric math against plain references; SynthDyad video metrics through the face reader."""
import math

import numpy as np
import pytest

from avatar_jax.evals import video


def ref_lse(v, a, vshift=15):
  """Loop version of SyncNet's offset search with torch's pairwise_distance."""
  torch = pytest.importorskip("torch")
  v, a = torch.tensor(v), torch.tensor(a)
  ap = torch.nn.functional.pad(a, (0, 0, vshift, vshift))
  win = 2 * vshift + 1
  dists = [torch.nn.functional.pairwise_distance(v[[i], :].repeat(win, 1), ap[i:i + win, :])
           for i in range(len(v))]
  m = torch.mean(torch.stack(dists, 1), 1)
  minval, minidx = torch.min(m, 0)
  return float(minval), float(torch.median(m) - minval), float(vshift - minidx)


@pytest.mark.parametrize("t,d,shift", [(40, 8, 0), (57, 16, 3), (33, 4, -5)])
def test_lse_matches_syncnet_reference(t, d, shift):
  rng = np.random.default_rng(t)
  a = rng.standard_normal((t, d))
  v = np.roll(a, shift, axis=0) + 0.1 * rng.standard_normal((t, d))  # video lags audio by shift
  got = video.lse(v, a)
  d_ref, c_ref, off_ref = ref_lse(v, a)
  assert got["lse_d"] == pytest.approx(d_ref, rel=1e-6)
  assert got["lse_c"] == pytest.approx(c_ref, rel=1e-6, abs=1e-6)
  assert got["lse_offset"] == off_ref == shift  # positive: the video lags the audio


def test_csim_fid_fvd_var():
  rng = np.random.default_rng(1)
  e = rng.standard_normal((20, 6))
  r = rng.standard_normal(6)
  want = np.mean([x @ r / (np.linalg.norm(x) * np.linalg.norm(r)) for x in e])
  assert video.csim(e, r) == pytest.approx(want, rel=1e-12)
  assert video.csim(e, e) == pytest.approx(1.0)
  x = rng.standard_normal((300, 4))
  assert abs(video.fid(x, x)) < 1e-9
  assert video.fvd(x, x + 1.0) == pytest.approx(4.0, rel=1e-6)
  c = rng.standard_normal((50, 3))
  assert video.motion_variance(c) == pytest.approx(np.mean([np.var(c[:, i]) for i in range(3)]))
  with pytest.raises(ValueError, match="zero norm"):
    video.csim(np.zeros((2, 3)), r[:3])


def test_video_metrics_of_truth_render_match_coefficient_metrics():
  sd = pytest.importorskip("avatar_jax.data.synthdyad.generator")
  from avatar_jax.evals import synthdyad_metrics as sm
  s = sd.make_sample("test", 50)
  got = video.video_metrics(s["video"], s)
  want = sm.clip_metrics(s["motion_self"], s)
  assert got["lip_corr"] > 0.98 and got["lip_offset"] == want["lip_offset"] == 0
  assert got["jaw_leak"] < 0.02
  assert abs(got["lip_conf"] - want["lip_conf"]) < 0.05
  for k in ("brow_resp", "smile_resp"):
    assert math.isnan(want[k]) == math.isnan(got[k])
    if not math.isnan(want[k]):
      assert got[k] == pytest.approx(want[k], abs=0.1)
  # A frozen avatar (reference frame repeated) has no lip motion.
  frozen = np.repeat(s["reference_image"][None], len(s["video"]), 0)
  bad = video.video_metrics(frozen, s)
  assert math.isnan(bad["lip_corr"]) or bad["lip_corr"] < 0.3


def test_face_distribution_metrics():
  sd = pytest.importorskip("avatar_jax.data.synthdyad.generator")
  a, b = sd.make_sample("test", 51), sd.make_sample("test", 52)
  clip = slice(0, 60)
  same = video.face_distribution_metrics([a["video"][clip]], [a["video"][clip]],
                                         [a["reference_image"]], [a["reference_image"]])
  assert abs(same["fd_face"]) < 1e-6 and math.isnan(same["fvd_face"])
  frozen = np.repeat(a["reference_image"][None], 60, 0)
  diff = video.face_distribution_metrics([frozen, frozen], [a["video"][clip], b["video"][clip]],
                                         [a["reference_image"]] * 2,
                                         [a["reference_image"], b["reference_image"]])
  assert diff["fd_face"] > 0.1 and np.isfinite(diff["fvd_face"])
