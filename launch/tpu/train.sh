#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): optionally create it, copy this checkout to
# every worker, install it with the TPU extra, and start the same training command on all workers
# at once. JAX detects the pod and avatar_jax.distributed calls jax.distributed.initialize on each.
#
# Usage:
#   launch/tpu/train.sh [--dry-run] [--create=TYPE] TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#   launch/tpu/train.sh [--dry-run] --delete TPU_NAME ZONE
#
#   --dry-run      print every command (gcloud, git) instead of running it
#   --create=TYPE  first create the TPU VM, TYPE an accelerator type such as v5litepod-16, v5p-128,
#                  v6e-256 (runtime image: RUNTIME, default picked from the generation)
#   --delete       tear the TPU VM down (nothing else)
#   TPU_NAME  the TPU VM (existing unless --create)
#   ZONE      its zone, e.g. us-west4-a
#   CONFIG    config file (and arguments) relative to the repository root,
#             e.g. configs/quickstart.py:steps=20000,width=256
#   WORKDIR   checkpoints, logs and samples. On a multi-host slice every worker writes its shards
#             of each checkpoint there, so it must be the same shared directory on all workers
#             (a Filestore NFS or gcsfuse mount, e.g. /mnt/runs/exp1). Rerunning resumes from it.
#   extra arguments are passed to `python -m avatar_jax.train` (config overrides).
#
# Environment:
#   PROJECT    gcloud project (default: gcloud's configured project)
#   RUNTIME    TPU VM software version for --create (default: by generation, e.g.
#              v2-alpha-tpuv5-lite for v5litepod, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e)
#   SPOT=1     create a Spot VM (cheaper, may be preempted; rerunning resumes)
#   REMOTE_DIR where the code goes on each worker, absolute or relative to the home directory
#              (default: avatar_jax)
#   SETUP=0    skip copying and installing (code already on the workers)
#   LOG        log file on each worker (default: REMOTE_DIR/train.log); the command runs under
#              nohup, so closing this terminal does not stop training
#
# Example:
#   launch/tpu/train.sh --create=v5litepod-16 my-v5e us-west4-a configs/quickstart.py /mnt/runs/qs \
#     --config.train.num_steps=20000 --config.mesh.fsdp=4
#   launch/tpu/train.sh --delete my-v5e us-west4-a
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
}

DRY_RUN=0 CREATE="" DELETE=0
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --create=*) CREATE=${1#--create=} ;;
    --delete) DELETE=1 ;;
    *) echo "unknown option $1" >&2; usage ;;
  esac
  shift
done

# Runs a command, or with --dry-run prints it as one shell-quoted line.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    local line
    printf -v line '%q ' "$@"
    echo "${line% }"
  else
    "$@"
  fi
}

if [[ "${DELETE}" == 1 && $# -ne 2 ]] || [[ "${DELETE}" == 0 && $# -lt 4 ]]; then
  usage
fi
TPU_NAME=$1 ZONE=$2
GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  TARGET+=(--project="${PROJECT}")
fi

if [[ "${DELETE}" == 1 ]]; then
  run "${GCLOUD[@]}" delete "${TPU_NAME}" "${TARGET[@]}" --quiet
  exit 0
fi
CONFIG=$3 WORKDIR=$4
shift 4

REMOTE_DIR=${REMOTE_DIR:-avatar_jax}
if [[ "${REMOTE_DIR}" != /* ]]; then
  REMOTE_DIR="./${REMOTE_DIR}"   # remote commands start in the home directory
fi
LOG=${LOG:-"${REMOTE_DIR}/train.log"}
REPO_ROOT=$(cd "$(dirname "$0")/../.." && pwd)

on_all_workers() {
  run "${GCLOUD[@]}" ssh "${TPU_NAME}" "${TARGET[@]}" --worker=all --command="$1"
}

if [[ -n "${CREATE}" ]]; then
  case "${CREATE}" in
    v5litepod-*|v5e-*) runtime=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime=v2-alpha-tpuv5 ;;
    v6e-*) runtime=v2-alpha-tpuv6e ;;
    *) runtime=tpu-ubuntu2204-base ;;
  esac
  create=("${GCLOUD[@]}" create "${TPU_NAME}" "${TARGET[@]}" --accelerator-type="${CREATE}"
          --version="${RUNTIME:-${runtime}}")
  if [[ "${SPOT:-0}" == 1 ]]; then
    create+=(--spot)
  fi
  run "${create[@]}"
fi

if [[ "${SETUP:-1}" != 0 ]]; then
  # The committed tree (git archive), so every worker runs exactly the same code.
  archive="${TMPDIR:-/tmp}/avatar_jax-$$.tar.gz"
  if [[ "${DRY_RUN}" == 0 ]]; then
    trap 'rm -f "${archive}"' EXIT
  fi
  run git -C "${REPO_ROOT}" archive --format=tar.gz -o "${archive}" HEAD
  run "${GCLOUD[@]}" scp "${archive}" "${TPU_NAME}:avatar_jax.tar.gz" "${TARGET[@]}" --worker=all
  on_all_workers "set -e; rm -rf '${REMOTE_DIR}'; mkdir -p '${REMOTE_DIR}'; \
tar -xzf avatar_jax.tar.gz -C '${REMOTE_DIR}'; \
python3 -m pip install -q -U pip; python3 -m pip install -q -e '${REMOTE_DIR}[tpu]'"
fi

# Quote the training arguments once for the remote shell.
args=$(printf ' %q' "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
# The redirect is evaluated in the home directory, where relative REMOTE_DIR and LOG start.
on_all_workers "(cd '${REMOTE_DIR}' && exec nohup python3 -m avatar_jax.train${args}) > '${LOG}' 2>&1 &"
if [[ "${DRY_RUN}" == 0 ]]; then
  echo "Started on all workers of ${TPU_NAME}; follow worker 0 with:"
  echo "  ${GCLOUD[*]} ssh ${TPU_NAME} ${TARGET[*]} --worker=0 --command='tail -f ${LOG}'"
  echo "Tear the VM down when done: $0 --delete ${TPU_NAME} ${ZONE}"
fi
