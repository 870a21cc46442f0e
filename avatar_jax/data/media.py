"""Media I/O: WAV / audio reading with resampling, WAV and PNG writing, H.264+AAC mp4 muxing.

Audio in the project is float32 in [-1, 1], mono `[S]` unless stated (`[S, C]` for multi-channel
writes). Video frames are uint8 `[T, H, W, 3]` RGB. mp4 files are written with PyAV (which bundles
ffmpeg): H.264 (libx264, yuv420p) video, AAC audio.

Readers never return a silently wrong sample: a missing path, a folder, an empty, truncated or
undecodable file, audio with no samples, non-finite samples, more than two channels or a rate
below MIN_SAMPLE_RATE are each a `ValueError` (`FileNotFoundError` when missing) naming the file
and what was expected. File names that are not valid UTF-8 are shown with escapes.
"""

from __future__ import annotations

import fractions
import os
import struct
import warnings
import zlib

from absl import logging
import numpy as np
import scipy.io.wavfile

from avatar_jax.data import features

_WAV_EXTENSIONS = (".wav", ".wave")
# Below this, a "sample rate" is a damaged header rather than audio: speech needs >= 4 kHz.
MIN_SAMPLE_RATE = 4000


def display_path(path) -> str:
  """`path` as printable text: bytes decoded, undecodable (non-UTF-8) bytes as escapes."""
  return os.fsdecode(path).encode("utf-8", "backslashreplace").decode("utf-8")


