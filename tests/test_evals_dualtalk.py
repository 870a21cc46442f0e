"""DualTalk / TIMAR metrics and the Fréchet distance against plain float64 references."""
import math
import os

import numpy as np
import pytest
from scipy import stats

from avatar_jax.evals import dualtalk as dt
from avatar_jax.evals import frechet

GROUPS = {"exp": (0, 50), "jaw": (50, 53), "pose": (53, 56)}


# ---- independent references -------------------------------------------------------------------
def ref_fd(x, y):
  """FD with tr sqrtm(S1 S2) = Σ sqrt(eigenvalues of S1 S2) (real, >= 0 for PSD S1, S2)."""
  m1, m2 = x.mean(0), y.mean(0)
  c1 = (x - m1).T @ (x - m1) / (len(x) - 1)
  c2 = (y - m2).T @ (y - m2) / (len(y) - 1)
  ev = np.linalg.eigvals(c1 @ c2)
  return float(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2)
               - 2 * np.sqrt(np.clip(ev.real, 0, None)).sum())


def ref_sts(p, g, timestep=0.1):
  total = 0.0
  for d in range(p.shape[1]):
    for i in range(1, p.shape[0]):
      total += ((p[i, d] - p[i - 1, d]) - (g[i, d] - g[i - 1, d])) ** 2 / timestep
  return math.sqrt(total)


def ref_entropy(labels, k):
  counts = [0] * k
  for lab in labels:
    counts[lab] += 1
  return -sum(c / len(labels) * math.log2(c / len(labels) + 1e-6) for c in counts)


def random_clip(rng, n, scale=1.0):
  """A smooth-ish [n, 56] track with group-specific magnitudes like FLAME's."""
  x = np.cumsum(rng.standard_normal((n, 56)), 0) * 0.05
  x[:, 50:53] *= 0.05
  x[:, 53:56] *= 0.2
  return x * scale + rng.standard_normal((n, 56)) * 0.01


# ---- Fréchet ----------------------------------------------------------------------------------
def test_frechet_matches_eigen_reference():
  rng = np.random.default_rng(0)
  for n, m, d in ((200, 150, 3), (120, 300, 10), (500, 400, 50)):
    a = rng.standard_normal((d, d))
    x = rng.standard_normal((n, d)) @ a
    y = rng.standard_normal((m, d)) @ (a + 0.3 * rng.standard_normal((d, d))) + 0.5
    assert frechet.fd(x, y) == pytest.approx(ref_fd(x, y), rel=1e-6)


def test_frechet_self_zero_and_closed_form():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((400, 8))
  assert abs(frechet.fd(x, x)) < 1e-8
  # N(mu1, diag a) vs N(mu2, diag b): |mu1 - mu2|^2 + Σ (sqrt a - sqrt b)^2.
  mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
  a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
  want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
  assert frechet.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)
  # Same covariance, shifted mean: exactly |shift|^2.
  q = np.linalg.qr(rng.standard_normal((6, 6)))[0]
  s = q @ np.diag(a) @ q.T
  assert frechet.frechet_distance(mu1, s, mu1 + 2.0, s) == pytest.approx(4.0 * 6, rel=1e-7)


def test_running_stats_equal_batch():
  rng = np.random.default_rng(2)
  x = rng.standard_normal((257, 5)) * 3 + 100
  rs = frechet.RunningStats(5)
  for chunk in np.array_split(x, 7):
    rs.update(chunk)
  m, c = rs.stats()
  np.testing.assert_allclose(m, x.mean(0), rtol=1e-12)
  np.testing.assert_allclose(c, np.cov(x, rowvar=False), rtol=1e-9)


