"""TFDS builder `video_folder` (see video_folder_dataset_builder.py)."""
