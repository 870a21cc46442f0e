"""TIMAR (models/motion/timar.py): the turn-level causal mask and history window, the diffusion
head's sampler, MAR masking and its loss, and the tiny config training, resuming and generating.

Sized for 2 CPU cores (8 fake devices, tests/conftest.py); most tests use one device.
"""
from __future__ import annotations

import importlib.util
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from avatar_jax import checkpointing, sharding, trainer
from avatar_jax.data import pipeline
from avatar_jax.kernels.gaussian_attention import common
from avatar_jax.models import registry
from avatar_jax.models.motion import timar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
STEPS, RESUME_AT = 20, 10


def _config(**overrides):
  path = os.path.join(REPO, "configs", "timar.py")
  spec = importlib.util.spec_from_file_location("timar_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # 3-turn windows: several turns per window, and cheap.
  config = module.get_config(f"size=tiny,steps={STEPS},batch=4,clip_frames=75,eval_clips=2")
  for key, value in {"data.split_sizes.train": 8, "data.split_sizes.test": 2,
                     "data.split_sizes.ood": 2, "train.stats_batches": 1,
                     "model.sample.iters": 2, "model.sample.steps": 2, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def system():
  config = _config()
  return registry.get(config.model.name)(config)


def _jiggle(module, seed, scale=0.2):
  """Adds noise to every parameter: zero-initialised output layers would otherwise hide
  dependencies (an attention with o = 0 passes nothing on)."""
  graphdef, params, rest = nnx.split(module, nnx.Param, ...)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
  return nnx.merge(graphdef, jax.tree.unflatten(tree, noisy), rest)


def _jit(fn):
  # Eagerly every small op would compile on its own; jitted, LLVM's optimisation is the cost.
  return jax.jit(fn, compiler_options=FAST_COMPILE)


def _bind(model, fn):
  """args -> fn(model, *args), jitted with the model's state as an argument (not constants)."""
  graphdef, state = nnx.split(model)
  jitted = _jit(lambda st, *a: fn(nnx.merge(graphdef, st), *a))
  return lambda *args: jitted(state, *args)


def _apply(model, fn, *args):
  return _bind(model, fn)(*args)


@pytest.fixture(scope="module")
def random_model(system):
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: system.build(rngs=nnx.Rngs(0))))
  state = _jit(lambda: nnx.state(_jiggle(system.build(rngs=nnx.Rngs(0)), 1)))()
  return nnx.merge(graphdef, state)


# ============================================================================ (1) turn mask
def test_token_times_give_a_turn_level_causal_mask(random_model):
  model = random_model
  assert all(b.attn.causal_block == 1.0 and b.attn.lookahead_blocks == 0 for b in model.blocks)
  turns, per_turn = 3, timar.GROUPS * model.frames
  t = model.token_times(turns)
  assert t.shape == (turns * per_turn,)
  zeros = jnp.zeros(t.shape, jnp.int32)
  vis = np.asarray(common.visible(common.MaskSpec(causal_block=model.blocks[0].attn.causal_block),
                                  t[:, None], t[None, :], zeros[:, None], zeros[None, :]))
  turn = np.repeat(np.arange(turns), per_turn)
  # Bidirectional within a turn (every group sees every group), causal across turns.
  np.testing.assert_array_equal(vis, turn[None, :] <= turn[:, None])


def test_later_turns_never_reach_earlier_outputs(random_model):
  model, d, f = random_model, random_model.cfg.width, random_model.frames
  r = jax.random.split(jax.random.key(0), 3)
  cond = jax.random.normal(r[0], (1, 3, 3, f, d))
  agent = jax.random.normal(r[1], (1, 3, f, d))
  cond2 = cond.at[:, 2].set(jax.random.normal(r[2], cond[:, 2].shape))
  cond1 = cond.at[:, 1, timar.USER_SPEECH, 3].multiply(-1.0)
  # One batch: the reference; everything of turn 2 changed; one user-speech frame of turn 1 changed.
  conds = jnp.concatenate([cond, cond2, cond1])
  agents = jnp.concatenate([agent, agent.at[:, 2].multiply(-1.0), agent])
  z, z2, z1 = np.asarray(_apply(model, lambda m, c, a: m(c, a), conds, agents))[:, None]
  # Turns 0 and 1 must not move, turn 2 must.
  np.testing.assert_allclose(z2[:, :2], z[:, :2], rtol=0, atol=1e-6)
  assert np.abs(z2[:, 2] - z[:, 2]).max() > 1e-3
  # One frame of turn 1's user speech reaches every agent token of turns 1 and 2, not of turn 0.
  np.testing.assert_allclose(z1[:, 0], z[:, 0], rtol=0, atol=1e-6)
  assert np.all(np.abs(z1[:, 1:] - z[:, 1:]).max(axis=-1) > 1e-6)


