"""Avatar Forcing in motion space (models/motion/forcing.py): block streaming with ring KV caches
equals recomputing the whole past, masks are block-causal with the audio look-ahead, and the
tiny config trains, resumes and evaluates."""
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatar_jax import trainer
from avatar_jax.data import pipeline
from avatar_jax.diffusion import samplers
from avatar_jax.models.motion import forcing

import trainer_harness as harness




def _config(arg=""):
  spec = importlib.util.spec_from_file_location(
      "forcing_cfg", os.path.join(os.path.dirname(__file__), "..", "configs", "forcing.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _model(config, seed=0):
  system = forcing.System(config)
  model = system.build(rngs=nnx.Rngs(seed))
  # The output layer starts at zero; random weights make every comparison meaningful.
  k = model.out.kernel
  k[...] = jax.random.normal(jax.random.key(seed + 7), k.shape) * 0.1
  for i, block in enumerate(model.blocks):
    # adaLN modulations and attention outputs too (zero-initialised as well).
    for j, lin in enumerate((block.norm1.mod, block.norm2.mod, block.self_attn.o,
                             block.cross_self.o, block.cross_partner.o)):
      lin.kernel[...] = jax.random.normal(jax.random.key(100 * i + j), lin.kernel.shape) * 0.03
  return system, model


def _batch(config, b=2, frames=57, seed=0):
  r = np.random.default_rng(seed)
  n_mels = config.data.features.n_mels
  return {"mel_self": r.standard_normal((b, 2 * frames, n_mels)).astype(np.float32),
          "mel_partner": r.standard_normal((b, 2 * frames, n_mels)).astype(np.float32),
          "motion_partner": r.standard_normal((b, frames, 10)).astype(np.float32)}


def _recompute(system, model, batch, rng, steps, past, scales=(1.0, 1.0)):
  """Each block generated again with no caches, from the same past (`past`: the streamed
  output, normalised): the model re-runs over the whole past and the whole clip's audio, masks
  alone keeping it causal. Teacher-forced (each block from the streamed past), so a difference
  points at the block that made it."""
  mel_s, mel_p = jnp.asarray(batch["mel_self"]), jnp.asarray(batch["mel_partner"])
  b, ta = mel_s.shape[:2]
  n, blk, c = ta // 2, system.cfg.block, system.cfg.channels
  nblocks = -(-n // blk)
  drops = system.branches(scales)
  g = len(drops)
  da = jnp.repeat(jnp.asarray([d[0] for d in drops]), b)
  du = jnp.repeat(jnp.asarray([d[1] for d in drops]), b)
  audio = model.encode_audio(jnp.tile(mel_s, (g, 1, 1)), jnp.tile(mel_p, (g, 1, 1)), da, du)
  t_v, t_a = system.times(g * b, nblocks * blk, ta)
  partner = None
  if system.cfg.use_partner_motion:
    mp = jnp.asarray(batch["motion_partner"])
    mp = jnp.pad(mp, ((0, 0), (0, nblocks * blk - n), (0, 0)), mode="edge")
    partner = model.partner_input(jnp.tile(mp, (g, 1, 1)), du)
  keys = [jax.random.fold_in(rng, k) for k in range(nblocks)]
  out = []
  for k in range(nblocks):
    f0 = k * blk
    done = jnp.asarray(past[:, :f0])

    def velocity(x, t, f0=f0, done=done):
      seq = jnp.tile(jnp.concatenate([done, x], 1), (g, 1, 1))
      ts = jnp.concatenate([jnp.ones((g * b, f0)),
                            jnp.broadcast_to(jnp.tile(t, g)[:, None], (g * b, blk))], 1)
      v = model(seq, ts, t_v[:, :f0 + blk], audio, t_a,
                None if partner is None else partner[:, :f0 + blk])[:, f0:]
      return system.combine(v, scales, b)

    out.append(samplers.sample_ode(velocity, jax.random.normal(keys[k], (b, blk, c)),
                                   steps=steps))
  return np.asarray(model.denormalize(jnp.concatenate(out, 1)[:, :n]))


@pytest.mark.parametrize("arg,scales", [
    ("block=5,lookahead=2,history=0.6", (1.0, 1.0)),
    ("block=4,lookahead=0,history=0.3,user_motion=true", (2.0, 1.5)),
])
def test_streaming_equals_recomputing_the_past(arg, scales):
  """57 frames in blocks: ring caches hold history + one block (far less than the clip), so
  this also checks that the slots overwritten are ones no frame may see any more."""
  c = _config(f"size=tiny,{arg}")
  system, model = _model(c)
  assert model.cache_len() < 57
  batch = _batch(c)
  rng = jax.random.key(3)
  got = nnx.jit(lambda m, b: system.generate(m, b, rng, steps=2, guidance_scales=scales).value)(
      model, {k: jnp.asarray(v) for k, v in batch.items()})
  assert got.shape == (2, 57, 10)
  want = _recompute(system, model, batch, rng, steps=2, scales=scales,
                    past=np.asarray(model.normalize(got)))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_block_causal_with_lookahead():
  """A frame's velocity does not change when later blocks' motion or audio beyond the
  look-ahead changes, and does change with audio inside the look-ahead."""
  c = _config("size=tiny,block=5,lookahead=2,history=2.0")
  system, model = _model(c)
  batch = _batch(c, b=1, frames=30)
  r = np.random.default_rng(1)
  x = jnp.asarray(r.standard_normal((1, 30, 10)), jnp.float32)
  t = jnp.full((1, 30), 0.5)

  def run(mel_s, x):
    audio = model.encode_audio(jnp.asarray(mel_s), jnp.asarray(batch["mel_partner"]),
                               jnp.zeros(1, bool), jnp.zeros(1, bool))
    t_v, t_a = system.times(1, 30, mel_s.shape[1])
    return np.asarray(model(x, t, t_v, audio, t_a))

  base = run(batch["mel_self"], x)
  x2 = x.at[:, 15:].add(1.0)                                  # blocks 3.. changed
  np.testing.assert_allclose(run(batch["mel_self"], x2)[:, :15], base[:, :15], atol=1e-6)
  assert not np.allclose(run(batch["mel_self"], x2)[:, 15:], base[:, 15:])
  # Frame 9 (the last of block 1) sees audio up to the end of frame 11: mel tokens < 24; the
  # block's self-attention shares that with its other frames, so block 1 is generated once
  # audio up to block end + look-ahead has arrived, and block 0 not later than its own.
  mel = batch["mel_self"].copy()
  mel[:, 24:] += 3.0
  np.testing.assert_allclose(run(mel, x)[:, :10], base[:, :10], atol=1e-6)
  assert not np.allclose(run(mel, x)[:, 10:15], base[:, 10:15])
  mel = batch["mel_self"].copy()
  mel[:, 23] += 3.0
  assert not np.allclose(run(mel, x)[:, 5:10], base[:, 5:10])
  np.testing.assert_allclose(run(mel, x)[:, :5], base[:, :5], atol=1e-6)


def test_tiny_trains_resumes_evaluates_then_dpo_stage(tmp_path):
  """Stage 1: the tiny config trains, evaluates (SynthDyad table) and resumes. Stage 2
  (configs/forcing.py:dpo=<stage 1>): the policy and the frozen reference both start from
  stage 1, so the first DPO loss is log 2; losers come from the policy without the user's
  conditions; the reference stays frozen."""
  c = _config("size=tiny,steps=3,batch=8,eval_clips=2,clip_frames=20,nfe=2")
  c.data.split_sizes.train, c.data.split_sizes.test = 16, 2
  c.evals.sample.at_end = False
  c.train.progress_bar, c.train.log_every, c.train.stats_batches = False, 1, 1
  stage1 = str(tmp_path / "stage1")
  trainer.train_and_evaluate(c, stage1)
  with open(os.path.join(stage1, "eval", "test.json")) as f:
    rows = json.load(f)["rows"]
  assert {"model", "shuffled audio", "mean motion", "ground truth"} <= set(rows)
  assert rows["model"]["clips"] == 2 and np.isfinite(rows["model"]["jaw_leak"])
  c.train.num_steps = 4
  c.evals = {}
  trainer.train_and_evaluate(c, stage1, allow_config_change=("train.num_steps",))
  assert trainer.restore_model(stage1)[3] == 4

  c2 = _config(f"size=tiny,steps=2,batch=8,clip_frames=20,nfe=1,dpo={stage1},beta=50")
  c2.data.split_sizes.train, c2.data.split_sizes.test = 16, 2
  c2.evals = {}
  c2.train.progress_bar, c2.train.stats_batches, c2.train.log_every = False, 1, 1
  c2.model.dpo.loser_steps = 1
  s = trainer.setup(c2, trainer.sharding.make_mesh({"data": -1}))
  system = s.system
  model, ref = s.model(s.state), s.aux(s.state)["ref"]
  for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                  jax.tree.leaves(nnx.state(ref, nnx.Param))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  batch = s.batch(next(pipeline.make(c2.data, "train", keys=system.data_spec().keys, seed=0,
                                     shard_index=0, shard_count=1)))
  # The jitted train step: prepare_batch draws the losers, then the DPO loss; at step 0 the
  # policy is the reference, so the loss is log 2 (up to float32 round-off of the policy's and
  # the reference's separately compiled passes, times β = 50: ~2e-5 here; a reference that is
  # not the policy moves it by orders of magnitude more).
  ref_before = [np.asarray(x) for x in jax.tree.leaves(nnx.state(ref, nnx.Param))]
  state, metrics = s.train_step(s.state, batch)    # (donates the state)
  np.testing.assert_allclose(float(metrics["dpo_loss"]), np.log(2.0), rtol=0, atol=1e-4)
  state, metrics = s.train_step(state, batch)
  assert np.isfinite(float(metrics["dpo_loss"])) and int(state["step"]) == 2
  # The reference stays frozen.
  for a, b in zip(ref_before, jax.tree.leaves(nnx.state(s.aux(state)["ref"], nnx.Param))):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_dpo_objective_matches_its_formula():
  from avatar_jax.diffusion import dpo  # pylint: disable=g-import-not-at-top
  r = np.random.default_rng(0)
  ew, ewr, el, elr = (jnp.asarray(r.uniform(0.1, 2.0, 5)) for _ in range(4))
  beta = 3.0
  got, m = dpo.loss(ew, ewr, el, elr, beta)
  margin = (np.asarray(ew) - np.asarray(ewr)) - (np.asarray(el) - np.asarray(elr))
  want = np.mean(np.log1p(np.exp(beta * margin)))       # −log σ(−β·margin)
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  np.testing.assert_allclose(float(m["dpo_accuracy"]), np.mean(margin < 0), atol=1e-7)
  # Policy = reference: the loss is log 2 whatever the samples.
  np.testing.assert_allclose(float(dpo.loss(ew, ew, el, el, beta)[0]), np.log(2.0), rtol=1e-6)
