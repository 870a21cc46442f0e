"""Grain input pipeline: source -> shard -> shuffle -> batch of indices -> windows -> prefetch.

`make(config, split, keys=..., seed=...)` returns a Grain `DatasetIterator` of host-local NumPy
batch dicts; `to_global(batch, mesh)` turns one into globally sharded `jax.Array`s and
`prefetch_to_device(iterator, mesh)` does that ahead of time in a background thread.
`facts(config)` gives the data's rates (fps, mel rate, n_mels, sample rate) to model code.

The chain is a `grain.MapDataset` up to and including the windows, so each batch is a pure
function of (config, split, seed, shard, step): multi-process prefetch (`worker_count > 0`) slices
whole batches across workers and reads them back in order, which makes the output independent of
the worker count, and the iterator state is a position that `get_state()/set_state()` and Grain's
Orbax handler (`grain.checkpoint.CheckpointHandler`) save and restore exactly.

Training has one global order, independent of the process count: all examples are shuffled and
batched by the *global* batch size, and process p of n keeps rows `[p*B, (p+1)*B)` of every global
batch (window offsets are drawn for the whole global batch, then sliced). Global batch k is a pure
function of (config, seed, k), the processes' batches side by side in process order are the
1-process batch, and the iterator state (the global batch position) is the same on every process,
so a checkpoint resumes on any process count (`checkpointing.DataHandler`).

Batches are made from *clips*: each example's requested keys prepared once over the whole clip
(log-mels included), optionally kept in memory (`synthdyad.cache`). A window is then a slice of
every key at its own rate, so a batch costs a few NumPy copies. Per-example keys of a batch
(leading batch dim `B = batch_size // shard_count` omitted; `T` = `clip_frames` video frames,
`Ta = T * mel_rate / fps` mel frames, `S = T * sample_rate / fps`):

  flame56_self, flame56_partner    float32 [T, 56]
  motion_self, motion_partner      float32 [T, C]          (SynthDyad sources)
  mel_<stream>                     float32 [Ta, n_mels]    stream: self, partner, background, mix
  speaking_self, speaking_partner  bool    [T]              (SynthDyad sources)
  video, partner_video             uint8   [T, H, W, 3]     reference_image uint8 [H, W, 3]
  audio_<stream>                   float32 [S]
  bookkeeping, always present:
  identity_self, identity_partner  int32   []               (-1 where the source has none)
  clip_start, example_index        int32   []   window start frame / source example index
An `arrays` source adds whatever its encoder wrote (`data/arrays.py`), each at its declared rate.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import math
import multiprocessing
import queue
import time
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from avatar_jax import sharding as sharding_lib
from avatar_jax.data import arrays as _arrays  # pylint: disable=unused-import  (registers 'arrays')
from avatar_jax.data import features as features_lib
from avatar_jax.data import sources as sources_lib
from avatar_jax.data.sources import SynthDyadSource, TfdsSource, make_source  # noqa: F401  re-exported

OPTIONAL_KEYS = (
    "video",
    "partner_video",
    "reference_image",
    "audio_self",
    "audio_partner",
    "audio_background",
    "audio_mix",
)
BOOKKEEPING_KEYS = ("example_index", "clip_start", "identity_self", "identity_partner")
STREAMS = ("self", "partner", "background", "mix")


def default_config() -> ml_collections.ConfigDict:
  """The data fields every training config embeds as `config.data`."""
  c = ml_collections.ConfigDict()
  # A name registered in data/sources.py: 'synthdyad' (the generator, on the fly), 'tfds' (a
  # prepared TFDS dataset, read without TensorFlow), 'arrays' (pre-encoded clips, data/arrays.py).
  c.source = "synthdyad"
  # data_dir is a typed placeholder (None: TFDS's default) so that a flag can set it.
  c.tfds = ml_collections.ConfigDict(dict(
      name="synthdyad", data_dir=ml_collections.config_dict.placeholder(str), fps=25))
  c.arrays = ml_collections.ConfigDict(dict(dir=""))  # written by `python -m avatar_jax.encode`
  c.split_sizes = ml_collections.ConfigDict(dict(train=4096, test=128, ood=128))
  c.synthdyad = ml_collections.ConfigDict(
      dict(
          duration_s=ml_collections.config_dict.placeholder(float),  # None: the split's regime (8 s train/test, 16 s ood)
          fps=25,
          sample_rate=16000,
          resolution=64,
          render=True,  # False: no video keys (motion/audio models); generation is then cheaper
          seed=0,  # generator seed (the dataset), distinct from the shuffle seed
          cache=False,  # the same as config.data.cache, for this source

      )
  )
  # Prepare this host's clips (requested keys, whole-clip log-mels) once, when the iterator is
  # made, over max(1, worker_count) processes, and keep them in memory: batches are then slices.
  # SynthDyad video is still rendered per window.
  c.cache = False
  c.clip_frames = 50  # training window, video frames (2 s at 25 fps); 0 = whole clip
  c.eval_windows = "tile"  # eval: 'tile' (consecutive non-overlapping windows) or 'full' clip
  c.batch_size = 8  # global; each of `shard_count` hosts gets batch_size // shard_count
  c.features = ml_collections.ConfigDict(dataclasses.asdict(features_lib.MelConfig()))
  # Used only when `make` gets no `keys` (a system's data spec names its keys instead):
  c.mel_streams = ("self", "partner")  # mel_<s> from audio_<s>
  c.keep_keys = ()  # optional keys to keep, from OPTIONAL_KEYS (e.g. ('video', 'reference_image'))
  c.worker_count = 0  # >0: that many prefetch processes (results do not depend on it)
  c.prefetch = 2  # batches buffered per worker process
  c.read_threads = 1  # threads reading + transforming inside each process
  c.shuffle_seed = 0
  return c


# ========================================================================================= facts
def facts(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Data facts model code needs, from `config.data` (never copied into model configs).

  fps and sample_rate are what the source declares (`rates`): SynthDyad `synthdyad.fps` /
  `synthdyad.sample_rate`; TFDS `tfds.fps` / `features.sample_rate` (each example's own fps and
  sample_rate are checked against them); arrays: its metadata. mel_rate and n_mels come from
  `config.features` (for arrays, checked against the features it was encoded with).

  Returns:
    dict(fps=int, mel_rate=float mel frames/s, n_mels=int, sample_rate=int).
  """
  source = sources_lib.get(config.source)
  fps, sample_rate = source.rates(config)
  mel = features_lib.mel_config_from(config.features)
  if mel.sample_rate != sample_rate:
    raise ValueError(
        f"config.data.features.sample_rate={mel.sample_rate} but source {config.source!r} has "
        f"audio at {sample_rate} Hz; set them equal (resample when building the dataset).")
  if hasattr(source, "check_features"):
    source.check_features(config)
  return dict(fps=int(fps), mel_rate=float(mel.frame_rate), n_mels=int(mel.n_mels),
              sample_rate=int(sample_rate))


