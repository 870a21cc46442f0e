"""Live web demo of the streaming avatar: the browser's microphone is the user (the partner), the
avatar answers on a canvas.

    python -m avatar_jax.serve --workdir runs/forcing [--host 127.0.0.1 --port 8000]

then open http://127.0.0.1:8000/. One HTTP + websocket server (the `websockets` package):

  GET /          the page (avatar_jax/web/index.html) and its AudioWorklet (web/capture.js)
  WS  /ws        one conversation, one `stream.DuplexAgent`

Protocol on /ws (all numbers little-endian):
  server -> page  text  {"type": "hello", sample_rate, fps, block, lookahead_ms, height, width}
  page -> server  bytes float32 [2n]: n samples of the avatar's own voice, then n of the user's,
                        both at `sample_rate` (the page resamples in its AudioWorklet)
  server -> page  bytes one frame: uint32 frame, uint32 sample, uint32 ready_sample,
                        uint16 height, uint16 width, then raw RGB [height, width, 3]
                        (`sample` = the audio sample the frame shows, frame * samples per frame;
                        `ready_sample` = the sample whose arrival released the frame's block)
  page -> server  text  {"type": "end"}: the agent closes, the last frames follow
  server -> page  text  {"type": "done", frames, compute_ms_median, since_audio_ms_median}

Raw RGB keeps latency and CPU low at the renderer's size (64x64: 12 KB a frame, 300 KB/s at
25 fps over loopback) and lets the page draw exactly the pixels the renderer made.
"""
from __future__ import annotations

import asyncio
import copy
import http
import importlib.resources
import json
import os
import signal
import struct

import numpy as np
from absl import app, flags, logging

_FRAME_HEADER = struct.Struct("<IIIHH")
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/index.html": ("index.html", "text/html; charset=utf-8"),
           "/capture.js": ("capture.js", "text/javascript; charset=utf-8")}


def encode_frame(frame: np.ndarray, index: int, sample: int, ready_sample: int) -> bytes:
  """One frame message: the header, then the uint8 RGB pixels [H, W, 3]."""
  if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
    raise ValueError(f"encode_frame: expected uint8 [H, W, 3], got {frame.dtype} {frame.shape}")
  h, w, _ = frame.shape
  return _FRAME_HEADER.pack(index, sample, ready_sample, h, w) + frame.tobytes()


def decode_frame(message: bytes) -> tuple[dict, np.ndarray]:
  """Inverse of `encode_frame`: ({frame, sample, ready_sample}, uint8 [H, W, 3])."""
  index, sample, ready, h, w = _FRAME_HEADER.unpack_from(message)
  pixels = np.frombuffer(message, np.uint8, offset=_FRAME_HEADER.size)
  if pixels.size != h * w * 3:
    raise ValueError(f"frame message: header says {h}x{w}x3 = {h * w * 3} bytes of pixels, "
                     f"found {pixels.size}")
  return dict(frame=index, sample=sample, ready_sample=ready), pixels.reshape(h, w, 3)


def split_audio(message: bytes) -> tuple[np.ndarray, np.ndarray]:
  """An audio message (float32 [2n]: own voice, then the user's) -> (self [n], partner [n])."""
  if len(message) % 8:
    raise ValueError(f"audio message: expected float32 [2n] (a multiple of 8 bytes: n own-voice "
                     f"samples, then n of the user's), found {len(message)} bytes")
  audio = np.frombuffer(message, "<f4")
  n = len(audio) // 2
  return audio[:n], audio[n:]


def _message_type(text: str) -> str | None:
  try:
    message = json.loads(text)
  except ValueError:
    return None
  return message.get("type") if isinstance(message, dict) else None


