"""Hugging Face CLIP vision tower → Flax NNX, for FD-CLIP (Fréchet distance on CLIP image embeddings).

Reads a checkpoint saved by `transformers` (`save_pretrained` directory or a hub snapshot:
`config.json` + `model.safetensors` or a sharded `model.safetensors.index.json`) of
`CLIPModel`, `CLIPVisionModel` or `CLIPVisionModelWithProjection`, with NumPy only — neither
torch nor transformers is needed to load. The module reproduces the tower exactly:

  patches (conv, stride = patch) ‖ class token, + learned positions → pre-LayerNorm →
  L × [x + MHA(LN1(x)); x + MLP(LN2(x))] → last_hidden_state [N, 1 + P, D]
  pooler_output = post-LayerNorm(last_hidden_state[:, 0])      [N, D]
  image_embeds  = visual_projection(pooler_output)             [N, E] (when the checkpoint has one)

`preprocess` turns uint8 frames into CLIP-normalised pixels (shorter side resized to
`image_size`, antialiased bicubic, centre crop); it is close to, not bit-equal with, the
`CLIPImageProcessor` (PIL's bicubic differs slightly), so FD-CLIP numbers are comparable within
this codebase. `frame_features(model)` plugs into `evals.video.face_distribution_metrics`.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatar_jax.models import weights

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


class _Block(nnx.Module):
  def __init__(self, d: int, heads: int, hidden: int, act: str, eps: float, *, rngs: nnx.Rngs):
    self.heads = heads
    self.ln1 = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    self.q = nnx.Linear(d, d, rngs=rngs)
    self.k = nnx.Linear(d, d, rngs=rngs)
    self.v = nnx.Linear(d, d, rngs=rngs)
    self.o = nnx.Linear(d, d, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    self.fc1 = nnx.Linear(d, hidden, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, d, rngs=rngs)
    self.act = _ACTIVATIONS[act]

  def __call__(self, x):  # [N, S, D]
    n, s, d = x.shape
    h = self.ln1(x)
    split = lambda t: t.reshape(n, s, self.heads, d // self.heads)
    q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
    w = jnp.einsum("nqhd,nkhd->nhqk", q, k) * (d // self.heads) ** -0.5
    a = jnp.einsum("nhqk,nkhd->nqhd", jax.nn.softmax(w, axis=-1), v).reshape(n, s, d)
    x = x + self.o(a)
    return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class ClipVision(nnx.Module):
  """CLIP vision tower; `__call__(pixels [N, S, S, 3] normalised) -> dict of outputs`."""

  def __init__(self, config: dict[str, Any], *, rngs: nnx.Rngs):
    c = config
    d, p, s = int(c["hidden_size"]), int(c["patch_size"]), int(c["image_size"])
    act = c.get("hidden_act", "quick_gelu")
    if act not in _ACTIVATIONS:
      raise ValueError(f"CLIP hidden_act {act!r} is not supported; expected one of {sorted(_ACTIVATIONS)}")
    eps = float(c.get("layer_norm_eps", 1e-5))
    self.image_size, self.patch_size = s, p
    self.patch = nnx.Conv(int(c.get("num_channels", 3)), d, (p, p), strides=p, padding="VALID",
                          use_bias=False, rngs=rngs)
    self.class_embedding = nnx.Param(jnp.zeros((d,)))
    self.position_embedding = nnx.Param(jnp.zeros(((s // p) ** 2 + 1, d)))
    self.pre_ln = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    self.layers = nnx.List([_Block(d, int(c["num_attention_heads"]), int(c["intermediate_size"]),
                                   act, eps, rngs=rngs) for _ in range(int(c["num_hidden_layers"]))])
    self.post_ln = nnx.LayerNorm(d, epsilon=eps, rngs=rngs)
    proj = c.get("projection_dim")
    self.projection = (nnx.Linear(d, int(proj), use_bias=False, rngs=rngs)
                       if c.get("has_projection") and proj else None)

  def __call__(self, pixels):
    n, h, w, _ = pixels.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"ClipVision: expected pixels [N, {self.image_size}, {self.image_size}, 3], "
                       f"found {pixels.shape}")
    x = self.patch(pixels).reshape(n, -1, self.class_embedding.shape[0])
    cls = jnp.broadcast_to(self.class_embedding[...], (n, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...]
    x = self.pre_ln(x)
    for layer in self.layers:
      x = layer(x)
    pooled = self.post_ln(x[:, 0])
    out = {"last_hidden_state": x, "pooler_output": pooled}
    if self.projection is not None:
      out["image_embeds"] = self.projection(pooled)
    return out


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
def _read_tensors(path: str) -> dict[str, np.ndarray]:
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = weights.read_safetensors_folder(path, "model.safetensors", load_file)
  if tensors is not None:
    return tensors
  raise FileNotFoundError(f"{path}: expected model.safetensors or model.safetensors.index.json "
                          "(save the model with save_pretrained(safe_serialization=True))")


def vision_config(path: str) -> dict[str, Any]:
  """The vision part of `path/config.json` (a CLIPConfig's vision_config, or a CLIPVisionConfig)."""
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  vc = dict(cfg.get("vision_config", cfg))
  defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                  num_attention_heads=12, image_size=224, patch_size=32, hidden_act="quick_gelu",
                  layer_norm_eps=1e-5, num_channels=3)
  for k, v in defaults.items():
    vc.setdefault(k, v)
  vc.setdefault("projection_dim", cfg.get("projection_dim", 512))
  return vc


