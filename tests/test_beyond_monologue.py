"""Beyond Monologue's video DiT system (models/video/beyond_monologue.py) end to end on CPU:
a tiny VAE, its latents pre-encoded, the DiT trained, resumed and evaluated through the face
reader; windowed long-video sampling; the latent frames' times; starting from converted Wan 2.1
DiT weights."""
import importlib.util
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatar_jax import trainer
from avatar_jax.data import pipeline
from avatar_jax.evals import motion, runner
from avatar_jax.models import bm_adapters

import trainer_harness as harness

# One worker runs this module, so its VAE, latents and trained DiT are built once.
pytestmark = pytest.mark.xdist_group("beyond_monologue")




def _config(name, arg):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(os.path.dirname(__file__), "..", "configs", f"{name}.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
  """(VAE workdir, latents dir): a tiny VAE after 2 steps, and its encoded SynthDyad at 32 px
  (trainer_harness.video_latents, shared with tests/test_echo.py)."""
  return harness.video_latents(tmp_path_factory)


def _bm_config(latents, arg=""):
  vae_dir, lat = latents
  c = _config("bm_synthdyad", f"size=tiny,res=32,latents={lat},vae={vae_dir},clip_frames=16,batch=8,"
                              f"eval_clips=3{',' + arg if arg else ''}")
  c.evals.sample.at_end = False
  c.evals.test.split = "test"
  c.train.progress_bar = False
  return c


def test_window_latent_times():
  fps = 25.0
  np.testing.assert_allclose(bm_adapters.window_latent_times(np.array([0]), 5, fps)[0],
                             bm_adapters.latent_times(5, fps), atol=1e-7)
  # A window starting at row 3 (video frame 12): its row 0 stands for frames 9..12, centred
  # 1.5 frames before the window's first frame; later rows every 4 frames.
  got = np.asarray(bm_adapters.window_latent_times(np.array([3, 1]), 3, fps))
  np.testing.assert_allclose(got, np.array([[-1.5, 2.5, 6.5], [-1.5, 2.5, 6.5]]) / fps, atol=1e-7)


@pytest.fixture(scope="module")
def trained(latents, tmp_path_factory):
  """A tiny DiT trained 3 steps on the latents, then evaluated (test split, 2 clips)."""
  config = _bm_config(latents, "steps=3")
  config.train.ckpt_every = 3   # only the last step's checkpoint: the tests read that one
  return harness.built_once(tmp_path_factory, "bm_trained",
                            lambda path: trainer.train_and_evaluate(config, path))


def test_trains_resumes_and_scores_video(latents, trained, tmp_path):
  workdir = trained
  with open(os.path.join(workdir, "eval", "test.json")) as f:
    rows = json.load(f)["rows"]
  assert set(rows) == {"model", "shuffled audio", motion.RECONSTRUCTED, motion.CROSSTALK,
                       "ground truth (read)"}
  # The face reader reads the true 32-px renders almost perfectly: the table's ceiling.
  assert rows["ground truth (read)"]["lip_corr"] > 0.9
  for name in ("model", "shuffled audio", motion.RECONSTRUCTED, motion.CROSSTALK):
    assert rows[name]["clips"] == 3
    assert np.isfinite(rows[name]["fd_face"]) and rows[name]["fd_face"] > 0
    assert np.isfinite(rows[name]["lip_corr"])
    # (The crosstalk row's partners never talk alone within these 1.6-s clips: no jaw_leak.)
    assert name == motion.CROSSTALK or np.isfinite(rows[name]["jaw_leak"])
  assert np.isnan(rows[motion.CROSSTALK]["smile_resp"])
  # The VAE was loaded frozen (init_from.vae), the DiT trained.
  system, model, config, step = trainer.restore_model(workdir)
  assert step == 3 and config.init_from.vae.into == "model/vae"
  vae_model = trainer.restore_model(latents[0])[1]
  np.testing.assert_array_equal(np.asarray(model.vae.decoder.conv_in.conv.kernel[...]),
                                np.asarray(vae_model.decoder.conv_in.conv.kernel[...]))
  # Rerunning with more steps resumes from step 3 (in a copy: the fixture stays at step 3).
  again = str(tmp_path / "again")
  shutil.copytree(workdir, again)
  c2 = _bm_config(latents, "steps=5")
  c2.evals = {}
  trainer.train_and_evaluate(c2, again, allow_config_change=("train.num_steps",))
  assert trainer.restore_model(again)[3] == 5


def _flat_params(module, skip=()):
  """{"a/b/0/c": array} of a module's nnx.Params, leaving out paths through any `skip` name."""
  return {"/".join(map(str, p)): np.asarray(v[...])
          for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param)) if not set(skip) & set(p)}


