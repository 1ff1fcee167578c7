"""Builders of real MRC files, good and damaged, shared by the fuzz and robustness tests.

Every file is written by mrcfile and then damaged at the byte level (header fields, single
bytes, truncation), the way a bad disk, an interrupted copy or a foreign writer damages it.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path

import mrcfile
import numpy as np

#: modes cryodeploy reads, with the numpy type mrcfile writes for each
MODES: dict[int, type] = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}
#: byte offset of 4-byte header words (MRC2014), little-endian as mrcfile writes them here
FIELDS: dict[str, int] = {
    "nx": 0,
    "ny": 4,
    "nz": 8,
    "mode": 12,
    "nxstart": 16,
    "mx": 28,
    "my": 32,
    "mz": 36,
    "cella_x": 40,
    "mapc": 64,
    "mapr": 68,
    "maps": 72,
    "dmin": 76,
    "dmax": 80,
    "ispg": 88,
    "nsymbt": 92,
    "exttyp": 104,
    "nversion": 108,
    "origin_x": 196,
    "map": 208,
    "machst": 212,
    "rms": 216,
    "nlabl": 220,
}
#: header bytes that decide where and how pixels are read (dimensions, mode, ext. header, ID, byte order)
LAYOUT_BYTES = frozenset(range(0, 16)) | frozenset(range(92, 96)) | frozenset(range(208, 216))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def pixels(rng: np.random.Generator, mode: int, shape: tuple[int, ...]) -> np.ndarray:
    """Random, non-constant pixels of ``mode``'s type (integers over a wide part of their range)."""
    dtype = MODES[mode]
    data: np.ndarray
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        data = rng.integers(max(info.min, -20000), min(info.max, 20000) + 1, size=shape).astype(dtype)
    else:
        data = (rng.standard_normal(shape) * 50 + 10).astype(dtype)
    data.reshape(-1, *shape[-2:])[:, 0, 0] = 1  # two distinct values per frame: never constant
    data.reshape(-1, *shape[-2:])[:, -1, -1] = 2
    return data


def write_mrc(
    path: Path, data: np.ndarray, ext: bytes = b"", exttyp: bytes = b"", stack: bool = False
) -> Path:
    """Write ``data`` with mrcfile (its dtype picks the mode), with an optional extended header, as a
    stack if asked."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mrcfile warns about the NaN/Inf some cases write on purpose
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data)
            if stack:
                mrc.set_image_stack()
            if ext:
                mrc.set_extended_header(np.frombuffer(ext, dtype="V1"))
                mrc.header.exttyp = exttyp or b"FEI2"
            mrc.voxel_size = (1.5, 1.5, 1.5)
    return path


def set_field(path: Path, name: str, value: int | bytes) -> None:
    """Overwrite header word ``name`` with an int32 (little-endian) or 4 raw bytes."""
    raw = struct.pack("<i", value) if isinstance(value, int) else value
    assert len(raw) == 4
    edit_bytes(path, [(FIELDS[name] + i, b) for i, b in enumerate(raw)])


def edit_bytes(path: Path, edits: list[tuple[int, int]]) -> None:
    """Set byte ``offset`` to ``value`` for each (offset, value)."""
    with open(path, "r+b") as fh:
        for offset, value in edits:
            fh.seek(offset)
            fh.write(bytes([value]))


def regions(path: Path) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of the header, extended header and data of a good file."""
    with open(path, "rb") as fh:
        head = fh.read(1024)
    (nsymbt,) = struct.unpack_from("<i", head, FIELDS["nsymbt"])
    size = path.stat().st_size
    return {"header": (0, 1024), "extended header": (1024, 1024 + nsymbt), "data": (1024 + nsymbt, size)}


def truncate(path: Path, size: int) -> None:
    """Cut the file to ``size`` bytes."""
    with open(path, "r+b") as fh:
        fh.truncate(size)
