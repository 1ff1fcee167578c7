#!/usr/bin/env python3
"""Tomogram denoising quality against exact clean volumes: identity, the best 3-D Gaussian, volume
models and Topaz-Denoise's pretrained 3-D U-Nets, on held-out synthetic tomograms. Trains nothing.

Run (GPU machine; mrcfile/starfile carried in /tmp/site, Topaz in /tmp/topazsite by
``benchmarks/topaz_gpu_setup.sh``)::

    PYTHONPATH=$PWD:/tmp/site python3 benchmarks/bench_quality3d.py --device cuda --model CKPT \
        --topaz-python "env PYTHONPATH=/tmp/topazsite:/tmp/site python3" --out $OUT/quality3d

CPU smoke run (tiny tomograms): ``python3 benchmarks/bench_quality3d.py --quick --out /tmp/q3``.

Data: ``--count`` tomograms per (voxel size, dose) from :func:`cryodeploy.imaging.tomosynth.synth_tomograms`
(seed ``--seed``, held out from any training seed; particles, membranes, ice slab, missing wedge
+-60 deg, CTF per tilt, Poisson noise at ``dose`` counts per ice voxel in each half): the exact
clean volume and independent even and odd halves, written as MRC volumes.

Scores, per tomogram then averaged: PSNR of f(even) against the clean volume (data range max - min of
the clean volume); split error E of f(even), f(odd) on the halves
(:func:`cryodeploy.imaging.volsplits.volume_split_error`) and the split gain -10 log10 of its mean
(identity 0 dB; the mean of E, not of the gains, because E of a small volume can be <= 0); FSC 0.143
of f(even) and f(odd) in A. Methods: identity; the 3-D Gaussian with sigma chosen by split gain (no
clean volume needed: the lowest mean E) and, as an oracle, by mean PSNR against the clean volumes;
each ``--model`` through :class:`cryodeploy.Denoiser`; with ``--topaz-python``, Topaz's
``unet-3d-10a`` and ``unet-3d-20a`` (topaz-em 0.3.20, ``Denoise3D(name).denoise(volume,
patch_size=96, padding=48)`` as ``topaz denoise3d`` calls it, and on the whole volume, patch size 0;
``--quick``: the whole volume only) run by ``benchmarks/topaz_denoise.py --volume`` in that
environment.
Writes ``quality3d.json`` and ``quality3d.md`` to ``--out`` (default ``$OUT``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

TEST_SEED = 20261201
SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0)
TOPAZ_MODELS = ("unet-3d-10a", "unet-3d-20a")
FULL = {"shape": (96, 192, 192), "count": 2, "doses": (10.0, 40.0, 160.0), "voxel_sizes": (10.0, 20.0),
        "topaz_patch": ((96, 48), (0, 0))}
#: Topaz tiles (size, padding): the denoise3d CLI's 96^3 tiles, each padded to 192^3, and the whole volume
#: (size 0); quick: the whole volume only (a padded tile takes ~100 s on 2 CPU cores)
QUICK = {"shape": (32, 64, 64), "count": 1, "doses": (40.0,), "voxel_sizes": (10.0,),
         "topaz_patch": ((0, 0),)}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", default=[], metavar="[NAME=]CKPT",
                   help="a volume model (checkpoint, run folder, .onnx); repeatable; none: baselines only")
    p.add_argument("--quick", action="store_true", help=f"tiny sizes for a CPU run: {QUICK}")
    p.add_argument("--shape", default=None, help=f"D,H,W of each tomogram (default {FULL['shape']})")
    p.add_argument("--count", type=int, default=None, help=f"tomograms per dataset (default {FULL['count']})")
    p.add_argument("--doses", default=None, help=f"counts per ice voxel per half (default {FULL['doses']})")
    p.add_argument("--voxel-sizes", default=None, help=f"A per voxel (default {FULL['voxel_sizes']})")
    p.add_argument("--seed", type=int, default=TEST_SEED, help="simulation seed (held out)")
    p.add_argument("--device", default="cpu", help="torch device for the simulation and the models")
    p.add_argument("--topaz-python", default=None,
                   help="command running the Topaz environment's python (no Topaz rows without it)")
    p.add_argument("--topaz-models", default=",".join(TOPAZ_MODELS), help="Topaz 3-D models to run")
    p.add_argument("--topaz-patch", default=None, metavar="SIZE,PADDING",
                   help="Topaz tiles, ';'-separated SIZE,PADDING runs (SIZE 0: the whole volume; default "
                   "96,48;0,0, the denoise3d CLI's and the whole volume; quick: 0,0)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench_quality3d"), help="scratch (volumes)")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if "OUT" in os.environ else None)
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    args.shape = tuple(int(v) for v in args.shape.split(",")) if args.shape else base["shape"]
    args.count = args.count or base["count"]
    args.doses = _floats(args.doses) if args.doses else base["doses"]
    args.voxel_sizes = _floats(args.voxel_sizes) if args.voxel_sizes else base["voxel_sizes"]
    patches = args.topaz_patch.split(";") if args.topaz_patch else None
    args.topaz_patch = tuple(tuple(int(v) for v in t.split(",")) for t in patches if t) if patches \
        else base["topaz_patch"]
    if args.out is None:
        p.error("--out is required when $OUT is not set")
    if len(args.shape) != 3:
        p.error(f"--shape {args.shape}: expected D,H,W")
    return args


def simulate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One dataset per (voxel size, dose): folders of clean/even/odd MRC volumes."""
    from cryodeploy.imaging.simulate.tomoscene import TomoConfig
    from cryodeploy.imaging.tomosynth import synth_tomograms

    sets = []
    for vs in args.voxel_sizes:
        for dose in args.doses:
            folder = args.workdir / f"v{vs:g}_d{dose:g}"
            cfg = TomoConfig(shape=args.shape, voxel_size=vs, seed=args.seed, dose=dose)
            t0 = time.perf_counter()
            evens = synth_tomograms(folder, cfg, args.count, device=args.device, overwrite=True)
            print(f"# simulated {folder.name}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
            sets.append({"key": folder.name, "voxel_size": vs, "dose": dose, "folder": folder,
                         "names": [p.stem for p in evens], "simulate_s": time.perf_counter() - t0})
    return sets


def _load(folder: Path, sub: str, name: str) -> np.ndarray:
    from cryodeploy.io.volumes import read_volume

    return read_volume(folder / sub / f"{name}.mrc").data


def score(fe: np.ndarray, fo: np.ndarray, even: np.ndarray, odd: np.ndarray, clean: np.ndarray, vs: float,
          with_fsc: bool = True) -> dict[str, Any]:
    """PSNR of f(even) vs clean, split gain of f(even), f(odd), FSC 0.143 of f(even) and f(odd) (A)."""
    from cryodeploy.imaging.metrics import psnr
    from cryodeploy.imaging.volsplits import fsc, volume_split_error

    flat = float(np.ptp(fe)) == 0.0
    return {"psnr_db": psnr(fe, clean), "split_error": volume_split_error(fe, fo, even, odd),
            "fsc_0.143_a": None if flat or not with_fsc else fsc(fe, fo, vs).resolution(0.143)}


def _gain(error: float | None) -> float | None:
    """-10 log10(E), 0 for identity; None where E <= 0 (better than the estimate resolves)."""
    return None if error is None or error <= 0 else float(-10.0 * np.log10(error)) + 0.0


def _row(method: str, per: list[dict[str, Any]], seconds: float, **extra: Any) -> dict[str, Any]:
    def mean(k: str) -> float | None:
        vals = [r[k] for r in per if r[k] is not None and np.isfinite(r[k])]
        return float(np.mean(vals)) if vals else None

    err = mean("split_error")
    return {"method": method, "psnr_db": mean("psnr_db"), "split_error": err, "split_gain_db": _gain(err),
            "fsc_0.143_a": mean("fsc_0.143_a"), "seconds": seconds, **extra, "per_tomogram": per}


def baselines(ds: dict[str, Any]) -> list[dict[str, Any]]:
    """Identity, the constant (each half's mean) and the Gaussian rows (sigma by split gain; oracle
    sigma by PSNR vs clean). A method near the constant has removed the noise and the signal alike."""
    from cryodeploy.imaging.metrics import gaussian_filter

    vs = ds["voxel_size"]
    ident, const, by_sigma = [], [], {s: [] for s in SIGMAS}
    for n in ds["names"]:  # the sweep: PSNR and split gain of every sigma (FSC only for the chosen)
        even, odd, clean = (_load(ds["folder"], sub, n) for sub in ("even", "odd", "clean"))
        ident.append({"name": n, **score(even, odd, even, odd, clean, vs)})
        ce, co = (np.full(h.shape, np.mean(h, dtype=np.float64), np.float32) for h in (even, odd))
        const.append({"name": n, **score(ce, co, even, odd, clean, vs)})
        for s in SIGMAS:
            rec = score(gaussian_filter(even, s), gaussian_filter(odd, s), even, odd, clean, vs, False)
            by_sigma[s].append(rec)
    rows = [_row("identity", ident, 0.0), _row("constant (the half's mean)", const, 0.0)]
    for label, key in (
        ("gaussian (sigma by split gain)", "split_error"),
        ("gaussian (oracle sigma by PSNR)", "psnr_db"),
    ):
        sign = -1.0 if key == "split_error" else 1.0
        best = max(SIGMAS, key=lambda s: sign * float(np.mean([r[key] for r in by_sigma[s]])))
        per, seconds = [], 0.0
        for n in ds["names"]:
            even, odd, clean = (_load(ds["folder"], sub, n) for sub in ("even", "odd", "clean"))
            t0 = time.perf_counter()
            fe, fo = gaussian_filter(even, best), gaussian_filter(odd, best)
            seconds += time.perf_counter() - t0
            per.append({"name": n, **score(fe, fo, even, odd, clean, vs)})
        rows.append(_row(label, per, seconds, sigma=best))
    return rows


def run_models(
    ds: dict[str, Any], models: list[tuple[str, Callable[[np.ndarray], np.ndarray]]]
) -> list[dict[str, Any]]:
    rows = []
    for label, run in models:
        per, seconds = [], 0.0
        for n in ds["names"]:
            even, odd, clean = (_load(ds["folder"], sub, n) for sub in ("even", "odd", "clean"))
            t0 = time.perf_counter()
            fe, fo = run(even), run(odd)
            seconds += time.perf_counter() - t0
            per.append({"name": n, **score(fe, fo, even, odd, clean, ds["voxel_size"])})
        rows.append(_row(label, per, seconds))
    return rows


def run_topaz(
    args: argparse.Namespace, sets: list[dict[str, Any]], model: str, patch: tuple[int, int]
) -> dict[str, Any]:
    """Topaz ``model`` with ``patch`` (size, padding) on every even and odd half of every dataset, in
    one subprocess: where the outputs are, and the denoise seconds per file."""
    src, dst = args.workdir / "topaz_in", args.workdir / f"topaz_{model}_{patch[0]}_{patch[1]}"
    for d in (src, dst):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for ds in sets:
        for n in ds["names"]:
            for half in ("even", "odd"):
                (src / f"{ds['key']}_{half}_{n}.mrc").symlink_to((ds["folder"] / half / f"{n}.mrc").resolve())
    report = dst / "topaz.json"
    script = Path(__file__).with_name("topaz_denoise.py")
    device = "cuda" if args.device.startswith("cuda") else "cpu"
    argv = [*shlex.split(args.topaz_python), str(script), str(src), "-o", str(dst / "out"), "--volume",
            "--model", model, "-q", "--json", str(report), "--device", device, "-s", str(patch[0]),
            "-p", str(patch[1])]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    print(f"# topaz {model} patch {patch}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    rec = json.loads(report.read_text())
    return {"out": dst / "out", "topaz_version": rec["topaz_version"],
            "seconds": {Path(f["input"]).name: f["denoise_s"] for f in rec["files"]}}


def topaz_rows(ds: dict[str, Any], label: str, run: dict[str, Any]) -> list[dict[str, Any]]:
    if "error" in run:
        return [{"method": label, "error": run["error"]}]
    from cryodeploy.io.volumes import read_volume

    per, seconds = [], 0.0
    for n in ds["names"]:
        even, odd, clean = (_load(ds["folder"], sub, n) for sub in ("even", "odd", "clean"))
        files = [f"{ds['key']}_{half}_{n}.mrc" for half in ("even", "odd")]
        fe, fo = (read_volume(run["out"] / f).data for f in files)
        seconds += sum(run["seconds"][f] for f in files)
        per.append({"name": n, **score(fe, fo, even, odd, clean, ds["voxel_size"])})
    return [_row(label, per, seconds, topaz_version=run["topaz_version"])]


def _models(args: argparse.Namespace) -> list[tuple[str, Any]]:
    from cryodeploy.inference.denoiser import Denoiser

    out = []
    for item in args.model:
        name, sep, path = item.partition("=")
        name, path = (name, path) if sep else ("model", item)
        d = Denoiser.load(path, device=args.device)
        if d.spec.ndim != 3:
            raise SystemExit(f"error: {path}: a 2-D model ({d.spec.architecture}), expected a volume model")
        out.append((f"{name} ({d.spec.architecture}, {d.backend.label})", d))
    return out


def _fmt(v: Any, f: str = "{:.2f}") -> str:
    return "n/a" if v is None else f.format(v)


def markdown(report: dict[str, Any]) -> str:
    c = report["config"]
    lines = [
        f"# Tomogram denoising quality ({report['date']}, {report['device']})", "",
        f"{c['count']} held-out synthetic tomograms of {'x'.join(map(str, c['shape']))} voxels per dataset "
        f"(seed {c['seed']}); PSNR of f(even) vs the exact clean volume; split gain of f(even), f(odd) "
        "on the even/odd halves (identity 0 dB); FSC 0.143 between f(even) and f(odd).", ""]
    for ds in report["datasets"]:
        lines += [
            f"## {ds['voxel_size']:g} A/voxel, dose {ds['dose']:g} counts/voxel per half", "",
            "| method | PSNR vs clean (dB) | split gain (dB) | FSC 0.143 (A) | sigma (voxels) | seconds |",
            "|---|---:|---:|---:|---:|---:|"]
        for r in ds["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | error: {r['error']} | | | | |")
                continue
            lines.append(f"| {r['method']} | {_fmt(r['psnr_db'])} | {_fmt(r['split_gain_db'])} | "
                         f"{_fmt(r['fsc_0.143_a'], '{:.1f}')} | {_fmt(r.get('sigma'), '{:g}')} | "
                         f"{r['seconds']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def _clean(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    return str(obj) if isinstance(obj, Path) else obj


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    args.workdir.mkdir(parents=True, exist_ok=True)
    models = _models(args)
    sets = simulate(args)
    topaz = {}
    for m in args.topaz_models.split(",") if args.topaz_python else []:
        for p in args.topaz_patch:
            tiles = f"patch {p[0]}, padding {p[1]}" if p[0] > 0 else "whole volume"
            topaz[f"topaz {m} ({tiles})"] = run_topaz(args, sets, m, p)
    datasets = []
    for ds in sets:
        rows = baselines(ds) + run_models(ds, models)
        for m, run in topaz.items():
            rows += topaz_rows(ds, m, run)
        keep = ("key", "voxel_size", "dose", "names", "simulate_s")
        datasets.append({k: ds[k] for k in keep} | {"rows": rows})
    for _, d in models:
        d.close()
    cuda = args.device.startswith("cuda")
    report = _clean({
        "benchmark": "bench_quality3d",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(torch.device(args.device)) if cuda
        else platform.processor() or "cpu",
        "torch": torch.__version__, "python": platform.python_version(),
        "config": {"shape": list(args.shape), "count": args.count, "doses": list(args.doses),
                   "voxel_sizes": list(args.voxel_sizes), "seed": args.seed, "sigmas": list(SIGMAS),
                   "models": args.model, "topaz_models": list(topaz),
                   "topaz_patch": [list(p) for p in args.topaz_patch], "quick": args.quick},
        "topaz": {m: {k: v for k, v in r.items() if k != "seconds"} for m, r in topaz.items()},
        "datasets": datasets})
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality3d.json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report)
    (args.out / "quality3d.md").write_text(text + "\n")
    print(text)
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
