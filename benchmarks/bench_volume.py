"""Tomograms end to end with a volume model (unet3d): ``denoise_files`` on one D x H x W tomogram,
next to the raw read+write floor, the runner with no model, and Topaz-Denoise's ``denoise3d``.

Run (GPU machine, repository root; mrcfile on PYTHONPATH; results under $OUT):
    python3 benchmarks/bench_volume.py --shape 256,1024,1024 --workdir /tmp/bench_volume
    # with Topaz side by side (benchmarks/topaz_gpu_setup.sh first):
    python3 benchmarks/bench_volume.py --topaz-python "env PYTHONPATH=/tmp/topazsite python3"
CPU smoke test: ``python3 benchmarks/bench_volume.py --shape 32,96,96 --device cpu --variants torch:fp32``.

- Input: one float32 tomogram of ``--shape`` (D,H,W): Gaussian noise around 100 (speed does not depend
  on the content), written once to ``WORKDIR/in/tomo.mrc``.
- Model: an untrained, seeded ``unet3d`` of ``--base``/``--depth`` (speed does not depend on the weights).
- Floors: the raw floor (read the file's bytes, write as many bytes; ``raw_floor``), the MRC floor
  (``read_volume`` + ``write_volume``: mrcfile, validation, atomic, fsync) with no model; the runner with
  the ``identity`` backend (read, normalize, 3-D tiling, stitch, write; no model: runner overhead).
  "x floor" is against the raw floor.
- Variants: each ``backend:precision`` of ``--variants`` after an untimed warm-up run (cuDNN/ORT
  algorithm search); median of ``--repeats`` runs; the tile and batch that ``auto`` chose
  (free device memory) and the peak device memory.
- Checks on the GPU: the tiled result against one whole-volume forward on a 96 x 256 x 256 crop
  (relative error), and ONNX Runtime against torch on that crop.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryodeploy.backends import BackendOptions, availability, create_backend
from cryodeploy.backends.sources import load_source
from cryodeploy.inference.batching import auto_geometry
from cryodeploy.inference.runner import RunConfig, denoise_files
from cryodeploy.inference.tiling import TilePlan
from cryodeploy.inference.volumes import denoise_volume
from cryodeploy.io.volumes import read_volume, read_volume_header, write_volume
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import save_checkpoint
from cryodeploy.verify.bench import IdentityBackend, device_label, raw_floor


def _median_s(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _run(backend: Any, spec: ModelSpec, src: Path, out: Path, frame_path: str) -> float:
    cfg = RunConfig(overwrite=True, quiet=True, shard=(0, 1), frame_path=frame_path)  # type: ignore[arg-type]
    summary = denoise_files([src], out, backend, spec, cfg)
    if not summary.ok:
        raise SystemExit(f"{backend.label}: {summary.files[0].error}")
    return summary.seconds


def _checks(source: Any, spec: ModelSpec, device: str) -> dict[str, Any]:
    """Tiled vs whole-volume forward, and ORT vs torch, on a 96 x 256 x 256 crop (normalized units)."""
    rng = np.random.default_rng(1)
    vol = (rng.standard_normal((96, 256, 256)) * 5 + 100).astype(np.float32)
    found: dict[str, Any] = {}
    with create_backend("torch", source, BackendOptions(device=device)) as t:
        whole = denoise_volume(vol, t, spec, tile=256, batch=1, keep_normalized=True)
        tiled = denoise_volume(vol, t, spec, tile=2 * (spec.receptive_radius + spec.stride) + 16, batch=4,
                               keep_normalized=True)
        found["tiled_vs_whole_rel"] = float(np.abs(tiled - whole).max() / np.abs(whole).max())
    ok, why = availability("ort", BackendOptions(device=device))
    if ok:
        with create_backend("ort", source, BackendOptions(device=device)) as o:
            got = denoise_volume(vol, o, spec, tile=256, batch=1, keep_normalized=True)
        found["ort_vs_torch_rel"] = float(np.abs(got - whole).max() / np.abs(whole).max())
    else:
        found["ort_vs_torch_rel"] = f"unavailable: {why}"
    return found


def _topaz(command: str, src: Path, work: Path, device: str, timeout: float) -> dict[str, Any]:
    report = work / "topaz.json"
    script = Path(__file__).with_name("topaz_denoise.py")
    argv = [*shlex.split(command), str(script), str(src), "-o", str(work / "topaz_out"), "--volume", "-q",
            "--json", str(report), "--device", "cuda" if device.startswith("cuda") else "cpu"]
    t0 = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished within {timeout:.0f} s (--topaz-timeout)", "wall_s": None}
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "wall_s": wall}
    return {"wall_s": wall, **json.loads(report.read_text())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256,1024,1024", help="D,H,W of the tomogram")
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--variants", default="torch:fp32,torch:bf16,torch:fp16,ort:fp32")
    p.add_argument("--frame-path", default="auto", choices=("auto", "host", "device"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_volume"))
    p.add_argument("--topaz-python", default=None, help="command running the Topaz environment's python")
    p.add_argument("--topaz-timeout", type=float, default=900.0, help="seconds Topaz may take")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    args = p.parse_args()
    shape = tuple(int(n) for n in args.shape.split(","))
    work, out = args.workdir, args.out
    (work / "in").mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    src = work / "in" / "tomo.mrc"
    if not src.is_file() or read_volume_header(src).shape != shape:
        write_volume(src, np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 5 + 100)
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": args.base, "depth": args.depth})
    ckpt = save_checkpoint(work / "unet3d.safetensors", build_model(spec), spec)
    source = load_source(ckpt)
    mb = src.stat().st_size / 1e6

    def floor() -> None:
        volume = read_volume(src)
        write_volume(work / "floor.mrc", volume.data, volume.header)

    raw = _median_s(lambda: raw_floor([src], work / "raw"), 3)
    rows: list[dict[str, Any]] = [{"label": "raw floor (read the bytes, write as many)", "seconds": raw},
                                  {"label": "MRC floor (mrcfile read + write, fsync)",
                                   "seconds": _median_s(floor, 3)}]
    with IdentityBackend(BackendOptions(device="cpu")) as ident:
        _run(ident, spec, src, work / "identity", "host")
        rows.append({"label": "runner, identity backend (no model)",
                     "seconds": _median_s(lambda: _run(ident, spec, src, work / "identity", "host"), 3)})
    padded = tuple(n + -n % spec.stride for n in shape)
    for variant in args.variants.split(","):
        name, precision = variant.split(":")
        opts = BackendOptions(device=args.device, precision=precision)
        ok, why = availability(name, opts)
        label = f"{name}/{args.device}/{precision}"
        if not ok:
            rows.append({"label": label, "seconds": None, "note": why})
            continue
        with create_backend(name, source, opts) as b:
            tile, batch = auto_geometry(padded, spec, args.device, None, None)
            tiles = len(TilePlan.create(shape, tile, spec.receptive_radius, spec.stride))
            batch = min(batch, tiles)  # as denoise_volume bounds it
            _run(b, spec, src, work / label.replace("/", "_"), args.frame_path)  # warm-up
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            s = _median_s(lambda b=b, label=label: _run(b, spec, src, work / label.replace("/", "_"),
                                                        args.frame_path), args.repeats)
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
        rows.append({"label": label, "seconds": s, "tile": tile, "tiles": tiles, "batch": batch,
                     "peak_gib": peak})
    if args.topaz_python:
        top = _topaz(args.topaz_python, src, work, args.device, args.topaz_timeout)
        start = top.get("startup", {}).get("total_s") if isinstance(top.get("startup"), dict) else None
        label = "Topaz-Denoise denoise3d (unet-3d-10a, patch 96, padding 48)"
        if start is not None:
            label += f", start-up {start:.1f} s excluded"
        rows.append({"label": label, **top, "seconds": top.get("per_file_total_s")})
    floor_s = rows[0]["seconds"]
    for r in rows:
        sec = r.get("seconds") or r.get("wall_s")
        r["mb_per_s"] = mb / sec if sec else None
        r["x_floor"] = sec / floor_s if sec else None
    report = {"date": datetime.date.today().isoformat(), "device": device_label(args.device),
              "torch": torch.__version__, "python": sys.version.split()[0], "shape_dhw": list(shape),
              "megabytes": mb, "model": spec.to_dict(), "frame_path": args.frame_path, "rows": rows,
              "checks": _checks(source, spec, args.device)}
    (out / "bench_volume.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"Tomogram {shape[2]}x{shape[1]}x{shape[0]} float32 ({mb:.0f} MB), unet3d base {args.base} "
             f"depth {args.depth}, {report['device']}, {report['date']}", "",
             "| run | s | MB/s | x floor | tile (count) | batch | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sec = r.get("seconds") or r.get("wall_s")
        cells = [r["label"], f"{sec:.2f}" if sec else r.get("note", r.get("error", "-")),
                 f"{r['mb_per_s']:.0f}" if r["mb_per_s"] else "-",
                 f"{r['x_floor']:.1f}" if r["x_floor"] else "-",
                 f"{r['tile']} ({r['tiles']})" if "tile" in r else "-", str(r.get("batch", "-")),
                 f"{r['peak_gib']:.1f}" if r.get("peak_gib") else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"checks: {report['checks']}"]
    (out / "bench_volume.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