def expect_file(path, what: str = "a file") -> None:
  """Raises unless `path` is an existing, non-empty file: FileNotFoundError, else ValueError."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"{display_path(path)} does not exist; expected {what}.")
  if os.path.isdir(path):
    raise ValueError(f"{display_path(path)} is a folder; expected {what}.")
  if os.path.getsize(path) == 0:
    raise ValueError(f"{display_path(path)} is empty (0 bytes); expected {what}.")


def _check_audio(audio: np.ndarray, sr: int, path) -> tuple[np.ndarray, int]:
  name = display_path(path)
  if sr < MIN_SAMPLE_RATE:
    raise ValueError(f"{name}: sample rate {sr} Hz; expected audio at >= {MIN_SAMPLE_RATE} Hz "
                     "(typically 16000, 44100 or 48000).")
  if audio.size == 0:
    raise ValueError(f"{name}: has no audio samples; expected at least one.")
  bad = ~np.isfinite(audio)
  if bad.any():
    raise ValueError(f"{name}: {int(bad.sum())} non-finite (NaN/Inf) samples, the first at "
                     f"sample {int(np.argmax(bad.reshape(len(audio), -1).any(axis=1)))}; "
                     "expected finite audio.")
  return audio, sr


# ========================================================================================= audio
def _to_float(audio: np.ndarray, path) -> np.ndarray:
  """PCM of any WAV sample type -> float32 in [-1, 1]."""
  if audio.dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
    return (audio.astype(np.float32) - 128.0) / 128.0
  if audio.dtype == np.int16:
    return audio.astype(np.float32) / 32768.0
  if audio.dtype == np.int32:  # 24-bit WAVs are read left-aligned into int32
    return (audio.astype(np.float64) / 2147483648.0).astype(np.float32)
  if np.issubdtype(audio.dtype, np.floating):
    return audio.astype(np.float32)
  raise ValueError(f"{display_path(path)}: unsupported WAV sample type {audio.dtype}.")


def _to_mono(audio: np.ndarray, path) -> np.ndarray:
  """`[S]` or `[S, C]` with C in {1, 2} -> `[S]`; stereo is averaged."""
  if audio.ndim == 1:
    return audio
  if audio.ndim == 2 and audio.shape[1] in (1, 2):
    return audio.mean(axis=1, dtype=np.float32)
  raise ValueError(
      f"{display_path(path)}: expected mono or stereo audio, found shape {audio.shape} "
      "(samples, channels); downmix it explicitly first."
  )


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """Reads a WAV file as `(float32 [S] mono in [-1, 1], sample_rate)`; stereo is averaged."""
  expect_file(path, "a WAV file")
  name = display_path(path)
  try:
    with warnings.catch_warnings():
      # scipy only warns when the data chunk ends before its declared size (a cut-off file).
      warnings.simplefilter("error", scipy.io.wavfile.WavFileWarning)
      sr, audio = scipy.io.wavfile.read(os.fspath(path))
  except scipy.io.wavfile.WavFileWarning as e:
    raise ValueError(f"{name}: truncated WAV file ({e}); expected the samples its header "
                     "declares.") from e
  except Exception as e:  # scipy raises ValueError / struct.error etc. for damaged files
    raise ValueError(f"{name}: not a readable WAV file ({type(e).__name__}: {e}).") from e
  audio = _to_mono(_to_float(np.asarray(audio), path), path)
  return _check_audio(audio, int(sr), path)


def _read_av_audio(path) -> tuple[np.ndarray, int]:
  import av  # pylint: disable=g-import-not-at-top

  expect_file(path, "an audio or video file with an audio stream")
  name = display_path(path)
  try:
    container = av.open(os.fspath(path))
  except Exception as e:
    raise ValueError(f"{name}: not a readable media file ({type(e).__name__}: {e}).") from e
  with container:
    if not container.streams:
      raise ValueError(f"{name}: no streams found (a truncated or damaged file?); expected an "
                       "audio stream.")
    if not container.streams.audio:
      kinds = sorted({st.type for st in container.streams})
      raise ValueError(f"{name}: has no audio stream (found {kinds}); expected one (is it a "
                       "video without sound, or a file cut short?).")
    stream = container.streams.audio[0]
    try:
      channels, layout, rate = stream.codec_context.channels, stream.layout.name, stream.rate
    except AttributeError as e:   # a stream whose codec parameters were cut off
      raise ValueError(f"{name}: the audio stream has no codec parameters ({e}); a truncated or "
                       "damaged file?") from e
    if channels not in (1, 2):
      raise ValueError(f"{name}: expected a mono or stereo audio stream, found {channels} "
                       "channels.")
    # Decode straight to interleaved-free float planes so every codec gives the same layout.
    chunks = []
    try:
      resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
      for frame in container.decode(stream):
        for out in resampler.resample(frame):
          chunks.append(out.to_ndarray())  # [C, n]
      for out in resampler.resample(None):
        chunks.append(out.to_ndarray())
    except av.error.FFmpegError as e:
      raise ValueError(f"{name}: audio stream fails to decode ({type(e).__name__}: {e}); a "
                       "truncated or damaged file?") from e
    sr = int(stream.rate)
  if not chunks:
    return _check_audio(np.zeros(0, np.float32), sr, path)
  audio = np.concatenate(chunks, axis=1).T  # [S, C]
  return _check_audio(_to_mono(audio.astype(np.float32), path), sr, path)


def read_audio(path: str | os.PathLike, target_sr: int | None = 16000) -> np.ndarray:
  """Reads any audio (WAV via scipy; mp4/m4a/mp3/flac/... via PyAV) as mono float32 `[S]`.

  Resampled to `target_sr` with `features.resample` (None keeps the file's rate; use
  `read_audio_with_rate` to learn it).
  """
  audio, sr = read_audio_with_rate(path)
  if target_sr is not None and sr != target_sr:
    audio = features.resample(audio, sr, target_sr)
  return audio


def read_audio_with_rate(path: str | os.PathLike) -> tuple[np.ndarray, int]:
  """Like `read_audio` without resampling: `(float32 [S] mono, sample_rate)`."""
  expect_file(path, "an audio file")
  if os.fsdecode(path).lower().endswith(_WAV_EXTENSIONS):
    return read_wav(path)
  return _read_av_audio(path)


def write_wav(path: str | os.PathLike, audio: np.ndarray, sample_rate: int = 16000) -> None:
  """Writes float audio `[S]` or `[S, C]` (clipped to [-1, 1]) as 16-bit PCM WAV."""
  audio = np.asarray(audio)
  if audio.ndim not in (1, 2) or not np.issubdtype(audio.dtype, np.floating):
    raise ValueError(
        f"write_wav({path}): expected float audio [S] or [S, C], got {audio.dtype} {audio.shape}."
    )
  pcm = np.round(np.clip(audio, -1.0, 1.0) * 32767.0).astype(np.int16)
  scipy.io.wavfile.write(os.fspath(path), int(sample_rate), pcm)


# ========================================================================================= video
def _check_frames(frames: np.ndarray, name: str = "frames") -> np.ndarray:
  frames = np.asarray(frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(
        f"{name}: expected uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}."
    )
  return frames


def _pad_even(frames: np.ndarray) -> np.ndarray:
  """H.264 in yuv420p needs even height and width: pad one black row/column, never resize."""
  _, h, w, _ = frames.shape
  ph, pw = h % 2, w % 2
  if ph or pw:
    logging.info("Padding %dx%d frames to %dx%d for H.264.", h, w, h + ph, w + pw)
    frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)))
  return frames


def write_mp4(
    path: str | os.PathLike,
    frames: np.ndarray,
    fps: float,
    audio: np.ndarray | None = None,
    sample_rate: int = 16000,
    *,
    crf: int = 18,
) -> None:
  """Writes an H.264 mp4, with an AAC track when `audio` is given.

  Args:
    path: output file.
    frames: uint8 `[T, H, W, 3]` RGB. Odd H or W are padded by one black row/column.
    fps: frames per second (an integer or a float such as 29.97).
    audio: optional float32 `[S]` (mono) or `[S, 2]` (stereo) in [-1, 1] at `sample_rate`.
    sample_rate: audio rate; must be one AAC supports (8 kHz .. 96 kHz, e.g. 16000, 44100).
    crf: x264 constant rate factor (lower = better quality).
  """
  import av  # pylint: disable=g-import-not-at-top

  frames = _pad_even(_check_frames(frames))
  t, h, w, _ = frames.shape
  if t == 0:
    raise ValueError(f"write_mp4({path}): no frames.")
  if audio is not None:
    audio = np.asarray(audio, np.float32)
    if audio.ndim == 2 and audio.shape[1] == 1:
      audio = audio[:, 0]
    if not (audio.ndim == 1 or (audio.ndim == 2 and audio.shape[1] == 2)):
      raise ValueError(
          f"write_mp4({path}): audio must be [S] or [S, 2] (samples, channels), got {audio.shape}."
      )
  rate = fractions.Fraction(fps).limit_denominator(1001)
  with av.open(os.fspath(path), mode="w") as container:
    vstream = container.add_stream("libx264", rate=rate)
    vstream.width, vstream.height = w, h
    vstream.pix_fmt = "yuv420p"
    vstream.options = {"crf": str(crf)}
    astream = None
    if audio is not None:
      layout = "mono" if audio.ndim == 1 else "stereo"
      astream = container.add_stream("aac", rate=int(sample_rate), layout=layout)
    for frame in frames:
      for packet in vstream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
        container.mux(packet)
    for packet in vstream.encode():
      container.mux(packet)
    if astream is not None:
      planar = np.ascontiguousarray(np.clip(audio, -1, 1).reshape(len(audio), -1).T)  # [C, S]
      chunk = 1024  # AAC frame size
      for start in range(0, planar.shape[1], chunk):
        af = av.AudioFrame.from_ndarray(
            np.ascontiguousarray(planar[:, start:start + chunk]), format="fltp", layout=layout
        )
        af.sample_rate = int(sample_rate)
        af.pts = start
        af.time_base = fractions.Fraction(1, int(sample_rate))
        for packet in astream.encode(af):
          container.mux(packet)
      for packet in astream.encode():
        container.mux(packet)


def side_by_side(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """`[T, H, Wa, 3]`, `[T, H', Wb, 3]` -> `[T, max(H, H'), Wa + Wb, 3]` (shorter one padded black)."""
  a, b = _check_frames(a, "a"), _check_frames(b, "b")
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"side_by_side: frame counts differ, a has {a.shape[0]}, b has {b.shape[0]}.")
  h = max(a.shape[1], b.shape[1])
  pad = lambda x: np.pad(x, ((0, 0), (0, h - x.shape[1]), (0, 0), (0, 0)))
  return np.concatenate([pad(a), pad(b)], axis=2)


def frame_strip(frames: np.ndarray, n: int) -> np.ndarray:
  """`n` evenly spaced frames (first and last included) side by side: uint8 `[H, n * W, 3]`."""
  frames = _check_frames(frames)
  if n < 1:
    raise ValueError(f"frame_strip: n must be >= 1, got {n}.")
  idx = np.round(np.linspace(0, len(frames) - 1, n)).astype(int)
  return np.concatenate(list(frames[idx]), axis=1)


def read_image(path: str | os.PathLike, size: int | None = None) -> np.ndarray:
  """An image file (PNG, JPEG, ... anything ffmpeg decodes) as uint8 RGB [H, W, 3]; with `size`,
  centre-cropped to a square and resized to size × size (a face crop for the avatar)."""
  import av  # pylint: disable=g-import-not-at-top
  expect_file(path, "an image file (PNG, JPEG, ...)")
  try:
    with av.open(os.fspath(path)) as container:
      if not container.streams.video:
        raise ValueError("it has no picture")
      frame = next(container.decode(video=0))
  except (av.error.FFmpegError, StopIteration, ValueError) as e:
    raise ValueError(f"read_image: {display_path(path)} is not an image ffmpeg can decode: "
                     f"{e}") from e
  if size is not None:
    side = min(frame.width, frame.height)
    image = frame.to_ndarray(format="rgb24")
    top, left = (frame.height - side) // 2, (frame.width - side) // 2
    square = av.VideoFrame.from_ndarray(
        np.ascontiguousarray(image[top:top + side, left:left + side]), format="rgb24")
    frame = square.reformat(width=int(size), height=int(size), interpolation="AREA")
  return frame.to_ndarray(format="rgb24")


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes uint8 `[H, W, 3]` RGB (or `[H, W]` grey) as an 8-bit PNG."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or not (
      image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
  ):
    raise ValueError(f"write_png({path}): expected uint8 [H, W, 3] or [H, W], got "
                     f"{image.dtype} {image.shape}.")
  h, w = image.shape[:2]
  colour_type = 2 if image.ndim == 3 else 0
  rows = image.reshape(h, -1)
  raw = np.concatenate([np.zeros((h, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 per row

  def chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

  png = (
      b"\x89PNG\r\n\x1a\n"
      + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour_type, 0, 0, 0))
      + chunk(b"IDAT", zlib.compress(raw, 6))
      + chunk(b"IEND", b"")
  )
  with open(os.fspath(path), "wb") as f:
    f.write(png)
