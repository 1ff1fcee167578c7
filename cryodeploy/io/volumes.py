"""Read, validate and atomically write 3-D volumes (tomograms) in MRC format (via mrcfile).

A 3-D MRC file is either a stack of 2-D images or one volume, and the header says so only
loosely (see docs/volumes.md). :func:`mrc_kind` applies one rule, in this order:

1. ``nz == 1``: a 2-D ``image``.
2. ``.mrcs``: an image ``stack``, whatever the header (RELION's convention).
3. ``.rec``: a ``volume``, whatever the header (IMOD's tomogram extension).
4. space group 401-630: a ``volume-stack`` (several volumes), refused by every reader.
5. space group 1-230: a ``volume`` (MRC2014; mrcfile's ``set_volume``, ``is_volume``).
6. space group 0 with ``mz == 1`` (or ``mz`` not ``nz``): an image ``stack`` (MRC2014;
   mrcfile's ``set_image_stack``, what cryodeploy writes for stacks).
7. space group 0 with ``mz == nz``: ``ambiguous``. RELION 5 writes its tomograms and maps so
   (relion#1345) and so do tools that leave ``ispg`` at 0; so may a movie. The micrograph
   reader keeps reading it as a stack (unchanged); :func:`read_volume` reads it as a volume,
   because the caller asked for one.
8. any other space group: refused.

A volume needs at least :data:`MIN_DEPTH` sections and :data:`~cryodeploy.io.mrc.MIN_SIZE`
pixels a side. Voxel size, origin, start indices, extended header and labels are kept, and
:func:`write_volume` writes them back with space group 1 (``mz == nz``), so its output is an
unambiguous volume.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cryodeploy.errors import InputError, OutputError
from cryodeploy.io.mrc import (
    MIN_SIZE,
    SUPPORTED_MODES,
    _ascii_label,
    _check_file,
    _describe,
    _open_error,
    write_mrc,
)

__all__ = [
    "KINDS",
    "MIN_DEPTH",
    "VOLUME_SUFFIXES",
    "Volume",
    "VolumeHeader",
    "mrc_kind",
    "read_volume",
    "read_volume_header",
    "validate_volume",
    "write_volume",
]

#: Fewest sections (nz) of a volume: a tomogram thinner than this is refused.
MIN_DEPTH = 16
#: File name endings taken as volumes from a directory.
VOLUME_SUFFIXES = (".mrc", ".rec", ".map")
#: What :func:`mrc_kind` can say about a file.
KINDS = ("image", "stack", "volume", "volume-stack", "ambiguous", "unknown")


def mrc_kind(path: str | os.PathLike[str], nz: int, ispg: int, mz: int) -> str:
    """The kind of an MRC file by the module's rule: one of :data:`KINDS`."""
    suffix = Path(path).suffix.lower()
    if nz == 1:
        return "image"
    if suffix == ".mrcs":
        return "stack"
    if suffix == ".rec":
        return "volume"
    if 401 <= ispg <= 630:
        return "volume-stack"
    if 1 <= ispg <= 230:
        return "volume"
    if ispg == 0:
        return "ambiguous" if mz == nz else "stack"
    return "unknown"


@dataclass(frozen=True)
class VolumeHeader:
    """Header fields that a derived volume keeps; ``shape`` is (nz, ny, nx); ``kind`` is
    ``volume`` or ``ambiguous`` (:func:`mrc_kind`)."""

    shape: tuple[int, int, int]
    mode: int
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    nstart: tuple[int, int, int] = (0, 0, 0)
    ispg: int = 1
    kind: str = "volume"
    exttyp: bytes = b""
    extended_header: bytes = field(default=b"", repr=False)
    labels: tuple[str, ...] = ()


@dataclass
class Volume:
    """A volume as float32 [nz, ny, nx] with its header."""

    path: Path
    data: np.ndarray
    header: VolumeHeader = field(repr=False)


def _refusal(p: Path, kind: str, nx: int, ny: int, nz: int, ispg: int, mz: int) -> str | None:
    """Why a file of ``kind`` is not a volume (None if it is one)."""
    size = f"{nx}x{ny}x{nz}"
    if kind == "image":
        return f"{p}: found a 2-D image ({nx}x{ny}), expected a 3-D volume of at least {MIN_DEPTH} sections"
    if kind == "stack":
        why = "the .mrcs extension" if p.suffix.lower() == ".mrcs" else f"space group 0 with mz {mz}"
        return (
            f"{p}: found an image stack ({size}, {why}), expected a 3-D volume "
            "(space group 1-230, space group 0 with mz = nz, or a .rec file)"
        )
    if kind == "volume-stack":
        return f"{p}: found a stack of volumes ({size}, space group {ispg}), expected one 3-D volume"
    if kind == "unknown":
        return f"{p}: found space group {ispg}, expected 0 (with mz = nz) or 1-230 for a 3-D volume"
    return None


