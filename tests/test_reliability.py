"""Checkpoint reliability: a run SIGKILLed at random points resumes onto the uninterrupted loss
curve; a damaged latest checkpoint falls back to the previous one; a workdir of another config is
refused (unless the differing keys are named in `allow_config_change`). (A non-finite loss naming
its batch's examples: test_trainer.py::test_nonfinite_loss_stops_and_keeps_last_good_checkpoint.)
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import trainer_harness as harness
from avatar_jax import checkpointing, sharding, trainer
from avatar_jax.data import pipeline

# A process that imports the trainer once, then forks one training child per line read from
# stdin and reports "pid <n>" and "exit <code> <CPU seconds>" on stdout. Forking skips the ~6 s
# of imports per restart (the parent never touches a JAX backend, so the children start clean).
# Each child appends every logged loss to LOSSES as {"step", "loss", "pid"} lines, flushed at
# once, so the losses of a killed child survive it (TensorBoard files are flushed every 2 min).
_FORK_SERVER = r"""
import json, os, sys, traceback
sys.path.insert(0, os.path.join(os.environ["REPO"], "tests"))
import trainer_harness as harness
import tensorboardX  # imports torch (~5 s): once here, not in every child
from avatar_jax import trainer, writers
config = harness.load_quickstart(**json.loads(sys.argv[1]))
workdir, losses = sys.argv[2], sys.argv[3]
original = writers.LogWriter.write_scalars
def write_scalars(self, step, scalars):
  original(self, step, scalars)
  if "train/loss" in scalars:
    with open(losses, "a") as f:
      f.write(json.dumps({"step": int(step), "loss": float(scalars["train/loss"]),
                          "pid": os.getpid()}) + "\n")
writers.LogWriter.write_scalars = write_scalars
for line in sys.stdin:
  pid = os.fork()
  if pid == 0:
    code = 0
    try:
      trainer.train_and_evaluate(config, workdir)
    except BaseException:
      traceback.print_exc()
      code = 1
    sys.stderr.flush()
    os._exit(code)
  print("pid", pid, flush=True)
  _, status, usage = os.wait4(pid, 0)
  print("exit", os.waitstatus_to_exitcode(status), round(usage.ru_utime + usage.ru_stime, 1),
        flush=True)
