"""The "reconstruction" evaluator: how much of a video survives an autoencoder (e.g. the video VAE).

For the first `num_clips` eval clips of each split, `system.generate(model, batch, rng)` returns
the reconstruction of batch["video"] (Outputs space "video": uint8 or [-1, 1] float frames
[B, T, H, W, 3]). Reported per split:

  psnr          dB, 10·log10(255² / MSE) over every pixel of a clip, mean over clips
  psnr_min      the worst clip's
  r2_<channel>  R² of the SynthDyad face reader's coefficients read from the reconstruction
                against the true motion, for jaw_open, smile, head_pitch (the coefficients a
                talking-listening generator must control; SYNTHDYAD.md §6)
  r2_<channel>_original  the same read from the original frames: the reader's own ceiling
  r2_<channel>_first     (a model with `time_factor` > 1, e.g. Wan's VAE: 4) the same R² on the
                         first frame of each latent group only (frames 1, 5, 9, …): the frame a
                         causal temporal encoder keeps least easily

With `probe_clips` > 0 (and a system whose `encode` returns "latent_self", e.g. the VAE), also a
linear probe of whether the latents carry those coefficients at all, whatever the decoder does
with them (a DiT generates latents, so this is what it can learn to follow):

  probe_<channel>         R² on this split of a ridge regression from each latent frame to the
                          coefficient at every video frame of its group (4 for Wan's VAE),
                          fitted on `probe_clips` train clips (ridge strength chosen on a
                          held-out quarter); `_first`: the group's first frame alone
  probe_<channel>_pixels  the same probe from the group's original frames, greyscale, each
                          box-averaged to twice the latent grid (16×16 at 64 px): what an equally
                          simple read of the pixels gets, i.e. the probe's own ceiling. A latent
                          probe far below it says the encoder has not kept the coefficient in
                          linear form (a nonlinear read might still find it; the reader R² above
                          is the target)

Writes <workdir>/eval/<name>_<split>.{json,md}; scalars to the metric writer.
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from avatar_jax.data.synthdyad import motion as motion_lib
from avatar_jax.evals import runner

CHANNELS = ("jaw_open", "smile", "head_pitch")


def to_uint8(frames) -> np.ndarray:
  """uint8 frames from uint8, or from float frames in [-1, 1]."""
  frames = np.asarray(frames)
  if frames.dtype == np.uint8:
    return frames
  return np.clip(np.round((frames.astype(np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
  """PSNR in dB of uint8 arrays a, b of one shape (inf when equal)."""
  mse = np.mean(np.square(a.astype(np.float64) - b.astype(np.float64)))
  return float("inf") if mse == 0 else float(10.0 * np.log10(255.0 ** 2 / mse))


def r2(pred: np.ndarray, true: np.ndarray) -> float:
  """1 − SS_res / SS_tot of 1-D arrays."""
  ss_tot = float(np.sum(np.square(true - true.mean())))
  return float("nan") if ss_tot == 0 else 1.0 - float(np.sum(np.square(pred - true))) / ss_tot


RIDGE_STRENGTHS = (1.0, 10.0, 100.0, 1000.0, 10000.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, strengths=RIDGE_STRENGTHS, holdout: float = 0.25):
  """A ridge regression x [N, D] -> y [N, C] on standardised features, the strength picked by
  the mean R² on the last `holdout` of the rows, then refitted on all rows. Returns predict(x)."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or len(x) != len(y) or len(x) < 4:
    raise ValueError(f"ridge_fit: expected x [N >= 4, D] and y [N, C], found {x.shape}, {y.shape}")

  def fit(xs, ys, lam):
    mu, sd = xs.mean(0), xs.std(0) + 1e-6
    a, ym = (xs - mu) / sd, ys.mean(0)
    # The dual form when D > N keeps the solve at min(N, D) squared.
    if a.shape[1] > a.shape[0]:
      w = a.T @ np.linalg.solve(a @ a.T + lam * np.eye(len(a)), ys - ym)
    else:
      w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ (ys - ym))
    return lambda q: ((np.asarray(q, np.float64) - mu) / sd) @ w + ym

  cut = int(round(len(x) * (1.0 - holdout)))
  score = lambda lam: np.nanmean([r2(p, t) for p, t in zip(fit(x[:cut], y[:cut], lam)(x[cut:]).T,
                                                             y[cut:].T)])
  best = max(strengths, key=score)
  return fit(x, y, best)


