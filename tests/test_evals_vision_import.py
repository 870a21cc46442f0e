"""CLIP vision importer against transformers on small randomly initialised checkpoints."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from avatar_jax.models import vision_import as vi  # pylint: disable=g-import-not-at-top


def _tiny(act, **kw):
  return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                       num_attention_heads=4, image_size=24, patch_size=8,
                                       projection_dim=16, hidden_act=act, **kw)


@pytest.mark.parametrize("cls,act", [("CLIPVisionModelWithProjection", "quick_gelu"),
                                     ("CLIPVisionModel", "gelu")])
def test_matches_transformers(tmp_path, cls, act):
  torch.manual_seed(0)
  ref = getattr(transformers, cls)(_tiny(act, layer_norm_eps=1e-6)).eval()
  with torch.no_grad():  # random init leaves LayerNorms at identity; perturb them too
    for name, p in ref.named_parameters():
      if "norm" in name or "class_embedding" in name:
        p.add_(0.1 * torch.randn_like(p))
  ref.save_pretrained(tmp_path)
  model = vi.load_clip_vision(str(tmp_path))
  rng = np.random.default_rng(1)
  pixels = rng.standard_normal((3, 3, 24, 24)).astype(np.float32)        # NCHW for torch
  with torch.no_grad():
    out = ref(pixel_values=torch.from_numpy(pixels))
  got = model(np.transpose(pixels, (0, 2, 3, 1)))
  np.testing.assert_allclose(np.asarray(got["last_hidden_state"]), out.last_hidden_state.numpy(),
                             rtol=1e-4, atol=1e-5)
  if cls == "CLIPVisionModelWithProjection":
    np.testing.assert_allclose(np.asarray(got["image_embeds"]), out.image_embeds.numpy(),
                               rtol=1e-4, atol=1e-5)
  else:
    assert "image_embeds" not in got
    np.testing.assert_allclose(np.asarray(got["pooler_output"]), out.pooler_output.numpy(),
                               rtol=1e-4, atol=1e-5)


def test_full_clip_model_and_features(tmp_path):
  torch.manual_seed(1)
  cfg = transformers.CLIPConfig(
      text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, vocab_size=50, max_position_embeddings=8),
      vision_config=_tiny("quick_gelu").to_dict(), projection_dim=16)
  ref = transformers.CLIPModel(cfg).eval()
  ref.save_pretrained(tmp_path)
  model = vi.load_clip_vision(str(tmp_path))
  frames = np.random.default_rng(2).integers(0, 256, (5, 40, 30, 3), dtype=np.uint8)
  pixels = np.asarray(vi.preprocess(frames, 24))
  assert pixels.shape == (5, 24, 24, 3)
  with torch.no_grad():
    want = ref.get_image_features(pixel_values=torch.from_numpy(np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))))
  want = getattr(want, "pooler_output", want)  # transformers 5 returns an output object
  feats = vi.frame_features(model, batch=2)(frames)
  np.testing.assert_allclose(feats, want.numpy(), rtol=1e-4, atol=1e-5)


def test_errors(tmp_path):
  with pytest.raises(FileNotFoundError):
    vi.load_clip_vision(str(tmp_path))
