"""Launch scripts: shell syntax, shellcheck, usage messages, the commands each --dry-run prints,
and the TPU and SLURM launchers against stand-in tools. (A real two-process run of
launch/local/train.sh on CPU is in test_multiprocess.py.)"""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

import trainer_harness as harness

SCRIPTS = [os.path.join(harness.REPO, "launch", p) for p in
           ("tpu/train.sh", "gpu/train.sbatch", "local/train.sh", "local/sweep.sh",
            "local/vae_stages.sh")]


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


# ------------------------------------------------------------------ --dry-run
def _dry_run(tmp_path, script, *args, **env):
  """The command lines a launcher prints with --dry-run (each split like the shell would),
  checking that it ran none of them: every tool it could call is a recorder."""
  tmp = pathlib.Path(tempfile.mkdtemp(dir=tmp_path))
  tools = _fake_tools(tmp, **{n: _FAKE_RECORDER for n in ("gcloud", "sbatch", "srun", "python",
                                                          "python3", "git", "env")})
  base = {k: v for k, v in tools.items() if not k.startswith(("SLURM_", "GPUS", "PROCS"))}
  out = subprocess.run([script, "--dry-run", *args], env={**base, **env}, capture_output=True,
                       text=True, timeout=30)
  assert out.returncode == 0, out.stderr
  assert not list(tmp.glob("rec.*")), "a dry run ran a command"
  return [shlex.split(l) for l in out.stdout.splitlines()]


def test_tpu_dry_run_create_setup_run_and_delete(tmp_path):
  lines = _dry_run(tmp_path, SCRIPTS[0], "--create=v5p-128", "my-tpu", "us-east5-a",
                   "configs/quickstart.py:steps=5", "/mnt/runs/a b", "--config.mesh.fsdp=64",
                   PROJECT="proj", SPOT="1")
  vm = ["gcloud", "compute", "tpus", "tpu-vm"]
  target = ["--zone=us-east5-a", "--project=proj"]
  create, archive, scp, setup, train = lines
  assert create == [*vm, "create", "my-tpu", *target, "--accelerator-type=v5p-128",
                    "--version=v2-alpha-tpuv5", "--spot"]
  assert archive[:3] == ["git", "-C", harness.REPO] and archive[3:6] == [
      "archive", "--format=tar.gz", "-o"] and archive[-1] == "HEAD"
  assert scp == [*vm, "scp", archive[6], "my-tpu:avatar_jax.tar.gz", *target, "--worker=all"]
  for ssh in (setup, train):
    assert ssh[:9] == [*vm, "ssh", "my-tpu", *target, "--worker=all"] and len(ssh) == 10
  assert "pip install -q -e './avatar_jax[tpu]'" in setup[9]
  remote = train[9].removeprefix("--command=")
  assert remote.startswith("(cd './avatar_jax' && exec nohup python3 -m avatar_jax.train ")
  # The remote shell sees the training arguments exactly once quoted.
  inner = remote.split("python3 -m avatar_jax.train", 1)[1].split(")", 1)[0]
  assert shlex.split(inner) == ["--config=configs/quickstart.py:steps=5",
                                "--workdir=/mnt/runs/a b", "--config.mesh.fsdp=64"]
  # Existing VM, code already there: only the training command.
  (only,) = _dry_run(tmp_path, SCRIPTS[0], "my-tpu", "us-east5-a", "c.py", "/w", SETUP="0")
  assert only[4] == "ssh" and "avatar_jax.train --config=c.py --workdir=/w" in only[-1]
  (delete,) = _dry_run(tmp_path, SCRIPTS[0], "--delete", "my-tpu", "us-east5-a")
  assert delete == [*vm, "delete", "my-tpu", "--zone=us-east5-a", "--quiet"]


def test_slurm_dry_run_submits_then_runs_one_task_per_node(tmp_path):
  submit, in_job = _dry_run(tmp_path, SCRIPTS[1], "configs/quickstart.py", "/shared/run a",
                            "--config.mesh.fsdp=8", SBATCH_ARGS="--nodes=4 -p gpu")
  assert submit == ["sbatch", "--nodes=4", "-p", "gpu", SCRIPTS[1], "configs/quickstart.py",
                    "/shared/run a", "--config.mesh.fsdp=8"]
  srun = ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1", "python", "-m",
          "avatar_jax.train", "--config=configs/quickstart.py", "--workdir=/shared/run a",
          "--config.mesh.fsdp=8"]
  assert in_job == ["#", "then,", "in", "the", "job:", *srun]
  # Inside the job (what sbatch runs): the srun line.
  lines = _dry_run(tmp_path, SCRIPTS[1], "configs/quickstart.py", "/shared/run a",
                   "--config.mesh.fsdp=8", SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=harness.REPO)
  assert lines[0][:2] == ["job", "7:"] and lines[1] == srun


