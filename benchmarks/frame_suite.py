"""Helpers of benchmarks/gpu_frame_suite.sh (one subcommand per step; each writes JSON into --out).

    inputs DIR --count N --size S      N float32 S^2 MRC micrographs (noise + structure), reused
    floors DIR --work W                raw floor (bytes in, as many out; also with an fsync per file) and
                                       MRC floor (mrcfile read+write)
    startup FILE --work W              a fresh `cryodeploy denoise FILE` process: start to first output
    stages DIR --precision P           per-stage times per file on the device frame path (median over files),
                                       then the runner on the same files: overlapped wall vs stage sum
    api FILE --precision P             Denoiser(x) vs device forward + one H2D + one D2H
    parity REF_DIR DIR... --file F     outputs of GPU runs vs the CPU fp32 reference (relative error)
    cpuref FILE --out-dir D            the CPU fp32 reference output of FILE (torch, host path)
    table OUTDIR                       docs/benchmarks.md rows from every JSON written above
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _dump(out: Path, name: str, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2))
    print(json.dumps(data))


def _files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.mrc"))


def inputs(a: argparse.Namespace) -> None:
    from cryodeploy.io.mrc import read_header, write_micrograph

    a.dir.mkdir(parents=True, exist_ok=True)
    paths = [a.dir / f"mic_{i:04d}.mrc" for i in range(a.count)]
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:a.size, 0:a.size].astype(np.float32) / a.size
    base = (np.sin(40 * xx) * np.cos(33 * yy) * 20 + 5600).astype(np.float32)
    for i, p in enumerate(paths):
        if p.is_file() and read_header(p).shape == (a.size, a.size):
            continue
        noisy = base + rng.standard_normal((a.size, a.size), dtype=np.float32) * 70
        write_micrograph(p, np.roll(noisy, 97 * i, axis=1))
    print(f"{len(paths)} inputs in {a.dir}")


def floors(a: argparse.Namespace) -> None:
    import shutil

    from cryodeploy.verify.bench import mrc_floor, raw_floor

    paths = _files(a.dir)

    def timed(floor: Any, name: str, **kw: Any) -> float:  # outputs removed after each floor (disk)
        seconds = float(floor(paths, a.work / name, **kw))
        shutil.rmtree(a.work / name, ignore_errors=True)
        return seconds

    timed(raw_floor, "raw-warm")  # page cache warm
    res = {"files": len(paths), "bytes": sum(p.stat().st_size for p in paths),
           "raw_floor_s": timed(raw_floor, "raw"), "mrc_floor_s": timed(mrc_floor, "mrc"),
           "raw_floor_fsync_s": timed(raw_floor, "raw-fsync", fsync=True),
           "raw_floor_4threads_s": timed(raw_floor, "raw-4", threads=4),
           "raw_floor_fsync_4threads_s": timed(raw_floor, "raw-fsync-4", fsync=True, threads=4)}
    _dump(a.out, f"floors{len(paths)}", res)


def startup(a: argparse.Namespace) -> None:
    from cryodeploy.verify.bench import startup_seconds

    args = () if a.precision == "auto" else ("--precision", a.precision)
    res = {"label": a.label, "startup_s": startup_seconds(a.file, a.work, a.model, "cuda", args)}
    _dump(a.out, f"startup_{a.label}", res)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def stages(a: argparse.Namespace) -> None:
    import torch

    from cryodeploy.backends import BackendOptions, create_backend
    from cryodeploy.backends.sources import load_source
    from cryodeploy.imaging.device import DeviceFrameContract, header_stats, validate_frames
    from cryodeploy.inference.batching import DeviceArrays, FrameTask, TiledEngine
    from cryodeploy.io.mrc import read_header
    from cryodeploy.io.rawmrc import read_data_into, write_raw_micrograph

    source = load_source(a.model)
    extra = (("cuda_graphs", True),) if a.graphs else ()
    backend = create_backend(a.backend, source, BackendOptions(a.device, a.precision, extra=extra))
    contract = DeviceFrameContract(source.spec.contract)
    engine = TiledEngine(backend, source.spec, "auto", "auto", DeviceArrays(a.device))
    times: dict[str, list[float]] = {k: [] for k in
                                     ("read", "H2D", "normalize", "forward", "denormalize", "D2H", "write")}
    paths = _files(a.dir)
    a.work.mkdir(parents=True, exist_ok=True)
    pin_in = pin_out = None
    for k, p in enumerate([paths[0], *paths]):  # the first pass is a warm-up
        t = [time.perf_counter()]
        header = read_header(p)
        n = int(np.prod(header.shape)) * 4
        if pin_in is None:
            pinned = a.device.startswith("cuda")
            pin_in = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
            pin_out = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
        read_data_into(p, header, pin_in.numpy())
        t.append(time.perf_counter())
        dev = pin_in[:n].to(a.device, non_blocking=True)
        _sync(a.device)
        t.append(time.perf_counter())
        frame = dev.view(torch.float32).reshape(header.shape)
        validate_frames(frame[None], p)
        prep = contract.prepare(frame)
        _sync(a.device)
        t.append(time.perf_counter())
        done = engine.add(FrameTask(0, prep.image, prep.shape)) + engine.flush()
        _sync(a.device)
        t.append(time.perf_counter())
        y = contract.finish(done[0].output(), prep.stats)
        head = header_stats(y, p, "float32")
        _sync(a.device)
        t.append(time.perf_counter())
        host = pin_out[:n].view(torch.float32).view(y.shape)
        host.copy_(y)
        t.append(time.perf_counter())
        write_raw_micrograph(a.work / p.name, host.numpy(), head, header)
        t.append(time.perf_counter())
        if k:
            for name, t0, t1 in zip(times, t, t[1:], strict=False):
                times[name].append((t1 - t0) * 1e3)
    res = {"label": a.label, "files": len(paths), "tile": engine.tile, "batch": engine.batch,
           "median_ms": {k: statistics.median(v) for k, v in times.items()}}
    res["sum_ms"] = sum(res["median_ms"].values())
    res.update(_overlapped(a, backend, source.spec, paths))
    _dump(a.out, f"stages_{a.label}", res)


def _overlapped(a: argparse.Namespace, backend: Any, spec: Any, paths: list[Path]) -> dict[str, Any]:
    """The same files through the runner (device frame path, stages overlapped), first file warmed up:
    its wall per file next to the serial stage sum, each stage's busy time, allocator retries."""
    import torch

    from cryodeploy.inference.runner import RunConfig, denoise_files

    cfg = RunConfig(quiet=True, overwrite=True, shard=(0, 1), frame_path="device")
    denoise_files(paths[:1], a.work / "pipeline-warm", backend, spec, cfg)
    before = torch.cuda.memory_stats().get("num_alloc_retries", 0) if a.device.startswith("cuda") else 0
    s = denoise_files(paths, a.work / "pipeline", backend, spec, cfg)
    after = torch.cuda.memory_stats().get("num_alloc_retries", 0) if a.device.startswith("cuda") else 0
    busy = getattr(s, "stage_seconds", {})
    return {"pipeline_ok": s.ok, "pipeline_wall_s": s.seconds,
            "pipeline_ms_per_file": s.seconds / len(paths) * 1e3,
            "pipeline_busy_ms_per_file": {k: v / len(paths) * 1e3 for k, v in busy.items()},
            "cuda_alloc_retries": after - before}


