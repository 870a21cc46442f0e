"""DualTalk (avatar_jax/models/motion/dualtalk.py, configs/dualtalk.py): whole-clip shapes, the
loss against a NumPy reimplementation, what the output depends on, and a tiny run that trains,
resumes onto the same loss curve and evaluates."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

import trainer_harness as harness
from avatar_jax import system as system_lib
from avatar_jax.evals import runner
from avatar_jax.models import registry

CONFIG = os.path.join(harness.REPO, "configs", "dualtalk.py")


def load_config(arg="size=tiny", **overrides):
  spec = importlib.util.spec_from_file_location("dualtalk_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def build(config, seed=0, stats=None):
  system = registry.get(config.model.name)(config)
  return system, system.build(rngs=nnx.Rngs(seed), stats=stats)


def random_batch(system, b, t, seed=0):
  """Random inputs for b clips of t frames (mel at its rate: t · mel_rate / fps rows)."""
  rng = np.random.default_rng(seed)
  f = system.facts
  ta = t * int(f["mel_rate"] // f["fps"])
  return {"mel_self": rng.normal(size=(b, ta, f["n_mels"])).astype(np.float32),
          "mel_partner": rng.normal(size=(b, ta, f["n_mels"])).astype(np.float32),
          "flame56_partner": 0.3 * rng.normal(size=(b, t, 56)).astype(np.float32),
          "flame56_self": 0.3 * rng.normal(size=(b, t, 56)).astype(np.float32)}


def generator(system, model):
  """Jitted generate: host batch -> FLAME [B, T, 56] NumPy."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda s, b: system.generate(nnx.merge(graphdef, s), b, jax.random.key(0)).value)
  return lambda batch: np.asarray(fn(state, {k: jnp.asarray(v) for k, v in batch.items()}))


WEIGHTS = dict(exp=1.0, jaw=2.0, pose=0.5, velocity=3.0)


@pytest.fixture(scope="module")
def tiny():
  """(system, model, generator) of the tiny config with narrow fixed heads (σ = 40 ms), no
  dropout (the loss is then a function of the batch) and uneven loss weights and statistics."""
  config = load_config(**{"model.attention.sigma_range": (0.04, 0.04),
                          "model.attention.learn_sigma": False, "model.dropout": 0.0,
                          "model.interaction_dropout": 0.0})
  config.model.loss.update(WEIGHTS)
  stats = {"mean": np.linspace(-0.1, 0.1, 56).astype(np.float32),
           "std": np.linspace(0.05, 0.5, 56).astype(np.float32)}
  system, model = build(config, stats=stats)
  return system, model, generator(system, model)


# ---------------------------------------------------------------------------------- shapes
def test_whole_clips_of_any_length(tiny):
  system, model, gen = tiny
  assert system.data_spec().keys == ("flame56_self", "flame56_partner", "mel_self", "mel_partner")
  assert system.evaluators() == ("flame56",)
  # Every parameter carries logical axis names (one per dimension).
  params = nnx.state(model, nnx.Param)
  for path, var in jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]:
    meta = var.get_metadata()
    axes = meta.get("out_sharding", meta.get("sharding"))   # flax >= 0.12 | older
    assert axes is not None and len(axes) == var.ndim, jax.tree_util.keystr(path)
  # The mean-motion baseline of the evaluators reads model.mean.
  assert model.mean[...].shape == (56,) and model.std[...].shape == (56,)
  for b, t in ((1, 37), (2, 1)):   # odd length, batch 1; a single frame
    batch = random_batch(system, b, t)
    value = gen(batch)
    assert value.shape == (b, t, 56) and value.dtype == np.float32
    assert np.all(np.isfinite(value))
  # The sample video: avatar | partner.
  frames = system.decode(system_lib.Outputs(value=value, space="flame56"), batch)
  assert frames.dtype == np.uint8 and frames.shape[:2] == (2, 1) and frames.shape[-1] == 3


def test_bfloat16_compute_keeps_float32_params_and_output():
  system, model = build(load_config(**{"model.dtype": "bfloat16"}))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  value = generator(system, model)(random_batch(system, 1, 37))
  assert value.shape == (1, 37, 56) and value.dtype == np.float32 and np.all(np.isfinite(value))


