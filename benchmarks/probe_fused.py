"""Probe the fused CNN3 Triton kernel on a GPU: correctness vs float64 and speed vs eager PyTorch.

Run on the GPU machine: ``python3 benchmarks/probe_fused.py [--size 4096]``. Prints one line per variant.
"""

from __future__ import annotations

import argparse
import functools

import torch

from cryodeploy.backends.fused.kernel import fused_cnn3_forward, pack_weights
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.verify.bench import median_ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    m = build_model(ModelSpec("cnn3")).eval()
    x = torch.randn(1, 1, args.size, args.size, device=dev)
    with torch.no_grad():
        ref = m.double().to(dev)(x.double()).float()
        m = m.float()
    torch.backends.cudnn.allow_tf32 = False
    md = m.to(dev)
    with torch.inference_mode():
        t32 = median_ms(lambda: md(x), 20, cuda=True)
        mcl = md.to(memory_format=torch.channels_last)
        xcl = x.contiguous(memory_format=torch.channels_last)

        def f16() -> torch.Tensor:
            with torch.autocast("cuda", dtype=torch.float16):
                return mcl(xcl)

        t16 = median_ms(f16, 20, cuda=True)
    print(f"eager fp32: {t32:.3f} ms; eager fp16 channels_last: {t16:.3f} ms")
    for dtype in (torch.float16, torch.bfloat16):
        w = pack_weights(m.cpu(), dtype, dev)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        configs = [(28, c, sms * p, nw) for c in (1, 2) for p in (8, 16, 32) for nw in (2, 4, 8)]
        if dtype == torch.bfloat16:
            configs = configs[:1]
        for rows, chunk, progs, nw in configs:
            y = fused_cnn3_forward(x, w, rows, chunk, progs, nw)
            err = float((y - ref).abs().max() / ref.abs().max())
            fn = functools.partial(fused_cnn3_forward, x, w, rows, chunk, progs, nw)
            t = median_ms(fn, 20, cuda=True)
            print(
                f"fused {dtype} rows={rows} chunk={chunk} programs={progs} warps={nw}: {t:.3f} ms, "
                f"rel err vs fp64 {err:.2e}, speedup vs eager fp32 {t32 / t:.2f}x"
            )


if __name__ == "__main__":
    main()
