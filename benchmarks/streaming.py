"""Benchmark: streaming a block-causal motion model (avatar_jax/stream.py) — per-block compute,
end-to-end latency and frames/s — next to the same model's offline quality on the same clips.

  python -m benchmarks.streaming --workdir runs/forcing              # CPU or GPU, whatever jax has
  python -m benchmarks.streaming --workdir runs/forcing --clips 4 --chunks 40,320 --out_md t.md

For each chunk size, `--clips` SynthDyad test clips (their two voices) are pushed through a
`DuplexAgent` in real time (the pushing thread sleeps to the audio clock), then once more as fast
as possible. Columns:
  compute (ms)        median / p95 wall time of one block (audio window + model + rendering)
  after audio (ms)    median / p95 from the push that made a block ready to its frames being out
  look-ahead (ms)     what the model waits for by design: `lookahead` frames + half a mel window
  end to end (ms)     after-audio median + look-ahead: audio sample in -> frame out
  frames/s            frames generated per second of compute (as fast as possible)
  real-time factor    frames/s / fps (>= 1: keeps up)
A second table scores the motion on the same clips with the SynthDyad metrics
(evals/synthdyad_metrics.py): streamed (the as-fast-as-possible pass of each chunk size) and
offline (`System.generate` on the whole clip, the trainer's evaluator path), which
`tests/test_stream.py` shows equal to the streamed motion.
"""
from __future__ import annotations

import argparse
import datetime
import platform

import jax
import numpy as np

from avatar_jax import stream, trainer
from avatar_jax.data import features, pipeline
from avatar_jax.evals import synthdyad_metrics as sdm

QUALITY = ("lip_corr", "lip_conf", "jaw_leak", "nod_f1", "smile_resp")


def quality_row(name: str, motions, clips) -> str:
  """One markdown row of SynthDyad metrics, averaged over clips; motions [T', C] per clip."""
  agg = sdm.aggregate([sdm.clip_metrics(m[:len(c["motion_self"])], c)
                       for m, c in zip(motions, clips)])
  return f"| {name} | " + " | ".join(f"{agg.get(k, float('nan')):.3f}" for k in QUALITY) + " |"


def offline_motion(system, model, config, clip, rng) -> np.ndarray:
  """[T, C] motion of one clip from `System.generate` (whole clip, no streaming)."""
  mel = features.mel_config_from(config.data.features)
  batch = {"mel_self": features.log_mel(clip["audio_self"], mel)[None],
           "mel_partner": features.log_mel(clip["audio_partner"], mel)[None]}
  if system.cfg.use_partner_motion:
    batch["motion_partner"] = np.asarray(clip["motion_partner"], np.float32)[None]
  return np.asarray(system.generate(model, batch, rng).value)[0]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--clips", type=int, default=4)
  ap.add_argument("--chunks", default="40,160,320", help="milliseconds of audio per push")
  ap.add_argument("--out_md", default="")
  args = ap.parse_args(argv)
  system, model, config, step = trainer.restore_model(args.workdir)
  source = pipeline.make_source(config.data, "test")
  clips = [source.get(i, render=False) for i in range(args.clips)]
  fps = system.facts["fps"]
  dev = jax.devices()[0]
  head = (f"Streaming {args.workdir} (step {step}; block {system.cfg.block} frames, look-ahead "
          f"{system.cfg.lookahead}, history {system.cfg.history} s, NFE {system.cfg.sample.steps})"
          f" on {dev.device_kind} ({jax.device_count()} device), jax {jax.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
          f"{args.clips} test clips")
  lines = ["| chunk (ms) | blocks | compute (ms) median / p95 | after audio (ms) median / p95 | "
           "look-ahead (ms) | end to end (ms) | frames/s | real-time factor |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
  print(head + "\n\n" + "\n".join(lines), flush=True)
  agent = stream.DuplexAgent(system, model, config)
  stream.replay(agent, clips[0]["audio_self"][:32000], clips[0]["audio_partner"][:32000],
                realtime=False)          # compiles the block step: not part of any latency
  streamed = {}
  for chunk in (int(c) for c in args.chunks.split(",")):
    comp, after, frames, seconds = [], [], 0, 0.0
    for real in (True, False):
      for clip in clips:
        agent.reset()
        out, summary = stream.replay(agent, clip["audio_self"], clip["audio_partner"],
                                     chunk_ms=chunk, realtime=real)
        lat = agent.latency[:-1] or agent.latency
        if real:
          after += [x["since_audio_ms"] for x in lat]
          design = summary["lookahead_ms"]
        else:
          comp += [x["compute_ms"] for x in agent.latency]
          frames += len(out)
          seconds += sum(x["compute_ms"] for x in agent.latency) / 1e3
        if not real and agent.motion:
          streamed.setdefault(chunk, []).append(np.concatenate(agent.motion))
    fps_gen = frames / seconds
    row = (f"| {chunk} | {len(comp)} | {np.median(comp):.1f} / {np.percentile(comp, 95):.1f} | "
           f"{np.median(after):.1f} / {np.percentile(after, 95):.1f} | {design:.0f} | "
           f"{np.median(after) + design:.0f} | {fps_gen:.0f} | {fps_gen / fps:.1f}× |")
    lines.append(row)
    print(row, flush=True)
  q = ["| motion, same clips | " + " | ".join(QUALITY) + " |", "|---|" + "---:|" * len(QUALITY)]
  for chunk, motions in streamed.items():
    q.append(quality_row(f"streamed, {chunk}-ms chunks", motions, clips))
  rng = jax.random.key(0)
  q.append(quality_row("offline (System.generate)",
                       [offline_motion(system, model, config, c, rng) for c in clips], clips))
  print("\n" + "\n".join(q), flush=True)
  if args.out_md:
    with open(args.out_md, "w") as f:
      f.write(head + "\n\n" + "\n".join(lines) + "\n\n" + "\n".join(q) + "\n")


if __name__ == "__main__":
  main()