def load_clip_vision(path: str) -> ClipVision:
  """ClipVision with the weights of the transformers checkpoint directory `path`."""
  cfg = vision_config(path)
  tensors = _read_tensors(path)
  anchor = [k for k in tensors if k.endswith("embeddings.class_embedding")]
  if len(anchor) != 1:
    raise ValueError(f"{path}: expected one '*embeddings.class_embedding' tensor (a CLIP vision "
                     f"tower), found {anchor or 'none'}")
  prefix = anchor[0][:-len("embeddings.class_embedding")]
  cfg["has_projection"] = "visual_projection.weight" in tensors
  model = ClipVision(cfg, rngs=nnx.Rngs(0))
  used = set()

  def get(name):
    key = name if name == "visual_projection.weight" else prefix + name
    if key not in tensors:
      raise KeyError(f"{path}: tensor {key!r} missing from the checkpoint")
    used.add(key)
    return np.asarray(tensors[key], np.float32)

  def put(param, value, name):
    if param[...].shape != value.shape:
      raise ValueError(f"{path}: {name} has shape {value.shape}, the config implies "
                       f"{param[...].shape}")
    param[...] = jnp.asarray(value)

  def linear(mod, name, bias=True):
    put(mod.kernel, get(name + ".weight").T, name)          # torch [out, in] → [in, out]
    if bias:
      put(mod.bias, get(name + ".bias"), name)

  def norm(mod, name):
    put(mod.scale, get(name + ".weight"), name)
    put(mod.bias, get(name + ".bias"), name)

  put(model.patch.kernel, get("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0),
      "patch_embedding")                                      # [D, C, p, p] → [p, p, C, D]
  put(model.class_embedding, get("embeddings.class_embedding"), "class_embedding")
  put(model.position_embedding, get("embeddings.position_embedding.weight"), "position_embedding")
  norm(model.pre_ln, "pre_layrnorm")
  for i, layer in enumerate(model.layers):
    b = f"encoder.layers.{i}."
    norm(layer.ln1, b + "layer_norm1")
    norm(layer.ln2, b + "layer_norm2")
    for mod, name in ((layer.q, "self_attn.q_proj"), (layer.k, "self_attn.k_proj"),
                      (layer.v, "self_attn.v_proj"), (layer.o, "self_attn.out_proj"),
                      (layer.fc1, "mlp.fc1"), (layer.fc2, "mlp.fc2")):
      linear(mod, b + name)
  norm(model.post_ln, "post_layernorm")
  if model.projection is not None:
    linear(model.projection, "visual_projection", bias=False)
  # Everything of the tower must be used (a CLIPModel's text tower lies outside the prefix).
  left = [k for k in tensors if k.startswith(prefix) and k not in used
          and not k.endswith("position_ids")]
  if left:
    raise ValueError(f"{path}: tensors not used by the vision tower: {left[:5]}")
  return model


# ----------------------------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------------------------
def preprocess(frames: Any, image_size: int) -> jax.Array:
  """uint8 frames [N, H, W, 3] → CLIP-normalised pixels [N, S, S, 3] (resize shorter side, crop)."""
  x = jnp.asarray(frames, jnp.float32) / 255.0
  n, h, w, c = x.shape
  scale = image_size / min(h, w)
  nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
  x = jax.image.resize(x, (n, nh, nw, c), "cubic", antialias=True)
  top, left = (nh - image_size) // 2, (nw - image_size) // 2
  x = x[:, top:top + image_size, left:left + image_size]
  return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


def frame_features(model: ClipVision, batch: int = 64):
  """`features(video [T, H, W, 3], reference) -> [T, E]` for face_distribution_metrics (FD-CLIP).

  Uses image_embeds when the checkpoint has a projection, else pooler_output.
  """
  @nnx.jit
  def run(m, pixels):
    out = m(pixels)
    return out.get("image_embeds", out["pooler_output"])

  def features(video, reference=None):
    del reference
    video = np.asarray(video)
    outs = [np.asarray(run(model, preprocess(video[i:i + batch], model.image_size)))
            for i in range(0, len(video), batch)]
    return np.concatenate(outs)
  return features
