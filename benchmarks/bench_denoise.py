"""End-to-end ``denoise_files`` wall time on local disk, next to the runner overhead of the same run.

The floors (raw bytes; mrcfile) are measured by benchmarks/gpu_frame_suite.sh and `cryodeploy bench --e2e`.

Run (GPU machine; prints docs/benchmarks.md rows, writes JSON):
    python3 benchmarks/bench_denoise.py --count 24 --size 4096 --workdir /tmp/bench_denoise \
        --out $OUT/bench_denoise.json
CPU smoke test: ``python3 benchmarks/bench_denoise.py --count 4 --size 512``.

- Inputs: ``--count`` float32 micrographs of ``--size``^2 (a synthetic micrograph from
  cryodeploy.imaging.synth, rolled differently per file), written once to ``WORKDIR/inputs``.
- Runner overhead (not a floor): the same files through the same pipeline (reader thread,
  tiling, writer thread, atomic writes) with the ``identity`` backend below, a real
  :class:`Backend` that returns its input: reading + normalizing + writing with no model and no device copies.
- End-to-end: each backend/precision variant (``--variants``), after an untimed warm-up run on
  two files (cuDNN/ORT algorithm search, engine builds), with the same tile/batch.
- Compute per micrograph: one normalized ``[1, 1, size, size]`` batch, median of ``--repeats``;
  on CUDA through :meth:`Backend.run_device` (device-resident, no host copies) where offered,
  and through :meth:`Backend.run` (pinned host staging, both copies) for every variant.
``--cold`` evicts the inputs from the page cache (posix_fadvise DONTNEED) before each timed run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryodeploy.backends import Backend, BackendOptions, availability, create_backend
from cryodeploy.backends.sources import load_source
from cryodeploy.imaging.contract import pad_to_stride
from cryodeploy.imaging.normalize import norm_stats, normalize
from cryodeploy.inference.runner import RunConfig, RunSummary, denoise_files
from cryodeploy.io.mrc import read_header, read_micrograph, write_micrograph
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import save_checkpoint
from cryodeploy.models.source import ModelSource
from cryodeploy.verify.bench import IdentityBackend, device_label, median_wall_ms


def make_inputs(folder: Path, count: int, size: int, seed: int = 0) -> list[Path]:
    """``count`` float32 ``size``^2 micrographs (reused if already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"mic_{i:04d}.mrc" for i in range(count)]
    if all(p.is_file() and read_header(p).shape == (size, size) for p in paths):
        return paths
    rng = np.random.default_rng(seed)
    try:
        from cryodeploy.imaging.noise import NoiseSpec, add_noise
        from cryodeploy.imaging.synth import render_clean

        base = add_noise(render_clean(rng, (size, size)), NoiseSpec(), rng)
    except ImportError:
        base = rng.standard_normal((size, size)).astype(np.float32)
    for i, p in enumerate(paths):
        write_micrograph(p, np.roll(base, (97 * i, 131 * i), axis=(0, 1)).astype(np.float32))
    return paths


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache (no root needed for clean pages)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed_run(paths: list[Path], outdir: Path, backend: Backend, spec: ModelSpec, config: RunConfig,
              cold: bool) -> RunSummary:
    """One denoise_files run (inputs evicted from the page cache first if ``cold``)."""
    if cold:
        evict(paths)
    summary = denoise_files(paths, outdir, backend, spec, config)
    if not summary.ok:
        raise SystemExit(f"{backend.label}: {summary.line()}")
    return summary


def compute_ms(backend: Backend, image: np.ndarray, repeats: int) -> dict[str, float]:
    """Median ms per micrograph: device-resident (CUDA, if offered) and through Backend.run."""
    batch = np.ascontiguousarray(image[None, None])
    out: dict[str, float] = {}
    cuda = backend.device.startswith("cuda")
    if cuda:
        x = torch.from_numpy(batch).to(backend.device)
        try:
            backend.run_device(x)
        except NotImplementedError:
            pass
        else:
            out["device"] = median_wall_ms(lambda: backend.run_device(x), repeats, 1, cuda)
    out["host"] = median_wall_ms(lambda: backend.run(batch), repeats, 1, cuda)
    return out


