"""Wan 2.1 DiT backbone (avatar_jax.models.dit): parity with diffusers' WanTransformer3DModel on a
random tiny model (with and without text cross-attention, per-example and per-frame timesteps),
presets and parameter counts, input checks, weight import errors, the extra-module hook, the
token axis split over `context` (and parameters over fsdp/tensor), and the conversion CLI."""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatar_jax.models import dit

# A tiny WanTransformer3DModel. Latents of 3 frames, 8×12 (a 3×4×6 token grid, non-square so the
# row and column RoPE parts are told apart).
TINY_REF = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4,
                out_channels=4, text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2,
                rope_max_seq_len=32)
LATENTS = (2, 3, 8, 12, 4)           # ours: [B, T, H, W, C]
TEXT = (2, 5, 16)

# Compilation dominates this file's time: XLA's CPU optimisations off (as in test_vae.py).
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


@functools.partial(_jit, static_argnums=(0,))
def _forward_jit(graphdef, state, x, timestep, text, cond):
  return nnx.merge(graphdef, state)(x, timestep, text=text, extra=cond)


def _forward(model, x, timestep, text=None, cond=None):
  return np.asarray(_forward_jit(*nnx.split(model), x, timestep, text, cond))


def _normal(shape, seed):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def reference_output(ref, x, timestep, text):
  """diffusers' forward on our channel-last latents; per-frame timesteps go in per token."""
  import torch  # pylint: disable=g-import-not-at-top
  if timestep.ndim == 2:
    timestep = np.repeat(timestep, x.shape[2] * x.shape[3] // 4, axis=1)
  with torch.no_grad():
    out = ref(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), torch.from_numpy(timestep),
              torch.from_numpy(text)).sample
  return out.numpy().transpose(0, 2, 3, 4, 1)


def wan_reference(kwargs, seed=0):
  """A random diffusers WanTransformer3DModel(**kwargs) in eval mode, moved away from identity
  norms, zero biases and the zero-initialised output layer (so every weight shows in its
  output). Shared with tests/test_beyond_monologue.py."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  ref = diffusers.WanTransformer3DModel(**kwargs).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      elif name.startswith("proj_out"):
        p.normal_(0, 0.1)
  return ref


def silence_text(ref):
  """`ref` with its text cross-attention outputs zeroed (in place): what a text-free backbone
  computes, whatever text it is handed."""
  import torch  # pylint: disable=g-import-not-at-top
  with torch.no_grad():
    for block in ref.blocks:
      block.attn2.to_out[0].weight.zero_()
      block.attn2.to_out[0].bias.zero_()
  return ref


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, its folder, the same model with the text cross-attention output zeroed, its
  folder): the second is what a text-free backbone computes."""
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  ref = wan_reference(TINY_REF)
  path = str(tmp_path_factory.mktemp("wan_dit_tiny"))
  ref.save_pretrained(path)
  quiet = diffusers.WanTransformer3DModel(**TINY_REF).eval()
  quiet.load_state_dict(ref.state_dict())
  silence_text(quiet)
  quiet_path = str(tmp_path_factory.mktemp("wan_dit_tiny_quiet"))
  quiet.save_pretrained(quiet_path)
  return ref, path, quiet, quiet_path


@pytest.fixture(scope="module")
def model(reference):
  return dit.load_diffusers(reference[1], dtype="float32")[1]


# ------------------------------------------------------------------------------------ parity
def test_matches_diffusers_with_text(reference, model):
  ref, path = reference[:2]
  assert dit.num_params(model) == sum(p.numel() for p in ref.parameters())
  x, text = _normal(LATENTS, 0), _normal(TEXT, 1)
  for timestep in (np.array([437.0, 12.5], np.float32),                  # one per example
                   np.array([[999.0, 500.0, 3.0], [250.0, 250.0, 0.0]], np.float32)):  # per frame
    want = reference_output(ref, x, timestep, text)
    got = _forward(model, x, timestep, text)
    assert got.shape == LATENTS and got.dtype == np.float32
    err = np.abs(got - want).max()
    assert err <= 1e-3, (timestep.shape, err)          # ~1e-6 in practice
    assert np.abs(want).max() > 0.5                     # not a trivially small output
  # The default bfloat16 compute (float32 norms, modulation and timestep path): ~0.6% of the range.
  _, bf16 = dit.load_diffusers(path)
  assert np.abs(_forward(bf16, x, timestep, text) - want).max() <= 2e-2 * np.abs(want).max()