def test_generation_is_turn_causal_and_keeps_history_turns(system, random_model):
  """Turn by turn, with the history's agent motion hidden (mask_history): the output of turn k
  depends on inputs of turns k − history_turns .. k only."""
  f, r = random_model.frames, random_model.mel_per_frame
  rng = np.random.default_rng(0)
  batch = {"flame56_partner": rng.normal(0, 0.05, (1, 4 * f, 56)).astype(np.float32),
           "mel_self": rng.normal(-5, 1, (1, 4 * f * r, 16)).astype(np.float32),
           "mel_partner": rng.normal(-5, 1, (1, 4 * f * r, 16)).astype(np.float32)}

  def nudge(turn):
    out = {k: v.copy() for k, v in batch.items()}
    for k, v in out.items():
      n = v.shape[1] // 4
      v[:, turn * n:(turn + 1) * n] += 0.5
    return out

  hist = 2
  # One example per call: the sampling noise is drawn per example.
  gen = _bind(random_model, lambda m, b: system.generate(
      m, b, jax.random.key(3), history_turns=hist, mask_history=True).value)
  ref, early, late = (np.asarray(gen(b)).reshape(4, f, 56) for b in (batch, nudge(0), nudge(3)))
  moved = lambda out: [bool(np.abs(out[k] - ref[k]).max() > 1e-5) for k in range(4)]
  # Turn 0's inputs reach turns 0 .. hist; turn 3's inputs reach turn 3 only.
  assert moved(early) == [k <= hist for k in range(4)], moved(early)
  assert moved(late) == [False, False, False, True], moved(late)


