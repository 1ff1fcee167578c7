"""Per-micrograph robust normalization, the same in training and inference, with its exact inverse."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cryodeploy.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_SAMPLES", "NormSpec", "NormStats", "denormalize", "norm_stats", "norm_stats_torch", "normalize",
]

#: At most about this many pixels (a regular subsample) are used to estimate the statistics.
MAX_SAMPLES = 1 << 20


@dataclass(frozen=True)
class NormSpec:
    """How to normalize: ``robust`` = mean/std of the pixels between two percentiles.

    Stored in every model's config so inference applies exactly what training used.
    """

    method: str = "robust"
    low_percentile: float = 1.0
    high_percentile: float = 99.0

    def __post_init__(self) -> None:
        if self.method != "robust":
            raise ConfigError(f"normalization method {self.method!r} unknown, expected 'robust'")
        if not 0.0 <= self.low_percentile < self.high_percentile <= 100.0:
            raise ConfigError(
                f"normalization percentiles ({self.low_percentile}, {self.high_percentile}) "
                "must satisfy 0 <= low < high <= 100"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NormSpec:
        """Inverse of :meth:`to_dict`; rejects unknown fields."""
        unknown = set(d) - {"method", "low_percentile", "high_percentile"}
        if unknown:
            raise ConfigError(f"normalization has unknown fields {sorted(unknown)}")
        return cls(**d)


@dataclass(frozen=True)
class NormStats:
    """The affine map of one micrograph: ``normalized = (x - center) / scale``."""

    center: float
    scale: float


def norm_stats(image: np.ndarray, spec: NormSpec = NormSpec()) -> NormStats:
    """Robust center and scale of one 2-D image (deterministic regular subsample of large images)."""
    flat = np.asarray(image, dtype=np.float32).reshape(-1)
    step = max(1, flat.size // MAX_SAMPLES)
    sample = flat[::step].astype(np.float64)
    lo, hi = np.percentile(sample, [spec.low_percentile, spec.high_percentile])
    core = sample[(sample >= lo) & (sample <= hi)]
    if core.size < 2:
        core = sample
    center = float(core.mean())
    scale = float(core.std())
    if not np.isfinite(scale) or scale <= 0.0:
        scale = float(sample.std()) or 1.0
    return NormStats(center=center, scale=scale)


def norm_stats_torch(images: torch.Tensor, spec: NormSpec = NormSpec()) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`norm_stats` of each image of a [N, H, W] tensor, on its device: ``(center, scale)``, [N] each.

    The same definition (regular subsample, linear-interpolated percentiles, population std of
    the core, the same fallbacks), in float64, so training on the GPU normalizes as the runner does.
    """
    import torch

    flat = images.reshape(images.shape[0], -1)
    step = max(1, flat.shape[1] // MAX_SAMPLES)
    sample = flat[:, ::step].to(torch.float64)
    q = torch.tensor([spec.low_percentile / 100.0, spec.high_percentile / 100.0], dtype=torch.float64,
                     device=sample.device)
    lo, hi = torch.quantile(sample, q, dim=1, keepdim=True)
    core = (sample >= lo) & (sample <= hi)
    n = core.sum(dim=1, keepdim=True)
    few = n < 2
    core = torch.where(few, torch.ones_like(core), core)
    n = torch.where(few, torch.full_like(n, sample.shape[1]), n)
    center = (sample * core).sum(dim=1, keepdim=True) / n
    scale = torch.sqrt((((sample - center) * core) ** 2).sum(dim=1, keepdim=True) / n)
    fallback = sample.std(dim=1, unbiased=False, keepdim=True)
    fallback = torch.where(fallback > 0, fallback, torch.ones_like(fallback))
    scale = torch.where(torch.isfinite(scale) & (scale > 0), scale, fallback)
    return center[:, 0], scale[:, 0]


def normalize(image: np.ndarray, stats: NormStats, out: np.ndarray | None = None) -> np.ndarray:
    """``(x - center) / scale`` as ``x / scale - center / scale`` in float32, into ``out`` (may be
    ``image`` itself) or one new array.

    No ``x - center`` is formed, so pixels near the float32 limit do not overflow; the result
    overflows only where the normalized value itself is beyond float32.
    """
    with np.errstate(over="ignore"):
        z = np.divide(np.asarray(image, dtype=np.float32), np.float32(stats.scale), out=out, dtype=np.float32)
        z -= np.float32(stats.center / stats.scale)
    return z


def denormalize(image: np.ndarray, stats: NormStats, out: np.ndarray | None = None) -> np.ndarray:
    """Inverse of :func:`normalize`: ``(z + center / scale) * scale`` in float32 (into ``out`` if given)."""
    with np.errstate(over="ignore"):
        shift = np.float32(stats.center / stats.scale)
        x = np.add(np.asarray(image, dtype=np.float32), shift, out=out, dtype=np.float32)
        x *= np.float32(stats.scale)
    return x
