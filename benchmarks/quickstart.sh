#!/usr/bin/env bash
# Times the README quickstart on 2 CPU cores and (optionally) repeats it over seeds on the
# accelerator, collecting the SynthDyad tables.
#
#   bash benchmarks/quickstart.sh OUTDIR [SEEDS]        # e.g. bash benchmarks/quickstart.sh /tmp/qs "0 1 2"
#
# 1. `python -m avatar_jax.train --config configs/quickstart.py` pinned to cores 0,1 (taskset) on the
#    CPU backend; wall time in OUTDIR/cpu_time.txt, table in OUTDIR/cpu_test.md.
# 2. If SEEDS is given: the same config with `:seed=S` on the default backend (GPU/TPU), one run
#    after another, tables in OUTDIR/seed_S_test.md. Runs concurrently with step 1 on other cores.
set -euo pipefail
out=${1:?usage: quickstart.sh OUTDIR [SEEDS]}
seeds=${2:-}
mkdir -p "$out"
ncpu=$(nproc)

(
  start=$(date +%s)
  JAX_PLATFORMS=cpu taskset -c 0,1 python -m avatar_jax.train --config configs/quickstart.py \
      --config.train.progress_bar=False --workdir "$out/work_cpu" > "$out/cpu.log" 2>&1
  echo "wall_s=$(( $(date +%s) - start )) cores=0,1 nproc=$ncpu" > "$out/cpu_time.txt"
  cp "$out/work_cpu/eval/test.md" "$out/cpu_test.md"
) &
cpu_pid=$!

for s in $seeds; do
  taskset -c "2-$((ncpu - 1))" python -m avatar_jax.train --config "configs/quickstart.py:seed=$s" \
      --config.train.progress_bar=False --workdir "$out/work_seed_$s" > "$out/seed_$s.log" 2>&1
  cp "$out/work_seed_$s/eval/test.md" "$out/seed_${s}_test.md"
  cp "$out/work_seed_$s/eval/test.json" "$out/seed_${s}_test.json"
done
wait "$cpu_pid"
cat "$out/cpu_time.txt" "$out"/*_test.md