# ========================================================================= keys: how each is made
@dataclasses.dataclass(frozen=True)
class KeySpec:
  """How a batch key is cut from a clip.

  per_frame: rows per video frame, sliced with the window (1 for frame-rate keys, mel frames per
    video frame for mel, samples per frame for audio); None: one value per example, not sliced.
  dtype: dtype of the batch array.
  made_from: the raw key it is computed from ('audio_self' for 'mel_self'); '' : itself.
  """
  per_frame: float | None
  dtype: Any
  made_from: str = ""


_FRAME_KEYS = {
    "flame56_self": np.float32, "flame56_partner": np.float32,
    "motion_self": np.float32, "motion_partner": np.float32,
    "speaking_self": bool, "speaking_partner": bool,
    "video": np.uint8, "partner_video": np.uint8,
}
_RENDERED = ("video", "partner_video", "reference_image")


def key_table(source, mel: features_lib.MelConfig, fps: int, sample_rate: int
              ) -> dict[str, KeySpec]:
  """{key: KeySpec} of every batch key `source` can produce (bookkeeping keys aside)."""
  raw = set(source.keys)
  spf = sample_rate / fps
  r = features_lib.mel_frames_per_video_frame(mel, fps)
  table = {k: KeySpec(1, dt) for k, dt in _FRAME_KEYS.items() if k in raw}
  if "reference_image" in raw:
    table["reference_image"] = KeySpec(None, np.uint8)
  for s in STREAMS:
    if f"audio_{s}" in raw:
      table[f"audio_{s}"] = KeySpec(spf, np.float32)
    if f"mel_{s}" in raw or f"audio_{s}" in raw:
      table[f"mel_{s}"] = KeySpec(r, np.float32,
                                  "" if f"mel_{s}" in raw else f"audio_{s}")
  # Pre-encoded sources declare their own keys (features, latents) and rates.
  for k, (per_frame, dtype) in getattr(source, "key_rates", {}).items():
    table.setdefault(k, KeySpec(per_frame, np.dtype(dtype)))
  return table


