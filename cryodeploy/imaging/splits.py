"""Two independent halves of one micrograph and what they measure without a clean target.

Splits: binomial thinning of counts (each count goes to half A or B with p = 0.5, so A and B
carry the same signal, x/2, with independent Poisson noise; scaled counts are divided by a
gain first) and the diagonal split of each 2x2 block
(:func:`~cryodeploy.imaging.metrics.split_diagonals`, valid where pixel noise is independent).

Scores of a denoiser f on halves A, B: the split gain -10 log10(E) with
E = (mean(MSE(f(A), B), MSE(f(B), A)) - s2) / s2 and s2 = MSE(A, B) / 2 (the noise variance of
one half; identity scores exactly 0 dB), the same ratio per frequency band, and the spatial
spread of the noise removed (patchwork).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from cryodeploy.errors import InputError
from cryodeploy.imaging.metrics import _pair, split_diagonals, spread, window_blocks

__all__ = [
    "INDEPENDENCE_FRC",
    "Independence",
    "band_edges",
    "band_errors",
    "binomial_thin",
    "diagonal_gain",
    "independence",
    "power_ratio",
    "residual_spread",
    "split_error",
    "split_gain",
    "split_gain_sd",
]

#: Raw halves whose pooled FRC in an outer band (1/2-3/4 or 3/4-1 of Nyquist) exceeds this in
#: magnitude are not independent. Measured: EMPIAR-10076 particle images (diagonal) |FRC| <= 0.03,
#: Poisson counts (thinned or diagonal) <= 0.02; the EPU sum (interpolated noise) 0.80 diagonal and
#: -0.17..0.2 thinned with its gain, the low-passed UCSF image 0.22. At 0.1 a micrograph's signal
#: would carry a tenth of the noise power at 3/4 Nyquist, which detector MTFs and CTF envelopes exclude.
INDEPENDENCE_FRC = 0.1
#: The threshold is at least this many standard deviations of a band FRC of independent noise.
INDEPENDENCE_SIGMAS = 5.0
#: Resolution band edges (Angstrom) when the pixel size is known; periods (px) when it is not.
BAND_EDGES_A = (100.0, 34.0, 15.0, 8.0, 4.0)
BAND_EDGES_PX = (32.0, 8.0, 4.0)


def diagonal_gain(image: np.ndarray) -> float:
    """Gain estimate (variance / mean of the noise): var(A - B) / mean(image) of the diagonal
    halves, whose difference (x00 + x11 - x01 - x10) / 2 carries one pixel's noise variance."""
    x = np.asarray(image, dtype=np.float64)
    mean = float(x.mean())
    if not mean > 0:
        raise InputError(f"found mean {mean:.4g}, expected positive counts to estimate a gain")
    a, b = split_diagonals(x)
    return float(np.var(a.astype(np.float64) - b)) / mean