# ---------------------------------------------------------------------------------- loss
def test_loss_matches_numpy(tiny):
  system, model, gen = tiny
  batch = random_batch(system, 1, 50, seed=1)
  loss, metrics = jax.jit(lambda b: system.loss(model, b, jax.random.key(3)))(
      {k: jnp.asarray(v) for k, v in batch.items()})
  pred = gen(batch).astype(np.float64)
  y = batch["flame56_self"].astype(np.float64)
  mse = lambda a, b: np.mean((a - b) ** 2)
  want = {"exp": mse(pred[..., :50], y[..., :50]), "jaw": mse(pred[..., 50:53], y[..., 50:53]),
          "pose": mse(pred[..., 53:], y[..., 53:]),
          "velocity": mse(np.diff(pred, axis=1), np.diff(y, axis=1))}
  np.testing.assert_allclose(float(loss), sum(WEIGHTS[k] * v for k, v in want.items()), rtol=1e-5)
  for k, v in want.items():
    np.testing.assert_allclose(float(metrics[f"mse_{k}"]), v, rtol=1e-5)


# ---------------------------------------------------------------------------------- inputs
def test_partner_and_own_audio_influence(tiny):
  system, _, gen = tiny
  batch = random_batch(system, 1, 50)
  base = gen(batch)
  noise = np.random.default_rng(5)
  for key in ("flame56_partner", "mel_partner"):
    bump = noise.normal(size=batch[key].shape).astype(np.float32)
    moved = dict(batch, **{key: batch[key] + bump})
    assert np.abs(gen(moved) - base).max() > 1e-3, f"{key} does not change the output"
  # Own audio perturbed under video frame 25 (mel frames 50, 51): with 40-ms heads only frames
  # near 25 move (the own-audio path has no recurrence).
  mel = batch["mel_self"].copy()
  mel[:, 50:52] += 3.0
  diff = np.abs(gen(dict(batch, mel_self=mel)) - base).max(axis=(0, 2))   # [T]
  near, far = diff[22:29].max(), np.concatenate([diff[:10], diff[40:]]).max()
  assert near > 1e-3 and far < 1e-6 * near, (near, far)


# ---------------------------------------------------------------------------------- training
NUM_STEPS, CKPT_EVERY = 20, 10


def tiny_run_config(evals=True):
  """The tiny config for NUM_STEPS steps of 2-s windows, checkpoints every CKPT_EVERY steps."""
  config = load_config(f"size=tiny,steps={NUM_STEPS},batch=8,clip_frames=50", **{
      "data.split_sizes.train": 16, "data.split_sizes.test": 2, "data.split_sizes.ood": 2,
      "optim.lr": 3e-3, "train.log_every": 1, "train.ckpt_every": CKPT_EVERY,
      "train.max_checkpoints": 3})
  with config.unlocked():
    # The "flame56" metrics on whole test clips: cheaper than the config's SynthDyad table
    # (references, truth), which reads the same outputs through the inverse export map.
    config.evals = ml_collections.ConfigDict(
        dict(test=runner.evaluator("flame56", split="test", num_clips=2, batch_size=2)) if evals
        else {})
  return config


# Trains in a subprocess, like the other trainer tests: the session's compilation cache and
# fast-compile flags (trainer_harness.subprocess_env) make the resumed run compile nothing.
_PROGRAM = """
import sys
sys.path.insert(0, {tests!r})
from test_dualtalk import tiny_run_config
from avatar_jax import trainer
trainer.train_and_evaluate(tiny_run_config(evals={evals}), {workdir!r})
"""


def _train(workdir, cache, evals):
  code = _PROGRAM.format(tests=os.path.dirname(os.path.abspath(__file__)), evals=evals,
                         workdir=workdir)
  out = harness.run([sys.executable, "-c", code], cache, timeout=240)
  assert out.returncode == 0, out.stderr[-4000:]


def test_tiny_config_trains_resumes_and_evaluates(tmp_path_factory, tmp_path):
  cache = harness.cache_dir(tmp_path_factory)
  workdir = str(tmp_path / "run")
  _train(workdir, cache, evals=True)
  with open(os.path.join(workdir, "eval", "test_test.json")) as f:
    metrics = json.load(f)["rows"]["model"]
  assert metrics["mse_exp"] > 0 and all(np.isfinite(v) for v in metrics.values()), metrics
  (losses,) = harness.read_scalars(os.path.join(workdir, "tb"), "train/loss")
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  curve = np.array([losses[s] for s in sorted(losses)])
  assert curve[-5:].mean() < 0.8 * curve[:5].mean(), curve

  # Without its last checkpoint, rerunning the same command resumes from step CKPT_EVERY and
  # must retrace the loss curve exactly (same batches, rngs and state).
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(NUM_STEPS)))
  _train(workdir, cache, evals=False)
  before, after = harness.read_scalars(os.path.join(workdir, "tb"), "train/loss")
  assert sorted(after) == list(range(CKPT_EVERY + 1, NUM_STEPS + 1))
  for step, loss in after.items():
    np.testing.assert_allclose(loss, before[step], rtol=1e-6, err_msg=f"step {step}")
