"""ECHO on the video DiT (models/video/echo.py, configs/echo_synthdyad.py): face/lip masks
against the SynthDyad renderer, SDCM's formula at the gate's limits, the causal long-range
context, both stages through the trainer, and stage 2 starting exactly at stage 1."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from avatar_jax import checkpointing, sharding, trainer
from avatar_jax import system as system_lib
from avatar_jax.data import pipeline
from avatar_jax.evals import runner
from avatar_jax.data.synthdyad import generator as sd
from avatar_jax.data.synthdyad import identity as identity_lib
from avatar_jax.data.synthdyad import masks as masks_lib
from avatar_jax.data.synthdyad import motion as motion_lib
from avatar_jax.data.synthdyad import render as render_lib
from avatar_jax.models import registry
from avatar_jax.models.video import echo

import trainer_harness as harness

# Its trained workdirs are built once per module, on one worker.
pytestmark = pytest.mark.xdist_group("echo")


_config = harness.load_config
# LLVM optimisation is most of the CPU compile time and buys nothing at these sizes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


TINY = ("size=tiny,res=32,clip_frames=16,span=40,chunk_s=0.16,batch=8,eval_clips=2,"
        "dtype=float32")


def _system(arg=""):
  """A stage-2 system on the generator's data facts (no data read, no model built)."""
  c = _config("echo_synthdyad", f"{TINY},stage=2,init=,vae={',' + arg if arg else ''}")
  c.unlock()
  c.data.source = "synthdyad"
  return registry.get(c.model.name)(c)


def _echo_config(latents, arg):
  vae_dir, lat = latents
  c = _config("echo_synthdyad", f"{TINY},latents={lat},vae={vae_dir},{arg}")
  c.evals = {}          # the face-reader table runs in test_beyond_monologue.py
  c.train.progress_bar, c.train.log_every = False, 1
  c.model.dit.num_layers = 1       # compile time: one block shows the wiring
  return c


@pytest.fixture(scope="module")
def latents(tmp_path_factory):
  return harness.video_latents(tmp_path_factory)


@pytest.fixture(scope="module")
def stage1(latents, tmp_path_factory):
  """The stage-1 workdir (role-agnostic base): 2 steps of the trainer's own step, saved in the
  trainer's checkpoint layout. One device: compiling for 8 fake CPU devices (what
  train_and_evaluate does) costs more and shows nothing more here."""

  def build(path):
    c = _echo_config(latents, "stage=1,steps=2")
    s = trainer.setup(c, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]),
                      compiler_options=FAST_COMPILE)
    it = pipeline.make(c.data, "train", keys=s.system.data_spec().keys, seed=c.seed)
    state = s.state
    with trainer.use_mesh(s.mesh):
      for _ in range(2):
        state, metrics = s.train_step(state, s.batch(next(it)))
    assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 2
    ckpt = checkpointing.Checkpointer(os.path.join(path, "checkpoints"), async_save=False)
    ckpt.save(2, state, config=c, force=True)
    ckpt.wait()
    ckpt.close()

  return harness.built_once(tmp_path_factory, "echo_stage1", build)


@pytest.fixture(scope="module")
def stage2(latents, stage1):
  """(setup, test batch, gen): stage 2 built by the trainer from stage 1 (init_from), two whole
  test clips, and a jitted `generate(state, batch, rng)` of the stage-2 model."""
  c = _echo_config(latents, f"stage=2,init={stage1},steps=2")
  # One device: compiling for 8 fake CPU devices costs more and shows nothing more here.
  s = trainer.setup(c, sharding.make_mesh({"data": 1}, devices=jax.devices()[:1]), fit=False,
                    compiler_options=FAST_COMPILE)
  spec = s.system.data_spec()
  data = runner.data_config(c, runner.evaluator("synthdyad", windows="full", batch_size=2))
  batch = next(pipeline.make(data, "test", keys=spec.keys, shuffle=False, num_epochs=1,
                             shard_index=0, shard_count=1))
  gen = jax.jit(lambda state, b, rng: s.system.generate(
      nnx.merge(s.graphdef, state["ema"], state["frozen"], state["rest"]), b, rng, steps=2,
      decode=False).value, compiler_options=FAST_COMPILE)
  return s, {k: jnp.asarray(v) for k, v in batch.items() if k in spec.keys}, gen


