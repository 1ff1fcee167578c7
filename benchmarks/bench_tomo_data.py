"""The data side of 3-D, timed: synthetic tomograms (CPU and CUDA), volume read/write, 3-D patch stores.

    OUT=/tmp/out PYTHONPATH=$PWD:/tmp/site python benchmarks/bench_tomo_data.py [--big 256 1024 1024]

Prints one line per measurement and writes ``$OUT/tomo_data.json`` and ``$OUT/tomo_data.md``:

- ``simulate``: seconds per tomogram of ``simulate_tomogram`` for 64x256x256 on the CPU and on
  CUDA, and for the big shape on CUDA (the median of 3 after a warm-up), and whether two CUDA
  runs give identical volumes;
- ``cpu_vs_cuda``: the largest difference of the clean volume between the devices (same scene);
- ``io``: write_volume and read_volume of the big even half (float32), the raw floor of any
  tomogram pipeline on this disk;
- ``preprocess``: preprocess_volumes of the big even/odd pair into 64^3 patches with 16 workers:
  seconds, input GB/s, the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cryodeploy.imaging.simulate.tomogram import simulate_tomogram
from cryodeploy.imaging.simulate.tomoscene import TomoConfig
from cryodeploy.io.tomopairs import TomoPair
from cryodeploy.io.volumes import VolumeHeader, read_volume, write_volume
from cryodeploy.training.preprocess import PreprocessConfig
from cryodeploy.training.volumes import preprocess_volumes


def _sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def _time_sim(cfg: TomoConfig, dev: str, repeats: int = 3) -> tuple[float, Any]:
    simulate_tomogram(cfg, 0, dev)  # warm-up: library, FFT plans, CUDA context
    _sync(dev)
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = simulate_tomogram(cfg, 0, dev)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", nargs=3, type=int, default=(256, 1024, 1024), metavar=("D", "H", "W"))
    ap.add_argument("--workers", type=int, default=16)
    args = ap.parse_args()
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    res: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "simulate": [],
    }
    small = TomoConfig(shape=(64, 256, 256))
    ratio = args.big[0] * args.big[1] * args.big[2] / (64 * 256 * 256)
    big = TomoConfig(
        shape=tuple(args.big), particles=max(1, round(20 * ratio))
    )  # a quarter of small's density
    runs = [("cpu", small)] + ([("cuda", small), ("cuda", big)] if cuda else [])
    for dev, cfg in runs:
        sec, tomo = _time_sim(cfg, dev)
        row = {
            "device": dev,
            "shape": list(cfg.shape),
            "particles": cfg.particles,
            "seconds": sec,
            "mvoxels_per_s": cfg.shape[0] * cfg.shape[1] * cfg.shape[2] / sec / 1e6,
        }
        if dev == "cuda":
            again = simulate_tomogram(cfg, 0, dev)
            row["deterministic"] = all(
                torch.equal(getattr(tomo, k), getattr(again, k)) for k in ("clean", "even")
            )
        res["simulate"].append(row)
        print(f"simulate {dev} {'x'.join(map(str, cfg.shape))}: {sec:.3f} s", flush=True)
    if cuda:
        a, b = simulate_tomogram(small, 0, "cpu").clean, simulate_tomogram(small, 0, "cuda").clean.cpu()
        res["cpu_vs_cuda"] = {"max_abs": float((a - b).abs().max()), "clean_std": float(a.std())}
        print(f"cpu vs cuda clean: max |diff| {res['cpu_vs_cuda']['max_abs']:.3g} (std {a.std():.3g})")
    dev = "cuda" if cuda else "cpu"
    tomo = simulate_tomogram(big if cuda else small, 0, dev)
    shape = tuple(tomo.even.shape)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        header = VolumeHeader(shape=shape, mode=2, voxel_size=(10.0,) * 3, origin=(0.0,) * 3)
        even, odd = tomo.even.cpu().numpy(), tomo.odd.cpu().numpy()
        del tomo
        t0 = time.perf_counter()
        pe = write_volume(Path(tmp) / "t_even.mrc", even, header)
        t_write = time.perf_counter() - t0
        po = write_volume(Path(tmp) / "t_odd.mrc", odd, header)
        del even, odd
        t0 = time.perf_counter()
        vol = read_volume(pe)
        t_read = time.perf_counter() - t0
        gb = vol.data.nbytes / 1e9
        del vol
        res["io"] = {"shape": list(shape), "gb": gb, "write_s": t_write, "read_s": t_read}
        print(f"io {gb:.2f} GB: write {t_write:.2f} s, read {t_read:.2f} s (page cache warm)")
        cfg = PreprocessConfig(patch=64, ndim=3, targets="pairs", test_fraction=0.0, workers=args.workers)
        t0 = time.perf_counter()
        store = preprocess_volumes([TomoPair("t", pe, po)], Path(tmp) / "store", cfg, quiet=True)
        t_pre = time.perf_counter() - t0
        res["preprocess"] = {
            "patches": store.count("train"),
            "seconds": t_pre,
            "input_gb_per_s": 2 * gb / t_pre,
            "workers": args.workers,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        }
        print(
            f"preprocess: {store.count('train')} patches of 64^3 in {t_pre:.2f} s "
            f"({2 * gb / t_pre:.2f} GB/s in), peak RSS {res['preprocess']['peak_rss_gb']:.2f} GB"
        )
    (out / "tomo_data.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        f"# Tomogram data path ({res['date']}, {res['gpu'] or 'CPU only'}, {res['cores']} cores, "
        f"torch {res['torch']})",
        "",
        "| what | device | shape | seconds |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| simulate | {r['device']} | {'x'.join(map(str, r['shape']))} | {r['seconds']:.3f} |"
        for r in res["simulate"]
    ]
    lines += [
        f"| write_volume | host | {'x'.join(map(str, shape))} | {res['io']['write_s']:.2f} |",
        f"| read_volume | host | {'x'.join(map(str, shape))} | {res['io']['read_s']:.2f} |",
        f"| preprocess pairs 64^3 | {args.workers} workers | {'x'.join(map(str, shape))} x 2 | "
        f"{res['preprocess']['seconds']:.2f} |",
    ]
    (out / "tomo_data.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