class Server:
  """Serves the page and one conversation per websocket, every one with its own agent."""

  def __init__(self, agent, *, record_dir: str | None = None):
    # `agent` is the template: each connection gets a shallow copy with its own buffers and
    # caches (`reset`), sharing the model and the compiled block step (compiled once, here).
    self.template = agent
    self.record_dir = record_dir
    self.connections = 0
    self._warm_up()

  def _warm_up(self):
    """Compiles the block step before the first user waits for it."""
    silence = np.zeros(self.template.spf * (self.template.block + self.template.lookahead + 2),
                       np.float32)
    self.template.push(silence, silence)
    self.template.close()
    self.template.reset()

  def hello(self) -> dict:
    a = self.template
    h = w = int(a.config.data.synthdyad.resolution)   # the renderer's square frames
    lookahead_ms = 1e3 * (a.lookahead / a.facts["fps"] +
                          (a.mel_cfg.n_fft // 2 - a.hop // 2) / a.facts["sample_rate"])
    return dict(type="hello", sample_rate=a.facts["sample_rate"], fps=a.facts["fps"],
                block=a.block, lookahead_ms=lookahead_ms, height=h, width=w)

  def process_request(self, connection, request):
    """Plain HTTP for the page's files; None lets /ws go on to the websocket handshake."""
    from websockets.datastructures import Headers  # pylint: disable=g-import-not-at-top
    from websockets.http11 import Response  # pylint: disable=g-import-not-at-top
    path = request.path.split("?", 1)[0]
    if path == "/ws":
      return None
    if path not in _STATIC:
      return connection.respond(http.HTTPStatus.NOT_FOUND, f"not found: {path}\n")
    name, kind = _STATIC[path]
    body = importlib.resources.files("avatar_jax").joinpath("web", name).read_bytes()
    headers = Headers([("Content-Type", kind), ("Content-Length", str(len(body))),
                       ("Cache-Control", "no-store")])
    return Response(200, "OK", headers, body)

  async def converse(self, ws):
    """One conversation: audio in, frames out, until the page sends "end" or goes away."""
    import websockets  # pylint: disable=g-import-not-at-top
    self.connections += 1
    number = self.connections
    agent = copy.copy(self.template)
    agent.reset()
    received = {"self": [], "partner": []}
    sent = 0

    async def send(frames):
      nonlocal sent
      # All frames of this push were released by the last sample received so far.
      ready = min(agent.received.values())
      for frame in frames:
        await ws.send(encode_frame(frame, sent, sent * agent.spf, ready))
        sent += 1

    logging.info("conversation %d: %s", number, ws.remote_address)
    try:
      await ws.send(json.dumps(self.hello()))
      async for message in ws:
        if isinstance(message, str):
          if _message_type(message) == "end":
            break
          logging.warning("conversation %d: unknown message %r", number, message[:80])
          await ws.close(1003, 'text messages: expected {"type": "end"}')
          return
        try:
          mine, theirs = split_audio(message)
        except ValueError as e:
          logging.warning("conversation %d: %s", number, e)
          await ws.close(1003, str(e)[:120])   # 1003: data the endpoint cannot accept
          return
        if self.record_dir:
          received["self"].append(mine)
          received["partner"].append(theirs)
        # Generation and rendering take milliseconds of CPU: off the event loop, so other
        # conversations and the socket keep going.
        await send(await asyncio.to_thread(agent.push, mine, theirs))
      await send(await asyncio.to_thread(agent.close))
      lat = agent.latency[:-1] or agent.latency   # the closing block waits for "end", not audio
      await ws.send(json.dumps(dict(
          type="done", frames=sent,
          compute_ms_median=float(np.median([x["compute_ms"] for x in lat])) if lat else None,
          since_audio_ms_median=float(np.median([x["since_audio_ms"] for x in lat]))
          if lat else None)))
    except websockets.ConnectionClosed:
      logging.info("conversation %d: the page went away", number)
    finally:
      logging.info("conversation %d: %d frames", number, sent)
      if self.record_dir:
        self._record(number, received)

  def _record(self, number: int, received: dict):
    os.makedirs(self.record_dir, exist_ok=True)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, np.float32)
    path = os.path.join(self.record_dir, f"conversation_{number:04d}.npz")
    np.savez(path, self_audio=cat(received["self"]), partner_audio=cat(received["partner"]))
    logging.info("conversation %d: audio recorded to %s", number, path)

  async def run(self, host: str, port: int, ready=None):
    """Serves until SIGINT/SIGTERM; then closes every conversation (1001 going away)."""
    from websockets.asyncio.server import serve  # pylint: disable=g-import-not-at-top
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
      loop.add_signal_handler(sig, stop.set)
    # Frames go out uncompressed: raw pixels barely compress and deflate would add latency.
    async with serve(self.converse, host, port, process_request=self.process_request,
                     compression=None, max_size=2 ** 22) as server:
      bound = server.sockets[0].getsockname()
      url = f"http://{bound[0]}:{bound[1]}/"
      if ready is not None:
        ready(url)
      await stop.wait()
      logging.info("shutting down")
    return url


# ============================================================================== command line
def _define_flags():
  global _WORKDIR, _HOST, _PORT, _SEED, _RECORD
  _WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir of a streaming model "
                                 "(e.g. configs/forcing.py).")
  _HOST = flags.DEFINE_string("host", "127.0.0.1", "Interface to listen on.")
  _PORT = flags.DEFINE_integer("port", 8000, "Port (0: any free one; the URL is printed).")
  _SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
  _RECORD = flags.DEFINE_string("record_dir", None, "Save each conversation's received audio "
                                "here (conversation_NNNN.npz: self_audio, partner_audio).")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from avatar_jax import stream  # pylint: disable=g-import-not-at-top
  agent = stream.DuplexAgent.from_workdir(_WORKDIR.value, rng=jax.random.key(_SEED.value))
  server = Server(agent, record_dir=_RECORD.value)
  # The URL on stdout is the one line scripts wait for (the port may have been 0).
  asyncio.run(server.run(_HOST.value, _PORT.value, ready=lambda url: print(url, flush=True)))


def run():
  _define_flags()
  flags.mark_flags_as_required(["workdir"])
  app.run(main)


if __name__ == "__main__":
  run()
