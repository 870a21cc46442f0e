"""Face reader: a small CNN that reads SynthDyad motion coefficients back from rendered frames.

It is the evaluation network of SynthDyad (SYNTHDYAD.md §6): video models are scored by reading
coefficients from their generated frames and running the coefficient metrics, and its
penultimate features give FD-face (per frame) and FVD-face (per clip).

Input per frame: the frame and the identity's neutral reference image (both uint8 [H, W, 3]),
stacked to 6 channels — the reference tells the network the identity's mouth width, eye
spacing and face shape, so absolute coefficients are read as differences from neutral.
Frames of another resolution are resized (antialiased) to `config.resolution`.

Trained by the project's trainer (`configs/face_reader.py`); at the end of training its
`evaluate` measures R^2 per channel on unseen test identities and exports a small
self-contained checkpoint (`params.npz` + `config.json` + `accuracy.json`), the format
`load_face_reader()` reads. The shipped one is under `avatar_jax/evals/assets/face_reader/`.
"""
from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from avatar_jax import system as system_lib
from avatar_jax.models.layers import dense, logical

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "evals", "assets",
                         "face_reader")
# Channels whose read-back accuracy the benchmark requires (SYNTHDYAD.md §6: R^2 >= 0.98).
REQUIRED_R2 = {"jaw_open": 0.98, "smile": 0.98, "head_pitch": 0.98}


def default_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name="face_reader",
      resolution=64,
      channels=10,              # the SynthDyad contract channels, in generator order
      widths=(32, 64, 64, 128, 128, 128),
      strides=(1, 2, 1, 2, 2, 2),
      hidden=256,
      feature_dim=128,          # penultimate features (FD-face / FVD-face)
      use_reference=True,
      eval=dict(split="test", clips=32, batch_frames=512),
  ))


class Stats(nnx.Variable):
  """Target statistics fixed before training (not optimised, saved with the model)."""


