"""Noise models: the seeds' Poisson + Gaussian on a [0, 1] image, independent draws for Noise2Noise,
and binomial thinning of counted micrographs into two independent halves."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError, InputError

__all__ = ["NoiseSpec", "add_noise", "count_gain", "thin", "to_unit_range", "unit_range"]


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
    """One noisy draw of a [0, 1] image under ``spec`` (``dose`` overrides the spec's draw).

    The draws are in float64 (rounded to float32 once, at the end) on one float64 array of the
    image's size, the Poisson's rates turned into the result in place.
    """
    x = np.clip(np.asarray(clean01, dtype=np.float64), 0.0, None)  # a new array: ours to reuse
    d = spec.draw_dose(rng) if dose is None else dose
    if d > 0:
        x *= d
        np.divide(rng.poisson(x), d, out=x)
    if spec.sigma > 0:
        x += rng.normal(0.0, spec.sigma, size=x.shape)
    return x.astype(np.float32)


def count_gain(image: np.ndarray, name: str = "image") -> tuple[float, str]:
    """Intensity units per detector count of a counted micrograph, and how it was found.

    ``"integer"``: the pixels are non-negative integers (gain 1). ``"variance/mean"``: otherwise the
    noise variance of the diagonal split over the mean (:func:`~cryodeploy.imaging.splits.diagonal_gain`,
    the split evaluation's estimate), which is the gain of scaled Poisson counts; snapped to the
    data's value spacing when the values lie on such a grid. Raises
    :class:`InputError` (naming ``name``) for data that cannot be counts.
    """
    from cryodeploy.imaging.splits import diagonal_gain

    x = np.asarray(image, dtype=np.float64)
    if not np.isfinite(x).all():
        raise InputError(f"{name}: non-finite pixels, expected counts")
    if x.min() < 0 or x.mean() <= 0:
        raise InputError(f"{name}: pixels range {x.min():.4g}..{x.max():.4g} (mean {x.mean():.4g}), expected "
                         "non-negative counts; thinning needs counted, not normalized, micrographs")
    if np.array_equal(x, np.round(x)):
        return 1.0, "integer"
    gain = diagonal_gain(x)
    if not gain > 0:
        raise InputError(f"{name}: no shot noise found (variance/mean {gain:.3g}), expected counts")
    values = np.unique(x[:: max(1, x.size // (1 << 18))])
    step = float(np.min(np.diff(values))) if values.size > 1 else 0.0
    if step > 0 and abs(step / gain - 1.0) < 0.2 and np.allclose(x / step, np.round(x / step), atol=1e-3):
        gain = step
    if x.mean() / gain < 0.05:
        raise InputError(f"{name}: {x.mean() / gain:.3g} counts per pixel (variance/mean), expected counts")
    return gain, "variance/mean"


def thin(image: np.ndarray, gain: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Binomial thinning: each count of ``image`` (in units of ``gain``) goes to half A or B with p = 1/2,
    so A and B share the signal (half each) with independent Poisson noise; both in the input's units."""
    counts = np.rint(np.asarray(image, dtype=np.float64) / gain).astype(np.int64)
    a = rng.binomial(counts, 0.5)
    return (a * gain).astype(np.float32), ((counts - a) * gain).astype(np.float32)