def api(a: argparse.Namespace) -> None:
    import torch

    from cryodeploy.inference.denoiser import Denoiser
    from cryodeploy.io.mrc import read_micrograph
    from cryodeploy.verify.bench import median_ms, median_wall_ms

    x = read_micrograph(a.file).data
    extra: dict[str, Any] = {"cuda_graphs": True} if a.graphs else {}
    cuda = a.device.startswith("cuda")
    with Denoiser.load(a.model, device=a.device, backend=a.backend, precision=a.precision, **extra) as d:
        api_ms = median_wall_ms(lambda: d(x), a.repeats, 2, cuda)
        z = (x - x.mean()) / x.std()  # normalized, as the model sees it
        xt = torch.from_numpy(z).to(a.device)[None, None]
        fwd_ms = median_ms(lambda: d.backend.run_device(xt), a.repeats, 2, cuda)
        h2d_ms = median_wall_ms(lambda: torch.from_numpy(x).to(a.device), a.repeats, 2, cuda)
        y = d.backend.run_device(xt)
        d2h_ms = median_wall_ms(lambda: y.cpu(), a.repeats, 2, cuda)
        label = d.backend.label
    base = fwd_ms + h2d_ms + d2h_ms
    res = {"label": a.label, "backend": label, "api_ms": api_ms, "forward_ms": fwd_ms, "h2d_ms": h2d_ms,
           "d2h_ms": d2h_ms, "ratio_api_vs_forward_plus_copies": api_ms / base}
    _dump(a.out, f"api_{a.label}", res)