def test_matches_diffusers_without_text(reference):
  _, path, quiet, quiet_path = reference
  cfg, ours = dit.load_diffusers(quiet_path, use_text=False, dtype="float32")
  assert not cfg.use_text and ours.text_embedder is None and ours.blocks[0].attn2 is None
  x, text = _normal(LATENTS, 2), _normal(TEXT, 3)      # text is ignored by the quiet reference
  timestep = np.array([700.0, 70.0], np.float32)
  want = reference_output(quiet, x, timestep, text)
  assert np.abs(_forward(ours, x, timestep) - want).max() <= 1e-3
  # The flow-convention wrapper: t = 1 − σ, opposite sign.
  t = 1.0 - timestep / 1000.0
  v = nnx.jit(lambda m, x, t: m.velocity(x, t))(ours, jnp.asarray(x), jnp.asarray(t))
  assert np.abs(np.asarray(v) + want).max() <= 1e-3
  # The same backbone weights come out of the text-full folder.
  _, same = dit.load_diffusers(path, use_text=False, dtype="float32")
  for a, b in zip(jax.tree.leaves(nnx.state(same)), jax.tree.leaves(nnx.state(ours))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_matches_diffusers_without_cross_attn_norm_temporal_patch(tmp_path):
  """cross_attn_norm=False (the text cross-attention sees the residual stream itself) and a
  2×2×2 patch (two latent frames per token)."""
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(1)
  ref = diffusers.WanTransformer3DModel(**dict(TINY_REF, num_layers=1, cross_attn_norm=False,
                                                patch_size=(2, 2, 2)))
  with torch.no_grad():
    ref.proj_out.weight.normal_(0, 0.1)
  ref.eval().save_pretrained(str(tmp_path))
  cfg, ours = dit.load_diffusers(str(tmp_path), dtype="float32")
  assert not cfg.cross_attn_norm and ours.blocks[0].norm2 is None
  x, text, ts = _normal((2, 4, 8, 12, 4), 9), _normal(TEXT, 10), np.array([10.0, 990.0], np.float32)
  want = reference_output(ref, x, ts, text)
  got = _forward(ours, x, ts, text)
  assert got.shape == x.shape and np.abs(got - want).max() <= 1e-3


# ------------------------------------------------------------------------------------ presets
def test_presets_and_param_counts():
  counts = {p: dit.count_params(dit.default_config(p)) for p in dit.PRESETS}
  assert counts["tiny"] < 3e5 < counts["S"] < counts["B"] < counts["wan2.1-1.3B"]
  assert 1.10e9 < counts["wan2.1-1.3B"] < 1.15e9            # text-free backbone
  big = dit.default_config("wan2.1-1.3B")
  big.use_text = True
  with_text = dit.count_params(big)
  assert 1.40e9 < with_text < 1.45e9                          # the published 1.3B model
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  with torch.device("meta"):
    theirs = diffusers.WanTransformer3DModel(**dit.diffusers_config(big))
  assert with_text == sum(p.numel() for p in theirs.parameters())
  # Parameters carry logical axes; the default compute dtype is bfloat16 over float32 storage.
  abstract = nnx.eval_shape(lambda: dit.DiT(dit.default_config("tiny"), rngs=nnx.Rngs(0)))
  specs = nnx.get_partition_spec(nnx.state(abstract))
  assert tuple(specs["blocks"][0]["attn1"]["to_q"]["kernel"]) == ("embed", "heads")
  assert tuple(specs["blocks"][0]["ffn"]["down"]["kernel"]) == ("mlp", "embed")
  assert abstract.dtype == jnp.bfloat16
  assert abstract.blocks[0].attn1.to_q.kernel.dtype == jnp.float32


def test_shapes():
  x = _normal((2, 4, 6, 10, 3), 4)
  tokens = dit.patchify(x, (2, 2, 1))
  assert tokens.shape == (2, 2 * 3 * 10, 2 * 2 * 1 * 3)
  np.testing.assert_array_equal(dit.unpatchify(tokens, (2, 3, 10), (2, 2, 1)), x)
  positions = np.asarray(dit.grid_positions((2, 3, 10)))
  assert positions.shape == (1, 60, 3) and tuple(positions[0, 37]) == (1, 0, 7)
  # Abstract forward of a bfloat16 preset: float32 velocities of the latents' shape.
  cfg = dit.default_config("S")
  graphdef, state = nnx.split(nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))))
  out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, jnp.zeros((2, 5))), state,
                       jax.ShapeDtypeStruct((2, 5, 32, 48, 16), jnp.bfloat16))
  assert out.shape == (2, 5, 32, 48, 16) and out.dtype == jnp.float32


