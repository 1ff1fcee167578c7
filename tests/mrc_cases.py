"""Builders of real MRC files, good and damaged, shared by the fuzz and robustness tests.

Every file is written by mrcfile and then damaged at the byte level (header fields, single
bytes, truncation), the way a bad disk, an interrupted copy or a foreign writer damages it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

#: denoise options of the robustness tests: the CPU torch backend with small tiles
MODEL_ARGS = ("--backend", "torch", "--device", "cpu", "--tile", "64", "-q")
#: variables that would make `denoise` process only a shard of its inputs
SHARD_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")


def unsharded_env() -> dict[str, str]:
    """This process's environment without sharding variables."""
    return {k: v for k, v in os.environ.items() if k not in SHARD_VARS}


def without_root_override(what: str) -> tuple[str, ...]:
    """A command prefix under which permission bits apply: empty for a normal user; for root a new
    user namespace (uid 0 kept, the capability to bypass permissions lost). Skips the test if root
    cannot make one (``what`` says which permission would not hold)."""
    if os.geteuid() != 0:
        return ()
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "--user", "true"], capture_output=True).returncode != 0:
        pytest.skip(f"running as root and user namespaces are unavailable: {what} does not stop root")
    return (unshare, "--user")


def denoise_process(
    inputs: list[Path], outdir: Path, model: Path, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """A real ``python -m cryodeploy denoise`` process over ``inputs`` (stdout/stderr captured)."""
    cmd = [
        *prefix,
        sys.executable,
        "-m",
        "cryodeploy",
        "denoise",
        *map(str, inputs),
        "-o",
        str(outdir),
        "--model",
        str(model),
        *MODEL_ARGS,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=unsharded_env())


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