def test_starts_unchanged_from_converted_wan_weights(latents, tmp_path):
  """docs/video_dit.md's path from published Wan 2.1 DiT weights: a diffusers
  WanTransformer3DModel of the tiny backbone's shape (text cross-attention included, as Wan
  publishes it, with its output zeroed so that it computes what the text-free backbone does),
  converted by `python -m avatar_jax.convert wan_dit --no_text`, then trained with
  init_from.main.workdir=<converted>, into=model/dit. Every backbone weight lands in model.dit;
  the audio adapters keep their initialisation; the velocity at step 0 is the bare Wan DiT's
  (ours and diffusers'), since the audio cross-attention's output projections start at zero."""
  pytest.importorskip("torch")
  pytest.importorskip("diffusers")
  from ml_collections.config_flags import tuple_parser  # pylint: disable=g-import-not-at-top
  from avatar_jax import checkpointing, convert, sharding  # pylint: disable=g-import-not-at-top
  from avatar_jax.models import dit  # pylint: disable=g-import-not-at-top
  from test_dit import (  # pylint: disable=g-import-not-at-top
      reference_output, silence_text, wan_reference)
  config = _bm_config(latents, "steps=2,dtype=float32")
  config.evals = {}
  dcfg = config.model.dit
  assert not dcfg.use_text
  ref = silence_text(wan_reference(dit.diffusers_config(dcfg)))
  ref.save_pretrained(str(tmp_path / "wan"))
  out, out_text = str(tmp_path / "converted"), str(tmp_path / "converted_text")
  assert convert.main(["wan_dit", "--src", str(tmp_path / "wan"), "--out", out, "--no_text"]) == 0
  assert convert.main(["wan_dit", "--src", str(tmp_path / "wan"), "--out", out_text]) == 0
  # The checkpoint holds the backbone only (no audio adapters), as frozen parameters.
  ckpt = checkpointing.Checkpointer(os.path.join(out, "checkpoints"))
  meta = ckpt.state_metadata(0)
  ckpt.close()
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(meta)[0]]
  assert set(meta) == {"frozen"} and any("'blocks'" in p for p in paths)
  assert not [p for p in paths if any(f"'{w}'" in p for w in ("extra", "qf", "null", "front"))]
  _, bare = dit.load_checkpoint(out, dtype="float32")
  converted = _flat_params(bare)

  # ---------------------------------------------------------------- step 0, through setup
  config.init_from.main.workdir = out
  config.init_from.main.into = "model/dit"
  mesh = sharding.make_mesh(dict(config.mesh))
  s = trainer.setup(config, mesh, init_from=False)
  fresh = s.model(jax.device_get(s.state))
  state = trainer.load_init_from(s.state, s.shardings, config.init_from)   # what setup does
  model = s.model(state)
  for ema in (True, False):       # trained parameters and their EMA both start at the weights
    got = _flat_params(s.model(state, ema=ema).dit, skip=("extra",))
    assert set(got) == set(converted)
    for k, v in converted.items():
      np.testing.assert_array_equal(got[k], v, err_msg=k)
  init = _flat_params(fresh, skip=("vae",))
  loaded = _flat_params(model, skip=("vae",))
  backbone = {f"dit/{k}" for k in converted}
  assert [k for k in init if k.startswith(("qf/", "null/")) or "/extra/" in k]   # the adapters
  for k, v in init.items():
    if k in backbone:
      assert np.abs(loaded[k] - v).max() > 0, k           # replaced (no weight equals its init)
    else:
      np.testing.assert_array_equal(loaded[k], v, err_msg=k)   # adapters keep their init

  # The velocity at init: BM's (reference frame prepended as latent frame 0 at t = 1, audio
  # cross-attention on both streams) = the bare converted DiT's = diffusers' (σ = 1 − t).
  it = pipeline.make(config.data, "train", keys=s.system.data_spec().keys, shuffle=False,
                     num_epochs=1, shard_index=0, shard_count=1)
  batch = s.batch(next(it))
  b, f = batch["latent_self"].shape[:2]
  r = np.random.default_rng(0)
  x_t = r.normal(size=batch["latent_self"].shape).astype(np.float32)
  t = r.uniform(0.05, 0.95, (b, f)).astype(np.float32)
  x_full = np.concatenate([np.asarray(batch["reference_latent"]), x_t], axis=1)
  t_full = np.concatenate([np.ones((b, 1), np.float32), t], axis=1)
  with trainer.use_mesh(mesh):
    def bm_velocity(model, batch, x_t, t):
      drop = {k: jnp.zeros((b,), bool) for k in ("self", "partner")}
      first_row = jnp.asarray(batch["clip_start"], jnp.int32) // config.model.stride
      cond = model.condition(batch, first_row, f, drop)
      return model(x_t, t, batch["reference_latent"], cond), cond

    got, cond = nnx.jit(bm_velocity)(model, batch, jnp.asarray(x_t), jnp.asarray(t))
    got = np.asarray(got)
  assert min(np.abs(np.asarray(cond[k]["tokens"])).max() for k in ("self", "partner")) > 0.1
  bare_v = np.asarray(nnx.jit(lambda m, x, t: m.velocity(x, t))(bare, x_full, t_full))[:, 1:]
  text = r.normal(size=(b, 3, dcfg.text_dim)).astype(np.float32)   # silenced in the reference
  want = -reference_output(ref, x_full, (1.0 - t_full) * 1000.0, text)[:, 1:]
  assert got.shape == want.shape == x_t.shape and np.abs(want).max() > 0.5
  err_bare, err_ref = np.abs(got - bare_v).max(), np.abs(got - want).max()
  print(f"max |v_BM - v_Wan (ours)| = {err_bare:.2e}, max |v_BM - v_diffusers| = {err_ref:.2e}")
  assert err_bare <= 1e-4 and err_ref <= 1e-4, (err_bare, err_ref)

  # ---------------------------------------------------------------- the text-full conversion
  # Its text weights have no place in the text-free backbone: the error names them and the
  # `exclude` that leaves them out, which then loads the same backbone.
  config.init_from.main.workdir = out_text
  with pytest.raises(ValueError, match=r"(?s)no counterpart 'model/dit/blocks/0/attn2/.*"
                                       r"\^blocks/\[0-9\]\+/attn2/ \(20 variables\).*"
                                       r"\^text_embedder/ \(4 variables\).*exclude=") as e:
    trainer.load_init_from(s.state, s.shardings, config.init_from)
  flag = re.search(r"exclude='([^']*)'", str(e.value)).group(1)
  config.init_from.main.exclude = tuple(tuple_parser.TupleParser().parse(flag))
  again = _flat_params(s.model(trainer.load_init_from(s.state, s.shardings, config.init_from)).dit,
                       skip=("extra",))
  for k, v in converted.items():
    np.testing.assert_array_equal(again[k], v, err_msg=k)

  # ---------------------------------------------------------------- training from them
  config.init_from.main.workdir, config.init_from.main.exclude = out, ()
  workdir = str(tmp_path / "bm_from_wan")
  trainer.train_and_evaluate(config, workdir)
  losses = harness.read_scalars(os.path.join(workdir, "tb"), "train/loss")[0]
  assert sorted(losses) == [2] and np.isfinite(losses[2])
  _, trained, _, step = trainer.restore_model(workdir, ema=False)
  assert step == 2
  moved = _flat_params(trained.dit, skip=("extra",))
  # Two Adam steps from the converted weights (lr 1e-3), not from a fresh initialisation.
  diffs = [np.abs(moved[k] - v).max() for k, v in converted.items()]
  assert 0 < max(diffs) < 1e-2, max(diffs)


