"""Read, validate and atomically write micrographs in MRC format (via mrcfile).

A micrograph is read into float32 with the header fields a denoised copy must keep
(voxel size, origin, start indices, space group, extended header). Every problem is a
one-line :class:`~cryodeploy.errors.InputError` naming the file.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.errors import InputError, OutputError, first_line
from cryodeploy.files import atomic_write

__all__ = [
    "MIN_SIZE",
    "SUPPORTED_MODES",
    "Micrograph",
    "MicrographHeader",
    "check_output_finite",
    "read_header",
    "read_micrograph",
    "validate_array",
    "write_micrograph",
    "write_mrc",
]

#: MRC modes we read: int8, int16, float32, uint16, float16.
SUPPORTED_MODES = {0: "int8", 1: "int16", 2: "float32", 6: "uint16", 12: "float16"}
#: Smallest accepted image side in pixels (a model with a larger receptive field asks for more).
MIN_SIZE = 32


@dataclass(frozen=True)
class MicrographHeader:
    """Header fields that a derived micrograph keeps."""

    shape: tuple[int, ...]
    mode: int
    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    nstart: tuple[int, int, int] = (0, 0, 0)
    ispg: int = 0
    exttyp: bytes = b""
    extended_header: bytes = field(default=b"", repr=False)
    labels: tuple[str, ...] = ()

    @property
    def is_stack(self) -> bool:
        """True for a stack of 2-D frames (nz > 1)."""
        return len(self.shape) == 3

    @property
    def frame_shape(self) -> tuple[int, int]:
        """(height, width) of one frame."""
        return int(self.shape[-2]), int(self.shape[-1])

    @property
    def n_frames(self) -> int:
        """Number of 2-D frames (1 for a single micrograph)."""
        return int(self.shape[0]) if self.is_stack else 1


@dataclass
class Micrograph:
    """A micrograph (2-D) or stack (3-D, frames first) as float32, with its header."""

    path: Path
    data: np.ndarray
    header: MicrographHeader = field(repr=False)

    def frames(self) -> Iterator[np.ndarray]:
        """Yield each 2-D frame (a single micrograph yields itself)."""
        if self.data.ndim == 2:
            yield self.data
        else:
            yield from self.data


def _open_error(path: Path, err: Exception) -> InputError:
    text = first_line(err, type(err).__name__)
    return InputError(f"{path}: not a readable MRC file ({text})")


def _header_from(mrc: object, path: Path) -> MicrographHeader:
    import mrcfile.mrcobject

    assert isinstance(mrc, mrcfile.mrcobject.MrcObject)
    h = mrc.header
    mode = int(h.mode)
    if mode not in SUPPORTED_MODES:
        raise InputError(
            f"{path}: unsupported MRC mode {mode}, expected one of "
            + ", ".join(f"{m} ({n})" for m, n in SUPPORTED_MODES.items())
        )
    nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
    ispg = int(h.ispg)
    if nz > 1 and ispg != 0 and path.suffix.lower() != ".mrcs":  # .mrcs: a stack, as RELION reads it
        raise InputError(
            f"{path}: found a 3-D volume ({nx}x{ny}x{nz}, space group {ispg}), "
            "expected a 2-D micrograph or an image stack (space group 0)"
        )
    expected = 1024 + int(h.nsymbt) + nx * ny * nz * np.dtype(SUPPORTED_MODES[mode]).itemsize
    found = path.stat().st_size
    if found < expected:
        raise InputError(
            f"{path}: truncated file, found {found} bytes, expected {expected} "
            f"(a {nx}x{ny}x{nz} mode {mode} data block after the headers)"
        )
    shape: tuple[int, ...] = (ny, nx) if nz == 1 else (nz, ny, nx)
    vs = mrc.voxel_size
    ext = mrc.extended_header
    texts = (_ascii_label(lab.decode("ascii", "replace")).strip() for lab in h.label[: int(h.nlabl)])
    labels = tuple(t for t in texts if t)
    return MicrographHeader(
        shape=shape,
        mode=mode,
        voxel_size=(float(vs.x), float(vs.y), float(vs.z)),
        origin=(float(h.origin.x), float(h.origin.y), float(h.origin.z)),
        nstart=(int(h.nxstart), int(h.nystart), int(h.nzstart)),
        ispg=ispg,
        exttyp=bytes(h.exttyp),
        extended_header=ext.tobytes() if ext is not None else b"",
        labels=labels,
    )


def read_header(path: str | os.PathLike[str]) -> MicrographHeader:
    """Read and check only the header (cheap; used to plan work before reading data)."""
    import mrcfile

    p = Path(path)
    _check_file(p)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(p, mode="r", header_only=True, permissive=False) as mrc:
                header = _header_from(mrc, p)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, TypeError, IndexError) as err:
        raise _open_error(p, err) from err
    return header


#: leading bytes of compressed files, which mrcfile would report as truncated or not MRC
_COMPRESSED = ((b"\x1f\x8b\x08", "gzip", "gunzip"), (b"BZh", "bzip2", "bunzip2"),
               (b"\xfd7zXZ\x00", "xz", "unxz"), (b"\x28\xb5\x2f\xfd", "zstd", "unzstd"))


def _check_file(p: Path) -> None:
    if not p.exists():
        if p.is_symlink():
            try:
                os.stat(p)
            except OSError as err:
                if err.errno == errno.ELOOP:
                    raise InputError(f"{p}: symbolic link loop") from err
        raise InputError(f"{p}: no such file")
    if p.is_dir():
        raise InputError(f"{p}: is a directory, expected an MRC file")
    mode = p.stat().st_mode
    if not stat.S_ISREG(mode):  # a FIFO or device would block or never end
        raise InputError(f"{p}: not a regular file (found {_file_kind(mode)}), expected an MRC file")
    if not os.access(p, os.R_OK):
        raise InputError(f"{p}: not readable (permission denied)")
    if p.stat().st_size == 0:
        raise InputError(f"{p}: empty file, expected an MRC file")
    _check_compressed(p)
    _check_layout(p)


def _check_compressed(p: Path) -> None:
    try:
        with open(p, "rb") as fh:
            head = fh.read(6)
    except OSError:
        return  # the layout check reports it
    for magic, kind, tool in _COMPRESSED:
        if head.startswith(magic):
            raise InputError(f"{p}: compressed MRC ({kind}): decompress first (e.g. {tool})")


def _file_kind(mode: int) -> str:
    kinds = {
        stat.S_ISFIFO: "a named pipe", stat.S_ISCHR: "a character device", stat.S_ISBLK: "a block device",
        stat.S_ISSOCK: "a socket",
    }
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _check_layout(p: Path) -> None:
    """Reject dimensions and extended-header sizes that the file cannot hold, before mrcfile
    allocates buffers of the declared sizes (a corrupt 4-byte field can declare gigabytes)."""
    try:
        with open(p, "rb") as fh:
            head = fh.read(1024)
        size = p.stat().st_size
    except OSError as err:
        raise _open_error(p, err) from err
    machst = head[212:214]
    order = "<" if machst in (b"\x44\x44", b"\x44\x41") else ">" if machst == b"\x11\x11" else None
    if len(head) < 1024 or head[208:211] != b"MAP" or order is None:
        return  # mrcfile reports these with its own message
    nx, ny, nz = struct.unpack_from(order + "3i", head, 0)
    (nsymbt,) = struct.unpack_from(order + "i", head, 92)
    if min(nx, ny, nz) < 1:
        raise InputError(f"{p}: found dimensions {nx}x{ny}x{nz}, expected at least 1 pixel along each axis")
    if nsymbt < 0:
        raise InputError(f"{p}: found extended header size {nsymbt}, expected 0 or more bytes")
    if 1024 + nsymbt > size:
        raise InputError(
            f"{p}: truncated file, found {size} bytes, expected at least {1024 + nsymbt} "
            f"(a 1024-byte header and a {nsymbt}-byte extended header)"
        )


def validate_array(data: np.ndarray, path: str | os.PathLike[str], min_size: int = MIN_SIZE) -> None:
    """Check a micrograph's pixels: 2-D frames at least ``min_size`` a side, finite, not constant."""
    p = Path(path)
    if data.size == 0:
        raise InputError(f"{p}: empty image (shape {data.shape})")
    h, w = data.shape[-2], data.shape[-1]
    if h < min_size or w < min_size:
        raise InputError(f"{p}: image is {w}x{h} pixels, expected at least {min_size}x{min_size}")
    frames = data.reshape(-1, h, w)
    for i, frame in enumerate(frames):
        where = f" (frame {i})" if frames.shape[0] > 1 else ""
        lo, hi = float(frame.min()), float(frame.max())  # NaN/Inf show in min or max: no mask needed
        if not (np.isfinite(lo) and np.isfinite(hi)):
            n_bad = int(frame.size - np.count_nonzero(np.isfinite(frame)))
            raise InputError(f"{p}: found {n_bad} NaN/Inf values{where}, expected finite pixels")
        if lo == hi:
            raise InputError(f"{p}: image is constant ({lo:g}){where}, expected non-zero variance")


