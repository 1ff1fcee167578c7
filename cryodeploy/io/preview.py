"""Quick-look PNGs: a downsampled input | denoised pair under one shared contrast (the input's
1st-99th percentiles), so the change the denoiser made is what the eye sees."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

__all__ = ["PREVIEW_SIDE", "downsample", "write_preview"]

#: longest side of each half of a preview, in pixels
PREVIEW_SIDE = 512


def downsample(image: np.ndarray, side: int = PREVIEW_SIDE) -> np.ndarray:
    """Block-average ``image`` by the smallest integer factor that makes its longer side <= ``side``."""
    f = max(1, -(-max(image.shape) // side))
    h, w = image.shape[0] // f * f, image.shape[1] // f * f
    return image[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3), dtype=np.float64).astype(np.float32)


def _contrast(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    return np.clip((image - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def write_preview(path: str | os.PathLike[str], before: np.ndarray, after: np.ndarray) -> Path:
    """Write ``before | after`` side by side (8-bit grey PNG) atomically to ``path``; both halves
    map intensity to grey the same way: the 1st and 99th percentiles of ``before`` to black and white."""
    from PIL import Image  # a matplotlib dependency

    from cryodeploy.files import atomic_write

    small = downsample(before)
    lo, hi = (float(v) for v in np.percentile(small, [1, 99]))
    a, b = _contrast(small, lo, hi), _contrast(downsample(after), lo, hi)
    gap = np.ones((a.shape[0], max(2, a.shape[1] // 64)), np.float32)
    panel = np.round(np.concatenate([a, gap, b], axis=1) * 255).astype(np.uint8)
    target = Path(path)
    with atomic_write(target) as tmp:
        Image.fromarray(panel).save(tmp, format="PNG")
    return target