def test_windowed_sampling_continues_each_window_from_the_last(trained):
  system, model, config, _ = trainer.restore_model(trained)
  spec = system.data_spec()
  data = runner.data_config(config, runner.evaluator("synthdyad", windows="full", batch_size=2))
  batch = next(pipeline.make(data, "test", keys=spec.keys, shuffle=False,
                             num_epochs=1, shard_index=0, shard_count=1))
  rows = batch["latent_self"].shape[1]                          # 10 latent rows
  gen = jax.jit(lambda b, r: system.generate(model, b, r, window=4, overlap=1, steps=2,
                                             decode=False))
  b = {k: jnp.asarray(v) for k, v in batch.items() if k in spec.keys}
  out = gen(b, jax.random.key(0))
  win = np.asarray(out.extras["windows"])                       # [3, B, 4, h, w, z]
  assert out.value.shape == batch["latent_self"].shape and win.shape[:3] == (3, 2, 4)
  for j in (1, 2):                  # each window starts from the last row of the one before
    np.testing.assert_array_equal(win[j][:, 0], win[j - 1][:, -1])
  np.testing.assert_array_equal(np.asarray(out.value)[:, :4], win[0])
  np.testing.assert_array_equal(np.asarray(out.value)[:, 4:7], win[1][:, 1:])
  assert np.all(np.isfinite(win)) and rows == 10
  # The reference frame may come as an image (encoded by the frozen VAE) instead of its latent.
  no_latent = {k: v for k, v in b.items() if k != "reference_latent"}
  _, refs = motion.truth_videos(config, "test", batch, 1)      # re-rendered from the generator
  no_latent["reference_image"] = jnp.asarray(np.stack(refs))
  out_img = gen(no_latent, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(out_img.value), np.asarray(out.value), atol=2e-4)
  with pytest.raises(ValueError, match="overlap 4 must be in"):
    system.generate(model, b, jax.random.key(0), window=4, overlap=4, steps=1, decode=False)


