"""TFDS builder `video_folder`: two-person talking videos as ArrayRecord, read without TensorFlow.

    python -m avatar_jax.data.builders.build video_folder/r64 --manual_dir /data/talks \
        --data_dir ~/tensorflow_datasets
    python -m avatar_jax.data.builders.build video_folder/seamless_r64 \
        --manual_dir ~/datasets/seamless_interaction --data_dir ~/tensorflow_datasets

Layouts (`layout` of the config):

  folder    `<manual_dir>/<split>/<conversation>/<speaker>.mp4`, two speakers per conversation,
            each an mp4 with its audio track, or an mp4 plus `<speaker>.wav` (the wav is then the
            speaker's audio). Splits are the folders named in SPLITS that exist; a manual_dir with
            none of them is the single split 'train'.
  seamless  Meta's Seamless Interaction release: files `V<vendor>_S<session>_I<interaction>_P<id>`
            `.mp4` (+ `.wav`, and `.json`/`.npz` metadata, not read), anywhere below a split folder
            (`improvised/train/0000/0005/`, or the `video/` + `audio/` folders of the full tree).
            A conversation is one `V_S_I`; its two `P` files are the two speakers, sorted by id.

Every conversation gives two records, one per speaker as "self" (record 2n + k - 1 is conversation
n, sorted by name, speaker k, speakers sorted by name): `video` / `partner_video` uint8
`[T, R, R, 3]`, `reference_image` (the self video's first frame), `audio_self` / `audio_partner`
float32 `[T * 640]` at 16 kHz mono, `name`, `speaker_self`, `speaker_partner`, `self_speaker`
in {1, 2}, `num_frames` T, `fps` 25, `sample_rate` 16000; T is a multiple of `frame_multiple`
(4: whole Wan VAE latent frames). These are the video keys and rates the SynthDyad source gives
the VAE and video DiT (read them with `config.data.source='tfds'`,
`config.data.tfds.name='video_folder/r64'`).

Resampling: audio of any rate is downmixed to mono and resampled to 16 kHz (`features.resample`);
video of any frame rate is resampled to 25 fps by taking, for each output time k / 25 s, the source
frame with the nearest timestamp (no blending: a dropped or repeated frame, never a ghosted one).
Video and audio are taken to start together.

Face crop (`crop`): talking-head recordings are framed on the face, so 'center' (default) takes the
largest centred square. 'box' takes a square around a per-video box from `<manual_dir>/boxes.json`
(`{"<mp4 path relative to manual_dir, no extension>": [x, y, w, h], ...}` in source pixels) or
`<manual_dir>/boxes.csv` (header `video,x,y,w,h`): write it with any face detector. The box is
grown to a square of side max(w, h) about its centre and shifted to lie inside the frame. The
square is resized to `resolution` px (area filter). 'detect' finds the box itself: the largest
face OpenCV's bundled frontal-face Haar cascade finds in a video's first frame, grown
DETECT_MARGIN times about its centre (the cascade boxes brows to chin; a talking head needs the
hair, jaw and some neck). It needs `pip install 'avatar_jax[video]'` (opencv-python-headless < 5:
OpenCV 5 no longer ships the cascades). The cascade is chosen because it installs from the
package registry with its model inside; it wants near-frontal, well-lit faces, and it does not
find SynthDyad's drawn faces (use 'center' for those).

Checks, each a clear error naming the file: a conversation without exactly two speakers, a wav
without its mp4, an mp4 without an audio stream and no wav, an unreadable, truncated or
frameless mp4 (and media.py's audio checks), and a speaker's video and audio, or the two
speakers' videos, more than LENGTH_TOLERANCE_S apart (within it, every track is cut to the
shortest, audio zero-padded to T * 640 samples). `skip_bad=True` (`build.py --skip_bad`) leaves
such conversations out with a warning and counts them per split, as the dualtalk builder does.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from avatar_jax.data.builders import _compat  # noqa: F401  pylint: disable=unused-import
from avatar_jax.data.builders.dualtalk.dualtalk_dataset_builder import (  # same conventions
    FPS, LENGTH_TOLERANCE_S, SAMPLE_RATE)

SPLITS = ("train", "dev", "test", "ood")
LAYOUTS = ("folder", "seamless")
CROPS = ("center", "box", "detect")
DETECT_MARGIN = 1.6   # crop side / detected face side
_SEAMLESS = re.compile(r"^(V[^_]+_S[^_]+_I[^_]+)_(P[^_.]+)\.mp4$")
_ZLIB = tfds.features.Encoding.ZLIB


@dataclasses.dataclass
class VideoFolderConfig(tfds.core.BuilderConfig):
  """Output frame size, face crop ('center' | 'box' | 'detect'), input layout ('folder' | 'seamless'), and
  the multiple every clip's frame count is cut down to."""

  resolution: int = 64
  crop: str = "center"
  layout: str = "folder"
  # The Wan VAE encodes 4 frames per latent frame and the encode job takes whole clips, so clips
  # end on a multiple of 4 (at most 3 frames, 0.12 s, dropped).
  frame_multiple: int = 4