def default_keys(config: ml_collections.ConfigDict, table: Mapping[str, KeySpec]) -> tuple[str, ...]:
  """The keys `make(keys=None)` produces: flame56, motion/speaking where the source has them,
  `mel_<s>` for `config.mel_streams`, and `config.keep_keys`."""
  unknown = set(config.keep_keys) - set(OPTIONAL_KEYS)
  if unknown:
    raise ValueError(
        f"config.keep_keys has unknown {sorted(unknown)}; choose from {OPTIONAL_KEYS}.")
  keys = ["flame56_self", "flame56_partner"]
  keys += [k for k in ("motion_self", "motion_partner", "speaking_self", "speaking_partner")
           if k in table]
  keys += [f"mel_{s}" for s in config.mel_streams]
  keys += list(config.keep_keys)
  return tuple(keys)


def _check_keys(keys, table, config, split) -> None:
  unknown = [k for k in keys if k not in table and k not in BOOKKEEPING_KEYS]
  if not unknown:
    return
  render_off = (config.source == "synthdyad" and not config.synthdyad.render
                and set(unknown) & set(_RENDERED))
  hint = (" (config.data.synthdyad.render is False, so there is no video; set it True)"
          if render_off else "")
  raise ValueError(
      f"pipeline.make: source {config.source!r} (split {split!r}) cannot produce batch keys "
      f"{sorted(unknown)}{hint}; it has {sorted(table)} plus the bookkeeping keys "
      f"{list(BOOKKEEPING_KEYS)}.")


# ========================================================================================= clips
def _fit_length(audio: np.ndarray, n: int) -> np.ndarray:
  # Real recordings end a few samples off the video; zero-pad or trim to exactly T * spf.
  if audio.ndim != 1:
    raise ValueError(f"Audio tracks must be mono [S]; got shape {audio.shape}.")
  if audio.shape[0] >= n:
    return audio[:n]
  return np.pad(audio, (0, n - audio.shape[0]))


def _rows(n_frames: int, per_frame: float, key: str, where: str) -> int:
  rows = n_frames * per_frame
  if abs(rows - round(rows)) > 1e-6:
    raise ValueError(f"{where}: {n_frames} frames at {per_frame} rows/frame of {key!r} is not a "
                     "whole number of rows; use windows and clips whose lengths align.")
  return int(round(rows))


