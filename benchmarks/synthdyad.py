r"""SynthDyad generation throughput: clips per second per core.

    python benchmarks/synthdyad.py                      # default table (8 s clips)
    python benchmarks/synthdyad.py --clips=20 --resolutions=64,128,256

One process, one thread (BLAS/OpenMP pinned to 1 thread before NumPy loads). For each setting it
generates `--clips` consecutive samples of the train split (warm-up sample excluded) and reports
clips/s from wall time and from process CPU time; the CPU-time figure is the per-core throughput
and is what to compare across machines that are shared. Target (SYNTHDYAD.md §4, docs/synthdyad.md):
>= 5 clips/s/core for an 8 s, 64x64 clip with both parties rendered.
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")

import dataclasses  # noqa: E402
import time  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

from avatar_jax.data.synthdyad import generator as sd  # noqa: E402
from avatar_jax.data.synthdyad import render as render_lib  # noqa: E402

_CLIPS = flags.DEFINE_integer("clips", 20, "Clips per setting (after one warm-up clip).")
_DURATION = flags.DEFINE_float("duration_s", 8.0, "Clip length in seconds.")
_RESOLUTIONS = flags.DEFINE_list("resolutions", ["64", "128", "256"], "Rendered resolutions.")
_SEED = flags.DEFINE_integer("seed", 0, "Generator seed.")


def _measure(cfg, render, clips, seed):
  sd.make_sample("train", 0, seed=seed, config=cfg, render=render)  # warm-up
  wall, cpu = time.perf_counter(), time.process_time()
  for i in range(1, clips + 1):
    sd.make_sample("train", i, seed=seed, config=cfg, render=render)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  return clips / wall, clips / cpu


def _measure_render(cfg, clips, seed):
  """Renderer alone: one party's clip, seconds per clip (CPU time)."""
  conv = sd.make_conversation("train", 0, seed=seed, config=cfg)
  render_lib.render(conv.motion[0], conv.identities[0], cfg.resolution)
  cpu = time.process_time()
  for _ in range(clips):
    render_lib.render(conv.motion[0], conv.identities[0], cfg.resolution)
  return (time.process_time() - cpu) / clips


def main(argv):
  del argv
  base = dataclasses.replace(sd.regime_for("train"), duration_s=_DURATION.value)
  rows = [("render=False (audio + motion)", base, False)]
  for res in _RESOLUTIONS.value:
    rows.append((f"render=True, {res}x{res}, both parties", dataclasses.replace(
        base, resolution=int(res)), True))
  lines = [f"SynthDyad, {base.duration_s:g} s clips ({base.num_frames} frames, "
           f"{base.sample_rate} Hz), {_CLIPS.value} clips per row, 1 process",
           "| setting | clips/s (wall) | clips/s/core (CPU time) | render, one party (ms) |",
           "|---|---:|---:|---:|"]
  for name, cfg, render in rows:
    # Fewer clips at the large resolutions keep the run short.
    clips = max(2, _CLIPS.value * 64 * 64 // (cfg.resolution ** 2)) if render else _CLIPS.value
    per_wall, per_cpu = _measure(cfg, render, clips, _SEED.value)
    one = f"{1e3 * _measure_render(cfg, min(clips, 5), _SEED.value):.0f}" if render else "-"
    lines.append(f"| {name} | {per_wall:.1f} | {per_cpu:.1f} | {one} |")
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
