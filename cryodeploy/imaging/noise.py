"""Noise models: the seeds' Poisson + Gaussian on a [0, 1] image, and independent draws for Noise2Noise."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError

__all__ = ["NoiseSpec", "add_noise", "to_unit_range", "unit_range"]


@dataclass(frozen=True)
class NoiseSpec:
    """Poisson shot noise at ``dose`` (expected counts at intensity 1.0) plus Gaussian ``sigma``.

    Applied to an image on the [0, 1] scale: ``Poisson(x * dose) / dose + N(0, sigma^2)``.
    ``dose_range`` (low, high), when set, draws the dose per image log-uniformly from it, so a
    model trained on it does not depend on knowing the exact dose. ``dose=0`` means no Poisson term.
    """

    kind: str = "poisson-gaussian"
    dose: float = 20.0
    sigma: float = 0.05
    dose_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.kind != "poisson-gaussian":
            raise ConfigError(f"noise kind {self.kind!r} unknown, expected 'poisson-gaussian'")
        if self.dose < 0 or self.sigma < 0:
            raise ConfigError(
                f"noise dose and sigma must be >= 0, found dose={self.dose}, sigma={self.sigma}"
            )
        if self.dose_range is not None:
            lo, hi = self.dose_range
            if not 0 < lo <= hi:
                raise ConfigError(f"dose range ({lo}, {hi}) must satisfy 0 < low <= high")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["dose_range"] = list(self.dose_range) if self.dose_range else None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NoiseSpec:
        """Inverse of :meth:`to_dict`."""
        rng = d.get("dose_range")
        return cls(
            kind=d.get("kind", "poisson-gaussian"),
            dose=float(d.get("dose", 20.0)),
            sigma=float(d.get("sigma", 0.05)),
            dose_range=tuple(rng) if rng else None,
        )  # type: ignore[arg-type]

    def draw_dose(self, rng: np.random.Generator) -> float:
        """The dose for one image: fixed, or log-uniform over ``dose_range``."""
        if self.dose_range is None:
            return self.dose
        lo, hi = self.dose_range
        return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


def unit_range(
    image: np.ndarray, low_percentile: float = 0.1, high_percentile: float = 99.9
) -> tuple[float, float]:
    """The robust (low, high) intensities :func:`to_unit_range` maps to 0 and 1 (percentiles of
    a regular subsample of rows); rejects an image without dynamic range."""
    img = np.asarray(image)
    lo, hi = np.percentile(img[:: max(1, img.shape[0] // 1024)], [low_percentile, high_percentile])
    if hi <= lo:
        raise ConfigError("image has no dynamic range to map to [0, 1]")
    return float(lo), float(hi)


def to_unit_range(
    image: np.ndarray, low_percentile: float = 0.1, high_percentile: float = 99.9
) -> np.ndarray:
    """Map an image to [0, 1] by robust percentiles (clipped), as the seeds did before adding noise.

    Works in float32 on one copy of the image (no float64 temporaries: preprocessing memory).
    """
    lo, hi = unit_range(image, low_percentile, high_percentile)
    img = np.array(image, dtype=np.float32)
    img -= np.float32(lo)
    img /= np.float32(hi - lo)
    return np.clip(img, 0.0, 1.0, out=img)


def add_noise(
    clean01: np.ndarray, spec: NoiseSpec, rng: np.random.Generator, dose: float | None = None
) -> np.ndarray:
    """One noisy draw of a [0, 1] image under ``spec`` (``dose`` overrides the spec's draw)."""
    x = np.clip(np.asarray(clean01, dtype=np.float64), 0.0, None)
    d = spec.draw_dose(rng) if dose is None else dose
    noisy = rng.poisson(x * d) / d if d > 0 else x.copy()
    if spec.sigma > 0:
        noisy = noisy + rng.normal(0.0, spec.sigma, size=x.shape)
    return noisy.astype(np.float32)
