"""Grain input pipeline: source -> shard -> shuffle -> window -> log-mel -> batch -> prefetch.

`make(config, split, seed=...)` returns a Grain `DatasetIterator` of host-local NumPy batch dicts;
`to_global(batch, mesh)` turns one into globally sharded `jax.Array`s.

Everything up to and including batching is a `grain.MapDataset` chain, so each batch is a pure
function of (config, split, seed, shard, step): multi-process prefetch (`worker_count > 0`) slices
whole batches across workers and reads them back in order, which makes the output independent of
the worker count, and the iterator state is a position that `get_state()/set_state()` and Grain's
Orbax handler (`grain.checkpoint.CheckpointHandler`) save and restore exactly.

Per-example keys of a batch (leading batch dim `B = batch_size // shard_count` omitted; `T` =
`clip_frames` video frames, `Ta = T * mel_rate / fps` mel frames, `S = T * sample_rate / fps`):

  flame56_self, flame56_partner    float32 [T, 56]
  motion_self, motion_partner      float32 [T, C]          (SynthDyad sources)
  mel_<stream> (self, partner)     float32 [Ta, n_mels]   (`config.mel_streams`)
  speaking_self, speaking_partner  bool    [T]              (SynthDyad sources)
  identity_self, identity_partner  int32   []               (-1 where the source has none)
  clip_start, example_index        int32   []   window start frame / source example index
  optional (`config.keep_keys`): video, partner_video uint8 [T, H, W, 3], reference_image uint8
  [H, W, 3], audio_self / audio_partner / audio_background / audio_mix float32 [S].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from avatar_jax.data import features as features_lib

OPTIONAL_KEYS = (
    "video",
    "partner_video",
    "reference_image",
    "audio_self",
    "audio_partner",
    "audio_background",
    "audio_mix",
)
_AUDIO_KEYS = ("audio_self", "audio_partner", "audio_background", "audio_mix")
_REQUIRED_KEYS = ("flame56_self", "flame56_partner")
_VIDEO_KEYS = ("video", "partner_video")
_ALWAYS_KEYS = (  # whenever the source has them
    "motion_self",
    "motion_partner",
    "flame56_self",
    "flame56_partner",
    "speaking_self",
    "speaking_partner",
)
_FRAME_KEYS = _ALWAYS_KEYS + _VIDEO_KEYS  # [T, ...] per video frame; windowed with the clip.


def default_config() -> ml_collections.ConfigDict:
  """The data fields every training config embeds as `config.data`."""
  c = ml_collections.ConfigDict()
  # 'synthdyad': the generator, on the fly, through a grain RandomAccessDataSource.
  # 'tfds': a prepared TFDS dataset (ArrayRecord), read without TensorFlow.
  c.source = "synthdyad"
  c.tfds = ml_collections.ConfigDict(dict(name="synthdyad", data_dir=None))
  c.split_sizes = ml_collections.ConfigDict(dict(train=4096, test=128, ood=128))
  c.synthdyad = ml_collections.ConfigDict(
      dict(
          duration_s=None,  # None: the split's regime (8 s train/test, 16 s ood)
          fps=25,
          sample_rate=16000,
          resolution=64,
          render=True,  # False: no video keys (motion/audio models); generation is then cheaper
          seed=0,  # generator seed (the dataset), distinct from the shuffle seed
          cache=False,  # keep generated audio/motion in memory (per process); video is rendered per window
      )
  )
  c.clip_frames = 50  # training window, video frames (2 s at 25 fps); 0 = whole clip
  c.eval_windows = "tile"  # eval: 'tile' (consecutive non-overlapping windows) or 'full' clip
  c.batch_size = 8  # global; each of `shard_count` hosts gets batch_size // shard_count
  c.features = ml_collections.ConfigDict(dataclasses.asdict(features_lib.MelConfig()))
  c.mel_streams = ("self", "partner")  # mel_<s> from audio_<s>; 'background' and 'mix' also work
  c.keep_keys = ()  # optional keys to keep, from OPTIONAL_KEYS (e.g. ('video', 'reference_image'))
  c.worker_count = 0  # >0: that many prefetch processes (results do not depend on it)
  c.prefetch = 2  # batches buffered per worker process
  c.read_threads = 1  # threads reading + transforming inside each process
  c.shuffle_seed = 0
  return c


# ======================================================================================= sources
class SynthDyadSource:
  """Grain random-access source over the SynthDyad generator: `source[i]` is sample `i`.

  Deterministic in (split, seed, index). `source[i]` is exactly `make_sample(split, i, ...)`.
  The pipeline instead calls `get(i, render=False)` and renders only the frames of its window
  (`render_window`), which gives the same pixels as slicing the full render at a fraction of the
  cost. With `cache=True` the motion/audio part of each sample stays in memory, per process (each
  prefetch worker fills its own cache; the cache is not pickled).
  """

  def __init__(
      self,
      split: str,
      size: int,
      *,
      seed: int = 0,
      duration_s: float | None = None,
      fps: int = 25,
      sample_rate: int = 16000,
      resolution: int = 64,
      render: bool = True,
      cache: bool = False,
  ):
    if size <= 0:
      raise ValueError(f"SynthDyad split {split!r} needs a positive size, got {size}.")
    self.split = split
    self.size = int(size)
    self.seed = int(seed)
    self.render = bool(render)
    self.cache = bool(cache)
    self.config_kwargs = dict(
        fps=int(fps),
        sample_rate=int(sample_rate),
        resolution=int(resolution),
    )
    if duration_s is not None:
      self.config_kwargs["duration_s"] = float(duration_s)
    self._cache: dict[int, dict[str, Any]] = {}

  def __len__(self) -> int:
    return self.size

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_cache"] = {}
    return state

  def __repr__(self) -> str:
    return (
        f"SynthDyadSource(split={self.split!r}, size={self.size}, seed={self.seed}, "
        f"render={self.render}, {self.config_kwargs})"
    )

  def generator_config(self):
    """The split's regime (ood: faster speech, longer clips) with this source's overrides."""
    from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top

    return dataclasses.replace(sd.regime_for(self.split), **self.config_kwargs)

  def get(self, index: int, *, render: bool | None = None) -> dict[str, Any]:
    """Sample `index`; `render=None` follows the source's `render` setting."""
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"SynthDyad {self.split!r} index {index} out of range [0, {self.size}).")
    render = self.render if render is None else render
    from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top

    if not render and index in self._cache:
      return self._cache[index]
    sample = sd.make_sample(
        self.split, index, seed=self.seed, config=self.generator_config(), render=render
    )
    if self.cache and not render:
      self._cache[index] = sample
    return sample

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.get(index)

  def render_window(self, example: Mapping[str, Any], key: str, start: int, stop: int):
    """Frames `[start, stop)` of `key` ('video', 'partner_video') or the 'reference_image'.

    `example` is `get(i, render=False)`; rendering is per frame, so this equals
    `get(i, render=True)[key][start:stop]`.
    """
    from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top
    from avatar_jax.data.synthdyad import render as render_lib  # pylint: disable=g-import-not-at-top

    if not self.render:
      raise ValueError(f"{self!r} has render=False; it cannot provide {key!r}.")
    who = "partner" if key == "partner_video" else "self"
    config = self.generator_config()
    ident = sd.identity_for(self.split, int(example[f"identity_{who}"]), self.seed, config)
    if key == "reference_image":
      return render_lib.reference_image(ident, config.resolution)
    motion = np.asarray(example[f"motion_{who}"])[start:stop]
    return render_lib.render(motion, ident, config.resolution)


