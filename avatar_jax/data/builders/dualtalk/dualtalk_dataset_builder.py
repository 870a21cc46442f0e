"""TFDS builder `dualtalk`: a DualTalk-layout folder as ArrayRecord, read without TensorFlow.

    python -m avatar_jax.data.builders.build dualtalk --manual_dir /path/to/DualTalk_Dataset \
        --data_dir ~/tensorflow_datasets
    tfds build avatar_jax/data/builders/dualtalk --manual_dir /path/to/DualTalk_Dataset \
        --file_format array_record --data_dir ~/tensorflow_datasets

Input layout (the released DualTalk dataset): `<manual_dir>/<split>/` for split in train, test,
ood (those present), each holding per conversation `<name>_speaker1.npz`, `<name>_speaker1.wav`,
`<name>_speaker2.npz`, `<name>_speaker2.wav`. Each npz has `exp` `[T, 50]` (FLAME expression) and
`pose` `[T, 6]` (axis-angle: `pose[:, 0:3]` global head/neck rotation, `pose[:, 3:6]` jaw), at
25 fps; other keys (e.g. `shape`) are ignored.

Checks, each a clear error naming the file: a missing partner (`_speaker2.*` for a `_speaker1.*`,
`_speaker1.*` for a `_speaker2.*`, and the wav of each npz), a folder, empty, truncated or
undecodable npz or wav (media.py's checks), a clip of 0 frames, NaN or infinite values in motion
or audio, and length mismatches beyond
`LENGTH_TOLERANCE_S` (0.2 s = 5 frames) between the two speakers' motion or between a speaker's
motion and its audio; within the tolerance, every track is cropped to the shortest. Audio at any
other sample rate is resampled to 16 kHz (a log line says so): recordings come at 44.1/48 kHz, and
the rate carries no information the models use.

Training windows (`config.data.clip_frames`, 200 frames = 8 s for DualTalk/TIMAR) are cut by the
pipeline from the whole clips stored here; each window carries its own start frame. (DualTalk's
released loader builds per-chunk metadata in a loop that leaves every chunk of a file pointing at
the file's last chunk, so its training sees one window per file; TIMAR's loader copies it. We do not
reproduce that.)

The 56-d layout is DualTalk's own model input, `concat(exp, pose[:, 3:6], pose[:, 0:3])`:
exp 0:50, jaw 50:53, head pose 53:56 (`to_flame56`). Every conversation gives two records, one per
speaker as "self" (keys `flame56_self/partner`, `audio_self/partner` at 16 kHz, `name`,
`self_speaker` in {1, 2}). The two speakers' tracks are cropped to the shorter one.
"""

from __future__ import annotations

import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from avatar_jax.data.builders import _compat  # noqa: F401  pylint: disable=unused-import

FPS = 25
SAMPLE_RATE = 16000
LENGTH_TOLERANCE_S = 0.2
SPLITS = ("train", "test", "ood")
_SUFFIX = "_speaker1.npz"


def to_flame56(exp: np.ndarray, pose: np.ndarray) -> np.ndarray:
  """DualTalk `exp [T, 50]`, `pose [T, 6]` -> `[T, 56]` = exp 0:50, jaw 50:53, head pose 53:56."""
  return np.concatenate([exp[:, :50], pose[:, 3:6], pose[:, 0:3]], axis=1).astype(np.float32)


