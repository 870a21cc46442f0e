"""Launch scripts: shell syntax (and shellcheck where installed), usage messages, and a real
two-process run of launch/local/train.sh on CPU (jax.distributed with a local coordinator)."""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest
from flax import nnx

import trainer_harness as harness
from avatar_jax import trainer

SCRIPTS = [os.path.join(harness.REPO, "launch", p) for p in
           ("tpu/train.sh", "gpu/train.sbatch", "local/train.sh")]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: os.path.relpath(p, harness.REPO))
def test_script_syntax_and_usage(script):
  assert os.access(script, os.X_OK), f"{script} is not executable"
  subprocess.run(["bash", "-n", script], check=True)
  out = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
  assert out.returncode == 2
  assert "sage" in out.stdout + out.stderr and "CONFIG" in out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_shellcheck_clean():
  out = subprocess.run(["shellcheck", *SCRIPTS], capture_output=True, text=True)
  assert out.returncode == 0, out.stdout


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_local_two_processes_on_cpu(tmp_path, tmp_path_factory):
  steps = 4
  workdir = tmp_path / "mp"
  env = harness.subprocess_env(harness.cache_dir(tmp_path_factory))
  # One CPU device per process: 2 processes x 1 device = a 2-device global mesh.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env["XLA_FLAGS"])
  env.update(JAX_PLATFORMS="cpu", PROCS="2", PORT=str(_free_port()))
  overrides = {**harness.OVERRIDES, "train.num_steps": steps, "train.ckpt_every": 2}
  cmd = [os.path.join(harness.REPO, "launch", "local", "train.sh"),
         f"{harness.QUICKSTART}:{harness.CONFIG_ARG}", str(workdir),
         *[f"--config.{k}={v}" for k, v in overrides.items()]]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
  log = out.stdout + out.stderr
  assert out.returncode == 0, log[-4000:]
  for i in (0, 1):
    assert f"[{i}] " in log and f"Process {i} of 2, 1 local / 2 global devices" in log, log[-3000:]
  # The loss is a global quantity: both processes log the same value at every step.
  losses = {i: dict(re.findall(rf"^\[{i}\] .*\] \[(\d+)\] .*train/loss=([0-9.eE+-]+)", log, re.M))
            for i in (0, 1)}
  assert sorted(map(int, losses[0])) == list(range(1, steps + 1))
  assert losses[0] == losses[1]
  # The two-process checkpoint restores in this (8-device) process.
  _, model, config, step = trainer.restore_model(str(workdir))
  assert step == steps and config.train.num_steps == steps
  leaves = jax.tree.leaves(jax.device_get(nnx.state(model)))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in leaves)
