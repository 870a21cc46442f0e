"""wav2vec 2.0 in Flax NNX that loads the published Hugging Face weights (`Wav2Vec2Model`).

  waveform [B, S] @16 kHz → conv feature encoder (×320 downsampling) [B, T, 512] → LN → linear
  → [B, T, C] (+ padded frames zeroed) → x + GELU(grouped pos-conv(x)) → L transformer blocks
  → hidden_states (L + 1 of [B, T, C], as HF's `output_hidden_states=True`), last_hidden_state.

The two published families differ in three switches (HF config field in brackets):
  base        (wav2vec2-base, -base-960h):  GroupNorm (one group per channel, statistics over
              time) after the first conv only [feat_extract_norm="group"]; post-LN blocks
              LN(x + attn(x)), LN(x + ffn(x)), with an LN right after the pos-conv
              [do_stable_layer_norm=False]; no conv biases [conv_bias=False].
  large-lv60  (wav2vec2-large-lv60, -large-960h-lv60-self, XLS-R): LayerNorm over channels after
              every conv ["layer"]; pre-LN blocks x + attn(LN(x)), x + ffn(LN(x)) and a final LN
              after the last block [True]; conv biases [True].
hidden_states[0] is the input of the first block; hidden_states[-1] == last_hidden_state (for
stable-LN after the final LN, as transformers 4.x returns it; transformers ≥ 5 puts the final
block's output before that LN there instead).

Padding: with `mask` [B, S] the valid lengths map to frame lengths by the conv arithmetic, padded
frames are zeroed before the pos-conv and masked as attention keys, like HF. The base family's
GroupNorm still takes its statistics over the whole padded signal (HF does the same; the base
checkpoints were trained without masks, so their feature extractor returns none): run base
models on unpadded audio, or batch utterances of equal length, when exactness matters.

`load_hf(folder)` reads `config.json` + `model.safetensors` (or `pytorch_model.bin` with torch);
the weight-normed pos-conv (`weight_g`/`weight_v`, or `parametrizations.weight.original0/1`) is
folded to a plain kernel. `convert_cli` stores the module as an Orbax checkpoint in the trainer's
layout (state item {"frozen": ...}: paths like blocks/0/q/kernel), meant for `config.init_from`
with `into="model/<submodule>"` (not yet exercised by a system); `load_converted` reads it back.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from avatar_jax.models import weights
from avatar_jax.models.layers import dense, logical

ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}
# Heads of Wav2Vec2ForCTC / ForPreTraining checkpoints and the SpecAugment vector: not encoder.
IGNORED = ("masked_spec_embed", "quantizer.", "project_q.", "project_hid.", "lm_head.")


# ===================================================================================== config
@dataclasses.dataclass(frozen=True)
class Wav2Vec2Config:
  hidden: int = 768
  layers: int = 12
  heads: int = 12
  mlp: int = 3072
  conv_dim: tuple[int, ...] = (512,) * 7
  conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
  conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
  conv_bias: bool = False
  feat_norm: str = "group"       # "group": first conv only; "layer": every conv
  pos_kernel: int = 128
  pos_groups: int = 16
  stable_ln: bool = False        # pre-LN blocks + final LN (large-lv60)
  eps: float = 1e-5              # transformer and projection LNs (conv norms use torch's 1e-5)
  act: str = "gelu"              # transformer MLP
  feat_act: str = "gelu"         # conv encoder and pos-conv

  def frames(self, n_samples):
    """Feature frames of n_samples (int or int array) samples: HF's conv-output-length rule."""
    for k, s in zip(self.conv_kernel, self.conv_stride):
      n_samples = (n_samples - k) // s + 1
    return n_samples

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "Wav2Vec2Config":
    """Inverse of dataclasses.asdict (JSON turns tuples into lists)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


PRESETS = {
    "base": Wav2Vec2Config(),
    "large_lv60": Wav2Vec2Config(hidden=1024, layers=24, heads=16, mlp=4096, conv_bias=True,
                                 feat_norm="layer", stable_ln=True),
    "tiny": Wav2Vec2Config(hidden=32, layers=2, heads=2, mlp=64, conv_dim=(16, 16, 16),
                           conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), pos_kernel=16,
                           pos_groups=2),
}


def config_from_hf(hf: dict[str, Any], where: str = "config.json") -> Wav2Vec2Config:
  """Our config from a HF `Wav2Vec2Config` dict (missing fields take HF's defaults)."""
  if hf.get("add_adapter") or hf.get("adapter_attn_dim"):
    raise ValueError(f"{where}: adapters (add_adapter / adapter_attn_dim) are not supported")
  c = Wav2Vec2Config(
      hidden=int(hf.get("hidden_size", 768)), layers=int(hf.get("num_hidden_layers", 12)),
      heads=int(hf.get("num_attention_heads", 12)), mlp=int(hf.get("intermediate_size", 3072)),
      conv_dim=tuple(hf.get("conv_dim", Wav2Vec2Config.conv_dim)),
      conv_kernel=tuple(hf.get("conv_kernel", Wav2Vec2Config.conv_kernel)),
      conv_stride=tuple(hf.get("conv_stride", Wav2Vec2Config.conv_stride)),
      conv_bias=bool(hf.get("conv_bias", False)), feat_norm=hf.get("feat_extract_norm", "group"),
      pos_kernel=int(hf.get("num_conv_pos_embeddings", 128)),
      pos_groups=int(hf.get("num_conv_pos_embedding_groups", 16)),
      stable_ln=bool(hf.get("do_stable_layer_norm", False)),
      eps=float(hf.get("layer_norm_eps", 1e-5)), act=hf.get("hidden_act", "gelu"),
      feat_act=hf.get("feat_extract_activation", "gelu"))
  if c.feat_norm not in ("group", "layer"):
    raise ValueError(f"{where}: feat_extract_norm={c.feat_norm!r}, expected 'group' or 'layer'")
  for name, act in (("hidden_act", c.act), ("feat_extract_activation", c.feat_act)):
    if act not in ACTIVATIONS:
      raise ValueError(f"{where}: {name}={act!r}, expected one of {sorted(ACTIVATIONS)}")
  if not len(c.conv_dim) == len(c.conv_kernel) == len(c.conv_stride):
    raise ValueError(f"{where}: conv_dim, conv_kernel, conv_stride differ in length")
  return c


# ===================================================================================== module
def _ln(d: int, eps: float, **kw) -> nnx.LayerNorm:
  # Two-pass variance: conv features of raw audio have large means, where E[x²]−E[x]² loses bits.
  return nnx.LayerNorm(d, epsilon=eps, use_fast_variance=False, **kw,
                       scale_init=logical(nnx.initializers.ones_init(), ("embed",)),
                       bias_init=logical(nnx.initializers.zeros_init(), ("embed",)))


def _conv(din, dout, k, *, stride=1, padding="VALID", groups=1, bias=True, **kw) -> nnx.Conv:
  return nnx.Conv(din, dout, (k,), strides=(stride,), padding=padding, feature_group_count=groups,
                  use_bias=bias, **kw,
                  kernel_init=logical(nnx.initializers.lecun_normal(),
                                      (None, "conv_in", "conv_out")),
                  bias_init=logical(nnx.initializers.zeros_init(), ("conv_out",)))


class _ConvLayer(nnx.Module):
  """Strided conv → (GroupNorm | LayerNorm | nothing) → GELU: [B, S, Cin] -> [B, S', Cout]."""

  def __init__(self, din, dout, k, stride, norm, c: Wav2Vec2Config, **kw):
    self.conv = _conv(din, dout, k, stride=stride, bias=c.conv_bias, **kw)
    if norm == "group":  # one group per channel: per-channel statistics over time
      self.norm = nnx.GroupNorm(dout, num_groups=dout, epsilon=1e-5, use_fast_variance=False, **kw)
    elif norm == "layer":
      self.norm = _ln(dout, 1e-5, **kw)
    else:
      self.norm = None
    self.act = ACTIVATIONS[c.feat_act]

  def __call__(self, x):
    x = self.conv(x)
    return self.act(x if self.norm is None else self.norm(x))


class _Block(nnx.Module):
  """Transformer block, post-LN (base) or pre-LN (stable): [B, T, C] -> [B, T, C]."""

  def __init__(self, c: Wav2Vec2Config, attention: str | None, **kw):
    d = c.hidden
    self.heads, self.stable, self.attention = c.heads, c.stable_ln, attention
    self.q = dense(d, d, ("embed", "heads"), **kw)
    self.k = dense(d, d, ("embed", "heads"), **kw)
    self.v = dense(d, d, ("embed", "heads"), **kw)
    self.o = dense(d, d, ("heads", "embed"), **kw)
    self.ln1 = _ln(d, c.eps, **kw)          # HF layer_norm
    self.up = dense(d, c.mlp, ("embed", "mlp"), **kw)
    self.down = dense(c.mlp, d, ("mlp", "embed"), **kw)
    self.ln2 = _ln(d, c.eps, **kw)          # HF final_layer_norm
    self.act = ACTIVATIONS[c.act]

  def attn(self, x, lengths):
    b, t, d = x.shape
    split = lambda y: y.reshape(b, t, self.heads, d // self.heads)
    # Softmax statistics in float32 whatever the compute dtype (jax's xla path does this).
    out = jax.nn.dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                       key_value_seq_lengths=lengths,
                                       implementation=self.attention)
    return self.o(out.reshape(b, t, d))

  def __call__(self, x, lengths=None):
    """x: [B, T, C]; lengths: [B] valid frames (keys beyond are masked) or None."""
    if self.stable:
      x = x + self.attn(self.ln1(x), lengths)
      return x + self.down(self.act(self.up(self.ln2(x))))
    x = self.ln1(x + self.attn(x, lengths))
    return self.ln2(x + self.down(self.act(self.up(x))))


class Wav2Vec2(nnx.Module):
  """`__call__(wav [B, S], mask [B, S] | None) -> dict` (see module docstring).

  dtype: compute dtype (e.g. bfloat16 on GPU; LN statistics and softmax stay float32);
  param_dtype: storage (float32). attention: jax.nn.dot_product_attention's implementation
  (None/"xla", or "cudnn" for the fused GPU kernel, bf16/fp16 only).
  """

  def __init__(self, config: Wav2Vec2Config, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32, attention: str | None = None):
    c = self.config = config
    self.dtype = dtype
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    dims = (1,) + tuple(c.conv_dim)
    norms = ["group"] + [None] * (len(c.conv_dim) - 1) if c.feat_norm == "group" else (
        ["layer"] * len(c.conv_dim))
    self.convs = nnx.List([_ConvLayer(dims[i], dims[i + 1], c.conv_kernel[i], c.conv_stride[i],
                                      norms[i], c, **kw) for i in range(len(c.conv_dim))])
    self.proj_ln = _ln(dims[-1], c.eps, **kw)
    self.proj = dense(dims[-1], c.hidden, (None, "embed"), **kw)
    # HF pads K//2 each side and drops the last output for even K: pads (K//2, K//2 - 1) then.
    k = c.pos_kernel
    self.pos_conv = _conv(c.hidden, c.hidden, k, padding=[(k // 2, k // 2 - (k % 2 == 0))],
                          groups=c.pos_groups, **kw)
    self.ln = _ln(c.hidden, c.eps, **kw)     # after pos-conv (base) or after the last block
    self.blocks = nnx.List([_Block(c, attention, **kw) for _ in range(c.layers)])

  def __call__(self, wav: jax.Array, mask: jax.Array | None = None) -> dict[str, Any]:
    """wav: [B, S] float (normalised, see `normalize`); mask: [B, S] 1 = sample, 0 = padding.

    Returns last_hidden_state [B, T, C], hidden_states (L + 1) × [B, T, C] in the compute dtype,
    and lengths [B] int32, the valid frames (T when no mask).
    """
    c = self.config
    x = jnp.asarray(wav, self.dtype or jnp.float32)[..., None]
    for conv in self.convs:
      x = conv(x)
    b, t, _ = x.shape
    x = self.proj(self.proj_ln(x))
    lengths = None
    if mask is not None:
      lengths = c.frames(jnp.sum(jnp.asarray(mask, jnp.int32), axis=-1))
      x = jnp.where(jnp.arange(t)[None, :, None] < lengths[:, None, None], x, 0)
    x = x + ACTIVATIONS[c.feat_act](self.pos_conv(x))
    if not c.stable_ln:
      x = self.ln(x)
    hidden = [x]
    for block in self.blocks:
      x = block(x, lengths)
      hidden.append(x)
    if c.stable_ln:
      x = hidden[-1] = self.ln(x)
    lengths = jnp.full((b,), t, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    return {"last_hidden_state": x, "hidden_states": tuple(hidden), "lengths": lengths}


# ================================================================================== features
def normalize(wav: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Zero mean, unit variance per utterance over its valid samples, padding set to 0: [B, S].

  Wav2Vec2FeatureExtractor(do_normalize=True) in float32 (variance + 1e-7, population var).
  """
  wav = jnp.asarray(wav, jnp.float32)
  m = jnp.ones_like(wav) if mask is None else jnp.asarray(mask, jnp.float32)
  n = jnp.maximum(m.sum(-1, keepdims=True), 1.0)
  mean = (wav * m).sum(-1, keepdims=True) / n
  var = (jnp.square(wav - mean) * m).sum(-1, keepdims=True) / n
  return jnp.where(m > 0, (wav - mean) / jnp.sqrt(var + 1e-7), 0.0)


def resample_to_fps(hidden: jax.Array, n_frames: int) -> jax.Array:
  """Linear interpolation along time, [B, T, C] -> [B, n_frames, C], end points kept.

  torch's F.interpolate(mode="linear", align_corners=True), which FaceFormer and DualTalk use to
  take 50 Hz features to the motion rate (25 fps: n_frames = round(T / 2) or the clip's frames).
  For a padded batch, resample each utterance's valid frames on its own.
  """
  t = hidden.shape[1]
  # Source positions as torch computes them (float32 step × index), so results agree to 1 ulp.
  step = np.float32((t - 1) / (n_frames - 1)) if n_frames > 1 else np.float32(0)
  pos = np.arange(n_frames, dtype=np.float32) * step
  lo = np.minimum(pos.astype(np.int32), t - 1)
  hi = np.minimum(lo + 1, t - 1)
  w = jnp.asarray(pos - lo)[None, :, None]
  h = hidden.astype(jnp.float32)
  out = h[:, lo] * (1.0 - w) + h[:, hi] * w
  return out.astype(hidden.dtype)


# ==================================================================================== import
def read_hf_tensors(path: str) -> dict[str, np.ndarray]:
  """Tensors of a HF folder: model.safetensors (or its index), else pytorch_model.bin (torch)."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  tensors = weights.read_safetensors_folder(path, "model.safetensors", load_file)
  if tensors is not None:
    return tensors
  binary = os.path.join(path, "pytorch_model.bin")
  if os.path.exists(binary):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f"{binary}: reading a PyTorch checkpoint needs torch (pip install "
                        "avatar_jax[convert]); or save the model as model.safetensors") from e
    state = torch.load(binary, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() for k, v in state.items()}
  raise FileNotFoundError(f"{path}: found none of model.safetensors, model.safetensors.index.json, "
                          "pytorch_model.bin")


def _encoder_tensors(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """`Wav2Vec2Model` key names: ForCTC-style `wav2vec2.` prefix stripped, heads dropped, the
  weight-normed pos-conv folded: w = g · v / ‖v‖ (norm over all axes but the kernel's, dim=2)."""
  out = {}
  for key, v in tensors.items():
    key = key.removeprefix("wav2vec2.")
    if not key.startswith(IGNORED):
      out[key] = np.asarray(v, np.float32)
  p = "encoder.pos_conv_embed.conv."
  for g_key, v_key in (("weight_g", "weight_v"),
                       ("parametrizations.weight.original0", "parametrizations.weight.original1")):
    if p + g_key in out and p + v_key in out:
      g, v = out.pop(p + g_key).astype(np.float64), out.pop(p + v_key).astype(np.float64)
      out[p + "weight"] = (g * v / np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))
                           ).astype(np.float32)
  return out


def _targets(m: Wav2Vec2) -> dict[str, tuple[nnx.Variable, Any]]:
  """HF key → (our variable, torch→flax transform)."""
  conv_t = lambda w: w.transpose(2, 1, 0)      # [out, in/groups, k] → [k, in/groups, out]
  lin_t = lambda w: w.T                         # [out, in] → [in, out]
  t = {}

  def add(name, mod, kind):
    if kind == "norm":
      t[name + ".weight"], t[name + ".bias"] = (mod.scale, None), (mod.bias, None)
      return
    t[name + ".weight"] = (mod.kernel, conv_t if kind == "conv" else lin_t)
    if mod.bias is not None:
      t[name + ".bias"] = (mod.bias, None)

  for i, layer in enumerate(m.convs):
    add(f"feature_extractor.conv_layers.{i}.conv", layer.conv, "conv")
    if layer.norm is not None:
      add(f"feature_extractor.conv_layers.{i}.layer_norm", layer.norm, "norm")
  add("feature_projection.layer_norm", m.proj_ln, "norm")
  add("feature_projection.projection", m.proj, "linear")
  add("encoder.pos_conv_embed.conv", m.pos_conv, "conv")
  add("encoder.layer_norm", m.ln, "norm")
  for i, b in enumerate(m.blocks):
    n = f"encoder.layers.{i}."
    for name, mod in (("q_proj", b.q), ("k_proj", b.k), ("v_proj", b.v), ("out_proj", b.o)):
      add(n + "attention." + name, mod, "linear")
    add(n + "feed_forward.intermediate_dense", b.up, "linear")
    add(n + "feed_forward.output_dense", b.down, "linear")
    add(n + "layer_norm", b.ln1, "norm")
    add(n + "final_layer_norm", b.ln2, "norm")
  return t


def load_hf(path: str, *, dtype=None, attention: str | None = None
            ) -> tuple[Wav2Vec2Config, Wav2Vec2]:
  """(config, module) from a local HF folder of Wav2Vec2Model / ForCTC / ForPreTraining."""
  cfg_file = os.path.join(path, "config.json")
  if not os.path.exists(cfg_file):
    raise FileNotFoundError(f"{cfg_file}: not found (a save_pretrained folder has config.json)")
  with open(cfg_file) as f:
    config = config_from_hf(json.load(f), cfg_file)
  return config, from_hf_tensors(config, read_hf_tensors(path), dtype=dtype, attention=attention,
                                 where=path)


def from_hf_tensors(config: Wav2Vec2Config, tensors: dict[str, Any], *, dtype=None,
                    attention: str | None = None, where: str = "checkpoint") -> Wav2Vec2:
  """The module holding HF tensors {key: array} (a state_dict as NumPy arrays).

  Every encoder tensor must be used and every parameter set: otherwise ValueError listing the
  unknown and missing keys (heads in IGNORED are skipped).
  """
  tensors = _encoder_tensors(tensors)
  model = nnx.eval_shape(lambda: Wav2Vec2(config, rngs=nnx.Rngs(0), dtype=dtype,
                                          attention=attention))
  targets = _targets(model)
  unknown, missing = sorted(set(tensors) - set(targets)), sorted(set(targets) - set(tensors))
  if unknown or missing:
    raise ValueError(f"{where}: tensors do not match the wav2vec2 config; unknown keys "
                     f"{unknown}; missing keys {missing}")
  for key, (var, fn) in targets.items():
    value = tensors[key] if fn is None else fn(tensors[key])
    if tuple(var.shape) != value.shape:
      raise ValueError(f"{where}: {key} has shape {value.shape} (in our layout), the config "
                       f"implies {tuple(var.shape)}")
    var.set_value(jnp.asarray(value, var.dtype))
  return model


# =================================================================================== convert
def convert_cli(argv: list[str] | None = None) -> str:
  """`--src <HF folder> --out <dir>`: <dir>/checkpoints/0 (Orbax, state {"frozen": params})
  and <dir>/config.json (our config). Returns <dir>."""
  from avatar_jax import checkpointing  # pylint: disable=g-import-not-at-top
  import ml_collections  # pylint: disable=g-import-not-at-top
  ap = argparse.ArgumentParser(prog="convert wav2vec2", description=convert_cli.__doc__)
  ap.add_argument("--src", required=True, help="HF folder: config.json + model.safetensors")
  ap.add_argument("--out", required=True, help="output directory")
  args = ap.parse_args(argv)
  config, model = load_hf(args.src)
  out = os.path.abspath(args.out)
  ckpt = checkpointing.Checkpointer(os.path.join(out, "checkpoints"), async_save=False)
  if ckpt.latest_step() is not None:
    raise FileExistsError(f"{out}/checkpoints already holds a checkpoint; pick an empty --out")
  cfg = dataclasses.asdict(config)
  ckpt.save(0, {"frozen": nnx.state(model)}, config=ml_collections.ConfigDict(cfg), force=True)
  ckpt.wait()
  ckpt.close()
  with open(os.path.join(out, "config.json"), "w") as f:
    json.dump({**cfg, "source": os.path.abspath(args.src)}, f, indent=2)
  logging.info("wav2vec2 %s → %s (%d parameters)", args.src, out,
               sum(x.size for x in jax.tree.leaves(nnx.state(model))))
  return out


def load_converted(path: str, *, dtype=None, attention: str | None = None
                   ) -> tuple[Wav2Vec2Config, Wav2Vec2]:
  """(config, module) from a `convert_cli` output directory, on the default device."""
  from avatar_jax import checkpointing  # pylint: disable=g-import-not-at-top
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  cfg.pop("source", None)
  config = Wav2Vec2Config.from_dict(cfg)
  model = nnx.eval_shape(lambda: Wav2Vec2(config, rngs=nnx.Rngs(0), dtype=dtype,
                                          attention=attention))
  graphdef, abstract = nnx.split(model)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=dev), abstract)
  ckpt = checkpointing.Checkpointer(os.path.join(os.path.abspath(path), "checkpoints"))
  state = ckpt.restore_partial({"frozen": abstract}, 0)["frozen"]
  ckpt.close()
  return config, nnx.merge(graphdef, state)
