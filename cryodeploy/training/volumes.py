"""Stream volumes (tomograms) into a patch store of 3-D patches, one volume at a time.

The same targets as :mod:`cryodeploy.training.preprocess` for micrographs, per volume:

- ``pairs``: even/odd halves (:class:`~cryodeploy.io.tomopairs.TomoPair`) are input and target;
- ``noise`` / ``noise2noise``: a clean volume mapped to [0, 1] with synthetic Poisson + Gaussian
  noise as input and the clean volume (or a second draw) as target (supervised, synthetic data);
- ``thin``: two binomially thinned halves of a counted volume (integer counts, or a gain);
- ``none``: inputs only, for self-supervised training on single tomograms.

Input and target get the affine normalization :func:`~cryodeploy.imaging.normalize.norm_stats`
computes from the whole input volume, as inference does. Patches are cut in (z, y, x) order at
``stride`` steps (``--patch 64``: 64^3). The store has format ``cryodeploy-patches/2`` with
``ndim`` 3 (:mod:`cryodeploy.training.manifest`). Every header is read before any work.

Memory: one volume (and its partner) is in memory at a time, as float32, plus per-slab float64
temporaries; it does not grow with the number of volumes. ``workers`` threads share each
volume's slabs of 16 sections; each slab draws its noise from its own seeded stream, so the store
is the same for any number of workers. Patches are written by the workers into reserved slots.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError
from cryodeploy.files import new_folders_removed_if_empty
from cryodeploy.imaging.noise import add_noise, count_gain, unit_range
from cryodeploy.imaging.normalize import NormStats, norm_stats, normalize
from cryodeploy.imaging.volsplits import thin_volume
from cryodeploy.io.tomopairs import TomoPair
from cryodeploy.io.volumes import read_volume, read_volume_header
from cryodeploy.progress import progress
from cryodeploy.training.cutting import run_jobs
from cryodeploy.training.preprocess import PreprocessConfig, _rng, split_micrographs
from cryodeploy.training.store import PatchStore, StoreWriter

__all__ = ["preprocess_volumes"]

log = logging.getLogger(__name__)

#: Sections per slab: the unit of parallel work and of noise streams.
_SLAB = 16
#: Bytes of input patches one write job copies (and as many of targets).
_JOB_BYTES = 4 << 20


def _as_pair(item: TomoPair | str | os.PathLike[str]) -> TomoPair:
    if isinstance(item, TomoPair):
        return item
    p = Path(item)
    return TomoPair(p.name[: -len(p.suffix)] if p.suffix else p.name, p)


def _check_inputs(pairs: list[TomoPair], config: PreprocessConfig) -> None:
    """Read every header first (fail fast): volumes, partners of the same shape, and partners
    exactly when the targets are pairs."""
    for pair in pairs:
        shape = read_volume_header(pair.even).shape
        if (pair.odd is not None) != (config.targets == "pairs"):
            raise InputError(
                f"{pair.even}: {'has an odd half' if pair.odd else 'has no odd half'}, but targets are "
                f"{config.targets!r} ({'pairs need' if config.targets == 'pairs' else 'only pairs take'} one)"
            )
        if pair.odd is not None:
            other = read_volume_header(pair.odd).shape
            if other != shape:
                raise InputError(
                    f"{pair.odd}: shape {other} differs from {pair.even}'s {shape}, expected halves"
                )


def _in_slabs(pool: ThreadPoolExecutor | None, depth: int, work: Callable[[int, slice], None]) -> None:
    run_jobs(pool, [partial(work, b, slice(z, z + _SLAB)) for b, z in enumerate(range(0, depth, _SLAB))])


def _normalize_in_place(
    arrays: tuple[np.ndarray, ...], stats: NormStats, pool: ThreadPoolExecutor | None
) -> None:
    def work(_: int, zs: slice) -> None:
        for a in arrays:
            normalize(a[zs], stats, out=a[zs])

    _in_slabs(pool, arrays[0].shape[0], work)


def _prepare(
    index: int, pair: TomoPair, config: PreprocessConfig, pool: ThreadPoolExecutor | None
) -> tuple[np.ndarray, np.ndarray | None, NormStats, dict[str, Any]]:
    """Normalized input and target (None for ``none``) of one volume and the facts the manifest keeps."""
    vol = read_volume(pair.even).data
    facts: dict[str, Any] = {}
    if config.targets == "pairs":
        assert pair.odd is not None
        inp, tgt = vol, read_volume(pair.odd).data
    elif config.targets == "none":
        inp, tgt = vol, None
    elif config.targets == "thin":
        rows = vol[:, : vol.shape[1] // 2 * 2].reshape(-1, vol.shape[2])  # 2x2 blocks within sections
        gain, found = count_gain(rows, str(pair.even))
        inp, tgt = np.empty_like(vol), vol

        def halves(slab: int, zs: slice) -> None:
            inp[zs], vol[zs] = thin_volume(vol[zs], _rng(config, index, 2, slab), gain, str(pair.even))

        _in_slabs(pool, vol.shape[0], halves)
        facts = {"gain": gain, "gain_from": found}
    else:
        lo, hi = unit_range(vol.reshape(-1, vol.shape[-1]))
        dose = config.noise.draw_dose(_rng(config, index, 0))
        inp, tgt = np.empty_like(vol), vol
        n2n = config.targets == "noise2noise"

        def draw(slab: int, zs: slice) -> None:
            clean01 = np.clip((vol[zs] - np.float32(lo)) / np.float32(hi - lo), 0.0, 1.0, dtype=np.float32)
            inp[zs] = add_noise(clean01, config.noise, _rng(config, index, 0, slab), dose=dose)
            vol[zs] = (  # the target, in place of the clean volume
                add_noise(clean01, config.noise, _rng(config, index, 1, slab), dose=dose) if n2n else clean01
            )

        _in_slabs(pool, vol.shape[0], draw)
        facts = {"dose": dose}
    stats = norm_stats(inp, config.normalization)
    _normalize_in_place((inp,) if tgt is None else (inp, tgt), stats, pool)
    return inp, tgt, stats, facts


def _write_volume(
    writer: StoreWriter,
    split: str,
    inp: np.ndarray,
    tgt: np.ndarray | None,
    config: PreprocessConfig,
    pool: ThreadPoolExecutor | None,
) -> int:
    """Write the patches of one volume to the next slots of ``split`` in (z, y, x) order; their count."""
    (pd, ph, pw), (sz, sy, sx) = config.patch_box, config.stride_box
    d, h, w = inp.shape
    corners = [
        (z, y, x)
        for z in range(0, d - pd + 1, sz)
        for y in range(0, h - ph + 1, sy)
        for x in range(0, w - pw + 1, sx)
    ]
    start = writer.reserve(split, len(corners))
    per_job = max(1, _JOB_BYTES // (pd * ph * pw * 4))

    def cut(img: np.ndarray, part: list[tuple[int, int, int]]) -> np.ndarray:
        return np.stack([img[z : z + pd, y : y + ph, x : x + pw] for z, y, x in part])

    def write(first: int) -> None:
        part = corners[first : first + per_job]
        writer.write_at(split, start + first, cut(inp, part), None if tgt is None else cut(tgt, part))

    run_jobs(pool, [partial(write, first) for first in range(0, len(corners), per_job)])
    return len(corners)


def preprocess_volumes(
    inputs: Sequence[TomoPair | str | os.PathLike[str]],
    store_dir: str | os.PathLike[str],
    config: PreprocessConfig,
    quiet: bool = False,
) -> PatchStore:
    """Cut volumes (paths, or :class:`TomoPair` s for ``pairs``) into 3-D patches and write the store.

    ``config.ndim`` must be 3. Volumes are streamed one at a time (see the module docstring); the
    manifest is written last, and on an error no manifest is written and the data files are removed.
    """
    if config.ndim != 3:
        raise ConfigError(f"preprocess_volumes needs ndim 3, found {config.ndim}")
    pairs = [_as_pair(i) for i in inputs]
    if not pairs:
        raise InputError("no input volumes given")
    _check_inputs(pairs, config)
    is_test = split_micrographs(len(pairs), config.test_fraction, config.seed)
    patch = config.patch_box
    sources: list[dict[str, Any]] = []
    pool = ThreadPoolExecutor(config.workers, "preprocess") if config.workers else None
    with (
        new_folders_removed_if_empty(store_dir),
        pool or contextlib.nullcontext(),
        StoreWriter(store_dir, patch, config.overwrite, targets=config.targets != "none") as writer,
        progress(len(pairs), "preprocess", quiet) as task,
    ):
        for i, pair in enumerate(pairs):
            split = "test" if is_test[i] else "train"
            inp, tgt, stats, facts = _prepare(i, pair, config, pool)
            start = writer.counts[split]
            count = _write_volume(writer, split, inp, tgt, config, pool)
            entry: dict[str, Any] = {
                "path": str(pair.even.resolve()),
                "name": pair.name,
                "shape": list(inp.shape),
                "center": stats.center,
                "scale": stats.scale,
                **facts,
                "split": split,
                "start": start,
                "count": count,
            }
            if pair.odd is not None:
                entry["target_path"] = str(pair.odd.resolve())
            sources.append(entry)
            if count == 0:
                log.warning(
                    "%s: %s voxels is smaller than the %s patch; no patches",
                    pair.even,
                    "x".join(map(str, inp.shape[::-1])),
                    "x".join(map(str, patch[::-1])),
                )
            del inp, tgt
            task.advance(1, patches=sum(writer.counts.values()))
        if writer.counts["train"] == 0:
            raise ConfigError(
                f"no training patches: no train volume is at least "
                f"{'x'.join(map(str, patch[::-1]))} voxels (the patch size)"
            )
        store = writer.finish(
            normalization=config.normalization.to_dict(),
            noise=config.noise.to_dict() if config.targets in ("noise", "noise2noise") else None,
            targets=config.targets,
            stride=list(config.stride_box),
            test_fraction=config.test_fraction,
            seed=config.seed,
            sources=sources,
        )
    log.info("wrote %r", store)
    return store