# ============================================================================ (2) diffusion head
def test_diffusion_head_samples_a_conditional_gaussian_mixture():
  """Trained alone on a 2-D mixture with one Gaussian per label, the head's DDIM draws match each
  label's mean and spread."""
  means = jnp.asarray([[-1.5, 0.5], [1.0, -1.0]])
  stds = jnp.asarray([[0.3, 0.6], [0.5, 0.2]])
  head = timar.DiffusionHead(2, 2, 64, 2, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(head, nnx.Param)
  steps = 500
  tx = optax.adam(optax.cosine_decay_schedule(5e-3, steps, 0.02))

  def loss_fn(p, rng):
    r_y, r_x, r_loss = jax.random.split(rng, 3)
    y = jax.random.bernoulli(r_y, 0.5, (1, 256)).astype(jnp.int32)
    x = means[y] + stds[y] * jax.random.normal(r_x, (1, 256, 2))
    return timar.head_loss(nnx.merge(graphdef, p), r_loss, jax.nn.one_hot(y, 2), x,
                           jnp.ones((1, 256), bool))

  def body(i, carry):
    p, opt = carry
    updates, opt = tx.update(jax.grad(loss_fn)(p, jax.random.key(i)), opt, p)
    return optax.apply_updates(p, updates), opt

  params, _ = _jit(lambda p: jax.lax.fori_loop(0, steps, body, (p, tx.init(p))))(params)
  head = nnx.merge(graphdef, params)
  for y in (0, 1):
    z = jnp.broadcast_to(jax.nn.one_hot(y, 2), (1, 4000, 2))
    x = np.asarray(_apply(head, lambda h, z: timar.sample_head(
        h, z, jax.random.key(9), channels=2, steps=20), z))[0]
    np.testing.assert_allclose(x.mean(0), means[y], atol=0.1, err_msg=f"label {y} mean")
    np.testing.assert_allclose(x.std(0), stds[y], rtol=0.35, err_msg=f"label {y} std")


# ============================================================================ (3) MAR masking
def test_mar_ratios_lie_in_range_and_set_the_masked_counts():
  frames = 25
  hidden, ratio = timar.mar_mask(jax.random.key(0), (512, 8), frames, 0.7)
  hidden, ratio = np.asarray(hidden), np.asarray(ratio)
  assert hidden.shape == (512, 8, frames) and ratio.shape == (512, 8)
  assert ratio.min() >= 0.7 and ratio.max() <= 1.0
  # Each turn draws its own ratio; a normal peaked at 1 truncated to [0.7, 1] has mean ≈ 0.867.
  assert len(np.unique(ratio)) > 1000 and 0.85 < ratio.mean() < 0.885
  count = hidden.sum(-1)
  assert np.all(count >= math.ceil(0.7 * frames)) and np.all(count <= frames)
  assert np.all(count / frames >= ratio - 1e-3) and np.all((count - 1) / frames < ratio)
  # Which tokens are hidden is random too, not a prefix.
  assert 0.5 < hidden[..., 0].mean() < 1.0


def test_loss_counts_masked_tokens_only(random_model):
  head = random_model.head
  r = jax.random.split(jax.random.key(1), 3)
  z = jax.random.normal(r[0], (2, 25, random_model.cfg.width))
  x0 = jax.random.normal(r[1], (2, 25, 56))
  mask = jax.random.bernoulli(r[2], 0.7, (2, 25))
  other = x0 + 10.0 * (~mask)[..., None]          # change the targets of visible tokens only

  def check(h, z, x0, other):
    loss = lambda z, x0: timar.head_loss(h, jax.random.key(2), z, x0, mask, batch_mul=2)
    return jax.grad(loss)(z, x0), loss(z, x0), loss(z, other), loss(z, x0 + 1.0)

  grad, base, hidden_only, shifted = map(np.asarray, _apply(head, check, z, x0, other))
  assert np.all(grad[~np.asarray(mask)] == 0) and np.all(np.abs(grad[np.asarray(mask)]).max(-1) > 0)
  np.testing.assert_allclose(hidden_only, base, rtol=1e-6)
  assert float(shifted) != float(base)


# ============================================================== (4) train, resume, generate
def test_tiny_config_trains_resumes_and_generates(tmp_path):
  config = _config()
  mesh = sharding.make_mesh({"data": 1}, devices=jax.devices()[:1])
  s = trainer.setup(config, mesh, compiler_options=FAST_COMPILE)
  keys = s.system.data_spec().keys
  data = pipeline.make(config.data, "train", keys=keys, seed=config.seed)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
  state, losses = s.state, []
  for step in range(STEPS):
    if step == RESUME_AT:
      ckpt.save(step, state, data, config)
      ckpt.wait()
    state, metrics = s.train_step(state, s.batch(next(data)))
    losses.append(float(metrics["loss"]))
    assert 0.7 <= float(metrics["mask_ratio"]) <= 1.0
  assert np.all(np.isfinite(losses)), losses
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses

  # Resume: the checkpoint (state + data position) gives the same next loss.
  fresh = pipeline.make(config.data, "train", keys=keys, seed=config.seed)
  restored = ckpt.restore(trainer.setup(config, mesh, fit=False, abstract=True).state, fresh)
  ckpt.close()
  _, metrics = s.train_step(restored, s.batch(next(fresh)))
  np.testing.assert_allclose(float(metrics["loss"]), losses[RESUME_AT], rtol=1e-6)

  # Generate whole clips whose length is not a multiple of a turn (60 frames = 2.4 turns).
  model = s.model(state)
  batch = {k: v[:2, :120] if k.startswith("mel") else v[:2, :60] for k, v in next(data).items()
           if k in keys}
  for hist in (0, 7):
    out = _apply(model, lambda m, b: s.system.generate(m, b, jax.random.key(0), history_turns=hist,
                                                        cfg=1.5), batch)
    assert out.space == "flame56" and out.value.shape == (2, 60, 56)
    assert np.all(np.isfinite(np.asarray(out.value)))
  assert np.asarray(model.mean[...]).shape == (56,)


def test_data_parallel_step_moves_no_examples_between_devices():
  """Under pure data parallelism the only collective is the gradient all-reduce: both speakers'
  audio and the diffusion head's copies stay inside each example, so no batch shard moves."""
  import re  # pylint: disable=g-import-not-at-top
  c = _config(**{"data.batch_size": 8})
  mesh = sharding.make_mesh({"data": jax.device_count()})
  s = trainer.setup(c, mesh, compiler_options={"xla_backend_optimization_level": 0,
                                               "xla_llvm_disable_expensive_passes": True})
  batch = s.batch(next(pipeline.make(c.data, "train", keys=s.system.data_spec().keys, seed=0)))
  with trainer.use_mesh(mesh):
    hlo = s.train_step.lower(s.state, batch).compile().as_text()
  moved = re.findall(r"\b(collective-permute|all-to-all)(?:-start)?\(", hlo)
  assert jax.device_count() == 8 and not moved, f"{len(moved)} {sorted(set(moved))} in the step"
  assert re.search(r"\ball-reduce(?:-start)?\(", hlo)
