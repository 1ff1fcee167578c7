"""MRC data blocks without extra passes: read the pixel bytes straight into a caller's buffer, and
write a header (with statistics computed elsewhere, e.g. on a GPU) followed by the raw bytes.

The header written is the one :func:`~cryodeploy.io.mrc.write_micrograph` writes for the same data
and statistics, byte for byte (tests/io/test_rawmrc.py); the write is atomic.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Protocol

import numpy as np

from cryodeploy.errors import InputError, OutputError
from cryodeploy.files import atomic_write
from cryodeploy.io.mrc import SUPPORTED_MODES, MicrographHeader, _describe

__all__ = ["DataLayout", "HeaderStats", "data_layout", "data_stats", "read_data_into", "write_raw_micrograph"]

#: (min, max, mean, rms) of the data, as the header stores them
HeaderStats = tuple[float, float, float, float]


_CHUNK = 1 << 20


class DataLayout(Protocol):
    """What locating a data block needs from a checked header (a micrograph's or a volume's)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def mode(self) -> int: ...


def data_stats(data: np.ndarray) -> HeaderStats:
    """(min, max, mean, rms) as the header stores them, accumulated in float64 over chunks of 2^20
    pixels (no full-size temporary)."""
    flat = data.reshape(-1)
    total = sum(float(flat[i:i + _CHUNK].sum(dtype=np.float64)) for i in range(0, flat.size, _CHUNK))
    mean = total / flat.size
    sq = sum(float(np.square(flat[i:i + _CHUNK].astype(np.float64) - mean).sum())
             for i in range(0, flat.size, _CHUNK))
    return float(data.min()), float(data.max()), mean, (sq / flat.size) ** 0.5


def data_layout(path: str | os.PathLike[str], header: DataLayout) -> tuple[int, np.dtype]:
    """Byte offset of the data block and its dtype (with the file's byte order)."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    big = head[212:214] == b"\x11\x11"
    (nsymbt,) = struct.unpack_from(">i" if big else "<i", head, 92)
    return 1024 + nsymbt, np.dtype(SUPPORTED_MODES[header.mode]).newbyteorder(">" if big else "<")


def read_data_into(path: str | os.PathLike[str], header: DataLayout, buffer: np.ndarray) -> np.ndarray:
    """Read the data block of a checked MRC file (see :func:`~cryodeploy.io.mrc.read_header`,
    :func:`~cryodeploy.io.volumes.read_volume_header`) into
    ``buffer`` (a writable uint8 array at least as large); returns it viewed as the file's pixels
    in native byte order (a copy only for a big-endian file)."""
    p = Path(path)
    offset, dtype = data_layout(p, header)
    count = int(np.prod(header.shape))
    nbytes = count * dtype.itemsize
    if buffer.nbytes < nbytes:
        raise ValueError(f"buffer of {buffer.nbytes} bytes, expected at least {nbytes}")
    view = memoryview(buffer.reshape(-1)[:nbytes])  # type: ignore[arg-type]
    try:
        with open(p, "rb", buffering=0) as fh:
            fh.seek(offset)
            done = 0
            while done < nbytes:
                n = fh.readinto(view[done:])
                if not n:
                    raise InputError(
                        f"{p}: truncated file, found {offset + done} bytes, expected {offset + nbytes}"
                    )
                done += n
    except OSError as err:
        raise InputError(f"{p}: not a readable MRC file ({err.strerror or err})") from err
    data = np.frombuffer(buffer.reshape(-1)[:nbytes], dtype=dtype).reshape(header.shape)
    return data if dtype.isnative else data.astype(dtype.newbyteorder("="))


def write_raw_micrograph(
    path: str | os.PathLike[str],
    data: np.ndarray,
    stats: HeaderStats,
    header: MicrographHeader | None = None,
    protect: tuple[str | os.PathLike[str], ...] = (),
    label: str | None = None,
) -> Path:
    """Write ``data`` (C-contiguous float32 or float16, 2-D or a stack) with header ``stats`` atomically."""
    from mrcfile.mrcinterpreter import MrcInterpreter

    if data.dtype not in (np.float32, np.float16) or not data.flags.c_contiguous:
        raise OutputError(f"{path}: raw data must be C-contiguous float32 or float16, found {data.dtype}")
    if header is not None and tuple(data.shape) != tuple(header.shape):
        raise OutputError(f"{path}: data shape {data.shape} differs from the header's {header.shape}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mrc = MrcInterpreter()
        mrc._create_default_attributes()
        mrc._set_new_data(data)  # no copy, no statistics pass: both are the caller's
        mrc.update_header_from_data()
        _describe(mrc, "stack" if data.ndim == 3 else "image", header, label)
        h = mrc.header
        h.dmin, h.dmax, h.dmean, h.rms = (np.float32(v) for v in stats)
        target = Path(path)
        with atomic_write(target, protect) as tmp, open(tmp, "wb") as fh:
            fh.write(h.tobytes())
            fh.write(mrc.extended_header.tobytes())
            fh.write(data.data)
    return target
