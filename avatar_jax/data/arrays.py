"""Pre-encoded clips on disk: ArrayRecord shards of per-example arrays plus one metadata file.

Written by `python -m avatar_jax.encode` (library: `data/encoding.py`), read as the `arrays`
source (`config.data.source = 'arrays'`, `config.data.arrays.dir = DIR`). Layout:

  DIR/metadata.json                    what every record holds and what made it (below)
  DIR/<split>/shard-00000.array_record one record per example, in example order
  DIR/<split>/shard-00000.json         written after its shard is complete: {"num_frames": [...]}

metadata.json: {"format": "avatar_jax.arrays/1", "encoder": "mel" | "<workdir>@<step>",
"fps", "sample_rate", "features": the MelConfig fields of the mel_* keys,
"keys": {key: {"dtype", "shape" (per row, without the leading time axis when per_frame is set),
"per_frame": rows per video frame, or null for one value per example}},
"data": the config.data that made them, "splits": {split: {"num_examples", "shard_size"}}}.

A record is `uint64 header length | JSON header {key: [dtype, shape, offset]} | 64-byte aligned
raw arrays`, decoded with `np.frombuffer` (no copy, no pickle).
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from avatar_jax.data import features as features_lib
from avatar_jax.data import sources

FORMAT = "avatar_jax.arrays/1"
METADATA = "metadata.json"
_ALIGN = 64


# ======================================================================================= records
def pack(arrays: Mapping[str, Any], where: str = "record") -> bytes:
  """{key: array} -> one record (see the module docstring); `where` names it in errors.

  Non-finite floats are refused: a NaN stored here would reach training as a NaN loss.
  """
  header, parts, offset = {}, [], 0
  for k, v in arrays.items():
    v = np.asarray(v)  # (tobytes() is C order whatever the layout)
    if v.dtype == object:
      raise TypeError(f"{where}: key {k!r} has dtype object; only numeric arrays can be stored.")
    if np.issubdtype(v.dtype, np.inexact) and not np.all(np.isfinite(v)):
      bad = np.argwhere(~np.isfinite(v))[0].tolist()
      raise ValueError(f"{where}: key {k!r} has {int(np.sum(~np.isfinite(v)))} non-finite "
                       f"values (first at index {bad}); expected finite numbers.")
    offset = -(-offset // _ALIGN) * _ALIGN
    header[k] = [v.dtype.str, list(v.shape), offset]
    parts.append((offset, v.tobytes()))
    offset += v.nbytes
  head = json.dumps(header).encode()
  start = -(-(8 + len(head)) // _ALIGN) * _ALIGN
  buf = bytearray(start + offset)
  buf[:8] = struct.pack("<Q", len(head))
  buf[8:8 + len(head)] = head
  for off, b in parts:
    buf[start + off:start + off + len(b)] = b
  return bytes(buf)


def unpack(record: bytes, keys=None) -> dict[str, np.ndarray]:
  """One record -> {key: read-only array} (only `keys` when given)."""
  (n,) = struct.unpack_from("<Q", record, 0)
  header = json.loads(record[8:8 + n])
  start = -(-(8 + n) // _ALIGN) * _ALIGN
  out = {}
  for k, (dtype, shape, offset) in header.items():
    if keys is not None and k not in keys and k != "num_frames":
      continue
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    out[k] = np.frombuffer(record, dtype, count, start + offset).reshape(shape)
  return out


# ====================================================================================== metadata
def shard_path(root: str, split: str, shard: int) -> str:
  return os.path.join(root, split, f"shard-{shard:05d}.array_record")


def marker_path(root: str, split: str, shard: int) -> str:
  return os.path.join(root, split, f"shard-{shard:05d}.json")


def read_metadata(root: str) -> dict[str, Any]:
  path = os.path.join(root, METADATA)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: config.data.arrays.dir must be a directory "
                            "written by `python -m avatar_jax.encode --out DIR`.")
  meta = _read_json(path, "the metadata written by `python -m avatar_jax.encode`")
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path}: format {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                     f"expected {FORMAT!r}.")
  for key in ("fps", "sample_rate", "keys", "splits"):
    if key not in meta:
      raise ValueError(f"{path}: has no {key!r}; expected the fields {_FIELDS}.")
  return meta


_FIELDS = ("format", "encoder", "fps", "sample_rate", "features", "keys", "data", "splits")


def _read_json(path: str, what: str):
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  media.expect_file(path, what)
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({type(e).__name__}: {e}); expected {what}; a "
                     "truncated or damaged file?") from e


def write_json(path: str, obj) -> None:
  """Atomic: readers see the old file or the new one, never half of it."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def split_shards(root: str, meta: Mapping[str, Any], split: str) -> tuple[list[str], list[int]]:
  """(shard paths, num_frames per example) of a completely encoded split."""
  where = os.path.join(root, METADATA)
  if split not in meta["splits"]:
    raise KeyError(f"{where} has no split {split!r}; it has {sorted(meta['splits'])} "
                   f"(encode it: python -m avatar_jax.encode ... --splits {split}).")
  info = meta["splits"][split]
  n, size = int(info["num_examples"]), int(info["shard_size"])
  paths, frames = [], []
  for s in range(-(-n // size)):
    mp = marker_path(root, split, s)
    if not os.path.exists(mp):
      raise FileNotFoundError(f"{mp} is missing: split {split!r} of {root} is not completely "
                              "encoded; rerun the encode command to finish it.")
    marker = _read_json(mp, "a shard marker {\"num_frames\": [...]}")
    if not isinstance(marker, dict) or not isinstance(marker.get("num_frames"), list):
      raise ValueError(f"{mp}: expected {{\"num_frames\": [...]}}, found {str(marker)[:100]}.")
    frames += marker["num_frames"]
    path = shard_path(root, split, s)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} is missing but its marker {mp} exists: re-encode split "
                              f"{split!r} of {root} into a new --out.")
    paths.append(path)
  if len(frames) != n:
    raise ValueError(f"{root}/{split}: shards hold {len(frames)} examples, {where} says {n}.")
  return paths, frames


