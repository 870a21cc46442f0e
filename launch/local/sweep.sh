#!/usr/bin/env bash
# Train a sweep (variants x seeds) of one config on one machine: every run its own workdir, the
# runs spread over the GPUs (one after another, or several at once on each GPU), all sharing one
# compilation cache.
#
# Usage (from anywhere, with avatar_jax installed: pip install -e '.[cuda]'):
#   launch/local/sweep.sh [--dry-run] CONFIG ROOT VARIANT [VARIANT ...] [-- --config.key=value ...]
#
#   --dry-run  print every run's command (with its environment) instead of running it
#   CONFIG   config file and the arguments every run shares, e.g. configs/bm_synthdyad.py:size=S
#   ROOT     run <variant>_seed<S> trains in ROOT/<variant>_seed<S>; rerunning the same command
#            resumes every run (a finished one only restores its checkpoint and exits)
#   VARIANT  the config arguments one variant adds, e.g. attn=frame or attn=global,lr=1e-4
#            ("-": none, the config as it is)
#   after --: config overrides passed to every run
#
# Environment:
#   SEEDS=0,1,2   seeds per variant, as --config.seed (default 0)
#   GPUS=0,1,2,3  GPUs to spread the runs over, one run per GPU at a time (default: every GPU
#                 nvidia-smi lists; none: the runs go one after another on the default backend)
#   PER_GPU=N     runs sharing each GPU (or the CPU) at once (default 1). Each may then use 0.9/N
#                 of the GPU's memory (XLA_PYTHON_CLIENT_MEM_FRACTION). Small models that leave a
#                 GPU idle between kernels train several at a time this way.
#   CACHE=DIR     compilation cache shared by the runs (default ROOT/jax_cache; CACHE= for none):
#                 runs after the first load the compiled programs of the same shapes
#
# Each run writes its output to ROOT/<run>/sweep.log. A line per run is printed as it ends, then
# the `avatar_jax.evaluate --table` command that averages the seeds of each variant; the exit
# status is 1 if a run failed. SIGTERM or SIGINT is passed on to the runs in flight, which
# checkpoint their current step and stop; no further run starts. Rerun the command to go on.
#
# Examples:
#   SEEDS=0,1,2 launch/local/sweep.sh configs/bm_synthdyad.py:size=S,res=64 runs/bm_ablation \
#       attn=frame attn=global attn=gaussian_fixed attn=gaussian_learned
#   GPUS=0 PER_GPU=4 launch/local/sweep.sh configs/quickstart.py:steps=3000 runs/qs_attn \
#       attn=frame attn=global attn=gaussian learn_sigma=false
set -euo pipefail

if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 501)); then
  echo "launch/local/sweep.sh needs bash >= 5.1 (wait -n -p); this is ${BASH_VERSION}" >&2
  exit 2
fi
DRY_RUN=0
if [[ "${1:-}" == --dry-run ]]; then
  DRY_RUN=1
  shift