"""


def _checkpoints(workdir):
  path = os.path.join(workdir, "checkpoints")
  return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def _read_losses(path):
  """{step: [loss, ...]} over every process that logged it."""
  out = {}
  with open(path) as f:
    for line in f:
      if line.endswith("\n"):    # a line cut by SIGKILL is not a logged loss
        r = json.loads(line)
        out.setdefault(r["step"], []).append(r["loss"])
  return out


def test_sigkill_at_random_points_resumes_on_the_uninterrupted_curve(tmp_path_factory, tmp_path):
  cache = harness.cache_dir(tmp_path_factory)
  reference = harness.trained_workdir(tmp_path_factory)   # uninterrupted, same seed
  ref = harness.read_scalars(os.path.join(reference, "tb"), "train/loss")[0]
  assert sorted(ref) == list(range(1, harness.NUM_STEPS + 1))

  workdir, losses = str(tmp_path / "run"), str(tmp_path / "losses.jsonl")
  # Checkpoints every step, so each child can be killed after its own progress.
  overrides = json.dumps({"train.ckpt_every": 1, "train.max_checkpoints": 3})
  env = dict(harness.subprocess_env(cache), REPO=harness.REPO)
  # On one device a child costs ~3 s of CPU instead of ~6 s (saves of 8 replicas); the step
  # computes the reference's losses on 8 devices to float32 round-off (test_trainer checks
  # meshes agree to rtol 1e-5).
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", "device_count=1")
  server = subprocess.Popen([sys.executable, "-c", _FORK_SERVER, overrides, workdir, losses],
                            cwd=harness.REPO, env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=open(tmp_path / "log.txt", "w"),
                            text=True)
  rng = np.random.default_rng(0)
  kills, exit_code, cpu = [], None, []
  try:
    while exit_code is None:
      server.stdin.write("go\n")
      server.stdin.flush()
      started = server.stdout.readline().split()
      assert started and started[0] == "pid", open(tmp_path / "log.txt").read()[-4000:]
      pid = int(started[1])
      start = (_checkpoints(workdir) or [0])[-1]
      # A random point after this child's first new checkpoint: inside the next step, its
      # asynchronous save, the log writes or the save's finalisation.
      delay = rng.uniform(0.0, 0.2)
      deadline = time.monotonic() + 120
      while time.monotonic() < deadline and (_checkpoints(workdir) or [0])[-1] <= start:
        time.sleep(0.01)
      time.sleep(delay)
      last = (_checkpoints(workdir) or [0])[-1]
      if last < harness.NUM_STEPS:
        os.kill(pid, signal.SIGKILL)   # (the server has not reaped it, so the pid is its own)
      status = server.stdout.readline().split()
      assert status and status[0] == "exit", open(tmp_path / "log.txt").read()[-4000:]
      cpu.append(float(status[2]))
      if int(status[1]) == -signal.SIGKILL:
        kills.append((start, last, round(delay, 2)))
      else:
        exit_code = int(status[1])
  finally:
    server.stdin.close()
    server.wait(timeout=30)
  log = open(tmp_path / "log.txt").read()
  print(f"{len(cpu)} children, CPU seconds {cpu}; kills (from, at, delay) {kills}")
  assert exit_code == 0, log[-4000:]
  assert len(kills) >= 10, f"only {len(kills)} kills: {kills}"
  assert _checkpoints(workdir)[-1] == harness.NUM_STEPS

  got = _read_losses(losses)
  assert sorted(got) == sorted(ref), (sorted(got), kills)
  # Every process, killed or not, logged exactly the uninterrupted loss of each of its steps.
  for step, values in got.items():
    np.testing.assert_allclose(values, ref[step], rtol=1e-5, err_msg=f"step {step} {kills}")
  assert sum(len(v) for v in got.values()) > len(got), "no step was ever recomputed"


# ------------------------------------------------------------------------ damaged checkpoints
def _damage(step_dir, how):
  """Truncates or overwrites the files of one checkpoint, as a crash or bad disk would."""
  if how == "state_truncated":
    for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
      with open(f, "r+b") as fh:
        fh.truncate(os.path.getsize(f) // 2)
  elif how == "state_garbled":
    rng = np.random.default_rng(1)
    for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
      with open(f, "r+b") as fh:
        fh.seek(os.path.getsize(f) // 2)
        fh.write(rng.integers(0, 256, 64, dtype=np.uint8).tobytes())
  elif how == "data_emptied":
    for f in glob.glob(os.path.join(step_dir, "data", "*.json")):
      open(f, "w").close()
  else:
    raise ValueError(how)


@pytest.fixture(scope="module")
def restore_target():
  """(config, abstract state) of the tiny run on this process's 8 devices."""
  config = harness.load_quickstart()
  mesh = sharding.make_mesh(dict(config.mesh))
  s = trainer.setup(config, mesh, fit=False, init_from=False, abstract=True)
  return config, s.state


def _copy_trained(tmp_path_factory, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(harness.trained_workdir(tmp_path_factory), workdir)
  return workdir


@pytest.mark.parametrize("how", ["state_truncated", "state_garbled", "data_emptied"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(how, restore_target,
                                                              tmp_path_factory, tmp_path, caplog):
  config, abstract = restore_target
  workdir = _copy_trained(tmp_path_factory, tmp_path)
  directory = os.path.join(workdir, "checkpoints")
  last, previous = harness.NUM_STEPS, harness.NUM_STEPS - harness.CKPT_EVERY
  want = checkpointing.Checkpointer(directory)
  want_state = jax.device_get(want.restore(abstract, step=previous))
  want.close()
  _damage(os.path.join(directory, str(last)), how)

  ckpt = checkpointing.Checkpointer(directory, max_to_keep=10)
  data = pipeline.make(config.data, "train", seed=config.seed)
  with caplog.at_level(logging.WARNING):
    step, state = ckpt.restore_latest(abstract, data)
  assert step == previous
  warning = [r.getMessage() for r in caplog.records if "does not read back" in r.getMessage()]
  assert len(warning) == 1 and f"{directory}/{last} does not read back (" in warning[0], warning
  assert f"resuming from step {previous}" in warning[0]
  # The damaged files are kept for inspection, out of the manager's way.
  assert os.path.isdir(os.path.join(directory, f"{last}.damaged"))
  assert ckpt.latest_step() == previous
  got = jax.device_get(state)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want_state)):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))
  # The data iterator is at the previous checkpoint's position: the batch of step previous + 1.
  ref = pipeline.make(config.data, "train", seed=config.seed)
  for _ in range(previous):
    next(ref)
  expected, actual = next(ref), next(data)
  for k in expected:
    np.testing.assert_array_equal(actual[k], expected[k], err_msg=k)
  # The run can write that step again, and it reads back.
  ckpt.save(last, state, data, config)
  ckpt.wait()
  assert ckpt.restore_latest(abstract)[0] == last
  ckpt.close()


