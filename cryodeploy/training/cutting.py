"""Cutting one prepared frame into the patch store: the patches, normalized as they are cut, written
by a pool's threads into reserved slots (:meth:`~cryodeploy.training.store.StoreWriter.write_at`)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from cryodeploy.imaging.normalize import NormStats, normalize
from cryodeploy.training.store import StoreWriter

__all__ = ["JOB_BYTES", "Frame", "run_jobs", "write_frame"]

#: Bytes of input patches one write job copies out of an image (and as many of targets).
JOB_BYTES = 4 << 20


@dataclass
class Frame:
    """One frame ready to be cut: input and target images, the stats that normalize both, and
    whether the images are normalized already (torch's sampler) or are normalized as they are cut."""

    inp: np.ndarray
    tgt: np.ndarray
    stats: NormStats
    normalized: bool


def run_jobs(pool: ThreadPoolExecutor | None, jobs: list[Callable[[], None]]) -> None:
    """Run ``jobs`` on ``pool`` (waiting for all), or one after the other without one."""
    if pool is None:
        for job in jobs:
            job()
        return
    for future in [pool.submit(job) for job in jobs]:
        future.result()


def write_frame(
    writer: StoreWriter,
    split: str,
    frame: Frame,
    patch: tuple[int, int],
    stride: tuple[int, int],
    pool: ThreadPoolExecutor | None,
) -> tuple[int, int]:
    """Write the patches of one frame's input and target (normalizing them as they are cut, unless
    they are already) to the next slots of ``split``, top to bottom, left to right, in jobs of
    about ``JOB_BYTES`` on ``pool``; returns the first slot and the count."""
    (ph, pw), (sy, sx) = patch, stride
    h, w = frame.inp.shape
    corners = [(y, x) for y in range(0, h - ph + 1, sy) for x in range(0, w - pw + 1, sx)]
    start = writer.reserve(split, len(corners))
    per_job = max(1, JOB_BYTES // (ph * pw * 4))

    def cut(image: np.ndarray, part: list[tuple[int, int]]) -> np.ndarray:
        out = np.empty((len(part), ph, pw), np.float32)
        for k, (y, x) in enumerate(part):
            if frame.normalized:
                out[k] = image[y : y + ph, x : x + pw]
            else:
                normalize(image[y : y + ph, x : x + pw], frame.stats, out=out[k])
        return out

    def write(first: int) -> None:
        part = corners[first : first + per_job]
        writer.write_at(split, start + first, cut(frame.inp, part), cut(frame.tgt, part))

    run_jobs(pool, [partial(write, first) for first in range(0, len(corners), per_job)])
    return start, len(corners)