def test_reconstruct_decodes_the_stored_latents(trained):
  """The table's "true latents, decoded" row: the encode job's stored latents, denormalised and
  decoded by the DiT run's frozen VAE, equal the VAE's own reconstruction of the true video (so
  the row is the ceiling of this latent space, not of a different or unnormalised one)."""
  system, model, config, _ = trainer.restore_model(trained)
  data = runner.data_config(config, runner.evaluator("synthdyad", windows="full", batch_size=2))
  batch = next(pipeline.make(data, "test", keys=system.data_spec().keys, shuffle=False,
                             num_epochs=1, shard_index=0, shard_count=1))
  got = np.asarray(system.reconstruct(model, batch).value)
  t = got.shape[1]                                        # 1 + 4 (F - 1) frames
  true, _ = motion.truth_videos(config, "test", batch, t)
  pixels = jnp.asarray(np.stack(true), jnp.float32) * (2.0 / 255.0) - 1.0
  want = np.asarray(model.vae(pixels))
  assert got.shape == want.shape == (2, t, 32, 32, 3)
  np.testing.assert_allclose(got, want, atol=2e-4)
  # ... and are not the true frames (the 2-step VAE reconstructs them poorly).
  assert np.abs(got - np.asarray(pixels)).mean() > 0.05


def test_sample_from_wavs_and_a_reference_image(trained, tmp_path):
  """`python -m avatar_jax.sample --reference face.png --self-audio a.wav --partner-audio b.wav`
  on the video system: any audio length, the face from an image file."""
  from avatar_jax.data import media  # pylint: disable=g-import-not-at-top
  from avatar_jax.data.synthdyad import render as sd_render  # pylint: disable=g-import-not-at-top
  from avatar_jax.evals import samples  # pylint: disable=g-import-not-at-top
  from avatar_jax import render  # pylint: disable=g-import-not-at-top
  system, model, config, _ = trainer.restore_model(trained)
  r = np.random.default_rng(0)
  media.write_wav(tmp_path / "a.wav", 0.1 * r.standard_normal(int(16000 * 1.3)).astype(np.float32))
  media.write_wav(tmp_path / "b.wav", 0.1 * r.standard_normal(int(16000 * 0.9)).astype(np.float32))
  face = sd_render.reference_image(render.identity(config, render.default_identities()[1]), 48)
  media.write_png(tmp_path / "face.png", face)
  got = media.read_image(tmp_path / "face.png", 32)
  assert got.shape == (32, 32, 3) and got.dtype == np.uint8
  out = str(tmp_path / "out.mp4")
  frames = samples.wav_video(system, model, config, str(tmp_path / "a.wav"),
                             str(tmp_path / "b.wav"), out, jax.random.key(0),
                             reference=str(tmp_path / "face.png"))
  # 1.3 s = 32 frames at 25 fps -> 8 latent rows -> 1 + 4·7 frames.
  assert frames.shape == (29, 32, 32, 3) and os.path.getsize(out) > 0
  with pytest.raises(FileNotFoundError, match="does not exist"):
    media.read_image(tmp_path / "missing.png")


