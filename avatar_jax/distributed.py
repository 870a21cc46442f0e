"""Multi-process start-up: `jax.distributed.initialize` where a cluster is detected, and the
checks that every process agrees on what it runs.

Detected set-ups (first match wins):
  explicit  AVATAR_COORDINATOR=host:port, AVATAR_NUM_PROCESSES, AVATAR_PROCESS_ID (all three;
            AVATAR_LOCAL_DEVICES=0,1 optionally restricts the process to those local devices)
  SLURM     SLURM_NTASKS > 1: JAX reads the coordinator, process count and id from SLURM; the
            local devices come from `slurm_local_devices` (one task per node drives all GPUs of
            its node, one task per GPU drives its GPU)
  TPU pod   TPU_WORKER_HOSTNAMES lists more than one worker: JAX reads the rest from the TPU VM
Anything else (one host) is a single process and nothing is initialised.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
from collections.abc import Mapping

import jax
import numpy as np
from absl import logging

EXPLICIT_VARS = ("AVATAR_COORDINATOR", "AVATAR_NUM_PROCESSES", "AVATAR_PROCESS_ID")


def detect(env: Mapping[str, str] | None = None) -> str | None:
  """'explicit', 'slurm', 'tpu' or None (single process), from the environment."""
  env = os.environ if env is None else env
  given = [v for v in EXPLICIT_VARS if v in env]
  if given:
    if len(given) != len(EXPLICIT_VARS):
      missing = sorted(set(EXPLICIT_VARS) - set(given))
      raise ValueError(f"explicit multi-process set-up: {given} are set but {missing} are not; "
                       f"set all of {list(EXPLICIT_VARS)}")
    return "explicit"
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  # Multi-host TPU VMs expose the worker list; a single host has one entry.
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "tpu"
  return None


def _tasks_per_node(env: Mapping[str, str]) -> int:
  if "SLURM_NTASKS_PER_NODE" in env:
    return int(env["SLURM_NTASKS_PER_NODE"])
  # SLURM_TASKS_PER_NODE looks like "8(x2),4": the first node's count is this layout's count.
  first = env.get("SLURM_TASKS_PER_NODE", "").split(",")[0].split("(")[0]
  if first:
    return int(first)
  return max(1, int(env["SLURM_NTASKS"]) // max(1, int(env.get("SLURM_NNODES", "1"))))


def slurm_local_devices(env: Mapping[str, str] | None = None) -> list[int] | None:
  """Local GPU ids this SLURM task drives, or None to let JAX see every visible device.

  JAX's own SLURM detection gives every task the single device `SLURM_LOCALID`, which turns a
  one-task-per-node job into one GPU per node. Here: a task that sees one GPU uses it; one task
  per node uses all GPUs it sees; k tasks sharing n visible GPUs take n/k consecutive ones each.
  """
  env = os.environ if env is None else env
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d]
  n = len(visible) or int(env.get("SLURM_GPUS_ON_NODE", "0") or 0)
  if n == 0:
    return None   # no GPUs (a CPU job): every process uses its CPU device(s)
  tasks = _tasks_per_node(env)
  if n == 1 or tasks == 1:
    return list(range(n))
  if n % tasks:
    visible_env = env.get("CUDA_VISIBLE_DEVICES", "")
    raise ValueError(f"SLURM: {tasks} tasks per node cannot share {n} GPUs evenly "
                     f"(CUDA_VISIBLE_DEVICES={visible_env!r}); use one task per node "
                     "(--ntasks-per-node=1) or one per GPU")
  per, local = n // tasks, int(env["SLURM_LOCALID"])
  return list(range(local * per, (local + 1) * per))


def initialize() -> str | None:
  """Calls `jax.distributed.initialize` for the detected set-up; returns its name (or None)."""
  env = os.environ
  kind = detect(env)
  if kind is None:
    return None
  if kind == "explicit":
    local = env.get("AVATAR_LOCAL_DEVICES")
    jax.distributed.initialize(
        coordinator_address=env["AVATAR_COORDINATOR"],
        num_processes=int(env["AVATAR_NUM_PROCESSES"]),
        process_id=int(env["AVATAR_PROCESS_ID"]),
        local_device_ids=[int(d) for d in local.split(",")] if local else None)
  elif kind == "slurm":
    jax.distributed.initialize(local_device_ids=slurm_local_devices(env))
  else:
    jax.distributed.initialize()
  logging.info("Process %d of %d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(), kind)
  return kind


def config_hash(config) -> str:
  """sha256 of a config's sorted JSON (hex)."""
  text = config.to_json_best_effort(sort_keys=True) if hasattr(config, "to_json_best_effort") \
      else json.dumps(config, sort_keys=True, default=repr)
  return hashlib.sha256(text.encode()).hexdigest()


def check_same_config(config) -> None:
  """Raises if the processes of this job resolved different configs.

  Different flags or code on one host would otherwise run a different program there, which
  hangs in the first collective or silently trains on mismatched shapes.
  """
  if jax.process_count() == 1:
    return
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  digest = bytes.fromhex(config_hash(config))
  mine = np.frombuffer(digest, np.uint8).astype(np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine))   # [processes, 32]
  differ = [p for p in range(every.shape[0]) if not np.array_equal(every[p], every[0])]
  if differ:
    raise ValueError(
        f"processes {differ} resolved a different config than process 0 (this is process "
        f"{jax.process_index()}, config sha256 {digest.hex()[:12]}). Start every process with the "
        "same --config, overrides and code (a launcher copies one checkout to every host).")


class Preemption:
  """Tells the training loop when to stop early, at a step every process agrees on.

  The trigger is SIGTERM: a scheduler's notice before it evicts a job (SLURM, GKE, Cloud TPU),
  and `timeout`'s default signal. The loop then checkpoints that step and returns, so a rerun
  of the same command resumes exactly there. Without this, a kill loses every step since the
  last periodic checkpoint.
  - One process: a SIGTERM handler sets a flag, read at the next step boundary.
  - Several processes (`jax.distributed`): JAX's coordination service listens for SIGTERM on
    every host and picks a step that all of them reach
    (`multihost_utils.reached_preemption_sync_point`), so all processes save the same step.
  Use as a context manager; the previous SIGTERM handler is restored on exit.
  """

  def __init__(self):
    self._multi = jax.process_count() > 1
    self._noticed = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    # Python handlers can only be set from the main thread (tests and notebooks may train from
    # another; they simply get no early stop).
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._noticed = True

  def reached(self, step: int) -> bool:
    """True at the step where every process should checkpoint and stop. Multi-process runs
    must call this at every step (the sync point compares step ids across hosts)."""
    if not self._multi:
      return self._noticed
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    try:
      return multihost_utils.reached_preemption_sync_point(step)
    except RuntimeError:   # initialised without the preemption service
      return False
