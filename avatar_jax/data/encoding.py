"""The encode job: whole clips of a data config -> an `arrays` directory (data/arrays.py).

`encode(config, out, encoder)` with

  encoder="mel"        the built-in encoder: per example, the per-frame targets the source has
                       (flame56, motion, speaking), the whole-clip log-mel of each audio stream it
                       has (`config.data.features`), and `config.data.keep_keys` (video, audio),
                       so training reads precomputed features;
  encoder=<workdir>    a trained system, restored with `trainer.restore_model(workdir)`: its
                       `System.encode(model, batch) -> {key: [B, rows, ...]}` on batches of whole
                       clips with its data spec's keys, stored beside the per-frame targets and
                       the whole-clip log-mels (a video VAE's latents + the audio features a
                       latent DiT trains on).

Resumable: each split is written in shards of `shard_size` examples; a shard counts as done when
its marker file exists (written after the shard is closed), so a rerun skips finished shards and
redoes a partially written one. A rerun into a directory made by another encoder, data config or
feature set fails and says which field differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import ml_collections
import numpy as np

from avatar_jax import compile_cache
from avatar_jax.data import arrays
from avatar_jax.data import features as features_lib
from avatar_jax.data import pipeline
from avatar_jax.data import sources

# encode(compression=...) -> ArrayRecord writer options (one record per group: random access).
COMPRESSIONS = {"none": "group_size:1,uncompressed", "snappy": "group_size:1,snappy",
                "zstd": "group_size:1,zstd:3"}
TARGET_KEYS = ("flame56_self", "flame56_partner", "motion_self", "motion_partner",
               "speaking_self", "speaking_partner")
# config.data fields that do not change what an example holds (how it is read, batched, windowed).
_READ_FIELDS = ("worker_count", "prefetch", "read_threads", "batch_size", "shuffle_seed",
                "clip_frames", "eval_windows", "mel_streams", "cache", "synthdyad.cache")


def data_identity(data: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.data as JSON, without the fields that only change how it is read."""
  d = json.loads(data.to_json_best_effort())
  for f in _READ_FIELDS:
    *parents, leaf = f.split(".")
    node = d
    for p in parents:
      node = node.get(p, {})
    node.pop(leaf, None)
  return d


@dataclasses.dataclass
class Encoder:
  """name: recorded in the metadata; keys: batch keys read from the pipeline; fn: batch of whole
  clips {key: [B, rows, ...]} -> {key: [B, rows', ...]} to store (None: store the batch)."""
  name: str
  keys: tuple[str, ...]
  fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None


def mel_encoder(data: ml_collections.ConfigDict, split: str) -> Encoder:
  """Per-frame targets + whole-clip log-mel of every audio stream + `keep_keys`."""
  have = sources.make_source(data, split).keys
  keys = [k for k in TARGET_KEYS if k in have]
  keys += [f"mel_{s}" for s in pipeline.STREAMS if f"audio_{s}" in have]
  keys += [k for k in data.keep_keys if k not in keys]
  return Encoder("mel", tuple(keys))


def system_encoder(config: ml_collections.ConfigDict, workdir: str, split: str) -> Encoder:
  """A trained system's `encode` hook (restored EMA weights), plus the per-frame targets and the
  log-mel of every audio stream."""
  import jax  # pylint: disable=g-import-not-at-top

  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top

  system, model, _, step = trainer.restore_model(workdir)
  have = sources.make_source(config.data, split).keys
  targets = tuple(k for k in TARGET_KEYS if k in have)
  targets += tuple(f"mel_{s}" for s in pipeline.STREAMS if f"audio_{s}" in have)
  spec = system.data_spec()
  spec_keys = tuple(spec.keys) + tuple(k for k in getattr(spec, "optional_keys", ()) if k in have)
  encode = jax.jit(lambda b: system.encode(model, b))

  def fn(batch):
    inputs = {k: batch[k] for k in spec_keys}
    out = {k: np.asarray(v) for k, v in encode(inputs).items()}
    return {**{k: batch[k] for k in targets}, **out}

  return Encoder(f"{os.path.abspath(workdir)}@{step}", tuple(dict.fromkeys(spec_keys + targets)),
                 fn)


def _batches(clips: pipeline.Clips, start: int, stop: int, batch_size: int
             ) -> Iterator[tuple[list[int], list[int], dict[str, np.ndarray]]]:
  """(indices, num_frames, batch of whole clips) for examples [start, stop); consecutive
  equal-length examples share a batch."""
  group: list[tuple[int, dict]] = []

  def flush():
    items = [(c, 0, i) for i, c in group]
    return ([i for i, _ in group], [c["num_frames"] for _, c in group],
            pipeline._assemble(clips, items, 0))  # pylint: disable=protected-access

  for i in range(start, stop):
    c = clips[i]
    if group and (len(group) == batch_size or group[0][1]["num_frames"] != c["num_frames"]):
      yield flush()
      group = []
    group.append((i, c))
  if group:
    yield flush()


def _key_info(out: Mapping[str, np.ndarray], num_frames: int, where: str) -> dict[str, Any]:
  """{key: {dtype, shape, per_frame}} of one example's encoded arrays."""
  info = {}
  for k, v in out.items():
    if k in pipeline.BOOKKEEPING_KEYS or k == "num_frames":
      continue
    v = np.asarray(v)
    if v.ndim == 0:
      info[k] = dict(dtype=v.dtype.str, shape=[], per_frame=None)
      continue
    per_frame = v.shape[0] / num_frames
    if k.startswith("reference_"):   # one per clip (reference_image, its latent), not per frame
      per_frame = None
    elif per_frame > 1 and abs(per_frame - round(per_frame)) > 1e-9 or (
        per_frame < 1 and abs(1 / per_frame - round(1 / per_frame)) > 1e-9):
      raise ValueError(f"{where}: {k!r} has {v.shape[0]} rows for {num_frames} frames; rows per "
                       "frame must be an integer or 1/integer to cut windows from it.")
    info[k] = dict(dtype=v.dtype.str, shape=list(v.shape[1:]) if per_frame else list(v.shape),
                   per_frame=per_frame)
  return info


