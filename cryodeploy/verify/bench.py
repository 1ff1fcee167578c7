"""Side-by-side speed of every available backend and precision on one device, in one run.

Each variant denoises the same ``[1, 1, size, size]`` batch; on CUDA the backend's
device-resident path (:meth:`Backend.run_device`) is timed with CUDA events, so host copies
are excluded (variants without one are timed through :meth:`Backend.run` and say so). The
memory-traffic floors come from the device-to-device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.backends import BenchVariant, availability, bench_variants, create_backend
from cryodeploy.backends.base import Backend, BackendOptions
from cryodeploy.errors import ConfigError, CryoDeployError
from cryodeploy.models.source import ModelSource

__all__ = [
    "VARIANTS",
    "BenchConfig",
    "BenchRow",
    "BenchVariant",
    "E2EReport",
    "E2ERow",
    "IdentityBackend",
    "device_label",
    "median_ms",
    "median_wall_ms",
    "mrc_floor",
    "raw_floor",
    "run_bench",
    "run_e2e",
    "startup_seconds",
]


#: Every variant the bench knows (each backend declares its own); unavailable ones are reported.
VARIANTS: tuple[BenchVariant, ...] = bench_variants()


@dataclass(frozen=True)
class BenchConfig:
    """What to measure: image ``size``, ``device``, ``backends`` filter (None = all), timing ``repeats``."""

    size: int = 4096
    device: str = "cuda"
    backends: tuple[str, ...] | None = None
    repeats: int = 20
    warmup: int = 3


@dataclass
class BenchRow:
    """One variant's result; ``ms`` is None when it could not run (``note`` says why)."""

    label: str
    backend: str
    precision: str
    ms: float | None
    ratio_vs_eager_fp32: float | None = None
    max_rel_err_vs_fp32: float | None = None
    timed: str = ""
    note: str = ""