def read_micrograph(path: str | os.PathLike[str], min_size: int = MIN_SIZE) -> Micrograph:
    """Read an MRC micrograph or stack as float32 and validate it.

    Raises :class:`InputError` ("<file>: ...") for a file that is missing, not MRC, truncated,
    of an unsupported mode, a 3-D volume, smaller than ``min_size``, non-finite or constant.
    """
    import mrcfile

    p = Path(path)
    header = read_header(p)  # cheap checks first: file, header, mode, kind, size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(p, mode="r", permissive=False) as mrc:
                raw = mrc.data
                if raw is None:
                    raise InputError(f"{p}: MRC file has no data block")
                data = np.asarray(raw, dtype=np.float32).reshape(header.shape)
    except InputError:
        raise
    except (ValueError, OSError, EOFError, TypeError, IndexError, MemoryError) as err:
        raise _open_error(p, err) from err
    validate_array(data, p, min_size)
    return Micrograph(path=p, data=np.ascontiguousarray(data), header=header)


_OUT_DTYPES = {"float32": np.float32, "float16": np.float16}


def write_micrograph(
    path: str | os.PathLike[str],
    data: np.ndarray,
    header: MicrographHeader | None = None,
    dtype: str = "float32",
    protect: tuple[str | os.PathLike[str], ...] = (),
    label: str | None = None,
) -> Path:
    """Write ``data`` (2-D or a 3-D stack) atomically as float32 or float16 MRC.

    With ``header`` the voxel size, origin, start indices, space group, extended header and
    labels are carried over. ``protect`` lists input files that must not be overwritten.
    """
    kind = "stack" if np.ndim(data) == 3 else "image"
    return write_mrc(path, data, header.shape if header is not None else None, dtype, protect,
                     lambda mrc: _describe(mrc, kind, header, label))