def _header_from(mrc: object, p: Path, min_depth: int) -> VolumeHeader:
    import mrcfile.mrcobject

    assert isinstance(mrc, mrcfile.mrcobject.MrcObject)
    h = mrc.header
    mode = int(h.mode)
    if mode not in SUPPORTED_MODES:
        raise InputError(
            f"{p}: unsupported MRC mode {mode}, expected one of "
            + ", ".join(f"{m} ({n})" for m, n in SUPPORTED_MODES.items())
        )
    nx, ny, nz, ispg, mz = int(h.nx), int(h.ny), int(h.nz), int(h.ispg), int(h.mz)
    kind = mrc_kind(p, nz, ispg, mz)
    why = _refusal(p, kind, nx, ny, nz, ispg, mz)
    if why:
        raise InputError(why)
    if nz < min_depth:
        raise InputError(
            f"{p}: found a volume of {nz} sections ({nx}x{ny}x{nz}), expected at least {min_depth}"
        )
    expected = 1024 + int(h.nsymbt) + nx * ny * nz * np.dtype(SUPPORTED_MODES[mode]).itemsize
    found = p.stat().st_size
    if found < expected:
        raise InputError(
            f"{p}: truncated file, found {found} bytes, expected {expected} "
            f"(a {nx}x{ny}x{nz} mode {mode} data block after the headers)"
        )
    vs, ext = mrc.voxel_size, mrc.extended_header
    texts = (_ascii_label(lab.decode("ascii", "replace")).strip() for lab in h.label[: int(h.nlabl)])
    return VolumeHeader(
        shape=(nz, ny, nx),
        mode=mode,
        voxel_size=(float(vs.x), float(vs.y), float(vs.z)),
        origin=(float(h.origin.x), float(h.origin.y), float(h.origin.z)),
        nstart=(int(h.nxstart), int(h.nystart), int(h.nzstart)),
        ispg=ispg,
        kind=kind,
        exttyp=bytes(h.exttyp),
        extended_header=ext.tobytes() if ext is not None else b"",
        labels=tuple(t for t in texts if t),
    )


def read_volume_header(path: str | os.PathLike[str], min_depth: int = MIN_DEPTH) -> VolumeHeader:
    """Read and check only the header of a volume (cheap: plan work before reading data)."""
    import mrcfile

    p = Path(path)
    _check_file(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(p, mode="r", header_only=True, permissive=False) as mrc:
                return _header_from(mrc, p, min_depth)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, TypeError, IndexError) as err:
        raise _open_error(p, err) from err


def validate_volume(
    data: np.ndarray, path: str | os.PathLike[str], min_size: int = MIN_SIZE, min_depth: int = MIN_DEPTH
) -> None:
    """Check a volume's voxels: [nz, ny, nx] with nz >= ``min_depth`` and ny, nx >= ``min_size``,
    finite and not constant (single sections may be constant: padding)."""
    p = Path(path)
    if data.ndim != 3:
        raise InputError(f"{p}: found an array of shape {data.shape}, expected a 3-D volume [nz, ny, nx]")
    nz, ny, nx = data.shape
    if ny < min_size or nx < min_size or nz < min_depth:
        raise InputError(
            f"{p}: volume is {nx}x{ny}x{nz} voxels, expected at least {min_size}x{min_size}x{min_depth}"
        )
    lo, hi = float(data.min()), float(data.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        bad = ~np.isfinite(data)
        first = int(np.flatnonzero(bad.any(axis=(1, 2)))[0])
        raise InputError(
            f"{p}: found {int(bad.sum())} NaN/Inf values (first in section {first}), expected finite voxels"
        )
    if lo == hi:
        raise InputError(f"{p}: volume is constant ({lo:g}), expected non-zero variance")


def read_volume(path: str | os.PathLike[str], min_size: int = MIN_SIZE, min_depth: int = MIN_DEPTH) -> Volume:
    """Read an MRC volume as float32 [nz, ny, nx] and validate it.

    Raises :class:`InputError` ("<file>: ...") for a file that is missing, not MRC, truncated,
    of an unsupported mode, not a volume by :func:`mrc_kind`, thinner than ``min_depth``
    sections, smaller than ``min_size`` a side, non-finite or constant.
    """
    import mrcfile

    p = Path(path)
    header = read_volume_header(p, min_depth)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.mmap(p, mode="r", permissive=False) as mrc:
                raw = mrc.data
                if raw is None:
                    raise InputError(f"{p}: MRC file has no data block")
                data = np.empty(header.shape, np.float32)
                for z in range(0, header.shape[0], 32):  # no float64 or whole-file temporaries
                    data[z : z + 32] = raw[z : z + 32]
    except InputError:
        raise
    except (ValueError, OSError, EOFError, TypeError, IndexError, MemoryError) as err:
        raise _open_error(p, err) from err
    validate_volume(data, p, min_size, min_depth)
    return Volume(path=p, data=data, header=header)


def write_volume(
    path: str | os.PathLike[str],
    data: np.ndarray,
    header: VolumeHeader | None = None,
    dtype: str = "float32",
    protect: tuple[str | os.PathLike[str], ...] = (),
    label: str | None = None,
) -> Path:
    """Write ``data`` [nz, ny, nx] atomically as a float32 or float16 MRC volume (space group 1,
    ``mz == nz``) with header statistics. With ``header`` the voxel size, origin, start indices,
    extended header and labels are carried over. ``protect`` lists inputs never to overwrite."""
    if np.ndim(data) != 3:
        raise OutputError(f"{path}: found data of shape {np.shape(data)}, expected a 3-D volume [nz, ny, nx]")
    return write_mrc(path, data, header.shape if header is not None else None, dtype, protect,
                     lambda mrc: _describe(mrc, "volume", header, label))