def binomial_thin(image: np.ndarray, rng: np.random.Generator,
                  gain: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Halves A, B of counts ``image / gain``: each count goes to A with probability 1/2, the rest
    to B; returned in the image's units (x gain). Integer counts with gain 1 give A + B = image
    exactly; other values are stochastically rounded to counts first."""
    x = np.asarray(image, dtype=np.float64)
    if x.ndim != 2:
        raise InputError(f"found an array of shape {x.shape}, expected a 2-D image")
    if not gain > 0:
        raise InputError(f"gain is {gain}, expected > 0")
    if x.min() < 0:
        raise InputError(f"found negative values (min {x.min():.4g}), expected counts >= 0 to thin")
    n = x / gain
    whole = np.floor(n)
    counts = (whole + (rng.random(n.shape) < n - whole)).astype(np.int64)
    a = rng.binomial(counts, 0.5)
    return (a * gain).astype(np.float32), ((counts - a) * gain).astype(np.float32)


@dataclass(frozen=True)
class Independence:
    """Pooled FRC of the raw halves in the two outer bands, and the bound it was held to."""

    frc_mid: float
    frc_outer: float
    threshold: float

    @property
    def independent(self) -> bool:
        return max(abs(self.frc_mid), abs(self.frc_outer)) <= self.threshold


def _radius(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """|k| in cycles/px of the rfft2 half-plane and the weights that count conjugate pairs twice."""
    h, w = shape
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    weight = np.full(kx.shape, 2.0)
    weight[0, 0] = 1.0
    if w % 2 == 0:
        weight[0, -1] = 1.0
    return np.sqrt(kx * kx + ky * ky), np.broadcast_to(weight, (h, kx.shape[1]))


def independence(a: np.ndarray, b: np.ndarray) -> Independence:
    """Are the noises of halves ``a`` and ``b`` independent? Their pooled FRC over 1/4-3/8 and
    3/8-1/2 cycles/px must be ~0 (threshold: :data:`INDEPENDENCE_FRC` or 5 sigma of noise)."""
    x, y = _pair(a, b)
    fa, fb = np.fft.rfft2(x - x.mean()), np.fft.rfft2(y - y.mean())
    r, w = _radius(x.shape)
    out = []
    size = 0
    for lo, hi in ((0.25, 0.375), (0.375, 0.5)):
        m = (r >= lo) & (r < hi)
        num = float(np.sum(w[m] * np.real(fa[m] * np.conj(fb[m]))))
        den = float(np.sqrt(np.sum(w[m] * np.abs(fa[m]) ** 2) * np.sum(w[m] * np.abs(fb[m]) ** 2)))
        out.append(num / den if den > 0 else 0.0)
        size = min(size, int(m.sum())) if size else int(m.sum())
    return Independence(out[0], out[1], max(INDEPENDENCE_FRC, INDEPENDENCE_SIGMAS / np.sqrt(max(size, 1))))


def split_error(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """E = (mean(MSE(fa, b), MSE(fb, a)) - s2) / s2, s2 = MSE(a, b) / 2: the error of ``fa``
    (the denoised ``a``) against the signal, in units of one half's noise variance (identity: 1)."""
    a64, b64 = _pair(a, b)
    fa64, fb64 = _pair(fa, fb)
    return _split_error(fa64, fb64, a64, b64)


def _split_error(fa64: np.ndarray, fb64: np.ndarray, a64: np.ndarray, b64: np.ndarray) -> float:
    """:func:`split_error` of float64 arrays of one shape (any number of dimensions)."""
    s2 = float(np.mean((a64 - b64) ** 2)) / 2.0
    if not s2 > 0:
        raise InputError("the two halves are identical, expected independent noise")
    cross = 0.5 * (float(np.mean((fa64 - b64) ** 2)) + float(np.mean((fb64 - a64) ** 2)))
    return (cross - s2) / s2


def split_gain(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """-10 log10(:func:`split_error`) in dB (0 for identity); inf where E <= 0 (a denoiser better
    than the noise estimate can resolve)."""
    e = split_error(fa, fb, a, b)
    return float(-10.0 * np.log10(e)) + 0.0 if e > 0 else float("inf")  # + 0.0: identity is 0, not -0


def split_gain_sd(error: float, n: int) -> float | None:
    """Standard deviation (dB) of :func:`split_gain` for split error ``error`` on halves of ``n``
    pixels: E's estimate errs by -(<eA nB> + <eB nA>) / s2 + (1 + E) <nA nB> / s2, whose standard
    deviation is at most (sqrt(2 E) + 1 + E) / sqrt(n) for uniform noise (None where E <= 0)."""
    if not error > 0:
        return None
    return float(10.0 / np.log(10.0) * (np.sqrt(2.0 * error) + 1.0 + error) / (error * np.sqrt(n)))


def band_edges(voxel_size: float | None) -> tuple[list[float], list[str]]:
    """Band edges in cycles/px from 0 to Nyquist (1/2) and their labels: resolution bands in
    Angstrom for ``voxel_size`` (A/px), otherwise periods in px."""
    if voxel_size:
        periods = [p for p in BAND_EDGES_A if p > 2.0 * voxel_size]
        unit, scale = "A", voxel_size
    else:
        periods, unit, scale = list(BAND_EDGES_PX), "px", 1.0
    edges = [0.0, *(scale / p for p in periods), 0.5]
    names = [f"> {periods[0]:g} {unit}" if periods else f"> {2 * scale:g} {unit}"]
    names += [f"{p:g}-{q:g} {unit}" for p, q in pairwise(periods)]
    if periods:
        names.append(f"{periods[-1]:g}-{2 * scale:g} {unit}")
    return edges, names


def _band_power(images: Sequence[np.ndarray], edges: Sequence[float]) -> np.ndarray:
    """Power of each image in each band (Parseval: sums over bands = N * mean square)."""
    r, w = _radius(images[0].shape)
    idx = np.clip(np.searchsorted(np.asarray(edges), r, side="right") - 1, 0, len(edges) - 2)
    return np.array([np.bincount(idx.ravel(), (w * np.abs(np.fft.rfft2(im)) ** 2).ravel(),
                                 minlength=len(edges) - 1) for im in images])


def band_errors(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray,
                edges: Sequence[float]) -> list[float | None]:
    """:func:`split_error` per frequency band (``edges`` in cycles/px): the signal error left in the
    band relative to identity's (1 for identity, 0 for a perfect denoiser)."""
    a64, b64 = _pair(a, b)
    fa64, fb64 = _pair(fa, fb)
    p = _band_power([fa64 - b64, fb64 - a64, a64 - b64], edges)
    noise = p[2] / 2.0
    err = 0.5 * (p[0] + p[1]) - noise
    return [float(e / n) if n > 0 else None for e, n in zip(err, noise, strict=True)]


def power_ratio(output: np.ndarray, image: np.ndarray,
                edges: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Radial power spectrum of ``output`` over that of ``image`` (means removed): per ring k/n,
    n = the shorter side (``(freq in cycles/px, ratio)``), or per band of ``edges``."""
    f, x = _pair(output, image)
    n = min(x.shape)
    if edges is None:
        edges = [(k - 0.5) / n for k in range(1, n // 2 + 1)] + [0.5 + 0.5 / n]
        freq = np.arange(1, n // 2 + 1) / n
    else:
        freq = np.asarray(edges[1:])
    p = _band_power([f - f.mean(), x - x.mean()], edges)
    return freq, np.divide(p[0], p[1], out=np.full(p.shape[1], np.nan), where=p[1] > 0)


def residual_spread(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray,
                    window: int = 64) -> float | None:
    """How unevenly the noise is removed: over ``window``-px tiles, the coefficient of variation of
    the local residual ratio r = sqrt(mean(MSE(fa, b), MSE(fb, a)) / MSE(a, b)) in the flatter half
    of the tiles (lowest signal variance, cov(a, b)); the largest over four tilings shifted by half a
    tile (so patches on the tile scale are not averaged away). 0 for identity; None for fewer than
    8 tiles. The same idea against a clean image is :func:`cryodeploy.imaging.metrics.patchiness`."""
    a64, b64 = _pair(a, b)
    fa64, fb64 = _pair(fa, fb)
    spreads = []
    half = window // 2
    for offset in ((0, 0), (0, half), (half, 0), (half, half)):
        ta, tb, tfa, tfb = (window_blocks(x, window, offset)[0] for x in (a64, b64, fa64, fb64))
        if ta.shape[0] < 8:
            continue
        raw = np.mean((ta - tb) ** 2, axis=1)
        den = np.mean((tfa - tb) ** 2, axis=1) + np.mean((tfb - ta) ** 2, axis=1)
        signal = np.mean((ta - ta.mean(1, keepdims=True)) * (tb - tb.mean(1, keepdims=True)), axis=1)
        flat = np.argsort(signal)[: max(8, signal.size // 2)]
        spreads.append(spread(np.sqrt(den[flat] / (2.0 * raw[flat]))))
    return max(spreads) if spreads else None