class Clips:
  """`clips[i]`: example `i` of a source with the requested keys prepared over its whole length.

  Frame keys are cast to their batch dtype, audio is fitted to `num_frames * spf` samples, and
  `mel_<s>` is the log-mel of the whole (fitted) `audio_<s>` unless the source stores it, so a
  window's mel is a slice with real context at its edges. Video the source renders on request is
  left out (`needs_render`); `render_ctx` keeps what rendering needs. With `cache`, each prepared
  clip stays in memory (per process; pickled along with this object to prefetch workers).
  Picklable.
  """

  def __init__(self, source, table: Mapping[str, KeySpec], keys: Sequence[str],
               mel: features_lib.MelConfig, fps: int, sample_rate: int, cache: bool = False):
    self.source, self.mel, self.fps, self.sample_rate = source, mel, fps, sample_rate
    self.table = {k: table[k] for k in keys if k not in BOOKKEEPING_KEYS}
    self.keys = tuple(self.table)
    self.spf = _rows(1, sample_rate / fps, "audio", f"sample_rate {sample_rate} / fps {fps}")
    can_render = hasattr(source, "render_window")
    self.rendered = tuple(k for k in self.keys if k in _RENDERED and can_render)
    self.raw_keys = tuple(sorted({self.table[k].made_from or k for k in self.keys}))
    self.cache = {} if cache else None

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if self.cache is not None and index in self.cache:
      return self.cache[index]
    clip = self._prepare(index)
    if self.cache is not None:
      self.cache[index] = clip
    return clip

  def _prepare(self, index: int) -> dict[str, Any]:
    where = f"example {index} of {self.source!r}"
    ex = self.source.fetch(index, self.raw_keys)
    for name, want in (("fps", self.fps), ("sample_rate", self.sample_rate)):
      if name in ex and int(ex[name]) != want:
        raise ValueError(f"{where}: {name} is {int(ex[name])}, the data config says {want} "
                         f"(config.data of source {self.source!r}; resample when building).")
    n = _num_frames(ex, where)
    clip = {"num_frames": n, "identity_self": np.int32(ex.get("identity_self", -1)),
            "identity_partner": np.int32(ex.get("identity_partner", -1))}
    audio = {}
    for k, spec in self.table.items():
      if k in self.rendered and k not in ex:
        continue
      if spec.made_from:  # mel_<s> from audio_<s>
        src = spec.made_from
        if src not in audio:
          audio[src] = _fit_length(np.asarray(_need(ex, src, where), np.float32), n * self.spf)
        clip[k] = features_lib.log_mel(audio[src], self.mel)
        continue
      v = np.asarray(_need(ex, k, where))
      if k.startswith("audio_"):
        v = audio.get(k)
        if v is None:
          v = _fit_length(np.asarray(ex[k], np.float32), n * self.spf)
      elif spec.per_frame is not None:
        rows = _rows(n, spec.per_frame, k, where)
        if v.shape[0] != rows:
          raise ValueError(f"{where}: {k!r} has {v.shape[0]} rows, expected {rows} "
                           f"({n} frames x {spec.per_frame} per frame).")
      # Cached clips own their arrays: views would keep every whole record (keys not asked for
      # included) alive in the cache.
      clip[k] = (np.array(v, dtype=spec.dtype) if self.cache is not None
                 else np.ascontiguousarray(v, dtype=spec.dtype))
    if self.rendered:  # what `render_window` reads, without the audio
      clip["render_ctx"] = {k: ex[k] for k in ("motion_self", "motion_partner", "identity_self",
                                              "identity_partner") if k in ex}
    return clip

  def window(self, clip: Mapping[str, Any], key: str, start: int, t: int) -> np.ndarray:
    """Rows of `key` for video frames `[start, start + t)` of `clip`."""
    if key not in clip:  # rendered on request
      if key == "reference_image":
        return self.source.render_window(clip["render_ctx"], key, 0, 1)
      return self.source.render_window(clip["render_ctx"], key, start, start + t)
    pf = self.table[key].per_frame
    if pf is None:
      return clip[key]
    if pf == 1:
      return clip[key][start:start + t]
    lo = _rows(start, pf, key, "window start")
    return clip[key][lo:lo + _rows(t, pf, key, "window length")]

  def fill(self, indices: Sequence[int], processes: int = 1) -> None:
    """Prepares `indices` into the cache now, in example order (SynthDyad then generates each
    conversation once for its two samples), over `processes` spawned processes."""
    if self.cache is None:
      raise ValueError("Clips.fill needs cache=True.")
    todo = sorted({int(i) for i in indices} - set(self.cache))
    if processes <= 1 or len(todo) < 2 * processes:
      for i in todo:
        self.cache[i] = self._prepare(i)
      return
    worker = copy.copy(self)
    worker.cache = None  # the children fill nothing of their own; results come back pickled
    # Contiguous chunks keep a conversation's two samples in one process; several per process
    # balance the load.
    chunks = [c.tolist() for c in np.array_split(todo, 4 * processes) if len(c)]
    ctx = multiprocessing.get_context("spawn")  # forking a process that runs JAX is unsafe
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=ctx) as pool:
      for part in pool.map(worker._prepare_many, chunks):  # pylint: disable=protected-access
        self.cache.update(part)

  def _prepare_many(self, indices: Sequence[int]) -> dict[int, dict[str, Any]]:
    return {i: self._prepare(i) for i in indices}

  @property
  def stride(self) -> int:
    """Window starts and lengths are multiples of this (keys with fewer rows than frames)."""
    s = 1
    for spec in self.table.values():
      if spec.per_frame is not None and spec.per_frame < 1:
        s = math.lcm(s, int(round(1 / spec.per_frame)))
    return s


def _need(ex, key, where):
  if key not in ex:
    raise KeyError(f"{where}: missing key {key!r}; keys are {sorted(ex)}.")
  return ex[key]


def _num_frames(ex: Mapping[str, Any], where: str) -> int:
  if "num_frames" in ex:
    return int(ex["num_frames"])
  for k in _FRAME_KEYS:
    if k in ex:
      return int(np.shape(ex[k])[0])
  raise KeyError(f"{where}: no frame-rate key to count frames ({sorted(_FRAME_KEYS)}); "
                 f"keys are {sorted(ex)}.")


