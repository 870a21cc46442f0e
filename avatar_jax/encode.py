"""Pre-encode a dataset: `python -m avatar_jax.encode --config configs/x.py --out DIR`.

  --encoder mel         (default) per-frame targets + whole-clip log-mels of every audio stream
  --encoder WORKDIR     a trained system's `System.encode` (its last checkpoint, EMA weights)

Writes ArrayRecord shards + DIR/metadata.json (data/arrays.py); train on them with
`--config.data.source=arrays --config.data.arrays.dir=DIR`. Rerunning resumes.
Library code: avatar_jax/data/encoding.py.
"""
from __future__ import annotations

import os

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/x.py[:args]).",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (created; resumed if it exists).")
_ENCODER = flags.DEFINE_string("encoder", "mel", "'mel' or a training workdir.")
_SPLITS = flags.DEFINE_list("splits", None, "Splits to encode (default: config.data.split_sizes).")
_SHARD = flags.DEFINE_integer("shard_size", 256, "Examples per shard (the unit of resumption).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Clips per System.encode call.")
_COMPRESSION = flags.DEFINE_enum("compression", "none", ["none", "snappy", "zstd"],
                                 "Record compression; 'none' reads fastest (latents and log-mels "
                                 "barely compress).")
flags.mark_flags_as_required(["config", "out"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if os.path.exists(_OUT.value) and not os.path.isdir(_OUT.value):
    raise app.UsageError(f"--out={_OUT.value} is a file; expected a directory (created if "
                         "missing, resumed if it holds an earlier encode).")
  from avatar_jax.data import encoding  # pylint: disable=g-import-not-at-top

  encoding.encode(_CONFIG.value, _OUT.value, _ENCODER.value, splits=_SPLITS.value,
                  shard_size=_SHARD.value, batch_size=_BATCH.value,
                  compression=_COMPRESSION.value)


if __name__ == "__main__":
  app.run(main)