def test_local_dry_run_one_and_several_processes(tmp_path):
  (one,) = _dry_run(tmp_path, SCRIPTS[2], "configs/quickstart.py", "runs/qs",
                    "--config.mesh.fsdp=2", GPUS="0,1")
  assert one == ["env", "CUDA_VISIBLE_DEVICES=0,1", "python", "-m", "avatar_jax.train",
                 "--config=configs/quickstart.py", "--workdir=runs/qs", "--config.mesh.fsdp=2"]
  procs = _dry_run(tmp_path, SCRIPTS[2], "configs/quickstart.py", "runs/mp", GPUS="0,1,2,3",
                   PROCS="2", PORT="4000")
  assert procs == [["env", f"CUDA_VISIBLE_DEVICES={gpus}", "AVATAR_COORDINATOR=localhost:4000",
                    "AVATAR_NUM_PROCESSES=2", f"AVATAR_PROCESS_ID={i}", "python", "-m",
                    "avatar_jax.train", "--config=configs/quickstart.py", "--workdir=runs/mp"]
                   for i, gpus in enumerate(("0,2", "1,3"))]
  out = subprocess.run([SCRIPTS[2], "--dry-run", "c.py", "w"], capture_output=True, text=True,
                       env={**os.environ, "GPUS": "0,1,2", "PROCS": "2"})
  assert out.returncode == 2 and "PROCS=2 does not divide the 3 GPUs" in out.stderr


