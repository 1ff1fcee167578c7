"""Volume models on tomograms: :func:`denoise_volume` in memory, :func:`run_volumes` over MRC files.

The same pieces as for micrographs, in 3-D: the model's
:class:`~cryodeploy.imaging.contract.FrameContract` (``ndim`` 3), a 3-D
:class:`~cryodeploy.inference.tiling.TilePlan` whose tiles of one volume share batches
``[N, 1, D, H, W]``, automatic tile and batch from the free device memory with out-of-memory
back-off (:class:`~cryodeploy.inference.batching.TiledEngine`), and the file runner's planning
(shards, ``skip_existing``, ``pull``), claims and atomic outputs (:mod:`cryodeploy.inference.jobs`,
:mod:`cryodeploy.inference.claims`). Files are processed one at a time, read and written whole
(:mod:`cryodeploy.io.volumes`: the volume rule, validation; voxel size, origin, start indices,
extended header and labels kept), streamed with bounded memory on the host or the device path
(:mod:`cryodeploy.inference.volumestream`); the reader/writer threads of micrographs do not apply.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy._version import __version__
from cryodeploy.errors import ConfigError, CryoDeployError, InputError
from cryodeploy.files import commit_all, new_folders_removed_if_empty, staged_writes
from cryodeploy.inference.batching import DeviceArrays, TiledEngine, error_text
from cryodeploy.inference.claims import claim_owner, clean_leftovers, try_claim
from cryodeploy.inference.frames import uses_device_path
from cryodeploy.inference.jobs import (
    Job,
    RunConfig,
    RunSummary,
    create_output_folders,
    file_identity,
    orphaned_jobs,
    plan_jobs,
    resolve_shard,
)
from cryodeploy.inference.volumestream import DeviceVolumes, HostVolumes, run_tiles, volume_engine
from cryodeploy.io.volumes import validate_volume
from cryodeploy.progress import progress

if TYPE_CHECKING:
    from cryodeploy.backends import Backend
    from cryodeploy.models import ModelSpec

__all__ = ["check_volume_model", "denoise_volume", "run_volumes"]


def check_volume_model(spec: ModelSpec, ndim: int, where: str) -> None:
    """:class:`InputError` naming ``where`` unless ``spec`` is a volume model and the data has 3 axes.
    (Image models refuse volume files where they are read, :func:`cryodeploy.io.mrc.read_header`.)"""
    if spec.ndim != 3:
        raise InputError(f"{where}: {spec.architecture} is a 2-D image model, expected a volume model "
                         "(e.g. unet3d) for volumes")
    if ndim != 3:
        raise InputError(f"{where}: found {ndim}-D data, but {spec.architecture} is a volume model "
                         "that takes 3-D volumes (D, H, W)")


def denoise_volume(
    volume: np.ndarray,
    backend: Backend,
    spec: ModelSpec,
    tile: int | str = "auto",
    batch: int | str = "auto",
    keep_normalized: bool = False,
    frame_path: str = "auto",
    where: str = "array",
) -> np.ndarray:
    """Denoise a (D, H, W) volume with a volume model; same shape, the input's intensity scale.
    Checked as the volume reader checks files (:func:`~cryodeploy.io.volumes.validate_volume`).

    Normalized with the whole volume's statistics, padded to the stride, tiled in 3-D (halo >= the
    receptive radius, so the result equals the whole-volume forward), de-normalized unless
    ``keep_normalized``. On the device path (``frame_path``, see
    :func:`~cryodeploy.inference.frames.uses_device_path`) the volume is copied to the device once.
    """
    arr = np.asarray(volume, dtype=np.float32)
    check_volume_model(spec, arr.ndim, where)
    validate_volume(arr, where)
    on_device = uses_device_path(backend, frame_path)
    if on_device:
        import torch

        from cryodeploy.imaging.device import DeviceFrameContract

        with warnings.catch_warnings():  # a read-only array: only read, never written
            warnings.simplefilter("ignore", UserWarning)
            frame: Any = torch.from_numpy(np.ascontiguousarray(arr)).to(backend.device)
        contract: Any = DeviceFrameContract(spec.contract)
    else:
        frame, contract = arr, spec.contract
    arrays = DeviceArrays(backend.device) if on_device else None
    engine = volume_engine(arr.shape, backend, spec, tile, batch, arrays)
    p = contract.prepare(frame)
    output = run_tiles(engine, p.image, p.shape)
    out = contract.finish(output, p.stats, keep_normalized=keep_normalized)
    return np.asarray(out.cpu().numpy()) if on_device else np.asarray(out)


def _check_config(cfg: RunConfig) -> None:
    unsupported = [
        (cfg.output_format != "mrc", f"output format {cfg.output_format}"),
        (cfg.filters.active, "filters"),
        (cfg.movies is not None, "movies"),
        (cfg.preview, "preview"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ConfigError(f"{what}: not supported for volumes (volume models write MRC volumes)")


def _one(job: Job, volumes: HostVolumes, backend: Backend, spec: ModelSpec, cfg: RunConfig) -> None:
    res = job.result
    t0 = time.perf_counter()
    claim = try_claim(job.output)
    if claim is None:
        res.status, res.error = "skipped", f"being written by another process (PID {claim_owner(job.output)})"
        return
    try:
        if file_identity(job.output) != job.planned:
            res.status, res.error = "skipped", "written by another process during this run"
            return
        res.frames, res.bytes_in = 1, job.input.stat().st_size
        label = f"cryodeploy {__version__} denoise ({spec.architecture})"
        with staged_writes() as staged:
            volumes.denoise(job.input, job.output, cfg.output_dtype, (job.input,), label)
        commit_all(staged, cfg.fsync)
        res.status, res.bytes_out = "done", job.output.stat().st_size
    except (CryoDeployError, MemoryError) as err:
        res.status, res.error = "failed", str(err) if isinstance(err, CryoDeployError) else (
            f"{job.input}: out of memory ({err})")
    except Exception as err:  # a backend's own error type: this file fails, the run goes on
        res.status, res.error = "failed", f"{job.input}: {error_text(err, backend.label)}"
    finally:
        claim.release()
        res.seconds = time.perf_counter() - t0


def run_volumes(pairs: list[tuple[Path, Path]], folders: list[Path], backend: Backend, spec: ModelSpec,
                cfg: RunConfig) -> RunSummary:
    """Denoise each (input volume, output path) pair with a volume model, one file at a time; never
    raises for one bad file (its outcome is in the summary). Folders are created first (and removed
    again if every input failed)."""
    _check_config(cfg)
    TiledEngine(backend, spec, cfg.tile, cfg.batch)  # rejects a tile too small for the model
    with new_folders_removed_if_empty(*folders):
        return _run_in(pairs, folders, backend, spec, cfg)


def _run_in(pairs: list[tuple[Path, Path]], folders: list[Path], backend: Backend, spec: ModelSpec,
            cfg: RunConfig) -> RunSummary:
    create_output_folders(folders)
    jobs = plan_jobs(pairs, cfg)
    for folder in folders:
        clean_leftovers(folder)
    kind = DeviceVolumes if uses_device_path(backend, cfg.frame_path) else HostVolumes
    volumes = kind(backend, spec, cfg.tile, cfg.batch, cfg.keep_normalized)
    start = time.perf_counter()
    with progress(len(jobs), "denoise", cfg.quiet) as bar:
        todo = [j for j in jobs if j.result.status == "pending"]
        bar.advance(len(jobs) - len(todo))
        while todo:
            for job in todo:
                _one(job, volumes, backend, spec, cfg)
                bar.advance(1)
            todo = orphaned_jobs(jobs) if cfg.pull else []  # their claimer died: finish them here
            bar.advance(-len(todo))
    summary = RunSummary(files=[j.result for j in jobs], seconds=time.perf_counter() - start,
                         backend=backend.label,
                         shard=(0, 1) if cfg.pull else resolve_shard(cfg.shard if isinstance(cfg.shard, tuple)
                                                                     else None),
                         tile=None if cfg.tile == "auto" else int(cfg.tile),
                         batch=None if cfg.batch == "auto" else int(cfg.batch))
    if cfg.summary is not None:
        summary.write(cfg.summary)
    return summary