def _check_same(path: str, old: Mapping[str, Any], new: Mapping[str, Any], fields: Sequence[str]):
  for f in fields:
    if old.get(f) != new.get(f):
      raise ValueError(
          f"{path} was written with {f}={json.dumps(old.get(f), sort_keys=True)[:400]}, this run "
          f"has {f}={json.dumps(new.get(f), sort_keys=True)[:400]}; encode into a new --out "
          "directory or delete the old one.")


def _progress(total: int, initial: int, desc: str):
  try:
    import tqdm  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit="clip")


def encode(config: ml_collections.ConfigDict, out: str, encoder: str = "mel",
           splits: Sequence[str] | None = None, shard_size: int = 256, batch_size: int = 8,
           progress: bool = True, max_shards: int | None = None,
           compression: str = "none") -> dict[str, Any]:
  """Encodes `splits` (default: every split of `config.data.split_sizes`) into `out`.

  Args:
    config: a training config (its `data`; for a system encoder, the data to encode).
    out: the output directory (created; resumed when it holds a run of the same settings).
    encoder: "mel" or a training workdir.
    shard_size: examples per ArrayRecord shard (the unit of resumption).
    batch_size: clips per `System.encode` call.
    max_shards: stop after writing this many shards (tests interrupt a run with it).
    compression: of each record, one of COMPRESSIONS. "none" by default: encoder outputs and
      log-mels are float noise to a compressor (zstd saves ~25 %), and reading raw records
      doubles the loader's rate (docs/video_dit.md, "Input"). Readers need no setting.

  Returns:
    The metadata written to `out/metadata.json`.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top

  if compression not in COMPRESSIONS:
    raise ValueError(f"encode: compression must be one of {sorted(COMPRESSIONS)}, got "
                     f"{compression!r}")
  compile_cache.apply(config)   # before the first compile (config.compile_cache)
  data = config.data
  splits = tuple(splits or data.split_sizes.keys())
  enc = (mel_encoder(data, splits[0]) if encoder == "mel"
         else system_encoder(config, encoder, splits[0]))
  f = pipeline.facts(data)
  os.makedirs(out, exist_ok=True)
  meta_path = os.path.join(out, arrays.METADATA)
  meta = dict(format=arrays.FORMAT, encoder=enc.name, fps=f["fps"], sample_rate=f["sample_rate"],
              features=dataclasses.asdict(features_lib.mel_config_from(data.features)),
              data=data_identity(data), keys=None, splits={})
  if os.path.exists(meta_path):
    old = arrays.read_metadata(out)
    _check_same(meta_path, old, meta, ("encoder", "fps", "sample_rate", "features", "data"))
    meta["keys"], meta["splits"] = old["keys"], old["splits"]
  written = 0
  for split in splits:
    clips = pipeline.clips(data, split, keys=enc.keys, cache=False)
    n = len(clips)
    info = dict(num_examples=n, shard_size=int(shard_size))
    if split in meta["splits"]:
      _check_same(f"{meta_path} (split {split!r})", meta["splits"][split], info,
                  ("num_examples", "shard_size"))
    meta["splits"][split] = info
    arrays.write_json(meta_path, meta)
    os.makedirs(os.path.join(out, split), exist_ok=True)
    shards = -(-n // shard_size)
    done = [s for s in range(shards) if os.path.exists(arrays.marker_path(out, split, s))]
    bar = _progress(n, sum(min(shard_size, n - s * shard_size) for s in done),
                    f"{split}") if progress else None
    for s in range(shards):
      if s in done:
        continue
      if max_shards is not None and written >= max_shards:
        logging.info("Stopping after %d shards (max_shards).", written)
        return meta
      lo, hi = s * shard_size, min((s + 1) * shard_size, n)
      path = arrays.shard_path(out, split, s)
      writer = array_record_module.ArrayRecordWriter(path, COMPRESSIONS[compression])
      frames = []
      for indices, num_frames, batch in _batches(clips, lo, hi, batch_size):
        encoded = enc.fn(batch) if enc.fn else {k: batch[k] for k in enc.keys}
        for j, i in enumerate(indices):
          record = {k: np.asarray(v[j]) for k, v in encoded.items()}
          nf = int(num_frames[j])
          where = f"{meta_path}: split {split!r} example {i}"
          keys = _key_info(record, nf, where)
          if meta["keys"] is None:
            meta["keys"] = keys
            arrays.write_json(meta_path, meta)
          elif keys != meta["keys"]:
            _check_same(where, dict(keys=meta["keys"]), dict(keys=keys), ("keys",))
          record["num_frames"] = np.int32(nf)
          record["identity_self"] = batch["identity_self"][j]
          record["identity_partner"] = batch["identity_partner"][j]
          writer.write(arrays.pack(record, where))
          frames.append(nf)
        if bar is not None:
          bar.update(len(indices))
      writer.close()
      # The marker is what makes the shard count as done; written only after the shard is closed.
      arrays.write_json(arrays.marker_path(out, split, s), dict(num_frames=frames))
      written += 1
      logging.info("%s: shard %d/%d of %r done (%d examples).", out, s + 1, shards, split, hi - lo)
    if bar is not None:
      bar.close()
  compile_cache.log_summary()
  return meta

