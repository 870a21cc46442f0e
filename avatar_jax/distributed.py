"""Multi-process start-up: `jax.distributed.initialize` where a cluster is detected.

TPU pods and SLURM are auto-detected by JAX; an explicit coordinator can be given through
AVATAR_COORDINATOR=host:port, AVATAR_NUM_PROCESSES and AVATAR_PROCESS_ID. Single-host runs
(the default) do nothing.
"""
from __future__ import annotations

import os

import jax
from absl import logging


def _cluster_detected() -> bool:
  env = os.environ
  if "AVATAR_COORDINATOR" in env:
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  # Multi-host TPU VMs expose the worker list; a single host has one entry.
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  return len([h for h in hosts.split(",") if h]) > 1


def initialize() -> None:
  if not _cluster_detected():
    return
  env = os.environ
  if "AVATAR_COORDINATOR" in env:
    jax.distributed.initialize(coordinator_address=env["AVATAR_COORDINATOR"],
                               num_processes=int(env["AVATAR_NUM_PROCESSES"]),
                               process_id=int(env["AVATAR_PROCESS_ID"]))
  else:
    jax.distributed.initialize()
  logging.info("Process %d of %d, %d local / %d global devices.", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
