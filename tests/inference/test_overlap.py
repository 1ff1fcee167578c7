"""The runner's stages work on different files at once (read of file i+1, compute of file i, write of
file i-1), shown by events between threads, not by timing; and the overlapped run writes the same
bytes as files run one at a time."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cryodeploy.backends import BackendOptions
from cryodeploy.backends.torch import TorchBackend
from cryodeploy.inference.batching import TiledEngine
from cryodeploy.inference.frames import HostFrames
from cryodeploy.inference.runner import STAGES, RunConfig, _run_in, denoise_files, frames_in_flight
from cryodeploy.io.mrc import write_micrograph
from cryodeploy.models.checkpoint import load_checkpoint

#: how long the gated write waits for the other stages before it gives up (a serial pipeline never opens it)
GATE_SECONDS = 60.0


@pytest.fixture(scope="module")
def model(cnn3_checkpoint: Path) -> tuple[Any, Any]:
    return load_checkpoint(cnn3_checkpoint)


def _inputs(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(3)
    folder.mkdir(parents=True)
    paths = [folder / f"mic_{i:03d}.mrc" for i in range(n)]
    for p in paths:
        write_micrograph(p, (rng.standard_normal((64, 80)) * 30 + 500).astype(np.float32))
    return paths


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


class _Events:
    """What the stages have done so far, for threads to wait on."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.reads: list[str] = []
        self.written: list[str] = []
        self.batches = 0

    def add(self, kind: str, name: str = "") -> None:
        with self.cond:
            if kind == "batch":
                self.batches += 1
            else:
                getattr(self, kind).append(name)
            self.cond.notify_all()


class _CountingTorch(TorchBackend):
    """The real torch backend, counting the batches it has run."""

    def __init__(self, module: Any, events: _Events) -> None:
        super().__init__(module, BackendOptions())
        self.events = events

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = super()._run(batch)
        self.events.add("batch")
        return out


class _GatedFrames(HostFrames):
    """The host frame path; the write of mic_000 waits until mic_002's read has begun, mic_001 has
    been computed and mic_001 has been written: possible only while mic_000's write is unfinished
    if the stages overlap (``opened`` says whether that happened within :data:`GATE_SECONDS`)."""

    def __init__(self, spec: Any, events: _Events) -> None:
        super().__init__(spec)
        self.events = events
        self.opened: bool | None = None

    def read(self, path: Path, min_size: int) -> Any:
        self.events.add("reads", path.name)
        return super().read(path, min_size)

    def write(self, path: Path, *args: Any) -> None:
        ev = self.events
        if path.name == "mic_000.mrc":
            with ev.cond:
                self.opened = ev.cond.wait_for(
                    lambda: "mic_002.mrc" in ev.reads and ev.batches >= 2 and "mic_001.mrc" in ev.written,
                    timeout=GATE_SECONDS)
        super().write(path, *args)
        ev.add("written", path.name)


def test_read_compute_and_write_of_different_files_overlap(tmp_path, model) -> None:
    module, spec = model
    paths = _inputs(tmp_path / "in", 6)
    cfg = RunConfig(quiet=True, tile=80, batch=1, io_threads=2, queue_depth=2)
    events = _Events()
    with _CountingTorch(module, events) as backend:
        gated = _GatedFrames(spec, events)
        out = tmp_path / "overlapped"
        summary = _run_in([(p, out / p.name) for p in paths], [out], TiledEngine(backend, spec, 80, 1),
                          gated, spec, cfg)
        serial = tmp_path / "serial"
        for p in paths:  # one file per run: nothing of two files ever overlaps
            assert denoise_files([p], serial, backend, spec, cfg).ok
    assert gated.opened is True  # mic_000's write waited for mic_001 computed and written, mic_002 read
    assert events.batches == 2 * len(paths)  # one batch per 64x80 file, in each of the two runs
    assert summary.ok and summary.count("done") == len(paths)
    assert _digests(out) == _digests(serial)  # byte-identical outputs, headers included
    assert set(summary.stage_seconds) == set(STAGES) and all(v > 0 for v in summary.stage_seconds.values())
    assert summary.to_dict()["stage_seconds"].keys() == set(STAGES)


@pytest.mark.parametrize(("io_threads", "queue_depth"), [(1, 1), (4, 3)])
def test_outputs_are_byte_identical_to_one_file_at_a_time(tmp_path, model, io_threads, queue_depth) -> None:
    """Stacks, float16 and previews through every stage, in any pipeline shape, as the serial runs."""
    module, spec = model
    paths = _inputs(tmp_path / "in", 5)
    write_micrograph(tmp_path / "in" / "stack.mrcs",
                     np.random.default_rng(4).standard_normal((3, 64, 64)).astype(np.float32) * 9 + 40)
    paths.append(tmp_path / "in" / "stack.mrcs")
    opts = {"quiet": True, "tile": 48, "batch": 3, "output_dtype": "float16", "preview": True}
    cfg = RunConfig(io_threads=io_threads, queue_depth=queue_depth, **opts)
    with TorchBackend(module, BackendOptions()) as backend:
        summary = denoise_files(paths, tmp_path / "all", backend, spec, cfg)
        for p in paths:
            assert denoise_files([p], tmp_path / "one", backend, spec, RunConfig(**opts)).ok
    assert summary.count("done") == len(paths)
    assert len(_digests(tmp_path / "all")) == 2 * len(paths)  # outputs and previews, no leftovers
    assert _digests(tmp_path / "all") == _digests(tmp_path / "one")
    assert frames_in_flight(cfg) == 2 * queue_depth + 2 * io_threads


@pytest.mark.parametrize(("tile", "batch"), [("auto", "auto"), (48, 3)])
def test_warm_up_leaves_the_engine_as_it_was(model: tuple[Any, Any], tile: Any, batch: Any) -> None:
    """The GPU warm-up (one frame of zeros before the files) runs the backend and changes no result."""
    from cryodeploy.inference.batching import FrameTask

    net, spec = model
    backend = TorchBackend(net, BackendOptions(device="cpu", threads=1))
    image = np.random.default_rng(5).standard_normal((64, 80)).astype(np.float32)

    def run(warm: bool) -> np.ndarray:
        engine = TiledEngine(backend, spec, tile, batch)
        engine.limit_to([((64, 80), 2)])
        calls = []
        original = backend.run
        backend.run = lambda x: calls.append(x.shape) or original(x)  # type: ignore[method-assign]
        try:
            seconds = engine.warm_up((64, 80)) if warm else 0.0
            assert seconds >= 0 and (len(calls) > 0) == warm  # it did run the backend
            done = engine.add(FrameTask("a", image, (64, 80))) + engine.flush()
        finally:
            backend.run = original  # type: ignore[method-assign]
        assert [t.key for t in done] == ["a"] and done[0].error is None
        return np.asarray(done[0].output())

    assert np.array_equal(run(True), run(False))


def test_summary_reports_no_warm_up_on_the_cpu(tmp_path: Path, model: tuple[Any, Any]) -> None:
    import json

    net, spec = model
    backend = TorchBackend(net, BackendOptions(device="cpu", threads=1))
    paths = _inputs(tmp_path / "in", 2)
    config = RunConfig(quiet=True, summary=tmp_path / "s.json")
    summary = denoise_files(paths, tmp_path / "out", backend, spec, config)
    assert summary.warmup_seconds == 0.0
    assert json.loads((tmp_path / "s.json").read_text())["warmup_seconds"] == 0
    assert "warm-up" not in summary.line()