@dataclasses.dataclass(frozen=True)
class Speaker:
  name: str
  video: str
  wav: str | None  # None: the audio is the mp4's own track


@dataclasses.dataclass(frozen=True)
class Conversation:
  name: str
  speakers: tuple[Speaker, ...]  # sorted by name; a valid conversation has two


# ===================================================================================== discovery
def _folder_conversations(split_dir: str) -> list[Conversation]:
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  convs = []
  for name in sorted(os.listdir(split_dir)):
    folder = os.path.join(split_dir, name)
    if not os.path.isdir(folder):
      continue
    files = os.listdir(folder)
    stems = {f[:-4] for f in files if f.lower().endswith(".mp4")}
    for f in sorted(files):
      if f.lower().endswith(".wav") and f[:-4] not in stems:
        raise FileNotFoundError(f"{media.display_path(os.path.join(folder, f))} has no video "
                                f"{media.display_path(f[:-4])}.mp4 beside it; expected "
                                "<speaker>.mp4 (+ optional <speaker>.wav) per speaker.")
    speakers = []
    for stem in sorted(stems):
      mp4 = next(os.path.join(folder, f) for f in files if f[:-4] == stem
                 and f.lower().endswith(".mp4"))
      wav = os.path.join(folder, stem + ".wav")
      speakers.append(Speaker(stem, mp4, wav if os.path.exists(wav) else None))
    convs.append(Conversation(name, tuple(speakers)))
  return convs


def _seamless_wav(mp4: str) -> str | None:
  """The participant's wav: beside the mp4, or in the `audio/` sibling of a `video/` folder."""
  stem = os.path.splitext(mp4)[0]
  folder, base = os.path.split(stem)
  candidates = [stem + ".wav"]
  if os.path.basename(folder) == "video":
    candidates.append(os.path.join(os.path.dirname(folder), "audio", base + ".wav"))
  return next((c for c in candidates if os.path.exists(c)), None)


def _seamless_conversations(root: str) -> dict[str, list[Conversation]]:
  groups: dict[str, dict[str, list[Speaker]]] = {}
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    parts = os.path.relpath(dirpath, root).split(os.sep)
    split = next((p for p in parts if p in SPLITS), None)
    if split is None:
      continue
    for f in sorted(filenames):
      m = _SEAMLESS.match(f)
      if m:
        mp4 = os.path.join(dirpath, f)
        groups.setdefault(split, {}).setdefault(m.group(1), []).append(
            Speaker(m.group(2), mp4, _seamless_wav(mp4)))
  return {split: [Conversation(n, tuple(sorted(s, key=lambda x: x.name)))
                  for n, s in sorted(convs.items())]
          for split, convs in groups.items()}


