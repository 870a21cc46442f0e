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

Writes <workdir>/eval/<name>_<split>.{json,md}; scalars to the metric writer.
"""
from __future__ import annotations

from typing import Any

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


@runner.register("reconstruction", num_clips=8, batch_size=4, reader=True)
def reconstruction(ctx: runner.Context, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """{split: {"rows": {"model": metrics}, "text": markdown}}."""
  from avatar_jax.evals import motion, video  # pylint: disable=g-import-not-at-top
  results = {}
  keys = tuple(ctx.system.data_spec().keys) + ("video", "motion_self", "reference_image")
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
      idx = [motion_lib.CHANNEL_INDEX[c] for c in CHANNELS]
      read = {"": [], "_original": []}
      for r, o, ref in zip(rec, orig, batch["reference_image"]):
        read[""].append(video.read_coefficients(r, ref)[0][:, idx])
        read["_original"].append(video.read_coefficients(o, ref)[0][:, idx])
      true = np.concatenate([t[:, idx] for t in batch["motion_self"]])
      for suffix, got in read.items():
        got = np.concatenate(got)
        for j, c in enumerate(CHANNELS):
          m[f"r2_{c}{suffix}"] = r2(got[:, j], true[:, j])
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
