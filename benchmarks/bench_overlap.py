"""Does the file runner overlap its stages? The same files, in one run: the raw floor (bytes in, as many
out) with and without an fsync per file, the runner one file at a time (nothing of two files
overlaps) and the runner over all files, with its per-stage busy seconds (summed over threads).

The default backend ``sleep`` stands for a GPU forward on a machine without one: it copies the batch
and sleeps ``--forward-ms`` per batch with the GIL released, as a CUDA forward waits on the device.

    PYTHONPATH=$PWD python3 benchmarks/bench_overlap.py --files 12 --size 2048 --tile 2048 --forward-ms 20
    PYTHONPATH=$PWD python3 benchmarks/bench_overlap.py --backend torch --device cuda --model default \
        --files 20 --size 4096 --frame-path device      # on the GPU machine

Prints one JSON object and writes it to ``$OUT/<label>.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.backends import Backend, BackendOptions, create_backend
from cryodeploy.inference.runner import RunConfig, denoise_files
from cryodeploy.io.mrc import read_header, write_micrograph
from cryodeploy.models import ModelSpec
from cryodeploy.verify.bench import raw_floor


class SleepBackend(Backend):
    """A copy of the batch after ``ms`` of sleep (GIL released), on the host and device paths."""

    name = "sleep"

    def __init__(self, options: BackendOptions, ms: float) -> None:
        super().__init__(options)
        self.seconds = ms / 1e3

    def _run(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        return batch.copy()

    def run_device(self, x: Any) -> Any:
        time.sleep(self.seconds)
        return x.clone()


def inputs(folder: Path, n: int, size: int) -> list[Path]:
    """``n`` float32 ``size``^2 micrographs, reused when present."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = [folder / f"mic_{i:04d}.mrc" for i in range(n)]
    for p in paths:
        if not (p.is_file() and read_header(p).shape == (size, size)):
            write_micrograph(p, (rng.standard_normal((size, size), dtype=np.float32) * 70 + 5600))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=12)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_overlap"))
    ap.add_argument("--inputs", type=Path, help="a folder of .mrc inputs to use instead of new ones")
    ap.add_argument("--label", default="overlap", help="the JSON is $OUT/<label>.json")
    ap.add_argument("--backend", default="sleep", help="sleep, or a registered backend (torch, ort, ...)")
    ap.add_argument("--forward-ms", type=float, default=60.0, help="sleep backend: ms per batch")
    ap.add_argument("--model", default="default", help="real backends: the model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--frame-path", default="auto", choices=("auto", "host", "device"))
    ap.add_argument("--io-threads", type=int, default=2)
    ap.add_argument("--tile", default="auto", help="auto or pixels (the size: one batch per file)")
    ap.add_argument("--batch", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch: torch.compile")
    ap.add_argument("--cuda-graphs", action="store_true", help="torch: CUDA graphs")
    a = ap.parse_args()

    folder = a.work / f"in{a.files}_{a.size}"
    paths = sorted(a.inputs.glob("*.mrc")) if a.inputs else inputs(folder, a.files, a.size)
    extra = tuple((k, True) for k, on in (("compile", a.compile), ("cuda_graphs", a.cuda_graphs)) if on)
    opts = BackendOptions(device=a.device, precision=a.precision, extra=extra)
    if a.backend == "sleep":
        backend: Backend = SleepBackend(opts, a.forward_ms)
        spec = ModelSpec("cnn3")
    else:
        from cryodeploy.backends.sources import load_source

        source = load_source(a.model)
        backend, spec = create_backend(a.backend, source, opts), source.spec
    geometry = {k: v if v == "auto" else int(v) for k, v in (("tile", a.tile), ("batch", a.batch))}
    cfg = RunConfig(quiet=True, overwrite=True, shard=(0, 1), frame_path=a.frame_path,
                    io_threads=a.io_threads, **geometry)
    res: dict[str, Any] = {"label": a.label, "files": len(paths), "backend": backend.label,
                           "bytes": sum(p.stat().st_size for p in paths), "io_threads": a.io_threads}
    if a.backend == "sleep":
        res["forward_ms"] = a.forward_ms
    with backend:
        denoise_files(paths[:1], a.work / "warm", backend, spec, cfg)  # start-up out of the timings
        raw_floor(paths, a.work / "raw")  # page cache warm
        res["raw_floor_s"] = raw_floor(paths, a.work / "raw")
        res["raw_floor_fsync_s"] = raw_floor(paths, a.work / "raw", fsync=True)
        t0 = time.perf_counter()
        for p in paths:  # one file per run: read, compute, write and fsync of two files never overlap
            assert denoise_files([p], a.work / "serial", backend, spec, cfg).ok
        res["one_file_at_a_time_s"] = time.perf_counter() - t0
        s = denoise_files(paths, a.work / "run", backend, spec, cfg)
        assert s.ok, s.line()
    res["run_s"] = s.seconds
    stages = getattr(s, "stage_seconds", None) or {}  # older runners do not report stages
    res["stage_busy_s"] = {k: round(v, 3) for k, v in stages.items()}
    res["stage_sum_s"] = round(sum(stages.values()), 3) if stages else None
    res["run_vs_one_at_a_time"] = s.seconds / res["one_file_at_a_time_s"]
    if a.device.startswith("cuda"):
        import torch

        res["cuda_alloc_retries"] = torch.cuda.memory_stats().get("num_alloc_retries")
    text = json.dumps(res, indent=2)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / f"{a.label}.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