def _assemble(clips: Clips, items: Sequence[tuple[dict, int, int]], t: int) -> dict[str, Any]:
  """Batch of windows: items are (clip, start, example index); `t` frames (0: whole clips)."""
  out = {}
  for k in clips.keys:
    parts = [clips.window(c, k, s, t or c["num_frames"]) for c, s, _ in items]
    out[k] = np.stack(parts)
  out["identity_self"] = np.array([c["identity_self"] for c, _, _ in items], np.int32)
  out["identity_partner"] = np.array([c["identity_partner"] for c, _, _ in items], np.int32)
  out["clip_start"] = np.array([s for _, s, _ in items], np.int32)
  out["example_index"] = np.array([i for _, _, i in items], np.int32)
  return out


class _TrainBatch(grain.transforms.RandomMap):
  """Global indices [G] -> this host's batch: rows `rows` (a slice of length B) of the global one.

  Window offsets come from Grain's per-batch RNG (seed, global batch position): one draw for each
  of the G rows, whichever rows this host keeps, so an example's window does not depend on the
  process count. Only this host's clips are read.
  """

  def __init__(self, clips: Clips, clip_frames: int, rows: slice = slice(None)):
    self.clips, self.clip_frames, self.rows = clips, clip_frames, rows

  def random_map(self, indices: np.ndarray, rng: np.random.Generator):
    # Raw draws, reduced modulo each clip's number of offsets below: the range depends on the
    # clip's length, which is known only for the clips read (bias ~ offsets / 2**62: none).
    draws = rng.integers(0, 2**62, size=len(indices), dtype=np.int64)
    items, stride = [], self.clips.stride
    for i, d in zip(indices[self.rows], draws[self.rows]):
      clip = self.clips[i]
      n = clip["num_frames"]
      t = self.clip_frames or n
      if n < t:
        raise ValueError(f"example {int(i)} of {self.clips.source!r} has {n} frames, fewer "
                         f"than clip_frames={t}.")
      items.append((clip, stride * int(d % ((n - t) // stride + 1)), int(i)))
    return _assemble(self.clips, items, self.clip_frames)


class _EvalBatch(grain.transforms.Map):
  """(index, start) rows [B, 2] -> batch."""

  def __init__(self, clips: Clips, clip_frames: int):
    self.clips, self.clip_frames = clips, clip_frames

  def map(self, rows: np.ndarray):
    items = []
    for i, start in rows:
      clip = self.clips[i]
      t = self.clip_frames or clip["num_frames"]
      if not 0 <= start <= clip["num_frames"] - t:
        raise ValueError(f"example {int(i)}: window [{start}, {start + t}) does not fit its "
                         f"{clip['num_frames']} frames (clip_frames={self.clip_frames}).")
      items.append((clip, int(start), int(i)))
    return _assemble(self.clips, items, self.clip_frames)


def _eval_windows(source, clip_frames: int, mode: str, stride: int = 1) -> np.ndarray:
  """[(example, start)] for deterministic eval windows, `[N, 2]` int64."""
  if mode not in ("tile", "full"):
    raise ValueError(f"config.eval_windows must be 'tile' or 'full', got {mode!r}.")
  n = len(source)
  if mode == "full" or not clip_frames:
    return np.stack([np.arange(n), np.zeros(n, np.int64)], axis=1)
  if clip_frames % stride:
    raise ValueError(f"clip_frames={clip_frames} must be a multiple of {stride}, the frames per "
                     "row of the slowest requested key.")
  if not isinstance(source, SynthDyadSource):
    logging.info("Reading the lengths of %d examples of %r to lay out eval windows.", n, source)
  lengths = np.array([source.num_frames(i) for i in range(n)])
  rows = [(i, w * clip_frames) for i in range(n) for w in range(lengths[i] // clip_frames)]
  if not rows:
    raise ValueError(f"No example of {source!r} is as long as clip_frames={clip_frames}.")
  return np.asarray(rows, np.int64)


# ====================================================================================== pipeline
def clips(config: ml_collections.ConfigDict, split: str, keys: Sequence[str] | None = None,
          *, cache: bool | None = None) -> Clips:
  """Prepared whole clips of `split` with `keys` (None: `default_keys`); see `Clips`."""
  f = facts(config)
  mel = features_lib.mel_config_from(config.features)
  mel.validate()
  source = make_source(config, split, keys)
  table = key_table(source, mel, f["fps"], f["sample_rate"])
  keys = default_keys(config, table) if keys is None else tuple(keys)
  _check_keys(keys, table, config, split)
  if cache is None:
    cache = bool(config.cache) or (config.source == "synthdyad" and bool(config.synthdyad.cache))
  return Clips(source, table, keys, mel, f["fps"], f["sample_rate"], cache=cache)


def make(
    config: ml_collections.ConfigDict,
    split: str,
    *,
    keys: Sequence[str] | None = None,
    seed: int | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> grain.DatasetIterator:
  """Host-local iterator of batch dicts (see module docstring for keys and shapes).

  Args:
    config: `default_config()`-shaped ConfigDict (`config.data` of a training config).
    split: 'train', 'test', 'ood' (or any split the source has).
    keys: batch keys to produce (a system's `data_spec().keys`), plus the bookkeeping keys
      example_index, clip_start, identity_self, identity_partner; nothing else is computed (no
      log-mel without a mel_* key, no rendering without a video key). None: `default_keys`
      (flame56, motion/speaking, `config.mel_streams`, `config.keep_keys`).
    seed: shuffle + window-offset seed; defaults to `config.shuffle_seed`.
    shuffle: shuffle examples (per epoch) and draw random window offsets. With `shuffle=False`
      windows are deterministic (consecutive tiles, `config.eval_windows`), for evaluation.
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this host's shard; default `jax.process_index()/process_count()`.
      Training: rows `[i*B, (i+1)*B)` of each global batch (one order for any shard_count, see
      the module docstring). Evaluation: every shard_count-th window.

  Returns:
    A `grain.DatasetIterator` with `get_state()/set_state()`. Train-mode batches drop the
    remainder; eval-mode batches keep a smaller last batch.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  seed = config.shuffle_seed if seed is None else seed
  if config.batch_size % shard_count:
    raise ValueError(
        f"Global batch_size {config.batch_size} is not divisible by shard_count {shard_count}.")
  host_batch = config.batch_size // shard_count
  data = clips(config, split, keys)
  t = int(config.clip_frames)
  if t % data.stride:
    raise ValueError(f"config.data.clip_frames={t} must be a multiple of {data.stride}, the "
                     "frames per row of the slowest requested key.")

  if shuffle:
    # Every process's rows of a global batch can be any example, so each one reads (and caches)
    # all of them; see `_TrainBatch`.
    examples = np.arange(len(data))
    if len(examples) < config.batch_size:
      raise ValueError(
          f"Split {split!r} has {len(examples)} examples < global batch {config.batch_size} "
          f"(host batch {host_batch} x {shard_count} shards).")
  else:  # evaluation keeps per-shard windows: each shard reads only its own
    windows = _eval_windows(data.source, t, config.eval_windows, data.stride)
    windows = windows[shard_index::shard_count]
    examples = np.unique(windows[:, 0])
  if data.cache is not None:
    # Filled now rather than lazily: in example order (cheaper), over `worker_count` processes,
    # and before the prefetch workers start, so each of them gets the whole cache instead of
    # filling its own share again. `examples` is what this process can touch: every example in
    # training (its rows of a global batch can be any), its own shard's in evaluation.
    start = time.perf_counter()
    data.fill(examples, processes=int(config.worker_count))
    logging.info("Cached %d clips of %s/%s in %.1f s.", len(examples), config.source, split,
                 time.perf_counter() - start)

  if shuffle:
    # One global order whatever the process count: global batches of indices (G ints each, cheap
    # on every process), then one transform per batch that keeps this host's contiguous rows, in
    # process order as `to_global` lays them out. Per-example Python stays minimal.
    rows = slice(shard_index * host_batch, (shard_index + 1) * host_batch)
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.batch(config.batch_size, drop_remainder=True).random_map(
        _TrainBatch(data, t, rows), seed=seed)
  else:
    ds = grain.MapDataset.source(windows).repeat(num_epochs)
    ds = ds.batch(host_batch, drop_remainder=False).map(_EvalBatch(data, t))
  ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(config.read_threads),
                                             prefetch_buffer_size=int(config.prefetch)))
  if config.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
      # have not been parsed, and the defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(config.worker_count), per_worker_buffer_size=int(config.prefetch)))
  logging.info("Data %s/%s: %s, keys %s, host batch %d (shard %d/%d), workers %d.",
               config.source, split, data.source, data.keys, host_batch, shard_index,
               shard_count, config.worker_count)
  return iter(ids)


# ======================================================================================= devices
def batch_axes(mesh: jax.sharding.Mesh) -> tuple[str, ...]:
  """The mesh axes of the rules table's `batch` entry (sharding.RULES) that `mesh` has."""
  axes = dict(sharding_lib.RULES)["batch"]
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  return tuple(a for a in axes if a in mesh.axis_names)


def to_global(
    batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    axes: Sequence[str] | None = None,
) -> dict[str, jax.Array]:
  """Host-local batch -> global `jax.Array`s, leading dim sharded over `axes` of `mesh`.

  `axes`: default `batch_axes(mesh)`, the batch axes of the rules table ('data', 'fsdp').
  Each host passes its own `[B_host, ...]` slice; the result has leading dim
  `B_host * process_count` and every other dim replicated.
  """
  axes = batch_axes(mesh) if axes is None else tuple(axes)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"to_global axes {missing} are not in the mesh axes {mesh.axis_names}.")
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
  n_shards = int(np.prod([mesh.shape[a] for a in axes]))
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    global_b = v.shape[0] * jax.process_count() if v.ndim else 0
    if v.ndim == 0 or global_b % n_shards:
      raise ValueError(
          f"Batch key {k!r} with shape {v.shape}: global leading dim {global_b} must be "
          f"divisible by the {n_shards} devices of mesh axes {axes}.")
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


_END = object()


class DevicePrefetch(grain.DatasetIterator):
  """Global `jax.Array` batches of a host iterator, made `size` batches ahead in a thread.

  Order is preserved. `get_state()` is the state of the wrapped iterator *before the next batch
  this iterator will return* (not after the ones already prefetched), so a checkpoint resumes at
  exactly the batch the trainer would have consumed next; `set_state` drops the prefetched
  batches and restarts from there. Grain's Orbax handler saves and restores it like any
  `DatasetIterator`.
  """

  def __init__(self, parent: grain.DatasetIterator, mesh: jax.sharding.Mesh, size: int = 2,
               axes: Sequence[str] | None = None):
    super().__init__(parent)
    if size < 1:
      raise ValueError(f"prefetch_to_device size must be >= 1, got {size}.")
    self._it, self._mesh, self._size, self._axes = parent, mesh, int(size), axes
    self._state = copy.deepcopy(parent.get_state())
    self._thread = None
    self._start()

  def _start(self):
    self._queue: queue.Queue = queue.Queue(self._size)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._produce, args=(self._queue, self._stop),
                                    daemon=True, name="prefetch_to_device")
    self._thread.start()

  def _produce(self, q: queue.Queue, stop: threading.Event):
    while not stop.is_set():
      try:
        host = next(self._it)
        # The state after this batch = the position the consumer is at once it has taken it.
        item = (to_global(host, self._mesh, self._axes), copy.deepcopy(self._it.get_state()))
      except StopIteration:
        item = _END
      except Exception as e:  # pylint: disable=broad-except  (re-raised in the consumer)
        item = e
      while not stop.is_set():
        try:
          q.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if item is _END or isinstance(item, Exception):
        return

  def _halt(self):
    if self._thread is not None:
      self._stop.set()
      while self._thread.is_alive():
        try:  # unblock a producer waiting on a full queue
          self._queue.get_nowait()
        except queue.Empty:
          self._thread.join(timeout=0.05)
      self._thread = None

  def __next__(self) -> dict[str, jax.Array]:
    item = self._queue.get()
    if item is _END:
      self._queue.put(_END)  # every later call ends too
      raise StopIteration
    if isinstance(item, Exception):
      raise item
    batch, self._state = item
    return batch

  def get_state(self):
    return copy.deepcopy(self._state)

  def set_state(self, state):
    self._halt()
    self._it.set_state(state)
    self._state = copy.deepcopy(state)
    self._start()

  def close(self):
    self._halt()
    if hasattr(self._it, "close"):
      self._it.close()
    super().close()


def prefetch_to_device(iterator: grain.DatasetIterator, mesh: jax.sharding.Mesh, size: int = 2,
                       axes: Sequence[str] | None = None) -> DevicePrefetch:
  """`iterator`'s batches as global `jax.Array`s (`to_global`), `size` ahead; see DevicePrefetch."""
  return DevicePrefetch(iterator, mesh, size, axes)