def load_speaker_npz(path: str) -> np.ndarray:
  """Reads one `<name>_speakerK.npz` and returns its `[T, 56]` FLAME vector; clear errors."""
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise FileNotFoundError(f"DualTalk motion file not found: {media.display_path(path)}")
  media.expect_file(path, "a DualTalk npz with 'exp' [T, 50] and 'pose' [T, 6]")
  name = media.display_path(path)
  try:
    data = np.load(path)
  except Exception as e:
    raise ValueError(f"{name}: not a readable npz file ({type(e).__name__}: {e}).") from e
  if not isinstance(data, np.lib.npyio.NpzFile):
    raise ValueError(f"{name}: holds a single array, expected an npz archive with 'exp' [T, 50] "
                     "and 'pose' [T, 6].")
  with data:
    arrays = {}
    for key, width in (("exp", 50), ("pose", 6)):
      if key not in data.files:
        raise KeyError(f"{name}: missing key {key!r} (expected 'exp' [T, 50] and 'pose' [T, 6]; "
                       f"found {sorted(data.files)}).")
      try:  # members are read lazily: a cut-off archive fails here, not in np.load
        a = np.asarray(data[key])
      except Exception as e:
        raise ValueError(f"{name}: key {key!r} does not read back ({type(e).__name__}: {e}); a "
                         "truncated or damaged file?") from e
      if a.ndim != 2 or a.shape[1] != width:
        raise ValueError(f"{name}: key {key!r} must have shape [T, {width}], found {a.shape}.")
      if not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name}: key {key!r} has dtype {a.dtype}, expected numbers.")
      if len(a) == 0:
        raise ValueError(f"{name}: key {key!r} has 0 frames; expected a clip of T >= 1 frames.")
      arrays[key] = a
  for key, a in arrays.items():
    if not np.all(np.isfinite(a)):
      bad = np.argwhere(~np.isfinite(a))[0]
      raise ValueError(f"{name}: key {key!r} has non-finite values (first at frame {bad[0]}, "
                       f"column {bad[1]}); fix or drop this clip.")
  if arrays["exp"].shape[0] != arrays["pose"].shape[0]:
    raise ValueError(f"{name}: 'exp' has {arrays['exp'].shape[0]} frames but 'pose' has "
                     f"{arrays['pose'].shape[0]}.")
  return to_flame56(arrays["exp"], arrays["pose"])


