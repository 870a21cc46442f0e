"""Motion metrics evaluators: the SynthDyad §6 table ("synthdyad") and the DualTalk/TIMAR
56-d FLAME metrics ("flame56"); see evals/runner.py for how they are declared and run.

"synthdyad" scores generated motion [T, C] (Outputs.space "motion") against the SynthDyad truth
of each eval window (events, speaking flags, own audio envelope) next to three references:
ground truth (the generator's own motion), mean motion (the training mean, model.mean) and the
same model fed shuffled audio (window i gets window i+1's two audio streams). With
`flame56=True` the rows also carry the 56-d metrics of the same motion (SYNTHDYAD.md §3).
With `crosstalk=True` one more row stresses full duplex: the avatar keeps its own voice while
every partner input comes from another conversation's window, so both talk at once in 14 % of
the frames of SynthDyad `test` (1.8 % with the window's own partner). Its lip metrics against
the avatar's own truth say whether the partner's speech disturbs the lips; its jaw_leak
(partner-only frames of the partner heard) whether it opens the mouth; listening metrics do
not apply to it.
Writes <workdir>/eval/<split>.{json,md}.

"flame56" scores FLAME 56-d outputs (space "flame56", or "motion" through its 56-d export)
against the pipeline's flame56_self / flame56_partner: FD, P-FD, MSE, SID, rPCC, ... It needs no
SynthDyad renderer or truth. Writes <workdir>/eval/<name>_<split>.{json,md}.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
from absl import logging

from avatar_jax.data import arrays, pipeline
from avatar_jax.data.synthdyad import flame
from avatar_jax.evals import dualtalk, runner, synthdyad_metrics

REFERENCES = ("shuffled audio", "mean motion", "ground truth")
CROSSTALK = "crosstalk (another conversation's partner)"
# Scored against the window's own partner events, so meaningless under another partner.
_LISTENING_EVENTS = ("nod_f1", "smile_resp", "brow_resp")
# Video systems on a VAE's latents: the reader on the true latents decoded.
RECONSTRUCTED = "true latents, decoded (read)"
# Per-frame keys of a SynthDyad sample that a window crops (events are shifted instead).
_PER_FRAME = ("motion_self", "motion_partner", "speaking_self", "speaking_partner",
              "flame56_self", "flame56_partner")


def to_flame56(value: np.ndarray, space: str) -> np.ndarray:
  """Outputs.value [N, T, D] of `space` as FLAME 56-d [N, T, 56]."""
  if space == "flame56":
    return np.asarray(value, np.float32)
  if space == "motion":
    return np.stack([flame.to_flame56(v) for v in value])
  raise ValueError(f"no FLAME 56-d view of outputs in space {space!r} (expected 'flame56' or 'motion')")


def crop(sample: Mapping[str, Any], start: int, num_frames: int) -> dict[str, Any]:
  """A SynthDyad sample cut to video frames [start, start + num_frames): per-frame keys and
  audio sliced, events shifted to the window's clock and kept where they overlap it."""
  fps, sr = float(sample["fps"]), int(sample["sample_rate"])
  if start == 0 and num_frames >= len(sample["motion_self"]):
    return dict(sample)
  out = dict(sample)
  for k in _PER_FRAME:
    if k in sample:
      out[k] = np.asarray(sample[k])[start:start + num_frames]
  spf = sr / fps
  for k in ("audio_self", "audio_partner"):
    if k in sample:
      out[k] = np.asarray(sample[k])[int(round(start * spf)):int(round((start + num_frames) * spf))]
  t0, t1 = start / fps, (start + num_frames) / fps
  ev = {k: np.asarray(v) for k, v in sample["events"].items()}
  keep = (ev["end"] >= t0) & (ev["start"] < t1)
  out["events"] = {k: v[keep] for k, v in ev.items()}
  out["events"]["start"] = ev["start"][keep] - t0
  out["events"]["end"] = ev["end"][keep] - t0
  return out