@dataclass
class BenchReport:
    """All rows plus the device description and memory floors."""

    device: str
    size: int
    rows: list[BenchRow] = field(default_factory=list)
    copy_bandwidth_gbs: float | None = None
    floors_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def median_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3, cuda: bool = False) -> float:
    """Median time of ``fn`` in ms after ``warmup`` calls: CUDA events on a GPU, perf_counter on a CPU."""
    for _ in range(warmup):
        fn()
    times = []
    if cuda:
        import torch

        torch.cuda.synchronize()
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def median_wall_ms(fn: Callable[[], Any], repeats: int, warmup: int = 3, cuda: bool = False) -> float:
    """Median wall time of ``fn`` in ms, the GPU synchronized around each call (includes host work
    and work on other streams, e.g. ONNX Runtime's)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            import torch

            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(times))


def _floors(source: ModelSource, size: int, cuda: bool, device: str) -> tuple[float | None, dict[str, float]]:
    """Copy bandwidth and the unfused / fused memory-traffic floors for a stride-1 conv net."""
    if not cuda:
        return None, {}
    import torch

    n = 1 << 28  # 1 GiB of float32, far larger than L2
    buf = torch.empty(n, dtype=torch.float32, device=device)
    ms = median_ms(buf.clone, 10, 2, True)
    bw = 2 * n * 4 / (ms * 1e-3) / 1e9  # read + write, GB/s
    buf = torch.empty(0, device=device)
    floors: dict[str, float] = {}
    if source.spec.stride == 1:
        convs = [m for m in source.torch_module().modules() if isinstance(m, torch.nn.Conv2d)]
        px = size * size
        unfused_fp16 = sum((c.in_channels + c.out_channels) * 2 for c in convs) * px
        floors["unfused fp16 traffic"] = unfused_fp16 / (bw * 1e9) * 1e3
        floors["fused (fp32 in + out only)"] = 8 * px / (bw * 1e9) * 1e3
    return bw, floors


def run_bench(
    source: ModelSource, config: BenchConfig, progress: Callable[[str], None] | None = None
) -> BenchReport:
    """Measure every variant of :data:`VARIANTS` (filtered by ``config.backends``) on ``config.device``.

    ``progress`` gets one line before each variant and one with its result. Image models only."""
    if source.spec.ndim != 2:
        raise ConfigError(f"{source.path}: bench times images, but {source.spec.architecture} is a volume "
                          "model (tomograms: benchmarks/bench_volume.py)")
    cuda = config.device.startswith("cuda")
    rng = np.random.default_rng(0)
    host = rng.standard_normal((1, 1, config.size, config.size), dtype=np.float32)
    report = BenchReport(device=device_label(config.device), size=config.size)
    report.copy_bandwidth_gbs, report.floors_ms = _floors(source, config.size, cuda, config.device)
    reference: np.ndarray | None = None
    for v in VARIANTS:
        if config.backends is not None and v.backend not in config.backends:
            continue
        if progress:
            progress(f"timing {v.label} ...")
        opts = BackendOptions(device=config.device, precision=v.precision, extra=v.extra)
        try:
            ok, reason = availability(v.backend, opts)
        except CryoDeployError as err:
            ok, reason = False, str(err)
        if not ok:
            report.rows.append(BenchRow(v.label, v.backend, v.precision, None, note=reason))
            continue
        try:
            row, out = _measure(source, v, opts, host, config, cuda)
        except (CryoDeployError, RuntimeError, NotImplementedError, ValueError) as err:
            report.rows.append(BenchRow(v.label, v.backend, v.precision, None, note=f"failed: {err}"[:300]))
            continue
        if reference is None and v.backend == VARIANTS[0].backend and v.precision == "fp32" and not v.extra:
            reference = out
        if reference is not None:
            row.max_rel_err_vs_fp32 = float(
                np.abs(out - reference).max() / max(np.abs(reference).max(), 1e-12)
            )
        report.rows.append(row)
        if progress:
            progress(f"  {v.label}: {row.ms:.3f} ms")
    base = next((r.ms for r in report.rows if r.label == VARIANTS[0].label and r.ms), None)
    for r in report.rows:
        if base and r.ms:
            r.ratio_vs_eager_fp32 = base / r.ms
    return report


def _measure(
    source: ModelSource,
    v: BenchVariant,
    opts: BackendOptions,
    host: np.ndarray,
    config: BenchConfig,
    cuda: bool,
) -> tuple[BenchRow, np.ndarray]:
    with create_backend(v.backend, source, opts) as backend:
        if cuda:
            import torch

            x = torch.from_numpy(host).to(config.device)
            try:
                out = backend.run_device(x).float().cpu().numpy()
                fn: Callable[[], Any] = lambda: backend.run_device(x)  # noqa: E731
                timed = "device-resident (no host copies)"
            except NotImplementedError:
                out = backend.run(host)
                fn = lambda: backend.run(host)  # noqa: E731
                timed = "incl. host<->device copies"
        else:
            out = backend.run(host)
            fn = lambda: backend.run(host)  # noqa: E731
            timed = "host (CPU)"
        ms = median_ms(fn, config.repeats, config.warmup, cuda)
    return BenchRow(v.label, v.backend, v.precision, ms, timed=timed), out


def device_label(device: str) -> str:
    """How benchmark rows name a device: the GPU's name, or the CPU's architecture and threads."""
    if device.startswith("cuda"):
        import torch

        return str(torch.cuda.get_device_name(torch.device(device)))
    import os
    import platform

    return f"CPU {platform.machine()} ({os.cpu_count()} threads)"


class IdentityBackend(Backend):
    """Returns its input: the runner with no model; its wall time is the runner's own overhead."""

    name = "identity"

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return batch


@dataclass
class E2ERow:
    """End-to-end wall time of one variant over the files, and its ratio to the raw floor."""

    label: str
    seconds: float | None
    ratio_vs_raw_floor: float | None = None
    note: str = ""


@dataclass
class E2EReport:
    """Whole runs over the same files in one process: the floors, the runner overhead, each variant.

    ``raw_floor_s``: read every file's bytes and write as many bytes to a new file, nothing else (the
    faster of one file at a time and four at a time).
    ``mrc_floor_s``: mrcfile read + mrcfile write of every file. ``runner_overhead_s``: the runner
    with :class:`IdentityBackend` (reading, validation, normalization, tiling, atomic writes).
    ``startup_s``: a fresh ``cryodeploy denoise`` process from its start to its first output on disk
    (None when not measured).
    """

    files: int
    raw_floor_s: float
    mrc_floor_s: float
    runner_overhead_s: float
    startup_s: float | None = None
    rows: list[E2ERow] = field(default_factory=list)


