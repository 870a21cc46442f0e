"""TFDS builder `synthdyad`: SynthDyad samples written as ArrayRecord, read without TensorFlow.

    python -m avatar_jax.data.builders.build synthdyad/r64 --data_dir ~/tensorflow_datasets
    tfds build avatar_jax/data/builders/synthdyad --config r64 --file_format array_record \
        --data_dir ~/tensorflow_datasets

Record `i` of a split is exactly `generator.make_sample(split, i, seed=config.seed, ...)` (shuffling
at write time is disabled, and every record also stores its `index`). Read it back with
`tfds.data_source('synthdyad/r64', split='train')` or `builder.as_data_source()`: NumPy dicts with
the generator's keys (`events` a dict of `[E]` arrays; scalars as Python ints).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from avatar_jax.data.builders import _compat  # noqa: F401  pylint: disable=unused-import

_NO_COMPRESSION = tfds.features.Encoding.NONE
_ZLIB = tfds.features.Encoding.ZLIB  # video/images: synthetic frames compress ~10x


@dataclasses.dataclass
class SynthDyadBuilderConfig(tfds.core.BuilderConfig):
  """Generator settings and split sizes (number of samples; two per conversation)."""

  resolution: int = 64
  duration_s: float | None = None  # None: each split's regime (8 s train/test, 16 s ood)
  render: bool = True
  seed: int = 0
  train_size: int = 4096
  test_size: int = 256
  ood_size: int = 256

  def split_sizes(self) -> dict[str, int]:
    return {"train": self.train_size, "test": self.test_size, "ood": self.ood_size}


def _config(name, description, **kw):
  return SynthDyadBuilderConfig(name=name, description=description, **kw)


class Builder(tfds.core.GeneratorBasedBuilder):
  """SynthDyad dyadic conversations (video, four audio tracks, motion, FLAME-56, events)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      _config("r64", "64x64 renders, default regimes (8 s train/test, 16 s ood)."),
      _config("r128", "128x128 renders.", resolution=128, train_size=2048),
      _config("r256", "256x256 renders.", resolution=256, train_size=1024, test_size=128,
              ood_size=128),
      _config("motion", "No video: audio, motion, FLAME-56, events.", render=False,
              train_size=16384, test_size=512, ood_size=512),
      _config("tiny", "32x32, 2 s clips, 8/4/4 samples: smoke tests.", resolution=32,
              duration_s=2.0, train_size=8, test_size=4, ood_size=4),
  ]
  DEFAULT_CONFIG_NAME = "r64"
  # Record i must be sample i, so readers can index the generator and the records alike.
  disable_shuffling = True

  def _info(self) -> tfds.core.DatasetInfo:
    from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top

    cfg = self.builder_config
    c = len(sd.MOTION_CHANNELS)
    t = tfds.features.Tensor
    feats = {
        "index": np.int64,
        "audio_self": t(shape=(None,), dtype=np.float32),
        "audio_partner": t(shape=(None,), dtype=np.float32),
        "audio_background": t(shape=(None,), dtype=np.float32),
        "audio_mix": t(shape=(None,), dtype=np.float32),
        "motion_self": t(shape=(None, c), dtype=np.float32),
        "motion_partner": t(shape=(None, c), dtype=np.float32),
        "flame56_self": t(shape=(None, 56), dtype=np.float32),
        "flame56_partner": t(shape=(None, 56), dtype=np.float32),
        "speaking_self": t(shape=(None,), dtype=np.bool_, encoding=tfds.features.Encoding.BYTES),
        "speaking_partner": t(shape=(None,), dtype=np.bool_,
                              encoding=tfds.features.Encoding.BYTES),
        "events": tfds.features.FeaturesDict({
            "type": t(shape=(None,), dtype=np.int32),
            "start": t(shape=(None,), dtype=np.float32),
            "end": t(shape=(None,), dtype=np.float32),
            "who": t(shape=(None,), dtype=np.int32),
        }),
        "fps": np.int64,
        "sample_rate": np.int64,
        "seed": np.int64,
        "identity_self": np.int64,
        "identity_partner": np.int64,
    }
    if cfg.render:
      r = cfg.resolution
      feats["video"] = t(shape=(None, r, r, 3), dtype=np.uint8, encoding=_ZLIB)
      feats["partner_video"] = t(shape=(None, r, r, 3), dtype=np.uint8, encoding=_ZLIB)
      feats["reference_image"] = t(shape=(r, r, 3), dtype=np.uint8, encoding=_ZLIB)
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=self.disable_shuffling,
        description=(
            "SynthDyad: procedural two-person conversations with known causal structure "
            "(lips follow own audio; nods, smiles, brows follow the partner). One record = one "
            "conversation seen from one participant; event types: "
            + ", ".join(sd.EVENT_TYPES) + "; motion channels: " + ", ".join(sd.MOTION_CHANNELS)
        ),
        features=tfds.features.FeaturesDict(feats),
        homepage="https://github.com/avatar-jax/avatar_jax/blob/main/docs/data.md",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything is generated
    return {
        split: self._generate_examples(split, size)
        for split, size in self.builder_config.split_sizes().items()
        if size > 0
    }

  def _generate_examples(self, split: str, size: int):
    from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top

    cfg = self.builder_config
    gen_config = sd.regime_for(split)
    overrides = dict(resolution=cfg.resolution)
    if cfg.duration_s is not None:
      overrides["duration_s"] = float(cfg.duration_s)
    gen_config = dataclasses.replace(gen_config, **overrides)
    for i in range(size):
      sample = sd.make_sample(split, i, seed=cfg.seed, config=gen_config, render=cfg.render)
      sample["index"] = i
      yield i, sample
