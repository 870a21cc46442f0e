"""wav2vec2 importer against transformers on small randomly initialised checkpoints."""
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # pylint: disable=g-import-not-at-top

from avatar_jax.models import audio_wav2vec2 as w2v  # pylint: disable=g-import-not-at-top

STYLES = {  # base: GroupNorm on conv 0, post-LN; lv60: LayerNorm in every conv, pre-LN
    "base": dict(feat_extract_norm="group", do_stable_layer_norm=False, conv_bias=False),
    "lv60": dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True),
}
S = 1001  # odd, and not a multiple of the ×20 hop


def _hf_config(style, **kw):
  return transformers.Wav2Vec2Config(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
      conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, layer_norm_eps=1e-5,
      **STYLES[style], **kw)


@pytest.fixture(scope="module", params=sorted(STYLES))
def saved(request, tmp_path_factory):
  """(style, HF model, folder it was saved to)."""
  torch.manual_seed(0)
  ref = transformers.Wav2Vec2Model(_hf_config(request.param)).eval()
  with torch.no_grad():  # random init leaves norms at identity and biases at 0; perturb all
    for p in ref.parameters():
      p.add_(0.1 * torch.randn_like(p))
  path = tmp_path_factory.mktemp(request.param)
  ref.save_pretrained(path)
  return request.param, ref, str(path)


def _reference(ref, wav, mask=None):
  """HF hidden states, the last one as transformers 4.x gives it (after the final LN for
  stable-LN; transformers ≥ 5 puts the last block's output before that LN there)."""
  with torch.no_grad():
    out = ref(torch.tensor(wav), attention_mask=None if mask is None else torch.tensor(mask),
              output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states[:-1]] + [out.last_hidden_state.numpy()]


def _max_diffs(got, want):
  assert len(got["hidden_states"]) == len(want)
  np.testing.assert_array_equal(got["hidden_states"][-1], got["last_hidden_state"])
  return [float(np.abs(np.asarray(g) - w).max()) for g, w in zip(got["hidden_states"], want)]


def test_matches_transformers(saved):
  style, ref, path = saved
  config, model = w2v.load_hf(path)
  assert config.stable_ln == (style == "lv60")
  rng = np.random.default_rng(1)
  for _ in range(2):
    wav = np.asarray(w2v.normalize(rng.standard_normal((2, S)) * 3 + 1))
    diffs = _max_diffs(model(wav), _reference(ref, wav))
    assert max(diffs) <= 1e-4, diffs


def test_matches_transformers_with_padding(saved):
  """Different lengths in one batch; HF zeroes padded frames and masks them as keys (base-style
  also takes its GroupNorm statistics over the padding: so do we). Every frame is compared."""
  _, ref, path = saved
  config, model = w2v.load_hf(path)
  rng = np.random.default_rng(2)
  mask = np.ones((2, S), np.int64)
  mask[1, 677:] = 0
  wav = np.asarray(w2v.normalize(rng.standard_normal((2, S)), mask))
  got = model(wav, mask)
  assert got["lengths"].tolist() == [config.frames(S), config.frames(677)] == [49, 32]
  diffs = _max_diffs(got, _reference(ref, wav, mask))
  assert max(diffs) <= 1e-4, diffs