# ------------------------------------------------------------------------------------ masks
def _classes(frame, ident):
  """Pixel classes of a rendered frame by nearest layer colour (render._colours' order), -1
  where anti-aliasing blends layers."""
  cols = render_lib._colours(ident)  # pylint: disable=protected-access
  d = np.linalg.norm(frame.astype(np.float32)[:, :, None] / 255.0 - cols[None, None], axis=-1)
  return np.where(d.min(-1) < 0.05, d.argmin(-1), -1)


def test_masks_land_on_the_rendered_face_and_mouth():
  res, c = 64, motion_lib.CHANNEL_INDEX
  m = render_lib.neutral_motion(3)
  m[1, c["jaw_open"]], m[1, c["smile"]] = 1.0, 1.0                 # widest, tallest mouth
  m[2, c["jaw_open"]], m[2, c["lip_round"]] = 0.8, -1.0            # during a nod, head turned
  m[2, c["head_pitch"]], m[2, c["head_yaw"]] = 0.12, 0.08
  for ident_id in (1003, 1150):
    ident = identity_lib.make_identity(ident_id, 0)
    frames = render_lib.render(m, ident, res)
    face, lip = (np.asarray(x[0]) for x in masks_lib.synthdyad_masks(
        np.array([ident.face_aspect]), np.array([ident.mouth_width]), (res, res)))
    for t in range(3):
      cls = _classes(frames[t], ident)
      skin, bg, eyes = cls == 1, cls == 0, np.isin(cls, (3, 4))
      mouth = np.isin(cls, (7, 8))                                   # lips, mouth interior
      assert skin.sum() > 600 and np.all(face[skin] > 0.5)
      assert np.mean(face[bg] < 0.5) > 0.85                          # all but the margin ring
      assert np.all(lip[eyes] < 0.05)
      if t:
        assert mouth.sum() > 30 and np.mean(lip[mouth] > 0.5) > 0.95
      # The lip mask sits on the lower face: its mass is on skin and mouth pixels.
      assert lip[skin | mouth].sum() / lip.sum() > 0.75
    # Per latent token (64 px, VAE ×8, patch 2: a 4×4 grid of 16-px cells): the cell mean of
    # the pixel masks, and the mouth's centre in the cell with the most lip.
    tf, tl = (np.asarray(x[0]) for x in masks_lib.synthdyad_masks(
        np.array([ident.face_aspect]), np.array([ident.mouth_width]), (4, 4)))
    np.testing.assert_allclose(tf, face.reshape(4, 16, 4, 16).mean((1, 3)), atol=0.03)
    np.testing.assert_allclose(tl, lip.reshape(4, 16, 4, 16).mean((1, 3)), atol=0.03)
    ys, xs = np.nonzero(np.isin(_classes(frames[1], ident), (7, 8)))
    cell = np.unravel_index(np.argmax(tl), tl.shape)
    assert cell == (int(ys.mean()) // 16, int(xs.mean()) // 16)


def test_masks_from_identity_the_mean_face_or_the_batch():
  system = _system()
  geo = system.geometry
  ident = jnp.array([1003, -1], jnp.int32)
  got = system.masks({"identity_self": ident}, (4, 4), 2)
  want = masks_lib.synthdyad_masks(np.array([geo[1003, 0], geo[:, 0].mean()]),
                              np.array([geo[1003, 1], geo[:, 1].mean()]), (4, 4))
  np.testing.assert_allclose(got["face_mask"], np.asarray(want[0]).reshape(2, 16), atol=1e-6)
  np.testing.assert_allclose(got["lip_mask"], np.asarray(want[1]).reshape(2, 16), atol=1e-6)
  # Real video: masks in the batch (e.g. a face parser's, at 32 px) win, averaged per token.
  r = np.random.default_rng(0)
  face, lip = r.uniform(size=(2, 32, 32)), r.uniform(size=(2, 32, 32))
  got = system.masks({"identity_self": ident, "face_mask": face, "lip_mask": lip}, (4, 4), 2)
  np.testing.assert_allclose(got["lip_mask"], lip.reshape(2, 4, 8, 4, 8).mean((2, 4)).reshape(2, 16),
                             atol=1e-6)
  with pytest.raises(ValueError, match="multiples of the token grid 4×4"):
    system.masks({"face_mask": face[:, :30], "lip_mask": lip}, (4, 4), 2)


# ------------------------------------------------------------------------------------- SDCM
def test_sdcm_gate_limits_give_the_documented_formulas(stage2):
  model = nnx.clone(stage2[0].model())     # edited below; the fixture's state stays as loaded
  block = model.dit.blocks[0].extra[0]
  assert isinstance(block, echo.SDCM)
  r = np.random.default_rng(1)
  # The cross-attentions' outputs start at zero; give them weights so both streams speak.
  for ca in (block.avatar, block.user, block.context):
    k = ca.attn.o.kernel
    k[...] = jnp.asarray(r.normal(0, 0.3, k.shape), k.dtype)
  b, grid = 2, (2, 2, 2)
  d = model.dit.blocks[0].ffn.up.kernel.shape[0]
  x = jnp.asarray(r.normal(size=(b, 8, d)), jnp.float32)
  toks = lambda n: {"tokens": jnp.asarray(r.normal(size=(b, n, d)), jnp.float32),
                    "times": jnp.asarray(np.sort(r.uniform(-2, 1, (b, n))), jnp.float32)}
  face, lip = r.uniform(size=(b, 4)), r.uniform(size=(b, 4))
  cond = {"self": toks(6), "partner": toks(6), "context": toks(3),
          "face_mask": jnp.asarray(face, jnp.float32), "lip_mask": jnp.asarray(lip, jnp.float32)}
  h_a, h_u = (np.asarray(h) for h in block.streams(x, cond, grid))
  assert np.abs(h_a).mean() > 1e-2 and np.abs(h_u).mean() > 1e-2
  per_token = lambda mk: np.tile(mk, (1, grid[0]))[..., None]       # [B, h·w] -> [B, N, 1]
  m_lip = per_token(lip)
  m_face = per_token(face) * (1 - m_lip)
  # Fresh (mix = 0): the role-agnostic stage-1 update, whatever the gate.
  np.testing.assert_allclose(np.asarray(block(x, cond, grid)), h_a + h_u, rtol=1e-6, atol=1e-6)
  block.mix[...] = jnp.ones(())
  bias = block.gate_avatar.bias
  for g, want in ((1.0, (m_face + m_lip) * h_a), (0.0, m_face * h_u + m_lip * h_a)):
    bias[...] = jnp.full(bias.shape, 1e4 if g else -1e4, bias.dtype)
    np.testing.assert_allclose(np.asarray(block.gate(jnp.asarray(h_a), jnp.asarray(h_u), grid)),
                               g, atol=1e-6)
    np.testing.assert_allclose(np.asarray(block(x, cond, grid)), want, rtol=1e-5, atol=1e-5)
  # g = 0: the partner's tokens reach the lips only through the rest of the face.
  cond["partner"] = toks(6)
  moved = np.abs(np.asarray(block(x, cond, grid)) - (m_face * h_u + m_lip * h_a))
  np.testing.assert_array_less(moved, m_face * np.abs(h_u - np.asarray(block.streams(
      x, cond, grid)[1])) + 1e-4)


# ---------------------------------------------------------------------------------- context
def test_context_is_causal_reads_labels_and_spans_minutes(stage2):
  model = stage2[0].model()
  enc = model.context_encoder
  r = np.random.default_rng(2)
  run = nnx.jit(lambda e, a, m: e(a, m))
  # Three minutes of the partner: one causal scan over 1125 chunks.
  mel = r.normal(size=(1, 9000, enc.norm_a.scale.shape[0] // 2)).astype(np.float32)
  motion = r.normal(size=(1, 4500, 10)).astype(np.float32)
  states = np.asarray(run(enc, jnp.asarray(mel), jnp.asarray(motion)))
  assert states.shape[1] == 1 + 9000 // enc.audio_chunk and np.all(np.isfinite(states))
  # Chunk j's state never sees later audio or motion.
  j = 20
  later_mel, later_motion = mel.copy(), motion.copy()
  later_mel[:, j * enc.audio_chunk:] += 5.0
  later_motion[:, j * enc.frame_chunk:] -= 3.0
  again = np.asarray(run(enc, jnp.asarray(later_mel), jnp.asarray(later_motion)))
  np.testing.assert_allclose(again[:, :j + 1], states[:, :j + 1], rtol=1e-5, atol=1e-5)
  assert np.abs(again[:, j + 1:] - states[:, j + 1:]).mean() > 1e-2
  # A window of 4 latent rows starting at row 10 (video frames 40..55) reads the 4 latest
  # states ending by frame 56 (chunk of 4 frames: state 14 is chunks 0..13, up to frame 56).
  tok, t = enc.window_tokens(jnp.asarray(states), jnp.array([10]), 4, 4, 25.0, 4)
  np.testing.assert_array_equal(np.asarray(tok)[0], states[0, 11:15])
  np.testing.assert_allclose(np.asarray(t)[0], (np.arange(11, 15) * 4 - 40) / 25.0, atol=1e-6)
  tok0, _ = enc.window_tokens(jnp.asarray(states), jnp.array([0]), 1, 4, 25.0, 4)
  np.testing.assert_array_equal(np.asarray(tok0)[0], states[0, [0, 0, 0, 1]])  # clip start

  # Labels: SynthDyad's partner events as per-frame features, a pluggable input.
  sample = sd.make_sample("train", 1, render=False)
  lab = echo.synthdyad_labels(sample["events"], 200, 25.0)
  ev = sample["events"]
  for name in ("laughter", "question"):
    col = lab[:, echo.LABEL_EVENTS.index(name)]
    sel = (ev["type"] == sd.EVENT_INDEX[name]) & (ev["who"] == 1)
    assert col.sum() >= sel.sum()
    for s in ev["start"][sel]:
      assert col[int(s * 25)] == 1.0
  ccfg = ml_collections.ConfigDict(dict(chunk_s=0.16, motion=False, labels="labels_partner",
                                       labels_dim=len(echo.LABEL_EVENTS)))
  with_labels = echo.UserContext(ccfg, audio_dim=mel.shape[-1], audio_rate=50.0, fps=25.0,
                                 motion_dim=10, dim=16, rngs=nnx.Rngs(0))
  audio = jnp.asarray(r.normal(size=(1, 400, mel.shape[-1])), jnp.float32)
  a = with_labels(audio, None, jnp.asarray(lab[None]))
  b = with_labels(audio, None, jnp.zeros((1, 200, len(echo.LABEL_EVENTS))))
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
  c = _system().config.copy_and_resolve_references()
  c.model.context.labels, c.model.context.labels_dim = "labels_partner", 4
  assert "labels_partner" in registry.get(c.model.name)(c).data_spec().keys


# ----------------------------------------------------------------------------------- stages
def test_stage2_starts_exactly_at_stage1(stage1, stage2):
  s, batch, gen = stage2
  system1, model1, config1, step = trainer.restore_model(stage1)
  assert step == 2 and not config1.model.sdcm and not config1.model.context.enabled
  model2 = s.model()
  # Every stage-1 weight was loaded; what stage 2 adds is new (SDCM, the context).
  flat = lambda m: {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
  p1, p2 = flat(model1), flat(model2)
  assert set(p1) < set(p2) and any("context_encoder" in map(str, p) for p in p2)
  for path, value in p1.items():
    np.testing.assert_array_equal(p2[path], value, err_msg=str(path))
  assert all(float(b.extra[0].mix[...]) == 0.0 for b in model2.dit.blocks)
  # Zero-initialised, so stage 2 samples exactly what stage 1 samples (4 overlapping windows
  # over the 10 latent rows of each clip, the context and masks computed and routed).
  rng = jax.random.key(3)
  keys1 = system1.data_spec().keys
  want = jax.jit(lambda b, r: system1.generate(model1, b, r, steps=2, decode=False).value,
                 compiler_options=FAST_COMPILE)(
      {k: v for k, v in batch.items() if k in keys1}, rng)
  got = gen(s.state, batch, rng)
  assert got.shape == batch["latent_self"].shape and np.all(np.isfinite(np.asarray(got)))
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_stage2_trains_and_samples(stage2):
  s, batch, gen = stage2
  state = jax.tree.map(jnp.copy, s.state)              # the step donates its input
  it = pipeline.make(s.config.data, "train", keys=s.system.data_spec().keys, seed=0,
                     shard_index=0, shard_count=1)
  losses = []
  for _ in range(2):
    state, metrics = s.train_step(state, s.batch(next(it)))
    assert float(metrics["nonfinite"]) == 0.0
    losses.append(float(metrics["flow_mse"]))
  assert np.all(np.isfinite(losses)) and int(state["step"]) == 2
  # The gradient reaches SDCM through its blend: routing starts to take over.
  model = s.model(state, ema=False)
  assert all(abs(float(b.extra[0].mix[...])) > 0 for b in model.dit.blocks)
  latents = gen(state, batch, jax.random.key(4))
  assert np.all(np.isfinite(np.asarray(latents)))
  video = jax.jit(lambda z: model.vae.decode(model.vae.denormalize(z)),
                  compiler_options=FAST_COMPILE)(latents)
  frames = s.system.decode(system_lib.Outputs(value=video, space="video"), batch)
  assert frames.shape == (2, 1 + 4 * (latents.shape[1] - 1), 32, 32, 3)
  assert frames.dtype == np.uint8 and frames.std() > 0


# ----------------------------------------------------------------------------------- config
def test_config_rejects_unknown_and_bad_values():
  with pytest.raises(KeyError, match="'sdcmm' is unknown"):
    _config("echo_synthdyad", "stage=2,sdcmm=False")
  with pytest.raises(ValueError, match="stage=3"):
    _config("echo_synthdyad", "stage=3")
  with pytest.raises(ValueError, match="span"):
    _config("echo_synthdyad", "clip_frames=48,span=40")
  c = _config("echo_synthdyad", "size=tiny,stage=2")
  assert c.model.sdcm and c.model.context.enabled and c.init_from.main.workdir
  with pytest.raises(AttributeError):
    c.model.context.tokenz = 3                         # locked: typos do not pass silently
  s1 = _config("echo_synthdyad", "size=tiny,stage=1")
  assert not s1.model.sdcm and not s1.model.context.enabled and not s1.init_from.main.workdir
  off = _config("echo_synthdyad", "size=tiny,stage=2,sdcm=False")
  assert not off.model.sdcm and off.model.context.enabled
  with pytest.raises(ValueError, match="chunk_s=0.1"):
    _system("chunk_s=0.1")                             # 2.5 video frames
  c = _config("echo_synthdyad", f"{TINY},stage=2,init=,vae=")
  c.unlock()
  c.data.source = "synthdyad"
  c.model.masks.source = "parser"
  with pytest.raises(ValueError, match="masks.source='parser'"):
    registry.get(c.model.name)(c)
