"""The batch denoise pipeline: reader thread -> tiled batches on the calling thread -> writer thread.

The reader reads, validates and normalizes each micrograph (stacks frame by frame); the calling
thread cuts frames into tiles, runs them through the backend in batches (tiles of several
micrographs share a batch) and stitches them; the writer de-normalizes, converts and writes
atomically, keeping the input's header. Queues between the threads hold at most
``RunConfig.queue_depth`` frames each, so memory is fixed by the queue depth (plus the frames
of one batch and of the stack being written), not by the number of files.

Outputs and crashes:

- In :func:`denoise_files` an output keeps its input's file name (``suffix`` added to the stem,
  the extension that of the output format, e.g. ``.tif``; MRC keeps ``.mrc``/``.mrcs``)
  directly in the output folder, whatever folders or ``..`` the input path has;
  :func:`denoise_pairs` takes each output's path instead. Two inputs mapping to one output
  name, or an output that is its own input, are errors before any work.
- Every output is written to a ``.cryodeploy-tmp-*`` file and renamed into place: an output
  that exists is complete. After ``kill -9``, a rerun with ``skip_existing`` finishes the rest
  and removes the killed run's temporary and claim files.

Concurrent runs on one output folder (``RunConfig.pull`` for any number of workers sharing one list):

- Each output is *claimed* (an ``flock``-ed ``.cryodeploy-claim-<name>`` file, released by the
  kernel if the process dies) from before its input is read until its output is renamed into
  place. A run meeting an output claimed by a live process skips it ("being written by another
  process"); one finding that an output appeared or changed after it planned its work skips it
  ("written by another process during this run"). So two runs never write one file, and never
  redo each other's work; each output is written once. Start concurrent runs with
  ``skip_existing`` (without it, a run refuses to start when outputs already exist), or with
  ``pull``: then every run walks the whole list taking the next unclaimed file, and at the end
  takes over the files whose claimer died (a free claim, no output) until none is left.
- Temporary files are removed only while their output's claim is held by the cleaner, so a
  run never deletes a file another live run is writing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy._version import __version__
from cryodeploy.errors import CryoDeployError, InputError, OutputError
from cryodeploy.files import new_folders_removed_if_empty
from cryodeploy.imaging.movies import movie_micrograph
from cryodeploy.inference.batching import FrameTask, TiledEngine, auto_geometry, error_text
from cryodeploy.inference.claims import claim_owner, clean_leftovers, try_claim
from cryodeploy.inference.jobs import (
    FileResult,
    Job,
    RunConfig,
    RunSummary,
    file_identity,
    orphaned_jobs,
    output_pairs,
    plan_jobs,
    resolve_shard,
)
from cryodeploy.inference.tiling import TilePlan
from cryodeploy.io.mrc import MIN_SIZE, read_micrograph, validate_array
from cryodeploy.io.writers import output_format
from cryodeploy.progress import ProgressTask, progress

if TYPE_CHECKING:
    import os

    from cryodeploy.backends import Backend
    from cryodeploy.imaging.normalize import NormStats
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


def _frame_task(key: Any, frame: np.ndarray, spec: ModelSpec) -> tuple[FrameTask, NormStats]:
    p = spec.contract.prepare(frame)
    return FrameTask(key, p.image, p.shape), p.stats


def denoise_image(
    image: np.ndarray,
    backend: Backend,
    spec: ModelSpec,
    tile: int | str = "auto",
    batch: int | str = "auto",
    keep_normalized: bool = False,
) -> np.ndarray:
    """Denoise a 2-D image (or a 3-D stack, frames first) in memory; same shape, input's scale.

    Each frame is normalized as the model was trained, run tile by tile and de-normalized
    (unless ``keep_normalized``).
    """
    arr = np.asarray(image, dtype=np.float32)
    if arr.ndim not in (2, 3):
        raise InputError(f"array: found shape {arr.shape}, expected a 2-D image or a 3-D stack")
    validate_array(arr, "array", min_input_size(spec))
    frames = arr.reshape(-1, *arr.shape[-2:])
    h, w = frames.shape[1:]
    padded = (h + -h % spec.stride, w + -w % spec.stride)
    t, b = auto_geometry(padded, spec, backend.device, _int_or_none(tile), _int_or_none(batch))
    n_tiles = len(TilePlan.create((h, w), t, spec.receptive_radius, spec.stride)) * len(frames)
    engine = TiledEngine(backend, spec, t, min(b, n_tiles))  # no larger batch than the work: it is padded
    stats, finished = [], []
    for i, frame in enumerate(frames):
        task, s = _frame_task(i, frame, spec)
        stats.append(s)
        finished += engine.add(task)
    finished += engine.flush()
    out = np.empty_like(frames)
    for task in finished:
        if task.error is not None:
            raise task.error
        out[task.key] = spec.contract.finish(task.output(), stats[task.key], keep_normalized=keep_normalized)
    return out.reshape(arr.shape)


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


class _FileBar:
    """The progress bar advanced one file at a time, showing how many are done, skipped and failed."""

    def __init__(self, bar: ProgressTask) -> None:
        self.bar, self.counts = bar, {"done": 0, "skipped": 0, "failed": 0}

    def file(self, status: str) -> None:
        self.counts[status] += 1
        self.bar.advance(1, **self.counts)

    def retract(self, status: str, n: int) -> None:
        """Take back ``n`` files counted as ``status`` (they are run again)."""
        self.counts[status] -= n
        self.bar.advance(-n, **self.counts)


class _Pipeline:
    """The three stages of :func:`denoise_files` and the state they share."""

    def __init__(
        self, jobs: list[Job], engine: TiledEngine, spec: ModelSpec, config: RunConfig, bar: _FileBar
    ) -> None:
        self.jobs, self.engine, self.spec, self.config, self.bar = jobs, engine, spec, config, bar
        self.backend = engine.backend
        self.frames: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.written: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.stop = threading.Event()
        self.fatal: list[BaseException] = []

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._guard, args=(f,), name=f"cryodeploy{f.__name__}", daemon=True)
            for f in (self._read_all, self._write_all)
        ]
        for t in threads:
            t.start()
        try:
            self._compute_all()
            threads[1].join()
        finally:
            self.stop.set()
            for t in threads:
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

    # --- reader ---------------------------------------------------------------------------------
    def _read_all(self) -> None:
        for job in self.jobs:
            if self.stop.is_set():
                return
            if job.result.status == "pending" and not self._read(job):
                _put(self.frames, job, self.stop)
        _put(self.frames, _END, self.stop)

    def _read(self, job: Job) -> bool:
        """Claim, read and queue ``job``'s frames; False (result set) if it ends here."""
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
        try:
            if self.config.movies is not None:  # hook for movies (imaging/movies.py): the sum of the frames
                mic = movie_micrograph(job.input, self.config.movies, min_input_size(self.spec))
            else:
                mic = read_micrograph(job.input, min_input_size(self.spec))
        except CryoDeployError as err:
            res.status, res.error = "failed", str(err)
            return False
        # --- hook for binning/filters (imaging/filters.py, issue 21): the output header follows --bin
        filters = self.config.filters
        header = filters.header(mic.header) if filters.active else mic.header
        if min(header.frame_shape) < min_input_size(self.spec):
            res.status, res.error = "failed", (f"{job.input}: binned to {header.frame_shape[1]}x"
                                               f"{header.frame_shape[0]}, smaller than the model's "
                                               f"{min_input_size(self.spec)} px minimum")
            return False
        rt.update(header=header, in_header=mic.header, stats=[], frames=[None] * header.n_frames, received=0)
        res.frames, res.bytes_in = header.n_frames, job.input.stat().st_size
        for i, frame in enumerate(mic.frames()):
            if filters.active:
                frame = filters.before(frame, mic.header)
            task, stats = _frame_task((job, i), frame, self.spec)
            rt["stats"].append(stats)
            if not _put(self.frames, task, self.stop):
                break
        return True

    # --- model (calling thread) -----------------------------------------------------------------
    def _compute_all(self) -> None:
        while (item := _get(self.frames, self.stop)) is not _END:
            if isinstance(item, Job):
                _put(self.written, item, self.stop)
                continue
            for task in self.engine.add(item):
                _put(self.written, task, self.stop)
        for task in self.engine.flush():
            _put(self.written, task, self.stop)
        _put(self.written, _END, self.stop)

    # --- writer ---------------------------------------------------------------------------------
    def _write_all(self) -> None:
        while (item := _get(self.written, self.stop)) is not _END:
            if isinstance(item, Job):
                self._finish(item)
                continue
            job, index = item.key
            rt = job.runtime
            if item.error is not None:
                rt.setdefault("error", f"{job.input}: {error_text(item.error, self.backend.label)}")
            else:
                y = item.output()
                frame = self.spec.contract.finish(
                    y, rt["stats"][index], keep_normalized=self.config.keep_normalized
                )
                if self.config.filters.active:  # hook for filters after the network (imaging/filters.py)
                    frame = self.config.filters.after(frame, rt["in_header"])
                rt["frames"][index] = frame
                if index == 0 and self.config.preview:
                    rt["preview"] = (item.plan.crop(item.image), y)  # type: ignore[union-attr]
            rt["received"] += 1
            if rt["received"] == job.result.frames:
                self._write(job)
                self._finish(job)

    def _write(self, job: Job) -> None:
        rt, res = job.runtime, job.result
        if "error" in rt:
            res.status, res.error = "failed", rt["error"]
            return
        header = rt["header"]
        data = np.stack(rt.pop("frames")) if header.is_stack else rt.pop("frames")[0]
        try:
            output_format(self.config.output_format).write(
                job.output, data, header, self.config.output_dtype, (job.input,),
                f"cryodeploy {__version__} denoise ({self.spec.architecture})",
            )
            if "preview" in rt:
                from cryodeploy.io.preview import write_preview

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
        self.bar.file(job.result.status)


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
    extension = output_format(cfg.output_format).suffix or (".mrc" if cfg.movies is not None else None)
    pairs = output_pairs(paths, out, cfg.suffix, extension)
    return _run(pairs, [out], backend, spec, cfg)


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
    engine = TiledEngine(backend, spec, cfg.tile, cfg.batch)  # rejects a tile too small for the model
    with new_folders_removed_if_empty(*folders):  # every input failed: no empty output folder stays
        return _run_in(pairs, folders, engine, spec, cfg)


def _run_in(pairs: list[tuple[Path, Path]], folders: list[Path], engine: TiledEngine, spec: ModelSpec,
            cfg: RunConfig) -> RunSummary:
    backend = engine.backend
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
        files = _FileBar(bar)
        for job in jobs:
            if job.result.status != "pending":
                files.file(job.result.status)
        _Pipeline(jobs, engine, spec, cfg, files).run()
        while cfg.pull and (orphans := orphaned_jobs(jobs)):  # their claimer died: finish them here
            files.retract("skipped", len(orphans))
            for folder in folders:
                clean_leftovers(folder)
            _Pipeline(orphans, engine, spec, cfg, files).run()
    summary = RunSummary(
        files=[j.result for j in jobs],
        seconds=time.perf_counter() - start,
        backend=backend.label,
        shard=(0, 1) if cfg.pull else resolve_shard(cfg.shard if isinstance(cfg.shard, tuple) else None),
        tile=engine.tile,
        batch=engine.batch,
    )
    if cfg.summary is not None:
        summary.write(cfg.summary)
    return summary