def write_mrc(
    path: str | os.PathLike[str],
    data: np.ndarray,
    shape: tuple[int, ...] | None,
    dtype: str,
    protect: tuple[str | os.PathLike[str], ...],
    describe: Callable[[Any], None],
) -> Path:
    """The one MRC writer: ``data`` cast to ``dtype`` (float32 or float16), refused when not finite or
    not of ``shape`` (the header's, when given), written atomically through mrcfile; ``describe(mrc)``
    sets the header once the data is in, then the header statistics are computed."""
    import mrcfile

    if dtype not in _OUT_DTYPES:
        raise OutputError(f"{path}: output dtype {dtype!r} not supported, expected float32 or float16")
    with np.errstate(over="ignore", invalid="ignore"):  # checked below, with a clearer message
        arr = np.ascontiguousarray(data, dtype=_OUT_DTYPES[dtype])
    check_output_finite(arr, data, path, dtype)
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise OutputError(f"{path}: data shape {arr.shape} differs from the header's {tuple(shape)}")
    target = Path(path)
    with atomic_write(target, protect) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(arr)
            describe(mrc)
            mrc.update_header_stats()
    return target


def check_output_finite(arr: np.ndarray, data: np.ndarray, path: str | os.PathLike[str], dtype: str) -> None:
    """A micrograph written with NaN/Inf is corrupt for every reader: refuse it, saying why."""
    finite = np.isfinite(arr)
    if finite.all():
        return
    n_bad = int(arr.size - np.count_nonzero(finite))
    limit = float(np.finfo(arr.dtype).max)
    why = ""
    if np.isfinite(np.asarray(data, dtype=np.float64)).all():
        why = f" (values beyond the {dtype} range of +-{limit:g}; write float32 instead)"
    raise OutputError(
        f"{path}: found {n_bad} NaN/Inf values in the {dtype} output{why}, expected finite pixels"
    )


def _describe(mrc: object, kind: str, header: Any, label: str | None) -> None:
    """The header of a new MRC after its data is set: the stack or volume flag (``kind``: image,
    stack or volume), no default label (mrcfile's is time-stamped: the same data and header give the
    same bytes), ``header``'s fields (a :class:`MicrographHeader` or a volume header) and ``label``.
    Shared by :func:`write_micrograph`, :mod:`cryodeploy.io.rawmrc` and :mod:`cryodeploy.io.volumes`."""
    import mrcfile.mrcobject

    assert isinstance(mrc, mrcfile.mrcobject.MrcObject)
    if kind == "stack":
        mrc.set_image_stack()
    elif kind == "volume":
        mrc.set_volume()
    mrc.header.nlabl = 0
    mrc.header.label[:] = b""
    if header is not None:
        if header.extended_header:
            mrc.set_extended_header(np.frombuffer(header.extended_header, dtype="V1"))
            mrc.header.exttyp = header.exttyp
        mrc.voxel_size = header.voxel_size
        h = mrc.header
        # a stack keeps space group 0; a volume its own (1-230; 0, ambiguous, becomes 1)
        if (1 <= header.ispg <= 230) if kind == "volume" else not header.is_stack:
            h.ispg = header.ispg
        h.origin.x, h.origin.y, h.origin.z = header.origin
        h.nxstart, h.nystart, h.nzstart = header.nstart
        for lab in header.labels[:9]:
            mrc.add_label(_ascii_label(lab))
    if label:
        mrc.add_label(_ascii_label(label))


def _ascii_label(text: str) -> str:
    """An MRC label: printable ASCII (others, NUL included, become '?'), at most 80 characters."""
    return "".join(c if " " <= c <= "~" else "?" for c in text.rstrip("\x00 "))[:80]