class TfdsSource:
  """Grain random-access source over a prepared TFDS dataset (ArrayRecord, no TensorFlow).

  `skip`: features left undecoded (returned as raw bytes), e.g. the videos of a rendered dataset
  read by a motion model: zlib-inflating them is most of the read cost.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               skip: Sequence[str] = ()):
    self.name, self.split, self.data_dir = name, split, data_dir
    self.skip = tuple(skip)
    self._ds = None
    self._len = len(self._open())

  def _open(self):
    if self._ds is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      # Registers the project's builders so `name` resolves without a module path.
      from avatar_jax.data import builders  # pylint: disable=g-import-not-at-top,unused-import

      ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir)
      present = [k for k in self.skip if k in ds.dataset_info.features]
      if present:
        ds = tfds.data_source(self.name, split=self.split, data_dir=self.data_dir,
                              decoders={k: tfds.decode.SkipDecoding() for k in present})
      self._ds = ds
    return self._ds

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_ds"] = None  # reopened lazily in each worker process
    return state

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._open()[int(index)]

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"


def make_source(config: ml_collections.ConfigDict, split: str):
  """The random-access source of `split` named by `config.source`."""
  if config.source == "synthdyad":
    sizes = config.split_sizes
    if split not in sizes:
      raise KeyError(
          f"config.split_sizes has no entry for split {split!r}; it has {sorted(sizes.keys())}."
      )
    s = config.synthdyad
    return SynthDyadSource(
        split,
        sizes[split],
        seed=s.seed,
        duration_s=s.duration_s,
        fps=s.fps,
        sample_rate=s.sample_rate,
        resolution=s.resolution,
        render=s.render,
        cache=s.cache,
    )
  if config.source == "tfds":
    skip = [k for k in ("video", "partner_video", "reference_image") if k not in config.keep_keys]
    return TfdsSource(config.tfds.name, split, config.tfds.data_dir, skip=skip)
  raise ValueError(f"config.source must be 'synthdyad' or 'tfds', got {config.source!r}.")


# ==================================================================================== transforms
def _num_frames(example: Mapping[str, Any], where: str) -> int:
  if "flame56_self" not in example:
    raise KeyError(f"{where}: example has no 'flame56_self'; keys are {sorted(example)}.")
  return int(np.shape(example["flame56_self"])[0])


@dataclasses.dataclass(frozen=True)
class _Windower:
  """Cuts one window out of an example and computes its log-mel features.

  Picklable (a frozen dataclass of plain values), so prefetch workers can run it.
  """

  clip_frames: int  # 0: whole example
  mel: features_lib.MelConfig
  mel_streams: tuple[str, ...]
  keys: tuple[str, ...]

  def __call__(
      self, example: Mapping[str, Any], start: int, index: int, render_window=None
  ) -> dict[str, Any]:
    """Window `[start, start + clip_frames)` of `example` (source index `index`).

    `render_window(example, key, start, stop)`, when given, makes the video keys that the
    example lacks (SynthDyad renders only the window).
    """
    where = f"example {index}"
    t_total = _num_frames(example, where)
    fps = float(example.get("fps", 25))
    sr = int(example.get("sample_rate", self.mel.sample_rate))
    if sr != self.mel.sample_rate:
      raise ValueError(
          f"{where}: audio at {sr} Hz but the mel front end expects {self.mel.sample_rate} Hz; "
          "resample when building the dataset (features.resample)."
      )
    spf = sr / fps
    if abs(spf - round(spf)) > 1e-9:
      raise ValueError(f"{where}: sample_rate {sr} is not a multiple of fps {fps}.")
    spf = int(round(spf))
    r = features_lib.mel_frames_per_video_frame(self.mel, fps)
    t = self.clip_frames or t_total
    if not 0 <= start <= t_total - t:
      raise ValueError(
          f"{where}: window [{start}, {start + t}) does not fit its {t_total} frames "
          f"(clip_frames={self.clip_frames})."
      )
    out: dict[str, Any] = {}
    for k in _FRAME_KEYS:
      # flame56 is in every source; motion/speaking in SynthDyad (not DualTalk); video on request.
      if k in _REQUIRED_KEYS or k in self.keys or (k in _ALWAYS_KEYS and k in example):
        if k not in example and render_window is not None and k in _VIDEO_KEYS:
          out[k] = render_window(example, k, start, start + t)
          continue
        if k not in example:
          raise KeyError(f"{where}: missing key {k!r}; keys are {sorted(example)}.")
        v = np.asarray(example[k])
        if v.shape[0] != t_total:
          raise ValueError(
              f"{where}: {k!r} has {v.shape[0]} frames, flame56_self has {t_total}."
          )
        out[k] = v[start:start + t]
    for k in ("motion_self", "motion_partner", "flame56_self", "flame56_partner"):
      if k in out:
        out[k] = out[k].astype(np.float32)
    for k in ("speaking_self", "speaking_partner"):
      if k in out:
        out[k] = out[k].astype(bool)
    if "reference_image" in self.keys:
      if "reference_image" not in example and render_window is not None:
        out["reference_image"] = render_window(example, "reference_image", 0, 1)
      elif "reference_image" not in example:
        raise KeyError(f"{where}: missing key 'reference_image'; keys are {sorted(example)}.")
      else:
        out["reference_image"] = np.asarray(example["reference_image"], np.uint8)
    streams = set(self.mel_streams) | {k[len("audio_"):] for k in self.keys if k in _AUDIO_KEYS}
    for s in sorted(streams):
      key = f"audio_{s}"
      if key not in example:
        raise KeyError(f"{where}: missing audio track {key!r}; keys are {sorted(example)}.")
      audio = _fit_length(np.asarray(example[key], np.float32), t_total * spf)
      if s in self.mel_streams:
        # Mel of the whole example, then sliced: window edges see real context, not padding.
        mel = features_lib.log_mel(audio, self.mel)
        out[f"mel_{s}"] = mel[start * r:(start + t) * r]
      if key in self.keys:
        out[key] = audio[start * spf:(start + t) * spf]
    out["identity_self"] = np.int32(example.get("identity_self", -1))
    out["identity_partner"] = np.int32(example.get("identity_partner", -1))
    out["clip_start"] = np.int32(start)
    out["example_index"] = np.int32(index)
    return out


def _fit_length(audio: np.ndarray, n: int) -> np.ndarray:
  # Real recordings end a few samples off the video; zero-pad or trim to exactly T * spf.
  if audio.ndim != 1:
    raise ValueError(f"Audio tracks must be mono [S]; got shape {audio.shape}.")
  if audio.shape[0] >= n:
    return audio[:n]
  return np.pad(audio, (0, n - audio.shape[0]))


def _fetch(source, index: int):
  """(example, render_window or None): SynthDyad is fetched without video, rendered per window."""
  if isinstance(source, SynthDyadSource) and source.render:
    return source.get(index, render=False), source.render_window
  return source[index], None


class _TrainWindow(grain.transforms.RandomMap):
  """Random window offset, drawn from Grain's per-element RNG (seeded by seed and position)."""

  def __init__(self, source, windower: _Windower):
    self.source, self.windower = source, windower

  def random_map(self, index: int, rng: np.random.Generator):
    example, render_window = _fetch(self.source, index)
    t_total = _num_frames(example, f"example {index}")
    t = self.windower.clip_frames or t_total
    if t_total < t:
      raise ValueError(
          f"example {index} of {self.source!r} has {t_total} frames, fewer than "
          f"clip_frames={t}."
      )
    start = int(rng.integers(0, t_total - t + 1))
    return self.windower(example, start, index, render_window)