def cpuref(a: argparse.Namespace) -> None:
    from cryodeploy.backends import BackendOptions, create_backend
    from cryodeploy.backends.sources import load_source
    from cryodeploy.inference.runner import RunConfig, denoise_files

    source = load_source(a.model)
    with create_backend("torch", source, BackendOptions("cpu", "fp32")) as b:
        s = denoise_files([a.file], a.out_dir, b, source.spec, RunConfig(quiet=True, frame_path="host",
                                                                         overwrite=True))
    print(s.line())


def parity(a: argparse.Namespace) -> None:
    from cryodeploy.io.mrc import read_micrograph

    ref = read_micrograph(a.ref / a.file).data.astype(np.float64)
    res: dict[str, Any] = {"file": a.file, "rows": {}}
    for d in a.dirs:
        if not (d / a.file).is_file():  # that variant did not run (or ran only part of the suite)
            continue
        got = read_micrograph(d / a.file).data.astype(np.float64)
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        rms = float(np.sqrt(np.mean((got - ref) ** 2)) / ref.std())
        res["rows"][d.name] = {"max_rel_err": rel, "rms_err_over_std": rms}
    _dump(a.out, "parity", res)


def table(a: argparse.Namespace) -> None:
    """docs/benchmarks.md rows from the JSON files in ``a.dir``."""
    import torch

    today = datetime.date.today().isoformat()
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    rows: list[str] = ["| date | device | what | config | value | unit | baseline (same run) | ratio |",
                       "|---|---|---|---|---|---|---|---|"]

    def row(what: str, config: str, value: float, unit: str, base: str = "", ratio: str = "") -> None:
        rows.append(f"| {today} | {dev} | {what} | {config} | {value:.4g} | {unit} | {base} | {ratio} |")

    def load(name: str) -> dict[str, Any] | None:
        p = a.dir / f"{name}.json"
        return json.loads(p.read_text()) if p.is_file() else None

    for n in (20, 200):
        fl = load(f"floors{n}")
        if fl is None:
            continue
        what = f"{n} x 4096^2 float32 MRC, warm cache"
        raw = fl["raw_floor_s"]
        row(what, "raw floor (read bytes, write as many bytes)", raw, "s")
        row(what, "MRC floor (mrcfile read + write)", fl["mrc_floor_s"], "s", f"raw floor {raw:.2f} s",
            f"{fl['mrc_floor_s'] / raw:.2f}x")
        if "raw_floor_fsync_s" in fl:
            row(what, "raw floor + fsync per file (the runner's durability)", fl["raw_floor_fsync_s"], "s",
                f"raw floor {raw:.2f} s", f"{fl['raw_floor_fsync_s'] / raw:.2f}x")
        if "raw_floor_4threads_s" in fl:
            row(what, "raw floor, 4 files at a time (threads)", fl["raw_floor_4threads_s"], "s",
                f"raw floor {raw:.2f} s", f"{fl['raw_floor_4threads_s'] / raw:.2f}x")
            row(what, "raw floor + fsync per file, 4 files at a time", fl["raw_floor_fsync_4threads_s"], "s",
                f"raw floor {raw:.2f} s", f"{fl['raw_floor_fsync_4threads_s'] / raw:.2f}x")
            raw = min(raw, fl["raw_floor_4threads_s"])  # the floor: the faster of the two
        topaz = load(f"topaz{n}")
        topaz_run = None
        if topaz is not None:
            topaz_run = _topaz_seconds(topaz)
            if topaz_run is not None:
                row(what, "Topaz-Denoise 0.3.20 unet, excl. its start-up", topaz_run, "s",
                    f"raw floor {raw:.2f} s", f"{topaz_run / raw:.2f}x")
            if isinstance(topaz.get("startup"), dict) and "total_s" in topaz["startup"]:
                row(what, "Topaz-Denoise start-up (interpreter, imports, model load)",
                    float(topaz["startup"]["total_s"]), "s")
        for p in sorted(a.dir.glob(f"denoise{n}_*.json")):
            r = json.loads(p.read_text())
            su = load(f"startup_{r['label']}")
            run = r["run_s"]
            row(what, f"cryodeploy denoise {r['label']}: process wall", r["wall_s"], "s")
            if su is not None:
                row(what, f"cryodeploy denoise {r['label']}: start-up (1-file process to first output)",
                    su["startup_s"], "s")
            row(what, f"cryodeploy denoise {r['label']}: run (wall minus start-up, summary seconds)", run,
                "s", f"raw floor {raw:.2f} s", f"{run / raw:.2f}x")
            if topaz_run:
                row(what, f"Topaz / cryodeploy {r['label']} per file (start-up excluded from both)",
                    topaz_run / run, "x", "", "")
    for p in sorted(a.dir.glob("stages_*.json")):
        r = json.loads(p.read_text())
        for k, v in r["median_ms"].items():
            row("per-stage time per 4096^2 file (median)", f"{r['label']}: {k}", v, "ms")
        row("per-stage time per 4096^2 file (median)", f"{r['label']}: stage sum (one file at a time)",
            r["sum_ms"], "ms")
        if "pipeline_ms_per_file" in r:
            what = "runner on the same files, stages overlapped (per file)"
            row(what, f"{r['label']}: wall", r["pipeline_ms_per_file"], "ms",
                f"stage sum {r['sum_ms']:.1f} ms", f"{r['pipeline_ms_per_file'] / r['sum_ms']:.2f}x")
            for k, v in r["pipeline_busy_ms_per_file"].items():
                row(what, f"{r['label']}: {k} busy (summed over its threads)", v, "ms")
            row(what, f"{r['label']}: CUDA allocator retries (cudaFree + retry) in the run",
                r["cuda_alloc_retries"], "count")
    for p in sorted(a.dir.glob("overlap_*.json")):  # benchmarks/bench_overlap.py
        r = json.loads(p.read_text())
        what = f"{r['files']} files, runner stages overlapped? ({r['backend']}, {r['label']})"
        one = r["one_file_at_a_time_s"]
        row(what, "runner, one file per run (nothing overlaps)", one, "s")
        row(what, "runner over all files", r["run_s"], "s", f"one at a time {one:.2f} s",
            f"{r['run_s'] / one:.2f}x")
        for k, v in r["stage_busy_s"].items():
            row(what, f"{k} busy (summed over its threads)", v, "s")
        raw = r["raw_floor_s"]
        row(what, "raw floor + fsync per file", r["raw_floor_fsync_s"], "s", f"raw floor {raw:.2f} s",
            f"{r['raw_floor_fsync_s'] / raw:.2f}x")
    for p in sorted(a.dir.glob("api_*.json")):
        r = json.loads(p.read_text())
        base = r["forward_ms"] + r["h2d_ms"] + r["d2h_ms"]
        row("in-memory API Denoiser(x), 4096^2", f"{r['label']} ({r['backend']})", r["api_ms"], "ms",
            f"forward {r['forward_ms']:.1f} + H2D {r['h2d_ms']:.1f} + D2H {r['d2h_ms']:.1f} ms",
            f"{r['api_ms'] / base:.2f}x")
    par = load("parity")
    if par is not None:
        for name, v in par["rows"].items():
            row("output vs CPU fp32 reference (max abs diff / max abs ref)", name, v["max_rel_err"], "rel")
    text = "\n".join(rows) + "\n"
    (a.dir / "frame_suite.md").write_text(text)
    print(text)


