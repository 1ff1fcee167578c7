"""Output writers keyed by format: how a denoised micrograph (and its header) goes to disk.

Each format is one :class:`OutputFormat` in :data:`FORMATS`; a new format is one writer function
and one entry here. Every writer writes atomically (a temporary file renamed into place) and
never replaces a file listed in ``protect``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.io.images import write_jpeg, write_png, write_tiff
from cryodeploy.io.mrc import MicrographHeader, write_micrograph

__all__ = ["FORMATS", "OutputFormat", "Writer", "output_format"]

#: (path, data, input header, dtype, protected inputs, label) -> the written path
Writer = Callable[
    [str | os.PathLike[str], np.ndarray, MicrographHeader | None, str, tuple[str | os.PathLike[str], ...],
     str | None],
    Path,
]


@dataclass(frozen=True)
class OutputFormat:
    """One output format: its name (``--format``), file suffix (None: the input's own) and writer."""

    name: str
    suffix: str | None
    write: Writer
    description: str


FORMATS: dict[str, OutputFormat] = {
    "mrc": OutputFormat("mrc", None, write_micrograph, "MRC (.mrc/.mrcs as the input), float32 or float16, "
                        "input header kept"),
    "tiff": OutputFormat("tiff", ".tif", write_tiff, "float32/float16 TIFF, stacks as pages, pixel size"),
    "png": OutputFormat("png", ".png", write_png, "8-bit grey PNG, 0.5-99.5 percentile contrast, 2-D only"),
    "jpg": OutputFormat("jpg", ".jpg", write_jpeg, "8-bit grey JPEG (quality 95), as png"),
}


def output_format(name: str) -> OutputFormat:
    """The registered format ``name``; :class:`ConfigError` naming the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(f"output format {name!r} unknown, expected one of {', '.join(FORMATS)}") from None