# ---- per-metric references ---------------------------------------------------------------------
@pytest.mark.parametrize("lens", [(130, 130, 130), (157, 149, 171), (90, 120, 101)])
def test_clip_metrics_match_references(lens):
  rng = np.random.default_rng(sum(lens))
  pred, gt, partner = (random_clip(rng, n) for n in lens)
  m = dt.clip_metrics(pred, gt, partner, seed=3)
  n = min(lens)
  assert m["frames"] == n
  for g, (a, b) in GROUPS.items():
    p, t, o = pred[:n, a:b], gt[:n, a:b], partner[:n, a:b]
    assert m[f"fd_{g}"] == pytest.approx(ref_fd(p, t), rel=1e-6, abs=1e-12)
    assert m[f"pfd_{g}"] == pytest.approx(ref_fd(np.hstack([o, t]), np.hstack([o, p])),
                                          rel=1e-6, abs=1e-12)
    assert m[f"mse_{g}"] == pytest.approx(np.mean([(pi - ti) ** 2 for pi, ti in
                                                   zip(p.ravel(), t.ravel())]), rel=1e-12)
    want = abs(stats.pearsonr(t.ravel(), o.ravel())[0] - stats.pearsonr(p.ravel(), o.ravel())[0])
    assert m[f"rpcc_{g}"] == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert m[f"sts_{g}"] == pytest.approx(ref_sts(p, t), rel=1e-10)
    assert m[f"variance_pred_{g}"] == pytest.approx(
        np.mean([np.mean((p[:, d] - p[:, d].mean()) ** 2) for d in range(p.shape[1])]), rel=1e-10)
    if n >= 100:
      assert np.isfinite(m[f"diversity_pred_{g}"])
    else:
      assert math.isnan(m[f"diversity_pred_{g}"])


def test_diversity_formula():
  rng = np.random.default_rng(4)
  x = rng.standard_normal((150, 4))
  got = dt.diversity(x, np.random.default_rng(9))
  r = np.random.default_rng(9)
  i, j = r.choice(150, 100, replace=False), r.choice(150, 100, replace=False)
  assert got == pytest.approx(np.mean([math.dist(x[a], x[b]) for a, b in zip(i, j)]), rel=1e-12)


def test_sid_reproducible_and_known_entropy():
  rng = np.random.default_rng(5)
  # Four far-apart blobs with proportions 1/2, 1/4, 1/8, 1/8 and k = 4: labels are the blobs.
  centres = np.array([[0, 0], [50, 0], [0, 50], [50, 50]], float)
  sizes = [80, 40, 20, 20]
  x = np.concatenate([c + rng.standard_normal((s, 2)) for c, s in zip(centres, sizes)])
  p = np.array(sizes) / sum(sizes)
  want = float(-(p * np.log2(p + 1e-6)).sum())
  assert dt.sid(x, x, 4, seed=0) == pytest.approx(want, rel=1e-12)
  # Fixed seed → bit-identical, on awkward random data too.
  y = rng.standard_normal((173, 50))
  z = rng.standard_normal((161, 50))
  assert dt.sid(y, z, 40, seed=7) == dt.sid(y, z, 40, seed=7)
  labels = dt.assign(z, dt.kmeans(y, 40, seed=7))
  assert dt.sid(y, z, 40, seed=7) == pytest.approx(ref_entropy(labels, 40), rel=1e-12)


def test_kmeans_is_a_lloyd_fixed_point():
  rng = np.random.default_rng(6)
  x = rng.standard_normal((211, 3))
  c = dt.kmeans(x, 10, seed=1)
  lab = np.array([np.argmin([((xi - cj) ** 2).sum() for cj in c]) for xi in x])
  assert len(set(lab)) == 10
  for j in range(10):
    np.testing.assert_allclose(c[j], x[lab == j].mean(0), rtol=1e-10, atol=1e-12)
  # Fewer distinct points than clusters still works and labels exactly.
  few = np.repeat(np.eye(3), 5, axis=0)
  assert dt.sid(few, few, 10) == pytest.approx(-3 * (1 / 3) * math.log2(1 / 3 + 1e-6))


def test_sklearn_backend_agrees_on_separable_data():
  pytest.importorskip("sklearn")
  rng = np.random.default_rng(8)
  centres = rng.uniform(-100, 100, (10, 3))
  x = np.concatenate([c + rng.standard_normal((rng.integers(5, 30), 3)) for c in centres])
  y = np.concatenate([c + rng.standard_normal((rng.integers(5, 30), 3)) for c in centres])
  assert dt.sid(x, y, 10, backend="numpy") == pytest.approx(dt.sid(x, y, 10, backend="sklearn"),
                                                            rel=1e-12)


