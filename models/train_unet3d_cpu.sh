#!/usr/bin/env bash
# Train the small CPU unet3d shipped in models/unet3d_cpu/ (supervised: even half in, exact clean volume as
# target) on synthetic tomograms, on the CPU. Seeds are fixed (training tomograms: seeds 1000 + k, never the
# benchmark's 20261201), so a rerun gives the same store; the weights may differ in the last bits across
# CPUs/thread counts.
# Usage (from the repository root): bash models/train_unet3d_cpu.sh WORKDIR
# On 2 shared CPU cores it took 1 min for the data and 7 min 16 s for training (2026-12-01).
# Then: cp WORKDIR/run/best.safetensors WORKDIR/run/best.json models/unet3d_cpu/
set -euo pipefail
work=${1:?usage: train_unet3d_cpu.sh WORKDIR}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cdp() { python3 -m cryodeploy "$@"; }
COUNT=${COUNT:-3}             # tomograms per (voxel size, dose)
EPOCHS=${EPOCHS:-12}
MAX_BATCHES=${MAX_BATCHES:-100}
DOSES=${DOSES:-10 40 160}     # counts per ice voxel per half
SEED0=${SEED0:-1000}
mkdir -p "$work/pairs/even" "$work/pairs/clean"
seed=$SEED0
for vs in 10 20; do
  for dose in $DOSES; do
    d="$work/synth/v${vs}_d${dose}"
    cdp synth --volume "$d" -n "$COUNT" --size 128 128 --depth 64 --dose "$dose" --voxel-size "$vs" \
      --seed "$seed" -q --overwrite
    for f in "$d"/even/*.mrc; do
      n=$(basename "$f" .mrc)
      ln -sf "$(realpath "$f")" "$work/pairs/even/v${vs}_d${dose}_$n.mrc"
      ln -sf "$(realpath "$d/clean/$n.mrc")" "$work/pairs/clean/v${vs}_d${dose}_$n.mrc"
    done
    seed=$((seed + 1))
  done
done
cdp preprocess --volumes --pairs "$work/pairs/even" "$work/pairs/clean" -o "$work/store" --patch 32 \
  --stride 24 --test-fraction 0.1 --seed 0 --workers 2 -q --overwrite
cdp train "$work/store" -o "$work/run" --model unet3d --param base_channels=8 --param depth=2 \
  --method supervised --epochs "$EPOCHS" --max-batches "$MAX_BATCHES" --batch 8 --lr 5e-4 --seed 0 \
  --device cpu --loader-threads 1 --log-every 50 -q
