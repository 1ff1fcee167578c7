#!/usr/bin/env bash
# Train a unet3d on one GPU (supervised: even half in, exact clean volume as target) on synthetic
# tomograms simulated on the GPU. Same recipe as train_unet3d_cpu.sh, larger: tomograms of
# DEPTHxSIZExSIZE, 64^3 patches, base 16 depth 3, bf16. Seeds fixed (training tomograms: seeds
# 2000 + k, never the benchmark's 20261201). Training stops at SECONDS (best checkpoint by validation).
# Usage (from the repository root): bash models/train_unet3d_gpu.sh WORKDIR
# Then: python3 benchmarks/bench_quality3d.py --device cuda --model WORKDIR/run/best.safetensors ...
# Outcome on an H200 (2026-12-01, COUNT=6 SECONDS_BUDGET=290): a model that outputs close to the mean (its
# doses, 10-160 counts per voxel per half, show no structure); not kept (docs/benchmarks.md). Train at
# doses where the structure is visible before trusting it.
set -euo pipefail
work=${1:?usage: train_unet3d_gpu.sh WORKDIR}
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
cdp() { python3 -m cryodeploy "$@"; }
COUNT=${COUNT:-4}             # tomograms per (voxel size, dose)
SIZE=${SIZE:-256}
DEPTH=${DEPTH:-128}
SECONDS_BUDGET=${SECONDS_BUDGET:-300}
DEVICE=${DEVICE:-cuda}        # DEVICE=cpu SIZE=64 DEPTH=32 PATCH=32 COUNT=1: a CPU smoke run
PATCH=${PATCH:-64}
PRECISION=${PRECISION:-bf16}
mkdir -p "$work/pairs/even" "$work/pairs/clean"
seed=2000
for vs in 10 20; do
  for dose in 10 40 160; do
    d="$work/synth/v${vs}_d${dose}"
    cdp synth --volume "$d" -n "$COUNT" --size "$SIZE" "$SIZE" --depth "$DEPTH" --dose "$dose" --voxel-size "$vs" \
      --seed "$seed" --device "$DEVICE" -q --overwrite &
    seed=$((seed + 1))
  done
done
wait
for vs in 10 20; do
  for dose in 10 40 160; do
    d="$work/synth/v${vs}_d${dose}"
    for f in "$d"/even/*.mrc; do
      n=$(basename "$f" .mrc)
      ln -sf "$(realpath "$f")" "$work/pairs/even/v${vs}_d${dose}_$n.mrc"
      ln -sf "$(realpath "$d/clean/$n.mrc")" "$work/pairs/clean/v${vs}_d${dose}_$n.mrc"
    done
  done
done
cdp preprocess --volumes --pairs "$work/pairs/even" "$work/pairs/clean" -o "$work/store" --patch "$PATCH" \
  --stride $((PATCH * 3 / 4)) --test-fraction 0.1 --seed 0 --workers 8 -q --overwrite
timeout "$SECONDS_BUDGET" python3 -m cryodeploy train "$work/store" -o "$work/run" --model unet3d \
  --param base_channels=16 --param depth=3 --method supervised --epochs 1000 --max-batches 100 --batch 16 \
  --lr 5e-4 --seed 0 --device "$DEVICE" --precision "$PRECISION" --loader-threads 4 --log-every 100 -q || test $? -eq 124