def discover(root: str, layout: str = "folder") -> dict[str, list[Conversation]]:
  """{split: conversations sorted by name} under `root` (see the module docstring)."""
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  if layout not in LAYOUTS:
    raise ValueError(f"video_folder layout must be one of {LAYOUTS}, got {layout!r}.")
  if not os.path.isdir(root):
    raise FileNotFoundError(f"{media.display_path(root)}: no such folder; expected the "
                            f"{layout!r} layout of talking videos (--manual_dir).")
  if layout == "seamless":
    found = _seamless_conversations(root)
    what = "V*_S*_I*_P*.mp4 files below a train/dev/test folder"
  else:
    present = [s for s in SPLITS if os.path.isdir(os.path.join(root, s))]
    found = {s: _folder_conversations(os.path.join(root, s)) for s in present}
    if not present:  # a plain folder of conversations
      found = {"train": _folder_conversations(root)}
    what = "<split>/<conversation>/<speaker>.mp4 (or <conversation>/<speaker>.mp4)"
  found = {s: c for s, c in found.items() if c}
  if not found:
    raise FileNotFoundError(f"{media.display_path(root)}: found no conversations; expected "
                            f"{what}.")
  return found


def check_pair(conv: Conversation, where: str) -> None:
  """Raises unless `conv` has exactly two speakers."""
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  if len(conv.speakers) != 2:
    files = [media.display_path(s.video) for s in conv.speakers]
    raise FileNotFoundError(
        f"{media.display_path(where)}: conversation {media.display_path(conv.name)!r} has "
        f"{len(conv.speakers)} speaker video(s) {files}; expected exactly two (speaker and "
        "partner).")


# ========================================================================================= boxes
def load_boxes(root: str) -> dict[str, tuple[float, float, float, float]]:
  """`<root>/boxes.json` or `<root>/boxes.csv` as {video key: (x, y, w, h)} (module docstring)."""
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  expected = ('boxes.json {"<video path relative to manual_dir, no .mp4>": [x, y, w, h]} or '
              "boxes.csv with header video,x,y,w,h")
  path_json, path_csv = os.path.join(root, "boxes.json"), os.path.join(root, "boxes.csv")
  if os.path.exists(path_json):
    path = path_json
    try:
      with open(path_json, encoding="utf-8") as f:
        rows = json.load(f)
    except (OSError, ValueError) as e:
      raise ValueError(f"{media.display_path(path)}: not readable JSON ({e}); expected "
                       f"{expected}.") from e
    if not isinstance(rows, dict):
      raise ValueError(f"{media.display_path(path)}: holds a {type(rows).__name__}; expected "
                       f"{expected}.")
    rows = list(rows.items())
  elif os.path.exists(path_csv):
    path = path_csv
    with open(path_csv, encoding="utf-8", newline="") as f:
      reader = csv.DictReader(f)
      if reader.fieldnames is None or not {"video", "x", "y", "w", "h"} <= set(reader.fieldnames):
        raise ValueError(f"{media.display_path(path)}: header {reader.fieldnames}; expected "
                         f"{expected}.")
      rows = [(r["video"], [r["x"], r["y"], r["w"], r["h"]]) for r in reader]
  else:
    raise FileNotFoundError(f"crop='box' needs {expected}, in {media.display_path(root)}; "
                            "found neither.")
  boxes = {}
  for key, box in rows:
    try:
      x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError) as e:
      raise ValueError(f"{media.display_path(path)}: entry {key!r} is {box!r}; expected four "
                       "numbers x, y, w, h.") from e
    if w <= 0 or h <= 0:
      raise ValueError(f"{media.display_path(path)}: entry {key!r} has size {w} x {h}; expected "
                       "a positive width and height.")
    boxes[os.path.normpath(key)] = (x, y, w, h)
  return boxes


def box_key(root: str, video: str) -> str:
  """The key of `video` in a boxes file: its path relative to `root` without the extension."""
  return os.path.normpath(os.path.splitext(os.path.relpath(video, root))[0])


def square(height: int, width: int, box=None) -> tuple[int, int, int]:
  """(top, left, side) of the crop: the centred square, or `box` (x, y, w, h) grown to a square
  about its centre and shifted inside the frame."""
  if box is None:
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side
  x, y, w, h = box
  side = int(round(min(max(w, h), height, width)))
  left = int(round(x + w / 2 - side / 2))
  top = int(round(y + h / 2 - side / 2))
  return min(max(top, 0), height - side), min(max(left, 0), width - side), side