class FaceReader(nnx.Module):
  """frames [N, H, W, 3] (+ reference [N, H, W, 3]) uint8 -> coefficients [N, C] / features [N, F]."""

  def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, stats=None):
    if len(cfg.widths) != len(cfg.strides):
      raise ValueError(f"face_reader: widths {cfg.widths} and strides {cfg.strides} differ in length")
    self.resolution = int(cfg.resolution)
    self.use_reference = bool(cfg.use_reference)
    c = int(cfg.channels)
    stats = stats or {"mean": np.zeros(c, np.float32), "std": np.ones(c, np.float32)}
    self.mean = Stats(jnp.asarray(stats["mean"], jnp.float32))
    self.std = Stats(jnp.asarray(stats["std"], jnp.float32))
    cin = 6 if self.use_reference else 3
    convs, size = [], self.resolution
    for w, s in zip(cfg.widths, cfg.strides):
      convs.append(nnx.Conv(cin, w, (3, 3), strides=s, padding="SAME", rngs=rngs,
                            kernel_init=logical(nnx.initializers.lecun_normal(),
                                                (None, None, "conv_in", "conv_out")),
                            bias_init=logical(nnx.initializers.zeros_init(), ("conv_out",))))
      cin, size = w, -(-size // s)
    self.convs = nnx.List(convs)
    # Flatten, not pool: where the head and the mouth are is the signal (pitch / yaw shift them).
    self.fc1 = dense(size * size * cin, cfg.hidden, ("embed", "mlp"), rngs=rngs)
    self.fc2 = dense(cfg.hidden, cfg.feature_dim, ("mlp", "embed"), rngs=rngs)
    self.head = dense(cfg.feature_dim, c, ("embed", None), rngs=rngs)

  def _prepare(self, frames, reference):
    x = jnp.asarray(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"face_reader: expected frames [N, H, W, 3], found {x.shape}")
    x = x.astype(jnp.float32) / 255.0 - 0.5
    if self.use_reference:
      if reference is None:
        raise ValueError("face_reader: this reader needs the identity's reference image")
      r = jnp.asarray(reference)
      if r.shape != frames.shape:
        r = jnp.broadcast_to(r, frames.shape)
      x = jnp.concatenate([x, r.astype(jnp.float32) / 255.0 - 0.5], axis=-1)
    h, w = x.shape[1:3]
    r = self.resolution
    if (h, w) != (r, r):
      if h == w and h % r == 0:
        # Integer factor: box average, i.e. what rendering at r with area anti-aliasing gives.
        f = h // r
        x = x.reshape(x.shape[0], r, f, r, f, x.shape[-1]).mean(axis=(2, 4))
      else:
        x = jax.image.resize(x, (x.shape[0], r, r, x.shape[-1]), "linear", antialias=True)
    return x

  def features(self, frames, reference=None):
    """Penultimate features [N, F] of frames [N, H, W, 3]."""
    h = self._prepare(frames, reference)
    for conv in self.convs:
      h = jax.nn.gelu(conv(h))
    h = jax.nn.gelu(self.fc1(h.reshape(h.shape[0], -1)))
    return jax.nn.gelu(self.fc2(h))

  def normalized(self, frames, reference=None):
    """Standardised coefficient predictions [N, C] (the training target space)."""
    return self.head(self.features(frames, reference))

  def __call__(self, frames, reference=None):
    """Coefficients [N, C] in SynthDyad units."""
    return self.normalized(frames, reference) * self.std[...] + self.mean[...]


def _frames_and_reference(batch) -> tuple[jax.Array, jax.Array | None, jax.Array]:
  """batch video [B, T, H, W, 3], reference_image [B, H, W, 3], motion_self [B, T, C] -> flat."""
  video = batch["video"]
  b, t = video.shape[:2]
  frames = video.reshape((b * t,) + video.shape[2:])
  ref = batch.get("reference_image")
  if ref is not None:
    ref = jnp.broadcast_to(ref[:, None], video.shape).reshape(frames.shape)
  return frames, ref, batch["motion_self"].reshape(b * t, -1)


def r2_scores(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
  """Per-channel coefficient of determination 1 - SSE/SST over frames: [N, C] -> [C]."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  sse = ((pred - true) ** 2).sum(0)
  sst = ((true - true.mean(0)) ** 2).sum(0)
  return 1.0 - sse / np.maximum(sst, 1e-12)


class System(system_lib.System):
  """Regression loss (standardised MSE), target statistics, R^2 evaluation and export."""

  def __init__(self, config: ml_collections.ConfigDict):
    super().__init__(config)
    self.cfg = config.model

  def data_spec(self) -> system_lib.DataSpec:
    keys = ("video", "motion_self") + (("reference_image",) if self.cfg.use_reference else ())
    return system_lib.DataSpec(keys=keys)

  def build(self, *, rngs: nnx.Rngs, stats=None) -> FaceReader:
    return FaceReader(self.cfg, rngs=rngs, stats=stats)

  def fit_stats(self, batches):
    c = int(self.cfg.channels)
    m = np.concatenate([np.asarray(b["motion_self"])[..., :c].reshape(-1, c) for b in batches])
    # The floor keeps rare channels (blink in a few batches) from getting huge weights.
    return {"mean": m.mean(0).astype(np.float32), "std": np.maximum(m.std(0), 1e-2).astype(np.float32)}

  def loss(self, model: FaceReader, batch, rng, aux=None):
    del rng, aux
    frames, ref, target = _frames_and_reference(batch)
    target = (target[:, :self.cfg.channels] - model.mean[...]) / model.std[...]
    err = (model.normalized(frames, ref) - target) ** 2
    per_channel = err.mean(0)
    metrics = {"mse": per_channel.mean()}
    for i, name in enumerate(_channel_names(self.cfg.channels)):
      if name in REQUIRED_R2:
        metrics[f"mse_{name}"] = per_channel[i]
    return per_channel.mean(), metrics

  def evaluate(self, model: FaceReader, config, workdir: str, *, writer=None, step: int = 0
               ) -> dict[str, Any]:
    """R^2 per channel on `eval.clips` unseen clips of `eval.split`; exports the checkpoint.

    The accuracy goes to the writer, the log and `face_reader_export/accuracy.json`; the return
    value is empty because the train entry point prints what `evaluate` returns as SynthDyad
    metric tables, which a face reader has none of.
    """
    cfg = self.cfg
    acc = measure_accuracy(model, split=cfg.eval.split, clips=cfg.eval.clips,
                           resolution=cfg.resolution, seed=int(config.data.synthdyad.seed),
                           batch_frames=cfg.eval.batch_frames)
    out_dir = os.path.join(workdir, "face_reader_export")
    export(model, cfg, out_dir, accuracy=acc)
    if writer is not None:
      writer.write_scalars(step, {f"eval/r2_{k}": v for k, v in acc["r2"].items()})
    logging.info("face reader R^2 on %s: %s; exported to %s", cfg.eval.split, acc["r2"], out_dir)
    return {}


FaceReaderSystem = System


def _channel_names(c: int) -> tuple[str, ...]:
  from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top
  return tuple(sd.MOTION_CHANNELS[:c])


# ----------------------------------------------------------------------------------------------
# Inference helpers
# ----------------------------------------------------------------------------------------------
@nnx.jit
def _read_batch(model: FaceReader, frames, reference):
  return model(frames, reference), model.features(frames, reference)


def read_video(model: FaceReader, video: np.ndarray, reference: np.ndarray | None = None, *,
               batch_frames: int = 512) -> tuple[np.ndarray, np.ndarray]:
  """(coefficients [T, C], features [T, F]) of a video [T, H, W, 3] uint8 with reference [H, W, 3].

  Frames go through in fixed-size chunks (the last one padded) so one compiled shape serves all
  clip lengths.
  """
  video = np.asarray(video)
  if video.ndim != 4 or video.shape[-1] != 3:
    raise ValueError(f"read_video: expected video [T, H, W, 3], found {video.shape}")
  if model.use_reference:
    if reference is None:
      raise ValueError("read_video: this face reader needs the identity's reference_image [H, W, 3]")
    reference = np.asarray(reference)
    if reference.shape != video.shape[1:]:
      raise ValueError(f"read_video: reference {reference.shape} does not match frames "
                       f"{video.shape[1:]}")
  t = video.shape[0]
  n = min(batch_frames, t)
  coeffs, feats = [], []
  for s in range(0, t, n):
    chunk = video[s:s + n]
    pad = n - chunk.shape[0]
    if pad:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
    ref = None if reference is None else np.broadcast_to(reference, chunk.shape)
    c, f = _read_batch(model, jnp.asarray(chunk), None if ref is None else jnp.asarray(ref))
    coeffs.append(np.asarray(c)[:n - pad])
    feats.append(np.asarray(f)[:n - pad])
  return np.concatenate(coeffs), np.concatenate(feats)


def clip_features(frame_features: np.ndarray) -> np.ndarray:
  """Clip feature [2F] from frame features [T, F]: mean over time ‖ mean |first difference|.

  The first half is appearance, the second motion energy per feature, so FVD-face sees both what
  the faces look like and how fast they move.
  """
  f = np.asarray(frame_features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"clip_features: expected frame features [T >= 2, F], found {f.shape}")
  return np.concatenate([f.mean(0), np.abs(np.diff(f, axis=0)).mean(0)])


def measure_accuracy(model: FaceReader, *, split: str = "test", clips: int = 32,
                     resolution: int = 64, seed: int = 0, batch_frames: int = 512,
                     first_index: int = 0) -> dict[str, Any]:
  """R^2 / MAE per channel of the reader on rendered SynthDyad clips of `split`."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from avatar_jax.data.synthdyad import generator as sd  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(sd.regime_for(split), resolution=int(resolution))
  preds, trues = [], []
  c = model.mean[...].shape[0]
  for i in range(first_index, first_index + clips):
    s = sd.make_sample(split, i, seed=seed, config=cfg)
    p, _ = read_video(model, s["video"], s["reference_image"], batch_frames=batch_frames)
    preds.append(p)
    trues.append(np.asarray(s["motion_self"])[:, :c])
  pred, true = np.concatenate(preds), np.concatenate(trues)
  names = _channel_names(c)
  r2 = r2_scores(pred, true)
  mae = np.abs(pred - true).mean(0)
  return {
      "split": split, "clips": clips, "frames": int(true.shape[0]), "resolution": int(resolution),
      "seed": seed, "first_index": first_index,
      "r2": {n: float(v) for n, v in zip(names, r2)},
      "mae": {n: float(v) for n, v in zip(names, mae)},
      "meets_requirement": bool(all(r2[names.index(k)] >= v for k, v in REQUIRED_R2.items())),
  }


# ----------------------------------------------------------------------------------------------
# Export / load
# ----------------------------------------------------------------------------------------------
def _flat_state(model: nnx.Module) -> dict[str, np.ndarray]:
  flat = nnx.to_flat_state(nnx.state(model))
  return {"/".join(str(k) for k in path): np.asarray(v.get_value()) for path, v in flat}


def export(model: FaceReader, cfg: ml_collections.ConfigDict, out_dir: str, *,
           accuracy: dict | None = None) -> None:
  """Writes params.npz (all model variables, float32), config.json, accuracy.json to out_dir."""
  os.makedirs(out_dir, exist_ok=True)
  np.savez(os.path.join(out_dir, "params.npz"), **_flat_state(model))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f, indent=1, sort_keys=True)
  if accuracy is not None:
    with open(os.path.join(out_dir, "accuracy.json"), "w") as f:
      json.dump(accuracy, f, indent=1, sort_keys=True)


def load_face_reader(path: str | None = None) -> FaceReader:
  """The face reader exported under `path` (default: the shipped one in evals/assets)."""
  path = path or ASSET_DIR
  cfg_path, params_path = os.path.join(path, "config.json"), os.path.join(path, "params.npz")
  for p in (cfg_path, params_path):
    if not os.path.exists(p):
      raise FileNotFoundError(f"face reader checkpoint: {p} is missing (expected config.json and "
                              "params.npz written by face_reader.export)")
  with open(cfg_path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  cfg.widths, cfg.strides = tuple(cfg.widths), tuple(cfg.strides)
  model = FaceReader(cfg, rngs=nnx.Rngs(0))
  with np.load(params_path) as z:
    saved = dict(z)
  flat = nnx.to_flat_state(nnx.state(model))
  want = {"/".join(str(k) for k in path_): v for path_, v in flat}
  if set(want) != set(saved):
    raise ValueError(f"{params_path}: variables differ from the model built from {cfg_path}: "
                     f"missing {sorted(set(want) - set(saved))}, unexpected "
                     f"{sorted(set(saved) - set(want))}")
  for path_, v in flat:
    key = "/".join(str(k) for k in path_)
    arr = saved[key]
    cur = v.get_value()
    if arr.shape != cur.shape:
      raise ValueError(f"{params_path}: {key} has shape {arr.shape}, model expects {cur.shape}")
    v.set_value(jnp.asarray(arr, cur.dtype))
  nnx.update(model, nnx.from_flat_state(flat))
  return model


def load_accuracy(path: str | None = None) -> dict | None:
  """The accuracy.json stored next to a face reader checkpoint, if any."""
  p = os.path.join(path or ASSET_DIR, "accuracy.json")
  if not os.path.exists(p):
    return None
  with open(p) as f:
    return json.load(f)


def _register_evaluator():
  """The `face_reader` evaluator type (config.evals.<name> = runner.evaluator("face_reader")):
  R² per channel on unseen clips and the export, i.e. `System.evaluate`."""
  from avatar_jax.evals import runner  # pylint: disable=g-import-not-at-top

  if "face_reader" in runner.types():
    return

  @runner.register("face_reader")
  def _evaluate(ctx, cfg):  # pylint: disable=unused-argument
    return ctx.system.evaluate(ctx.model, ctx.config, ctx.workdir, writer=ctx.writer,
                               step=ctx.step or 0)


_register_evaluator()