def test_seam_frames_and_seam_jump():
  from avatar_jax.evals import long_video  # pylint: disable=g-import-not-at-top
  # 10 latent rows, windows of 4 overlapping by 1 (test above): new rows begin at 4 and 7, i.e.
  # video frames 13 and 25 follow frames 12 and 24.
  np.testing.assert_array_equal(long_video.seam_frames(10, 4, 1, 4), [12, 24])
  np.testing.assert_array_equal(long_video.seam_frames(15, 4, 2, 4), [12, 20, 28, 36, 44, 52])
  assert long_video.seam_frames(4, 8, 2, 4).size == 0          # one window: no seam
  r = np.random.default_rng(0)
  smooth = np.cumsum(r.normal(0, 1, (37, 4, 4, 3)), axis=0)
  seams = np.array([12, 24])
  assert 0.3 < long_video.seam_jump(smooth, seams) < 3.0
  jumpy = smooth.copy()
  jumpy[13:] += 40.0
  jumpy[25:] -= 40.0
  assert long_video.seam_jump(jumpy, seams) > 10.0
  assert np.isnan(long_video.seam_jump(smooth, np.array([], np.int64)))


def test_long_video_segments(trained):
  """The `long` evaluator on clips 1.6 s long (10 latent rows: 4 windows of 4 rows overlapping
  by 2) in 0.8-s segments: one row of metrics per segment, the seams of the stitched windows."""
  system, model, config, step = trainer.restore_model(trained)
  res = runner.run(system, model, config, trained, step=step, only=["long"], force=True,
                   overrides=dict(duration_s=1.6, segment_s=0.8))
  out = res["long"]["test"]
  segs, summary = out["segments"], out["summary"]
  # 10 latent rows decode to 1 + 4·9 = 37 frames: the last segment ends at 1.48 s.
  got = [v for s in segs for v in (s["start_s"], s["end_s"])]
  assert got == pytest.approx([0.0, 0.8, 0.8, 1.48])
  for s in segs:
    assert np.isfinite(s["fd_face"]) and s["fd_face"] > 0 and np.isfinite(s["jaw_leak"])
  assert summary["windows"] == 4 and summary["clips"] == 2
  assert np.isfinite(summary["seam_jump"]) and np.isfinite(summary["seam_jump_truth"])
  assert summary["fd_growth"] == pytest.approx(segs[-1]["fd_face"] / segs[0]["fd_face"])
  with open(os.path.join(trained, "eval", "long_test.md")) as f:
    assert "seam_jump" in f.read()


def test_b_model_train_step_lowers_for_hopper(monkeypatch):
  """The B@128 training step (one block: every block has the same shapes), lowered for CUDA as
  `auto` resolves on an H100/H200: every fused-kernel call fits a Hopper CTA's shared memory
  (Mosaic GPU checks it while lowering). B's Q-Former attention has head dim 192, which once
  went to the fused kernel and failed to compile on the GPU."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from avatar_jax.kernels.gaussian_attention import api  # pylint: disable=g-import-not-at-top
  from avatar_jax.models.video import beyond_monologue as bm  # pylint: disable=g-import-not-at-top
  from benchmarks import dit_step  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(api, "target_platform", lambda: "gpu")
  monkeypatch.setattr(api, "_is_hopper", lambda: True)
  monkeypatch.setattr(api, "_gpu_module_available", lambda: True)
  config = _config("bm_synthdyad", "size=B,res=128,vae=,batch=2")
  config.data.source = "synthdyad"          # only the data facts are read
  config.model.dit.num_layers = 1
  system = bm.System(config)
  graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: system.build(rngs=nnx.Rngs(0))),
                                     nnx.Param, ...)
  batch = dit_step.bm_batch(config, 2, 128)
  loss = lambda p, b, k: system.loss(nnx.merge(graphdef, p, rest), b, k)[0]
  text = jax.jit(jax.value_and_grad(loss)).trace(params, batch, jax.random.key(0)).lower(
      lowering_platforms=("cuda",)).as_text()
  assert "mosaic_gpu" in text               # the audio cross-attention took the fused kernel