def test_ctc_prefix_legacy_weight_norm_and_bin(saved, tmp_path):
  """ForCTC/ForPreTraining key names (`wav2vec2.` + heads) with old weight_g/weight_v, and a
  pytorch_model.bin folder, import to the same module."""
  _, ref, path = saved
  _, model = w2v.load_hf(path)
  tensors = load_file(os.path.join(path, "model.safetensors"))
  legacy = {"wav2vec2." + k.replace("parametrizations.weight.original0", "weight_g")
            .replace("parametrizations.weight.original1", "weight_v"): v
            for k, v in tensors.items()}
  legacy.update({"lm_head.weight": np.zeros((5, 32), np.float32), "lm_head.bias": np.zeros(5),
                 "quantizer.codevectors": np.zeros((1, 4, 8), np.float32),
                 "project_q.weight": np.zeros((4, 8), np.float32),
                 "project_hid.weight": np.zeros((4, 32), np.float32)})
  (tmp_path / "ctc").mkdir()
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "ctc")
  save_file(legacy, str(tmp_path / "ctc" / "model.safetensors"))
  (tmp_path / "bin").mkdir()
  shutil.copy(os.path.join(path, "config.json"), tmp_path / "bin")
  torch.save(ref.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
  wav = np.random.default_rng(3).standard_normal((1, 801)).astype(np.float32)
  want = np.asarray(model(wav)["last_hidden_state"])
  for folder in ("ctc", "bin"):
    _, other = w2v.load_hf(str(tmp_path / folder))
    np.testing.assert_allclose(np.asarray(other(wav)["last_hidden_state"]), want, atol=1e-6)


def test_bad_checkpoints(saved, tmp_path, monkeypatch):
  _, _, path = saved
  tensors = load_file(os.path.join(path, "model.safetensors"))
  shutil.copy(os.path.join(path, "config.json"), tmp_path)
  with pytest.raises(FileNotFoundError, match="model.safetensors"):
    w2v.load_hf(str(tmp_path))
  save_file({**tensors, "encoder.extra.weight": np.zeros(3, np.float32)},
            str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError, match=r"unknown keys \['encoder.extra.weight'\]"):
    w2v.load_hf(str(tmp_path))
  del tensors["encoder.layers.1.attention.q_proj.bias"]
  save_file(tensors, str(tmp_path / "model.safetensors"))
  with pytest.raises(ValueError,
                     match=r"missing keys \['encoder.layers.1.attention.q_proj.bias'\]"):
    w2v.load_hf(str(tmp_path))
  os.remove(tmp_path / "model.safetensors")
  (tmp_path / "pytorch_model.bin").write_bytes(b"")
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "torch", None)  # as without the [convert] extra
    with pytest.raises(ImportError, match="pytorch_model.bin.*needs torch"):
      w2v.load_hf(str(tmp_path))
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json"):
    w2v.load_hf(str(tmp_path))


def test_convert_cli_roundtrip_and_bf16(saved, tmp_path):
  _, _, path = saved
  config, model = w2v.load_hf(path)
  out = w2v.convert_cli(["--src", path, "--out", str(tmp_path / "out")])
  with pytest.raises(FileExistsError, match="checkpoint"):
    w2v.convert_cli(["--src", path, "--out", out])
  config2, model2 = w2v.load_converted(out, dtype=jnp.bfloat16)
  assert config2 == config
  wav = np.asarray(w2v.normalize(np.random.default_rng(4).standard_normal((2, 641))))
  want = np.asarray(model(wav)["last_hidden_state"])
  got = model2(wav)["last_hidden_state"]
  assert got.dtype == jnp.bfloat16
  err = np.abs(np.asarray(got, np.float32) - want).max() / np.abs(want).max()
  assert err < 0.05, err


@pytest.mark.parametrize("preset,hf", [
    ("base", {}),
    ("large_lv60", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, feat_extract_norm="layer",
                        do_stable_layer_norm=True, conv_bias=True))])
def test_presets_match_published_shapes(preset, hf):
  hf_config = transformers.Wav2Vec2Config(**hf)
  assert w2v.config_from_hf(hf_config.to_dict()) == w2v.PRESETS[preset]
  with torch.device("meta"):
    n_ref = sum(p.numel() for p in transformers.Wav2Vec2Model(hf_config).parameters())
  shapes = nnx.eval_shape(lambda: w2v.Wav2Vec2(w2v.PRESETS[preset], rngs=nnx.Rngs(0)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(shapes)))
  # HF also holds masked_spec_embed [C] and the weight-norm magnitude g [1, 1, K].
  assert n == n_ref - hf_config.hidden_size - hf_config.num_conv_pos_embeddings


def test_normalize_matches_feature_extractor():
  fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
  rng = np.random.default_rng(5)
  clips = [rng.standard_normal(n).astype(np.float32) * 2 + 0.5 for n in (400, 257)]
  ref = fe(clips, sampling_rate=16000, padding=True, return_tensors="np")
  padded = np.zeros((2, 400), np.float32)
  padded[0], padded[1, :257] = clips
  got = w2v.normalize(padded, ref["attention_mask"])
  np.testing.assert_allclose(np.asarray(got), ref["input_values"], atol=1e-5)