def detect_face(image: np.ndarray, where: str) -> tuple[float, float, float, float]:
  """(x, y, w, h) of the largest frontal face in an RGB frame [H, W, 3] (OpenCV's bundled Haar
  cascade), grown DETECT_MARGIN times about its centre."""
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("crop='detect' needs OpenCV's face cascades: pip install "
                      "'avatar_jax[video]' (opencv-python-headless < 5)") from e
  if not hasattr(cv2, "CascadeClassifier"):
    raise ImportError(f"crop='detect': OpenCV {cv2.__version__} has no CascadeClassifier (OpenCV "
                      "5 dropped it); pip install 'opencv-python-headless<5'")
  cascade = cv2.CascadeClassifier(
      os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_default.xml"))
  gray = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2GRAY)
  faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
  if len(faces) == 0:
    raise ValueError(f"{where}: OpenCV's frontal-face cascade finds no face in the first frame "
                     f"({image.shape[1]}x{image.shape[0]}); give boxes from your own detector "
                     "(crop='box') or use crop='center'.")
  x, y, w, h = (float(v) for v in max(faces, key=lambda f: f[2] * f[3]))
  m = DETECT_MARGIN
  return x + w / 2 - m * w / 2, y + h / 2 - m * h / 2, m * w, m * h


# ========================================================================================= video
def read_video(path: str, resolution: int, *, box=None, detect: bool = False,
               fps: int = FPS) -> np.ndarray:
  """Frames of `path` at `fps` (nearest source timestamp), cropped (`square` of `box`, or of the
  face `detect_face` finds in the first frame) and resized: uint8 `[T, resolution, resolution,
  3]`."""
  import av  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top

  media.expect_file(path, "an mp4 video")
  name = media.display_path(path)
  try:
    container = av.open(os.fspath(path))
  except Exception as e:
    raise ValueError(f"{name}: not a readable video file ({type(e).__name__}: {e}); a truncated "
                     "or damaged mp4?") from e
  out: list[np.ndarray] = []
  crop = None

  def take(frame):
    nonlocal crop
    image = frame.to_ndarray(format="rgb24")
    if crop is None:
      crop = square(image.shape[0], image.shape[1], detect_face(image, name) if detect else box)
    top, left, side = crop
    image = np.ascontiguousarray(image[top:top + side, left:left + side])
    if side != resolution:
      image = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
          width=resolution, height=resolution, interpolation="AREA").to_ndarray(format="rgb24")
    out.append(image)

  with container:
    if not container.streams.video:
      kinds = sorted({st.type for st in container.streams})
      raise ValueError(f"{name}: has no video stream (found {kinds or 'no streams'}); expected "
                       "an mp4 with video.")
    stream = container.streams.video[0]
    rate = float(stream.average_rate or stream.guessed_rate or 0)
    k, t0, prev, prev_t, step = 0, None, None, 0.0, 0.0
    try:
      for frame in container.decode(stream):
        if frame.time is None:
          raise ValueError(f"{name}: a video frame without a timestamp; cannot resample to "
                           f"{fps} fps.")
        t0 = frame.time if t0 is None else t0
        t = frame.time - t0
        # Output times before this frame go to whichever of (previous, this) is nearer.
        while prev is not None and k / fps < t - 1e-6:
          take(prev if k / fps - prev_t <= t - k / fps else frame)
          k += 1
        if prev is not None:
          step = t - prev_t
        prev, prev_t = frame, t
    except av.error.FFmpegError as e:
      raise ValueError(f"{name}: video stream fails to decode ({type(e).__name__}: {e}); a "
                       "truncated or damaged file?") from e
    if prev is None:
      raise ValueError(f"{name}: no decodable video frames; expected a clip of >= 1 frame (a "
                       "truncated or damaged file?).")
    # The last frame lasts one frame period.
    end = prev_t + (1.0 / rate if rate > 0 else step or 1.0 / fps)
    while k / fps < end - 1e-6:
      take(prev)
      k += 1
  return np.stack(out)


