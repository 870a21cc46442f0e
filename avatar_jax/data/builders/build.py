"""Builds a project TFDS dataset as ArrayRecord, without TensorFlow.

    python -m avatar_jax.data.builders.build synthdyad/r64 --data_dir ~/tensorflow_datasets
    python -m avatar_jax.data.builders.build synthdyad/motion --train_size 2048 --data_dir /tmp/tfds
    python -m avatar_jax.data.builders.build dualtalk --manual_dir /data/DualTalk_Dataset
    python -m avatar_jax.data.builders.build video_folder/r64 --manual_dir /data/talks
    python -m avatar_jax.data.builders.build video_folder/r128 --crop box --manual_dir /data/talks

`--train_size/--test_size/--ood_size/--resolution/--duration_s/--seed/--render` build SynthDyad
with a custom config named by `--config_name` (default 'custom'), starting from the named config;
`--resolution/--crop/--layout` do the same for video_folder.
Read the result with `tfds.data_source('<name>/<config>', split=..., data_dir=...)`.
"""

from __future__ import annotations

import dataclasses
import os

from absl import app
from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from avatar_jax.data import builders

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Output root (default: TFDS default).")
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Source folder (dualtalk, video_folder).")
_CONFIG_NAME = flags.DEFINE_string("config_name", "custom", "Name of a custom SynthDyad config.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "dualtalk, video_folder: leave out (with a "
                              "warning, counted per split) conversations that fail a check, "
                              "instead of stopping.")
_OVERRIDES = {
    "train_size": flags.DEFINE_integer("train_size", None, "SynthDyad train samples."),
    "test_size": flags.DEFINE_integer("test_size", None, "SynthDyad test samples."),
    "ood_size": flags.DEFINE_integer("ood_size", None, "SynthDyad ood samples."),
    "resolution": flags.DEFINE_integer("resolution", None, "SynthDyad render / video_folder crop "
                                       "size."),
    "crop": flags.DEFINE_enum("crop", None, ["center", "box", "detect"], "video_folder face crop."),
    "layout": flags.DEFINE_enum("layout", None, ["folder", "seamless"], "video_folder layout."),
    "duration_s": flags.DEFINE_float("duration_s", None, "SynthDyad clip length (all splits)."),
    "seed": flags.DEFINE_integer("seed", None, "SynthDyad generator seed."),
    "render": flags.DEFINE_bool("render", None, "SynthDyad: render video."),
}


def make_builder(name: str, *, data_dir: str | None = None, **overrides) -> tfds.core.DatasetBuilder:
  """Builder for `name` ('synthdyad/<config>', 'dualtalk' or 'video_folder/<config>'), config
  fields overridden.

  With overrides, the SynthDyad (video_folder) config is a copy of the named one called
  `overrides.pop('config_name', 'custom')`.
  """
  ds_name, _, config = name.partition("/")
  if ds_name == "video_folder":
    skip_bad = overrides.pop("skip_bad", False)
    base = {c.name: c for c in builders.VideoFolder.BUILDER_CONFIGS}
    config = config or builders.VideoFolder.DEFAULT_CONFIG_NAME
    if config not in base:
      raise ValueError(f"Unknown video_folder config {config!r}; known: {sorted(base)}.")
    config_name = overrides.pop("config_name", "custom")
    unknown = set(overrides) - {"resolution", "crop", "layout"}
    if unknown:
      raise ValueError(f"video_folder takes --resolution/--crop/--layout, got {sorted(unknown)}.")
    cfg = config
    if overrides:
      cfg = dataclasses.replace(base[config], name=config_name,
                                description=f"{config} with {overrides}", **overrides)
    return builders.VideoFolder(config=cfg, data_dir=data_dir, file_format="array_record",
                                skip_bad=skip_bad)
  if ds_name == "synthdyad":
    base = {c.name: c for c in builders.SynthDyad.BUILDER_CONFIGS}
    config = config or builders.SynthDyad.DEFAULT_CONFIG_NAME
    if config not in base:
      raise ValueError(f"Unknown synthdyad config {config!r}; known: {sorted(base)}.")
    config_name = overrides.pop("config_name", "custom")
    fields = {f.name for f in dataclasses.fields(builders.SynthDyadBuilderConfig)}
    unknown = set(overrides) - fields
    if unknown:
      raise ValueError(f"synthdyad has no config fields {sorted(unknown)} (video_folder only).")
    if overrides:
      cfg = dataclasses.replace(base[config], name=config_name,
                                description=f"{config} with {overrides}", **overrides)
      return builders.SynthDyad(config=cfg, data_dir=data_dir, file_format="array_record")
    return builders.SynthDyad(config=config, data_dir=data_dir, file_format="array_record")
  if ds_name == "dualtalk":
    skip_bad = overrides.pop("skip_bad", False)
    if overrides:
      raise ValueError(f"dualtalk takes no config overrides, got {sorted(overrides)}.")
    return builders.DualTalk(data_dir=data_dir, file_format="array_record", skip_bad=skip_bad)
  raise ValueError(f"Unknown dataset {name!r}; expected 'synthdyad[/config]', 'dualtalk' or "
                   "'video_folder[/config]'.")


def build(name: str, *, data_dir: str | None = None, manual_dir: str | None = None,
          **overrides) -> tfds.core.DatasetBuilder:
  """Generates and writes the dataset (idempotent: an existing version is reused)."""
  builder = make_builder(name, data_dir=data_dir, **overrides)
  if builder.name == "dualtalk" and (manual_dir is None or not os.path.isdir(manual_dir)):
    raise FileNotFoundError(
        f"dualtalk needs --manual_dir, the DualTalk folder holding train/ test/ (ood/); "
        f"got {manual_dir!r}."
    )
  if builder.name == "video_folder" and (manual_dir is None or not os.path.isdir(manual_dir)):
    raise FileNotFoundError(
        f"video_folder needs --manual_dir, the folder of talking videos "
        f"(<split>/<conversation>/<speaker>.mp4, docs/data.md); got {manual_dir!r}.")
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
  )
  logging.info("Built %s at %s: %s", name, builder.data_dir,
               {k: v.num_examples for k, v in builder.info.splits.items()})
  return builder


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: python -m avatar_jax.data.builders.build <name>[/config] [flags]")
  overrides = {k: f.value for k, f in _OVERRIDES.items() if f.value is not None}
  if overrides:
    overrides["config_name"] = _CONFIG_NAME.value
  if _SKIP_BAD.value:
    overrides["skip_bad"] = True
  build(argv[1], data_dir=_DATA_DIR.value, manual_dir=_MANUAL_DIR.value, **overrides)


if __name__ == "__main__":
  app.run(main)
