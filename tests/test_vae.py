"""Wan 2.1 VAE (avatar_jax.models.vae): parity with diffusers' AutoencoderKLWan on a random tiny
model, chunked == full, causality, shape checks, weight import (diffusers and original layouts,
bfloat16 files, key errors) and the Orbax conversion round trip."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatar_jax.models import vae

import trainer_harness as harness

# A tiny AutoencoderKLWan: the published topology (4 levels, 8× space, 4× time), 8 base channels.
# One video shape for the parity, chunking and causality tests, so they share compilations:
# 13 frames = 4 latent frames (chunk 2 then leaves a remainder), non-square 16×24 pixels.
VIDEO = (2, 13, 16, 24, 3)
TINY_REF = dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True],
                latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.0, 2.0, 0.5, 1.5])


# Jitted once per (model structure, shape, options). Compilation dominates this file's time, so
# XLA's CPU backend optimisations are off (3× faster to compile, as fast to run at these sizes).
# The wrappers pass every option positionally because jit's cache tells an omitted keyword from
# an explicit one with the same value.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(_jit, static_argnums=(0, 3, 4))
def _moments_jit(graphdef, state, video, chunked, chunk):
  return nnx.merge(graphdef, state).encode_moments(video, chunked=chunked, chunk=chunk)


@functools.partial(_jit, static_argnums=(0, 3, 4, 5))
def _decode_jit(graphdef, state, latents, chunked, chunk, clamp):
  return nnx.merge(graphdef, state).decode(latents, chunked=chunked, chunk=chunk, clamp=clamp)


def _moments(model, video, chunked=True, chunk=1):
  return _moments_jit(*nnx.split(model), video, chunked, chunk)


def _decode(model, latents, chunked=True, chunk=1, clamp=True):
  return _decode_jit(*nnx.split(model), latents, chunked, chunk, clamp)


def _video(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32))


def _tiny_config():
  return vae.config_from_diffusers(TINY_REF)


def _random_model(cfg, seed=0):
  """WanVAE with NumPy-random weights (fan-in scaled). Building it with jax.random compiles one
  sampler per kernel shape, ~10 s on CPU for the tiny model; this takes milliseconds."""
  abstract = nnx.eval_shape(lambda: vae.WanVAE(cfg, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def value(path, var):
    name, shape = str(path[-1]), tuple(var.shape)
    if name == "kernel":
      return rng.normal(0, 1 / np.sqrt(np.prod(shape[:-1])), shape)
    if name == "bias":
      return rng.normal(0, 0.1, shape)
    if name == "gamma":
      return 1 + rng.normal(0, 0.1, shape)
    return np.asarray(cfg[name])                       # latents_mean / latents_std

  flat = [(p, v.replace(jnp.asarray(value(p, v), v.dtype))) for p, v in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def model():
  """A random tiny model (no torch needed)."""
  return _random_model(_tiny_config())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, its save_pretrained folder)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  ref = diffusers.AutoencoderKLWan(**TINY_REF).eval()
  path = str(tmp_path_factory.mktemp("wan_vae_tiny"))
  ref.save_pretrained(path)
  return ref, path


# ------------------------------------------------------------------------------------ parity
def test_matches_diffusers(reference):
  import torch  # pylint: disable=g-import-not-at-top
  ref, path = reference
  cfg, ours = vae.load_diffusers(path)
  assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult) == (8, 4, (1, 2, 2, 2))
  np.testing.assert_allclose(np.asarray(ours.latents_std[...]), TINY_REF["latents_std"])
  video = _video(VIDEO)
  with torch.no_grad():
    # diffusers' own chunked encode (frame 0, then groups of 4) and per-latent-frame decode.
    dist = ref.encode(torch.from_numpy(np.array(video)).permute(0, 4, 1, 2, 3)).latent_dist
    mean_ref = dist.mean.permute(0, 2, 3, 4, 1).numpy()
    logvar_ref = dist.logvar.permute(0, 2, 3, 4, 1).numpy()
    video_ref = ref.decode(dist.mean).sample.permute(0, 2, 3, 4, 1).numpy()
  mean, logvar = _moments(ours, video)
  assert mean.shape == (2, 4, 2, 3, 4) == mean_ref.shape
  assert np.abs(np.asarray(mean) - mean_ref).max() <= 1e-4
  assert np.abs(np.asarray(logvar) - logvar_ref).max() <= 1e-4
  # Unclamped here (diffusers clamps to [-1, 1]) to share test_chunked_equals_full's compilation.
  out = np.asarray(_decode(ours, jnp.asarray(mean_ref), clamp=False))
  assert out.shape == video.shape
  assert np.abs(np.clip(out, -1, 1) - video_ref).max() <= 1e-4
  assert np.mean(np.abs(out) < 1) > 0.99          # clamping hides almost nothing
  # The pipelines' latent normalisation, (z - mean) / std per channel, and its inverse.
  z = ours.normalize(mean)
  mu, sd = np.asarray(TINY_REF["latents_mean"]), np.asarray(TINY_REF["latents_std"])
  np.testing.assert_allclose(np.asarray(z), (mean_ref - mu) / sd, atol=1e-4)
  np.testing.assert_allclose(np.asarray(ours.denormalize(z)), np.asarray(mean), atol=1e-5)


# ------------------------------------------------------------------------------------ chunking
def test_chunked_equals_full(model):
  video = _video(VIDEO, seed=1)
  full, _ = _moments(model, video, chunked=False)
  assert full.shape == (2, 4, 2, 3, 4)
  # chunk 1: one latent frame per scan step, as diffusers (compiled already by the parity test);
  # 2: one scan step, then a 1-latent-frame remainder.
  for chunk in (1, 2):
    chunked, _ = _moments(model, video, chunk=chunk)
    assert np.abs(np.asarray(chunked) - np.asarray(full)).max() <= 1e-5, chunk
  out_full = _decode(model, full, chunked=False, clamp=False)
  assert out_full.shape == video.shape
  for chunk in (1, 2):
    out = _decode(model, full, chunk=chunk, clamp=False)
    assert np.abs(np.asarray(out) - np.asarray(out_full)).max() <= 1e-5, chunk


def test_causal(model):
  video = _video(VIDEO, seed=1)
  base, _ = _moments(model, video, chunked=False)
  # Latent frame j (j >= 1) covers video frames 4j-3 .. 4j; latent 0 is frame 0 alone.
  for frame, first_changed in ((1, 1), (5, 2), (12, 3)):
    moved, _ = _moments(model, video.at[:, frame].add(0.5), chunked=False)
    diff = np.abs(np.asarray(moved) - np.asarray(base)).max(axis=(0, 2, 3, 4))
    assert np.all(diff[:first_changed] == 0), (frame, diff)
    assert diff[first_changed] > 1e-4, (frame, diff)
  # Decoder: latent frame 2 drives video frames 5.. only.
  out = _decode(model, base, chunked=False, clamp=False)
  moved = _decode(model, base.at[:, 2].add(1.0), chunked=False, clamp=False)
  diff = np.abs(np.asarray(moved) - np.asarray(out)).max(axis=(0, 2, 3, 4))
  assert np.all(diff[:5] == 0) and np.all(diff[5:] > 0), diff


# ------------------------------------------------------------------------------------ shapes
def test_shapes_and_errors(model):
  still = _video((2, 1, 16, 8, 3))               # a still image is a 1-frame video
  z, _ = _moments(model, still)
  assert z.shape == (2, 1, 2, 1, 4)
  assert _decode(model, z).shape == (2, 1, 16, 8, 3)
  assert _decode(model, jnp.zeros((1, 2, 3, 5, 4))).shape == (1, 5, 24, 40, 3)
  with pytest.raises(ValueError, match="multiples of 8"):
    model.encode(_video((1, 5, 36, 32, 3)))
  with pytest.raises(ValueError, match="multiples of 8"):
    model.encode(_video((1, 5, 32, 20, 3)))
  with pytest.raises(ValueError, match=r"T must be 1 \+ 4"):
    model.encode(_video((1, 6, 32, 32, 3)))
  with pytest.raises(ValueError, match="expected video"):
    model.encode(_video((1, 5, 32, 32)))
  with pytest.raises(ValueError, match="expected latents"):
    model.decode(jnp.zeros((1, 2, 4, 4, 16)))


def test_bfloat16_compute(model):
  cfg = _tiny_config()
  cfg.dtype = "bfloat16"
  low = _random_model(cfg)                           # same weights, bf16 compute, f32 params
  assert low.encoder.conv_in.conv.kernel[...].dtype == jnp.float32
  video = _video((1, 5, 16, 16, 3))
  z32, z16 = _moments(model, video)[0], _moments(low, video)[0]
  assert z16.dtype == jnp.float32
  z16, z32 = np.asarray(z16), np.asarray(z32)
  assert np.abs(z16 - z32).max() < 0.05 * (np.abs(z32).max() + 1)


def test_presets():
  counts = {p: vae.num_params(nnx.eval_shape(lambda p=p: vae.WanVAE(vae.default_config(p),
                                                                      rngs=nnx.Rngs(0))))
            for p in vae.PRESETS}
  assert counts["tiny"] < 500_000
  assert 1_000_000 < counts["S"] < 10_000_000
  assert 126_000_000 < counts["wan2.1"] < 128_000_000    # the published Wan 2.1 VAE
  assert vae.compression(vae.default_config("wan2.1")) == (4, 8)


# ------------------------------------------------------------------------------------ import
def _to_original(key: str, num_res_blocks: int) -> str:
  """diffusers key -> original Wan2.1_VAE.pth key (the test's own inverse of the import map)."""
  for a, b in (("quant_conv.", "conv1."), ("post_quant_conv.", "conv2.")):
    if key.startswith(a):
      return b + key[len(a):]
  part, rest = key.split(".", 1)
  module, leaf = rest.rsplit(".", 1)
  names = module.split(".")
  in_block = names[0] in ("down_blocks", "up_blocks", "mid_block")
  renames = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3",
             "conv2": "residual.6", "conv_shortcut": "shortcut"}
  if names[0] == "up_blocks":
    level, per = int(names[1]), num_res_blocks + 2     # resnets + 1 up-sampler per level
    if names[2] == "resnets":
      names = ["upsamples", str(level * per + int(names[3]))] + names[4:]
    else:                                               # upsamplers.0....
      names = ["upsamples", str(level * per + num_res_blocks + 1)] + names[4:]
  elif names[0] == "down_blocks":
    names = ["downsamples"] + names[1:]
  elif names[0] == "mid_block":
    idx = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[".".join(names[1:3])]
    names = ["middle", idx] + names[3:]
  else:
    names = [{"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}[names[0]]]
  if in_block and names[-1] in renames:
    names[-1] = renames[names[-1]]
  return ".".join([part] + names + [leaf])


def test_original_layout_names():
  """Original-layout names at the published shape: ours agree with diffusers' own converter."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  from diffusers.loaders import single_file_utils  # pylint: disable=g-import-not-at-top
  convert = getattr(single_file_utils, "convert_wan_vae_to_diffusers", None)
  if convert is None:
    pytest.skip(f"diffusers {diffusers.__version__} has no convert_wan_vae_to_diffusers")
  cfg = vae.default_config("wan2.1")
  names = vae.diffusers_names(nnx.eval_shape(lambda: vae.WanVAE(cfg, rngs=nnx.Rngs(0))))
  with torch.device("meta"):
    assert names == sorted(diffusers.AutoencoderKLWan().state_dict())
  original = {_to_original(k, cfg.num_res_blocks): k for k in names}
  assert len(original) == len(names)
  theirs = convert({k: 0 for k in original})
  assert sorted(theirs) == names
  assert vae.is_original_layout(original)
  assert vae.original_to_diffusers_names(original, cfg) == original


def test_original_layout_bfloat16_file(reference, tmp_path):
  """A single bf16 .safetensors in the original key layout (like ComfyUI's wan_2.1_vae)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  ref, path = reference
  sd = {_to_original(k, 1): v.to(torch.bfloat16).contiguous() for k, v in ref.state_dict().items()}
  save_file(sd, str(tmp_path / "wan_vae_bf16.safetensors"))
  with open(os.path.join(path, "config.json")) as f:
    config = json.load(f)
  _, ours = vae.load_diffusers(str(tmp_path / "wan_vae_bf16.safetensors"), config=config)
  _, exact = vae.load_diffusers(path)
  kernel = lambda m: np.asarray(m.decoder.up_blocks[1].upsampler.time_conv.conv.kernel[...])
  want = kernel(exact).astype(ml_dtypes.bfloat16).astype(np.float32)
  np.testing.assert_array_equal(kernel(ours), want)
  assert np.abs(kernel(ours) - kernel(exact)).max() > 0     # it did go through bfloat16


def test_export_import_round_trip(model, tmp_path):
  """save_diffusers writes what load_diffusers reads back exactly (no torch involved)."""
  folder = vae.save_diffusers(model, str(tmp_path / "exported"))
  cfg, back = vae.load_diffusers(folder)
  assert cfg.z_dim == 4 and tuple(cfg.latents_std) == tuple(TINY_REF["latents_std"])
  a, b = jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(back))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_exported_folder_loads_in_diffusers(model, tmp_path):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  folder = vae.save_diffusers(model, str(tmp_path / "exported"))
  ref = diffusers.AutoencoderKLWan.from_pretrained(folder).eval()
  want = vae.to_diffusers_state(model)
  got = ref.state_dict()
  assert sorted(got) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(got[k].numpy(), v)


def test_key_errors(model, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  folder = vae.save_diffusers(model, str(tmp_path / "exported"))
  with open(os.path.join(folder, "config.json")) as f:
    config = json.load(f)
  tensors = vae.to_diffusers_state(model)
  tensors["decoder.extra.weight"] = np.zeros((2,), np.float32)
  del tensors["encoder.conv_in.bias"]
  save_file(tensors, str(tmp_path / "bad.safetensors"))
  with pytest.raises(ValueError, match=r"(?s)unknown keys \(1\).*decoder\.extra\.weight.*"
                                       r"missing keys \(1\).*encoder\.conv_in\.bias"):
    vae.load_diffusers(str(tmp_path / "bad.safetensors"), config=config)
  wrong = dict(config, base_dim=16)
  with pytest.raises(ValueError, match="shape mismatches"):
    vae.load_diffusers(os.path.join(folder, "diffusion_pytorch_model.safetensors"), config=wrong)


def test_convert_cli_round_trip(model, tmp_path):
  folder = vae.save_diffusers(model, str(tmp_path / "exported"))
  out = vae.convert_cli(["--src", folder, "--out", str(tmp_path / "converted")])
  cfg, restored = vae.load_checkpoint(out)
  assert cfg.base_dim == 8 and tuple(cfg.latents_mean) == tuple(TINY_REF["latents_mean"])
  a = jax.tree.leaves(nnx.state(restored))
  b = jax.tree.leaves(nnx.state(model))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trains_evaluates_and_pre_encodes_latents(tmp_path):
  """configs/vae_synthdyad.py through the one trainer (tiny, a few steps), its reconstruction
  evaluator, then the encode job: whole-clip latents (+ log-mels) stored as an `arrays` dataset
  that equal the trained model's normalised posterior means, read back in windows."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import arrays, encoding, pipeline  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "vae_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "vae_synthdyad.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("size=tiny,res=32,frames=5,batch=8,steps=3,eval_clips=2")
  c.data.split_sizes.train, c.data.split_sizes.test, c.data.split_sizes.ood = 8, 2, 2
  c.evals.recon.probe_clips = 4
  c.data.synthdyad.duration_s = 1.6   # 40-frame clips keep CPU evaluation short
  c.train.log_every, c.train.progress_bar = 1, False
  c.evals.sample.at_end = False
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "eval", "recon_test.json")) as f:
    m = json.load(f)["rows"]["model"]
  assert m["clips"] == 2 and np.isfinite(m["psnr"]) and m["psnr"] > 5.0
  assert {"r2_jaw_open", "r2_smile", "r2_head_pitch", "r2_jaw_open_original"} <= set(m)
  # 4 frames per latent frame: the group's first frames are also scored alone.
  assert {"r2_jaw_open_first", "r2_jaw_open_original_first"} <= set(m)
  assert m["r2_jaw_open_original_first"] <= 1.0
  # The linear probe ran from 4 train clips' latents and coarse pixels (40 frames: 9 latent groups
  # each); a probe cannot beat a perfect fit, and an untrained VAE's latents are no better at it
  # than its pixels by much.
  for ch in ("jaw_open", "head_pitch"):
    assert m[f"probe_{ch}"] <= 1.0 and m[f"probe_{ch}_pixels"] <= 1.0
    assert np.isfinite(m[f"probe_{ch}"]) and np.isfinite(m[f"probe_{ch}_pixels"])
    assert np.isfinite(m[f"probe_{ch}_first"]) and m[f"probe_{ch}_first"] <= 1.0

  out = str(tmp_path / "latents")
  encoding.encode(c, out, workdir, splits=["test"], shard_size=2, batch_size=2, progress=False)
  meta = arrays.read_metadata(out)
  assert meta["keys"]["latent_self"] == dict(dtype="<f4", shape=[4, 4, 16], per_frame=0.25)
  assert meta["keys"]["mel_self"]["per_frame"] == 2.0
  system, model, _, _ = trainer.restore_model(workdir)
  source = pipeline.make_source(c.data, "test")
  stored = arrays.ArraysSource(out, "test")
  for i in range(2):
    clip = source[i]
    x = jnp.asarray(clip["video"][None, :37], jnp.float32) * (2 / 255) - 1   # 1 + 4·9 frames
    want = np.asarray(model.normalize(model.encode(x)))[0]
    np.testing.assert_allclose(stored[i]["latent_self"], want, atol=1e-5)
    assert stored[i]["latent_self"].shape == (10, 4, 4, 16)
    # The identity's reference frame, encoded as a one-frame video: one latent per clip.
    ref = jnp.asarray(clip["reference_image"][None, None], jnp.float32) * (2 / 255) - 1
    np.testing.assert_allclose(stored[i]["reference_latent"],
                               np.asarray(model.normalize(model.encode(ref)))[0], atol=1e-5)
  assert meta["keys"]["reference_latent"] == dict(dtype="<f4", shape=[1, 4, 4, 16], per_frame=None)
  a = pipeline.default_config()
  a.source, a.arrays.dir, a.clip_frames, a.batch_size = "arrays", out, 8, 2
  batch = next(pipeline.make(a, "test", keys=("latent_self", "mel_self", "reference_latent"),
                             seed=0, shard_index=0, shard_count=1))
  assert batch["latent_self"].shape == (2, 2, 4, 4, 16) and batch["mel_self"].shape[1] == 16
  assert batch["reference_latent"].shape == (2, 1, 4, 4, 16)


def test_ridge_probe_against_the_closed_form():
  """evals/reconstruction.ridge_fit: recovers a linear map (R² ≈ 1), scores pure noise at R² ≤ 0
  on fresh rows, and with one strength equals the closed-form ridge on standardised features
  computed in float64 here, in both the primal (N > D) and dual (D > N) forms."""
  from avatar_jax.evals import reconstruction as rec  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 20)) * rng.uniform(0.1, 5, 20) + rng.normal(size=20)
  w = rng.normal(size=(20, 3))
  y = x @ w + 0.01 * rng.normal(size=(300, 3))
  xt = rng.normal(size=(100, 20)) * 2
  pred = rec.ridge_fit(x, y)(xt)
  assert min(rec.r2(p, t) for p, t in zip(pred.T, (xt @ w).T)) > 0.99
  noise = rec.ridge_fit(x, rng.normal(size=(300, 3)))(xt)
  assert max(rec.r2(p, t) for p, t in zip(noise.T, rng.normal(size=(100, 3)).T)) < 0.05
  for n, d in ((50, 8), (12, 40)):   # primal, then dual
    a, b, q = rng.normal(size=(n, d)), rng.normal(size=(n, 2)), rng.normal(size=(5, d))
    mu, sd = a.mean(0), a.std(0) + 1e-6
    s = (a - mu) / sd
    want = ((q - mu) / sd) @ np.linalg.inv(s.T @ s + 10.0 * np.eye(d)) @ s.T @ (b - b.mean(0)) \
        + b.mean(0)
    np.testing.assert_allclose(rec.ridge_fit(a, b, strengths=(10.0,))(q), want, atol=1e-8)
  with pytest.raises(ValueError, match=r"x \[N >= 4, D\]"):
    rec.ridge_fit(x[:3], y[:3])


def test_probe_pairs_each_latent_with_every_frame_of_its_group():
  """evals/reconstruction._probe_rows on a hand-made batch: latent frame k (k ≥ 1) of a 1 + 4·3
  frame clip pairs with video frames 4k−3 … 4k (all four, frame-major), its pixel row holds those
  frames' coarse thumbnails, and frame 0's lone latent is left out."""
  from avatar_jax.evals import reconstruction as rec  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  b, t_video, c = 2, 13, 5
  motion = rng.normal(size=(b, t_video, c)).astype(np.float32)
  video = rng.integers(0, 256, size=(b, t_video, 8, 8, 3)).astype(np.uint8)
  latents = rng.normal(size=(b, 4, 1, 1, 3)).astype(np.float32)   # 1 + 3 latent frames, 1×1 grid
  idx = [4, 0]
  z, pix, y = rec._probe_rows(lambda _: {"latent_self": latents},
                              {"video": video, "motion_self": motion}, idx)
  assert z.shape == (b * 3, 3) and y.shape == (b * 3, 4 * 2) and pix.shape == (b * 3, 4 * 4)
  for i in range(b):
    for k in (1, 2, 3):
      row = i * 3 + k - 1
      np.testing.assert_array_equal(z[row], latents[i, k].ravel())
      np.testing.assert_array_equal(y[row], motion[i, 4 * k - 3:4 * k + 1][:, idx].ravel())
      grey = video[i, 4 * k - 3:4 * k + 1].astype(np.float64).mean(-1)     # [4, 8, 8]
      want = grey.reshape(4, 2, 4, 2, 4).mean((2, 4)).ravel()              # 2×2 thumbnails
      np.testing.assert_allclose(pix[row], want, rtol=1e-5)
  with pytest.raises(ValueError, match="at least one latent group"):
    rec._probe_rows(lambda _: {"latent_self": latents[:, :1]},
                    {"video": video[:, :1], "motion_self": motion[:, :1]}, idx)


def test_sixty_second_clip_chunked_equals_full(model):
  """A 60-s SynthDyad clip (1497 frames = 1 + 4·374, 32×32) through the tiny VAE: the chunked
  scan (bounded memory) gives the full pass's latents and frames."""
  from avatar_jax.data.sources import SynthDyadSource  # pylint: disable=g-import-not-at-top
  clip = SynthDyadSource("test", 2, duration_s=60.0, resolution=32)[0]["video"]
  assert clip.shape[0] == 1500
  video = jnp.asarray(clip[None, :1497], jnp.float32) * (2 / 255) - 1
  full, _ = _moments(model, video, chunked=False)
  chunked, _ = _moments(model, video, chunk=4)
  assert full.shape == (1, 375, 4, 4, 4)
  assert np.abs(np.asarray(chunked) - np.asarray(full)).max() <= 1e-5
  out_full = _decode(model, full, chunked=False, clamp=False)
  out = _decode(model, full, chunk=4, clamp=False)
  assert out.shape == video.shape
  assert np.abs(np.asarray(out) - np.asarray(out_full)).max() <= 1e-5


def test_rows_split_over_the_context_axis_match_one_device(model):
  """Under a mesh with context = 4, the encoder/decoder activations are split by image rows
  (halo exchange between devices) and give the single-device numbers."""
  from avatar_jax import sharding  # pylint: disable=g-import-not-at-top
  video = _video((2, 5, 64, 32, 3), seed=3)
  want = np.asarray(_decode(model, _moments(model, video, chunked=False)[0], chunked=False))
  mesh = sharding.make_mesh({"data": 2, "context": 4})
  graphdef, state = nnx.split(model)

  def run(state, v):
    m = nnx.merge(graphdef, state)
    return m.decode(m.encode(v, chunked=False), chunked=False)

  with jax.set_mesh(mesh):
    v = jax.device_put(video, sharding.batch_sharding(mesh, 5))
    compiled = jax.jit(run).lower(state, v).compile()
    got = np.asarray(compiled(state, v))
  assert "collective-permute" in compiled.as_text()   # halo rows between row bands
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_lip_weighted_loss(model):
  """loss.lip > 0 weighs the mouth region of each clip's identity 1 + lip (the mask of
  data/synthdyad/masks.py, which tests/test_echo.py checks against the rendered mouth); the
  weighted means stay means (a uniform error gives the same value) and psnr_lips is logged."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "vae_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "vae_synthdyad.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("size=tiny,res=32,frames=5,batch=2,lip=9")
  system = vae.System(c)
  ids = {"identity_self": np.array([3, 1003]), "identity_partner": np.array([-1, 7])}
  w = np.asarray(system._pixel_weights(ids, (4, 5, 32, 32, 3), 9.0))[:, 0, :, :, 0]
  assert w.shape == (4, 32, 32) and w.min() == pytest.approx(1.0)
  assert w.max() == pytest.approx(10.0, abs=1e-3)
  for m in w:   # the heaviest pixels: centred horizontally, in the lower half of the image
    ys, xs = np.nonzero(m > 5.0)
    assert 16 < ys.mean() < 32 and abs(xs.mean() - 15.5) < 1.5
  assert not np.allclose(w[0], w[1])        # two identities, two mouth widths
  assert np.asarray(system._pixel_weights(ids, (4, 5, 32, 32, 3), 0.0)).shape == ()
  with pytest.raises(ValueError, match="loss.lip"):
    system._pixel_weights(ids, (4, 5, 32, 32, 3), -1.0)

  r = np.random.default_rng(0)
  # One-frame clips (a still image is a 1-frame video): the loss runs eagerly, twice.
  batch = {"video": r.integers(0, 256, (2, 1, 32, 32, 3), np.uint8),
           "partner_video": r.integers(0, 256, (2, 1, 32, 32, 3), np.uint8), **ids}
  graphdef, state = nnx.split(model)
  run = lambda sys_: jax.jit(lambda st, b: sys_.loss(nnx.merge(graphdef, st), b,
                                                     jax.random.key(0)))(state, batch)
  loss, m = run(system)
  c.model.loss.lip = 0.0
  loss0, m0 = run(vae.System(c))
  assert "psnr_lips" in m and "psnr_lips" not in m0 and np.isfinite(float(m["psnr_lips"]))
  assert float(m["psnr"]) == pytest.approx(float(m0["psnr"]), rel=1e-6)   # unweighted PSNR
  assert float(loss) != pytest.approx(float(loss0), rel=1e-4)


def test_inflated_vae_is_a_per_frame_image_vae():
  """temporal_init="inflate" (Wan's image → video recipe): every latent frame encodes its group's
  last video frame as a still image and decodes to it 4 times; a 1-frame (image) loss gives the
  temporal weights exactly zero gradient, so an image run keeps them for the video stage."""
  m = _random_model(_tiny_config())
  m.inflate()
  x = _video((2, 9, 32, 32, 3), seed=3)
  z, _ = _moments(m, x, chunked=False)
  still = lambda f: _moments(m, x[:, f:f + 1], chunked=False)[0][:, 0]
  np.testing.assert_allclose(z, jnp.stack([still(0), still(4), still(8)], 1), atol=1e-5)
  y = _decode(m, z, chunked=False, clamp=False)
  image = lambda j: _decode(m, z[:, j:j + 1], chunked=False, clamp=False)
  want = jnp.concatenate([image(0), jnp.repeat(image(1), 4, 1), jnp.repeat(image(2), 4, 1)], 1)
  np.testing.assert_allclose(y, want, atol=1e-4)
  np.testing.assert_allclose(_decode(m, z), y.clip(-1, 1), atol=1e-5)   # chunked: the same

  # How an image-stage run is scored (the reconstruction evaluator's `stills` option, set by
  # configs/vae_synthdyad.py for frames=1): every frame reconstructed alone, not held 4 frames.
  c = harness.load_config("vae_synthdyad", "size=tiny,res=32,frames=1")
  assert c.evals.recon.options.stills and c.evals.sample.options.stills
  system = vae.System(c)
  frames = np.random.default_rng(4).integers(0, 256, (2, 5, 32, 32, 3), dtype=np.uint8)
  got = system.generate(m, {"video": frames}, None, stills=True).value
  pixels = system._pixels(jnp.asarray(frames))
  for f in (0, 3):
    np.testing.assert_allclose(got[:, f], m(pixels[:, f:f + 1])[:, 0], atol=1e-5)
  held = system.generate(m, {"video": frames}, None).value
  assert not np.allclose(held[:, 3], got[:, 3], atol=1e-2)   # as a clip, frame 3 shows frame 4

  graphdef, state = nnx.split(m)
  image_loss = lambda st: jnp.mean(jnp.square(nnx.merge(graphdef, st)(x[:, :1], chunked=False)
                                              - x[:, :1]))
  grads = dict(nnx.to_flat_state(jax.jit(jax.grad(image_loss))(state)))
  temporal, present = [], []
  for path, g in grads.items():
    p = "/".join(map(str, path))
    if not p.endswith("kernel") or g.ndim != 5:
      continue
    if "time_conv" in p:
      temporal.append(np.asarray(g[...]))
    elif g.shape[0] == 3:
      temporal.append(np.asarray(g[:-1]))
      present.append(np.asarray(g[-1]))
  assert len(temporal) > 10 and all(not t.any() for t in temporal)
  assert all(np.abs(p).max() > 0 for p in present)   # the image weights do learn
  bad = _tiny_config()
  bad.temporal_init = "zeros"
  with pytest.raises(ValueError, match="temporal_init must be 'random' or 'inflate', found 'zeros'"):
    vae.WanVAE(bad, rngs=nnx.Rngs(0))
