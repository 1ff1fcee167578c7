"""Preprocessing (the seeds' noise recipe) against the I/O floor: numpy's CPU sampler vs torch's on CUDA.

In one run, on the same inputs (``--count`` smooth random float32 micrographs of ``--size``² made in
``--dir``), each phase in a fresh process (imports and CUDA start-up are not timed; the CUDA start-up
is reported on its own), the page cache evicted before each phase unless ``--warm``, phases run
alternately ``--repeat`` times and the fastest run of each kept:

- I/O floor: read every input (8 MiB reads) + write as many bytes as the store holds (fsync'd);
- ``preprocess`` (noise targets, test fraction 0) with the numpy sampler and ``--workers`` threads;
- ``preprocess`` with the torch sampler on CUDA (``--workers`` threads writing), when there is a GPU
  (``--torch-device cpu`` runs it on the CPU, to check this script on a machine without one).

Each preprocess phase also reports where its time went: seconds per stage summed over the
threads (read, unit range, noise draw, statistics, patch writes, the final sync), by wrapping the
library's stage functions in the child process (a few hundred calls: no measurable cost).

Checks in the same run: every run of a sampler gives the same bytes (sha256 of the data files), and
the torch sampler's also with 1 worker (one extra run); each sampler's residual (input - target on
the [0, 1] scale) has the noise model's mean and variance (mean(clean) / dose + sigma^2) on the
first micrograph, within 5 standard errors.
Prints a markdown table (MB/s of input and the ratios to the floor) and writes
``bench_preprocess.json`` and ``bench_preprocess.md`` to ``--out`` (default ``$OUT``). Disk: the
inputs, one store (twice their size) and the floor's file of the store's size::

    PYTHONPATH=$PWD python3 benchmarks/bench_preprocess.py --count 32 --size 4096 --workers 16
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import CHUNK, _device_label, _evict, _hwm, _read_all, make_inputs

DATA_FILES = ("train_input.bin", "train_target.bin")


def _digest(store: Path) -> str:
    h = hashlib.sha256()
    for name in DATA_FILES:
        with open(store / name, "rb") as fh:
            while block := fh.read(CHUNK):
                h.update(block)
    return h.hexdigest()


def _noise_check(store: Path) -> dict[str, float]:
    """Residual mean and variance over the first micrograph's patches vs the noise model's."""
    from cryodeploy.training.store import PatchStore

    s = PatchStore(store)
    m = s.manifest
    src, noise = m["sources"][0], m["noise"]
    idx = range(src["start"], src["start"] + src["count"])
    tgt = s.read("train", idx, "target").astype(np.float64)
    residual = (s.read("train", idx) - tgt) * src["scale"]
    clean = tgt * src["scale"] + src["center"]
    var = float(clean.mean()) / src["dose"] + noise["sigma"] ** 2
    n = residual.size
    mean, variance = residual.mean(), residual.var()
    mean_se, var_se = np.sqrt(var / n), var * np.sqrt(2.5 / n)  # 2.5: 2 + a bound on the excess kurtosis
    return {"pixels": n, "mean": float(mean), "mean_se": float(mean_se), "variance": float(variance),
            "expected_variance": var, "variance_se": float(var_se),
            "within_5_se": bool(abs(mean) < 5 * mean_se and abs(variance - var) < 5 * var_se)}


#: (module, function, stage) timed in the preprocess phases.
STAGES = (
    ("cryodeploy.training.preprocess", "read_micrograph", "read"),
    ("cryodeploy.training.preprocess", "unit_range", "unit range (numpy)"),
    ("cryodeploy.training.preprocess", "add_noise", "noise draw (numpy, bands)"),
    ("cryodeploy.training.preprocess", "norm_stats", "statistics (numpy)"),
    ("cryodeploy.imaging.noise_torch", "noisy_frame", "torch frame (H2D, draws, statistics, D2H)"),
    ("cryodeploy.training.store", "StoreWriter.write_at", "patch writes"),
    ("cryodeploy.training.store", "StoreWriter.finish", "final sync + manifest"),
)


def _timed_stages() -> dict[str, float]:
    """Wrap the STAGES' functions so that each call adds its seconds to the returned dict."""
    import importlib
    import threading

    seconds: dict[str, float] = {}
    lock = threading.Lock()
    for module, name, stage in STAGES:
        owner: Any = importlib.import_module(module)
        *path, attr = name.split(".")
        for part in path:
            owner = getattr(owner, part)
        func = getattr(owner, attr)

        def timed(*args: Any, _f: Any = func, _stage: str = stage, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return _f(*args, **kw)
            finally:
                with lock:
                    seconds[_stage] = seconds.get(_stage, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)
    return seconds


def _phase(name: str, a: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in this (child) process; return its numbers."""
    import torch

    from cryodeploy.training.preprocess import PreprocessConfig, preprocess

    out: dict[str, Any] = {}
    stages = _timed_stages() if name != "floor" else None
    if name.startswith("torch") and a["torch_device"].startswith("cuda"):
        t = time.perf_counter()
        torch.zeros(1, device="cuda").add_(1).item()  # CUDA's context start-up, outside the clock
        out["cuda_startup_s"] = time.perf_counter() - t
    t0 = time.perf_counter()
    if name == "floor":
        out["bytes_read"] = _read_all(a["inputs"], CHUNK)
        block = np.random.default_rng(0).bytes(CHUNK)
        with open(a["scratch"], "wb") as fh:
            for _ in range(a["store_bytes"] // CHUNK):
                fh.write(block)
            fh.write(block[: a["store_bytes"] % CHUNK])
            fh.flush()
            os.fsync(fh.fileno())
    else:
        sampler = "numpy" if name == "numpy" else "torch"
        cfg = PreprocessConfig(patch=a["patch"], test_fraction=0.0, overwrite=True, sampler=sampler,
                               workers=1 if name == "torch_1worker" else a["workers"],
                               device="cpu" if sampler == "numpy" else a["torch_device"])
        out["patches"] = preprocess(a["inputs"], a["store"], cfg, quiet=True).count("train")
    out["seconds"] = time.perf_counter() - t0
    if stages is not None:
        out["stage_seconds"] = dict(stages)
    out["hwm"] = _hwm()
    if name != "floor":
        store = a["store"]
        out["sha256"] = _digest(store)
        out["store_bytes"] = sum((store / n).stat().st_size for n in DATA_FILES)
        out["sampler"] = json.loads((store / "manifest.json").read_text())["sampler"]
        out["noise_check"] = _noise_check(store)
    return out


def _child(name: str, a: dict[str, Any], q: Any) -> None:
    try:
        q.put(_phase(name, a))
    except BaseException as err:
        q.put({"error": f"{type(err).__name__}: {err}"})
        raise


def run_phase(name: str, a: dict[str, Any], evict: list[Path]) -> dict[str, Any]:
    """Run ``name`` in a fresh process after evicting ``evict`` from the page cache."""
    if evict:
        _evict(evict)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_child, args=(name, a, q))
    proc.start()
    while True:
        try:
            result: dict[str, Any] = q.get(timeout=1.0)
            break
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"phase {name} died (exit code {proc.exitcode})") from None
    proc.join()
    if "error" in result:
        raise RuntimeError(f"phase {name}: {result['error']}")
    return result


def measure(args: argparse.Namespace, work: Path, inputs: list[Path]) -> dict[str, Any]:
    """All phases: {phase: [runs]}, plus the facts of the run."""
    import torch

    has_cuda = torch.cuda.is_available()
    use_torch = has_cuda or not args.torch_device.startswith("cuda")
    in_bytes = sum(p.stat().st_size for p in inputs)
    side = args.size // args.patch * args.patch
    store_bytes = 2 * len(inputs) * side * side * 4  # input + target patches (test fraction 0)
    names = ["floor", "numpy", *(["torch"] if use_torch else [])]
    a = {"inputs": inputs, "patch": args.patch, "workers": args.workers, "scratch": work / "scratch.bin",
         "store_bytes": store_bytes, "torch_device": args.torch_device, "store": work / "store"}
    evict = [] if args.warm else inputs
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for _ in range(args.repeat):
        for n in names:
            runs[n].append(run_phase(n, a, evict))
            (work / "scratch.bin").unlink(missing_ok=True)  # one store and at most one floor file on disk
            print(f"  {n}: {runs[n][-1]['seconds']:.2f} s", flush=True)
    if use_torch:
        runs["torch_1worker"] = [run_phase("torch_1worker", a, evict)]
        print(f"  torch_1worker: {runs['torch_1worker'][0]['seconds']:.2f} s", flush=True)
    return {"runs": runs, "input_bytes": in_bytes, "store_bytes": store_bytes, "use_torch": use_torch,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if has_cuda else None}


def report(args: argparse.Namespace, facts: dict[str, Any]) -> tuple[dict[str, Any], list[list[str]]]:
    """The summary and the markdown rows."""
    runs, mb = facts["runs"], 1e6
    best = {n: min(r, key=lambda x: x["seconds"]) for n, r in runs.items()}
    rate = {n: facts["input_bytes"] / mb / b["seconds"] for n, b in best.items()}
    date = datetime.date.today().isoformat()
    dev = args.device or _device_label() + (f" + {facts['gpu']}" if facts["gpu"] else "")
    cache = "warm cache" if args.warm else "cold cache"
    cfg = (f"{args.count}x {args.size}² float32 MRC (smooth, {facts['input_bytes'] / mb:.0f} MB), "
           f"patch {args.patch}, noise targets, store {facts['store_bytes'] / mb:.0f} MB, {cache}, "
           f"best of {args.repeat}")
    floor = f"read inputs + write {facts['store_bytes'] / mb:.0f} MB: {rate['floor']:.1f} MB/s"
    rows = [[date, dev, "I/O floor", cfg, f"{rate['floor']:.1f}", "MB/s of input", "-", "1.00×"]]
    rows.append([date, dev, "preprocess, numpy sampler (CPU)", f"{cfg}, workers {args.workers}",
                 f"{rate['numpy']:.1f}", "MB/s of input", floor, f"{rate['numpy'] / rate['floor']:.2f}×"])
    summary: dict[str, Any] = {
        "date": date, "device": dev, "config": cfg, "workers": args.workers, "torch": facts["torch"],
        "python": platform.python_version(), "mb_per_s": rate,
        "seconds": {n: b["seconds"] for n, b in best.items()},
        "ratio_to_floor": {n: r / rate["floor"] for n, r in rate.items()},
        "peak_rss_mb": {n: b["hwm"] / mb for n, b in best.items()},
        "noise_check": {n: b["noise_check"] for n, b in best.items() if "noise_check" in b},
        "samplers": {n: b["sampler"] for n, b in best.items() if "sampler" in b},
        "stage_seconds": {n: b["stage_seconds"] for n, b in best.items() if "stage_seconds" in b},
    }
    summary["numpy_same_bytes_all_runs"] = len({r["sha256"] for r in runs["numpy"]}) == 1
    summary["floor_wrote_the_store_bytes_all_runs"] = all(
        r["store_bytes"] == facts["store_bytes"] for n, rs in runs.items() if n != "floor" for r in rs)
    if facts["use_torch"]:
        digests = {r["sha256"] for r in runs["torch"] + runs["torch_1worker"]}
        summary["torch_same_bytes_all_runs_and_1_worker"] = len(digests) == 1
        startup = [r["cuda_startup_s"] for r in runs["torch"] if "cuda_startup_s" in r]
        if startup:
            summary["cuda_startup_s"] = min(startup)
        what = f"preprocess, torch sampler ({args.torch_device})"
        ratio, vs_numpy = rate["torch"] / rate["floor"], rate["torch"] / rate["numpy"]
        rows.append([date, dev, what, f"{cfg}, workers {args.workers} (writing)", f"{rate['torch']:.1f}",
                     "MB/s of input", floor, f"{ratio:.2f}×"])
        rows.append([date, dev, f"{what} vs numpy sampler", cfg, f"{rate['torch']:.1f}", "MB/s of input",
                     f"numpy sampler {rate['numpy']:.1f} MB/s", f"{vs_numpy:.2f}×"])
    summary["runs"] = runs
    return summary, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8, help="micrographs")
    ap.add_argument("--size", type=int, default=2048, help="micrograph side in pixels")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="preprocess workers")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: system temp)")
    ap.add_argument("--out", type=Path, default=os.environ.get("OUT"), help="results folder (default: $OUT)")
    ap.add_argument("--device", default=None, help="device label for the rows")
    ap.add_argument("--warm", action="store_true", help="do not evict the inputs from the page cache")
    ap.add_argument("--repeat", type=int, default=2, help="runs of each phase (best kept)")
    ap.add_argument("--torch-device", default="cuda",
                    help="device of the torch sampler's phases (cpu: check this script without a GPU)")
    args = ap.parse_args()

    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_", dir=args.dir))
    try:
        t = time.perf_counter()
        inputs = make_inputs(work / "mics", args.count, args.size, "smooth")
        print(f"made {len(inputs)} inputs in {time.perf_counter() - t:.1f} s", flush=True)
        summary, rows = report(args, measure(args, work, inputs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = ["| date | device | what | config | value | unit | baseline (same run) | ratio |",
             "|---|---|---|---|---|---|---|---|", *("| " + " | ".join(row) + " |" for row in rows)]
    checks = {k: v for k, v in summary.items() if k.endswith(("_all_runs", "_1_worker", "startup_s"))}
    lines += ["", f"checks: {json.dumps(checks)}", f"noise check: {json.dumps(summary['noise_check'])}",
              f"peak RSS MB: {json.dumps(summary['peak_rss_mb'])}"]
    for phase, stages in summary["stage_seconds"].items():
        total = summary["seconds"][phase]
        lines.append(f"stages of {phase} ({total:.2f} s wall; seconds summed over threads): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    lines.append(f"bench wall time {time.perf_counter() - start:.0f} s")
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_preprocess.json").write_text(json.dumps(summary, indent=2) + "\n")
        (args.out / "bench_preprocess.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
