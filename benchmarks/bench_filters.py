"""Binning and classical filters on the host (numpy, imaging/filters.py) vs the device (torch,
imaging/device_filters.py): time per frame and the device's largest difference from numpy.

Run (GPU machine; prints docs/benchmarks.md rows, writes JSON and markdown under $OUT):
    python3 benchmarks/bench_filters.py --sizes 4096 5760x4092 --repeats 5
CPU smoke test: ``python3 benchmarks/bench_filters.py --sizes 256 --repeats 1 --device cpu``.

Each operation runs on one float32 frame of Gaussian noise (mean 50, std 10); the device time is
the median of ``--repeats`` after one untimed warm-up (cuFFT plans), synchronized, the frame
already on the device; the difference is max |device - numpy| over the numpy output's max |value|.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryodeploy.imaging import device_filters as dev
from cryodeploy.imaging import filters as host

OPS: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[torch.Tensor], torch.Tensor]]] = {
    "bin 2": (lambda a: host.fourier_bin(a, 2), lambda t: dev.fourier_bin(t, 2)),
    "bin 3": (lambda a: host.fourier_bin(a, 3), lambda t: dev.fourier_bin(t, 3)),
    "lowpass 8 px": (lambda a: host.lowpass(a, 8.0), lambda t: dev.lowpass(t, 8.0)),
    "gaussian 1": (lambda a: host.gaussian(a, 1.0), lambda t: dev.gaussian(t, 1.0)),
    "gaussian 4": (lambda a: host.gaussian(a, 4.0), lambda t: dev.gaussian(t, 4.0)),
}


def _shape(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return (int(h or w), int(w))


def _median_s(fn: Callable[[Any], Any], x: Any, repeats: int, sync: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _row(r: dict[str, Any]) -> str:
    return (f"| {r['size']} | {r['op']} | {r['host_ms']:.1f} | {r['device_ms']:.2f} "
            f"| {r['max_rel_diff']:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["4096", "5760x4092"], help="WIDTHxHEIGHT or SIDE")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per operation")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rows = []
    for size in args.sizes:
        shape = _shape(size)
        a = (np.random.default_rng(0).standard_normal(shape) * 10 + 50).astype(np.float32)
        t = torch.from_numpy(a).to(device)
        for op, (np_fn, t_fn) in OPS.items():
            expected = np_fn(a)
            got = t_fn(t)  # warm-up
            diff = np.abs(got.cpu().numpy().astype(np.float64) - expected).max() / np.abs(expected).max()
            rows.append({"size": f"{shape[1]}x{shape[0]}", "op": op,
                         "host_ms": 1e3 * _median_s(np_fn, a, args.repeats, lambda: None),
                         "device_ms": 1e3 * _median_s(t_fn, t, args.repeats, sync),
                         "max_rel_diff": float(diff)})
            print(_row(rows[-1]), flush=True)
    result = {"date": datetime.date.today().isoformat(), "device": name, "torch": torch.__version__,
              "repeats": args.repeats, "rows": rows}
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_filters.json").write_text(json.dumps(result, indent=2))
    lines = [f"Filters host (numpy) vs device (torch, {name}), {result['date']}, median of {args.repeats}",
             "", "| size | op | host ms | device ms | max rel diff |", "|---|---|---|---|---|"]
    lines += [_row(r) for r in rows]
    (out / "bench_filters.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
