#!/usr/bin/env bash
# The GPU machine's I/O-side benchmarks (one call): end-to-end denoising vs the I/O floor,
# streaming training vs a naive loop, patch-store throughput, and sharded denoising by two
# processes on one GPU (outputs must equal a one-process run). Results go to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
exec > >(tee "$out/gpu_io_suite.log") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }
step bench_denoise
timeout 180 python3 benchmarks/bench_denoise.py --count 20 --size 4096 --workdir /tmp/bench_denoise \
  --variants torch:fp32,torch:fp16,fused:fp16 --out "$out/bench_denoise.json"
step "sharded denoise, 2 processes on one GPU"
ins=/tmp/bench_denoise/inputs
if [ -d "$ins" ]; then
  ls "$ins"/*.mrc | head -8 > /tmp/eight.txt
  t0=$(date +%s%N)
  python3 -m cryodeploy denoise $(cat /tmp/eight.txt) -o /tmp/one --device cuda -q --model /tmp/bench_denoise/cnn3-random.safetensors
  t1=$(date +%s%N)
  echo "one process wall: $(( (t1 - t0) / 1000000 )) ms"
  t0=$(date +%s%N)
  pids=()
  for i in 0 1; do
    python3 -m cryodeploy denoise $(cat /tmp/eight.txt) -o /tmp/two --device cuda -q \
      --model /tmp/bench_denoise/cnn3-random.safetensors --shard $i/2 & pids+=($!)
  done
  wait "${pids[@]}"  # a bare wait would also wait for the tee above
  t1=$(date +%s%N)
  echo "two shards wall: $(( (t1 - t0) / 1000000 )) ms; files: $(ls /tmp/two/*.mrc | wc -l)"
  for f in /tmp/one/*.mrc; do cmp -s "$f" "/tmp/two/$(basename "$f")" && echo "same $(basename "$f")" || echo "DIFF $(basename "$f")"; done
  rm -rf /tmp/bench_denoise /tmp/one /tmp/two
fi
step bench_train
timeout 120 python3 benchmarks/bench_train.py --device cuda --size 1024 --patches 64 --batches 30 --workdir /tmp/bench_train
step bench_store
timeout 100 python3 benchmarks/bench_store.py --count 8 --size 4096 --patch 1024 --batch 8 --workers 16 --threads 4 --inputs smooth --dir /tmp --device "H200 host (16 cores), local disk" --repeat 1 --repeat-preprocess 1
step done
