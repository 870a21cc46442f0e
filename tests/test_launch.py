"""Launch scripts: shell syntax (and shellcheck where installed), usage messages, and a real
two-process run of launch/local/train.sh on CPU (jax.distributed with a local coordinator)."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

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


# ------------------------------------------------------------------ launchers against fake tools
_FAKE_GCLOUD = """#!{python}
# Stands in for `gcloud compute tpus tpu-vm {{scp,ssh}}`: one local "worker" whose home is $HOME.
import os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_RECORD"] + ".gcloud", "a") as f:
  f.write(repr(args) + "\\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"] and "--worker=all" in args, args
if args[3] == "scp":
  shutil.copy(args[4], os.path.join(os.environ["HOME"], args[5].split(":", 1)[1]))
elif args[3] == "ssh":
  command = [a for a in args if a.startswith("--command=")][0].split("=", 1)[1]
  sys.exit(subprocess.call(["bash", "-c", command], cwd=os.environ["HOME"]))
"""

_FAKE_RECORDER = """#!{python}
# Records its arguments (one JSON list per call) instead of running them.
import json, os, sys
with open(os.environ["FAKE_RECORD"] + ".{name}", "a") as f:
  f.write(json.dumps([os.getcwd()] + sys.argv[1:]) + "\\n")
"""


def _fake_tools(tmp_path, **tools):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in tools.items():
    path = bin_dir / name
    path.write_text(text.format(python=sys.executable, name=name))
    path.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_RECORD=str(tmp_path / "rec"))
  return env


def _records(tmp_path, name, timeout=10.0):
  path = tmp_path / f"rec.{name}"
  deadline = time.monotonic() + timeout
  while not path.exists() and time.monotonic() < deadline:   # background commands
    time.sleep(0.05)
  return [json.loads(l) for l in path.read_text().splitlines()]


def test_tpu_launcher_copies_installs_and_runs_on_all_workers(tmp_path):
  home = tmp_path / "home"
  home.mkdir()
  env = _fake_tools(tmp_path, gcloud=_FAKE_GCLOUD, python3=_FAKE_RECORDER)
  env["HOME"] = str(home)
  workdir = "/mnt/shared runs/exp 1"   # spaces survive the two shells
  out = subprocess.run([SCRIPTS[0], "my-tpu", "us-west4-a", "configs/quickstart.py:steps=5",
                        workdir, "--config.model.attention.mode=global"],
                       env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  # The committed tree landed on the worker.
  assert (home / "avatar_jax" / "pyproject.toml").exists()
  assert (home / "avatar_jax" / "avatar_jax" / "trainer.py").exists()
  deadline = time.monotonic() + 10   # the training command runs in the background
  while len(calls := _records(tmp_path, "python3")) < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
  assert len(calls) == 3, calls   # pip upgrade, editable install, training
  install, train = calls[1], calls[2]
  assert install[1:] == ["-m", "pip", "install", "-q", "-e", "./avatar_jax[tpu]"]
  assert train[0] == str(home / "avatar_jax")
  assert train[1:] == ["-m", "avatar_jax.train", "--config=configs/quickstart.py:steps=5",
                       f"--workdir={workdir}", "--config.model.attention.mode=global"]
  assert (home / "avatar_jax" / "train.log").exists()
  gcloud = (tmp_path / "rec.gcloud").read_text()
  assert "--zone=us-west4-a" in gcloud and "my-tpu" in gcloud


def test_slurm_script_runs_one_task_per_node(tmp_path):
  env = _fake_tools(tmp_path, srun=_FAKE_RECORDER)
  env.update(SLURM_SUBMIT_DIR=harness.REPO, SLURM_JOB_ID="7", SLURM_JOB_NUM_NODES="2")
  out = subprocess.run(["bash", SCRIPTS[1], "configs/quickstart.py", "/shared/run a",
                        "--config.mesh.fsdp=8"], env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  (call,) = _records(tmp_path, "srun")
  assert call[0] == harness.REPO
  assert call[1:] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "python", "-m",
                      "avatar_jax.train", "--config=configs/quickstart.py",
                      "--workdir=/shared/run a", "--config.mesh.fsdp=8"]
  # The #SBATCH header asks for one task per node with all its GPUs.
  header = open(SCRIPTS[1]).read()
  assert "#SBATCH --ntasks-per-node=1" in header and "#SBATCH --gpus-per-node=" in header
