"""TFDS builder `synthdyad` (see synthdyad_dataset_builder.py)."""
