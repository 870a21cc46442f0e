"""Reading published weight folders (Hugging Face / diffusers `save_pretrained` layouts)."""
from __future__ import annotations

import json
import os
from collections.abc import Callable

import numpy as np


def read_safetensors_folder(path: str, filename: str,
                            load: Callable[[str], dict[str, np.ndarray]]
                            ) -> dict[str, np.ndarray] | None:
  """{name: array} of `path/filename`, or of the shards listed in `path/filename.index.json`
  (large checkpoints are split); None when the folder has neither. `load` reads one file."""
  single = os.path.join(path, filename)
  if os.path.exists(single):
    return load(single)
  index = single + ".index.json"
  if not os.path.exists(index):
    return None
  with open(index) as f:
    files = sorted(set(json.load(f)["weight_map"].values()))
  out = {}
  for name in files:
    out.update(load(os.path.join(path, name)))
  return out