def load_conversation(folder: str, name: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Both speakers' ([T_k, 56] motion, [S_k] 16 kHz audio) of conversation `name`, checked:
  partner present, finite, lengths within LENGTH_TOLERANCE_S (see the module docstring)."""
  from avatar_jax.data import features, media  # pylint: disable=g-import-not-at-top
  flame, audio = [], []
  for k in (1, 2):
    stem = os.path.join(folder, f"{name}_speaker{k}")
    shown = media.display_path(stem)   # printable even for non-UTF-8 names
    if not os.path.exists(stem + ".npz"):
      raise FileNotFoundError(f"DualTalk motion file not found: {shown}.npz (the partner of "
                              f"{media.display_path(name)}_speaker{3 - k}.npz; every "
                              "conversation needs both speakers)")
    flame.append(load_speaker_npz(stem + ".npz"))
    if not os.path.exists(stem + ".wav"):
      raise FileNotFoundError(f"DualTalk audio file not found: {shown}.wav")
    a, rate = media.read_audio_with_rate(stem + ".wav")
    if rate != SAMPLE_RATE:
      logging.info("%s.wav: %d Hz, resampled to %d Hz.", shown, rate, SAMPLE_RATE)
      a = features.resample(a, rate, SAMPLE_RATE)
    if not np.all(np.isfinite(a)):
      raise ValueError(f"{shown}.wav: non-finite audio samples; fix or drop this clip.")
    audio.append(a)
  tol = LENGTH_TOLERANCE_S
  if abs(len(flame[0]) - len(flame[1])) > tol * FPS:
    raise ValueError(
        f"{media.display_path(os.path.join(folder, name))}_speaker{{1,2}}.npz: the speakers "
        f"have {len(flame[0])} and "
        f"{len(flame[1])} frames at {FPS} fps, more than {tol} s apart; the tracks are not aligned.")
  for k, (f, a) in enumerate(zip(flame, audio), start=1):
    if abs(len(a) / SAMPLE_RATE - len(f) / FPS) > tol:
      raise ValueError(
          f"{media.display_path(os.path.join(folder, name))}_speaker{k}: motion lasts "
          f"{len(f) / FPS:.2f} s "
          f"({len(f)} frames at {FPS} fps) but audio {len(a) / SAMPLE_RATE:.2f} s, more than "
          f"{tol} s apart.")
  t = min(len(f) for f in flame)
  if len(flame[0]) != len(flame[1]):
    logging.info("%s: speakers have %d and %d frames; cropping to %d.", name,
                 len(flame[0]), len(flame[1]), t)
  # Audio shorter than the motion by less than the tolerance is zero-padded (silence).
  s = t * SAMPLE_RATE // FPS
  audio = [np.pad(a[:s], (0, max(0, s - len(a)))) for a in audio]
  return flame, audio


def conversations(folder: str, *, skip_orphans: bool = False) -> list[str]:
  """Sorted conversation names `<name>` with a `<name>_speaker1.npz` in `folder`.

  A `<name>_speaker2.*` without its `<name>_speaker1.npz` is an error (it would otherwise be
  left out without a word), or with `skip_orphans` a warning.
  """
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  files = os.listdir(folder)
  names = {f[: -len(_SUFFIX)] for f in files if f.endswith(_SUFFIX)}
  for f in sorted(files):
    for ext in (".npz", ".wav"):
      suffix = "_speaker2" + ext
      if f.endswith(suffix) and f[: -len(suffix)] not in names:
        msg = (f"{media.display_path(os.path.join(folder, f))} has no partner "
               f"{media.display_path(f[: -len(suffix)])}{_SUFFIX}; every conversation needs both "
               "speakers.")
        if not skip_orphans:
          raise FileNotFoundError(msg)
        logging.warning("Skipping: %s", msg)
  return sorted(names)


class Builder(tfds.core.GeneratorBasedBuilder):
  """DualTalk conversations: both speakers' FLAME-56 at 25 fps and 16 kHz audio.

  `skip_bad=True` (`build.py --skip_bad`): a conversation that fails a check is left out with a
  warning naming the file and the reason, and each split's log ends with how many were skipped;
  without it the first failure stops the build. Records then keep their conversation's `name`,
  not the position `2n + k - 1`.
  """

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.skip_bad = bool(skip_bad)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Download the DualTalk dataset (https://huggingface.co/datasets/ZiqiaoPeng/DualTalk_Dataset),"
      " unzip it and pass the folder holding train/ test/ (ood/) as --manual_dir."
  )
  disable_shuffling = True  # record 2n + k - 1 = conversation n (sorted names), speaker k as self

  def _info(self) -> tfds.core.DatasetInfo:
    t = tfds.features.Tensor
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=self.disable_shuffling,
        description=(
            "DualTalk dyadic conversations (2505.18096) in the 56-d layout exp 0:50, jaw 50:53, "
            "head pose 53:56; one record per (conversation, speaker as self)."
        ),
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "self_speaker": np.int64,
            "flame56_self": t(shape=(None, 56), dtype=np.float32),
            "flame56_partner": t(shape=(None, 56), dtype=np.float32),
            "audio_self": t(shape=(None,), dtype=np.float32),
            "audio_partner": t(shape=(None,), dtype=np.float32),
            "fps": np.int64,
            "sample_rate": np.int64,
        }),
        homepage="https://github.com/ZiqiaoPeng/DualTalk",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    splits = {
        s: self._generate_examples(os.path.join(root, s))
        for s in SPLITS
        if os.path.isdir(os.path.join(root, s))
    }
    if not splits:
      raise FileNotFoundError(
          f"{root}: expected split folders {SPLITS} holding <name>_speaker{{1,2}}.{{npz,wav}}; "
          f"found {sorted(os.listdir(root)) if os.path.isdir(root) else 'no such folder'}."
      )
    return splits

  def _generate_examples(self, folder: str):
    names = conversations(folder, skip_orphans=self.skip_bad)
    if not names:
      raise FileNotFoundError(f"{folder}: no <name>{_SUFFIX} files.")
    skipped = []
    for n, name in enumerate(names):
      try:
        flame, audio = load_conversation(folder, name)
      except (ValueError, KeyError, FileNotFoundError) as e:
        if not self.skip_bad:
          raise
        logging.warning("Skipping conversation %r of %s: %s", name, folder, e)
        skipped.append(name)
        continue
      t = min(len(f) for f in flame)
      s = t * SAMPLE_RATE // FPS
      for me in (0, 1):
        other = 1 - me
        yield 2 * n + me, {  # integer keys: written in this order (disable_shuffling)
            "name": name,
            "self_speaker": me + 1,
            "flame56_self": flame[me][:t],
            "flame56_partner": flame[other][:t],
            "audio_self": audio[me][:s],
            "audio_partner": audio[other][:s],
            "fps": FPS,
            "sample_rate": SAMPLE_RATE,
        }
    # (Runs once the writer has drained the generator, before the split is finalised.)
    if skipped and len(skipped) == len(names):
      raise ValueError(f"{folder}: every one of its {len(names)} conversations failed a check "
                       "(see the warnings above); nothing to build.")
    if skipped:
      logging.warning("%s: skipped %d of %d conversations (skip_bad): %s", folder, len(skipped),
                      len(names), skipped)
