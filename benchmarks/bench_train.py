"""CNN3 training throughput: streamed from a patch store on local disk vs a naive in-memory loop.

Run on the GPU machine (from the repository root; the store goes on local disk under --workdir):
    python benchmarks/bench_train.py --device cuda --size 1024 --patches 128 --batches 60
Quick check on a CPU:
    python benchmarks/bench_train.py --device cpu --size 128 --batches 5

What is measured, all in one run, global batch ``--batch`` (8), Adam lr 1e-3, MSE:
- baseline: the naive loop most people write: the whole batch already in device memory,
  fp32 eager, NCHW, ``loss.item()`` every step; samples/s over ``--batches`` steps after warm-up.
- ``cryodeploy.training.train.train`` streaming the store through the double-buffered loader, for each
  of ``--precisions`` (fp32; bf16 = bf16 autocast + channels_last on CUDA); samples/s is the
  median of the log windows after the first (warm-up), excluding validation and checkpoints.
  ``--cold`` evicts the store's pages from the OS cache before every epoch (posix_fadvise
  DONTNEED; no root needed), so every epoch reads the disk rather than the page cache.
Prints one markdown row per measurement in docs/benchmarks.md's format, plus GPU memory
(torch.cuda.max_memory_allocated per configuration), the loader's buffer memory and host RSS.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cryodeploy.imaging.noise import NoiseSpec, add_noise
from cryodeploy.imaging.normalize import NormSpec, norm_stats, normalize
from cryodeploy.imaging.synth import SynthConfig, render_clean
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.training.config import TrainConfig
from cryodeploy.training.runfiles import read_metrics
from cryodeploy.training.store import StoreWriter, data_file_name
from cryodeploy.training.train import train
from cryodeploy.verify.bench import device_label


def make_store(path: Path, patches: int, size: int, seed: int = 0) -> Path:
    """``patches`` synthetic micrograph patches (8 clean images, fresh noise per patch), normalized."""
    rng = np.random.default_rng(seed)
    cleans = [render_clean(rng, (size, size), SynthConfig(count=1)) for _ in range(min(8, patches))]
    with StoreWriter(path, size, overwrite=True) as writer:
        for i in range(patches):
            clean = cleans[i % len(cleans)]
            noisy = add_noise(clean, NoiseSpec(), rng)
            stats = norm_stats(noisy)
            writer.append("train", normalize(noisy, stats)[None], normalize(clean, stats)[None])
        writer.finish(normalization=NormSpec().to_dict(), noise=NoiseSpec().to_dict(), targets="noise")
    return path


def evict(store: Path) -> None:
    """Drop the store's data files from the OS page cache (clean pages; no root needed)."""
    for which in ("input", "target"):
        fd = os.open(store / data_file_name("train", which), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def naive_loop(device: torch.device, size: int, batch: int, steps: int, warmup: int) -> float:
    """Samples/s of fp32 eager training on one in-memory batch, ``.item()`` every step."""
    torch.manual_seed(0)
    model = build_model(ModelSpec("cnn3")).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 1, size, size, device=device)
    t = torch.randn(batch, 1, size, size, device=device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            start = time.perf_counter()
        loss = torch.nn.functional.mse_loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss.item()
    sync(device)
    return steps * batch / (time.perf_counter() - start)


def host_rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB."""
    current = 0.0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                current = int(line.split()[1]) / 1024
    return current, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=1024, help="patch side (px)")
    ap.add_argument("--patches", type=int, default=128, help="patches in the store")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--batches", type=int, default=60, help="timed training steps per configuration")
    ap.add_argument("--warmup", type=int, default=5, help="naive loop warm-up steps")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--buffers", type=int, default=3, help="loader buffers (batches in host memory)")
    ap.add_argument("--threads", type=int, default=4, help="loader threads reading each batch")
    ap.add_argument("--cold", action="store_true", help="evict the store from the page cache every epoch")
    ap.add_argument("--workdir", type=Path, default=Path("bench-train-work"),
                    help="where the store and run folders go (local disk); removed afterwards")
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    label = device_label(args.device)
    today = datetime.date.today().isoformat()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    try:
        t0 = time.perf_counter()
        store = make_store(args.workdir / "store", args.patches, args.size)
        store_mb = 2 * args.patches * args.size**2 * 4 / 2**20
        print(f"store: {args.patches} patches {args.size}x{args.size} ({store_mb:.0f} MB) "
              f"written in {time.perf_counter() - t0:.1f} s")
        what = f"CNN3 training {args.size}², batch {args.batch}"
        base = naive_loop(device, args.size, args.batch, args.batches, args.warmup)
        rows = [(what, "naive eager fp32, in-memory batch, .item() per step", base, "—", "1.00×")]
        notes = []
        n_train = args.patches - max(1, round(args.patches * 0.1))
        per_epoch = n_train // args.batch
        epochs = max(2, math.ceil(args.batches / per_epoch))
        log_every = max(1, args.batches // 6)  # ~6 windows; the first (warm-up) is left out
        for precision in args.precisions.split(","):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            config = TrainConfig(epochs=epochs, batch=args.batch, precision=precision, device=args.device,
                                 log_every=log_every, buffers=args.buffers, loader_threads=args.threads,
                                 val_split=0.1)
            on_step = None
            if args.cold:
                evict(store)

                def on_step(step: int) -> None:
                    if step % per_epoch == 0:
                        evict(store)
            result = train(store, args.workdir / f"run-{precision}", config, quiet=True, on_step=on_step)
            fmt = " + channels_last" if device.type == "cuda" and precision != "fp32" else ""
            fmt += " + loss scaling" if precision == "fp16" else ""
            cfg = f"streamed{' cold' if args.cold else ''} from store, {precision} autocast{fmt}".replace(
                "fp32 autocast", "fp32")
            value = result.samples_per_s or float("nan")
            rows.append((what, cfg, value, f"naive {base:.1f} samples/s", f"{value / base:.2f}×"))
            gpu = (f"{torch.cuda.max_memory_allocated(device) / 2**20:.0f} MB GPU max allocated"
                   if device.type == "cuda" else "no GPU")
            loader_mb = args.buffers * 2 * (args.batch * args.size**2 * 4) / 2**20
            windows = [round(r["samples_per_s"]) for r in read_metrics(args.workdir / f"run-{precision}")
                       if r["kind"] == "train"]
            notes.append(f"{precision}: {gpu}; loader buffers {loader_mb:.0f} MB; {result.steps} steps; "
                         f"samples/s per log window {windows}")
        rss, peak = host_rss_mb()
        print("| date | device | what | config | value | unit | baseline (same run) | ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for w, cfg, value, baseline, ratio in rows:
            print(f"| {today} | {label} | {w} | {cfg} | {value:.1f} | samples/s | {baseline} | {ratio} |")
        for note in notes:
            print(note)
        print(f"host RSS {rss:.0f} MB now, {peak:.0f} MB peak (store on disk: {store_mb:.0f} MB)")
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