def test_no_readable_checkpoint_is_an_error_that_renames_nothing(restore_target,
                                                                 tmp_path_factory, tmp_path):
  _, abstract = restore_target
  workdir = _copy_trained(tmp_path_factory, tmp_path)
  directory = os.path.join(workdir, "checkpoints")
  steps = sorted(int(d) for d in os.listdir(directory) if d.isdigit())
  for step in steps:
    _damage(os.path.join(directory, str(step)), "data_emptied")
  ckpt = checkpointing.Checkpointer(directory)
  data = pipeline.make(harness.load_quickstart().data, "train", seed=0)
  with pytest.raises(ValueError, match=r"no checkpoint in .* reads back") as e:
    ckpt.restore_latest(abstract, data)
  for step in steps:
    assert f"step {step}: " in str(e.value)
  assert sorted(int(d) for d in os.listdir(directory) if d.isdigit()) == steps
  ckpt.close()


def test_restore_model_skips_a_damaged_latest_checkpoint(tmp_path_factory, tmp_path, caplog):
  workdir = _copy_trained(tmp_path_factory, tmp_path)
  _damage(os.path.join(workdir, "checkpoints", str(harness.NUM_STEPS)), "state_truncated")
  with caplog.at_level(logging.WARNING):
    _, model, _, step = trainer.restore_model(workdir)
  assert step == harness.NUM_STEPS - harness.CKPT_EVERY
  assert any(f"/{harness.NUM_STEPS} does not read back" in r.getMessage() for r in caplog.records)
  # restore_model only reads: the damaged checkpoint stays where it is.
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(harness.NUM_STEPS)))


# ------------------------------------------------------------------------ another config
def test_workdir_of_another_config_is_refused_naming_the_keys(tmp_path_factory, tmp_path):
  workdir = _copy_trained(tmp_path_factory, tmp_path)
  before = sorted(os.listdir(workdir))
  changed = harness.load_quickstart(**{"optim.lr": 0.5, "data.batch_size": 4})
  with pytest.raises(trainer.ConfigMismatchError) as e:
    trainer.train_and_evaluate(changed, workdir)
  msg = str(e.value)
  assert "was written by another config" in msg
  assert "optim.lr: checkpoint 0.001, this run 0.5" in msg
  assert "data.batch_size: checkpoint 8, this run 4" in msg
  assert "--allow_config_change=data.batch_size,optim.lr" in msg
  assert sorted(os.listdir(workdir)) == before   # nothing written into the refused workdir

  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  # Named keys (or their prefixes) may differ deliberately; naming a key that does not exist
  # is an error, not a silent pass.
  trainer.check_resumable(ckpt, changed, ("optim", "data.batch_size"))
  with pytest.raises(trainer.ConfigMismatchError, match=r"data.batch_size") as e:
    trainer.check_resumable(ckpt, changed, ("optim.lr",))
  assert "optim.lr" not in str(e.value)
  with pytest.raises(KeyError, match=r"allow_config_change: 'optim.lrr' is not a key"):
    trainer.check_resumable(ckpt, changed, ("optim.lrr",))
  # Where and how often the run works and reports may change freely: a checkpoint restores
  # onto any mesh.
  trainer.check_resumable(ckpt, harness.load_quickstart(**{
      "mesh.data": 2, "mesh.fsdp": 4, "train.log_every": 5, "train.ckpt_every": 1,
      "evals.test.batch_size": 1, "data.worker_count": 2}))
  ckpt.close()