# ------------------------------------------------------------------------------------ errors
def test_bad_inputs(model):
  ts = np.zeros((2,), np.float32)
  text = _normal(TEXT, 0)
  with pytest.raises(ValueError, match="multiples of the patch size"):
    model(jnp.zeros((2, 3, 7, 12, 4)), ts, text=text)
  with pytest.raises(ValueError, match="multiples of the patch size"):
    model(jnp.zeros((2, 3, 8, 11, 4)), ts, text=text)
  with pytest.raises(ValueError, match=r"latents \[B, T, H, W, 4\]"):
    model(jnp.zeros((2, 3, 8, 12, 3)), ts, text=text)
  with pytest.raises(ValueError, match="per latent frame"):
    model(jnp.zeros(LATENTS), np.zeros((2, 4), np.float32), text=text)
  with pytest.raises(ValueError, match="use_text is on"):
    model(jnp.zeros(LATENTS), ts)
  with pytest.raises(ValueError, match="invalid|unknown DiT preset"):
    dit.default_config("XL")
  bad = dit.default_config("tiny")
  bad.attention_impl = "flash"
  with pytest.raises(ValueError, match="attention_impl"):
    dit.DiT(bad, rngs=nnx.Rngs(0))


def test_key_errors(reference, model):
  cfg = model.cfg
  tensors = dit.to_diffusers_state(model)
  tensors["blocks.0.attn1.extra.weight"] = np.zeros((2,), np.float32)
  del tensors["blocks.1.ffn.net.2.bias"]
  with pytest.raises(ValueError, match=r"(?s)unknown keys \(1\).*attn1\.extra\.weight.*"
                                       r"missing keys \(1\).*blocks\.1\.ffn\.net\.2\.bias"):
    dit.from_diffusers_state(tensors, cfg)
  # Text weights into a text-free config: unknown unless explicitly left out.
  full = dit.to_diffusers_state(model)
  no_text = dit.config_from_dict(json.loads(cfg.to_json()))  # an unfrozen copy
  no_text.use_text = False
  with pytest.raises(ValueError, match=r"unknown keys \(28\).*blocks\.0\.attn2\.norm_k"):
    dit.from_diffusers_state(full, no_text)
  assert dit.from_diffusers_state(full, no_text, ignore_text=True).blocks[0].attn2 is None
  wrong = dict(TINY_REF, _class_name="WanTransformer3DModel", ffn_dim=96)
  with pytest.raises(ValueError, match="shape mismatches"):
    dit.from_diffusers_state(full, dit.config_from_diffusers(wrong))
  with pytest.raises(ValueError, match="not supported"):
    dit.config_from_diffusers(dict(wrong, image_dim=1280))


# ------------------------------------------------------------------------------------ the hook
class _Probe(nnx.Module):
  """An extra module adding cond·w to every token; checks the grid it is handed."""

  def __init__(self, d, grid, *, rngs):
    self.w = nnx.Param(jax.random.normal(rngs.params(), (d,)))
    self.grid = grid

  def __call__(self, x, cond, grid):
    assert grid == self.grid, grid
    return jnp.broadcast_to(cond[:, None, None] * self.w[...], x.shape)


def test_extra_modules(model, reference):
  cfg = model.cfg
  d = dit.width(cfg)
  assert len(model.blocks[0].extra) == 0
  graphdef, state = nnx.split(model)
  probed = nnx.merge(graphdef, state)
  probed.blocks[1].extra.append(_Probe(d, (3, 4, 6), rngs=nnx.Rngs(1)))
  x, text, ts = _normal(LATENTS, 5), _normal(TEXT, 6), np.array([300.0, 600.0], np.float32)
  base = _forward(model, x, ts, text)
  off = _forward(probed, x, ts, text, np.zeros((2,), np.float32))
  on = _forward(probed, x, ts, text, np.ones((2,), np.float32))
  np.testing.assert_allclose(off, base, atol=1e-6)
  assert np.abs(on - base).max() > 1e-2
  # Extra modules stay out of the exported backbone.
  assert set(dit.to_diffusers_state(probed)) == set(dit.to_diffusers_state(model))
  # make_extra builds them in place, with their own parameter paths.
  with_probe = nnx.eval_shape(lambda: dit.DiT(
      cfg, rngs=nnx.Rngs(0), make_extra=lambda i: [_Probe(d, (3, 4, 6), rngs=nnx.Rngs(i))]))
  paths = {p[:4] for p, _ in nnx.to_flat_state(nnx.state(with_probe))}
  assert ("blocks", 1, "extra", 0) in paths