def truth(config: ml_collections.ConfigDict, split: str, batch: Mapping[str, np.ndarray]
          ) -> list[dict[str, Any]]:
  """The SynthDyad truth (whole sample, render=False) of each window of `batch`, cropped."""
  data = config.data
  if data.source == "arrays":
    # Pre-encoded SynthDyad (`python -m avatar_jax.encode`): its metadata keeps the generator's
    # data config, so the truth is regenerated exactly as it was encoded.
    meta = arrays.read_metadata(os.path.expanduser(data.arrays.dir))
    if meta.get("data", {}).get("source") == "synthdyad":
      data = ml_collections.ConfigDict(meta["data"])
  source = pipeline.make_source(data, split)
  if not isinstance(source, pipeline.SynthDyadSource):
    raise ValueError(f"the 'synthdyad' evaluator needs SynthDyad truth (events, speaking flags); "
                     f"config.data.source={config.data.source!r} has none (arrays encoded from "
                     f"SynthDyad have it): use type 'flame56'")
  out = []
  for i, start, t in zip(batch["example_index"], batch["clip_start"], batch["_frames"]):
    out.append(crop(source.get(int(i), render=False), int(start), int(t)))
  return out


def score(rows_preds: Mapping[str, np.ndarray], samples: Sequence[Mapping[str, Any]], *,
          with_flame56: bool) -> dict[str, dict[str, float]]:
  """{row name: aggregated SynthDyad metrics (+ 56-d metrics)} of motion [N, T, C] per row."""
  rows = {}
  for name, pred in rows_preds.items():
    rows[name] = synthdyad_metrics.aggregate(
        [synthdyad_metrics.clip_metrics(p, s) for p, s in zip(pred, samples)])
    if with_flame56:
      agg, _ = dualtalk.evaluate_arrays([flame.to_flame56(p) for p in pred],
                                        [s["flame56_self"] for s in samples],
                                        [s["flame56_partner"] for s in samples])
      rows[name].update({k: v for k, v in agg.items() if k != "clips"})
  return rows


def crosstalk_partners(example_index: np.ndarray) -> np.ndarray:
  """For each eval window, the window whose partner it hears in the crosstalk row: the next one
  (cyclically) from another conversation. SynthDyad sample i is conversation i // 2 seen from
  one side, so the very next window is often the same conversation with the roles swapped,
  whose partner is the avatar's own voice."""
  conv = np.asarray(example_index) // 2
  n = len(conv)
  out = np.empty(n, np.int64)
  for i in range(n):
    other = [j for j in (np.arange(1, n) + i) % n if conv[j] != conv[i]]
    if not other:
      raise ValueError(f"the crosstalk row needs eval windows of >= 2 conversations; the {n} "
                       f"windows (examples {sorted(set(np.asarray(example_index).tolist()))}) "
                       "come from one: raise num_clips to >= 3")
    out[i] = other[0]
  return out


def inputs_from(batch: Mapping[str, np.ndarray], source: np.ndarray, swap
                ) -> dict[str, np.ndarray]:
  """`batch` whose keys with `swap(key)` true come from windows `source` [N] (window i gets
  window source[i]'s): shuffled audio swaps both voices, crosstalk every partner input."""
  return {k: (v[source] if swap(k) else v) for k, v in batch.items()}


def _voices(key: str) -> bool:   # both voices, whichever front end reads them
  return key.startswith(("mel_", "audio_"))


def _partner(key: str) -> bool:  # the partner's audio, features, motion
  return "partner" in key


def crosstalk_truth(samples: Sequence[Mapping[str, Any]], heard: np.ndarray
                    ) -> list[dict[str, Any]]:
  """The truth of the crosstalk row: each window's own truth with the speaking flags of the
  partner it now hears (window heard[i]'s, `crosstalk_partners`), cut or padded (silent) to its
  length."""
  out = []
  for s, j in zip(samples, heard):
    other = np.asarray(samples[j]["speaking_partner"], bool)
    flags = np.zeros(len(s["speaking_partner"]), bool)
    m = min(len(flags), len(other))
    flags[:m] = other[:m]
    out.append(dict(s, speaking_partner=flags))
  return out


