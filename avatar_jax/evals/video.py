"""Video metrics: FID / FVD, CSIM, LSE-D / LSE-C, Var, SID — math here, feature networks pluggable.

Every metric takes embeddings (or a callable that makes them), so the same code serves the
SynthDyad face reader (the default: `avatar_jax.models.face_reader`), an imported vision tower
(`avatar_jax.models.vision_import`, FD-CLIP) or any network a user brings (ArcFace for CSIM,
SyncNet for LSE). Definitions, and which reference each matches, are in docs/metrics.md.

  fid(feats_a, feats_b)             Fréchet distance of per-frame features [N, F] (FD-face, FID)
  fvd(clip_feats_a, clip_feats_b)   Fréchet distance of per-clip features [M, F'] (FVD-face)
  csim(emb, ref_emb)                mean cosine similarity of identity embeddings
  lse(video_emb, audio_emb)         SyncNet-style LSE-D / LSE-C / offset over ±15 frames
  motion_variance(coeffs)           Var: mean per-channel variance over time
  video_metrics(frames, sample)     SynthDyad §6 metrics of a generated video via the face reader
  coefficient_metrics, feature_distances   the same from coefficients / features already read
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from avatar_jax.evals import dualtalk, frechet, synthdyad_metrics

LSE_VSHIFT = 15           # SyncNet evaluation offset range (frames), as in its released scripts
PAIRWISE_EPS = 1e-6       # added to the difference before the norm, as torch's pairwise_distance


# ----------------------------------------------------------------------------------------------
# Distribution metrics
# ----------------------------------------------------------------------------------------------
def fid(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
  """Fréchet distance between per-frame feature sets [N, F] and [M, F] (any N, M >= 2)."""
  return frechet.fd(_as2d(feats_a, "feats_a"), _as2d(feats_b, "feats_b"))


def fvd(clip_feats_a: np.ndarray, clip_feats_b: np.ndarray) -> float:
  """Fréchet distance between per-clip feature sets [M, F'] (one row per clip)."""
  return frechet.fd(_as2d(clip_feats_a, "clip_feats_a"), _as2d(clip_feats_b, "clip_feats_b"))


def csim(emb: np.ndarray, ref_emb: np.ndarray) -> float:
  """Mean cosine similarity of identity embeddings `emb [N, D]` to `ref_emb [D]` or `[N, D]`."""
  a = _as2d(emb, "emb")
  b = np.asarray(ref_emb, np.float64)
  b = np.broadcast_to(b, a.shape) if b.ndim == 1 else _as2d(b, "ref_emb")
  if b.shape != a.shape:
    raise ValueError(f"csim: embeddings {a.shape} and references {b.shape} differ")
  na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
  if np.any(na == 0) or np.any(nb == 0):
    raise ValueError("csim: an embedding has zero norm")
  return float(((a * b).sum(1) / (na * nb)).mean())


def lse(video_emb: np.ndarray, audio_emb: np.ndarray, vshift: int = LSE_VSHIFT
        ) -> dict[str, float]:
  """SyncNet lip-sync error between per-frame mouth and audio embeddings [T, D].

  d[t, j] = ||v_t - a_{t + j - vshift} + eps||_2 for j = 0..2 vshift, where audio embeddings
  outside [0, T) are zeros (SyncNet pads with zeros); m[j] = mean_t d[t, j].
  LSE-D = min_j m[j]; LSE-C = median_j m[j] - min_j m[j]; offset = vshift - argmin_j m[j]
  (frames; SyncNet's sign convention).
  """
  v, a = _as2d(video_emb, "video_emb"), _as2d(audio_emb, "audio_emb")
  if v.shape[1] != a.shape[1]:
    raise ValueError(f"lse: video {v.shape} and audio {a.shape} embedding sizes differ")
  t = min(v.shape[0], a.shape[0])
  v, a = v[:t], a[:t]
  ap = np.concatenate([np.zeros((vshift, a.shape[1])), a, np.zeros((vshift, a.shape[1]))])
  win = 2 * vshift + 1
  # [T, win, D] view of the padded audio around each frame.
  idx = np.arange(t)[:, None] + np.arange(win)[None, :]
  d = np.linalg.norm(v[:, None, :] - ap[idx] + PAIRWISE_EPS, axis=-1)
  m = d.mean(0)
  j = int(np.argmin(m))
  return {"lse_d": float(m[j]), "lse_c": float(np.median(m) - m[j]), "lse_offset": float(vshift - j)}


def motion_variance(coeffs: np.ndarray) -> float:
  """Var: mean over channels of the variance over time of coefficients [T, C] (ddof = 0)."""
  return dualtalk.variance(_as2d(coeffs, "coeffs"))


def expression_sid(pred_coeffs: np.ndarray, true_coeffs: np.ndarray, k: int = 40, seed: int = 0
                   ) -> float:
  """SID on expression coefficients: k-means on the prediction, truth frames assigned (bits)."""
  return dualtalk.sid(_as2d(pred_coeffs, "pred"), _as2d(true_coeffs, "true"), k, seed)


# ----------------------------------------------------------------------------------------------
# SynthDyad video metrics through the face reader
# ----------------------------------------------------------------------------------------------
_DEFAULT_READER: list = []


def default_reader():
  """The shipped face reader (loaded once per process)."""
  if not _DEFAULT_READER:
    from avatar_jax.models import face_reader  # pylint: disable=g-import-not-at-top
    _DEFAULT_READER.append(face_reader.load_face_reader())
  return _DEFAULT_READER[0]


def read_coefficients(frames: np.ndarray, reference: np.ndarray | None, reader=None
                      ) -> tuple[np.ndarray, np.ndarray]:
  """(coefficients [T, C], frame features [T, F]) of a video [T, H, W, 3] via the face reader."""
  from avatar_jax.models import face_reader  # pylint: disable=g-import-not-at-top
  return face_reader.read_video(reader or default_reader(), frames, reference)


def video_metrics(frames: np.ndarray, sample: Mapping[str, Any], *, reader=None,
                  reference: np.ndarray | None = None, **kw) -> dict[str, float]:
  """SynthDyad §6 metrics of a generated video: read coefficients, then `clip_metrics`.

  `reference` defaults to `sample['reference_image']` (the identity's neutral frame, which the
  face reader compares against). Extra keyword arguments go to `synthdyad_metrics.clip_metrics`.
  """
  if reference is None:
    if "reference_image" not in sample:
      raise KeyError("video_metrics: pass reference= or a sample with 'reference_image' "
                     f"[H, W, 3]; found keys {sorted(sample)}")
    reference = sample["reference_image"]
  return coefficient_metrics(read_coefficients(frames, reference, reader)[0], sample, **kw)


def coefficient_metrics(coeffs: np.ndarray, sample: Mapping[str, Any], **kw) -> dict[str, float]:
  """`video_metrics` from coefficients [T, C] the face reader has already read (so a table that
  also needs the frames' features reads each video once)."""
  full = np.zeros((coeffs.shape[0], max(coeffs.shape[1], len(synthdyad_metrics.CONTRACT_CHANNELS))))
  full[:, :coeffs.shape[1]] = coeffs
  return synthdyad_metrics.clip_metrics(full, sample, **kw)


def face_distribution_metrics(gen_videos: Sequence[np.ndarray], ref_videos: Sequence[np.ndarray],
                              gen_refs: Sequence[np.ndarray | None],
                              ref_refs: Sequence[np.ndarray | None], *, reader=None,
                              features: Callable[[np.ndarray, Any], np.ndarray] | None = None
                              ) -> dict[str, float]:
  """FD-face (frames) and FVD-face (clips) between generated and reference videos.

  `features(video [T, H, W, 3], reference) -> [T, F]` defaults to the face reader's penultimate
  features; clip features are `face_reader.clip_features` (mean ‖ mean |Δ| over time).
  """
  if features is None:
    features = lambda v, r: read_coefficients(v, r, reader)[1]
  return feature_distances([features(v, r) for v, r in zip(gen_videos, gen_refs)],
                           [features(v, r) for v, r in zip(ref_videos, ref_refs)])


def feature_distances(gen_feats: Sequence[np.ndarray], ref_feats: Sequence[np.ndarray]
                      ) -> dict[str, float]:
  """`face_distribution_metrics` from frame features already read: one [T, F] per video."""
  from avatar_jax.models import face_reader  # pylint: disable=g-import-not-at-top
  def collect(feats):
    frames = [np.asarray(f, np.float64) for f in feats]
    return np.concatenate(frames), np.stack([face_reader.clip_features(f) for f in frames])
  gf, gc = collect(gen_feats)
  rf, rc = collect(ref_feats)
  out = {"fd_face": fid(gf, rf), "frames_gen": float(len(gf)), "frames_ref": float(len(rf))}
  out["fvd_face"] = fvd(gc, rc) if len(gc) >= 2 and len(rc) >= 2 else math.nan
  return out


def _as2d(x: Any, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected [N, D], found {x.shape}")
  return x