fi
if [[ $# -lt 3 || "$3" == -- ]]; then
  sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 2
fi
CONFIG=$1 ROOT=$2
shift 2
variants=()
while [[ $# -gt 0 && "$1" != -- ]]; do
  variants+=("$1")
  shift
done
[[ "${1:-}" == -- ]] && shift
EXTRA=("$@")

show() {   # one shell-quoted line (commas left bare: printf %q escapes them needlessly)
  local line
  printf -v line '%q ' "$@"
  line=${line//\\,/,}
  echo "${line% }"
}

PER_GPU=${PER_GPU:-1}
if ! [[ "${PER_GPU}" =~ ^[1-9][0-9]*$ ]]; then
  echo "PER_GPU=${PER_GPU}: expected a positive integer" >&2
  exit 2
fi
IFS=, read -r -a seeds <<< "${SEEDS:-0}"
for s in "${seeds[@]}"; do
  if ! [[ "${s}" =~ ^[0-9]+$ ]]; then
    echo "SEEDS=${SEEDS}: expected comma-separated integers, found '${s}'" >&2
    exit 2
  fi
done
if [[ -n "${GPUS+x}" && -n "${GPUS}" ]]; then
  IFS=, read -r -a gpus <<< "${GPUS}"
elif [[ -z "${GPUS+x}" ]] && command -v nvidia-smi > /dev/null; then
  mapfile -t gpus < <(nvidia-smi --query-gpu=index --format=csv,noheader)
else
  gpus=()
fi
# A slot is one run at a time on one GPU ("" = the default backend, no GPU pinning).
slots=()
for g in "${gpus[@]:-}"; do
  for ((k = 0; k < PER_GPU; k++)); do slots+=("${g}"); done
done
CACHE=${CACHE-${ROOT}/jax_cache}

REPO_ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "${REPO_ROOT}"
sep=":"
[[ "${CONFIG}" == *:* ]] && sep=","

# The runs, in order: every seed of the first variant, then the next variant.
names=() configs=() workdirs=() labels=()
for v in "${variants[@]}"; do
  label=${v//=/-}
  label=${label//,/_}
  label=${label//\//-}
  [[ "${v}" == - ]] && label=base
  for s in "${seeds[@]}"; do
    names+=("${label}_seed${s}")
    labels+=("${label}")
    workdirs+=("${ROOT}/${label}_seed${s}")
    if [[ "${v}" == - ]]; then configs+=("${CONFIG}"); else configs+=("${CONFIG}${sep}${v}"); fi
  done
done

command_of() {   # command_of RUN SLOT: the run's command line, environment first
  local i=$1 gpu=${slots[$2]} cmd=(env)
  if [[ -n "${gpu}" ]]; then
    cmd+=("CUDA_VISIBLE_DEVICES=${gpu}")
    if ((PER_GPU > 1)); then
      cmd+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$(awk -v n="${PER_GPU}" 'BEGIN { printf "%.3f", 0.9 / n }')")
    fi
  fi
  cmd+=(python -m avatar_jax.train "--config=${configs[$i]}" "--workdir=${workdirs[$i]}"
        "--config.seed=${seeds[$((i % ${#seeds[@]}))]}")
  [[ -n "${CACHE}" ]] && cmd+=("--config.compile_cache=${CACHE}")
  cmd+=("${EXTRA[@]}")
  printf '%s\0' "${cmd[@]}"
}

summary() {
  local IFS=,
  echo "# then the seeds of each variant averaged (mean ± 95% CI; another --table for other sweeps):"
  show python -m avatar_jax.evaluate --table=synthdyad_ablation --saved "--workdir=${workdirs[*]}" \
    "--names=${labels[*]}"
}

if [[ "${DRY_RUN}" == 1 ]]; then
  for i in "${!names[@]}"; do
    mapfile -d '' -t cmd < <(command_of "${i}" $((i % ${#slots[@]})))
    if [[ "${cmd[1]}" == *=* ]]; then show "${cmd[@]}"; else show "${cmd[@]:1}"; fi
  done
  summary
  exit 0
fi

declare -A slot_of=() name_of=() start_of=()
free=("${!slots[@]}")
failed=0 stopping=0
# shellcheck disable=SC2329  # invoked by the trap below
stop_runs() {
  stopping=1
  ((${#slot_of[@]})) && kill -TERM "${!slot_of[@]}" 2> /dev/null || true
}
trap stop_runs TERM INT

reap() {   # waits for one run to end, prints its line and frees its slot
  local pid rc=0
  wait -n -p pid "${!slot_of[@]}" || rc=$?
  if [[ -z "${pid:-}" ]]; then   # interrupted by a signal before any run ended
    return 0
  fi
  if ((rc != 0)); then failed=1; fi
  printf '%-40s exit %3d  %5d s  %s\n' "${name_of[$pid]}" "${rc}" \
    $(($(date +%s) - start_of[$pid])) "${ROOT}/${name_of[$pid]}/sweep.log"
  free+=("${slot_of[$pid]}")
  unset "slot_of[$pid]" "name_of[$pid]" "start_of[$pid]"
}

for i in "${!names[@]}"; do
  while ((${#free[@]} == 0 && !stopping)); do reap; done
  ((stopping)) && break
  slot=${free[0]}
  free=("${free[@]:1}")
  mkdir -p "${workdirs[$i]}"
  mapfile -d '' -t cmd < <(command_of "${i}" "${slot}")
  "${cmd[@]}" > "${workdirs[$i]}/sweep.log" 2>&1 &
  slot_of[$!]=${slot} name_of[$!]=${names[$i]} start_of[$!]=$(date +%s)
done
while ((${#slot_of[@]})); do reap; done
if ((stopping)); then
  echo "stopped: rerun the same command to resume" >&2
  exit 143
fi
summary
exit "${failed}"
