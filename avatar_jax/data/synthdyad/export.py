"""SynthDyad in the DualTalk folder layout: the 56-d export as `<split>/<name>_speaker{1,2}.{npz,wav}`.

    python -m avatar_jax.data.synthdyad.export --out /tmp/synthdyad_dualtalk --train 64 --test 16 --ood 8

Conversation k of a split becomes `sd<k:05d>_speaker1` (sample 2k's avatar) and `_speaker2` (its
partner): npz `exp` [T, 50] and `pose` [T, 6] (pose[:, :3] head rotation, pose[:, 3:] jaw, the
DualTalk convention; the inverse of `builders/dualtalk.to_flame56`) and 16-bit 16 kHz wav of
each speaker's own voice. The folder feeds the `dualtalk` TFDS builder (our pipeline then reads
it exactly as it reads the real DualTalk data) or the published DualTalk/TIMAR code as it is.
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from avatar_jax.data import media
from avatar_jax.data.sources import SynthDyadSource


def to_dualtalk(flame56: np.ndarray) -> dict[str, np.ndarray]:
  """[T, 56] (exp 0:50, jaw 50:53, pose 53:56) -> DualTalk npz arrays exp [T, 50], pose [T, 6]."""
  f = np.asarray(flame56, np.float32)
  return {"exp": f[:, 0:50], "pose": np.concatenate([f[:, 53:56], f[:, 50:53]], axis=1)}


def export(out: str, sizes: dict[str, int], *, seed: int = 0) -> dict[str, list[str]]:
  """Writes `sizes[split]` conversations per split under `out`; returns {split: names}."""
  names = {}
  for split, n in sizes.items():
    if n <= 0:
      continue
    os.makedirs(os.path.join(out, split), exist_ok=True)
    src = SynthDyadSource(split, 2 * n, seed=seed, render=False)
    names[split] = []
    for k in range(n):
      s = src.get(2 * k, render=False)   # the two sides of conversation k: self = speaker 1
      name = f"sd{k:05d}"
      for spk, side in ((1, "self"), (2, "partner")):
        stem = os.path.join(out, split, f"{name}_speaker{spk}")
        np.savez(stem + ".npz", **to_dualtalk(s[f"flame56_{side}"]))
        media.write_wav(stem + ".wav", np.asarray(s[f"audio_{side}"], np.float32),
                        int(s["sample_rate"]))
      names[split].append(name)
  return names


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", required=True)
  ap.add_argument("--train", type=int, default=64)
  ap.add_argument("--test", type=int, default=16)
  ap.add_argument("--ood", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0, help="SynthDyad generator seed")
  a = ap.parse_args(argv)
  names = export(a.out, {"train": a.train, "test": a.test, "ood": a.ood}, seed=a.seed)
  print(f"wrote {sum(map(len, names.values()))} conversations to {a.out}")


if __name__ == "__main__":
  main()
