"""Trainer tests on 8 fake CPU devices: sharded steps match one device, checkpoints restore onto
another mesh (with the data position), a killed run resumes onto the uninterrupted loss curve, and
a non-finite loss stops training with the last good checkpoint intact."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time

import jax
import numpy as np
import pytest
from flax import nnx

import trainer_harness as harness
from avatar_jax import checkpointing, sharding, trainer
from avatar_jax.data import pipeline
from avatar_jax.models import registry

# Meshes the sharded step must agree on: pure data parallel, data x fsdp x tensor, and a
# context axis (parameters replicated over it, activations free to split their time axis).
MESHES = {
    "data8": {"data": 8},
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp4_context2": {"fsdp": 4, "context": 2},
}
# Zero-initialised output layers (DiT style) let gradients reach the layers behind them one step
# later: step 1 moves `out`, step 2 the attention outputs and gates, step 3 everything else.
STEPS = 3
# CPU compile time dominates these tests; LLVM optimisation buys nothing for tiny shapes.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@pytest.fixture(scope="module")
def tiny():
  """(config, stats, host batches) of the tiny config."""
  # No warmup, so the first step already updates parameters.
  config = harness.load_quickstart(**{"optim.warmup_steps": 0})
  system = registry.get(config.model.name)(config)
  it = pipeline.make(config.data, "train", keys=system.data_spec().keys, seed=config.seed)
  batches = [next(it) for _ in range(STEPS)]
  return config, system.fit_stats(batches[:1]), batches


def _mesh(shape):
  return sharding.make_mesh(shape, devices=jax.devices()[:int(np.prod(list(shape.values())))])


_RUNS = {}


def _train(tiny, mesh_shape):
  """STEPS sharded train steps on a mesh: (losses, initial state, final state, shardings).

  States are host copies; cached per mesh so that tests share one compilation.
  """
  key = tuple(sorted(mesh_shape.items()))
  if key not in _RUNS:
    config, stats, batches = tiny
    s = trainer.setup(config, _mesh(mesh_shape), stats=stats, compiler_options=FAST_COMPILE)
    state, init = s.state, jax.device_get(s.state)
    losses = []
    for b in batches:
      state, metrics = s.train_step(state, s.batch(b))
      losses.append(float(metrics["loss"]))
    _RUNS[key] = losses, init, jax.device_get(state), s.shardings
  return _RUNS[key]


def _assert_trees_close(got, want, rtol, atol):
  paths_got, tree_got = jax.tree_util.tree_flatten_with_path(got)
  leaves_want, tree_want = jax.tree.flatten(want)
  assert tree_got == tree_want
  for (path, g), w in zip(paths_got, leaves_want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_step_matches_one_device(tiny, name):
  losses, init, state, shardings = _train(tiny, MESHES[name])
  ref_losses, ref_init, ref_state, _ = _train(tiny, {"data": 1})
  assert np.all(np.isfinite(losses)) and losses[0] > 0
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  _assert_trees_close(init, ref_init, rtol=0, atol=0)   # same initialisation on any mesh
  # The steps really moved the parameters (otherwise the equality below would be vacuous),
  # including parameters sharded over every split axis of this mesh. (Leaves behind chains of
  # zero-initialised layers, e.g. AdaLN gates, need more steps before any gradient reaches them.)
  split = {a for a, n in MESHES[name].items() if n > 1 and a not in ("data", "context")}
  moved, moved_axes = 0, set()
  flat_new = jax.tree_util.tree_flatten_with_path(state["params"])[0]
  for (_, new), old, shd in zip(flat_new, jax.tree.leaves(init["params"]),
                                jax.tree.leaves(shardings["params"])):
    if np.max(np.abs(np.asarray(new) - np.asarray(old))) > 0:
      moved += 1
      moved_axes |= set(jax.tree.leaves(tuple(shd.spec))) & split
  assert moved >= 0.5 * len(flat_new), f"only {moved}/{len(flat_new)} parameters changed"
  assert moved_axes == split, f"no changed parameter is sharded over {split - moved_axes}"
  assert int(state["step"]) == STEPS
  _assert_trees_close(state["params"], ref_state["params"], rtol=1e-4, atol=1e-6)
  _assert_trees_close(state["ema"], ref_state["ema"], rtol=1e-4, atol=1e-6)
  _assert_trees_close(state["opt"], ref_state["opt"], rtol=1e-4, atol=1e-9)


def _batches_equal(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_checkpoint_restores_onto_another_mesh(tiny, tmp_path):
  config, stats, _ = tiny
  _, _, host_state, src_shardings = _train(tiny, MESHES["data2_fsdp2_tensor2"])
  state = jax.device_put(host_state, src_shardings)   # saved as laid out on the 2x2x2 mesh
  data = pipeline.make(config.data, "train", seed=config.seed)
  for _ in range(3):
    next(data)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ckpt"))
  ckpt.save(STEPS, state, data, config)
  ckpt.wait()
  expected_next = next(data)

  for target in ({"fsdp": 4, "tensor": 2}, {"data": 1}):
    s = trainer.setup(config, _mesh(target), stats=stats, abstract=True)
    shardings = s.shardings
    fresh = pipeline.make(config.data, "train", seed=config.seed)
    restored = ckpt.restore(s.state, fresh)
    for (path, got), want, shd in zip(jax.tree_util.tree_flatten_with_path(restored)[0],
                                      jax.tree.leaves(state), jax.tree.leaves(shardings)):
      assert got.sharding.is_equivalent_to(shd, got.ndim), (target, jax.tree_util.keystr(path))
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want),
                                    err_msg=f"{target} {jax.tree_util.keystr(path)}")
    _batches_equal(next(fresh), expected_next)
  assert ckpt.restore_config().train.num_steps == config.train.num_steps
  ckpt.close()


# ------------------------------------------------------------------------ subprocess runs
def _finished_checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(path):
    return []
  return sorted(int(d) for d in os.listdir(path) if d.isdigit())


def test_sigterm_checkpoints_the_current_step_and_resumes_on_the_same_curve(
    tmp_path_factory, tmp_path):
  """SIGTERM (a scheduler's eviction notice, `timeout`) stops the run at the next step with a
  checkpoint of that step, exit code 0; rerunning resumes there, on the uninterrupted curve.
  (SIGKILL at random points: test_reliability.py.)"""
  cache = harness.cache_dir(tmp_path_factory)
  workdir = str(tmp_path / "run")
  cmd = harness.train_command(workdir)
  log = open(tmp_path / "stopped.txt", "w")
  proc = subprocess.Popen(cmd, cwd=harness.REPO, env=harness.subprocess_env(cache),
                          stdout=subprocess.DEVNULL, stderr=log)
  signalled_after = []

  def terminate_after_first_checkpoint():
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
      done = _finished_checkpoints(workdir)
      if done:
        proc.send_signal(signal.SIGTERM)
        signalled_after.append(done[-1])
        return
      time.sleep(0.02)

  killer = threading.Thread(target=terminate_after_first_checkpoint)
  killer.start()
  reference = harness.trained_workdir(tmp_path_factory)   # uninterrupted, same seed (meanwhile)
  killer.join()
  proc.wait(timeout=60)
  log.close()
  stderr = open(tmp_path / "stopped.txt").read()
  assert signalled_after, f"no checkpoint before the run ended (rc={proc.returncode})"
  assert signalled_after[0] < harness.NUM_STEPS, "the run finished before it was signalled"
  assert proc.returncode == 0, stderr[-4000:]
  stopped = re.search(r"Stopped by SIGTERM at step (\d+) of", stderr)
  assert stopped, stderr[-4000:]
  stop_step = int(stopped.group(1))
  # The step it stopped at was saved, whether or not it is a periodic checkpoint step.
  assert stop_step < harness.NUM_STEPS and _finished_checkpoints(workdir)[-1] == stop_step

  out = harness.run(cmd, cache)
  assert out.returncode == 0, out.stderr[-4000:]
  assert f"at step {stop_step}" in out.stderr, out.stderr[-4000:]
  assert _finished_checkpoints(workdir)[-1] == harness.NUM_STEPS

  ref = harness.read_scalars(os.path.join(reference, "tb"), "train/loss")
  assert len(ref) == 1 and sorted(ref[0]) == list(range(1, harness.NUM_STEPS + 1))
  runs = harness.read_scalars(os.path.join(workdir, "tb"), "train/loss")
  assert len(runs) == 2, "expected one event file per process"
  before, after = runs
  # The stopped process logged every step up to the one it saved; the resumed one runs on
  # from there to the end ...
  assert sorted(before) == list(range(1, stop_step + 1))
  assert sorted(after) == list(range(stop_step + 1, harness.NUM_STEPS + 1))
  # ... on exactly the uninterrupted curve (same batches, same rngs, same state).
  for step, loss in {**before, **after}.items():
    np.testing.assert_allclose(loss, ref[0][step], rtol=1e-6, err_msg=f"step {step}")


# Poisons the motion targets of the batch of step POISON_STEP with NaN, then runs train.py.
_POISON = """
import sys
import numpy as np
from avatar_jax import train
from avatar_jax.data import pipeline
calls, original = [0], pipeline.to_global
def poisoned(batch, mesh, *args, **kwargs):
  calls[0] += 1
  if calls[0] == {step}:
    batch = dict(batch, motion_self=np.full_like(batch["motion_self"], np.nan))
    print("POISONED", batch["example_index"].tolist(), batch["clip_start"].tolist(),
          file=sys.stderr, flush=True)
  return original(batch, mesh, *args, **kwargs)
pipeline.to_global = poisoned
sys.argv[0] = "train"
train.run()
"""


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path_factory, tmp_path):
  cache = harness.cache_dir(tmp_path_factory)
  workdir = str(tmp_path / "nan")
  poison_step = harness.CKPT_EVERY * 2 + 1
  cmd = harness.train_command(workdir, program=("-c", _POISON.replace("{step}", str(poison_step))))
  out = harness.run(cmd, cache)
  assert out.returncode != 0
  assert "NonFiniteLossError" in out.stderr, out.stderr[-4000:]
  assert f"NaN or Inf at step {poison_step}" in out.stderr
  last_good = harness.CKPT_EVERY * 2
  assert f"last good checkpoint (step {last_good})" in out.stderr
  # The error names the examples of the poisoned batch (and their window starts).
  ids, starts = out.stderr.split("POISONED ")[1].split("\n")[0].split("] [")
  assert f"examples {ids}] (window start frames [{starts})" in out.stderr, out.stderr[-3000:]
  assert _finished_checkpoints(workdir) == [harness.CKPT_EVERY, last_good]

  # The last good checkpoint restores and is finite; up to the poisoned step the run followed
  # the unpoisoned curve, so the checkpoint holds the state an unpoisoned run had at that step.
  _, model, config, step = trainer.restore_model(workdir)
  assert step == last_good and config.train.num_steps == harness.NUM_STEPS
  leaves = jax.tree.leaves(jax.device_get(nnx.state(model)))
  assert leaves and all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
  reference = harness.trained_workdir(tmp_path_factory)
  ref_losses = harness.read_scalars(os.path.join(reference, "tb"), "train/loss")[0]
  losses = harness.read_scalars(os.path.join(workdir, "tb"), "train/loss")[0]
  assert sorted(losses) == list(range(1, poison_step))
  for s in losses:
    np.testing.assert_allclose(losses[s], ref_losses[s], rtol=1e-6, err_msg=f"step {s}")
