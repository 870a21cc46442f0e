#!/usr/bin/env bash
# The video VAE's two stages on one machine (Wan's recipe, docs/vae.md): a still-image stage, a
# video stage started from it, then the reconstruction table and sample mp4 on whole test clips,
# then the weights alone (python -m avatar_jax.convert weights) for the encode job.
#
# Usage: launch/local/vae_stages.sh RES ROOT [CONFIG_ARGS]
#   RES          64 | 128
#   ROOT         writes ROOT/img, ROOT/vid, ROOT/weights, ROOT/*.log
#   CONFIG_ARGS  added to both stages' configs/vae_synthdyad.py arguments, e.g. lip=3
# Environment (defaults in brackets):
#   IMG_STEPS [20000] IMG_BATCH [32] IMG_SECONDS [0: no limit]  the image stage
#   VID_STEPS [4000] VID_BATCH [4] VID_LR [2e-4] VID_WARMUP [300] VID_SECONDS [0]  the video stage
#   IMG_FROM []  an image stage already trained elsewhere (its workdir or exported weights):
#                the image stage is skipped and the video stage starts from it
#   WORKERS [8]  data processes per stage;  EVAL_CLIPS [8]  test clips scored (probe: 3x train)
# A stage given *_SECONDS gets SIGTERM then: it checkpoints its step and stops, and the next
# stage starts from that checkpoint. Rerunning resumes each stage where it stopped.
set -u -o pipefail
if [ $# -lt 2 ] || [ $# -gt 3 ]; then
  sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit 2
fi
res=$1 root=$2 extra=${3:-}
IMG_STEPS=${IMG_STEPS:-20000} IMG_BATCH=${IMG_BATCH:-32} IMG_SECONDS=${IMG_SECONDS:-0}
VID_STEPS=${VID_STEPS:-4000} VID_BATCH=${VID_BATCH:-4} VID_LR=${VID_LR:-2e-4}
VID_WARMUP=${VID_WARMUP:-300} VID_SECONDS=${VID_SECONDS:-0}
WORKERS=${WORKERS:-8} EVAL_CLIPS=${EVAL_CLIPS:-8}
common="size=S,res=$res,posterior=mean,kl=0,workers=$WORKERS,eval_clips=$EVAL_CLIPS${extra:+,$extra}"
quiet=(--config.evals.sample.at_end=False --config.evals.recon.at_end=False
       --config.data.synthdyad.cache=True --config.train.progress_bar=False)
limit() { if [ "$1" -gt 0 ]; then echo "timeout -s TERM $1"; fi; }
mkdir -p "$root"
img=${IMG_FROM:-$root/img}
if [ -z "${IMG_FROM:-}" ]; then
  echo "[$(date -u +%T)] image stage"
  $(limit "$IMG_SECONDS") python -m avatar_jax.train \
    --config "configs/vae_synthdyad.py:$common,frames=1,batch=$IMG_BATCH,steps=$IMG_STEPS" \
    --workdir "$root/img" "${quiet[@]}" > "$root/img.log" 2>&1
  rc=$?; echo "[$(date -u +%T)] image stage exit $rc"
fi
echo "[$(date -u +%T)] video stage from $img"
$(limit "$VID_SECONDS") python -m avatar_jax.train \
  --config "configs/vae_synthdyad.py:$common,frames=49,batch=$VID_BATCH,steps=$VID_STEPS,lr=$VID_LR,init=$img" \
  --config.optim.warmup_steps="$VID_WARMUP" --workdir "$root/vid" "${quiet[@]}" > "$root/vid.log" 2>&1
rc=$?; echo "[$(date -u +%T)] video stage exit $rc (124: stopped by its time limit, checkpointed)"
# Two calls: the table does not depend on the mp4 writer (PyAV) being installed.
python -m avatar_jax.evaluate --workdir "$root/vid" --evals recon --num_clips "$EVAL_CLIPS" \
  --probe_clips $((3 * EVAL_CLIPS)) > "$root/eval.log" 2>&1
rc=$?; echo "[$(date -u +%T)] reconstruction table exit $rc"
python -m avatar_jax.evaluate --workdir "$root/vid" --evals sample > "$root/sample.log" 2>&1
rc=$?; echo "[$(date -u +%T)] sample video exit $rc"
rm -rf "$root/weights"
python -m avatar_jax.convert weights --src "$root/vid" --out "$root/weights" > /dev/null 2>> "$root/eval.log"
rc=$?; echo "[$(date -u +%T)] done: $root/weights (exit $rc)"