def _topaz_seconds(report: dict[str, Any]) -> float | None:
    """Topaz's per-file work (start-up excluded), from benchmarks/topaz_denoise.py's JSON."""
    for key in ("files_s", "work_s", "per_file_total_s", "run_s"):
        if isinstance(report.get(key), (int, float)):
            return float(report[key])
    total, start = report.get("total_s"), report.get("startup_s")
    if isinstance(total, (int, float)) and isinstance(start, (int, float)):
        return float(total) - float(start)
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("inputs", "floors", "stages"):
        s = sub.add_parser(name)
        s.add_argument("dir", type=Path)
    sub.choices["inputs"].add_argument("--count", type=int, default=20)
    sub.choices["inputs"].add_argument("--size", type=int, default=4096)
    for name in ("startup", "api", "cpuref"):
        sub.add_parser(name).add_argument("file", type=Path)
    sub.add_parser("parity").add_argument("ref", type=Path)
    sub.choices["parity"].add_argument("dirs", type=Path, nargs="+")
    sub.choices["parity"].add_argument("--file", required=True)
    sub.add_parser("table").add_argument("dir", type=Path)
    for s in sub.choices.values():
        s.add_argument("--out", type=Path, default=Path("/tmp/out"))
        s.add_argument("--work", type=Path, default=Path("/tmp/frame_suite/work"))
        s.add_argument("--model", default="default")
        s.add_argument("--backend", default="torch")
        s.add_argument("--precision", default="fp32")
        s.add_argument("--graphs", action="store_true")
        s.add_argument("--label", default="fp32")
        s.add_argument("--device", default="cuda", help="cuda (cpu: a smoke test of the helpers)")
        s.add_argument("--repeats", type=int, default=10)
        s.add_argument("--out-dir", type=Path, default=Path("/tmp/frame_suite/cpuref"))
    a = ap.parse_args()
    globals()[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
