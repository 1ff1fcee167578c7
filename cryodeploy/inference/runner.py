"""The batch denoise pipeline: reader thread -> tiled batches on the calling thread -> writer thread.

The reader reads, validates and normalizes each micrograph (stacks frame by frame); the calling
thread cuts frames into tiles, runs them through the backend in batches (tiles of several
micrographs share a batch) and stitches them; the writer de-normalizes, converts and writes
atomically, keeping the input's header. Queues between the threads hold at most
``RunConfig.queue_depth`` frames each, so memory is fixed by the queue depth (plus the frames
of one batch and of the stack being written), not by the number of files.

Outputs and crashes:

- In :func:`denoise_files` an output keeps its input's file name (``suffix`` added to the stem)
  directly in the output folder, whatever folders or ``..`` the input path has;
  :func:`denoise_pairs` takes each output's path instead. Two inputs mapping to one output
  name, or an output that is its own input, are errors before any work.
- Every output is written to a ``.cryodeploy-tmp-*`` file and renamed into place: an output
  that exists is complete. After ``kill -9``, a rerun with ``skip_existing`` finishes the rest
  and removes the killed run's temporary and claim files.

Concurrent runs on one output folder:

- Each output is *claimed* (an ``flock``-ed ``.cryodeploy-claim-<name>`` file, released by the
  kernel if the process dies) from before its input is read until its output is renamed into
  place. A run meeting an output claimed by a live process skips it ("being written by another
  process"); one finding that an output appeared or changed after it planned its work skips it
  ("written by another process during this run"). So two runs never write one file, and never
  redo each other's work; each output is written once. Start concurrent runs with
  ``skip_existing`` (without it, a run refuses to start when outputs already exist).
- Temporary files are removed only while their output's claim is held by the cleaner, so a
  run never deletes a file another live run is writing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy._version import __version__
from cryodeploy.errors import CryoDeployError, InputError, OutputError
from cryodeploy.inference.batching import DeviceArrays, FrameTask, TiledEngine, auto_geometry, error_text
from cryodeploy.inference.claims import claim_owner, clean_leftovers, try_claim
from cryodeploy.inference.frames import DeviceFrames, HostFrames, frames_for, uses_device_path
from cryodeploy.inference.jobs import (
    FileResult,
    Job,
    RunConfig,
    RunSummary,
    file_identity,
    output_pairs,
    plan_jobs,
    resolve_shard,
)
from cryodeploy.inference.tiling import TilePlan
from cryodeploy.io.mrc import MIN_SIZE, validate_array
from cryodeploy.io.preview import downsample, write_preview
from cryodeploy.progress import ProgressTask, progress

if TYPE_CHECKING:
    import os

    from cryodeploy.backends import Backend
    from cryodeploy.models import ModelSpec

__all__ = [
    "FileResult",
    "RunConfig",
    "RunSummary",
    "denoise_files",
    "denoise_image",
    "denoise_pairs",
    "min_input_size",
]

log = logging.getLogger(__name__)

_END = object()
_POLL = 0.1


def min_input_size(spec: ModelSpec) -> int:
    """Smallest accepted image side for a model: 32 px, or its receptive field if larger."""
    return max(MIN_SIZE, 2 * spec.receptive_radius + 1)


def _int_or_none(value: int | str) -> int | None:
    return None if value == "auto" else int(value)


def denoise_image(
    image: np.ndarray,
    backend: Backend,
    spec: ModelSpec,
    tile: int | str = "auto",
    batch: int | str = "auto",
    keep_normalized: bool = False,
    frame_path: str = "auto",
) -> np.ndarray:
    """Denoise a 2-D image (or a 3-D stack, frames first) in memory; same shape, input's scale.

    Each frame is normalized as the model was trained, run tile by tile and de-normalized
    (unless ``keep_normalized``). On the device path (``frame_path``, see
    :func:`~cryodeploy.inference.frames.uses_device_path`) the array is copied to the device once,
    everything runs there, and the result is copied back once.
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise InputError(f"array: found shape {arr.shape}, expected a 2-D image or a 3-D stack")
    h, w = arr.shape[-2:]
    if h < min_input_size(spec) or w < min_input_size(spec):
        validate_array(arr, "array", min_input_size(spec))  # the size message
    on_device = uses_device_path(backend, frame_path)
    if on_device:
        import torch

        from cryodeploy.imaging.device import DeviceFrameContract, validate_frames

        with warnings.catch_warnings():  # a read-only array: only read, never written
            warnings.simplefilter("ignore", UserWarning)
            frames: Any = torch.from_numpy(np.ascontiguousarray(arr)).to(backend.device).reshape(-1, h, w)
        validate_frames(frames, "array")
        contract: Any = DeviceFrameContract(spec.contract)
    else:
        validate_array(arr, "array", min_input_size(spec))
        frames, contract = arr.reshape(-1, h, w), spec.contract
    padded = (h + -h % spec.stride, w + -w % spec.stride)
    t, b = auto_geometry(padded, spec, backend.device, _int_or_none(tile), _int_or_none(batch))
    n_tiles = len(TilePlan.create((h, w), t, spec.receptive_radius, spec.stride)) * len(frames)
    arrays = DeviceArrays(backend.device) if on_device else None
    engine = TiledEngine(backend, spec, t, min(b, n_tiles), arrays)  # no larger batch than the work
    stats, finished = [], []
    for i, frame in enumerate(frames):
        p = contract.prepare(frame)
        stats.append(p.stats)
        finished += engine.add(FrameTask(i, p.image, p.shape))
    finished += engine.flush()
    out: Any = torch.empty_like(frames) if on_device else np.empty_like(frames)
    for task in finished:
        if task.error is not None:
            raise task.error
        out[task.key] = contract.finish(task.output(), stats[task.key], keep_normalized=keep_normalized)
    host: np.ndarray = out.cpu().numpy() if on_device else out
    return host.reshape(arr.shape)


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def _get(q: queue.Queue[Any], stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return q.get(timeout=_POLL)
        except queue.Empty:
            continue
    return _END


class _Pipeline:
    """The three stages of :func:`denoise_files` (``io_threads`` readers and writers) and their state."""

    def __init__(
        self, jobs: list[Job], engine: TiledEngine, io: HostFrames, spec: ModelSpec, config: RunConfig,
        bar: ProgressTask,
    ) -> None:
        self.jobs, self.engine, self.io, self.spec = jobs, engine, io, spec
        self.config, self.bar = config, bar
        self.backend = engine.backend
        self.frames: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.written: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.stop = threading.Event()
        self.fatal: list[BaseException] = []
        self.lock = threading.Lock()
        self.todo = iter(jobs)
        self.n = config.io_threads

    def run(self) -> None:
        def thread(f: Any) -> threading.Thread:
            name = f"cryodeploy{f.__name__}"
            return threading.Thread(target=self._guard, args=(f,), name=name, daemon=True)

        readers = [thread(self._read_all) for _ in range(self.n)]
        writers = [thread(self._write_all) for _ in range(self.n)]
        for t in readers + writers:
            t.start()
        try:
            self._compute_all()
            for t in writers:
                t.join()
        finally:
            self.stop.set()
            for t in readers + writers:
                t.join()
            for job in self.jobs:
                claim = job.runtime.pop("claim", None)
                if claim is not None:
                    claim.release()
        if self.fatal:
            raise self.fatal[0]

    def _guard(self, stage: Any) -> None:
        try:
            stage()
        except BaseException as err:  # a bug in a stage must stop the run, not hang it
            self.fatal.append(err)
            self.stop.set()

    # --- readers --------------------------------------------------------------------------------
    def _read_all(self) -> None:
        while True:
            with self.lock:  # jobs are claimed in order, so the first failing claim is the one reported
                job = None if self.stop.is_set() else next(self.todo, None)
                if job is None:
                    break
                try:
                    ended = job.result.status != "pending" or not self._claim(job)
                except BaseException as err:
                    self.fatal.append(err)
                    self.stop.set()
                    return
            if ended or not self._read(job):
                _put(self.frames, job, self.stop)
        _put(self.frames, _END, self.stop)

    def _claim(self, job: Job) -> bool:
        """Claim ``job``'s output; False (result set) if another process has it."""
        rt, res = job.runtime, job.result
        rt["t0"] = time.perf_counter()
        claim = try_claim(job.output)
        if claim is None:
            owner = claim_owner(job.output)
            res.status, res.error = "skipped", f"being written by another process (PID {owner})"
            return False
        rt["claim"] = claim
        if file_identity(job.output) != job.planned:
            res.status, res.error = "skipped", "written by another process during this run"
            return False
        return True

    def _read(self, job: Job) -> bool:
        """Read and queue a claimed ``job``'s frames; False (result set) if it ends here."""
        rt, res = job.runtime, job.result
        try:
            header, prepared = self.io.read(job.input, min_input_size(self.spec))
        except CryoDeployError as err:
            res.status, res.error = "failed", str(err)
            return False
        rt.update(header=header, stats=[None] * header.n_frames, frames=[None] * header.n_frames, received=0)
        res.frames, res.bytes_in = header.n_frames, job.input.stat().st_size
        for i, (image, shape, stats) in enumerate(prepared):
            rt["stats"][i] = stats
            if not _put(self.frames, FrameTask((job, i), image, shape), self.stop):
                break
        return True

    # --- model (calling thread) -----------------------------------------------------------------
    def _compute_all(self) -> None:
        ends = 0
        while ends < self.n:
            item = _get(self.frames, self.stop)
            if item is _END:
                if self.stop.is_set():
                    break
                ends += 1
                continue
            if isinstance(item, Job):
                _put(self.written, item, self.stop)
                continue
            for task in self.engine.add(item):
                _put(self.written, task, self.stop)
        for task in self.engine.flush():
            _put(self.written, task, self.stop)
        for _ in range(self.n):
            _put(self.written, _END, self.stop)

    # --- writers --------------------------------------------------------------------------------
    def _write_all(self) -> None:
        while (item := _get(self.written, self.stop)) is not _END:
            if isinstance(item, Job):
                self._finish(item)
                continue
            job, index = item.key
            rt = job.runtime
            with self.lock:
                if item.error is not None:
                    rt.setdefault("error", f"{job.input}: {error_text(item.error, self.backend.label)}")
                else:
                    rt["frames"][index] = item.output()
                    if index == 0 and self.config.preview:
                        # downsampled now: the frame is de-normalized in place before it is written
                        rt["preview"] = tuple(downsample(self.io.to_numpy(x)) for x in (
                            item.plan.crop(item.image), item.output()))  # type: ignore[union-attr]
                rt["received"] += 1
                complete = rt["received"] == job.result.frames
            item = None  # the normalized input is freed before the write (memory: a few frames)
            if complete:
                self._write(job)
                self._finish(job)

    def _write(self, job: Job) -> None:
        rt, res = job.runtime, job.result
        if "error" in rt:
            res.status, res.error = "failed", rt["error"]
            return
        cfg = self.config
        label = f"cryodeploy {__version__} denoise ({self.spec.architecture})"
        try:
            self.io.write(
                job.output, rt.pop("frames"), rt["stats"], rt["header"], cfg.output_dtype, cfg.output_format,
                cfg.keep_normalized, (job.input,), label,
            )
            if "preview" in rt:
                write_preview(job.output.with_suffix(".png"), *rt.pop("preview"))
        except CryoDeployError as err:
            res.status, res.error = "failed", str(err)
            return
        except Exception as err:  # e.g. an image library error in the preview: report, go on
            res.status, res.error = "failed", error_text(OutputError(f"{job.output}: {err}"), "writer")
            return
        res.status, res.bytes_out = "done", job.output.stat().st_size

    def _finish(self, job: Job) -> None:
        rt = job.runtime
        claim = rt.pop("claim", None)
        if claim is not None:
            claim.release()
        job.result.seconds = time.perf_counter() - rt.get("t0", time.perf_counter())
        if job.result.status == "failed":  # info: the summary (and the CLI, on stderr) report it
            log.info("failed: %s", job.result.error)
        job.runtime = {}
        with self.lock:
            self.bar.advance(1, done=job.result.status)


def denoise_files(
    paths: Iterable[str | os.PathLike[str]],
    outdir: str | os.PathLike[str],
    backend: Backend,
    spec: ModelSpec,
    config: RunConfig | None = None,
) -> RunSummary:
    """Denoise micrograph files into ``outdir`` (see the module docstring); never raises for one bad file.

    Planning errors (output name collisions, existing outputs, a bad output folder) raise
    before any work. Each file's outcome is in the returned summary (also written to
    ``config.summary`` as JSON when set).
    """
    cfg = config or RunConfig()
    out = Path(outdir)
    return _run(output_pairs(paths, out, cfg.suffix), [out], backend, spec, cfg)


def denoise_pairs(
    pairs: Iterable[tuple[str | os.PathLike[str], str | os.PathLike[str]]],
    backend: Backend,
    spec: ModelSpec,
    config: RunConfig | None = None,
) -> RunSummary:
    """Denoise each input file into its own output path (in any folders); otherwise as :func:`denoise_files`.

    ``config.suffix`` does not apply: the outputs are named here.
    """
    todo = [(Path(src), Path(dst)) for src, dst in pairs]
    folders = list(dict.fromkeys(dst.parent for _, dst in todo))
    return _run(todo, folders, backend, spec, config or RunConfig())


def _run(
    pairs: list[tuple[Path, Path]], folders: list[Path], backend: Backend, spec: ModelSpec, cfg: RunConfig
) -> RunSummary:
    """Plan and run ``pairs`` into ``folders`` (created first, then cleaned of killed runs' leftovers)."""
    io = frames_for(backend, spec, cfg.frame_path)
    arrays = DeviceArrays(backend.device) if isinstance(io, DeviceFrames) else None
    engine = TiledEngine(backend, spec, cfg.tile, cfg.batch, arrays)  # rejects a tile too small for the model
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{folder}: cannot create the output folder ({err.strerror or err})") from err
    jobs = plan_jobs(pairs, cfg)
    for folder in folders:
        clean_leftovers(folder)
    start = time.perf_counter()
    with progress(len(jobs), "denoise", cfg.quiet) as bar:
        for job in jobs:
            if job.result.status != "pending":
                bar.advance(1, done=job.result.status)
        _Pipeline(jobs, engine, io, spec, cfg, bar).run()
    summary = RunSummary(
        files=[j.result for j in jobs],
        seconds=time.perf_counter() - start,
        backend=backend.label,
        shard=resolve_shard(cfg.shard if isinstance(cfg.shard, tuple) else None),
        tile=engine.tile,
        batch=engine.batch,
    )
    if cfg.summary is not None:
        summary.write(cfg.summary)
    return summary
