"""Random-access sources of whole examples, registered by name (`config.source`).

A source is built as `cls.from_config(config, split, keys)` from `config.data` and is a Grain
random-access source: `len(source)`, `source[i]` -> dict of whole-clip NumPy arrays. Besides that,
every source declares

  keys                    raw keys its examples carry (what the pipeline can cut windows from)
  rates(config) -> (fps, sample_rate)   classmethod: video frame rate and audio rate of the data,
                          without opening anything heavy (`pipeline.facts` reads it)
  num_frames(i)           frames of example i (laying out eval windows)
  fetch(i, keys)          example i with at least `keys` (may skip expensive ones it was not asked
                          for); the pipeline calls this, not `source[i]`
  render_window(example, key, start, stop)   optional: frames of a video key the example lacks

Add a source with `@register("name")` on a class; nothing else names the list.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

_SOURCES: dict[str, type] = {}


def register(name: str):
  """Class decorator: makes the source available as `config.source = name`."""

  def wrap(cls):
    if name in _SOURCES and _SOURCES[name] is not cls:
      raise ValueError(f"Data source {name!r} is already registered as {_SOURCES[name]!r}.")
    _SOURCES[name] = cls
    return cls

  return wrap


def get(name: str) -> type:
  """The source class registered under `name`."""
  if name not in _SOURCES:
    raise ValueError(f"config.data.source={name!r} is not a registered source; registered: "
                     f"{sorted(_SOURCES)} (avatar_jax.data.sources.register).")
  return _SOURCES[name]


def make_source(config: ml_collections.ConfigDict, split: str, keys: Sequence[str] | None = None):
  """The random-access source of `split` named by `config.source`.

  `keys`: the raw keys the caller will read (None: all); sources use it to skip decoding or
  rendering what nobody asked for.
  """
  return get(config.source).from_config(config, split, None if keys is None else tuple(keys))


# ===================================================================================== SynthDyad
SYNTHDYAD_KEYS = (
    "motion_self", "motion_partner", "flame56_self", "flame56_partner", "speaking_self",
    "speaking_partner", "audio_self", "audio_partner", "audio_background", "audio_mix",
    "identity_self", "identity_partner",
)
_VIDEO_KEYS = ("video", "partner_video", "reference_image")


@register("synthdyad")
class SynthDyadSource:
  """Grain random-access source over the SynthDyad generator: `source[i]` is sample `i`.

  Deterministic in (split, seed, index). `source[i]` is exactly `make_sample(split, i, ...)`.
  The pipeline instead calls `fetch(i)` (no video) and renders only the frames of its window
  (`render_window`), which gives the same pixels as slicing the full render at a fraction of the
  cost. Samples 2k and 2k+1 are the two sides of conversation k; the last conversation is kept,
  so reading in order generates each conversation once.
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
  ):
    if size <= 0:
      raise ValueError(f"SynthDyad split {split!r} needs a positive size, got {size}.")
    self.split = split
    self.size = int(size)
    self.seed = int(seed)
    self.render = bool(render)
    self.config_kwargs = dict(fps=int(fps), sample_rate=int(sample_rate),
                              resolution=int(resolution))
    if duration_s is not None:
      self.config_kwargs["duration_s"] = float(duration_s)
    self.keys = SYNTHDYAD_KEYS + (_VIDEO_KEYS if self.render else ())
    self._last: tuple[int, Any] | None = None  # (conversation index, conversation)

  @classmethod
  def from_config(cls, config, split, keys=None):
    del keys  # video is rendered per window, on request; nothing else is optional
    sizes = config.split_sizes
    if split not in sizes:
      raise KeyError(
          f"config.split_sizes has no entry for split {split!r}; it has {sorted(sizes.keys())}.")
    s = config.synthdyad
    return cls(split, sizes[split], seed=s.seed, duration_s=s.duration_s, fps=s.fps,
               sample_rate=s.sample_rate, resolution=s.resolution, render=s.render)

  @classmethod
  def rates(cls, config) -> tuple[int, int]:
    return int(config.synthdyad.fps), int(config.synthdyad.sample_rate)

  def __len__(self) -> int:
    return self.size

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_last"] = None
    return state

  def __repr__(self) -> str:
    return (f"SynthDyadSource(split={self.split!r}, size={self.size}, seed={self.seed}, "
            f"render={self.render}, {self.config_kwargs})")

  def generator_config(self):
    """The split's regime (ood: faster speech, longer clips) with this source's overrides."""
    from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top

    return dataclasses.replace(sd.regime_for(self.split), **self.config_kwargs)

  def num_frames(self, index: int) -> int:
    del index  # every sample of a split has the split config's length
    return int(self.generator_config().num_frames)

  def get(self, index: int, *, render: bool | None = None) -> dict[str, Any]:
    """Sample `index`; `render=None` follows the source's `render` setting."""
    index = int(index)
    if not 0 <= index < self.size:
      raise IndexError(f"SynthDyad {self.split!r} index {index} out of range [0, {self.size}).")
    render = self.render if render is None else render
    from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top

    config = self.generator_config()
    if render:
      return sd.make_sample(self.split, index, seed=self.seed, config=config, render=True)
    if self._last is None or self._last[0] != index // 2:
      conv = sd.make_conversation(self.split, index // 2, seed=self.seed, config=config)
      self._last = (index // 2, conv)
    return sd.sample_from_conversation(self._last[1], index, seed=self.seed)

  def fetch(self, index: int, keys=None) -> dict[str, Any]:
    del keys
    return self.get(index, render=False)

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
      raise ValueError(f"{self!r} has render=False; it cannot provide {key!r} "
                       "(set config.data.synthdyad.render=True).")
    who = "partner" if key == "partner_video" else "self"
    config = self.generator_config()
    ident = sd.identity_for(self.split, int(example[f"identity_{who}"]), self.seed, config)
    if key == "reference_image":
      return render_lib.reference_image(ident, config.resolution)
    motion = np.asarray(example[f"motion_{who}"])[start:stop]
    return render_lib.render(motion, ident, config.resolution)


# ========================================================================================== TFDS
@register("tfds")
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
    ds = self._open()
    self._len = len(ds)
    self.keys = tuple(ds.dataset_info.features.keys())

  @classmethod
  def from_config(cls, config, split, keys=None):
    wanted = config.keep_keys if keys is None else keys
    skip = [k for k in _VIDEO_KEYS if k not in wanted]
    return cls(config.tfds.name, split, config.tfds.data_dir, skip=skip)

  @classmethod
  def rates(cls, config) -> tuple[int, int]:
    # Recorded datasets declare their rates per example; the pipeline checks them against these.
    return int(config.tfds.fps), int(config.features.sample_rate)

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

  def fetch(self, index: int, keys=None) -> dict[str, Any]:
    del keys
    return self[index]

  def num_frames(self, index: int) -> int:
    ex = self[index]
    # Video datasets (video_folder) store it: they have no motion track, and their video may be
    # left undecoded (`skip`).
    if "num_frames" in ex:
      return int(ex["num_frames"])
    return int(np.shape(ex["flame56_self"])[0])

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"
