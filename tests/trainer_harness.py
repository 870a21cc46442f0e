"""Shared helpers for the trainer / entry-point / notebook tests: one tiny config, subprocess
runs of the entry points, TensorBoard event reading, and one trained workdir per test session.

Everything is sized for CI (2 CPU cores): a 1-block, 32-wide motion DiT on 1-s SynthDyad windows
with 16 mel bands. Subprocesses share a persistent XLA compilation cache, so only the first run
of a given program pays for compilation.
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import shutil
import struct
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart.py")

NUM_STEPS = 12
CKPT_EVERY = 3
# Config-file arguments and flag overrides of the tiny run (shared by every subprocess, so the
# compiled train step is identical and comes from the compilation cache after the first run).
CONFIG_ARG = "steps=%d,width=32,depth=1,batch=8,eval_clips=2,clip_frames=25" % NUM_STEPS
OVERRIDES = {
    "data.split_sizes.train": 16,
    "data.split_sizes.test": 4,
    "data.split_sizes.ood": 2,
    "data.features.n_mels": 16,
    "model.sample.steps": 2,
    "optim.warmup_steps": 2,
    "train.log_every": 1,
    "train.ckpt_every": CKPT_EVERY,
    "train.max_checkpoints": 10,
    "train.stats_batches": 1,
    "train.progress_bar": False,
    "evals.sample.every": 0,
    "evals.sample.at_end": False,
    "evals.test.at_end": False,
    "evals.test.batch_size": 2,
    # The 2 eval clips are one conversation (both sides), too few for the crosstalk row.
    "evals.test.crosstalk": False,
}


def load_quickstart(arg: str = CONFIG_ARG, **overrides):
  """configs/quickstart.py's `get_config(arg)` with dotted-key overrides applied (still locked)."""
  spec = importlib.util.spec_from_file_location("quickstart_config", QUICKSTART)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg)
  for key, value in {**OVERRIDES, **overrides}.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def subprocess_env(cache_dir: str) -> dict[str, str]:
  """The test process's environment (8 fake devices) plus a shared compilation cache."""
  env = dict(os.environ)
  env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", PYTHONUNBUFFERED="1")
  # LLVM optimisation costs most of the CPU compile time and buys nothing at these sizes.
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                               "--xla_llvm_disable_expensive_passes=true"]).strip()
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def train_command(workdir: str, *extra: str, program=("-m", "avatar_jax.train")) -> list[str]:
  flags = [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
  return [sys.executable, *program, f"--config={QUICKSTART}:{CONFIG_ARG}", *flags,
          f"--workdir={workdir}", *extra]


def run(cmd: list[str], cache_dir: str, timeout: float = 300) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=REPO, env=subprocess_env(cache_dir), capture_output=True,
                        text=True, timeout=timeout)


def _session_root(tmp_path_factory):
  """A folder shared by the whole test session, also across pytest-xdist workers."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def cache_dir(tmp_path_factory) -> str:
  """One compilation cache per test session (shared by xdist workers)."""
  path = _session_root(tmp_path_factory) / "jax_compilation_cache"
  path.mkdir(exist_ok=True)
  return str(path)


def trained_workdir(tmp_path_factory) -> str:
  """A workdir trained for NUM_STEPS steps with the tiny config, trained once per session.

  Tests only read it (evaluate/sample write next to the checkpoints, never into them). Under
  xdist the first worker to get the lock trains; the others wait and reuse it.
  """
  def build(path):
    out = run(train_command(path), cache_dir(tmp_path_factory))
    if out.returncode != 0:
      raise AssertionError(f"training the tiny config failed:\n{out.stderr[-4000:]}")

  return built_once(tmp_path_factory, "trained", build)


@contextlib.contextmanager
def fast_compile():
  """In-process counterpart of subprocess_env's XLA flags: every program compiled inside (the
  trainer's initialiser and step, evaluators, encoders) skips LLVM's optimisation, which is most
  of the CPU compile time and buys nothing at the tests' sizes. tests/conftest.py holds it
  for the whole test session."""
  import jax  # pylint: disable=g-import-not-at-top
  old = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)


def load_config(name: str, arg: str = ""):
  """configs/<name>.py's `get_config(arg)`."""
  spec = importlib.util.spec_from_file_location(f"{name}_config",
                                                os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def built_once(tmp_path_factory, name: str, build) -> str:
  """<session folder>/<name>, made by `build(path)` once per pytest run and shared across xdist
  workers and modules (a module-scoped fixture is rebuilt whenever other modules' tests run in
  between on the same worker)."""
  root = _session_root(tmp_path_factory)
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not done.exists():
        if path.exists():
          shutil.rmtree(path)   # a previous attempt that failed half-way
        build(str(path))
        done.touch()
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return str(path)


def video_latents(tmp_path_factory) -> tuple[str, str]:
  """(VAE workdir, latents dir) for the video DiT tests (Beyond Monologue, ECHO): a tiny VAE
  trained 2 steps and SynthDyad encoded by it (8 train, 3 test, 2 ood clips of 1.6 s = 40
  frames = 10 latent rows, at 32 px; 3 test clips are 2 conversations, which the tables'
  crosstalk row needs)."""
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top
  from avatar_jax.data import encoding  # pylint: disable=g-import-not-at-top

  def build(path):
    c = load_config("vae_synthdyad", "size=tiny,res=32,frames=5,batch=8,steps=2")
    c.data.split_sizes.train, c.data.split_sizes.test, c.data.split_sizes.ood = 8, 3, 2
    c.data.synthdyad.duration_s = 1.6
    c.evals = {}
    c.train.progress_bar = False
    trainer.train_and_evaluate(c, os.path.join(path, "vae"))
    encoding.encode(c, os.path.join(path, "latents"), os.path.join(path, "vae"), shard_size=8,
                    batch_size=4, progress=False)

  root = built_once(tmp_path_factory, "video_latents", build)
  return os.path.join(root, "vae"), os.path.join(root, "latents")


def streaming_workdir(tmp_path_factory) -> str:
  """A tiny Avatar Forcing workdir trained 2 steps (the weights only need to exist), for the
  streaming and web-demo tests."""
  from avatar_jax import trainer  # pylint: disable=g-import-not-at-top

  def build(path):
    c = load_config("forcing", "size=tiny,steps=2,batch=8,clip_frames=40,nfe=1")
    c.data.split_sizes.train, c.data.split_sizes.test = 16, 2
    c.evals = {}
    c.train.progress_bar, c.train.stats_batches = False, 1
    trainer.train_and_evaluate(c, path)

  return built_once(tmp_path_factory, "streaming", build)


# --------------------------------------------------------------------------- TensorBoard events
def _records(path: str):
  """Payloads of a TFRecord file (the container of TensorBoard event files)."""
  with open(path, "rb") as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    start = pos + 12
    if start + length + 4 > len(data):
      break  # a record cut short by a killed writer
    yield data[start:start + length]
    pos = start + length + 4


def read_scalars(logdir: str, tag: str) -> list[dict[int, float]]:
  """Per event file (in creation order): {step: value} of scalar `tag`."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  runs = []
  for name in (f for f in os.listdir(logdir) if "tfevents" in f):
    events = [event_pb2.Event.FromString(p) for p in _records(os.path.join(logdir, name))]
    values = {int(e.step): float(v.simple_value)
              for e in events for v in e.summary.value if v.tag == tag}
    runs.append((events[0].wall_time if events else 0.0, values))
  # Creation order: the first event of a file is written when its writer opens it.
  out = [values for _, values in sorted(runs, key=lambda r: r[0])]
  return out
