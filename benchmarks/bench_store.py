"""Patch store speed and memory: preprocess and loader throughput beside plain reads of the same bytes.

Creates its own micrographs in a temporary folder (``cryodeploy.imaging.synth`` clean images, or fast
smooth random ones with ``--inputs smooth``), then runs each phase in a fresh child process so
its peak RSS (VmHWM) is its own:

- plain sequential read of the input files (the baseline of preprocess), and read + write of
  as many bytes as the store holds (the I/O floor);
- ``preprocess`` (noise targets) into a store, MB/s of input;
- plain sequential read of the store's train files (8 MiB reads), and one shuffled
  epoch of :class:`~cryodeploy.training.loader.StreamingLoader`, patches/s;
- imports only (numpy, torch, cryodeploy), the RSS baseline; every phase imports the same.

Files are evicted from the page cache (fsync + POSIX_FADV_DONTNEED) before each phase unless
``--warm``, so both sides of a comparison start cold. Prints rows for docs/benchmarks.md::

    python benchmarks/bench_store.py --count 8 --size 2048 --patch 256
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

CHUNK = 8 << 20


def _hwm() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM"))


def _evict(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _read_all(paths: list[Path], block: int) -> int:
    buf, total = bytearray(block), 0
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                total += n
    return total


def _phase(name: str, a: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in this (child) process; return its numbers (imports are not timed)."""
    import torch  # every phase that needs it imports it before the clock starts

    from cryodeploy.training.loader import LoaderConfig, StreamingLoader
    from cryodeploy.training.preprocess import PreprocessConfig, preprocess
    from cryodeploy.training.store import PatchStore

    out: dict[str, Any] = {}
    if name == "loader" and torch.cuda.is_available():
        torch.empty(1, pin_memory=True)  # CUDA's start-up, which pinned buffers need, is not timed
    t0 = time.perf_counter()
    if name == "read_inputs":
        out["bytes"] = _read_all(a["inputs"], CHUNK)
    elif name == "io_floor":
        out["bytes"] = _read_all(a["inputs"], CHUNK)
        block = np.random.default_rng(0).bytes(CHUNK)
        with open(a["scratch"], "wb") as fh:
            for _ in range(a["store_bytes"] // CHUNK):
                fh.write(block)
            fh.write(block[: a["store_bytes"] % CHUNK])
            fh.flush()
            os.fsync(fh.fileno())
    elif name == "preprocess":
        pcfg = PreprocessConfig(patch=a["patch"], test_fraction=0.0, workers=a["workers"], overwrite=True)
        out["patches"] = preprocess(a["inputs"], a["store"], pcfg, quiet=True).count("train")
    elif name == "read_store":
        out["bytes"] = _read_all(a["store_files"], CHUNK)
    elif name == "loader":
        lcfg = LoaderConfig(a["batch"], seed=0, threads=a["threads"], drop_last=False)
        loader = StreamingLoader(PatchStore(a["store"]), "train", None, lcfg, pin_memory=True)
        out["patches"] = sum(x.shape[0] for x, _ in loader)
        out["memory_bytes"] = loader.memory_bytes
    out["seconds"] = time.perf_counter() - t0
    out["hwm"] = _hwm()
    return out


def _child(name: str, a: dict[str, Any], q: Any) -> None:
    q.put(_phase(name, a))


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
    return result


def best_of(
    names: tuple[str, ...], a: dict[str, Any], evict: list[Path], repeat: int
) -> list[dict[str, Any]]:
    """Run the phases ``names`` alternately ``repeat`` times; the fastest run of each."""
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    for _ in range(repeat):
        for n in names:
            runs[n].append(run_phase(n, a, evict))
    return [min(runs[n], key=lambda r: r["seconds"]) for n in names]


def make_inputs(d: Path, count: int, size: int, kind: str) -> list[Path]:
    """``count`` float32 micrographs of ``size``^2 pixels in ``d``."""
    from cryodeploy.io.mrc import write_micrograph

    if kind == "synth":
        from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

        synth_micrographs(d, SynthConfig(count, size=(size, size), seed=0))
        return sorted((d / "clean").glob("*.mrc"))
    rng = np.random.default_rng(0)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        coarse = rng.standard_normal((size // 32, size // 32)).astype(np.float32)
        img = np.kron(coarse, np.ones((32, 32), np.float32)) + 0.3 * rng.standard_normal(
            (size, size), np.float32
        )
        paths.append(write_micrograph(d / f"smooth_{i:04d}.mrc", img))
    return paths


def _device_label() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            model = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "CPU"
    return f"{model} ({os.cpu_count()} cores)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=8, help="micrographs")
    ap.add_argument("--size", type=int, default=2048, help="micrograph side in pixels")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="preprocess workers")
    ap.add_argument("--threads", type=int, default=2, help="loader reader threads")
    ap.add_argument("--inputs", choices=["synth", "smooth"], default=None, help="default: synth if available")
    ap.add_argument("--dir", type=Path, default=None, help="scratch folder (default: system temp)")
    ap.add_argument("--device", default=None, help="device label for the rows")
    ap.add_argument("--warm", action="store_true", help="do not evict files from the page cache")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each read and loader phase (best kept)")
    ap.add_argument("--repeat-preprocess", type=int, default=2, help="runs of read inputs / preprocess")
    args = ap.parse_args()

    try:
        import cryodeploy.imaging.synth  # noqa: F401

        kind = args.inputs or "synth"
    except ImportError:
        kind = args.inputs or "smooth"
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_store_", dir=args.dir))
    try:
        inputs = make_inputs(work / "mics", args.count, args.size, kind)
        rows = measure(args, work, inputs, kind)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| date | device | what | config | value | unit | baseline (same run) | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def measure(args: argparse.Namespace, work: Path, inputs: list[Path], kind: str) -> list[list[str]]:
    """All phases; the table rows."""
    cold = not args.warm
    in_bytes = sum(p.stat().st_size for p in inputs)
    store = work / "store"
    a = {
        "inputs": inputs,
        "patch": args.patch,
        "workers": args.workers,
        "store": store,
        "batch": args.batch,
        "threads": args.threads,
        "scratch": work / "scratch.bin",
    }
    # Each comparison runs its two sides alternately, --repeat times, best of each kept: the first
    # read of a new file can be slower than later ones (e.g. a VM host's cache), whatever side it is.
    read, pre = best_of(("read_inputs", "preprocess"), a, inputs if cold else [], args.repeat_preprocess)
    files = [store / "train_input.bin", store / "train_target.bin"]
    a.update(store_bytes=sum(f.stat().st_size for f in files), store_files=files)
    floor = best_of(("io_floor",), a, inputs if cold else [], args.repeat)[0]
    (work / "scratch.bin").unlink()
    read_store, load = best_of(("read_store", "loader"), a, files if cold else [], args.repeat)
    base = run_phase("imports", a, [])

    mb = 1e6
    date, dev = datetime.date.today().isoformat(), args.device or _device_label()
    cache = "warm cache" if args.warm else "cold cache"
    pre_cfg = (
        f"{args.count}x {args.size}² float32 MRC ({kind}, {in_bytes / mb:.0f} MB), patch {args.patch}, "
        f"noise targets, workers {args.workers}, {cache}"
    )
    pre_rate, read_rate = in_bytes / mb / pre["seconds"], in_bytes / mb / read["seconds"]
    floor_rate = in_bytes / mb / floor["seconds"]
    n = load["patches"]
    pair_bytes = 2 * args.patch**2 * 4
    load_cfg = (
        f"{n} patch pairs {args.patch}², batch {args.batch}, chunk 64, buffers 2, threads {args.threads}, "
        f"shuffled, {cache}"
    )
    load_rate = n / load["seconds"]
    seq_rate = read_store["bytes"] / pair_bytes / read_store["seconds"]
    one = args.size**2 * 4
    return [
        [
            date,
            dev,
            "preprocess throughput",
            pre_cfg,
            f"{pre_rate:.1f}",
            "MB/s of input",
            f"plain sequential read {read_rate:.1f} MB/s",
            f"{pre_rate / read_rate:.2f}×",
        ],
        [
            date,
            dev,
            "preprocess vs I/O floor",
            pre_cfg,
            f"{pre_rate:.1f}",
            "MB/s of input",
            f"read inputs + write {a['store_bytes'] / mb:.0f} MB: {floor_rate:.1f} MB/s",
            f"{pre_rate / floor_rate:.2f}×",
        ],
        [
            date,
            dev,
            "loader throughput",
            load_cfg,
            f"{load_rate:.0f}",
            "patch pairs/s",
            f"sequential read of the same bytes {seq_rate:.0f} pairs/s",
            f"{load_rate / seq_rate:.2f}×",
        ],
        [
            date,
            dev,
            "preprocess peak RSS",
            pre_cfg,
            f"{pre['hwm'] / mb:.0f}",
            "MB",
            f"imports only {base['hwm'] / mb:.0f} MB; one micrograph {one / mb:.1f} MB",
            f"+{(pre['hwm'] - base['hwm']) / one:.1f} micrographs",
        ],
        [
            date,
            dev,
            "loader peak RSS",
            load_cfg,
            f"{load['hwm'] / mb:.0f}",
            "MB",
            f"imports only {base['hwm'] / mb:.0f} MB; buffers x batch {load['memory_bytes'] / mb:.1f} MB",
            f"+{(load['hwm'] - base['hwm']) / load['memory_bytes']:.1f}× buffers",
        ],
    ]


if __name__ == "__main__":
    main()
