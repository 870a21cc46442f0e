"""Audio front ends every system shares: log-mel (the default) or a frozen wav2vec 2.0.

A system reads each audio stream through `FrontEnd`, which returns features at the log-mel rate
(`pipeline.facts(config.data)["mel_rate"]`, 50 Hz), so the layers after it do not care which
front end produced them:

  kind "mel"       batch["mel_<stream>"] [B, Ta, n_mels] as the pipeline computed it.
  kind "wav2vec2"  batch["audio_<stream>"] [B, S] (16 kHz) → normalise → frozen wav2vec2 →
                   hidden state `layer` (-1: last) → linear resampling to Ta = S / hop frames.
                   The wav2vec2 parameters sit under the model path `front/w2v` and are frozen
                   (`TRAINABLE`); published weights are converted once and loaded by init_from:

    python -m avatar_jax.convert wav2vec2 --src <HF folder> --out w2v_base
    python -m avatar_jax.train --config configs/quickstart.py:w2v=w2v_base --workdir runs/w2v

`config.model.audio = front_end_config()` holds the switch; `use_wav2vec2(config, dir)` sets it
from a converted folder (its architecture) and adds the init_from entry. DualTalk and FaceFormer
likewise feed wav2vec2 features interpolated to the motion grid into their decoders.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from avatar_jax import config_lib
from avatar_jax.models import audio_wav2vec2 as w2v_lib

KINDS = ("mel", "wav2vec2")
# The trained parameters of a system whose front end may hold a frozen wav2vec2.
TRAINABLE = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("w2v")))


def front_end_config(kind: str = "mel") -> ml_collections.ConfigDict:
  """config.model.audio: kind "mel" | "wav2vec2"; wav2vec2: the architecture (a preset name of
  audio_wav2vec2.PRESETS, or the fields of a converted checkpoint's config.json via
  `use_wav2vec2`), the hidden state read (`layer`) and the compute dtype."""
  return ml_collections.ConfigDict(dict(
      kind=kind,
      wav2vec2=dict(preset="base", arch=ml_collections.config_dict.placeholder(dict), layer=-1,
                    dtype="float32")))


def use_wav2vec2(config: ml_collections.ConfigDict, converted: str, *, layer: int = -1) -> None:
  """Switches `config.model.audio` to a frozen wav2vec2 converted to `converted` (the output of
  `python -m avatar_jax.convert wav2vec2`), loaded by a `config.init_from.w2v` entry."""
  path = os.path.join(converted, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: `converted` must be the --out folder of "
                            "`python -m avatar_jax.convert wav2vec2`")
  with open(path) as f:
    arch = {k: v for k, v in json.load(f).items() if k != "source"}
  a = config.model.audio
  a.kind, a.wav2vec2.arch, a.wav2vec2.layer = "wav2vec2", arch, int(layer)
  entry = config_lib.init_from(os.path.abspath(converted), into="model/front/w2v")
  if "workdir" in config.init_from:   # one unnamed entry: keep it as `main`, next to the new one
    # (empty or not, so `--config.init_from.main.workdir=...` can still set it).
    config.init_from = ml_collections.ConfigDict({"w2v": entry, "main": config.init_from})
  else:
    config.init_from.w2v = entry


def config_of(model_cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """config.model.audio, or the log-mel default for configs written before the switch existed."""
  return model_cfg.get("audio") or front_end_config()


def arch(cfg: ml_collections.ConfigDict) -> w2v_lib.Wav2Vec2Config:
  w = cfg.wav2vec2
  if w.get("arch"):
    return w2v_lib.Wav2Vec2Config.from_dict(dict(w.arch))
  if w.preset not in w2v_lib.PRESETS:
    raise ValueError(f"config.model.audio.wav2vec2.preset={w.preset!r}: expected one of "
                     f"{sorted(w2v_lib.PRESETS)}")
  return w2v_lib.PRESETS[w.preset]


def keys(cfg: ml_collections.ConfigDict, streams=("self", "partner")) -> tuple[str, ...]:
  """The batch keys the front end reads for `streams`."""
  if cfg.kind not in KINDS:
    raise ValueError(f"config.model.audio.kind={cfg.kind!r}: expected one of {KINDS}")
  prefix = "mel" if cfg.kind == "mel" else "audio"
  return tuple(f"{prefix}_{s}" for s in streams)


def feature_dim(cfg: ml_collections.ConfigDict, facts: dict) -> int:
  """Channels of the features `FrontEnd` returns."""
  return int(facts["n_mels"]) if cfg.kind == "mel" else arch(cfg).hidden


class FrontEnd(nnx.Module):
  """`front(batch, stream) -> [B, Ta, feature_dim]` at the mel rate (see the module docstring)."""

  def __init__(self, cfg: ml_collections.ConfigDict, facts: dict, *, rngs: nnx.Rngs):
    self.kind = cfg.kind
    keys(cfg)  # validates the kind
    self.hop = float(facts["sample_rate"]) / float(facts["mel_rate"])   # samples per feature frame
    if self.kind == "wav2vec2":
      self.layer = int(cfg.wav2vec2.layer)
      dtype = jnp.dtype(cfg.wav2vec2.dtype)
      self.w2v = w2v_lib.Wav2Vec2(arch(cfg), rngs=rngs, dtype=dtype)

  def __call__(self, batch, stream: str) -> jax.Array:
    if self.kind == "mel":
      return batch[f"mel_{stream}"]
    wav = batch[f"audio_{stream}"]
    n = int(round(wav.shape[1] / self.hop))
    # Frozen: no gradient reaches the wav2vec2 weights or flows back through it.
    h = self.w2v(jax.lax.stop_gradient(w2v_lib.normalize(wav)))["hidden_states"][self.layer]
    return jax.lax.stop_gradient(w2v_lib.resample_to_fps(h.astype(jnp.float32), n))


def mel_frames(cfg: ml_collections.ConfigDict, batch, stream: str, facts: dict) -> int:
  """Feature frames Ta of `stream` in `batch` (what FrontEnd returns), without running it."""
  if cfg.kind == "mel":
    return int(batch[f"mel_{stream}"].shape[1])
  return int(round(batch[f"audio_{stream}"].shape[1] * facts["mel_rate"] / facts["sample_rate"]))