def read_speaker_audio(speaker: Speaker) -> np.ndarray:
  """The speaker's audio at 16 kHz mono: the wav if given, else the mp4's audio track."""
  from avatar_jax.data import features, media  # pylint: disable=g-import-not-at-top
  if speaker.wav is None:
    try:
      audio, rate = media.read_audio_with_rate(speaker.video)
    except ValueError as e:
      if "has no audio stream" not in str(e):
        raise
      raise ValueError(f"{e} No {media.display_path(os.path.splitext(speaker.video)[0])}.wav "
                       "beside it either; expected the speaker's audio in one of them.") from e
  else:
    audio, rate = media.read_audio_with_rate(speaker.wav)
  if rate != SAMPLE_RATE:
    audio = features.resample(audio, rate, SAMPLE_RATE)
  return audio.astype(np.float32)


def load_conversation(conv: Conversation, resolution: int, *, boxes=None, detect: bool = False,
                      root: str = "", frame_multiple: int = 1
                      ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Both speakers' (`[T, R, R, 3]` video, `[T * 640]` audio), checked and cut to the shortest
  length, rounded down to a multiple of `frame_multiple` frames."""
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  check_pair(conv, os.path.dirname(conv.speakers[0].video) if conv.speakers else conv.name)
  videos, audios = [], []
  for s in conv.speakers:
    box = None
    if boxes is not None:
      key = box_key(root, s.video)
      if key not in boxes:
        raise KeyError(f"{media.display_path(s.video)}: no face box {key!r} in the boxes file "
                       f"of {media.display_path(root)} (crop='box'); it has {len(boxes)} "
                       "entries.")
      box = boxes[key]
    videos.append(read_video(s.video, resolution, box=box, detect=detect))
    audios.append(read_speaker_audio(s))
    seconds = (len(videos[-1]) / FPS, len(audios[-1]) / SAMPLE_RATE)
    if abs(seconds[0] - seconds[1]) > LENGTH_TOLERANCE_S:
      raise ValueError(f"{media.display_path(s.wav or s.video)}: audio lasts {seconds[1]:.2f} s "
                       f"but the video {media.display_path(s.video)} {seconds[0]:.2f} s, more "
                       f"than {LENGTH_TOLERANCE_S} s apart; they are not aligned.")
  lengths = [len(v) for v in videos]
  if abs(lengths[0] - lengths[1]) > LENGTH_TOLERANCE_S * FPS:
    raise ValueError(f"{media.display_path(conv.speakers[0].video)} and "
                     f"{media.display_path(conv.speakers[1].video)}: {lengths[0]} and "
                     f"{lengths[1]} frames at {FPS} fps, more than {LENGTH_TOLERANCE_S} s apart; "
                     "the two speakers are not aligned.")
  t = min(lengths) // frame_multiple * frame_multiple
  if t == 0:
    raise ValueError(f"{media.display_path(conv.speakers[0].video)}: {min(lengths)} frames at "
                     f"{FPS} fps; expected at least {frame_multiple} (frame_multiple).")
  s = t * SAMPLE_RATE // FPS
  return ([v[:t] for v in videos], [np.pad(a[:s], (0, max(0, s - len(a)))) for a in audios])


# ======================================================================================= builder
def _config(name, description, **kw):
  return VideoFolderConfig(name=name, description=description, **kw)


class Builder(tfds.core.GeneratorBasedBuilder):
  """Two-person talking videos: both speakers' face crops at 25 fps and 16 kHz audio.

  `skip_bad=True`: a conversation failing a check is left out with a warning (counted per split)
  instead of stopping the build; records then keep their conversation's `name`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      _config("r64", "64x64 centre crops, folder layout."),
      _config("r128", "128x128 centre crops, folder layout.", resolution=128),
      _config("r256", "256x256 centre crops, folder layout.", resolution=256),
      _config("seamless_r64", "64x64 centre crops, Seamless Interaction layout.",
              layout="seamless"),
      _config("seamless_r128", "128x128 centre crops, Seamless Interaction layout.",
              resolution=128, layout="seamless"),
  ]
  DEFAULT_CONFIG_NAME = "r64"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the folder of talking videos as --manual_dir: <split>/<conversation>/<speaker>.mp4 "
      "(+ <speaker>.wav), or a Seamless Interaction download for the seamless_* configs."
  )
  disable_shuffling = True  # record 2n + k - 1 = conversation n, speaker k as self

  def __init__(self, *, skip_bad: bool = False, **kwargs):
    super().__init__(**kwargs)
    self.skip_bad = bool(skip_bad)
    cfg = self.builder_config
    if cfg.crop not in CROPS:
      raise ValueError(f"video_folder crop must be one of {CROPS}, got {cfg.crop!r}.")
    if cfg.layout not in LAYOUTS:
      raise ValueError(f"video_folder layout must be one of {LAYOUTS}, got {cfg.layout!r}.")
    if cfg.frame_multiple < 1 or cfg.resolution < 1:
      raise ValueError(f"video_folder frame_multiple and resolution must be >= 1, got "
                       f"{cfg.frame_multiple} and {cfg.resolution}.")

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.resolution
    t = tfds.features.Tensor
    return tfds.core.DatasetInfo(
        builder=self,
        disable_shuffling=self.disable_shuffling,
        description=("Two-person talking videos, face-cropped, 25 fps, 16 kHz mono; one record "
                     "per (conversation, speaker as self)."),
        features=tfds.features.FeaturesDict({
            "name": tfds.features.Text(),
            "speaker_self": tfds.features.Text(),
            "speaker_partner": tfds.features.Text(),
            "self_speaker": np.int64,
            "video": t(shape=(None, r, r, 3), dtype=np.uint8, encoding=_ZLIB),
            "partner_video": t(shape=(None, r, r, 3), dtype=np.uint8, encoding=_ZLIB),
            "reference_image": t(shape=(r, r, 3), dtype=np.uint8, encoding=_ZLIB),
            "audio_self": t(shape=(None,), dtype=np.float32),
            "audio_partner": t(shape=(None,), dtype=np.float32),
            "num_frames": np.int64,  # T, readable while the videos stay undecoded
            "fps": np.int64,
            "sample_rate": np.int64,
        }),
        homepage="https://github.com/avatar-jax/avatar_jax/blob/main/docs/data.md",
    )

  def _split_generators(self, dl_manager):
    root = os.fspath(dl_manager.manual_dir)
    cfg = self.builder_config
    found = discover(root, cfg.layout)
    boxes = load_boxes(root) if cfg.crop == "box" else None
    return {s: self._generate_examples(root, s, convs, boxes) for s, convs in found.items()}

  def _generate_examples(self, root, split, convs, boxes):
    from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    skipped = []
    for n, conv in enumerate(tqdm.tqdm(convs, desc=f"video_folder {split}", unit="conv")):
      try:
        videos, audios = load_conversation(conv, self.builder_config.resolution, boxes=boxes,
                                           detect=self.builder_config.crop == "detect",
                                           root=root,
                                           frame_multiple=self.builder_config.frame_multiple)
      except (ValueError, KeyError, FileNotFoundError) as e:
        if not self.skip_bad:
          raise
        logging.warning("Skipping conversation %r of %s: %s", media.display_path(conv.name),
                        split, e)
        skipped.append(conv.name)
        continue
      for me in (0, 1):
        other = 1 - me
        yield 2 * n + me, {
            "name": conv.name,
            "speaker_self": conv.speakers[me].name,
            "speaker_partner": conv.speakers[other].name,
            "self_speaker": me + 1,
            "video": videos[me],
            "partner_video": videos[other],
            "reference_image": videos[me][0],
            "audio_self": audios[me],
            "audio_partner": audios[other],
            "num_frames": len(videos[me]),
            "fps": FPS,
            "sample_rate": SAMPLE_RATE,
        }
    if skipped and len(skipped) == len(convs):
      raise ValueError(f"{media.display_path(root)} split {split!r}: every one of its "
                       f"{len(convs)} conversations failed a check (see the warnings above); "
                       "nothing to build.")
    if skipped:
      logging.warning("%s split %s: skipped %d of %d conversations (skip_bad): %s",
                      media.display_path(root), split, len(skipped), len(convs), skipped)
