"""DualTalk / TIMAR motion metrics on the 56-d FLAME layout (exp 0:50, jaw 50:53, pose 53:56).

Definitions follow DualTalk's published metric script and TIMAR's evaluation module (the DualTalk
benchmark's two reference implementations); docs/metrics.md states each one and where ours differs
(only in making random parts seeded). Per clip, prediction, ground truth and the partner's ground
truth are cut to their common length; every metric is computed per group (exp, jaw, pose) and per
clip, then averaged over clips.

  fd_<g>            Fréchet distance, prediction vs GT (frames as samples)
  pfd_<g>           paired FD: [partner GT ‖ GT] vs [partner GT ‖ prediction]
  mse_<g>           mean squared error
  sid_pred_fit_<g>  k-means fitted on the prediction, GT frames labelled, entropy (bits) of the
                    label histogram — DualTalk's order (TIMAR calls it "reverse_sid")
  sid_gt_fit_<g>    k-means fitted on the GT, prediction labelled — TIMAR's "sid"
  rpcc_<g>          |corr(GT, partner) − corr(prediction, partner)| over flattened values
  sts_<g>           sqrt(Σ_t Σ_d (Δpred − ΔGT)^2 / 0.1), Δ = first difference over frames
  diversity_{pred,gt}_<g>  mean L2 distance of 100 random frame pairs (seeded)
  variance_{pred,gt}_<g>   mean over dimensions of the per-dimension variance
k = 40 (exp), 10 (jaw), 10 (pose).

DualTalk GT folders hold `<name>_speaker{1,2}.npz` with `exp [T, 50]` and `pose [T, 6]`, where
pose[:, :3] is the head rotation and pose[:, 3:] the jaw; predictions are `<name>_speaker{1,2}.npy`
`[T, 56]`, and the partner of speaker1 is speaker2 and vice versa.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from avatar_jax.evals import frechet

GROUPS = {"exp": slice(0, 50), "jaw": slice(50, 53), "pose": slice(53, 56)}
SID_K = {"exp": 40, "jaw": 10, "pose": 10}
DIVERSITY_PAIRS = 100
STS_TIMESTEP = 0.1
SID_LOG_EPS = 1e-6   # the reference adds it inside log2

# TIMAR's publication scaling (FD / P-FD: exp ×1, jaw ×1e3, pose ×1e2; MSE: exp ×10, jaw ×1e3,
# pose ×1e2; rPCC: exp ×1e2, jaw ×10, pose ×10; SID unscaled), applied to clip-averaged values.
PUBLICATION_SCALE = {
    "fd_exp": 1.0, "fd_jaw": 1e3, "fd_pose": 1e2,
    "pfd_exp": 1.0, "pfd_jaw": 1e3, "pfd_pose": 1e2,
    "mse_exp": 10.0, "mse_jaw": 1e3, "mse_pose": 1e2,
    "rpcc_exp": 1e2, "rpcc_jaw": 10.0, "rpcc_pose": 10.0,
    "sid_pred_fit_exp": 1.0, "sid_pred_fit_jaw": 1.0, "sid_pred_fit_pose": 1.0,
    "sid_gt_fit_exp": 1.0, "sid_gt_fit_jaw": 1.0, "sid_gt_fit_pose": 1.0,
}


# ----------------------------------------------------------------------------------------------
# k-means (seeded, deterministic)
# ----------------------------------------------------------------------------------------------
def _sq_dists(x: np.ndarray, c: np.ndarray) -> np.ndarray:
  """[N, K] squared Euclidean distances, clipped at 0 against round-off."""
  d = (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
  return np.maximum(d, 0.0)


def kmeans_plus_plus(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
  """Greedy k-means++ seeding (2 + ln k candidates per step, keep the best): [k, D] centres."""
  n = x.shape[0]
  trials = 2 + int(math.log(k))
  centres = np.empty((k, x.shape[1]), np.float64)
  centres[0] = x[rng.integers(n)]
  closest = _sq_dists(x, centres[:1])[:, 0]
  for i in range(1, k):
    pot = closest.sum()
    if pot <= 0:  # fewer distinct points than clusters: repeat points deterministically
      centres[i] = x[rng.integers(n)]
      continue
    cand = np.searchsorted(np.cumsum(closest), rng.random(trials) * pot)
    cand = np.minimum(cand, n - 1)
    d_cand = np.minimum(closest[None, :], _sq_dists(x, x[cand]).T)   # [trials, N]
    best = int(np.argmin(d_cand.sum(1)))
    centres[i] = x[cand[best]]
    closest = d_cand[best]
  return centres


def kmeans(x: np.ndarray, k: int, seed: int = 0, max_iter: int = 300) -> np.ndarray:
  """Lloyd's k-means with k-means++ seeding; returns centres [k, D]. Deterministic in `seed`.

  Iterates until the assignment no longer changes (or max_iter). An emptied cluster is moved to
  the point farthest from its current centre, so all k centres stay in use when possible.
  """
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 1:
    raise ValueError(f"kmeans: expected points [N >= 1, D], found {x.shape}")
  rng = np.random.default_rng(seed)
  centres = kmeans_plus_plus(x, k, rng)
  labels = None
  for _ in range(max_iter):
    d = _sq_dists(x, centres)
    new = np.argmin(d, axis=1)
    if labels is not None and np.array_equal(new, labels):
      break
    labels = new
    counts = np.bincount(labels, minlength=k)
    sums = np.zeros_like(centres)
    np.add.at(sums, labels, x)
    nonempty = counts > 0
    centres[nonempty] = sums[nonempty] / counts[nonempty, None]
    if (~nonempty).any():
      far = np.argsort(-d[np.arange(x.shape[0]), labels], kind="stable")
      for j, i in zip(np.flatnonzero(~nonempty), far):
        centres[j] = x[i]
  return centres


def assign(x: np.ndarray, centres: np.ndarray) -> np.ndarray:
  """Nearest-centre labels [N] (ties → lowest index)."""
  return np.argmin(_sq_dists(np.asarray(x, np.float64), centres), axis=1)


def label_entropy_bits(labels: np.ndarray, k: int) -> float:
  """-Σ p_i log2(p_i + 1e-6) of the label histogram over k bins (the reference's formula)."""
  p = np.bincount(labels, minlength=k).astype(np.float64)
  p /= p.sum()
  return float(-(p * np.log2(p + SID_LOG_EPS)).sum())


def sid(fit: np.ndarray, label: np.ndarray, k: int, seed: int = 0, backend: str = "numpy"
        ) -> float:
  """Entropy (bits) of the k-means histogram: clusters fitted on `fit`, `label` frames assigned.

  backend "numpy" is this module's seeded k-means; "sklearn" is scikit-learn's
  KMeans(n_clusters=k, random_state=seed, n_init="auto"), the reference's exact call, for
  reproducing published numbers (requires scikit-learn).
  """
  if backend == "numpy":
    labels = assign(label, kmeans(fit, k, seed))
  elif backend == "sklearn":
    from sklearn.cluster import KMeans  # pylint: disable=g-import-not-at-top
    labels = KMeans(n_clusters=k, random_state=seed, n_init="auto").fit(fit).predict(label)
  else:
    raise ValueError(f"sid backend must be 'numpy' or 'sklearn', found {backend!r}")
  return label_entropy_bits(labels, k)


# ----------------------------------------------------------------------------------------------
# Other per-group metrics
# ----------------------------------------------------------------------------------------------
def rpcc(gt: np.ndarray, pred: np.ndarray, partner: np.ndarray) -> float:
  """|corr(gt, partner) − corr(pred, partner)| over the row-major flattened [T, D] arrays."""
  a = np.corrcoef(gt.reshape(-1), partner.reshape(-1))[0, 1]
  b = np.corrcoef(pred.reshape(-1), partner.reshape(-1))[0, 1]
  return float(abs(a - b))


def sts(pred: np.ndarray, gt: np.ndarray, timestep: float = STS_TIMESTEP) -> float:
  """sqrt(Σ_{t>=1, d} ((pred_t − pred_{t−1}) − (gt_t − gt_{t−1}))^2 / timestep)."""
  d = np.diff(pred, axis=0) - np.diff(gt, axis=0)
  return float(np.sqrt((d * d).sum() / timestep))


def diversity(x: np.ndarray, rng: np.random.Generator, pairs: int = DIVERSITY_PAIRS) -> float:
  """Mean L2 distance between `pairs` frames drawn twice without replacement; NaN if T < pairs."""
  n = x.shape[0]
  if n < pairs:
    return math.nan
  i = rng.choice(n, pairs, replace=False)
  j = rng.choice(n, pairs, replace=False)
  return float(np.linalg.norm(x[i] - x[j], axis=1).mean())


def variance(x: np.ndarray) -> float:
  """Mean over dimensions of the (ddof=0) variance over frames."""
  return float(np.var(x, axis=0).mean())


# ----------------------------------------------------------------------------------------------
# Clip and set
# ----------------------------------------------------------------------------------------------
def _as56(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[1] != 56:
    raise ValueError(f"{name}: expected [T, 56] (exp 0:50, jaw 50:53, pose 53:56), found {x.shape}")
  return x


def clip_metrics(pred: Any, gt: Any, partner: Any, *, seed: int = 0,
                 sid_backend: str = "numpy") -> dict[str, float]:
  """All metrics for one clip; pred/gt/partner [T, 56] (any T each; cut to the shortest).

  `seed` drives k-means seeding (SID) and the diversity pairs; SID is exactly reproducible for a
  fixed seed.
  """
  pred, gt, partner = _as56(pred, "pred"), _as56(gt, "gt"), _as56(partner, "partner")
  n = min(pred.shape[0], gt.shape[0], partner.shape[0])
  if n < 2:
    raise ValueError(f"clip_metrics: need >= 2 common frames, found {n}")
  pred, gt, partner = pred[:n], gt[:n], partner[:n]
  rng = np.random.default_rng(seed)
  out: dict[str, float] = {"frames": float(n)}
  for g, sl in GROUPS.items():
    p, t, o = pred[:, sl], gt[:, sl], partner[:, sl]
    out[f"fd_{g}"] = frechet.fd(p, t)
    out[f"pfd_{g}"] = frechet.fd(np.concatenate([o, t], -1), np.concatenate([o, p], -1))
    out[f"mse_{g}"] = float(((p - t) ** 2).mean())
    out[f"sid_pred_fit_{g}"] = sid(p, t, SID_K[g], seed, sid_backend)
    out[f"sid_gt_fit_{g}"] = sid(t, p, SID_K[g], seed, sid_backend)
    out[f"rpcc_{g}"] = rpcc(t, p, o)
    out[f"sts_{g}"] = sts(p, t)
  for g, sl in GROUPS.items():
    out[f"diversity_pred_{g}"] = diversity(pred[:, sl], rng)
  for g, sl in GROUPS.items():
    out[f"diversity_gt_{g}"] = diversity(gt[:, sl], rng)
  for g, sl in GROUPS.items():
    out[f"variance_pred_{g}"] = variance(pred[:, sl])
    out[f"variance_gt_{g}"] = variance(gt[:, sl])
  return out


def sample_metrics(pred: Any, sample: Mapping[str, Any], **kw) -> dict[str, float]:
  """clip_metrics of `pred [T, 56]` against a SynthDyad sample's flame56_self / flame56_partner."""
  for key in ("flame56_self", "flame56_partner"):
    if key not in sample:
      raise KeyError(f"sample_metrics: sample lacks '{key}'; found keys {sorted(sample)}")
  return clip_metrics(pred, sample["flame56_self"], sample["flame56_partner"], **kw)


def aggregate(clips: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Mean of each metric over clips (diversity: over clips with >= 100 frames), plus `clips`."""
  if not clips:
    raise ValueError("aggregate: no clip results")
  out: dict[str, float] = {"clips": float(len(clips))}
  for key in clips[0]:
    vals = np.asarray([c[key] for c in clips], np.float64)
    if key.startswith("diversity_"):
      ok = ~np.isnan(vals)
      out[key] = float(vals[ok].mean()) if ok.any() else math.nan
      out[key + "_n"] = float(ok.sum())
    else:
      out[key] = float(vals.mean())
  return out


def evaluate_arrays(preds: Sequence[Any], gts: Sequence[Any], partners: Sequence[Any], *,
                    seed: int = 0, sid_backend: str = "numpy"
                    ) -> tuple[dict[str, float], list[dict[str, float]]]:
  """(aggregate, per-clip list) over clips; clip i uses seed + i."""
  if not len(preds) == len(gts) == len(partners):
    raise ValueError(f"evaluate_arrays: {len(preds)} predictions, {len(gts)} GTs, "
                     f"{len(partners)} partners")
  per = [clip_metrics(p, g, o, seed=seed + i, sid_backend=sid_backend)
         for i, (p, g, o) in enumerate(zip(preds, gts, partners))]
  return aggregate(per), per


def publication_scale(metrics: Mapping[str, float], digits: int | None = 2) -> dict[str, float]:
  """TIMAR's published units: the keys of PUBLICATION_SCALE, scaled and (optionally) rounded."""
  out = {}
  for key, s in PUBLICATION_SCALE.items():
    if key in metrics:
      v = metrics[key] * s
      out[key] = round(v, digits) if digits is not None and not math.isnan(v) else v
  return out


# ----------------------------------------------------------------------------------------------
# DualTalk-layout folders
# ----------------------------------------------------------------------------------------------
def load_gt56(path: str) -> np.ndarray:
  """`<name>_speakerX.npz` (exp [T, 50], pose [T, 6] = head rot 0:3, jaw 3:6) → [T, 56]."""
  with np.load(path) as z:
    for key in ("exp", "pose"):
      if key not in z:
        raise KeyError(f"{path}: expected keys 'exp' and 'pose', found {sorted(z.keys())}")
    exp, pose = np.asarray(z["exp"]), np.asarray(z["pose"])
  if exp.ndim != 2 or exp.shape[1] != 50 or pose.ndim != 2 or pose.shape[1] != 6:
    raise ValueError(f"{path}: expected exp [T, 50] and pose [T, 6], found {exp.shape}, "
                     f"{pose.shape}")
  n = min(exp.shape[0], pose.shape[0])
  return np.concatenate([exp[:n], pose[:n, 3:6], pose[:n, 0:3]], axis=1)


def partner_name(name: str) -> str:
  """`x_speaker1` ↔ `x_speaker2` (file stem, no extension)."""
  if name.endswith("_speaker1"):
    return name[:-1] + "2"
  if name.endswith("_speaker2"):
    return name[:-1] + "1"
  raise ValueError(f"expected a name ending in _speaker1 or _speaker2, found {name!r}")


def evaluate_folder(pred_dir: str, gt_dir: str, *, seed: int = 0, sid_backend: str = "numpy",
                    skip_nan: bool = True) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
  """Metrics of every `<name>_speaker{1,2}.npy` [T, 56] in pred_dir against gt_dir's npz files.

  Files are taken in sorted order (clip i uses seed + i). Predictions containing NaN are skipped
  (as TIMAR's evaluation does) when skip_nan, and their count is returned as `skipped_nan`.
  Returns (aggregate, {name: clip metrics}).
  """
  names = sorted(f[:-4] for f in os.listdir(pred_dir) if f.endswith(".npy"))
  if not names:
    raise FileNotFoundError(f"no .npy predictions in {pred_dir}")
  per, skipped = {}, 0
  for i, name in enumerate(names):
    pred = np.load(os.path.join(pred_dir, name + ".npy"))
    if skip_nan and np.isnan(pred).any():
      skipped += 1
      continue
    gt = load_gt56(os.path.join(gt_dir, name + ".npz"))
    partner = load_gt56(os.path.join(gt_dir, partner_name(name) + ".npz"))
    try:
      per[name] = clip_metrics(pred, gt, partner, seed=seed + i, sid_backend=sid_backend)
    except ValueError as e:
      raise ValueError(f"{os.path.join(pred_dir, name + '.npy')}: {e}") from e
  agg = aggregate(list(per.values()))
  agg["skipped_nan"] = float(skipped)
  return agg, per
