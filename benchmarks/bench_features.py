"""Cost of the issue-21 features on the frame path: ensembles, binning/filters, output writers, movie sums.

Run (GPU machine; prints a markdown table, writes JSON and markdown to $OUT):
    OUT=/tmp/out PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_features.py --size 4096 --device cuda
CPU smoke test: ``python3 benchmarks/bench_features.py --size 512 --device cpu --repeats 1``.

- ensemble: ``Denoiser(frame)`` of one seeded CNN3 vs an ensemble of two (same backend, same
  tile/batch), median wall time of ``--repeats`` after a warm-up; the ensemble should cost ~2x.
- filters (numpy, CPU, on one ``--size``^2 frame): ``fourier_bin`` by 2, ``lowpass`` at 8 px,
  ``gaussian`` sigma 2.
- writers: one ``--size``^2 float32 frame written as mrc, tiff, png and jpg (atomic writes to
  ``--workdir``), median wall time.
- movie sums: a ``--frames``-frame MRC movie of ``--size``/2 squared summed into even/odd sums.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryodeploy import Denoiser
from cryodeploy.imaging.filters import fourier_bin, gaussian, lowpass
from cryodeploy.imaging.movies import sum_movie
from cryodeploy.io.mrc import MicrographHeader, write_micrograph
from cryodeploy.io.writers import output_format
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import save_checkpoint
from cryodeploy.verify.bench import median_wall_ms


def median_s(fn: Callable[[], Any], repeats: int, cuda: bool) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` runs after one warm-up (synchronized on CUDA):
    :func:`cryodeploy.verify.bench.median_wall_ms` in seconds."""
    return median_wall_ms(fn, repeats, 1, cuda) / 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="torch")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--frames", type=int, default=20)
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device.startswith("cuda")
    device = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    rows: list[dict[str, Any]] = []

    def row(what: str, config: str, seconds: float) -> None:
        rows.append({"what": what, "config": config, "ms": round(seconds * 1e3, 3)})
        print(f"| {what} | {config} | {seconds * 1e3:.2f} ms |", flush=True)

    rng = np.random.default_rng(0)
    frame = (rng.standard_normal((args.size, args.size)) * 10 + 100).astype(np.float32)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp_name:
        tmp = Path(tmp_name)
        ckpts = []
        for seed in (0, 1):
            torch.manual_seed(seed)
            spec = ModelSpec("cnn3")
            ckpts.append(str(save_checkpoint(tmp / f"cnn3_{seed}.safetensors", build_model(spec), spec)))
        print(f"device: {device}; size {args.size}; backend {args.backend}")
        print("| what | config | time |\n|---|---|---|")
        with Denoiser.load(ckpts[0], device=args.device, backend=args.backend) as one:
            row("denoise one frame", f"1 model ({one.backend.label})",
                median_s(lambda: one(frame), args.repeats, cuda))
        with Denoiser.load(ckpts, device=args.device, backend=args.backend) as two:
            row("denoise one frame", f"ensemble of 2 ({two.backend.label})",
                median_s(lambda: two(frame), args.repeats, cuda))
        row("filter (numpy)", "fourier_bin 2", median_s(lambda: fourier_bin(frame, 2), args.repeats, False))
        row("filter (numpy)", "lowpass 8 px", median_s(lambda: lowpass(frame, 8.0), args.repeats, False))
        row("filter (scipy)", "gaussian sigma 2", median_s(lambda: gaussian(frame, 2.0), args.repeats, False))
        header = MicrographHeader(shape=frame.shape, mode=2, voxel_size=(1.0, 1.0, 1.0), origin=(0, 0, 0))
        for name, ext in (("mrc", ".mrc"), ("tiff", ".tif"), ("png", ".png"), ("jpg", ".jpg")):
            fmt = output_format(name)
            row("write one frame", name, median_s(lambda f=fmt, e=ext: f.write(tmp / f"w{e}", frame, header,
                                                                              "float32", (), None),
                                                  args.repeats, False))
        side = args.size // 2
        movie = (rng.standard_normal((args.frames, side, side)) + 5).astype(np.float32)
        path = write_micrograph(tmp / "movie.mrcs", movie)
        del movie
        row("movie even/odd sums", f"{args.frames} frames of {side}^2 (page cache warm)",
            median_s(lambda: sum_movie(path), args.repeats, False))
    report = {"date": datetime.date.today().isoformat(), "device": device, "size": args.size,
              "backend": args.backend, "rows": rows}
    (out / "bench_features.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"| {report['date']} | {device} | {r['what']} | {r['config']} | {r['ms']} ms |" for r in rows]
    table = "| date | device | what | config | value |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    (out / "bench_features.md").write_text(table)
    print(f"wrote {out / 'bench_features.json'} and {out / 'bench_features.md'}")


if __name__ == "__main__":
    main()