def test_perfect_prediction():
  rng = np.random.default_rng(10)
  gt, partner = random_clip(rng, 140), random_clip(rng, 150)
  m = dt.clip_metrics(gt, gt, partner)
  for g in GROUPS:
    assert abs(m[f"fd_{g}"]) < 1e-8 and abs(m[f"pfd_{g}"]) < 1e-8
    assert m[f"mse_{g}"] == 0 and m[f"rpcc_{g}"] == 0 and m[f"sts_{g}"] == 0
    assert m[f"sid_pred_fit_{g}"] == m[f"sid_gt_fit_{g}"]


def test_folder_layout_and_publication_scale(tmp_path):
  rng = np.random.default_rng(11)
  gt_dir, pred_dir = tmp_path / "gt", tmp_path / "pred"
  gt_dir.mkdir(), pred_dir.mkdir()
  arrays = {}
  for name, n in (("a", 120), ("b", 95)):
    for spk in (1, 2):
      x = random_clip(rng, n + spk)
      arrays[f"{name}_speaker{spk}"] = x
      # DualTalk npz: pose[:, :3] head rotation, pose[:, 3:] jaw.
      np.savez(gt_dir / f"{name}_speaker{spk}.npz", exp=x[:, :50],
               pose=np.concatenate([x[:, 53:56], x[:, 50:53]], 1))
  preds = {}
  for key in ("a_speaker1", "a_speaker2", "b_speaker2"):
    preds[key] = random_clip(rng, 118)
    np.save(pred_dir / f"{key}.npy", preds[key])
  np.save(pred_dir / "b_speaker1.npy", np.full((90, 56), np.nan))
  agg, per = dt.evaluate_folder(str(pred_dir), str(gt_dir), seed=2)
  assert sorted(per) == ["a_speaker1", "a_speaker2", "b_speaker2"] and agg["skipped_nan"] == 1
  partner = {"a_speaker1": "a_speaker2", "a_speaker2": "a_speaker1", "b_speaker2": "b_speaker1"}
  order = sorted(os.listdir(pred_dir))
  for key in per:
    want = dt.clip_metrics(preds[key], arrays[key], arrays[partner[key]],
                           seed=2 + order.index(key + ".npy"))
    assert per[key] == want
  assert agg["fd_jaw"] == pytest.approx(np.mean([per[k]["fd_jaw"] for k in per]))
  pub = dt.publication_scale(agg, digits=None)
  assert pub["fd_jaw"] == pytest.approx(agg["fd_jaw"] * 1e3)
  assert pub["mse_exp"] == pytest.approx(agg["mse_exp"] * 10)
  assert pub["rpcc_exp"] == pytest.approx(agg["rpcc_exp"] * 100)
  assert pub["rpcc_pose"] == pytest.approx(agg["rpcc_pose"] * 10)
  assert pub["fd_pose"] == pytest.approx(agg["fd_pose"] * 100)


def test_bad_inputs():
  with pytest.raises(ValueError, match="56"):
    dt.clip_metrics(np.zeros((10, 55)), np.zeros((10, 56)), np.zeros((10, 56)))
  with pytest.raises(ValueError, match="speaker"):
    dt.partner_name("clip_7")


def test_synthdyad_sample_export():
  sd = pytest.importorskip("avatar_jax.data.synthdyad.generator")
  s = sd.make_sample("test", 3, render=False)
  m = dt.sample_metrics(s["flame56_self"], s)
  assert abs(m["fd_exp"]) < 1e-6 and m["mse_jaw"] == 0 and m["rpcc_pose"] == 0
  shuffled = dt.sample_metrics(s["flame56_partner"], s)
  assert shuffled["pfd_exp"] > shuffled["fd_exp"] > 0 and shuffled["rpcc_exp"] > 0.1