def test_resample_to_fps():
  rng = np.random.default_rng(6)
  h = rng.standard_normal((2, 49, 8)).astype(np.float32)
  for n in (25, 49, 98, 1):
    out = np.asarray(w2v.resample_to_fps(jnp.asarray(h), n))
    assert out.shape == (2, n, 8)
    np.testing.assert_allclose(out[:, 0], h[:, 0], atol=1e-6)
    if n > 1:
      np.testing.assert_allclose(out[:, -1], h[:, -1], atol=1e-6)
    want = torch.nn.functional.interpolate(torch.from_numpy(h).transpose(1, 2), size=n,
                                           mode="linear", align_corners=True).transpose(1, 2)
    np.testing.assert_allclose(out, want.numpy(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(w2v.resample_to_fps(jnp.asarray(h), 49)), h, atol=1e-6)


def test_front_end_trains_frozen_from_a_converted_checkpoint(saved, tmp_path):
  """`convert wav2vec2` → quickstart `w2v=<dir>`: the trainer loads the weights into the model's
  front end (model/front/w2v), keeps them out of the optimiser, and the features the model reads
  are HF's last hidden state interpolated to the mel rate."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from avatar_jax import convert, sharding, trainer  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  style, ref, path = saved
  if style != "lv60":
    pytest.skip("one style is enough for the trainer path")
  out = str(tmp_path / "w2v")
  assert convert.main(["wav2vec2", "--src", path, "--out", out]) == 0
  spec = importlib.util.spec_from_file_location(
      "qs", os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.py"))
  qs = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(qs)
  c = qs.get_config(f"steps=2,width=32,depth=1,batch=8,clip_frames=25,w2v={out}")
  c.data.split_sizes.train, c.train.stats_batches, c.optim.warmup_steps = 8, 1, 1
  assert c.model.audio.kind == "wav2vec2" and c.init_from.w2v.into == "model/front/w2v"
  mesh = sharding.make_mesh(dict(c.mesh))
  s = trainer.setup(c, mesh)
  assert "audio_self" in s.system.data_spec().keys and "mel_self" not in s.system.data_spec().keys
  counts = s.num_params
  n_w2v = sum(x.size for x in jax.tree.leaves(nnx.state(w2v.load_hf(path)[1], nnx.Param)))
  assert counts["frozen"] == n_w2v, counts
  host = next(pipeline.make(c.data, "train", keys=s.system.data_spec().keys, seed=0,
                            shard_index=0, shard_count=1))
  model = s.model()
  got = np.asarray(model.front({k: jnp.asarray(v) for k, v in host.items()}, "self"))
  wav = np.asarray(w2v.normalize(host["audio_self"]))
  want = np.asarray(w2v.resample_to_fps(jnp.asarray(_reference(ref, wav)[-1]), got.shape[1]))
  assert got.shape == (8, host["audio_self"].shape[1] // 320, 32)
  np.testing.assert_allclose(got, want, atol=1e-4)
  before = jax.tree.map(np.asarray, s.state["frozen"])
  state, _ = s.train_step(s.state, s.batch(host))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("name", ["dualtalk", "timar"])
def test_every_motion_system_takes_the_wav2vec2_front_end(name):
  """The front-end switch of DualTalk and TIMAR: audio_* keys in, a frozen wav2vec2 (the tiny
  preset here) in the model, the rest trained."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from avatar_jax import sharding, trainer  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("size=tiny,clip_frames=50,batch=8")
  c.model.audio.kind, c.model.audio.wav2vec2.preset = "wav2vec2", "tiny"
  c.data.split_sizes.train, c.train.stats_batches = 8, 1
  s = trainer.setup(c, sharding.make_mesh(dict(c.mesh)))
  keys = s.system.data_spec().keys
  assert {"audio_self", "audio_partner"} <= set(keys) and not any(k.startswith("mel_") for k in keys)
  n_w2v = sum(x.size for x in jax.tree.leaves(nnx.state(
      w2v.Wav2Vec2(w2v.PRESETS["tiny"], rngs=nnx.Rngs(0)), nnx.Param)))
  assert s.num_params["frozen"] == n_w2v
  host = next(pipeline.make(c.data, "train", keys=keys, seed=0, shard_index=0, shard_count=1))
  before = jax.tree.map(np.asarray, s.state["frozen"])
  state, metrics = s.train_step(s.state, s.batch(host))
  assert np.isfinite(float(metrics["loss"]))
  for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(state["frozen"])):
    np.testing.assert_array_equal(a, np.asarray(b))