def row(device: str, what: str, config: str, value: float, unit: str, baseline: str = "—",
        ratio: str = "—") -> str:
    """One docs/benchmarks.md row."""
    date = datetime.date.today().isoformat()
    return f"| {date} | {device} | {what} | {config} | {value:.4g} | {unit} | {baseline} | {ratio} |"


def main() -> None:
    """Measure the floor and every variant; print the rows."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=24)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cryodeploy-bench-denoise"))
    ap.add_argument("--model", default=None, help="checkpoint/.onnx (default: a seeded random CNN3)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--variants", default=None,
                    help="backend:precision,... e.g. torch:fp32,torch:fp16,trt:fp16 (default: per device)")
    ap.add_argument("--tile", default="auto")
    ap.add_argument("--batch", default="auto")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--cold", action="store_true", help="evict inputs from the page cache before timed runs")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    device_name = device_label(device)
    default = "torch:fp32,torch:fp16,trt:fp16,ort:fp32" if cuda else "ort:fp32,torch:fp32"
    variants = [v.split(":") for v in (args.variants or default).split(",")]

    work = args.workdir
    paths = make_inputs(work / "inputs", args.count, args.size)
    if args.model is None:
        torch.manual_seed(0)
        spec = ModelSpec("cnn3")
        ckpt = save_checkpoint(work / "cnn3-random.safetensors", build_model(spec), spec)
        source: ModelSource = load_source(ckpt)
    else:
        source = load_source(args.model)
    spec = source.spec
    tile = args.tile if args.tile == "auto" else int(args.tile)
    batch = args.batch if args.batch == "auto" else int(args.batch)
    config = RunConfig(tile=tile, batch=batch, overwrite=True, quiet=True, shard=(0, 1))
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    cache = "cold" if args.cold else "warm"
    what = f"denoise {args.count} x {args.size}² float32 ({megabytes:.0f} MB), {cache} cache"
    results: dict[str, Any] = {"device": device_name, "count": args.count, "size": args.size,
                               "cold": args.cold, "megabytes": megabytes, "variants": []}

    identity = IdentityBackend(BackendOptions(device=device))
    timed_run(paths[:2], work / "warmup", identity, spec, config, False)
    floor = timed_run(paths, work / "out", identity, spec, config, args.cold)
    results["floor_s"] = floor.seconds
    results["geometry"] = {"tile": floor.tile, "batch": floor.batch}
    geometry = f"tile {floor.tile}, batch {floor.batch}"
    rows = [row(device_name, f"{what}: runner overhead (not a floor)", f"identity backend, {geometry}",
                floor.seconds, "s")]

    first = read_micrograph(paths[0]).data
    image = pad_to_stride(normalize(first, norm_stats(first, spec.normalization)), spec.stride)
    forward = f"{spec.architecture} forward, one {args.size}² micrograph"
    for name, precision in variants:
        opts = BackendOptions(device=device, precision=precision, threads=args.threads)
        label = f"{name} {precision}"
        ok, reason = availability(name, opts)
        if not ok:
            results["variants"].append({"variant": label, "skipped": reason})
            print(f"skipped {label}: {reason}")
            continue
        with create_backend(name, source, opts) as backend:
            timed_run(paths[:2], work / "warmup", backend, spec, config, False)
            e2e = timed_run(paths, work / "out", backend, spec, config, args.cold)
            ms = compute_ms(backend, image, args.repeats)
        ratio = e2e.seconds / floor.seconds
        results["variants"].append({"variant": label, "e2e_s": e2e.seconds, "ratio": ratio,
                                    "compute_ms": ms, "tile": e2e.tile, "batch": e2e.batch})
        rows.append(row(device_name, f"{what}: end-to-end", f"{label}, tile {e2e.tile}, batch {e2e.batch}",
                        e2e.seconds, "s", f"runner overhead {floor.seconds:.2f} s", f"{ratio:.2f}×"))
        for kind, value in ms.items():
            how = "device-resident (run_device)" if kind == "device" else "Backend.run incl. host copies"
            rows.append(row(device_name, forward, f"{label}, {how}", value, "ms"))
    print("\n".join(rows))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**results, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