def raw_floor(paths: list[Path], outdir: Path, fsync: bool = False, threads: int = 1) -> float:
    """Seconds to read each file's bytes and write the same number of bytes to a new file in ``outdir``;
    with ``fsync``, each new file is also fsynced (the durability every runner output gets); with
    ``threads`` > 1, that many files at a time (a runner reading and writing on several threads can
    beat the one-thread floor)."""
    from concurrent.futures import ThreadPoolExecutor

    outdir.mkdir(parents=True, exist_ok=True)

    def copy(item: tuple[int, Path]) -> None:
        i, p = item
        data = p.read_bytes()
        with open(outdir / f"{i:06d}.raw", "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(copy, enumerate(paths)))
    return time.perf_counter() - t0


def mrc_floor(paths: list[Path], outdir: Path) -> float:
    """Seconds to read each file with mrcfile and write its data with mrcfile to ``outdir``."""
    import warnings

    import mrcfile

    outdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, p in enumerate(paths):
            data = mrcfile.read(p)
            mrcfile.write(outdir / f"{i:06d}.mrc", data, overwrite=True)
    return time.perf_counter() - t0


def startup_seconds(
    first: Path, outdir: Path, model: str, device: str, args: tuple[str, ...] = (), timeout: float = 600.0
) -> float:
    """Seconds from starting ``cryodeploy denoise FIRST [ARGS]`` in a new process to its output on disk."""
    import subprocess
    import sys
    import tempfile

    out = outdir / first.name
    cmd = [sys.executable, "-m", "cryodeploy", "denoise", str(first), "-o", str(outdir), "--model", model,
           "--device", device, "-q", *args]
    with tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        try:
            while not out.exists():
                if proc.poll() is not None and not out.exists():
                    err.seek(0)
                    raise CryoDeployError(f"start-up run failed: {err.read().strip()[-300:]}")
                if time.perf_counter() - t0 > timeout:
                    proc.kill()
                    raise CryoDeployError(f"start-up run: no output after {timeout:.0f} s")
                time.sleep(0.002)
            return time.perf_counter() - t0
        finally:
            proc.wait(timeout)


def run_e2e(
    source: ModelSource, paths: list[Path], workdir: Path, config: BenchConfig, startup: bool = False
) -> E2EReport:
    """Denoise ``paths`` with every available variant through the runner, next to the floors
    (:class:`E2EReport`), all in this run on the same files. Each variant gets an untimed warm-up
    on the first file; ``startup`` also times a fresh process (:func:`startup_seconds`)."""
    from cryodeploy.inference.runner import RunConfig, denoise_files

    run_cfg = RunConfig(quiet=True, overwrite=True, shard=(0, 1))

    def timed(backend: Backend, name: str) -> float:
        denoise_files(paths[:1], workdir / f"{name}-warmup", backend, source.spec, run_cfg)
        summary = denoise_files(paths, workdir / name, backend, source.spec, run_cfg)
        if not summary.ok:
            raise CryoDeployError(f"{backend.label}: {summary.line()}")
        return float(summary.seconds)

    raw_floor(paths[:1], workdir / "raw-warmup")
    report = E2EReport(
        files=len(paths),
        raw_floor_s=min(raw_floor(paths, workdir / "raw"), raw_floor(paths, workdir / "raw4", threads=4)),
        mrc_floor_s=mrc_floor(paths, workdir / "mrc"),
        runner_overhead_s=timed(IdentityBackend(BackendOptions(device=config.device)), "overhead"),
    )
    if startup:
        report.startup_s = startup_seconds(paths[0], workdir / "startup", str(source.path), config.device)
    for i, v in enumerate(VARIANTS):
        if config.backends is not None and v.backend not in config.backends:
            continue
        opts = BackendOptions(device=config.device, precision=v.precision, extra=v.extra)
        try:
            ok, reason = availability(v.backend, opts)
            if not ok:
                report.rows.append(E2ERow(v.label, None, note=reason))
                continue
            with create_backend(v.backend, source, opts) as backend:
                seconds = timed(backend, f"variant{i}")
        except (CryoDeployError, RuntimeError, ValueError) as err:
            report.rows.append(E2ERow(v.label, None, note=f"failed: {err}"[:300]))
            continue
        report.rows.append(E2ERow(v.label, seconds, seconds / report.raw_floor_s))
    return report
