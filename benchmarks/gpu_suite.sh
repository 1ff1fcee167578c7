#!/usr/bin/env bash
# The GPU machine's benchmark session (one call): versions, `cryodeploy bench` (every backend and
# precision side by side), ONNX Runtime CUDA variants, parity on CUDA, the CUDA-path checks of the
# torch backend, and an Nsight Compute profile of the fused kernel. Results go to $OUT.
# Needs onnxruntime-gpu on PYTHONPATH (docs/benchmarks.md says how it was carried) and mrcfile/starfile wheels in .whl/.
set -uo pipefail
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/out}; mkdir -p "$out"
log=$out/gpu_suite.log
exec > >(tee "$log") 2>&1
step() { echo; echo "=== $* ($(date +%T))"; }
step info; python3 -m cryodeploy info
step checkpoints
python3 - <<'PY'
import torch
from cryodeploy.models.checkpoint import save_checkpoint
from cryodeploy.models import ModelSpec, build_model
for arch, params in (("cnn3", {}), ("unet", {"base_channels": 16, "depth": 3})):
    torch.manual_seed(0)
    s = ModelSpec(arch, params=params)
    save_checkpoint(f"/tmp/{arch}.safetensors", build_model(s), s)
PY
step "cryodeploy bench 4096"; python3 -m cryodeploy bench --model /tmp/cnn3.safetensors --size 4096 --json "$out/bench.json" -q
step "torch CUDA path vs CPU"
python3 - <<'PY'
import numpy as np
from cryodeploy import Denoiser
x = np.random.default_rng(0).standard_normal((1000, 1200)).astype(np.float32) * 10 + 50
ref = Denoiser.load("/tmp/cnn3.safetensors", device="cpu", backend="torch")(x, tile=512, batch=3)
for backend, kw in (("torch", {}), ("torch", {"cuda_graphs": True}), ("fused", {}), ("ort", {})):
    for prec in ("fp32", "fp16"):
        try:
            with Denoiser.load("/tmp/cnn3.safetensors", device="cuda", backend=backend, precision=prec, **kw) as d:
                for t, b in ((512, 3), ("auto", "auto")):
                    err = np.abs(d(x, tile=t, batch=b) - ref).max() / np.abs(ref).max()
                    print(backend, kw, prec, t, b, f"rel err vs CPU fp32 {err:.2e}")
        except Exception as e:
            print(backend, kw, prec, "unavailable/failed:", str(e)[:200])
PY
step "parity cnn3"; python3 -m cryodeploy parity /tmp/cnn3.safetensors --synth 2 --size 1024 1024 --backends torch,ort,fused --precisions fp32,fp16,bf16 --device cuda --json "$out/parity_cnn3.json"
step "parity unet"; python3 -m cryodeploy parity /tmp/unet.safetensors --synth 2 --size 1024 1024 --backends torch,ort --precisions fp32,fp16 --device cuda --json "$out/parity_unet.json"
step "bench_ort"; timeout 240 python3 benchmarks/bench_ort.py --size 4096 --repeats 20 --out "$out/bench_ort.json"
step "ncu fused kernel"
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -n "$ncu" ]; then
  timeout 150 "$ncu" --clock-control none -k regex:_cnn3_kernel -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    python3 -c "
import torch
from cryodeploy.backends.fused.kernel import fused_cnn3_forward, pack_weights
from cryodeploy.models import ModelSpec, build_model
m = build_model(ModelSpec('cnn3')).eval()
x = torch.randn(1, 1, 4096, 4096, device='cuda')
fused_cnn3_forward(x, pack_weights(m, torch.float16, torch.device('cuda')))
torch.cuda.synchronize()" > "$out/ncu_fused.txt" 2>&1; tail -80 "$out/ncu_fused.txt"
fi
step done
