"""Input-pipeline throughput (examples/s, batches/s) for several worker counts.

    # exactly a training config's data, with its system's keys (data_spec):
    python -m benchmarks.data_loader --config configs/quickstart.py --worker_counts 0,1,2
    python -m benchmarks.data_loader \
        --config configs/quickstart.py:width=256,depth=4,batch=64,clip_frames=200
    # ... and through prefetch_to_device onto the local devices:
    python -m benchmarks.data_loader --config configs/quickstart.py --device_prefetch
    # hand-built data config (no model):
    python -m benchmarks.data_loader --worker_counts 0,1,2 --batches 10
    python -m benchmarks.data_loader --render=false --batches 40          # motion/audio models
    python -m benchmarks.data_loader --source tfds --tfds_name synthdyad/r64 --data_dir ~/tfds
    python -m benchmarks.data_loader --config configs/quickstart.py --source arrays \
        --arrays_dir /tmp/qs_arrays          # after python -m avatar_jax.encode --out /tmp/qs_arrays

Each run builds `pipeline.make(config.data, 'train', keys=...)`, pulls `--warmup` batches untimed
(worker start-up, first generation; -1: one epoch of the split, which fills a clip cache) and
then times `--batches` batches. Reports, per worker count, examples/s and batches/s of the timed
part and the start-up + warm-up seconds, as a markdown table on stdout.
"""

from __future__ import annotations

import math
import os
import platform
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from avatar_jax.data import pipeline

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config (configs/x.py[:args]); its config.data and its system's "
    "data_spec keys are benchmarked. Without it, a default data config from the flags below.",
    lock_config=False)
_WORKERS = flags.DEFINE_list("worker_counts", ["0", "1", "2"], "Worker counts to measure.")
_BATCHES = flags.DEFINE_integer("batches", 50, "Timed batches per worker count.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first; -1: one epoch.")
_DEVICE = flags.DEFINE_bool("device_prefetch", False,
                            "Time global batches from pipeline.prefetch_to_device (all local "
                            "devices on one 'data' axis) instead of host batches.")
_KEYS = flags.DEFINE_list("keys", None, "Batch keys (default: the config's system's data_spec).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", None, "Global batch size (default 8 / config).")
_CLIP = flags.DEFINE_integer("clip_frames", None, "Window length in frames (default 50 / config).")
_RENDER = flags.DEFINE_bool("render", None, "SynthDyad: render video (and keep it in the batch).")
_RES = flags.DEFINE_integer("resolution", None, "SynthDyad render size.")
_CACHE = flags.DEFINE_bool("cache", None, "config.data.cache: prepare clips once, in memory.")
_SOURCE = flags.DEFINE_enum("source", None, ["synthdyad", "tfds", "arrays"], "Data source.")
_TFDS_NAME = flags.DEFINE_string("tfds_name", "synthdyad/r64", "TFDS name[/config].")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
_ARRAYS_DIR = flags.DEFINE_string("arrays_dir", None, "Encoded directory for --source arrays.")


def measure(data_config, keys, worker_count: int, batches: int, warmup: int,
            mesh=None) -> dict[str, float]:
  """Times `batches` batches after `warmup` of a fresh train iterator."""
  c = data_config.copy_and_resolve_references()
  c.worker_count = worker_count
  t0 = time.perf_counter()
  it = pipeline.make(c, "train", keys=keys, seed=0, shard_index=0, shard_count=1)
  if mesh is not None:
    it = pipeline.prefetch_to_device(it, mesh)
  try:
    for _ in range(warmup):
      next(it)
    t1 = time.perf_counter()
    n = 0
    for _ in range(batches):
      b = next(it)
      n += b["example_index"].shape[0]
    if mesh is not None:
      b["example_index"].block_until_ready()
    t2 = time.perf_counter()
  finally:
    it.close()
  return dict(workers=worker_count, examples_per_s=n / (t2 - t1), batches_per_s=batches / (t2 - t1),
              ms_per_batch=1000 * (t2 - t1) / batches, startup_s=t1 - t0)


def _data_config():
  """(config.data, keys, description of where they came from)."""
  keys = tuple(_KEYS.value) if _KEYS.value else None
  if _CONFIG.value is not None:
    config = _CONFIG.value
    c = config.data
    where = f"--config {flags.FLAGS['config'].serialize().split('=', 1)[-1]}"
    if keys is None:
      from avatar_jax.models import registry  # pylint: disable=g-import-not-at-top

      keys = tuple(registry.get(config.model.name)(config).data_spec().keys)
  else:
    c = pipeline.default_config()
    where = "default data config"
  if _BATCH_SIZE.value is not None:
    c.batch_size = _BATCH_SIZE.value
  if _CLIP.value is not None:
    c.clip_frames = _CLIP.value
  if _SOURCE.value is not None:
    c.source = _SOURCE.value
  if _RENDER.value is not None:
    c.synthdyad.render = _RENDER.value
  if _RES.value is not None:
    c.synthdyad.resolution = _RES.value
  if _CACHE.value is not None:
    c.cache = _CACHE.value
    c.synthdyad.cache = _CACHE.value
  c.tfds.name, c.tfds.data_dir = _TFDS_NAME.value, _DATA_DIR.value
  if _ARRAYS_DIR.value:
    c.arrays.dir = _ARRAYS_DIR.value
  if _CONFIG.value is None and c.synthdyad.render and keys is None:
    c.keep_keys = ("video", "partner_video", "reference_image")
  return c, keys, where


def main(argv):
  del argv
  c, keys, where = _data_config()
  mesh = None
  if _DEVICE.value:
    import jax  # pylint: disable=g-import-not-at-top

    mesh = jax.make_mesh((jax.local_device_count(),), ("data",))
  warmup = _WARMUP.value
  if warmup < 0:
    n = len(pipeline.make_source(c, "train"))
    warmup = math.ceil(n / c.batch_size)
  rows = [measure(c, keys, int(w), _BATCHES.value, warmup, mesh) for w in _WORKERS.value]
  logging.info("%s", rows)
  desc = (f"{where}: source={c.source} keys={keys or 'default'} clip_frames={c.clip_frames} "
          f"batch={c.batch_size} cache={c.cache or c.synthdyad.cache} warm-up={warmup} batches, timed "
          f"{_BATCHES.value}, device_prefetch={_DEVICE.value} ({platform.machine()}, "
          f"{os.cpu_count()} cpus, load {os.getloadavg()[0]:.1f}, "
          f"Python {platform.python_version()})")
  lines = [f"# {desc}", "| workers | examples/s | batches/s | ms/batch | start-up + warm-up s |",
           "|---|---|---|---|---|"]
  lines += [f"| {r['workers']} | {r['examples_per_s']:.0f} | {r['batches_per_s']:.1f} | "
            f"{r['ms_per_batch']:.1f} | {r['startup_s']:.1f} |" for r in rows]
  print("\n".join(lines))  # the benchmark's report; library code logs instead


if __name__ == "__main__":
  app.run(main)
