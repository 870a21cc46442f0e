#!/usr/bin/env bash
# Times the README quickstart on 2 CPU cores and repeats it over seeds and attention variants on
# the accelerator (the SynthDyad attention ablation), collecting every run's tables.
#
#   bash benchmarks/quickstart.sh OUTDIR [SEEDS] [VARIANTS]
#   e.g. bash benchmarks/quickstart.sh /tmp/qs "0 1 2" "gaussian gaussian_fixed global frame"
#
# 1. `python -m avatar_jax.train --config configs/quickstart.py` pinned to cores 0,1 (taskset) on
#    the CPU backend: wall time in OUTDIR/cpu_time.txt, its tables in OUTDIR/work_cpu/eval/.
# 2. For every (variant, seed): `configs/quickstart.py:seed=S,<variant args>` on the default
#    backend (GPU/TPU), all in parallel on the remaining cores, workdirs OUTDIR/work_<variant>_<S>.
#    Variants: gaussian (learned σ, the default), gaussian_fixed (σ frozen at its initial
#    geometric spread), global (no time bias), frame (strict ±1-frame window).
set -euo pipefail
out=${1:?usage: quickstart.sh OUTDIR [SEEDS] [VARIANTS]}
seeds=${2:-}
variants=${3:-gaussian}
mkdir -p "$out"
ncpu=$(nproc)

(
  start=$(date +%s)
  JAX_PLATFORMS=cpu taskset -c 0,1 python -m avatar_jax.train --config configs/quickstart.py \
      --config.train.progress_bar=False --workdir "$out/work_cpu" > "$out/cpu.log" 2>&1
  echo "wall_s=$(( $(date +%s) - start )) cores=0,1 of nproc=$ncpu" > "$out/cpu_time.txt"
) &
cpu_pid=$!

args_of() {
  case "$1" in
    gaussian) echo "attn=gaussian" ;;
    gaussian_fixed) echo "attn=gaussian,learn_sigma=false" ;;
    global) echo "attn=global" ;;
    frame) echo "attn=frame" ;;
    *) echo "unknown variant $1" >&2; exit 2 ;;
  esac
}

pids=()
for v in $variants; do
  for s in $seeds; do
    XLA_PYTHON_CLIENT_PREALLOCATE=false taskset -c "2-$((ncpu - 1))" python -m avatar_jax.train \
        --config "configs/quickstart.py:seed=$s,$(args_of "$v")" --config.train.progress_bar=False \
        --workdir "$out/work_${v}_$s" > "$out/${v}_$s.log" 2>&1 &
    pids+=($!)
  done
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=1; done
wait "$cpu_pid" || status=1
cat "$out/cpu_time.txt"
exit $status