class _EvalWindow(grain.transforms.Map):
  def __init__(self, source, windower: _Windower):
    self.source, self.windower = source, windower

  def map(self, item):
    index, start = (int(v) for v in item)
    example, render_window = _fetch(self.source, index)
    return self.windower(example, start, index, render_window)


def _eval_windows(source, clip_frames: int, mode: str) -> np.ndarray:
  """[(example, start)] for deterministic eval windows, `[N, 2]` int64."""
  if mode not in ("tile", "full"):
    raise ValueError(f"config.eval_windows must be 'tile' or 'full', got {mode!r}.")
  n = len(source)
  if mode == "full" or not clip_frames:
    return np.stack([np.arange(n), np.zeros(n, np.int64)], axis=1)
  if isinstance(source, SynthDyadSource):
    # Every sample of a split has the split config's length; the windower re-checks each
    # example, so a mismatch fails loudly rather than silently.
    lengths = np.full(n, source.generator_config().num_frames)
  else:
    logging.info("Reading %d examples of %r to lay out eval windows.", n, source)
    lengths = np.array([_num_frames(source[i], f"example {i}") for i in range(n)])
  rows = [(i, w * clip_frames) for i in range(n) for w in range(lengths[i] // clip_frames)]
  if not rows:
    raise ValueError(f"No example of {source!r} is as long as clip_frames={clip_frames}.")
  return np.asarray(rows, np.int64)


# ====================================================================================== pipeline
def make(
    config: ml_collections.ConfigDict,
    split: str,
    *,
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
    seed: shuffle + window-offset seed; defaults to `config.shuffle_seed`.
    shuffle: shuffle examples (per epoch) and draw random window offsets. With `shuffle=False`
      windows are deterministic (consecutive tiles, `config.eval_windows`), for evaluation.
    num_epochs: passes over the data; None repeats forever.
    shard_index, shard_count: this host's shard; default `jax.process_index()/process_count()`.

  Returns:
    A `grain.DatasetIterator` with `get_state()/set_state()`. Train-mode batches drop the
    remainder; eval-mode batches keep a smaller last batch.
  """
  shard_index = jax.process_index() if shard_index is None else shard_index
  shard_count = jax.process_count() if shard_count is None else shard_count
  seed = config.shuffle_seed if seed is None else seed
  if config.batch_size % shard_count:
    raise ValueError(
        f"Global batch_size {config.batch_size} is not divisible by shard_count {shard_count}."
    )
  host_batch = config.batch_size // shard_count
  keys = tuple(config.keep_keys)
  unknown = set(keys) - set(OPTIONAL_KEYS)
  if unknown:
    raise ValueError(f"config.keep_keys has unknown {sorted(unknown)}; choose from {OPTIONAL_KEYS}.")
  if (
      config.source == "synthdyad"
      and not config.synthdyad.render
      and set(keys) & {"video", "partner_video", "reference_image"}
  ):
    raise ValueError(f"config.keep_keys={keys} asks for video but config.synthdyad.render is False.")
  mel = features_lib.mel_config_from(config.features)
  mel.validate()
  windower = _Windower(int(config.clip_frames), mel, tuple(config.mel_streams), keys)
  source = make_source(config, split)

  if shuffle:
    ds = grain.MapDataset.range(len(source))[shard_index::shard_count]
    ds = ds.shuffle(seed=seed).repeat(num_epochs)
    ds = ds.random_map(_TrainWindow(source, windower), seed=seed)
    drop_remainder = True
  else:
    windows = _eval_windows(source, int(config.clip_frames), config.eval_windows)
    ds = grain.MapDataset.source(windows)[shard_index::shard_count].repeat(num_epochs)
    ds = ds.map(_EvalWindow(source, windower))
    drop_remainder = False
  if shuffle and len(ds) < host_batch:
    raise ValueError(f"Split {split!r} shard has {len(ds)} examples < host batch {host_batch}.")
  ds = ds.batch(host_batch, drop_remainder=drop_remainder)
  ids = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=int(config.read_threads), prefetch_buffer_size=int(config.prefetch))
  )
  if config.worker_count > 0:
    if not flags.FLAGS.is_parsed():
      # Grain's worker processes read absl flags; outside an absl app (tests, notebooks) they
      # have not been parsed, and the defaults are what we want.
      flags.FLAGS.mark_as_parsed()
    ids = ids.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=int(config.worker_count), per_worker_buffer_size=int(config.prefetch)
        )
    )
  logging.info(
      "Data %s/%s: %s, host batch %d (shard %d/%d), workers %d.",
      config.source, split, source, host_batch, shard_index, shard_count, config.worker_count,
  )
  return iter(ids)


def to_global(
    batch: Mapping[str, np.ndarray],
    mesh: jax.sharding.Mesh,
    axes: Sequence[str] = ("data", "fsdp"),
) -> dict[str, jax.Array]:
  """Host-local batch -> global `jax.Array`s, leading dim sharded over `axes` of `mesh`.

  Each host passes its own `[B_host, ...]` slice; the result has leading dim
  `B_host * process_count` and every other dim replicated.
  """
  axes = tuple(axes)
  missing = [a for a in axes if a not in mesh.axis_names]
  if missing:
    raise ValueError(f"to_global axes {missing} are not in the mesh axes {mesh.axis_names}.")
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))
  n_shards = int(np.prod([mesh.shape[a] for a in axes]))
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    global_b = v.shape[0] * jax.process_count()
    if v.ndim == 0 or global_b % n_shards:
      raise ValueError(
          f"Batch key {k!r} with shape {v.shape}: global leading dim {global_b} must be "
          f"divisible by the {n_shards} devices of mesh axes {axes}."
      )
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out
