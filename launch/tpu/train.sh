#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (single host or pod): copy this checkout to every worker, install
# it with the TPU extra, and start the same training command on all workers at once. JAX detects
# the pod and avatar_jax.distributed calls jax.distributed.initialize on each worker.
#
# Usage:
#   launch/tpu/train.sh TPU_NAME ZONE CONFIG WORKDIR [--config.key=value ...]
#
#   TPU_NAME  an existing TPU VM, e.g. created with
#               gcloud compute tpus tpu-vm create my-v5e --zone=us-west4-a \
#                 --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite
#   ZONE      its zone
#   CONFIG    config file (and arguments) relative to the repository root,
#             e.g. configs/quickstart.py:steps=20000,width=256
#   WORKDIR   checkpoints, logs and samples. On a multi-host slice every worker writes its shards
#             of each checkpoint there, so it must be the same shared directory on all workers
#             (a Filestore NFS or gcsfuse mount, e.g. /mnt/runs/exp1). Rerunning resumes from it.
#   extra arguments are passed to `python -m avatar_jax.train` (config overrides).
#
# Environment:
#   PROJECT    gcloud project (default: gcloud's configured project)
#   REMOTE_DIR where the code goes on each worker, absolute or relative to the home directory
#              (default: avatar_jax)
#   SETUP=0    skip copying and installing (code already on the workers)
#   LOG        log file on each worker (default: REMOTE_DIR/train.log); the command runs under
#              nohup, so closing this terminal does not stop training
#
# Example:
#   launch/tpu/train.sh my-v5e us-west4-a configs/quickstart.py /mnt/runs/qs \
#     --config.train.num_steps=20000 --config.mesh.fsdp=4
set -euo pipefail

if [[ $# -lt 4 ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
TPU_NAME=$1 ZONE=$2 CONFIG=$3 WORKDIR=$4
shift 4

REMOTE_DIR=${REMOTE_DIR:-avatar_jax}
if [[ "${REMOTE_DIR}" != /* ]]; then
  REMOTE_DIR="./${REMOTE_DIR}"   # remote commands start in the home directory
fi
LOG=${LOG:-"${REMOTE_DIR}/train.log"}
GCLOUD=(gcloud compute tpus tpu-vm)
TARGET=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then
  TARGET+=(--project="${PROJECT}")
fi
REPO_ROOT=$(git -C "$(dirname "$0")/../.." rev-parse --show-toplevel)

on_all_workers() {
  "${GCLOUD[@]}" ssh "${TPU_NAME}" "${TARGET[@]}" --worker=all --command="$1"
}

if [[ "${SETUP:-1}" != 0 ]]; then
  # The committed tree (git archive), so every worker runs exactly the same code.
  archive=$(mktemp --suffix=.tar.gz)
  trap 'rm -f "${archive}"' EXIT
  git -C "${REPO_ROOT}" archive --format=tar.gz -o "${archive}" HEAD
  "${GCLOUD[@]}" scp "${archive}" "${TPU_NAME}:avatar_jax.tar.gz" "${TARGET[@]}" --worker=all
  on_all_workers "set -e; rm -rf '${REMOTE_DIR}'; mkdir -p '${REMOTE_DIR}'; \
    tar -xzf avatar_jax.tar.gz -C '${REMOTE_DIR}'; \
    python3 -m pip install -q -U pip; python3 -m pip install -q -e '${REMOTE_DIR}[tpu]'"
fi

# Quote the training arguments once for the remote shell.
args=$(printf ' %q' "--config=${CONFIG}" "--workdir=${WORKDIR}" "$@")
# The redirect is evaluated in the home directory, where relative REMOTE_DIR and LOG start.
on_all_workers "(cd '${REMOTE_DIR}' && exec nohup python3 -m avatar_jax.train${args}) > '${LOG}' 2>&1 &"
echo "Started on all workers of ${TPU_NAME}; follow worker 0 with:"
echo "  ${GCLOUD[*]} ssh ${TPU_NAME} ${TARGET[*]} --worker=0 --command='tail -f ${LOG}'"
