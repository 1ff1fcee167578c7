"""Stream micrographs into a patch store, one micrograph at a time, with a per-micrograph test split.

Four kinds of targets:

- ``noise``: the seeds' recipe. A micrograph is mapped to [0, 1]
  (:func:`~cryodeploy.imaging.noise.to_unit_range`), a Poisson + Gaussian draw is the input and
  the [0, 1] image the target.
- ``noise2noise``: two independent draws (same dose) are input and target.
- ``thin``: Noise2Noise from one counted micrograph: its counts (integers, or the
  :func:`~cryodeploy.imaging.noise.count_gain` estimated from the variance/mean) are binomially
  thinned into two halves with independent noise, input and target; data that cannot be counts
  are refused.
- ``pairs``: the user's own pairs, e.g. even/odd frame sums or noisy/clean; each input's target is the
  file of the same name in ``target_dir`` (both must share one intensity scale).

Input and target get the SAME affine normalization, the one :func:`~cryodeploy.imaging.normalize.norm_stats`
computes from the input, so a training input is exactly what inference feeds the model.
Every input's header is read first, so an unreadable file stops the run before any work.
Memory: with ``workers``, at most ``1 + AHEAD`` micrographs are in flight (one being written while
the next ``AHEAD`` are read and prepared, each on its own thread, so one's serial steps -- reading,
the percentiles -- overlap the others' bands), each needing about three times its float32 size (a
stack counts as one micrograph); ``workers`` threads share out each image's bands of 64 rows, so
memory does not depend on the number of micrographs and grows with workers only by each thread's
temporaries (a few float64 bands: ~8 MB per thread for 4096-pixel-wide images). Each band draws
its noise from its own seeded stream: the store is the same for any number of workers. The
patches are normalized and written by the workers (positional writes into reserved slots), each
job copying at most 2 x 4 MB at a time; once a frame is written its bytes are handed to the disk
(:meth:`~cryodeploy.training.store.StoreWriter.write_behind`), so the final sync is short.

With ``sampler="torch"`` (:mod:`~cryodeploy.training.samplers`) the noise is drawn by torch on
``device`` instead, one frame at a time per preparing thread (the [0, 1] map, draws, statistics and
normalization all there, on its own CUDA stream, copied back into pinned memory), so a GPU machine
is not bound by the CPU's Poisson sampler; also the same for any workers.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError
from cryodeploy.files import new_folders_removed_if_empty
from cryodeploy.imaging.noise import NoiseSpec, add_noise, count_gain, thin, unit_range
from cryodeploy.imaging.normalize import NormSpec, norm_stats
from cryodeploy.io.mrc import read_header, read_micrograph
from cryodeploy.progress import progress
from cryodeploy.training.cutting import Frame, run_jobs, write_frame
from cryodeploy.training.samplers import check_sampler, sampler_record
from cryodeploy.training.store import PatchStore, StoreWriter, held_out_mask

__all__ = ["AHEAD", "TARGET_MODES", "VOLUME_TARGET_MODES", "PreprocessConfig", "preprocess",
           "split_micrographs"]

log = logging.getLogger(__name__)

#: The kinds of targets :func:`preprocess` can make.
TARGET_MODES = ("noise", "noise2noise", "thin", "pairs")
#: The kinds of targets :func:`cryodeploy.training.volumes.preprocess_volumes` can make ("none": inputs only).
VOLUME_TARGET_MODES = (*TARGET_MODES, "none")
#: Rows per band: the unit of parallel work and of noise streams; keeps float64 temporaries small.
_BAND_ROWS = 64
#: Micrographs read and prepared at once, ahead of the one being written (with workers).
AHEAD = 3


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    t = _sides(value, 2, name)
    return t[0], t[1]


def _sides(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    t = (int(value),) * n if isinstance(value, int | np.integer) else tuple(int(v) for v in value)
    if len(t) != n or min(t) < 1:
        raise ConfigError(f"{name} {value!r} invalid, expected a positive int or "
                          f"{'(H, W)' if n == 2 else '(D, H, W)'}")
    return t


@dataclass(frozen=True)
class PreprocessConfig:
    """How to cut micrographs into a patch store.

    ``patch``/``stride`` are ints or (H, W); stride defaults to the patch (no overlap).
    ``test_fraction`` of the micrographs (at least one when > 0 and there are >= 2) go to the
    test split, chosen by ``seed``. ``workers`` threads draw noise in bands of rows and
    normalize and write patches in parallel, and the next ``AHEAD`` micrographs are prepared while
    one is written (0 = all in the calling thread). ``target_dir`` is required by, and only
    allowed with, ``pairs``.
    ``ndim=3`` cuts volumes (:func:`cryodeploy.training.volumes.preprocess_volumes`): ``patch`` and
    ``stride`` are ints or (D, H, W), ``pairs`` come with the inputs (no ``target_dir``) and
    ``targets="none"`` stores inputs only (self-supervised training).
    ``sampler`` "torch" draws ``noise``/``noise2noise`` targets with torch on ``device`` ("cpu",
    "cuda", "cuda:N"); "numpy" (the default) on the CPU.
    """

    patch: int | tuple[int, int] = 1024
    stride: int | tuple[int, int] | None = None
    test_fraction: float = 0.1
    seed: int = 0
    targets: str = "noise"
    noise: NoiseSpec = field(default_factory=NoiseSpec)
    normalization: NormSpec = field(default_factory=NormSpec)
    target_dir: Path | None = None
    workers: int = 0
    overwrite: bool = False
    ndim: int = 2
    sampler: str = "numpy"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.ndim not in (2, 3):
            raise ConfigError(f"ndim {self.ndim!r} invalid, expected 2 (micrographs) or 3 (volumes)")
        _sides(self.patch, self.ndim, "patch")
        _sides(self.stride if self.stride is not None else self.patch, self.ndim, "stride")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ConfigError(f"test fraction {self.test_fraction} invalid, expected 0 <= f < 1")
        modes = TARGET_MODES if self.ndim == 2 else VOLUME_TARGET_MODES
        if self.targets not in modes:
            raise ConfigError(f"targets {self.targets!r} unknown, expected one of {', '.join(modes)}")
        if self.ndim == 3 and self.target_dir is not None:
            raise ConfigError("volumes take their pairs with the inputs, not a target directory")
        if self.ndim == 2 and (self.targets == "pairs") != (self.target_dir is not None):
            raise ConfigError("a target directory is required by, and only allowed with, targets='pairs'")
        if self.workers < 0 or self.seed < 0:
            raise ConfigError(f"workers and seed must be >= 0, found {self.workers} and {self.seed}")
        check_sampler(self.sampler, self.device, self.targets, self.ndim)

    @property
    def patch_shape(self) -> tuple[int, int]:
        """(H, W) of a patch."""
        return _pair(self.patch, "patch")

    @property
    def stride_shape(self) -> tuple[int, int]:
        """(dy, dx) between patches."""
        return _pair(self.stride if self.stride is not None else self.patch, "stride")

    @property
    def patch_box(self) -> tuple[int, ...]:
        """The patch's ``ndim`` sides: (H, W) or (D, H, W)."""
        return _sides(self.patch, self.ndim, "patch")

    @property
    def stride_box(self) -> tuple[int, ...]:
        """The ``ndim`` steps between patches."""
        return _sides(self.stride if self.stride is not None else self.patch, self.ndim, "stride")


