"""The four stages of a file run and their threads: readers -> the calling thread (the model) ->
writers -> committers, each stage on a different file at once (see :mod:`cryodeploy.inference.runner`).

Memory: at most :func:`frames_in_flight` frames (2-D micrographs; plus the frames of one batch and of
the stack being assembled) are held between reading and writing: each of the two frame queues
(``RunConfig.queue_depth``) full and each reader and writer holding one. The commit queue holds
files already on disk waiting for their fsync and rename, no frames; up to
``COMMIT_THREADS_PER_IO_THREAD * io_threads`` committers (started as the writers need them) wait
on the disk, so several fsyncs wait at once while the next files are read, computed and
written.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from cryodeploy._version import __version__
from cryodeploy.errors import CryoDeployError, OutputError, first_line
from cryodeploy.files import StagedWrite, commit_all, staged_writes
from cryodeploy.inference.batching import FrameTask, TiledEngine, error_text
from cryodeploy.inference.claims import claim_owner, try_claim
from cryodeploy.inference.frames import HostFrames, min_input_size
from cryodeploy.inference.jobs import Job, RunConfig, file_identity
from cryodeploy.io.preview import downsample, write_preview
from cryodeploy.progress import ProgressTask

if TYPE_CHECKING:
    from cryodeploy.models import ModelSpec

__all__ = ["COMMIT_THREADS_PER_IO_THREAD", "STAGES", "FileBar", "Pipeline", "frames_in_flight"]

log = logging.getLogger(__name__)

_END = object()
_POLL = 0.1
#: commit (fsync + rename) threads per ``RunConfig.io_threads``: they hold no frames, only wait on disks
COMMIT_THREADS_PER_IO_THREAD = 2
#: the stages whose busy seconds a run reports, in pipeline order
STAGES = ("read", "compute", "write", "commit")


def frames_in_flight(config: RunConfig) -> int:
    """Most frames held between reading and writing (2-D micrographs; beyond one batch and the stack
    being assembled): each frame queue full, each reader and writer holding one."""
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


class FileBar:
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


class Pipeline:
    """The four stages of :func:`~cryodeploy.inference.runner.denoise_files` (``io_threads`` readers and
    writers, up to twice as many committers, started on demand) and their state."""

    def __init__(
        self, jobs: list[Job], engine: TiledEngine, io: HostFrames, spec: ModelSpec, config: RunConfig,
        bar: FileBar, busy: dict[str, float],
    ) -> None:
        self.jobs, self.engine, self.io, self.spec = jobs, engine, io, spec
        self.config, self.bar, self.busy = config, bar, busy
        self.backend = engine.backend
        self.frames: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.written: queue.Queue[Any] = queue.Queue(config.queue_depth)
        self.n = config.io_threads
        self.n_commit = COMMIT_THREADS_PER_IO_THREAD * self.n
        self.staged: queue.Queue[Any] = queue.Queue(self.n_commit)  # files on disk, no frames
        #: started on demand (:meth:`_hand_over`), so a run that commits nothing starts none
        self.committers: list[threading.Thread] = []
        self.idle_committers = 0
        self.stop = threading.Event()
        self.fatal: list[BaseException] = []
        self.lock = threading.Lock()
        self.todo = iter(jobs)

    def run(self) -> None:
        readers = [self._thread(self._read_all) for _ in range(self.n)]
        writers = [self._thread(self._write_all) for _ in range(self.n)]
        for t in readers + writers:
            t.start()
        try:
            self._compute_all()
            for t in writers:
                t.join()
            for _ in self.committers:  # no more are started: the writers are done
                _put(self.staged, _END, self.stop)
            for t in self.committers:
                t.join()
        finally:
            self.stop.set()
            for t in readers + writers:
                t.join()
            with self.lock:
                committers = list(self.committers)
            for t in committers:
                t.join()
            for job in self.jobs:
                for write in job.runtime.pop("staged", ()):  # never committed (the run stopped)
                    write.discard()
                claim = job.runtime.pop("claim", None)
                if claim is not None:
                    claim.release()
        if self.fatal:
            raise self.fatal[0]

    def _thread(self, f: Any) -> threading.Thread:
        return threading.Thread(target=self._guard, args=(f,), name=f"cryodeploy{f.__name__}", daemon=True)

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
                self._hand_over(job)
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
    def _hand_over(self, job: Job) -> None:
        """Queue a staged job for commit, starting one more committer if none is idle (up to ``n_commit``)."""
        with self.lock:
            full = len(self.committers) >= self.n_commit
            if not (full or self.idle_committers or self.stop.is_set()):
                self.committers.append(self._thread(self._commit_all))
                self.committers[-1].start()
        _put(self.staged, job, self.stop)

    def _commit_all(self) -> None:
        while True:
            with self.lock:
                self.idle_committers += 1
            job = _get(self.staged, self.stop)
            with self.lock:
                self.idle_committers -= 1
            if job is _END:
                return
            with self._busy("commit"):
                self._commit(job)
            self._finish(job)

    def _commit(self, job: Job) -> None:
        """fsync (``RunConfig.fsync``) and rename ``job``'s staged files into place, in order (output,
        then preview)."""
        res = job.result
        staged: list[StagedWrite] = job.runtime.pop("staged")
        try:
            commit_all(staged, self.config.fsync)
        except CryoDeployError as err:
            res.status, res.error = "failed", str(err)
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
