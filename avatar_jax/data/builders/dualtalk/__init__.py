"""TFDS builder `dualtalk` (see dualtalk_dataset_builder.py)."""
