"""TFDS dataset builders (ArrayRecord output, readable without TensorFlow).

Importing this package registers `synthdyad`, `dualtalk` and `video_folder` with TFDS, so
`tfds.data_source('synthdyad/r64', split='train', data_dir=...)` resolves them.
"""

# pylint: disable=g-import-not-at-top,wrong-import-position
from avatar_jax.data.builders import _compat  # noqa: F401  (before any builder)
from avatar_jax.data.builders.dualtalk import dualtalk_dataset_builder
from avatar_jax.data.builders.synthdyad import synthdyad_dataset_builder
from avatar_jax.data.builders.video_folder import video_folder_dataset_builder

SynthDyad = synthdyad_dataset_builder.Builder
SynthDyadBuilderConfig = synthdyad_dataset_builder.SynthDyadBuilderConfig
DualTalk = dualtalk_dataset_builder.Builder
VideoFolder = video_folder_dataset_builder.Builder
VideoFolderConfig = video_folder_dataset_builder.VideoFolderConfig
