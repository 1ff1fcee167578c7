"""Two independent halves of one volume, and the Fourier shell correlation between two volumes.

Halves: the even/odd tomograms when given (reconstructed from alternate frames or tilts: the same
signal, independent noise), else binomial thinning of a volume of integer counts (each count to
half A or B with p = 1/2). A reconstruction is not counts (back-projection filters and sums
them), so thinning refuses non-integer voxels. Scores on the halves are those of
:mod:`cryodeploy.imaging.splits` (split error and gain), on every voxel.

FSC: the normalized cross-correlation of the two volumes' Fourier coefficients in shells 1/n wide
(n the shortest side), as :func:`~cryodeploy.imaging.metrics.frc` does in rings; the 1/7 and
half-bit thresholds need the shells' voxel counts, which :class:`Fsc` carries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from cryodeploy.errors import InputError
from cryodeploy.imaging.metrics import _edge_taper, frc_crossing
from cryodeploy.imaging.splits import _split_error

__all__ = ["Fsc", "fsc", "half_bit_threshold", "thin_volume", "volume_band_errors", "volume_halves",
           "volume_power_ratio", "volume_split_error", "volume_split_gain"]


def _volumes(*arrays: np.ndarray) -> list[np.ndarray]:
    out = [np.asarray(a, dtype=np.float64) for a in arrays]
    for a in out:
        if a.ndim != 3:
            raise InputError(f"found a {a.ndim}-D array of shape {a.shape}, expected a 3-D volume")
        if a.shape != out[0].shape:
            raise InputError(
                f"volumes differ in shape: found {out[0].shape} and {a.shape}, expected equal shapes"
            )
    return out


def thin_volume(
    volume: np.ndarray, rng: np.random.Generator, gain: float = 1.0, name: str = "volume"
) -> tuple[np.ndarray, np.ndarray]:
    """Halves A, B of a volume of counts ``volume / gain`` (integers, to 1e-3): each count goes to A
    with probability 1/2, the rest to B; in the volume's units, so A + B = volume exactly.
    Errors name ``name`` (the file)."""
    (x,) = _volumes(volume)
    if not gain > 0:
        raise InputError(f"{name}: gain is {gain}, expected > 0")
    n = x / gain
    counts = np.rint(n)
    bad = np.abs(n - counts) > 1e-3
    if bad.any() or counts.min() < 0:
        what = (
            f"{int(bad.sum())} non-integer voxels" if bad.any() else f"negative counts (min {counts.min():g})"
        )
        raise InputError(
            f"{name}: found {what} (gain {gain:g}), expected integer counts >= 0 to thin; a reconstruction "
            "is not counts: give its even/odd halves instead"
        )
    c = counts.astype(np.int64)
    a = rng.binomial(c, 0.5)
    return (a * gain).astype(np.float32), ((c - a) * gain).astype(np.float32)


def volume_halves(
    volume: np.ndarray,
    odd: np.ndarray | None = None,
    rng: np.random.Generator | None = None,
    gain: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Two halves of one volume and how they were made: ``(volume, odd, "even/odd")`` when the odd
    half is given (checked for the same shape), else ``thin_volume(volume)`` and ``"thinned"``."""
    if odd is not None:
        _volumes(volume, odd)
        return np.asarray(volume, np.float32), np.asarray(odd, np.float32), "even/odd"
    if rng is None:
        raise InputError("thinning a volume needs a random generator (rng), or give its odd half")
    a, b = thin_volume(volume, rng, gain)
    return a, b, "thinned"


