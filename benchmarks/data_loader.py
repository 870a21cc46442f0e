"""Input-pipeline throughput (examples/s) for several worker counts.

    python -m benchmarks.data_loader --worker_counts 0,1,2 --batches 10
    python -m benchmarks.data_loader --render=false --batches 40          # motion/audio models
    python -m benchmarks.data_loader --source tfds --tfds_name synthdyad/r64 --data_dir ~/tfds

Each run builds `pipeline.make(config, 'train')` from `pipeline.default_config()` with the flags
applied, pulls `--warmup` batches (worker start-up, first generation) and then times `--batches`
batches. Reports examples/s and ms/batch per worker count, as a markdown table on stdout.
"""

from __future__ import annotations

import platform
import time

from absl import app
from absl import flags
from absl import logging

from avatar_jax.data import pipeline

_WORKERS = flags.DEFINE_list("worker_counts", ["0", "1", "2"], "Worker counts to measure.")
_BATCHES = flags.DEFINE_integer("batches", 10, "Timed batches per worker count.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches first.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Global batch size.")
_CLIP = flags.DEFINE_integer("clip_frames", 50, "Window length in video frames.")
_RENDER = flags.DEFINE_bool("render", True, "SynthDyad: render video (and keep it in the batch).")
_RES = flags.DEFINE_integer("resolution", 64, "SynthDyad render size.")
_SOURCE = flags.DEFINE_enum("source", "synthdyad", ["synthdyad", "tfds"], "Data source.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "synthdyad/r64", "TFDS name[/config].")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")


def measure(config, worker_count: int, batches: int, warmup: int) -> dict[str, float]:
  """Times `batches` batches after `warmup` of a fresh train iterator."""
  config = config.copy_and_resolve_references()
  config.worker_count = worker_count
  t0 = time.perf_counter()
  it = pipeline.make(config, "train", seed=0, shard_index=0, shard_count=1)
  try:
    for _ in range(warmup):
      next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
      n += len(next(it)["flame56_self"])
    t2 = time.perf_counter()
  finally:
    if hasattr(it, "close"):
      it.close()
  return dict(workers=worker_count, examples_per_s=n / (t2 - t1),
              ms_per_batch=1000 * (t2 - t1) / batches, startup_s=t1 - t0)


def main(argv):
  del argv
  c = pipeline.default_config()
  c.batch_size = _BATCH_SIZE.value
  c.clip_frames = _CLIP.value
  c.source = _SOURCE.value
  c.synthdyad.render = _RENDER.value
  c.synthdyad.resolution = _RES.value
  c.tfds.name, c.tfds.data_dir = _TFDS_NAME.value, _DATA_DIR.value
  if _RENDER.value:
    c.keep_keys = ("video", "partner_video", "reference_image")
  rows = [measure(c, int(w), _BATCHES.value, _WARMUP.value) for w in _WORKERS.value]
  logging.info("%s", rows)
  desc = (f"source={c.source} render={c.synthdyad.render} res={c.synthdyad.resolution} "
          f"clip_frames={c.clip_frames} batch={c.batch_size} ({platform.machine()}, "
          f"{platform.python_version()})")
  lines = [f"# {desc}", "| workers | examples/s | ms/batch | start-up + warm-up s |",
           "|---|---|---|---|"]
  lines += [f"| {r['workers']} | {r['examples_per_s']:.1f} | {r['ms_per_batch']:.0f} | "
            f"{r['startup_s']:.1f} |" for r in rows]
  print("\n".join(lines))  # the benchmark's report; library code logs instead


if __name__ == "__main__":
  app.run(main)
