"""The batch denoise pipeline: reader threads -> tiled batches on the calling thread -> writer
threads -> commit threads, all four stages working on different files at once.

The readers read, validate and normalize each micrograph (stacks frame by frame); the calling
thread cuts frames into tiles, runs them through the backend in batches (tiles of several
micrographs share a batch) and stitches them; the writers de-normalize, convert and write each
output to its temporary file, keeping the input's header; the committers fsync it and rename it
into place (:func:`~cryodeploy.files.staged_writes`), so a file's fsync waits on its own thread
while the next files are read, computed and written, and several fsyncs wait at once. Memory is
fixed by the queue depth, not by the number of files: at most ``2 * queue_depth + 2 * io_threads``
frames (plus the frames of one batch and of the stack being assembled) are held between reading
and writing (:func:`frames_in_flight`); the commit queue holds finished files on disk, no frames.
Each summary says how long each stage was busy, summed over its threads
(:attr:`RunSummary.stage_seconds`): a sum above the run's wall time is the overlap.

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

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryodeploy._version import __version__
from cryodeploy.errors import CryoDeployError, OutputError, first_line
from cryodeploy.files import StagedWrite, new_folders_removed_if_empty, staged_writes
from cryodeploy.inference.batching import DeviceArrays, FrameTask, TiledEngine, error_text
from cryodeploy.inference.claims import claim_owner, clean_leftovers, try_claim
from cryodeploy.inference.frames import DeviceFrames, HostFrames, denoise_image, frames_for, min_input_size
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
from cryodeploy.io.preview import downsample, write_preview
from cryodeploy.io.writers import output_format
from cryodeploy.progress import ProgressTask, progress

if TYPE_CHECKING:
    import os

    from cryodeploy.backends import Backend
    from cryodeploy.models import ModelSpec

__all__ = [
    "COMMIT_THREADS_PER_IO_THREAD",
    "STAGES",
    "FileResult",
    "RunConfig",
    "RunSummary",
    "denoise_files",
    "denoise_image",
    "denoise_pairs",
    "frames_in_flight",
    "min_input_size",
]

log = logging.getLogger(__name__)

_END = object()
_POLL = 0.1
#: commit (fsync + rename) threads per ``RunConfig.io_threads``: they hold no frames, only wait on disks
COMMIT_THREADS_PER_IO_THREAD = 2
#: the stages whose busy seconds a run reports, in pipeline order
STAGES = ("read", "compute", "write", "commit")


def frames_in_flight(config: RunConfig) -> int:
    """Most frames held between reading and writing (2-D micrographs; beyond one batch): each queue
    full, each reader and writer holding one."""
    return 2 * config.queue_depth + 2 * config.io_threads


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


def _read_error(job: Job, err: BaseException) -> str:
    if isinstance(err, CryoDeployError):
        return str(err)
    return f"{job.input}: out of memory reading it ({first_line(err, type(err).__name__)})"


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
    """The four stages of :func:`denoise_files` (``io_threads`` readers and writers, twice as many
    committers) and their state."""

    def __init__(
        self, jobs: list[Job], engine: TiledEngine, io: HostFrames, spec: ModelSpec, config: RunConfig,
        bar: _FileBar, busy: dict[str, float],
    ) -> None:
        self.jobs, self.engine, self.io, self.spec = jobs, engine, io, spec
        self.config, self.bar, self.busy = config, bar, busy
        self.backend = engine.backend
        self.frames: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.written: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.n = config.io_threads
        self.n_commit = COMMIT_THREADS_PER_IO_THREAD * self.n
        self.staged: queue.Queue[Any] = queue.Queue(self.n_commit)  # files on disk, no frames
        self.stop = threading.Event()
        self.fatal: list[BaseException] = []
        self.lock = threading.Lock()
        self.todo = iter(jobs)

    def run(self) -> None:
        def thread(f: Any) -> threading.Thread:
            name = f"cryodeploy{f.__name__}"
            return threading.Thread(target=self._guard, args=(f,), name=name, daemon=True)

        readers = [thread(self._read_all) for _ in range(self.n)]
        writers = [thread(self._write_all) for _ in range(self.n)]
        committers = [thread(self._commit_all) for _ in range(self.n_commit)]
        everyone = readers + writers + committers
        for t in everyone:
            t.start()
        try:
            self._compute_all()
            for t in writers:
                t.join()
            for _ in committers:
                _put(self.staged, _END, self.stop)
            for t in committers:
                t.join()
        finally:
            self.stop.set()
            for t in everyone:
                t.join()
            for job in self.jobs:
                for write in job.runtime.pop("staged", ()):  # never committed (the run stopped)
                    write.discard()
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

    @contextlib.contextmanager
    def _busy(self, stage: str) -> Iterator[None]:
        """Add the time spent in the block to ``stage``'s busy seconds."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            with self.lock:
                self.busy[stage] += time.perf_counter() - t0

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
            with self._busy("read"):
                header, prepared = self.io.read(job.input, min_input_size(self.spec))
        except (CryoDeployError, MemoryError) as err:
            res.status, res.error = "failed", _read_error(job, err)
            return False
        rt.update(header=header, stats=[None] * header.n_frames, frames=[None] * header.n_frames, received=0)
        res.frames, res.bytes_in = header.n_frames, job.input.stat().st_size
        for i in range(header.n_frames):
            try:
                with self._busy("read"):
                    image, shape, stats = next(prepared)
            except (CryoDeployError, MemoryError) as err:  # this and the later frames fail, past the model
                with self.lock:
                    rt.setdefault("error", _read_error(job, err))
                for k in range(i, header.n_frames):
                    if not _put(self.written, FrameTask((job, k), None, (0, 0), error=err), self.stop):
                        break
                break
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
            with self._busy("compute"):
                done = self.engine.add(item)
            for task in done:
                _put(self.written, task, self.stop)
        with self._busy("compute"):
            done = self.engine.flush()
        for task in done:
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
            if not complete:
                continue
            with self._busy("write"):
                staged = self._write(job)
            if staged:  # the fsync and rename wait on a committer, not here
                _put(self.staged, job, self.stop)
            else:
                self._finish(job)

    def _write(self, job: Job) -> bool:
        """Write ``job``'s output (and preview) to staged temporary files; False (result set) if it failed."""
        rt, res = job.runtime, job.result
        if "error" in rt:
            res.status, res.error = "failed", rt["error"]
            return False
        cfg = self.config
        label = f"cryodeploy {__version__} denoise ({self.spec.architecture})"
        try:
            with staged_writes() as staged:
                self.io.write(
                    job.output, rt.pop("frames"), rt["stats"], rt["header"], cfg.output_dtype,
                    cfg.output_format, cfg.keep_normalized, (job.input,), label,
                )
                if "preview" in rt:
                    write_preview(job.output.with_suffix(".png"), *rt.pop("preview"))
        except CryoDeployError as err:
            res.status, res.error = "failed", str(err)
            return False
        except Exception as err:  # e.g. an image library error in the preview: report, go on
            res.status, res.error = "failed", error_text(OutputError(f"{job.output}: {err}"), "writer")
            return False
        rt["staged"] = staged
        return True

    # --- committers -----------------------------------------------------------------------------
    def _commit_all(self) -> None:
        while (job := _get(self.staged, self.stop)) is not _END:
            with self._busy("commit"):
                self._commit(job)
            self._finish(job)

    def _commit(self, job: Job) -> None:
        """fsync and rename ``job``'s staged files into place, in order (output, then preview)."""
        res = job.result
        staged: list[StagedWrite] = job.runtime.pop("staged")
        for k, write in enumerate(staged):
            try:
                write.commit()
            except CryoDeployError as err:
                res.status, res.error = "failed", str(err)
                for rest in staged[k + 1:]:
                    rest.discard()
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
    io = frames_for(backend, spec, cfg.frame_path, cfg.filters, cfg.movies)
    arrays = DeviceArrays(backend.device) if isinstance(io, DeviceFrames) else None
    engine = TiledEngine(backend, spec, cfg.tile, cfg.batch, arrays)  # rejects a tile too small for the model
    with new_folders_removed_if_empty(*folders):  # every input failed: no empty output folder stays
        return _run_in(pairs, folders, engine, io, spec, cfg)


