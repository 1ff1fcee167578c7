"""Where CNN3 training time goes on a GPU: the training step alone (in-memory batch) under each
speed setting, and the streaming loader alone (no model) over a store in the page cache.

    python benchmarks/probe_train_step.py --size 1024 --batch 8 --store STORE

Each step variant: samples/s over ``--steps`` Adam steps after warm-up, synchronized at the end
only (no per-step host sync). Loader: patch pairs/s through pinned buffers, for each ``--threads``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

from cryodeploy.models import ModelSpec, build_model
from cryodeploy.training.loader import LoaderConfig, StreamingLoader
from cryodeploy.training.store import PatchStore


def step_rate(size: int, batch: int, steps: int, dtype: torch.dtype | None, channels_last: bool,
              benchmark: bool, compile_model: bool, scaler: bool = False) -> float:
    """Samples/s of Adam steps on one in-memory batch."""
    torch.backends.cudnn.benchmark = benchmark
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net = build_model(ModelSpec("cnn3")).cuda().to(memory_format=fmt)  # type: ignore[call-overload]
    model = torch.compile(net) if compile_model else net
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, fused=True)
    x = torch.randn(batch, 1, size, size, device="cuda").to(memory_format=fmt)
    t = torch.randn(batch, 1, size, size, device="cuda").to(memory_format=fmt)

    grad_scaler = torch.amp.GradScaler("cuda", enabled=scaler)

    def one() -> None:
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = torch.nn.functional.mse_loss(model(x), t)
        opt.zero_grad(set_to_none=True)
        grad_scaler.scale(loss).backward()
        grad_scaler.step(opt)
        grad_scaler.update()

    for _ in range(5):
        one()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def h2d_gbps(batch: int, size: int, repeats: int = 20) -> float:
    """Host-to-device copy bandwidth (GB/s) of one batch's inputs and targets from pinned memory."""
    host = torch.empty(2, batch, 1, size, size, pin_memory=True)
    dev = torch.empty_like(host, device="cuda")
    dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        dev.copy_(host, non_blocking=True)
    torch.cuda.synchronize()
    return repeats * host.numel() * 4 / 1e9 / (time.perf_counter() - t0)


def loader_rate(store: Path, batch: int, threads: int, buffers: int) -> float:
    """Patch pairs/s of one epoch through pinned buffers (store already in the page cache)."""
    cfg = LoaderConfig(batch, seed=0, threads=threads, buffers=buffers)
    loader = StreamingLoader(PatchStore(store), "train", None, cfg, pin_memory=True)
    n, t0 = 0, time.perf_counter()
    for x, _ in loader:
        n += x.shape[0]
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--store", type=Path, default=None, help="a patch store for the loader rates")
    ap.add_argument("--threads", default="2,4,8,16")
    args = ap.parse_args()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CNN3 {args.size}² batch {args.batch}")
    variants: list[tuple[Any, ...]] = [
        ("fp32 NCHW", None, False, False, False),
        ("fp32 NCHW cudnn.benchmark", None, False, True, False),
        ("bf16 channels_last", torch.bfloat16, True, False, False),
        ("bf16 channels_last cudnn.benchmark", torch.bfloat16, True, True, False),
        ("bf16 NCHW cudnn.benchmark", torch.bfloat16, False, True, False),
        ("fp16 channels_last cudnn.benchmark", torch.float16, True, True, False),
        ("fp16 channels_last + GradScaler", torch.float16, True, False, False, True),
        ("bf16 channels_last cudnn.benchmark compile", torch.bfloat16, True, True, True),
    ]
    print(f"host-to-device copy from pinned memory: {h2d_gbps(args.batch, args.size):.1f} GB/s")
    for name, dtype, cl, bench, comp, *scaler in variants:
        try:
            rate = step_rate(args.size, args.batch, args.steps, dtype, cl, bench, comp, *scaler)
            print(f"step {name}: {rate:.1f} samples/s")
        except Exception as err:  # a variant that cannot run here is reported, not fatal
            print(f"step {name}: failed ({type(err).__name__}: {str(err).splitlines()[0]})")
    if args.store is not None:
        PatchStore(args.store)  # fail early on a bad store
        loader_rate(args.store, args.batch, 4, 3)  # warms the page cache
        for threads in (int(t) for t in args.threads.split(",")):
            for buffers in (3, 6):
                rate = loader_rate(args.store, args.batch, threads, buffers)
                print(f"loader threads {threads} buffers {buffers}: {rate:.0f} pairs/s")


if __name__ == "__main__":
    main()
