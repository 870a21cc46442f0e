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


def save_converted(out_dir: str, parts: dict, config, config_file: str) -> str:
  """Imported weights in the trainer's checkpoint layout: `parts` ({"frozen": params, "rest":
  other variables}) as step 0 under out_dir/checkpoints (so `config.init_from` loads them), and
  the architecture `config` (a ConfigDict) as out_dir/<config_file>. Returns out_dir."""
  from avatar_jax import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(out_dir, "checkpoints")
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    # Never overwrite: the folder may be what a run's init_from points at.
    raise FileExistsError(f"{ckpt_dir} already holds a checkpoint ({sorted(os.listdir(ckpt_dir))}); "
                          f"remove {out_dir} or pass another --out")
  os.makedirs(out_dir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(ckpt_dir, async_save=False)
  ckpt.save(0, parts, config=config, force=True)
  ckpt.wait()
  ckpt.close()
  with open(os.path.join(out_dir, config_file), "w") as f:
    f.write(config.to_json(indent=2))
  return out_dir


def restore_converted(out_dir: str, parts: dict) -> dict:
  """The `save_converted` parts of out_dir, restored into the abstract `parts` given."""
  from avatar_jax import checkpointing  # pylint: disable=g-import-not-at-top
  ckpt = checkpointing.Checkpointer(os.path.join(out_dir, "checkpoints"), async_save=False)
  state = ckpt.restore(parts)
  ckpt.close()
  return state
