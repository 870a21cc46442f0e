#!/usr/bin/env bash
# Train on one machine with several GPUs (or CPU).
#
# Usage (from anywhere, with avatar_jax installed: pip install -e '.[cuda]'):
#   launch/local/train.sh [--dry-run] CONFIG WORKDIR [--config.key=value ...]
#
#   --dry-run  print the command of each process (with its environment) instead of running it
#   CONFIG   config file (and arguments), e.g. configs/quickstart.py:steps=3000,width=128
#   WORKDIR  checkpoints, logs and samples; rerunning the same command resumes from it
#   extra arguments are passed to `python -m avatar_jax.train` (config overrides).
#
# Environment:
#   GPUS=0,1,2,3  which GPUs to use (default: all visible ones)
#   PROCS=N       N processes on this host instead of one (process i gets every N-th device),
#                 connected through jax.distributed with a local coordinator. One process for
#                 all GPUs is the normal choice; PROCS exercises the multi-host code path on one
#                 machine. Without GPUs (JAX_PLATFORMS=cpu) each process gets the CPU.
#   PORT          coordinator port for PROCS > 1 (default 12355)
#
# Examples:
#   launch/local/train.sh configs/quickstart.py runs/qs
#   GPUS=0,1 launch/local/train.sh configs/quickstart.py runs/qs --config.mesh.fsdp=2
#   PROCS=2 launch/local/train.sh configs/quickstart.py:steps=50 runs/mp
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -lt 2 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG=$1 WORKDIR=$2
shift 2

# Prints a command as one shell-quoted line.
show() {
  local line
  printf -v line '%q ' "$@"
  echo "${line% }"
}

REPO_ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "${REPO_ROOT}"
if [[ -n "${GPUS:-}" ]]; then
  export CUDA_VISIBLE_DEVICES=${GPUS}
fi
TRAIN=(python -m avatar_jax.train --config="${CONFIG}" --workdir="${WORKDIR}" "$@")
PROCS=${PROCS:-1}

if [[ "${PROCS}" == 1 ]]; then
  if [[ "${DRY_RUN}" == 1 ]]; then
    if [[ -n "${GPUS:-}" ]]; then
      show env CUDA_VISIBLE_DEVICES="${GPUS}" "${TRAIN[@]}"
    else
      show "${TRAIN[@]}"
    fi
    exit 0
  fi
  exec "${TRAIN[@]}"
fi

# PROCS > 1: one process per slice of the visible devices, explicit coordinator.
if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a devices <<< "${CUDA_VISIBLE_DEVICES}"
elif command -v nvidia-smi > /dev/null; then
  mapfile -t devices < <(nvidia-smi --query-gpu=index --format=csv,noheader)
else
  devices=()
fi
if (( ${#devices[@]} > 0 && ${#devices[@]} % PROCS != 0 )); then
  echo "PROCS=${PROCS} does not divide the ${#devices[@]} GPUs (${devices[*]})" >&2
  exit 2
fi
coordinator="localhost:${PORT:-12355}"
pids=()
if [[ "${DRY_RUN}" == 0 ]]; then
  trap 'kill "${pids[@]}" 2> /dev/null || true' EXIT INT TERM
fi
for ((i = 0; i < PROCS; i++)); do
  if (( ${#devices[@]} > 0 )); then
    mine=()
    for ((d = i; d < ${#devices[@]}; d += PROCS)); do mine+=("${devices[d]}"); done
    visible=$(IFS=,; echo "${mine[*]}")
  else
    visible=""
  fi
  proc=(env CUDA_VISIBLE_DEVICES="${visible}" AVATAR_COORDINATOR="${coordinator}"
        AVATAR_NUM_PROCESSES="${PROCS}" AVATAR_PROCESS_ID="${i}" "${TRAIN[@]}")
  if [[ "${DRY_RUN}" == 1 ]]; then
    show "${proc[@]}"
    continue
  fi
  "${proc[@]}" > >(sed -u "s/^/[${i}] /") 2>&1 &
  pids+=($!)
done
if [[ "${DRY_RUN}" == 1 ]]; then
  exit 0
fi
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
trap - EXIT INT TERM
exit "${status}"
