"""Volumes without whole-volume temporaries: read a volume's data block straight into one float32
array, and write a volume slab by slab with the header statistics accumulated on the way.

:func:`read_volume_data` gives the voxels and checks of :func:`~cryodeploy.io.volumes.read_volume`
(the same header rules, :func:`~cryodeploy.io.volumes.read_volume_header`), holding one float32
array (plus the file's own bytes while they are converted, for modes other than float32).
:func:`write_raw_volume` writes the header :func:`~cryodeploy.io.volumes.write_volume` writes for the
same data, byte for byte except ``dmean`` and ``rms``: those are accumulated here in float64 over
slabs (mrcfile takes them in float32 over the whole array), so the two agree to float32 rounding
(tests/io/test_rawvolume.py). Its temporaries are one slab (about 2^20 voxels) in the output
dtype and in float64; the write is atomic.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from cryodeploy.errors import OutputError
from cryodeploy.files import atomic_write
from cryodeploy.io.mrc import MIN_SIZE, SUPPORTED_MODES, _describe
from cryodeploy.io.rawmrc import HeaderStats, read_data_into
from cryodeploy.io.volumes import MIN_DEPTH, VolumeHeader, validate_volume

__all__ = ["read_volume_data", "volume_header_bytes", "write_raw_volume"]

_OUT_DTYPES = {"float32": np.float32, "float16": np.float16}
#: voxels per slab of the writer (whole sections, at least one)
_SLAB_VOXELS = 1 << 20


def read_volume_data(path: str | os.PathLike[str], header: VolumeHeader, min_size: int = MIN_SIZE,
                     min_depth: int = MIN_DEPTH) -> np.ndarray:
    """The voxels of a volume whose ``header`` was read and checked, as one new float32 array
    [nz, ny, nx], validated as :func:`~cryodeploy.io.volumes.read_volume` validates them."""
    voxels = int(np.prod(header.shape))
    if header.mode == 2:
        data = np.empty(header.shape, np.float32)
        raw = read_data_into(path, header, data.view(np.uint8))
        if not np.shares_memory(raw, data):  # a big-endian file, byte-swapped into a new array
            data = raw
    else:
        itemsize = np.dtype(SUPPORTED_MODES[header.mode]).itemsize
        raw = read_data_into(path, header, np.empty(voxels * itemsize, np.uint8))
        data = raw.astype(np.float32)
        del raw
    validate_volume(data, path, min_size, min_depth)
    return data


def volume_header_bytes(shape: tuple[int, int, int], dtype: str, stats: HeaderStats,
                        header: VolumeHeader | None = None, label: str | None = None) -> bytes:
    """The 1024-byte main header and the extended header :func:`~cryodeploy.io.volumes.write_volume`
    writes for data of ``shape`` and ``dtype`` with header statistics ``stats``."""
    from mrcfile.mrcinterpreter import MrcInterpreter

    dummy = np.lib.stride_tricks.as_strided(np.zeros(1, _OUT_DTYPES[dtype]), shape, (0, 0, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mrc = MrcInterpreter()
        mrc._create_default_attributes()
        mrc._set_new_data(dummy)  # shape and dtype only: no voxel is read
        mrc.update_header_from_data()
        _describe(mrc, "volume", header, label)
        h = mrc.header
        h.dmin, h.dmax, h.dmean, h.rms = (np.float32(v) for v in stats)
        return bytes(h.tobytes()) + bytes(mrc.extended_header.tobytes())


def _slabs(nz: int, section: int) -> list[slice]:
    step = max(1, _SLAB_VOXELS // max(1, section))
    return [slice(z, min(z + step, nz)) for z in range(0, nz, step)]


def write_raw_volume(
    path: str | os.PathLike[str],
    data: np.ndarray,
    header: VolumeHeader | None = None,
    dtype: str = "float32",
    protect: tuple[str | os.PathLike[str], ...] = (),
    label: str | None = None,
    stats: HeaderStats | None = None,
) -> Path:
    """Write ``data`` [nz, ny, nx] (float32, any strides: e.g. a crop of a padded array) atomically
    as a float32 or float16 MRC volume, as :func:`~cryodeploy.io.volumes.write_volume` does, cast
    and written slab by slab. ``stats`` (min, max, mean, rms) are the header's when given (data
    already of ``dtype``, e.g. computed on a GPU), else accumulated from the slabs written."""
    if dtype not in _OUT_DTYPES:
        raise OutputError(f"{path}: output dtype {dtype!r} not supported, expected float32 or float16")
    if np.ndim(data) != 3:
        raise OutputError(f"{path}: found data of shape {np.shape(data)}, expected a 3-D volume [nz, ny, nx]")
    shape = (int(data.shape[0]), int(data.shape[1]), int(data.shape[2]))
    if header is not None and shape != tuple(header.shape):
        raise OutputError(f"{path}: data shape {shape} differs from the header's {header.shape}")
    out_type = _OUT_DTYPES[dtype]
    size = len(volume_header_bytes(shape, dtype, (0.0, 0.0, 0.0, 0.0), header, label))
    acc = _Stats()
    with atomic_write(Path(path), protect) as tmp, open(tmp, "wb") as fh:
        fh.seek(size)
        for zs in _slabs(shape[0], shape[1] * shape[2]):
            with np.errstate(over="ignore", invalid="ignore"):
                slab = np.ascontiguousarray(data[zs], dtype=out_type)
            if stats is None:
                acc.add(slab, data[zs])
            fh.write(slab.data)
        found = acc.result(path, dtype) if stats is None else stats
        fh.seek(0)
        fh.write(volume_header_bytes(shape, dtype, found, header, label))
    return Path(path)


class _Stats:
    """(min, max, mean, rms) over slabs: mean and population std merged in float64 (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0
        self.lo, self.hi = np.inf, -np.inf
        self.bad, self.source_finite = 0, True

    def add(self, slab: np.ndarray, source: np.ndarray) -> None:
        lo, hi = float(slab.min()), float(slab.max())
        if not (np.isfinite(lo) and np.isfinite(hi)):
            self.bad += int(slab.size - np.count_nonzero(np.isfinite(slab)))
            self.source_finite &= bool(np.isfinite(source).all())
            return
        self.lo, self.hi = min(self.lo, lo), max(self.hi, hi)
        x = slab.reshape(-1).astype(np.float64)
        n, mean = x.size, float(x.mean())
        x -= mean
        m2 = float(np.dot(x, x))
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def result(self, path: str | os.PathLike[str], dtype: str) -> HeaderStats:
        if self.bad:
            limit = float(np.finfo(np.dtype(dtype)).max)
            why = f" (values beyond the {dtype} range of +-{limit:g}; write float32 instead)" \
                if self.source_finite else ""
            raise OutputError(
                f"{path}: found {self.bad} NaN/Inf values in the {dtype} output{why}, expected finite pixels"
            )
        return self.lo, self.hi, self.mean, (self.m2 / self.n) ** 0.5
