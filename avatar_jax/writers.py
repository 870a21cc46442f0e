"""Metric writers and progress reporting, with or without TensorFlow.

CLU's `metric_writers` and `periodic_actions` import TensorFlow at import time. Where TensorFlow
is installed we use them unchanged; everywhere else (a lean install, GPU images without TF) we
use the equivalents below: TensorBoard event files through tensorboardX plus the absl log, and a
progress reporter with steps/s and ETA. The trainer makes the same calls either way:

    writer = writers.create(workdir)            # .write_scalars/.write_images/.write_videos/.write_texts
    progress = writers.progress(num_steps, writer)
    progress(step)                              # each step
"""
from __future__ import annotations

import io
import os
import sys
import time

import numpy as np
from absl import logging


def _tensorflow_available() -> bool:
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    return True
  except ImportError:
    return False


class LogWriter:
  """Writes scalars (and the names/shapes of images and videos) to the absl log."""

  def write_scalars(self, step, scalars):
    logging.info("[%d] %s", step, ", ".join(f"{k}={float(v):.6g}" for k, v in sorted(scalars.items())))

  def write_images(self, step, images):
    logging.info("[%d] images: %s", step, {k: np.shape(v) for k, v in images.items()})

  def write_videos(self, step, videos):
    logging.info("[%d] videos: %s", step, {k: np.shape(v) for k, v in videos.items()})

  def write_texts(self, step, texts):
    for k, v in texts.items():
      logging.info("[%d] %s:\n%s", step, k, v)

  def write_hparams(self, hparams):
    logging.info("hparams: %s", hparams)

  def flush(self):
    pass

  def close(self):
    pass


def _gif_bytes(frames: np.ndarray, fps: float) -> bytes:
  """Animated GIF of uint8 [T, H, W, 3] frames (TensorBoard shows it in the Images tab)."""
  import av  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  with av.open(buf, mode="w", format="gif") as out:
    stream = out.add_stream("gif", rate=int(round(fps)))
    stream.width, stream.height = frames.shape[2], frames.shape[1]
    stream.pix_fmt = "rgb8"
    for f in frames:
      for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  return buf.getvalue()


class TensorBoardXWriter:
  """TensorBoard event files without TensorFlow (tensorboardX)."""

  def __init__(self, logdir: str, video_fps: float = 25.0):
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._w = SummaryWriter(logdir)
    self._fps = video_fps

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self._w.add_scalar(k, float(v), step)

  def write_images(self, step, images):
    for k, v in images.items():
      v = np.asarray(v)
      self._w.add_images(k, v if v.ndim == 4 else v[None], step, dataformats="NHWC")

  def write_videos(self, step, videos):
    from tensorboardX.proto.summary_pb2 import Summary  # pylint: disable=g-import-not-at-top
    for k, v in videos.items():
      v = np.asarray(v)
      img = Summary.Image(height=v.shape[1], width=v.shape[2], colorspace=3,
                          encoded_image_string=_gif_bytes(v, self._fps))
      self._w._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=k, image=img)]), step)

  def write_texts(self, step, texts):
    for k, v in texts.items():
      self._w.add_text(k, v, step)

  def write_hparams(self, hparams):
    self._w.add_text("hparams", "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items())), 0)

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


class MultiWriter:
  def __init__(self, writers):
    self._writers = list(writers)

  def __getattr__(self, name):
    def call(*args, **kwargs):
      for w in self._writers:
        getattr(w, name)(*args, **kwargs)
    return call


def create(logdir: str, *, just_logging: bool = False, video_fps: float = 25.0):
  """A writer to TensorBoard (+ log); only the log on non-zero processes or if asked."""
  if _tensorflow_available():
    from clu import metric_writers  # pylint: disable=g-import-not-at-top
    return metric_writers.create_default_writer(logdir, just_logging=just_logging)
  if just_logging:
    return LogWriter()
  os.makedirs(logdir, exist_ok=True)
  return MultiWriter([LogWriter(), TensorBoardXWriter(logdir, video_fps)])


class Progress:
  """Steps/s and ETA to the writer and log (CLU ReportProgress semantics), plus a terminal bar."""

  def __init__(self, num_train_steps: int, writer=None, every_secs: float = 30.0,
               first_step: int = 0, bar: bool = True):
    self.num_train_steps, self.writer, self.every_secs = num_train_steps, writer, every_secs
    self._t0, self._s0 = time.monotonic(), first_step
    self._last = self._t0
    self._bar = None
    if bar:
      from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=num_train_steps, initial=first_step, file=sys.stderr,
                       desc="train", dynamic_ncols=True, mininterval=1.0)

  def __call__(self, step: int):
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
    now = time.monotonic()
    if now - self._last < self.every_secs and step < self.num_train_steps:
      return
    self._last = now
    rate = (step - self._s0) / max(now - self._t0, 1e-9)
    eta = (self.num_train_steps - step) / max(rate, 1e-9)
    logging.info("step %d/%d: %.2f steps/s, ETA %.0f s", step, self.num_train_steps, rate, eta)
    if self.writer is not None:
      self.writer.write_scalars(step, {"steps_per_sec": rate})

  def close(self):
    if self._bar is not None:
      self._bar.close()


def progress(num_train_steps: int, writer=None, *, first_step: int = 0, every_secs: float = 30.0,
             bar: bool = True):
  """CLU's ReportProgress where TensorFlow exists, else `Progress` (same call: `progress(step)`)."""
  if _tensorflow_available() and not bar:
    from clu import periodic_actions  # pylint: disable=g-import-not-at-top
    return periodic_actions.ReportProgress(num_train_steps=num_train_steps, writer=writer,
                                           every_secs=every_secs)
  return Progress(num_train_steps, writer, every_secs=every_secs, first_step=first_step, bar=bar)
