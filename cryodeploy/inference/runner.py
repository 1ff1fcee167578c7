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
and writing (:func:`frames_in_flight`, :mod:`cryodeploy.inference.pipeline`); the commit queue holds
finished files on disk, no frames.
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

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from cryodeploy.files import new_folders_removed_if_empty
from cryodeploy.inference.batching import DeviceArrays, TiledEngine
from cryodeploy.inference.claims import clean_leftovers
from cryodeploy.inference.frames import DeviceFrames, HostFrames, denoise_image, frames_for, min_input_size
from cryodeploy.inference.jobs import (
    FileResult,
    RunConfig,
    RunSummary,
    create_output_folders,
    orphaned_jobs,
    output_pairs,
    plan_jobs,
    resolve_shard,
)
from cryodeploy.inference.pipeline import STAGES, FileBar, Pipeline, frames_in_flight
from cryodeploy.inference.volumes import run_volumes
from cryodeploy.io.writers import output_format
from cryodeploy.progress import progress

if TYPE_CHECKING:
    import os

    from cryodeploy.backends import Backend
    from cryodeploy.models import ModelSpec

__all__ = [
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
    """Plan and run ``pairs`` into ``folders`` (created first, then cleaned of killed runs' leftovers);
    a volume model's files go to :func:`~cryodeploy.inference.volumes.run_volumes`."""
    if spec.ndim == 3:
        return run_volumes(pairs, folders, backend, spec, cfg)
    io = frames_for(backend, spec, cfg.frame_path, cfg.filters, cfg.movies)
    arrays = DeviceArrays(backend.device) if isinstance(io, DeviceFrames) else None
    engine = TiledEngine(backend, spec, cfg.tile, cfg.batch, arrays)  # rejects a tile too small for the model
    with new_folders_removed_if_empty(*folders):  # every input failed: no empty output folder stays
        return _run_in(pairs, folders, engine, io, spec, cfg)


def _run_in(pairs: list[tuple[Path, Path]], folders: list[Path], engine: TiledEngine, io: HostFrames,
            spec: ModelSpec, cfg: RunConfig) -> RunSummary:
    backend = engine.backend
    create_output_folders(folders)
    jobs = plan_jobs(pairs, cfg)
    work: list[tuple[tuple[int, ...] | None, int]] = [
        io.planned(j.input) for j in jobs if j.result.status == "pending"]
    engine.limit_to(work)  # as denoise_image
    for folder in folders:
        clean_leftovers(folder)
    shapes = [shape for shape, _ in work if shape is not None]
    # on a GPU the first frame of a shape pays one-time costs (kernels, cuDNN plans, compilation,
    # pinned buffers): paid here on a frame of the first file's shape, reported apart from the run's
    # seconds; one pinned buffer per reader and writer thread
    warmup = (io.warm_up(engine, shapes[0], 2 * cfg.io_threads)
              if shapes and backend.device.startswith("cuda") else 0.0)
    start = time.perf_counter()
    with progress(len(jobs), "denoise", cfg.quiet) as bar:
        files = FileBar(bar)
        for job in jobs:
            if job.result.status != "pending":
                files.file(job.result.status)
        busy = dict.fromkeys(STAGES, 0.0)
        Pipeline(jobs, engine, io, spec, cfg, files, busy).run()
        while cfg.pull and (orphans := orphaned_jobs(jobs)):  # their claimer died: finish them here
            files.retract("skipped", len(orphans))
            for folder in folders:
                clean_leftovers(folder)
            Pipeline(orphans, engine, io, spec, cfg, files, busy).run()
    summary = RunSummary(
        files=[j.result for j in jobs],
        seconds=time.perf_counter() - start,
        backend=backend.label,
        shard=(0, 1) if cfg.pull else resolve_shard(cfg.shard if isinstance(cfg.shard, tuple) else None),
        tile=engine.tile,
        batch=engine.batch,
        stage_seconds=busy,
        warmup_seconds=warmup,
    )
    if cfg.summary is not None:
        summary.write(cfg.summary)
    return summary
