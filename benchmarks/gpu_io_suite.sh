#!/usr/bin/env bash
# The GPU machine's I/O-side benchmarks, one call: end-to-end denoising vs the I/O floor
# (denoise), sharded denoising by two processes on one GPU whose outputs must equal a
# one-process run (shards), streaming training vs a naive loop with a warm and a cold page
# cache (train, train_cold), patch-store throughput (store); on request, preprocessing with the
# numpy vs the CUDA noise sampler against the I/O floor (preprocess). Results go to $OUT.
# Usage: bash benchmarks/gpu_io_suite.sh [STEP ...]   (default: every step, in that order)
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
exec > >(tee -a "$out/gpu_io_suite.log") 2>&1
work=/tmp/gpu_io_suite

denoise() {
  timeout 180 python3 benchmarks/bench_denoise.py --count 20 --size 4096 --workdir "$work/denoise" \
    --variants torch:fp32,torch:fp16,fused:fp16 --out "$out/bench_denoise.json"
}

shards() {
  local ins=$work/shards/synth/noisy model=$work/shards/cnn3.safetensors
  python3 -m cryodeploy synth "$work/shards/synth" --count 8 --size 4096 4096 -q || return
  python3 - "$model" <<'PY' || return
import sys
import torch
from cryodeploy.models.checkpoint import save_checkpoint
from cryodeploy.models import ModelSpec, build_model
torch.manual_seed(0)
spec = ModelSpec("cnn3")
save_checkpoint(sys.argv[1], build_model(spec), spec)
PY
  local t0 t1 pids=()
  t0=$(date +%s%N)
  python3 -m cryodeploy denoise "$ins"/*.mrc -o "$work/shards/one" --device cuda -q --model "$model"
  t1=$(date +%s%N); echo "one process wall: $(( (t1 - t0) / 1000000 )) ms"
  t0=$(date +%s%N)
  for i in 0 1; do
    python3 -m cryodeploy denoise "$ins"/*.mrc -o "$work/shards/two" --device cuda -q --model "$model" --shard $i/2 &
    pids+=($!)
  done
  wait "${pids[@]}"  # a bare wait would also wait for the tee above
  t1=$(date +%s%N); echo "two shards wall: $(( (t1 - t0) / 1000000 )) ms; files: $(ls "$work/shards/two"/*.mrc | wc -l)"
  for f in "$work/shards/one"/*.mrc; do
    cmp -s "$f" "$work/shards/two/$(basename "$f")" && echo "same $(basename "$f")" || echo "DIFF $(basename "$f")"
  done
}

train() {
  timeout 200 python3 benchmarks/bench_train.py --device cuda --size 1024 --patches 128 --batches 40 \
    --workdir "$work/train" --precisions fp32,bf16,fp16 --threads 8
}

train_cold() {
  timeout 200 python3 benchmarks/bench_train.py --device cuda --size 1024 --patches 128 --batches 40 \
    --workdir "$work/train" --cold --precisions fp16 --threads 8
}

store() {
  timeout 150 python3 benchmarks/bench_store.py --count 16 --size 4096 --patch 1024 --batch 8 --workers 16 \
    --threads 4 --inputs smooth --dir "$work" --repeat 2 --repeat-preprocess 1
}

preprocess() {  # not a default step: bash benchmarks/gpu_io_suite.sh preprocess
  timeout 300 python3 benchmarks/bench_preprocess.py --count 32 --size 4096 --patch 1024 --workers 16 \
    --repeat 2 --dir "$work" --out "$out"
}

steps=("$@"); [ ${#steps[@]} -gt 0 ] || steps=(denoise shards train train_cold store)
for s in "${steps[@]}"; do
  echo; echo "=== $s ($(date +%T))"
  "$s"; echo "=== $s exit $?"
done
rm -rf "$work"
