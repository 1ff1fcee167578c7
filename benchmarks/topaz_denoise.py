#!/usr/bin/env python3
"""Time Topaz-Denoise (the peer tool) on MRC micrographs: a measurement-only harness.

This script is for comparisons only. Topaz (``topaz-em``, GPLv3) is never a dependency of
cryodeploy: this file does not import cryodeploy, cryodeploy never imports this file or Topaz,
and no Topaz code or model is copied into the repository. Run it with the Python of a separate
environment where ``topaz-em`` and ``mrcfile`` are installed (e.g. ``/work/topaz-venv/bin/python``,
or ``PYTHONPATH=/tmp/topazsite python3`` on the GPU machine, see ``benchmarks/topaz_gpu_setup.sh``).

What it runs is Topaz's own code, called as ``topaz denoise`` / ``topaz denoise3d`` call it:

* 2-D (default): the model is loaded once with ``topaz.denoise.Denoise(name, use_cuda)``
  (which calls ``topaz.denoising.models.load_model``); each micrograph, and each frame of a
  stack, goes through ``topaz.denoise.denoise_image`` with the CLI's defaults (no lowpass, no
  pixel cutoff, no Gaussian or inverse-Gaussian filter, no deconvolution, ``normalize=False``,
  patch size 1024, padding 500). ``denoise_image`` standardizes the image, tiles it with
  ``Denoise.denoise``/``Denoise.denoise_patches`` when patch+padding is smaller than the image
  (each tile is standardized again inside ``Denoise._denoise``) and restores the mean and std.
  A 3-D MRC is denoised frame by frame, like ``topaz denoise --stack``.
* ``--volume``: ``topaz.denoise.Denoise3D(name, use_cuda, dims=3).denoise(volume, patch_size=96,
  padding=48, batch_size=1)``, the call ``topaz denoise3d`` makes (on one device: the CLI's
  default ``-d -2`` wraps the model in DataParallel over all GPUs).

Differences from the Topaz CLI, all outside the denoising itself: files are read and written with
mrcfile (float32 output, same file name in ``-o OUTDIR``, voxel size kept; Topaz's writer copies
the input header and extended header instead); integer MRC modes are converted to float32 first
(the Topaz CLI fails on them: float64 input to a float32 model); the model is chosen with
``--model`` (the 0.3.20 CLI ignores ``-m`` and loads ``--arch``, default unet).

Timings: start-up (interpreter, from the process start time in /proc; imports; model load)
separately from the per-file work (read, denoise, write) and the total wall time since the
process started. ``--in-memory-repeats N`` also times only the denoise call on the already
loaded array, N times after the timed file pass (which serves as warm-up), and reports the median.
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()

import argparse  # noqa: E402  (imports after the first clock reading on purpose)
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

MODELS_2D = ("unet", "unet-small", "fcnn", "affine", "unet-v0.2.1")
MODELS_3D = ("unet-3d", "unet-3d-10a", "unet-3d-20a")
# defaults of `topaz denoise` (-s/--patch-size, -p/--patch-padding) and `topaz denoise3d`
CLI_DEFAULTS_2D = (1024, 500)
CLI_DEFAULTS_3D = (96, 48)
MRC_SUFFIXES = (".mrc", ".mrcs", ".map", ".rec")


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc, 10 ms resolution), or None elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        start_ticks = int(fields[19])  # field 22 of stat(5): starttime, in clock ticks after boot
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


_AGE0 = _process_age_s()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Denoise MRC micrographs with Topaz-Denoise's pretrained models and time it "
        "(measurement only; run with the Topaz environment's python).",
    )
    p.add_argument("inputs", nargs="+", help="MRC files and/or folders (their *.mrc, *.mrcs files)")
    p.add_argument("-o", "--output", required=True, help="output folder (same file names as the inputs)")
    p.add_argument(
        "--model",
        default=None,
        help=f"pretrained model: {', '.join(MODELS_2D)}; with --volume: {', '.join(MODELS_3D)}; "
        "or a path to a saved Topaz model (default: unet, with --volume unet-3d-10a)",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--gpu", type=int, default=0, help="CUDA device index (default: 0)")
    p.add_argument(
        "-s",
        "--patch-size",
        type=int,
        default=None,
        help=f"tile size, not used if < 1 (Topaz CLI default: {CLI_DEFAULTS_2D[0]}, "
        f"3-D {CLI_DEFAULTS_3D[0]})",
    )
    p.add_argument(
        "-p",
        "--padding",
        type=int,
        default=None,
        help=f"padding around each tile (Topaz CLI default: {CLI_DEFAULTS_2D[1]}, 3-D {CLI_DEFAULTS_3D[1]})",
    )
    p.add_argument("--volume", action="store_true", help="3-D denoising of volumes (topaz denoise3d)")
    p.add_argument(
        "-j",
        "--num-threads",
        type=int,
        default=0,
        help="torch CPU threads as in Topaz: 0 torch's default, < 0 all cores (default: 0)",
    )
    p.add_argument(
        "--in-memory-repeats",
        type=int,
        default=0,
        metavar="N",
        help="also time only the denoise call on the loaded array N times (median)",
    )
    p.add_argument("--json", default=None, help="write the timings to this JSON file")
    p.add_argument("-q", "--quiet", action="store_true", help="no per-file lines on stderr")
    args = p.parse_args(argv)
    if args.model is None:
        args.model = "unet-3d-10a" if args.volume else "unet"
    if args.volume and args.model in MODELS_2D:
        p.error(f"--volume needs a 3-D model ({', '.join(MODELS_3D)}), not {args.model}")
    if not args.volume and args.model in MODELS_3D:
        p.error(f"{args.model} is a 3-D model: add --volume")
    ps, pad = CLI_DEFAULTS_3D if args.volume else CLI_DEFAULTS_2D
    args.patch_size = ps if args.patch_size is None else args.patch_size
    args.padding = pad if args.padding is None else args.padding
    if args.in_memory_repeats < 0:
        p.error("--in-memory-repeats must be >= 0")
    return args


def collect_inputs(items: list[str]) -> list[Path]:
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = (q for q in path.iterdir() if q.suffix.lower() in MRC_SUFFIXES and q.is_file())
            paths.extend(sorted(found))
        elif path.is_file():
            paths.append(path)
        else:
            raise SystemExit(f"error: no such file or folder: {item}")
    if not paths:
        raise SystemExit("error: no MRC files found")
    names = [q.name for q in paths]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SystemExit(f"error: several inputs share a file name, outputs would collide: {dup}")
    return paths


class Timer:
    """Wall-clock timer that synchronizes CUDA (when used) at both ends."""

    def __init__(self, sync: Any = None) -> None:
        self.sync = sync
        self.elapsed = 0.0

    def __enter__(self) -> Timer:
        if self.sync is not None:
            self.sync()
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.sync is not None:
            self.sync()
        self.elapsed = time.perf_counter() - self._t


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    inputs = collect_inputs(args.inputs)
    outdir = Path(args.output)
    outdir.mkdir(parents=True, exist_ok=True)
    for q in inputs:
        if (outdir / q.name).resolve() == q.resolve():
            raise SystemExit(f"error: output would overwrite the input {q}")

    # ---- start-up: imports ------------------------------------------------------------------
    t = time.perf_counter()
    import numpy as np
    import torch

    t_torch = time.perf_counter() - t
    t = time.perf_counter()
    import mrcfile

    t_mrcfile = time.perf_counter() - t
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pkg_resources deprecation from Topaz's model loader
        import topaz
        import topaz.cuda
        import topaz.torch
        from topaz.denoise import Denoise, Denoise3D, denoise_image
    t_topaz = time.perf_counter() - t

    # ---- start-up: device and model ---------------------------------------------------------
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch.cuda.is_available() is False")
    threads = topaz.torch.set_num_threads(args.num_threads)
    t = time.perf_counter()
    use_cuda = topaz.cuda.set_device(args.gpu, error=True) if device == "cuda" else False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Denoise3D(args.model, use_cuda, dims=3) if args.volume else Denoise(args.model, use_cuda)
    sync = torch.cuda.synchronize if use_cuda else None
    if sync is not None:
        sync()
    t_load = time.perf_counter() - t
    t_startup_end = time.perf_counter()

    def denoise_array(a: Any) -> Any:
        """Denoise one loaded array exactly as the Topaz CLI would (2-D image, stack, or volume)."""
        if args.volume:
            return model.denoise(
                a, patch_size=args.patch_size, padding=args.padding, batch_size=1, verbose=False
            )
        frames = [a] if a.ndim == 2 else list(a)
        out = [
            denoise_image(
                f,
                [model],
                lowpass=1,
                cutoff=0,
                gaus=None,
                inv_gaus=None,
                deconvolve=False,
                deconv_patch=1,
                patch_size=args.patch_size,
                padding=args.padding,
                normalize=False,
                use_cuda=use_cuda,
            )
            for f in frames
        ]
        return out[0] if a.ndim == 2 else np.stack(out)

    records: list[dict[str, Any]] = []
    for path in inputs:
        rec: dict[str, Any] = {"input": str(path)}
        with Timer() as tr, mrcfile.open(path, permissive=True) as m:
            data = np.asarray(m.data)
            voxel_size = m.voxel_size.copy()
            mode = int(m.header.mode)
            # native-endian float32: what Topaz's reader gives for float32 files; integer modes,
            # which the Topaz CLI cannot denoise, are converted
            a = np.ascontiguousarray(data, dtype=np.float32)
        if args.volume and a.ndim != 3:
            raise SystemExit(f"error: --volume needs 3-D MRC volumes, {path} has shape {a.shape}")
        if not args.volume and a.ndim not in (2, 3):
            raise SystemExit(f"error: {path}: expected a 2-D micrograph or a stack, got shape {a.shape}")
        with Timer(sync) as td:
            y = denoise_array(a)
        out_path = outdir / path.name
        with Timer() as tw, mrcfile.new(out_path, overwrite=True) as o:
            o.set_data(np.ascontiguousarray(y, dtype=np.float32))
            if args.volume:
                o.set_volume()
            elif y.ndim == 3:
                o.set_image_stack()
            o.voxel_size = voxel_size
        rec.update(
            output=str(out_path),
            shape=list(a.shape),
            input_mode=mode,
            kind="volume" if args.volume else ("stack" if a.ndim == 3 else "image"),
            read_s=tr.elapsed,
            denoise_s=td.elapsed,
            write_s=tw.elapsed,
            total_s=tr.elapsed + td.elapsed + tw.elapsed,
        )
        if args.in_memory_repeats > 0:
            times = []
            for _ in range(args.in_memory_repeats):
                with Timer(sync) as ti:
                    denoise_array(a)
                times.append(ti.elapsed)
            rec["in_memory"] = {
                "repeats": len(times),
                "median_s": statistics.median(times),
                "min_s": min(times),
                "max_s": max(times),
                "times_s": times,
                "note": "denoise call only, on the loaded float32 array, after the timed file pass",
            }
        records.append(rec)
        if not args.quiet:
            extra = f", in-memory median {rec['in_memory']['median_s']:.3f} s" if "in_memory" in rec else ""
            print(
                f"# {path.name} {tuple(a.shape)}: read {tr.elapsed:.3f} s, denoise {td.elapsed:.3f} s, "
                f"write {tw.elapsed:.3f} s{extra}",
                file=sys.stderr,
            )

    t_end = time.perf_counter()
    age0 = _AGE0 if _AGE0 is not None else 0.0
    startup = {
        "process_start_to_script_s": _AGE0,
        "other_s": 0.0,
        "import_torch_s": t_torch,
        "import_mrcfile_s": t_mrcfile,
        "import_topaz_s": t_topaz,
        "model_load_s": t_load,
        "total_s": age0 + (t_startup_end - _T0),
        "note": "total_s = interpreter start (from /proc, 10 ms resolution) + imports + device set-up "
        "+ model load (incl. .cuda())",
    }
    # stdlib imports, argument parsing, device selection
    startup["other_s"] = (t_startup_end - _T0) - t_torch - t_mrcfile - t_topaz - t_load
    report: dict[str, Any] = {
        "tool": "topaz-denoise (measurement only)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "topaz_version": topaz.__version__,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "device": device,
        "gpu_name": torch.cuda.get_device_name(args.gpu) if use_cuda else None,
        "torch_threads": torch.get_num_threads(),
        "num_threads_arg": threads,
        "model": args.model,
        "mode": "volume (denoise3d)" if args.volume else "2-D (denoise)",
        "patch_size": args.patch_size,
        "padding": args.padding,
        "startup": startup,
        "files": records,
        "per_file_total_s": sum(r["total_s"] for r in records),
        "wall_s": age0 + (t_end - _T0),
    }
    in_mem = sum(sum(r["in_memory"]["times_s"]) for r in records if "in_memory" in r)
    report["wall_without_in_memory_s"] = report["wall_s"] - in_mem
    print(
        f"# topaz {topaz.__version__} model={args.model} device={device} patch={args.patch_size} "
        f"padding={args.padding}: start-up {startup['total_s']:.2f} s (imports "
        f"{t_torch + t_mrcfile + t_topaz:.2f} s, model load {t_load:.2f} s), {len(records)} file(s) "
        f"{report['per_file_total_s']:.2f} s, wall {report['wall_without_in_memory_s']:.2f} s "
        f"(without the in-memory repeats)",
        file=sys.stderr,
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
