"""Where derived artefacts (exported ONNX files, fp16 variants, engines) are cached."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import OutputError

__all__ = ["CACHE_ENV", "cache_root"]

#: environment variable overriding the cache folder
CACHE_ENV = "CRYODEPLOY_CACHE"


def cache_root(kind: str) -> Path:
    """The cache folder for ``kind`` (e.g. ``"onnx"``), created if missing.

    ``$CRYODEPLOY_CACHE/<kind>`` if that variable is set, else ``~/.cache/cryodeploy/<kind>``.
    """
    base = os.environ.get(CACHE_ENV)
    root = Path(base) if base else Path.home() / ".cache" / "cryodeploy"
    folder = root / kind
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        reason = err.strerror or err
        raise OutputError(f"{folder}: cannot create the cache folder ({reason}); set {CACHE_ENV}") from err
    return folder