# ------------------------------------------------------------------------------------ sharding
def test_sharded_over_context_fsdp_tensor_matches_one_device(model):
  """Tokens split over `context`, parameters over fsdp/tensor by their logical axes, remat on:
  the single-device numbers."""
  from avatar_jax import sharding  # pylint: disable=g-import-not-at-top
  x, text, ts = _normal(LATENTS, 7), _normal(TEXT, 8), np.array([100.0, 900.0], np.float32)
  want = _forward(model, x, ts, text)
  mesh = sharding.make_mesh({"fsdp": 2, "context": 2, "tensor": 2})
  state = nnx.state(model)
  cfg = dit.config_from_dict(json.loads(model.cfg.to_json()))
  cfg.remat = True
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: dit.DiT(cfg, rngs=nnx.Rngs(0))))
  shardings = sharding.tree_shardings(nnx.get_partition_spec(state), mesh)

  def run(state, x, ts, text):
    return nnx.merge(graphdef, state)(x, ts, text=text)

  with jax.set_mesh(mesh):
    state = jax.device_put(state, shardings)
    compiled = _jit(run).lower(state, x, ts, text).compile()
    got = np.asarray(compiled(state, x, ts, text))
  spec = state["blocks"][0]["ffn"]["up"]["kernel"].sharding.spec
  assert spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------------------------------ export / CLI
def test_export_and_convert_cli_round_trip(reference, model, tmp_path):
  from avatar_jax import convert  # pylint: disable=g-import-not-at-top
  from avatar_jax.models import vae  # pylint: disable=g-import-not-at-top
  _, path = reference[:2]
  saved = vae.read_safetensors(os.path.join(path, "diffusion_pytorch_model.safetensors"))
  exported = dit.to_diffusers_state(model)
  assert set(exported) == set(saved)
  for key, value in saved.items():
    np.testing.assert_array_equal(exported[key], value, err_msg=key)
  out = str(tmp_path / "converted")
  assert convert.main(["wan_dit", "--src", path, "--out", out]) == 0
  cfg, restored = dit.load_checkpoint(out, dtype="float32")
  assert cfg.use_text and cfg.num_layers == 2 and tuple(cfg.patch_size) == (1, 2, 2)
  a, b = jax.tree.leaves(nnx.state(restored)), jax.tree.leaves(nnx.state(model))
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  folder = dit.save_diffusers(restored, str(tmp_path / "exported"))
  _, again = dit.load_diffusers(folder, dtype="float32")
  assert dit.num_params(again) == dit.num_params(model)
  # Converting again into the same --out is refused and leaves the first conversion intact.
  with pytest.raises(FileExistsError, match="already holds a checkpoint.*another --out"):
    convert.main(["wan_dit", "--src", path, "--out", out])
  _, kept = dit.load_checkpoint(out, dtype="float32")
  for x, y in zip(jax.tree.leaves(nnx.state(kept)), b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_dit_step_benchmark_rows_on_cpu():
  """benchmarks/dit_step.py at a tiny shape: our rows (without and with remat) and diffusers'
  (when installed, through its gradient-checkpointing retry), all scored on the FLOPs of our
  XLA-attention lowering; out-of-memory becomes a row, not a crash."""
  import argparse  # pylint: disable=g-import-not-at-top
  from benchmarks import dit_step  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(preset="tiny", frames=3, res="32x32", text_len=8, attn=["xla"],
                            remat=["off", "on"], reps=1, warmup=1, peak_tflops=989.0,
                            matmul_tflops=1.0)
  # diffusers (when installed) is made to run out of memory: its row comes from the retry with
  # gradient checkpointing, which is what the 1.3B shape needs on an H200.
  try:
    import diffusers  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    have_diffusers = True
  except ImportError:
    have_diffusers = False
  real = dit_step.timed_or_none
  fake = lambda fn, sync, a, label: None if label.endswith("| diffusers") else real(fn, sync, a,
                                                                                     label)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(dit_step, "timed_or_none", fake)
    rows = dit_step.wan_rows(args)
  ours = [r for r in rows if r["impl"] == "ours (xla)"]
  assert len(ours) == 1 and ours[0]["ms"] > 0
  assert np.isfinite(ours[0]["flops"]) and ours[0]["flops"] > 0
  # The remat row is scored on the same model FLOPs (recomputation is not useful work).
  remat = [r for r in rows if r["impl"] == "ours (xla, remat)"]
  assert len(remat) == 1 and remat[0]["ms"] > 0 and remat[0]["flops"] == ours[0]["flops"]
  ref = [r for r in rows if r["impl"].startswith("diffusers")]
  if have_diffusers:
    assert [r["impl"] for r in ref] == ["diffusers (grad ckpt)"]
    assert ref[0]["ms"] > 0 and ref[0]["flops"] == ours[0]["flops"]
  else:
    assert not ref

  def oom():
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.58TiB")

  assert dit_step.timed_or_none(oom, lambda _: None, args, "x") is None

  def other():
    raise ValueError("a real bug")

  with pytest.raises(ValueError):
    dit_step.timed_or_none(other, lambda _: None, args, "x")