def check_features(meta: Mapping[str, Any], config, root: str) -> None:
  """The mel_* keys were made with `config.features`; raises naming the fields otherwise."""
  if not any(k.startswith("mel_") for k in meta["keys"]):
    return
  want = dataclasses.asdict(features_lib.mel_config_from(config.features))
  got = dataclasses.asdict(features_lib.mel_config_from(meta["features"]))
  diff = {k: (got[k], want[k]) for k in want if got[k] != want[k]}
  if diff:
    raise ValueError(
        f"{os.path.join(root, METADATA)}: its mel features were encoded with "
        f"{ {k: v[0] for k, v in diff.items()} } but config.data.features has "
        f"{ {k: v[1] for k, v in diff.items()} }; re-encode or match the config.")


# ======================================================================================== source
@sources.register("arrays")
class ArraysSource:
  """Random-access source over one split of an encoded directory: `source[i]` = {key: array}.

  Whole-clip arrays (targets, log-mels, encoder outputs) and `num_frames`; the pipeline cuts
  windows from them exactly as from the other sources (the log-mel is sliced, not recomputed).
  """

  def __init__(self, root: str, split: str):
    if not root:
      raise ValueError("config.data.arrays.dir is empty; set it to the --out of the encode job.")
    self.root, self.split = os.path.abspath(os.path.expanduser(root)), split
    self.meta = read_metadata(self.root)
    self.paths, self.frames = split_shards(self.root, self.meta, split)
    self.keys = tuple(self.meta["keys"]) + ("num_frames",)
    self.key_rates = {k: (v["per_frame"], v["dtype"]) for k, v in self.meta["keys"].items()
                      if v["per_frame"] is not None or v["shape"]}
    self._ds = None

  @classmethod
  def from_config(cls, config, split, keys=None):
    del keys
    return cls(config.arrays.dir, split)

  @classmethod
  def rates(cls, config) -> tuple[int, int]:
    meta = read_metadata(os.path.expanduser(config.arrays.dir))
    return int(meta["fps"]), int(meta["sample_rate"])

  @classmethod
  def check_features(cls, config) -> None:
    root = os.path.expanduser(config.arrays.dir)
    check_features(read_metadata(root), config, root)

  def _open(self):
    if self._ds is None:
      import grain  # pylint: disable=g-import-not-at-top

      self._ds = grain.sources.ArrayRecordDataSource(self.paths)
    return self._ds

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None  # reopened in each worker process
    return state

  def __len__(self) -> int:
    return len(self.frames)

  def num_frames(self, index: int) -> int:
    return int(self.frames[index])

  def fetch(self, index: int, keys=None) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"{self!r}: index {index} out of range [0, {len(self)}).")
    try:
      record = self._open()[index]
      return unpack(record, None if keys is None else set(keys) | {
          "identity_self", "identity_partner"})
    except Exception as e:  # pylint: disable=broad-except  # a cut-off or overwritten shard
      shard = self.paths[index // int(self.meta["splits"][self.split]["shard_size"])]
      raise ValueError(f"{self!r}: example {index} does not read back ({type(e).__name__}: "
                       f"{e}) from {shard}; the shard is damaged: re-encode into a new "
                       "--out.") from e

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return self.fetch(index)

  def __repr__(self) -> str:
    return f"ArraysSource({self.root!r}, split={self.split!r}, encoder={self.meta['encoder']!r})"
