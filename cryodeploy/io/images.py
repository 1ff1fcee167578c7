"""TIFF and 8-bit PNG/JPEG writers for denoised micrographs (for pickers, viewers and slides).

TIFF keeps the values: float32 (or float16) pixels, a stack as pages, the pixel size as the
TIFF resolution (pixels per centimetre; 1 Å = 1e-8 cm) and the label plus pixel size in the
image description. PNG and JPEG are 8-bit grey with this contrast mapping, per image:
the 0.5th percentile becomes 0, the 99.5th percentile 255, values in between are mapped
linearly and rounded, values outside are clipped (so a few hot or dead pixels do not set the
contrast). They hold one 2-D image: a stack is refused (write MRC or TIFF for stacks).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from cryodeploy.errors import OutputError
from cryodeploy.files import atomic_write
from cryodeploy.io.mrc import MicrographHeader

__all__ = ["CONTRAST_PERCENTILES", "to_8bit", "write_jpeg", "write_png", "write_tiff"]

#: the input range mapped onto 0..255 by :func:`to_8bit`, in percentiles of the image
CONTRAST_PERCENTILES = (0.5, 99.5)
_FLOATS = {"float32": np.float32, "float16": np.float16}


def _finite(data: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    arr = np.asarray(data, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise OutputError(f"{path}: found NaN/Inf values in the output, expected finite pixels")
    return arr


def to_8bit(image: np.ndarray) -> np.ndarray:
    """``image`` as uint8 by the module's contrast mapping (a flat image becomes all 0)."""
    lo, hi = np.percentile(np.asarray(image, dtype=np.float64), CONTRAST_PERCENTILES)
    scaled = (np.asarray(image, dtype=np.float64) - lo) / max(hi - lo, np.finfo(np.float64).tiny)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)


def write_tiff(
    path: str | os.PathLike[str], data: np.ndarray, header: MicrographHeader | None = None,
    dtype: str = "float32", protect: tuple[str | os.PathLike[str], ...] = (), label: str | None = None,
) -> Path:
    """Write ``data`` (2-D, or a stack as pages) atomically as a float TIFF with the pixel size."""
    import tifffile

    if dtype not in _FLOATS:
        raise OutputError(f"{path}: output dtype {dtype!r} not supported, expected float32 or float16")
    arr = _finite(data, path).astype(_FLOATS[dtype])
    pixel = float(header.voxel_size[0]) if header is not None and header.voxel_size[0] > 0 else None
    description = json.dumps({"label": label or "", "pixel_size_angstrom": pixel})
    target = Path(path)
    with atomic_write(target, protect) as tmp:
        tifffile.imwrite(tmp, arr, description=description, metadata=None, photometric="minisblack",
                         resolution=(1e8 / pixel, 1e8 / pixel) if pixel else None,
                         resolutionunit="CENTIMETER" if pixel else None)
    return target


def _write_8bit(fmt: str, path: str | os.PathLike[str], data: np.ndarray,
                protect: tuple[str | os.PathLike[str], ...]) -> Path:
    from PIL import Image  # a matplotlib dependency

    if np.ndim(data) != 2:
        raise OutputError(f"{path}: found a stack of {np.shape(data)[0]} frames, expected one 2-D image "
                          f"for {fmt} (write mrc or tiff for stacks)")
    target = Path(path)
    with atomic_write(target, protect) as tmp:
        options = {"quality": 95} if fmt == "JPEG" else {}
        Image.fromarray(to_8bit(_finite(data, path))).save(tmp, format=fmt, **options)
    return target


def write_png(
    path: str | os.PathLike[str], data: np.ndarray, header: MicrographHeader | None = None,
    dtype: str = "float32", protect: tuple[str | os.PathLike[str], ...] = (), label: str | None = None,
) -> Path:
    """Write a 2-D ``data`` atomically as an 8-bit grey PNG (contrast mapping: module docstring)."""
    return _write_8bit("PNG", path, data, protect)


def write_jpeg(
    path: str | os.PathLike[str], data: np.ndarray, header: MicrographHeader | None = None,
    dtype: str = "float32", protect: tuple[str | os.PathLike[str], ...] = (), label: str | None = None,
) -> Path:
    """Write a 2-D ``data`` atomically as an 8-bit grey JPEG, quality 95 (contrast: module docstring)."""
    return _write_8bit("JPEG", path, data, protect)
