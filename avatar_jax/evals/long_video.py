"""Long generated video, segment by segment: does it drift, and are the window seams visible?

A video system generates minute-long clips in overlapping windows (Beyond Monologue's
`System.generate`: each window starts from the previous one's last latent rows). Errors that
accumulate from window to window show as a face that slowly stops looking like the identity, or
as jumps where a window starts. The `long_video` evaluator measures both on SynthDyad clips of
`duration_s` seconds (longer than any training clip), generated from their audio and the
identity's reference frame:

  per `segment_s`-second segment (rows 0–10 s, 10–20 s, ...):
    fd_face    Fréchet distance of the face reader's frame features against the true renders of
               the same segment (the drift measure: it should stay flat over the minute)
    lip_corr, jaw_leak, smile_resp   the SynthDyad metrics read from the segment's frames
  over the whole clip:
    seam_jump  mean |frame(t+1) − frame(t)| across the frame pairs where a later window's new
               latent rows begin, divided by the same mean over every other frame pair (1: no
               visible seam); the true video's value at the same frame pairs is reported as
               `seam_jump_truth` (what natural motion alone gives there)
    fd_growth  fd_face of the last segment / the first

Writes eval/<prefix>long_<split>.{json,md}. Declared as
`runner.evaluator("long_video", duration_s=60.0, segment_s=10.0, at_end=False)` in
configs/bm_synthdyad.py (`long`); run it with `python -m avatar_jax.evaluate --workdir W --evals long`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from avatar_jax.data import arrays
from avatar_jax.evals import motion, runner, synthdyad_metrics


def generator_data(config: ml_collections.ConfigDict, duration_s: float
                   ) -> ml_collections.ConfigDict:
  """config.data of the SynthDyad generator behind the run (read back from the metadata of
  pre-encoded arrays), rendering, with clips of `duration_s` seconds, read whole."""
  data = config.data.copy_and_resolve_references()
  if data.source == "arrays":
    # The generator's settings as encoded (its seed, resolution, split sizes); the log-mel
    # settings are the run's own, which the arrays were checked against when training read them.
    meta = arrays.read_metadata(os.path.expanduser(data.arrays.dir))
    encoded = meta.get("data", {})
    if encoded.get("source") != "synthdyad":
      raise ValueError("the 'long_video' evaluator generates SynthDyad clips; the run's arrays "
                       f"({data.arrays.dir}) were not encoded from SynthDyad")
    data.synthdyad = ml_collections.ConfigDict(encoded["synthdyad"])
    data.split_sizes = ml_collections.ConfigDict(encoded["split_sizes"])
  elif data.source != "synthdyad":
    raise ValueError("the 'long_video' evaluator generates SynthDyad clips; "
                     f"config.data.source={data.source!r}")
  data.source = "synthdyad"
  data.synthdyad.render = True
  data.synthdyad.duration_s = float(duration_s)
  data.synthdyad.cache = False
  data.cache = False
  data.worker_count = 0
  data.clip_frames = 0
  data.eval_windows = "full"
  return data


def seam_frames(num_latent: int, window: int, overlap: int, stride: int) -> np.ndarray:
  """Video-frame indices t where frame t+1 is the first frame of a later window's new rows.

  Latent row r >= 1 stands for video frames stride·(r−1)+1 .. stride·r; a later window j >= 1
  adds rows from window + (j−1)·hop on (hop = window − overlap), as `System.generate` stitches.
  """
  w = min(window, num_latent)
  hop = w - overlap
  rows = [w + j * hop for j in range(max(0, -(-(num_latent - w) // hop)))]
  return np.asarray([stride * (r - 1) for r in rows if r < num_latent], np.int64)


def seam_jump(frames: np.ndarray, seams: np.ndarray) -> float:
  """Mean |Δ| over the frame pairs (t, t+1) at `seams` / over all other pairs; [T, H, W, 3]."""
  f = np.asarray(frames, np.float32)
  step = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))          # [T − 1]
  at = np.zeros(len(step), bool)
  at[seams[seams < len(step)]] = True
  if not at.any() or at.all():
    return float("nan")
  return float(step[at].mean() / max(step[~at].mean(), 1e-12))


def segment_rows(gen: Sequence[np.ndarray], true: Sequence[np.ndarray], refs, samples,
                 fps: float, segment_s: float) -> list[dict[str, float]]:
  """Metrics per segment, pooled over clips (see the module docstring)."""
  from avatar_jax.evals import video  # pylint: disable=g-import-not-at-top
  n = min(len(v) for v in gen)
  seg = int(round(segment_s * fps))
  # The face reader reads frame by frame: each whole clip is read once, then cut per segment.
  gen_reads = [video.read_coefficients(v, r) for v, r in zip(gen, refs)]
  true_feats = [video.read_coefficients(v, r)[1] for v, r in zip(true, refs)]
  out = []
  for s0 in range(0, n, seg):
    # The video is 1 + stride·(F − 1) frames, a few short of the audio: a last segment at
    # least half full is kept (a 60-s clip's 50–60 s segment ends 3 frames early).
    e = min(s0 + seg, n)
    if 2 * (e - s0) < seg:
      break
    clips = [video.coefficient_metrics(c[s0:e], motion.crop(smp, s0, e - s0))
             for (c, _), smp in zip(gen_reads, samples)]
    agg = synthdyad_metrics.aggregate(clips)
    fd = video.feature_distances([f[s0:e] for _, f in gen_reads], [f[s0:e] for f in true_feats])
    out.append(dict(start_s=s0 / fps, end_s=e / fps, fd_face=fd["fd_face"],
                    lip_corr=agg["lip_corr"], jaw_leak=agg["jaw_leak"],
                    smile_resp=agg["smile_resp"]))
  return out


def format_table(segments: Sequence[Mapping[str, float]], summary: Mapping[str, float]) -> str:
  lines = ["| segment (s) | FD-face ↓ | lip_corr ↑ | jaw_leak ↓ | smile_resp ↑ |",
           "|---|---|---|---|---|"]
  f = lambda x: "–" if x is None or not np.isfinite(x) else f"{x:.3f}"
  for r in segments:
    lines.append(f"| {r['start_s']:.0f}–{r['end_s']:.0f} | {f(r['fd_face'])} | "
                 f"{f(r['lip_corr'])} | {f(r['jaw_leak'])} | {f(r['smile_resp'])} |")
  lines.append("")
  lines.append(f"seam_jump {f(summary['seam_jump'])} (truth at the same frames "
               f"{f(summary['seam_jump_truth'])}; 1 = no seam), fd_growth (last / first segment) "
               f"{f(summary['fd_growth'])}, {summary['clips']:.0f} clips of "
               f"{summary['duration_s']:.0f} s, {summary['windows']:.0f} windows each")
  return "\n".join(lines)


@runner.register("long_video", num_clips=2, batch_size=1, duration_s=60.0, segment_s=10.0,
                 prefix="")
def long_video(ctx: runner.Context, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """{split: {"segments": [...], "summary": {...}, "text": markdown}}."""
  system, model = ctx.system, ctx.model
  if float(cfg.segment_s) <= 0 or float(cfg.duration_s) < float(cfg.segment_s):
    raise ValueError(f"config.evals.{ctx.name}: need 0 < segment_s <= duration_s, got "
                     f"segment_s={cfg.segment_s}, duration_s={cfg.duration_s}")
  data = generator_data(ctx.config, float(cfg.duration_s))
  data.batch_size = int(cfg.batch_size)
  spec = system.data_spec()
  # Everything generation reads except what the encode job made (latents): the identity comes
  # as its rendered reference frame, encoded by the run's frozen VAE.
  keys = tuple(k for k in spec.keys if k not in ("latent_self", "reference_latent"))
  keys += ("reference_image",)
  results = {}
  truth_config = ml_collections.ConfigDict()   # what motion.truth / truth_videos read
  truth_config.data = data
  for split in runner.splits(cfg):
    chunks = list(runner.batches(ctx, cfg, keys, split, data=data))
    out = runner.generate(system, model, chunks, runner.rng_for(ctx, cfg), **runner.options(cfg))
    batch = runner.concat(chunks)
    if out.space != "video":
      raise ValueError(f"config.evals.{ctx.name}: 'long_video' scores decoded video; the run "
                       f"generates {out.space!r} (a video system needs its VAE)")
    frames = system.decode(out, batch)                              # uint8 [N, T, H, W, 3]
    n, t = frames.shape[:2]
    true, refs = motion.truth_videos(truth_config, split, batch, t)
    batch["_frames"] = np.full(n, t)
    samples = motion.truth(truth_config, split, batch)
    fps = float(data.synthdyad.fps)
    segs = segment_rows(list(frames), true, refs, samples, fps, float(cfg.segment_s))
    windows, _, wsize = np.shape(out.extras["windows"])[:3]   # [windows, B, rows, ...]
    stride = int(system.cfg.stride)
    num_latent = (t - 1) // stride + 1
    ov = int(runner.options(cfg).get("overlap", system.cfg.sample.overlap))
    seams = seam_frames(num_latent, wsize, ov, stride)
    summary = dict(
        seam_jump=float(np.mean([seam_jump(v, seams) for v in frames])),
        seam_jump_truth=float(np.mean([seam_jump(v, seams) for v in true])),
        fd_growth=float(segs[-1]["fd_face"] / segs[0]["fd_face"]) if segs[0]["fd_face"] > 0
        else float("nan"),
        clips=float(n), duration_s=float(cfg.duration_s), windows=float(windows))
    text = format_table(segs, summary)
    rows = {"model": summary, "segments": segs}
    text = motion.write_results(rows, ctx.workdir, f"{cfg.prefix}long_{split}",
                                f"Long video, SynthDyad `{split}`, {cfg.duration_s:.0f}-s clips",
                                step=ctx.step, split=split, table=text)
    if ctx.writer is not None and ctx.step is not None:
      ctx.writer.write_texts(ctx.step, {f"long_{split}": text})
    results[split] = dict(segments=segs, summary=summary, text=text)
  return results