def _probe_rows(encode, batch, idx) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(latent rows [N, h·w·z], coarse pixel rows [N, s·4·h·w], true coefficients [N, s·C]): one
  row per latent frame k ≥ 1 of every clip, paired with all s video frames of its group
  (frames s·(k−1)+1 … s·k, s the temporal stride; frame-major in the last axis). Frame 0's lone
  latent is left out. Every frame of a group counts, not only the one that closes it: a causal
  encoder keeps its group's last frame most easily, and a probe of that frame alone overstates
  what the latents carry (docs/vae.md)."""
  lat = encode(batch)
  if "latent_self" not in lat:
    raise ValueError("reconstruction evaluator, probe_clips > 0: the system's encode() must return "
                     f"'latent_self' [B, t, h, w, z]; found {sorted(lat)}")
  z = np.asarray(lat["latent_self"], np.float32)
  b, t, h, w = z.shape[:4]
  video, motion = np.asarray(batch["video"]), np.asarray(batch["motion_self"])
  s = (video.shape[1] - 1) // max(t - 1, 1)   # latent frame k closes at video frame s·k
  if t < 2 or s < 1:
    raise ValueError(f"reconstruction probe: {video.shape[1]}-frame clips give {t} latent frame(s); "
                     "the probe needs clips of at least one latent group after frame 0")
  H, W = video.shape[2:4]
  if H % (2 * h) or W % (2 * w):
    raise ValueError(f"reconstruction probe: frames {H}×{W} are not a multiple of twice the "
                     f"latent grid {h}×{w}")
  frames = video[:, 1:1 + s * (t - 1)].astype(np.float32).mean(-1)   # [B, s·(t−1), H, W] grey
  pix = frames.reshape(b, t - 1, s, 2 * h, H // (2 * h), 2 * w, W // (2 * w)).mean((4, 6))
  y = motion[:, 1:1 + s * (t - 1)][..., idx].reshape(b, t - 1, s * len(idx))
  return (z[:, 1:].reshape(b * (t - 1), -1), pix.reshape(b * (t - 1), -1),
          y.reshape(b * (t - 1), -1))


def _probe_encoder(ctx):
  """The system's encode, jitted once for every probe batch (as the encode job runs it), fed
  the batch keys the system reads."""
  spec = ctx.system.data_spec()
  jitted = jax.jit(lambda b: ctx.system.encode(ctx.model, b))
  return lambda b: jitted({k: b[k] for k in spec.keys + spec.optional_keys if k in b})


def _probe_data(encode, chunks, idx):
  """_probe_rows over host batches, concatenated."""
  rows = [_probe_rows(encode, c, idx) for c in chunks]
  return tuple(np.concatenate(r) for r in zip(*rows))


@runner.register("reconstruction", num_clips=8, batch_size=4, reader=True, probe_clips=0)
def reconstruction(ctx: runner.Context, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """{split: {"rows": {"model": metrics}, "text": markdown}}."""
  from avatar_jax.evals import motion, video  # pylint: disable=g-import-not-at-top
  results = {}
  keys = tuple(ctx.system.data_spec().keys) + ("video", "motion_self", "reference_image")
  idx = [motion_lib.CHANNEL_INDEX[c] for c in CHANNELS]
  probes = None
  if cfg.probe_clips:
    encode = _probe_encoder(ctx)
    train = ml_collections.ConfigDict(cfg.to_dict())
    train.num_clips = int(cfg.probe_clips)
    xz, xp, y = _probe_data(encode, runner.batches(ctx, train, keys, "train"), idx)
    probes = {"": ridge_fit(xz, y), "_pixels": ridge_fit(xp, y)}
  for split in runner.splits(cfg):
    chunks = list(runner.batches(ctx, cfg, keys, split))
    out = runner.generate(ctx.system, ctx.model, chunks, runner.rng_for(ctx, cfg),
                          **runner.options(cfg))
    if out.space != "video":
      raise ValueError(f"config.evals.{ctx.name}: type 'reconstruction' scores reconstructed "
                       f"video (space 'video'), but the system generates {out.space!r}")
    batch = runner.concat(chunks)
    rec, orig = to_uint8(out.value), batch["video"]
    if rec.shape != orig.shape:
      raise ValueError(f"config.evals.{ctx.name}: reconstruction {rec.shape} != video {orig.shape}")
    scores = [psnr(r, o) for r, o in zip(rec, orig)]
    m = {"psnr": float(np.mean(scores)), "psnr_min": float(np.min(scores)), "clips": len(rec)}
    if cfg.reader:
      read = {"": [], "_original": []}
      for r, o, ref in zip(rec, orig, batch["reference_image"]):
        read[""].append(video.read_coefficients(r, ref)[0][:, idx])
        read["_original"].append(video.read_coefficients(o, ref)[0][:, idx])
      true = np.concatenate([t[:, idx] for t in batch["motion_self"]])
      # A temporally compressing model (a video VAE: `time_factor` frames per latent frame after
      # frame 0) keeps a group's first frame least easily; its R² alone shows that loss.
      stride = int(getattr(ctx.model, "time_factor", 1) or 1)
      clip_len = orig.shape[1]
      first = np.tile((np.arange(clip_len) % stride == 1) if stride > 1 else
                      np.zeros(clip_len, bool), len(orig))
      for suffix, got in read.items():
        got = np.concatenate(got)
        for j, c in enumerate(CHANNELS):
          m[f"r2_{c}{suffix}"] = r2(got[:, j], true[:, j])
          if first.any():
            m[f"r2_{c}{suffix}_first"] = r2(got[first, j], true[first, j])
    if probes is not None:
      xz, xp, y = _probe_data(encode, chunks, idx)
      n, per = len(y), len(CHANNELS)
      for suffix, x in (("", xz), ("_pixels", xp)):
        got = probes[suffix](x).reshape(n, -1, per)   # [rows, frames of the group, C]
        want = y.reshape(n, -1, per)
        for j, c in enumerate(CHANNELS):
          m[f"probe_{c}{suffix}"] = r2(got[..., j].ravel(), want[..., j].ravel())
          # the group's first frame: the one a causal encoder keeps least easily
          m[f"probe_{c}{suffix}_first"] = r2(got[:, 0, j], want[:, 0, j])
    rows = {"model": m}
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in m.items()]
    text = motion.write_results(rows, ctx.workdir, f"{ctx.name}_{split}",
                                f"Reconstruction `{split}` split", step=ctx.step, seed=cfg.seed,
                                split=split, table="\n".join(lines))
    logging.info("\n%s", text)
    if ctx.writer is not None and ctx.step is not None:
      ctx.writer.write_scalars(ctx.step, {f"{ctx.name}_{split}/{k}": v for k, v in m.items()})
    results[split] = dict(rows=rows, text=text)
  return results