# ------------------------------------------------------------------ sweeps
def test_sweep_dry_run_variants_seeds_slots_and_table(tmp_path):
  lines = _dry_run(tmp_path, SCRIPTS[3], "configs/quickstart.py:steps=5", "runs/sw", "attn=frame",
                   "attn=global,lr=1e-4", "-", "--", "--config.train.log_every=1",
                   SEEDS="0,1", GPUS="0,1", PER_GPU="2")
  runs, table = lines[:6], lines[-1]
  env = ["env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.450"]
  want = [("configs/quickstart.py:steps=5,attn=frame", "attn-frame"),
          ("configs/quickstart.py:steps=5,attn=global,lr=1e-4", "attn-global_lr-1e-4"),
          ("configs/quickstart.py:steps=5", "base")]
  for i, run in enumerate(runs):
    config, label = want[i // 2]
    assert run == ["env", f"CUDA_VISIBLE_DEVICES={(i // 2) % 2}", env[1], "python", "-m",
                   "avatar_jax.train", f"--config={config}",
                   f"--workdir=runs/sw/{label}_seed{i % 2}", f"--config.seed={i % 2}",
                   "--config.compile_cache=runs/sw/jax_cache", "--config.train.log_every=1"]
  workdirs = ",".join(f"runs/sw/{l}_seed{s}" for _, l in want for s in (0, 1))
  assert table == ["python", "-m", "avatar_jax.evaluate", "--table=synthdyad_ablation", "--saved",
                   f"--workdir={workdirs}",
                   "--names=attn-frame,attn-frame,attn-global_lr-1e-4,attn-global_lr-1e-4,base,base"]
  # No GPUs, no cache: the bare command, one run after another.
  (one, _, _) = _dry_run(tmp_path, SCRIPTS[3], "c.py", "w", "-", GPUS="", CACHE="")
  assert one == ["python", "-m", "avatar_jax.train", "--config=c.py", "--workdir=w/base_seed0",
                 "--config.seed=0"]
  for env_vars, message in (({"SEEDS": "0,x"}, "SEEDS=0,x: expected comma-separated integers"),
                            ({"PER_GPU": "0"}, "PER_GPU=0: expected a positive integer")):
    out = subprocess.run([SCRIPTS[3], "--dry-run", "c.py", "w", "-"], capture_output=True,
                         text=True, env={**os.environ, **env_vars})
    assert out.returncode == 2 and message in out.stderr


_FAKE_TRAIN = """#!{python}
# Stands in for `python -m avatar_jax.train`: records when it ran on which GPU, sleeps, and fails
# for the config argument fail=1; SIGTERM makes it record "stopped" and exit 0, as the trainer does.
import json, os, signal, sys, time
args = dict(a.split("=", 1) for a in sys.argv[3:] if a.startswith("--"))
def record(what):
  with open(os.environ["FAKE_RECORD"] + ".python", "a") as f:
    f.write(json.dumps([what, args["--workdir"], os.environ.get("CUDA_VISIBLE_DEVICES"),
                        os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"), time.time()]) + "\\n")
signal.signal(signal.SIGTERM, lambda *_: (record("stopped"), sys.exit(0)))
record("start")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.6")))
record("end")
sys.exit(3 if "fail=1" in args["--config"] else 0)
"""


def _busy(records):
  """Most runs in flight at once, overall and per GPU, from start/end records."""
  events = sorted((t, +1 if what == "start" else -1, gpu) for what, _, gpu, _, t in records)
  most, per, now, on = 0, {}, 0, {}
  for _, d, gpu in events:
    now += d
    on[gpu] = on.get(gpu, 0) + d
    most, per[gpu] = max(most, now), max(per.get(gpu, 0), on[gpu])
  return most, per


def test_sweep_runs_spread_over_gpu_slots_and_report_failures(tmp_path):
  env = _fake_tools(tmp_path, python=_FAKE_TRAIN)
  out = subprocess.run([SCRIPTS[3], "c.py", str(tmp_path / "sw"), "a=1", "fail=1", "b=2"],
                       env={**env, "SEEDS": "0,1", "GPUS": "4,7", "PER_GPU": "2"},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 1, out.stderr   # the fail=1 runs failed, the others ran on
  records = _records(tmp_path, "python")
  starts = [r for r in records if r[0] == "start"]
  assert len(starts) == 6 and sum(r[0] == "end" for r in records) == 6
  assert {r[2] for r in starts} == {"4", "7"} and {r[3] for r in starts} == {"0.450"}
  most, per = _busy(records)
  assert most == 4 and per == {"4": 2, "7": 2}   # 2 GPUs x 2 slots, never more
  lines = [l for l in out.stdout.splitlines() if "sweep.log" in l]
  assert len(lines) == 6
  assert sum(" exit   3 " in l for l in lines) == 2 and sum(" exit   0 " in l for l in lines) == 4
  assert "--names=a-1,a-1,fail-1,fail-1,b-2,b-2" in out.stdout
  assert (tmp_path / "sw" / "b-2_seed1" / "sweep.log").exists()


def test_sweep_sigterm_stops_the_runs_in_flight_and_starts_no_more(tmp_path):
  env = _fake_tools(tmp_path, python=_FAKE_TRAIN)
  proc = subprocess.Popen([SCRIPTS[3], "c.py", str(tmp_path / "sw"), "a=1", "b=2"],
                          env={**env, "SEEDS": "0,1,2", "GPUS": "", "PER_GPU": "2",
                               "FAKE_SLEEP": "30"},
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline and len(
      [l for l in (tmp_path / "rec.python").read_text().splitlines()] if (
          tmp_path / "rec.python").exists() else []) < 2:
    time.sleep(0.05)
  proc.terminate()
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 143 and "rerun the same command to resume" in err
  records = _records(tmp_path, "python")
  # The two runs in flight (CPU slots: no GPU pinning) were told to stop; the other four never
  # started.
  assert sorted(r[0] for r in records) == ["start", "start", "stopped", "stopped"]
  assert {r[2] for r in records} == {None}


def test_vae_stages_chain_image_video_evaluation_and_export(tmp_path):
  """launch/local/vae_stages.sh runs (a recording python here) the image stage, the video stage
  started from it with its own rate and warm-up, the table, the sample and the weights export;
  with IMG_FROM the image stage is skipped and the video stage starts from IMG_FROM."""
  script = os.path.join(harness.REPO, "launch", "local", "vae_stages.sh")
  env = _fake_tools(tmp_path, python=_FAKE_RECORDER)
  env.update(IMG_STEPS="7", VID_STEPS="5", VID_LR="1e-4", VID_WARMUP="2", WORKERS="3",
             EVAL_CLIPS="2")
  root = str(tmp_path / "r")
  out = subprocess.run([script, "128", root, "lip=3"], env=env, capture_output=True, text=True,
                       timeout=60)
  assert out.returncode == 0, out.stderr
  calls = [c[1:] for c in _records(tmp_path, "python")]
  assert [c[:2] for c in calls] == [["-m", "avatar_jax.train"]] * 2 + \
      [["-m", "avatar_jax.evaluate"]] * 2 + [["-m", "avatar_jax.convert"]]
  img, vid, table, sample, export = calls
  common = "size=S,res=128,posterior=mean,kl=0,workers=3,eval_clips=2,lip=3"
  assert img[img.index("--config") + 1] == \
      f"configs/vae_synthdyad.py:{common},frames=1,batch=32,steps=7"
  assert img[img.index("--workdir") + 1] == f"{root}/img"
  assert vid[vid.index("--config") + 1] == (f"configs/vae_synthdyad.py:{common},frames=49,"
                                            f"batch=4,steps=5,lr=1e-4,init={root}/img")
  assert "--config.optim.warmup_steps=2" in vid and vid[vid.index("--workdir") + 1] == f"{root}/vid"
  assert table[table.index("--evals") + 1] == "recon" and "--probe_clips" in table
  assert table[table.index("--probe_clips") + 1] == "6"
  assert sample[sample.index("--evals") + 1] == "sample"
  assert export[2:] == ["weights", "--src", f"{root}/vid", "--out", f"{root}/weights"]
  assert "image stage exit 0" in out.stdout and "done:" in out.stdout

  os.remove(tmp_path / "rec.python")
  env["IMG_FROM"] = "/models/img_weights"
  out = subprocess.run([script, "64", root], env=env, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr
  calls = [c[1:] for c in _records(tmp_path, "python")]
  assert len(calls) == 4 and "image stage" not in out.stdout
  assert calls[0][calls[0].index("--config") + 1].endswith(",init=/models/img_weights")