def _run_in(pairs: list[tuple[Path, Path]], folders: list[Path], engine: TiledEngine, io: HostFrames,
            spec: ModelSpec, cfg: RunConfig) -> RunSummary:
    backend = engine.backend
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"{folder}: cannot create the output folder ({err.strerror or err})") from err
    jobs = plan_jobs(pairs, cfg)
    engine.limit_to([io.planned(j.input) for j in jobs if j.result.status == "pending"])  # as denoise_image
    for folder in folders:
        clean_leftovers(folder)
    start = time.perf_counter()
    with progress(len(jobs), "denoise", cfg.quiet) as bar:
        files = _FileBar(bar)
        for job in jobs:
            if job.result.status != "pending":
                files.file(job.result.status)
        busy = dict.fromkeys(STAGES, 0.0)
        _Pipeline(jobs, engine, io, spec, cfg, files, busy).run()
        while cfg.pull and (orphans := orphaned_jobs(jobs)):  # their claimer died: finish them here
            files.retract("skipped", len(orphans))
            for folder in folders:
                clean_leftovers(folder)
            _Pipeline(orphans, engine, io, spec, cfg, files, busy).run()
    summary = RunSummary(
        files=[j.result for j in jobs],
        seconds=time.perf_counter() - start,
        backend=backend.label,
        shard=(0, 1) if cfg.pull else resolve_shard(cfg.shard if isinstance(cfg.shard, tuple) else None),
        tile=engine.tile,
        batch=engine.batch,
        stage_seconds=busy,
    )
    if cfg.summary is not None:
        summary.write(cfg.summary)
    return summary