def split_micrographs(n: int, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of the micrographs in the test split (deterministic in ``n``, fraction and seed)."""
    return held_out_mask(n, test_fraction, seed, stream=0)


@dataclass
class _Prepared:
    """One micrograph ready to be cut: its frames and what the manifest records about each."""

    frames: list[Frame]
    info: list[dict[str, Any]]


def _in_bands(pool: ThreadPoolExecutor | None, rows: int, work: Callable[[int, slice], None]) -> None:
    """Call ``work(band, rows_slice)`` for every band of ``_BAND_ROWS`` rows, on ``pool`` if given."""
    bands = enumerate(range(0, rows, _BAND_ROWS))
    run_jobs(pool, [partial(work, b, slice(r, r + _BAND_ROWS)) for b, r in bands])


def _seq(config: PreprocessConfig, index: int, *key: int) -> np.random.SeedSequence:
    """The random stream of micrograph ``index`` named by ``key`` (frame, or frame/draw/band):
    each band (numpy) or frame (torch) draws its own noise, so the store does not depend on the
    number of workers."""
    return np.random.SeedSequence([config.seed, 1, index], spawn_key=key)


def _rng(config: PreprocessConfig, index: int, *key: int) -> np.random.Generator:
    """numpy's generator on :func:`_seq`."""
    return np.random.default_rng(_seq(config, index, *key))


def _prepare_frame(
    image: np.ndarray,
    partner: np.ndarray | None,
    config: PreprocessConfig,
    key: tuple[int, int],
    pool: ThreadPoolExecutor | None,
    name: str = "image",
) -> tuple[Frame, dict[str, Any]]:
    """Input and target of one frame (``key`` = micrograph index, frame index) and the facts
    the manifest records about it (the drawn dose, or the thinning's gain)."""
    if config.targets == "pairs":
        assert partner is not None
        return Frame(image, partner, norm_stats(image, config.normalization), False), {}
    inp = np.empty(image.shape, np.float32)
    tgt = np.empty(image.shape, np.float32)

    index, frame = key
    if config.targets == "thin":
        gain, found = count_gain(image, name)

        def halves(band: int, rows: slice) -> None:
            inp[rows], tgt[rows] = thin(image[rows], gain, _rng(config, index, frame, 2, band))

        _in_bands(pool, image.shape[0], halves)
        facts = {"gain": gain, "gain_from": found}
        return Frame(inp, tgt, norm_stats(inp, config.normalization), False), facts
    dose = config.noise.draw_dose(_rng(config, index, frame))
    n2n = config.targets == "noise2noise"
    if config.sampler == "torch":
        from cryodeploy.imaging.noise_torch import noisy_frame

        streams = [_seq(config, index, frame, draw) for draw in range(2 if n2n else 1)]
        inp, tgt, stats = noisy_frame(image, config.noise, dose, streams, config.normalization, config.device)
        return Frame(inp, tgt, stats, True), {"dose": dose}
    lo, hi = unit_range(image)

    def draw(band: int, rows: slice) -> None:
        clean01 = np.clip((image[rows] - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0, dtype=np.float32)
        inp[rows] = add_noise(clean01, config.noise, _rng(config, index, frame, 0, band), dose=dose)
        if n2n:
            tgt[rows] = add_noise(clean01, config.noise, _rng(config, index, frame, 1, band), dose=dose)
        else:
            tgt[rows] = clean01

    _in_bands(pool, image.shape[0], draw)
    return Frame(inp, tgt, norm_stats(inp, config.normalization), False), {"dose": dose}


def _prepare(
    index: int, path: Path, partner: Path | None, config: PreprocessConfig, pool: ThreadPoolExecutor | None
) -> _Prepared:
    mic = read_micrograph(path)
    other = read_micrograph(partner) if partner is not None else None
    frames, info = [], []
    partners: Iterable[np.ndarray | None] = (
        other.frames() if other is not None else [None] * mic.header.n_frames
    )
    for f, (image, pimage) in enumerate(zip(mic.frames(), partners, strict=True)):
        frame, facts = _prepare_frame(image, pimage, config, (index, f), pool, str(path))
        frames.append(frame)
        entry: dict[str, Any] = {
            "path": str(path.resolve()),
            "shape": list(image.shape),
            "center": frame.stats.center,
            "scale": frame.stats.scale,
            **facts,
        }
        if mic.data.ndim == 3:
            entry["frame"] = f
        if partner is not None:
            entry["target_path"] = str(partner.resolve())
        info.append(entry)
    return _Prepared(frames, info)


def _check_inputs(inputs: list[Path], target_dir: Path | None) -> list[Path | None]:
    """Read every header before any work (fail fast); return each input's target file, if pairs."""
    partners: list[Path | None] = []
    for p in inputs:
        shape = read_header(p).shape
        q = None if target_dir is None else target_dir / p.name
        if q is not None:
            if not q.is_file():
                raise InputError(f"{q}: no such file, expected the target of {p} (pairs match by file name)")
            target_shape = read_header(q).shape
            if target_shape != shape:
                raise InputError(f"{q}: shape {target_shape} differs from {p}'s {shape}, expected pairs")
        partners.append(q)
    return partners


def _prepared_stream(
    inputs: list[Path], partners: list[Path | None], config: PreprocessConfig, pool: ThreadPoolExecutor | None
) -> Iterator[_Prepared]:
    """Prepared micrographs in input order. With a pool, the next ``AHEAD`` micrographs are read
    and prepared at once (one thread each, their bands on the pool) while the caller writes the
    current one."""
    jobs = enumerate(zip(inputs, partners, strict=True))
    if pool is None:
        for i, (p, q) in jobs:
            yield _prepare(i, p, q, config, None)
        return
    with ThreadPoolExecutor(AHEAD, thread_name_prefix="preprocess-next") as ahead:
        pending: deque[Future[_Prepared]] = deque(
            ahead.submit(_prepare, i, p, q, config, pool) for i, (p, q) in itertools.islice(jobs, AHEAD)
        )
        try:
            while pending:
                current = pending.popleft()
                for i, (p, q) in itertools.islice(jobs, 1):
                    pending.append(ahead.submit(_prepare, i, p, q, config, pool))
                yield current.result()
                del current
        finally:
            for future in pending:
                future.cancel()


def preprocess(
    inputs: Sequence[str | os.PathLike[str]],
    store_dir: str | os.PathLike[str],
    config: PreprocessConfig,
    quiet: bool = False,
) -> PatchStore:
    """Cut ``inputs`` (micrograph paths) into patches and write the patch store ``store_dir``.

    Micrographs are streamed one at a time (see the module docstring for memory). The
    manifest is written last; on an error no manifest is written and the data files are removed.
    """
    if config.ndim != 2:
        raise ConfigError(
            "preprocess cuts micrographs (ndim 2); cut volumes with training.volumes.preprocess_volumes"
        )
    paths = [Path(p) for p in inputs]
    if not paths:
        raise InputError("no input micrographs given")
    partners = _check_inputs(paths, config.target_dir)
    sampler = sampler_record(config.sampler, config.device, config.targets)
    is_test = split_micrographs(len(paths), config.test_fraction, config.seed)
    patch, stride = config.patch_shape, config.stride_shape
    sources: list[dict[str, Any]] = []
    pool = ThreadPoolExecutor(config.workers, "preprocess") if config.workers else None
    with (
        new_folders_removed_if_empty(store_dir),
        pool or contextlib.nullcontext(),
        StoreWriter(store_dir, patch, config.overwrite) as writer,
        ThreadPoolExecutor(1, "preprocess-flush") as flusher,
        progress(len(paths), "preprocess", quiet) as task,
    ):
        for i, prepared in enumerate(_prepared_stream(paths, partners, config, pool)):
            split = "test" if is_test[i] else "train"
            for frame, entry in zip(prepared.frames, prepared.info, strict=True):
                start, count = write_frame(writer, split, frame, patch, stride, pool)
                flusher.submit(writer.write_behind, split, start, count)
                sources.append({**entry, "split": split, "start": start, "count": count})
                if count == 0:
                    log.warning(
                        "%s: %dx%d pixels is smaller than the %dx%d patch; no patches",
                        entry["path"],
                        frame.inp.shape[1],
                        frame.inp.shape[0],
                        patch[1],
                        patch[0],
                    )
            del prepared
            task.advance(1, patches=sum(writer.counts.values()))
        flusher.shutdown()
        if writer.counts["train"] == 0:
            raise ConfigError(
                f"no training patches: no train micrograph is at least {patch[1]}x{patch[0]} "
                "pixels (the patch size)"
            )
        store = writer.finish(
            normalization=config.normalization.to_dict(),
            noise=config.noise.to_dict() if config.targets in ("noise", "noise2noise") else None,
            targets=config.targets,
            sampler=sampler,
            stride=list(stride),
            test_fraction=config.test_fraction,
            seed=config.seed,
            sources=sources,
        )
    log.info("wrote %r", store)
    return store