def volume_split_error(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The split error E (:func:`cryodeploy.imaging.splits.split_error`) of a denoiser's outputs
    ``fa``, ``fb`` on volume halves ``a``, ``b``: 1 for identity, 0 for a perfect denoiser."""
    return _split_error(*_volumes(fa, fb, a, b))


def volume_split_gain(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """The split gain in dB (:func:`cryodeploy.imaging.splits.split_gain`) of a denoiser's outputs
    ``fa``, ``fb`` on volume halves ``a``, ``b``: 0 for identity, inf where the error is <= 0."""
    e = volume_split_error(fa, fb, a, b)
    return float(-10.0 * np.log10(e)) + 0.0 if e > 0 else float("inf")


@dataclass(frozen=True)
class Fsc:
    """An FSC curve: shell centre ``freq`` (1/voxel, or 1/A), ``curve`` and each shell's ``voxels``
    (Fourier coefficients, conjugate pairs counted twice)."""

    freq: np.ndarray
    curve: np.ndarray
    voxels: np.ndarray

    def resolution(self, threshold: float = 1.0 / 7.0) -> float | None:
        """Where the curve first falls below ``threshold`` (voxels, or A); None if it never does."""
        return frc_crossing(self.freq, self.curve, threshold)


def fsc(a: np.ndarray, b: np.ndarray, voxel_size: float | None = None, edge: float = 0.1) -> Fsc:
    """Fourier shell correlation of two volumes of one shape.

    Each mean-subtracted volume is tapered to zero over ``edge`` of each side (cosine ramp).
    Shells are 1/n wide (n = the shortest side), centred on k/n, k = 1 .. n/2 (DC left out).
    """
    x, y = _volumes(a, b)
    nz, ny, nx = x.shape
    n = min(x.shape)
    taper = (
        _edge_taper(nz, edge)[:, None, None]
        * _edge_taper(ny, edge)[None, :, None]
        * _edge_taper(nx, edge)[None, None, :]
    )
    fx_ = np.fft.rfftn((x - x.mean()) * taper)
    fy_ = np.fft.rfftn((y - y.mean()) * taper)
    kz = np.fft.fftfreq(nz)[:, None, None]
    ky = np.fft.fftfreq(ny)[None, :, None]
    kx = np.fft.rfftfreq(nx)[None, None, :]
    shell = np.rint(np.sqrt(kz * kz + ky * ky + kx * kx) * n).astype(np.int64)
    weight = np.full(kx.shape, 2.0)  # the rfft half-space holds each conjugate pair once
    weight[..., 0] = 1.0
    if nx % 2 == 0:
        weight[..., -1] = 1.0
    weight = np.broadcast_to(weight, shell.shape)
    nshells = n // 2
    keep = shell <= nshells
    idx, wk = shell[keep], weight[keep]
    num = np.bincount(idx, wk * np.real(fx_ * np.conj(fy_))[keep], minlength=nshells + 1)
    pa = np.bincount(idx, wk * np.abs(fx_[keep]) ** 2, minlength=nshells + 1)
    pb = np.bincount(idx, wk * np.abs(fy_[keep]) ** 2, minlength=nshells + 1)
    voxels = np.bincount(idx, wk, minlength=nshells + 1)
    den = np.sqrt(pa * pb)
    curve = np.divide(num, den, out=np.zeros_like(num), where=den > 0)[1:]
    freq = np.arange(1, nshells + 1, dtype=np.float64) / n
    if voxel_size is not None:
        if not voxel_size > 0:
            raise InputError(f"voxel size must be > 0, found {voxel_size}")
        freq = freq / voxel_size
    return Fsc(freq, curve, voxels[1:])


def half_bit_threshold(voxels: np.ndarray) -> np.ndarray:
    """The half-bit information threshold of each shell (van Heel & Schatz 2005) from its voxel count."""
    s = np.sqrt(np.maximum(np.asarray(voxels, dtype=np.float64), 1.0))
    return (0.2071 + 1.9102 / s) / (1.2071 + 0.9102 / s)


def _band_power(volumes: Sequence[np.ndarray], edges: Sequence[float]) -> np.ndarray:
    """Power of each volume in each band of ``edges`` (cycles/voxel; frequencies beyond the last
    edge, the corners of the cube, count in the last band)."""
    nz, ny, nx = volumes[0].shape
    kz = np.fft.fftfreq(nz)[:, None, None]
    ky = np.fft.fftfreq(ny)[None, :, None]
    kx = np.fft.rfftfreq(nx)[None, None, :]
    r = np.sqrt(kz * kz + ky * ky + kx * kx)
    weight = np.full(kx.shape, 2.0)  # the rfft half-space holds each conjugate pair once
    weight[..., 0] = 1.0
    if nx % 2 == 0:
        weight[..., -1] = 1.0
    idx = np.clip(np.searchsorted(np.asarray(edges), r, side="right") - 1, 0, len(edges) - 2).ravel()
    w = np.broadcast_to(weight, r.shape).ravel()
    return np.array([np.bincount(idx, w * (np.abs(np.fft.rfftn(v)) ** 2).ravel(), minlength=len(edges) - 1)
                     for v in volumes])


def volume_band_errors(fa: np.ndarray, fb: np.ndarray, a: np.ndarray, b: np.ndarray,
                       edges: Sequence[float]) -> list[float | None]:
    """The split error per frequency band (``edges`` in cycles/voxel) of a denoiser's outputs ``fa``,
    ``fb`` on volume halves ``a``, ``b``, relative to identity's (1 = as noisy as the input, 0 = perfect;
    :func:`cryodeploy.imaging.splits.band_errors` in 3-D)."""
    fa64, fb64, a64, b64 = _volumes(fa, fb, a, b)
    p = _band_power([fa64 - b64, fb64 - a64, a64 - b64], edges)
    noise = p[2] / 2.0
    err = 0.5 * (p[0] + p[1]) - noise
    return [float(e / n) if n > 0 else None for e, n in zip(err, noise, strict=True)]


def volume_power_ratio(output: np.ndarray, volume: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Power of ``output`` over that of ``volume`` (means removed) per band of ``edges`` (cycles/voxel);
    NaN where the volume has no power."""
    f, x = _volumes(output, volume)
    p = _band_power([f - f.mean(), x - x.mean()], edges)
    return np.divide(p[0], p[1], out=np.full(p.shape[1], np.nan), where=p[1] > 0)