def crosstalk_row(clips: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """Aggregate of the crosstalk row's clip metrics, listening-event metrics left undefined."""
  clips = [dict(c, **{k: np.nan for k in _LISTENING_EVENTS}, nod_tp=0.0, nod_fp=0.0, nod_fn=0.0)
           for c in clips]
  return synthdyad_metrics.aggregate(clips)


def motion_rows(ctx: runner.Context, cfg: ml_collections.ConfigDict, split: str, *,
                baselines: bool, with_flame56: bool = False) -> dict[str, dict[str, float]]:
  """{row name: metrics} for the model (and with `baselines` the three references) on the first
  `cfg.num_clips` eval windows of `split`."""
  system, model = ctx.system, ctx.model
  keys = system.data_spec().keys
  chunks = list(runner.batches(ctx, cfg, keys, split))
  batch = runner.concat(chunks)
  rng = runner.rng_for(ctx, cfg)
  opts = runner.options(cfg)
  out = runner.generate(system, model, chunks, rng, **opts)
  if out.space == "video":
    return video_rows(ctx, cfg, split, chunks, out, rng, baselines=baselines)
  if out.space not in ("motion", "flame56"):
    raise ValueError(f"config.evals.{ctx.name}: type 'synthdyad' scores SynthDyad motion (or FLAME "
                     f"56-d through the inverse export map, or video through the face reader), "
                     f"but {type(system).__module__}.System generates {out.space!r}; use "
                     "'flame56' or 'video'")
  # FLAME 56-d outputs are read back as SynthDyad motion (flame.from_flame56, exact on the
  # export's image), so the listening metrics (nod_f1, smile_resp, ...) apply to them too.
  as_motion = (lambda v: np.asarray(v)) if out.space == "motion" else flame.from_flame56
  preds = {"model": as_motion(out.value)}
  n = len(out.value)
  if baselines:
    if n < 2:
      raise ValueError(f"config.evals.{ctx.name}: the shuffled-audio baseline needs >= 2 clips, "
                       f"num_clips={cfg.num_clips}")
    shuffled = inputs_from(batch, np.roll(np.arange(n), -1), _voices)  # window i+1's voices
    preds["shuffled audio"] = as_motion(runner.generate(
        system, model, runner.split_batch(shuffled, int(cfg.batch_size)), rng, **opts).value)
    preds["mean motion"] = as_motion(np.broadcast_to(np.asarray(model.mean[...]), out.value.shape))
  if cfg.crosstalk:
    heard = crosstalk_partners(batch["example_index"])
    crossed = as_motion(runner.generate(
        system, model, runner.split_batch(inputs_from(batch, heard, _partner),
                                          int(cfg.batch_size)), rng, **opts).value)
  batch["_frames"] = np.full(n, out.value.shape[1])
  samples = truth(ctx.config, split, batch)
  if baselines:
    preds["ground truth"] = np.stack([s["motion_self"] for s in samples])
  rows = score(preds, samples, with_flame56=with_flame56)
  if cfg.crosstalk:
    rows[CROSSTALK] = crosstalk_row([synthdyad_metrics.clip_metrics(p, s) for p, s in
                                     zip(crossed, crosstalk_truth(samples, heard))])
  return rows


def truth_videos(config: ml_collections.ConfigDict, split: str, batch: Mapping[str, np.ndarray],
                 num_frames: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The true rendered windows uint8 [T, H, W, 3] and reference frames [H, W, 3] of `batch`
  (re-rendered from the SynthDyad generator, also for pre-encoded arrays)."""
  data = config.data
  if data.source == "arrays":
    meta = arrays.read_metadata(os.path.expanduser(data.arrays.dir))
    if meta.get("data", {}).get("source") == "synthdyad":
      data = ml_collections.ConfigDict(meta["data"])
  data = data.copy_and_resolve_references()
  data.synthdyad.render = True
  source = pipeline.make_source(data, split)
  videos, refs = [], []
  for i, start in zip(batch["example_index"], batch["clip_start"]):
    ex = source.get(int(i), render=False)
    videos.append(source.render_window(ex, "video", int(start), int(start) + num_frames))
    refs.append(source.render_window(ex, "reference_image", 0, 1))
  return videos, refs


def video_rows(ctx: runner.Context, cfg: ml_collections.ConfigDict, split: str, chunks, out,
               rng, *, baselines: bool) -> dict[str, dict[str, float]]:
  """The SynthDyad table of generated video: every row's frames are read by the face reader
  (evals/video.py) and scored like motion; FD-face / FVD-face against the true renders. Rows:
  model, shuffled audio (each clip with the next clip's voices), the reader's reading of the true
  video (the ceiling the reader allows) and, for latent systems (`system.reconstruct`), of the
  true latents decoded (the ceiling the latent space and its decoder allow)."""
  from avatar_jax.evals import video  # pylint: disable=g-import-not-at-top
  system, model = ctx.system, ctx.model
  batch = runner.concat(chunks)
  frames = {"model": system.decode(out, batch)}
  n, t = frames["model"].shape[:2]
  if baselines:
    if n < 2:
      raise ValueError(f"config.evals.{ctx.name}: the shuffled-audio baseline needs >= 2 clips, "
                       f"num_clips={cfg.num_clips}")
    shuffled = inputs_from(batch, np.roll(np.arange(n), -1), _voices)
    gen = runner.generate(system, model, runner.split_batch(shuffled, int(cfg.batch_size)), rng,
                          **runner.options(cfg))
    frames["shuffled audio"] = system.decode(gen, shuffled)
  reconstruct = getattr(system, "reconstruct", None)
  if baselines and reconstruct is not None:
    frames[RECONSTRUCTED] = system.decode(runner.generate(
        system, model, chunks, rng, fn=lambda m, b, r: reconstruct(m, b)), batch)
  if cfg.crosstalk:
    heard = crosstalk_partners(batch["example_index"])
    crossed = inputs_from(batch, heard, _partner)
    frames[CROSSTALK] = system.decode(runner.generate(
        system, model, runner.split_batch(crossed, int(cfg.batch_size)), rng,
        **runner.options(cfg)), crossed)
  true, refs = truth_videos(ctx.config, split, batch, t)
  if baselines:
    frames["ground truth (read)"] = np.stack(true)
  batch["_frames"] = np.full(n, t)
  samples = truth(ctx.config, split, batch)
  # Each video is read once: (coefficients [T, C], features [T, F]) serve both the motion
  # metrics and FD-face / FVD-face, the true videos' reads every row's distances.
  read = lambda vids: [video.read_coefficients(v, r) for v, r in zip(vids, refs)]
  true_reads = read(true)
  rows = {}
  for name, vids in frames.items():
    reads = true_reads if name == "ground truth (read)" else read(vids)
    truths = crosstalk_truth(samples, heard) if name == CROSSTALK else samples
    clips = [video.coefficient_metrics(c, s) for (c, _), s in zip(reads, truths)]
    rows[name] = (crosstalk_row if name == CROSSTALK else synthdyad_metrics.aggregate)(clips)
    if name != "ground truth (read)":
      rows[name].update(video.feature_distances([f for _, f in reads], [f for _, f in true_reads]))
  return rows


def write_results(rows: Mapping[str, Any], workdir: str, stem: str, title: str, *,
                  step: int | None = None, seed: int | None = None, split: str | None = None,
                  table: str | None = None) -> str:
  """Writes eval/<stem>.json and .md; returns the markdown (title + table)."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  table = table or synthdyad_metrics.format_table(rows)
  title = title + (f", step {step}" if step is not None else "")
  with open(os.path.join(out_dir, f"{stem}.json"), "w") as f:
    json.dump({"split": split, "step": step, "seed": seed, "rows": rows}, f, indent=1)
  with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
    f.write(f"### {title}\n\n{table}\n")
  return f"### {title}\n\n{table}"


def _report(ctx: runner.Context, split: str, rows, text: str, metric_names) -> None:
  model = rows.get("model", {})
  logging.info("%s step %s: %s", split, ctx.step, " ".join(
      f"{k}={v:.3f}" for k, v in model.items() if isinstance(v, (int, float))))
  logging.info("\n%s", text)
  if ctx.writer is not None and ctx.step is not None:
    ctx.writer.write_scalars(ctx.step, {f"eval_{split}/{k}": v for k, v in rows["model"].items()
                                        if k in metric_names})
    ctx.writer.write_texts(ctx.step, {f"eval_{split}": text})


@runner.register("synthdyad", baselines=True, flame56=False, crosstalk=False, prefix="")
def synthdyad(ctx: runner.Context, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """{split: {"rows": {row: metrics}, "text": markdown}}; writes eval/<prefix><split>.{json,md}
  (the SynthDyad table; `prefix` tells apart several tables of one run, e.g. "n0_" for TIMAR
  without history)."""
  results = {}
  for split in runner.splits(cfg):
    rows = motion_rows(ctx, cfg, split, baselines=cfg.baselines, with_flame56=cfg.flame56)
    seed = ctx.config.seed if cfg.seed is None else cfg.seed
    opts = runner.options(cfg)
    title = f"SynthDyad `{split}` split" + (f" ({opts})" if opts else "")
    text = write_results(rows, ctx.workdir, f"{cfg.prefix}{split}", title, step=ctx.step,
                         seed=seed, split=split)
    _report(ctx, split, rows, text, dict(synthdyad_metrics.METRICS))
    results[split] = dict(rows=rows, text=text)
  return results


@runner.register("flame56")
def flame56(ctx: runner.Context, cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  """{split: {"rows": {"model": 56-d metrics}, "text": markdown}}; writes eval/<name>_<split>.{json,md}."""
  results = {}
  for split in runner.splits(cfg):
    keys = ctx.system.data_spec().keys + ("flame56_self", "flame56_partner")
    chunks = list(runner.batches(ctx, cfg, keys, split))
    out = runner.generate(ctx.system, ctx.model, chunks, runner.rng_for(ctx, cfg),
                          **runner.options(cfg))
    pred = to_flame56(out.value, out.space)
    batch = runner.concat(chunks)
    agg, _ = dualtalk.evaluate_arrays(list(pred), list(batch["flame56_self"]),
                                      list(batch["flame56_partner"]))
    rows = {"model": agg}
    lines = ["| metric | model |", "|---|---|"] + [f"| {k} | {v:.4g} |" for k, v in agg.items()]
    text = write_results(rows, ctx.workdir, f"{ctx.name}_{split}", f"FLAME 56-d `{split}` split",
                         step=ctx.step, seed=cfg.seed, split=split, table="\n".join(lines))
    _report(ctx, f"{ctx.name}_{split}", rows, text, set(agg) - {"clips"})
    results[split] = dict(rows=rows, text=text)
  return results


# ------------------------------------------------------------------------ published tables
def table_rows(workdirs: Sequence[str], names: Sequence[str], splits: Sequence[str],
               seeds: Sequence[int], num_clips: int | None, table: str, *,
               references: bool = False, options: Mapping[str, Any] | None = None) -> list[dict]:
  """One result row per (run, split, sampling seed): the model's metrics, labelled for
  `evals.tables` (the 56-d metrics too unless table == "synthdyad").

  references: also rows for the references (shuffled audio, mean motion, ground truth).
  options: `system.generate` options replacing the evaluator's (e.g. {"history_turns": 0}).
  """
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  rows = []
  for workdir, name in zip(workdirs, names):
    system, model, config, step = trainer.restore_model(workdir)
    cfg = metrics_config(config, system)
    if num_clips:
      cfg.num_clips = num_clips
    if options is not None:
      cfg.options = dict(options)
    for split in splits:
      for seed in seeds:
        cfg.seed = int(seed)
        ctx = runner.Context(system, model, config, workdir, step=step, name="table")
        res = motion_rows(ctx, cfg, split, baselines=references, with_flame56=table != "synthdyad")
        for kind, metrics in res.items():
          label = name if kind == "model" else kind
          label = f"{label} ({split})" if len(splits) > 1 else label
          rows.append({"name": label, "seed": seed, "split": split, "step": step,
                       "workdir": workdir, **metrics})
  return rows


def metrics_config(config: ml_collections.ConfigDict, system=None) -> ml_collections.ConfigDict:
  """The run's first "synthdyad" evaluator config (defaults where it declares none)."""
  for cfg in runner.declared(config, system).values():
    if cfg.type == "synthdyad":
      return cfg
  return ml_collections.ConfigDict(runner.defaults("synthdyad"))


def saved_rows(workdirs: Sequence[str], names: Sequence[str], splits: Sequence[str], *,
               references: bool = False, prefix: str = "") -> list[dict]:
  """Rows from the metrics each run saved (eval/<prefix><split>.json of its "synthdyad" evaluator).

  references: also the reference rows saved with each run (shuffled audio, mean motion, ground
  truth), labelled by kind, so that several seeds give them mean ± CI too.
  """
  rows = []
  for workdir, name in zip(workdirs, names):
    for split in splits:
      path = os.path.join(workdir, "eval", f"{prefix}{split}.json")
      if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: the run saved no `{split}` evaluation; "
                                "evaluate without --saved")
      with open(path) as f:
        saved = json.load(f)
      label = f"{name} ({split})" if len(splits) > 1 else name
      rows.append({"name": label, "seed": saved.get("seed"), "split": split, "step": saved["step"],
                   "workdir": workdir, **saved["rows"]["model"]})
      if references:
        for ref, metrics in saved["rows"].items():
          if ref != "model":
            rows.append({"name": ref if len(splits) == 1 else f"{ref} ({split})",
                         "seed": saved.get("seed"), "split": split, "workdir": workdir, **metrics})
  return rows
