"""Peak host memory and time of tomogram denoising: the streamed runner (host and device path) against
the whole-array implementation it replaced and the raw read+write floor, one fresh process each.

Run (GPU machine, repository root; mrcfile on PYTHONPATH; results under $OUT):
    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_volume_memory.py --shape 256,1024,1024
CPU smoke test: ``python3 benchmarks/bench_volume_memory.py --shape 32,128,128 --device cpu``.

- Input: one float32 tomogram of ``--shape`` (D,H,W), Gaussian noise around 100, ``WORKDIR/in/tomo.mrc``.
- Model: an untrained, seeded ``unet3d`` of ``--base``/``--depth``; torch backend on ``--device``.
- Each case runs in its own process: imports, backend, one warm-up of the same path on a 64x128x128
  volume, then the tomogram once. ``host_peak_x`` is (ru_maxrss after - ru_maxrss after the warm-up)
  over the float32 volume's bytes: the extra host memory the tomogram took (pinned buffers count).
- Cases: ``stream/host`` and ``stream/device`` (``denoise_files``, frame_path host/device),
  ``whole/host`` and ``whole/device`` (read_volume + denoise_volume + write_volume: the implementation
  before streaming), ``floor`` (read_volume_data + write_raw_volume, no model).
- Check: the streamed device output against the streamed host output (max relative difference).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CASES = ("floor", "stream/host", "stream/device", "whole/host", "whole/device")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _child(case: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from cryodeploy.backends import BackendOptions, create_backend
    from cryodeploy.backends.sources import load_source
    from cryodeploy.inference.runner import RunConfig, denoise_files
    from cryodeploy.inference.volumes import denoise_volume
    from cryodeploy.io.rawvolume import read_volume_data, write_raw_volume
    from cryodeploy.io.volumes import read_volume, read_volume_header, write_volume
    from cryodeploy.models.checkpoint import load_checkpoint

    work = args.workdir
    src, warm = work / "in" / "tomo.mrc", work / "warm" / "warm.mrc"
    dst = work / case.replace("/", "_")
    _, spec = load_checkpoint(work / "unet3d.safetensors")

    def run(path: Path, backend: Any) -> None:
        if case == "floor":
            write_raw_volume(dst / path.name, read_volume_data(path, read_volume_header(path)))
        elif case.startswith("stream"):
            cfg = RunConfig(overwrite=True, quiet=True, frame_path=case.split("/")[1])  # type: ignore[arg-type]
            summary = denoise_files([path], dst, backend, spec, cfg)
            if not summary.ok:
                raise SystemExit(f"{case}: {summary.files[0].error}")
        else:
            vol = read_volume(path)
            out = denoise_volume(vol.data, backend, spec, frame_path=case.split("/")[1])
            write_volume(dst / path.name, out, vol.header)

    dst.mkdir(parents=True, exist_ok=True)
    source = load_source(work / "unet3d.safetensors")
    with create_backend("torch", source, BackendOptions(device=args.device)) as b:
        run(warm, b)
        cuda = args.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        base = _maxrss()
        t0 = time.perf_counter()
        run(src, b)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        peak = _maxrss()
        device_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    nbytes = int(np.prod(read_volume_header(src).shape)) * 4
    return {"case": case, "seconds": seconds, "host_peak_x": (peak - base) / nbytes,
            "host_extra_gib": (peak - base) / 2**30, "device_peak_gib": device_peak}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="256,1024,1024", help="D,H,W of the tomogram")
    p.add_argument("--base", type=int, default=16)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_volume_memory"))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp/out")))
    p.add_argument("--child", default=None, choices=CASES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return
    import torch

    from cryodeploy.io.volumes import read_volume, read_volume_header, write_volume
    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint
    from cryodeploy.verify.bench import device_label

    shape = tuple(int(n) for n in args.shape.split(","))
    work, out = args.workdir, args.out
    for sub in ("in", "warm"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    src = work / "in" / "tomo.mrc"
    if not src.is_file() or read_volume_header(src).shape != shape:
        write_volume(src, np.random.default_rng(0).standard_normal(shape, dtype=np.float32) * 5 + 100)
    write_volume(work / "warm" / "warm.mrc",
                 np.random.default_rng(1).standard_normal((64, 128, 128), dtype=np.float32) * 5 + 100)
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": args.base, "depth": args.depth})
    save_checkpoint(work / "unet3d.safetensors", build_model(spec), spec)
    rows = []
    for case in CASES:
        cmd = [sys.executable, __file__, "--child", case, "--shape", args.shape, "--device", args.device,
               "--workdir", str(work)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            rows.append({"case": case, "error": (done.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    host, device = (read_volume(work / f"stream_{k}" / "tomo.mrc").data for k in ("host", "device"))
    check = float(np.abs(device - host).max() / np.abs(host).max())
    report = {"date": datetime.date.today().isoformat(), "device": device_label(args.device),
              "torch": torch.__version__, "shape_dhw": list(shape), "model": spec.to_dict(), "rows": rows,
              "device_vs_host_rel": check}
    (out / "bench_volume_memory.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    lines = [f"Tomogram {shape[2]}x{shape[1]}x{shape[0]} float32, unet3d base {args.base} depth "
             f"{args.depth}, {report['device']}, {report['date']}", "",
             "| case | s | host peak (volumes) | host extra GiB | device peak GiB |", "|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} | - | - | - |")
            continue
        dev = f"{r['device_peak_gib']:.1f}" if r["device_peak_gib"] is not None else "-"
        lines.append(f"| {r['case']} | {r['seconds']:.2f} | {r['host_peak_x']:.2f} | "
                     f"{r['host_extra_gib']:.2f} | {dev} |")
    lines += ["", f"streamed device vs host output: max relative difference {check:.2e}"]
    (out / "bench_volume_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
