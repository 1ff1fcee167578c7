"""Image-quality metrics for denoising: MSE/RMSE/PSNR/SSIM/Pearson against a clean target,
Fourier ring correlation between independent halves, the Gaussian low-pass baseline, the
noise level left in flat (empty-ice) regions and how uniformly a denoiser removes noise.

Conventions: images are 2-D arrays; ``pred`` is compared with ``target`` (the clean image);
PSNR's and SSIM's data range defaults to ``target.max() - target.min()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cryodeploy.errors import InputError

__all__ = [
    "best_gaussian_sigma",
    "flat_mask",
    "flat_noise",
    "frc",
    "frc_crossing",
    "gaussian_filter",
    "mse",
    "patchiness",
    "pearson",
    "psnr",
    "rmse",
    "split_diagonals",
    "spread",
    "ssim",
    "summarize",
    "window_blocks",
    "window_noise_left",
]

#: Gaussian sigmas (px) tried by default when choosing the low-pass baseline.
DEFAULT_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)


def _pair(pred: np.ndarray, target: np.ndarray, volumes: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Both as float64, of one shape: 2-D images (or, where ``volumes``, also 3-D volumes)."""
    a = np.asarray(pred, dtype=np.float64)
    b = np.asarray(target, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"images differ in shape: found {a.shape} and {b.shape}, expected equal shapes")
    if a.ndim != 2 and not (volumes and a.ndim == 3):
        want = "a 2-D image or a 3-D volume" if volumes else "a 2-D image"
        raise InputError(f"found a {a.ndim}-D array, expected {want}")
    return a, b


def _data_range(target: np.ndarray, data_range: float | None) -> float:
    r = float(np.ptp(target)) if data_range is None else float(data_range)
    if not r > 0:
        raise InputError(f"data range must be > 0, found {r} (a constant target image?)")
    return r


def mse(pred: np.ndarray, target: np.ndarray) -> float:
    """Mean squared error (of images or volumes)."""
    a, b = _pair(pred, target, volumes=True)
    return float(np.mean((a - b) ** 2))


def rmse(pred: np.ndarray, target: np.ndarray) -> float:
    """Root mean squared error."""
    return float(np.sqrt(mse(pred, target)))


def psnr(pred: np.ndarray, target: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(R^2 / MSE)``, R = ``target.max() - target.min()``
    unless ``data_range`` is given; ``inf`` for identical images (or volumes)."""
    a, b = _pair(pred, target, volumes=True)
    r = _data_range(b, data_range)
    err = float(np.mean((a - b) ** 2))
    return float("inf") if err == 0 else float(10.0 * np.log10(r * r / err))


def pearson(pred: np.ndarray, target: np.ndarray) -> float:
    """Pearson correlation coefficient of the pixel values (0 if either image is constant)."""
    a, b = _pair(pred, target)
    a = a - a.mean()
    b = b - b.mean()
    den = float(np.sqrt(np.sum(a * a) * np.sum(b * b)))
    return float(np.sum(a * b) / den) if den > 0 else 0.0


def gaussian_filter(image: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian low-pass with standard deviation ``sigma`` px, mirror-symmetric borders (float32 out)."""
    from scipy import ndimage

    img = np.asarray(image, dtype=np.float32)
    if sigma <= 0:
        return img.copy()
    out = ndimage.gaussian_filter(img, sigma, mode="reflect", truncate=truncate)
    return out.astype(np.float32, copy=False)


def ssim(
    pred: np.ndarray,
    target: np.ndarray,
    data_range: float | None = None,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Mean structural similarity (Wang et al. 2004): Gaussian window sigma 1.5 (11 taps), population
    covariances, K1=0.01, K2=0.03, averaged away from a border of the window radius.

    Equals ``skimage.metrics.structural_similarity(pred, target, data_range=R, gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False)``.
    """
    from scipy import ndimage

    a, b = _pair(pred, target)
    r = _data_range(b, data_range)
    truncate = 3.5
    pad = int(truncate * sigma + 0.5)
    if min(a.shape) < 2 * pad + 1:
        raise InputError(f"image {a.shape} is smaller than the SSIM window ({2 * pad + 1} px)")

    def filt(x: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(x, sigma, mode="reflect", truncate=truncate)

    ua, ub = filt(a), filt(b)
    va = filt(a * a) - ua * ua
    vb = filt(b * b) - ub * ub
    cov = filt(a * b) - ua * ub
    c1, c2 = (k1 * r) ** 2, (k2 * r) ** 2
    s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return float(s[pad:-pad, pad:-pad].mean())


def split_diagonals(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two half-resolution images from each 2x2 block: the mean of its main diagonal (top-left,
    bottom-right) and of its anti-diagonal (top-right, bottom-left).

    Both halves sample the same block centres, so they share the signal while their noise is
    independent when the detector's pixel noise is. Odd last rows/columns are dropped; the halves'
    pixel size is twice the input's.
    """
    x = np.asarray(image, dtype=np.float32)
    if x.ndim != 2 or min(x.shape) < 2:
        raise InputError(f"found an array of shape {x.shape}, expected a 2-D image at least 2x2")
    h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
    x = x[:h, :w]
    a = 0.5 * (x[0::2, 0::2] + x[1::2, 1::2])
    b = 0.5 * (x[0::2, 1::2] + x[1::2, 0::2])
    return a.astype(np.float32), b.astype(np.float32)


def _edge_taper(n: int, edge: float) -> np.ndarray:
    m = int(edge * n)
    w = np.ones(n)
    if m > 0:
        ramp = 0.5 * (1.0 - np.cos(np.pi * (np.arange(m) + 0.5) / m))
        w[:m] = ramp
        w[n - m:] = ramp[::-1]
    return w


def frc(a: np.ndarray, b: np.ndarray, voxel_size: float | None = None,
        edge: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Fourier ring correlation of two images of one shape.

    Each mean-subtracted image is tapered to zero over ``edge`` of its height and width on each
    side (cosine ramp), so the step between opposite borders does not fill the high
    frequencies. Rings are 1/n wide (n = the shorter side) and centred on k/n, k = 1 .. n/2
    (DC left out); returns ``(freq, curve)`` with ``freq`` in 1/px, or in 1/Angstrom when
    ``voxel_size`` (Angstrom/px) is given.
    """
    x, y = _pair(a, b)
    h, w = x.shape
    n = min(h, w)
    taper = np.outer(_edge_taper(h, edge), _edge_taper(w, edge))
    fx_ = np.fft.rfft2((x - x.mean()) * taper)
    fy_ = np.fft.rfft2((y - y.mean()) * taper)
    ky = np.fft.fftfreq(h)[:, None]
    kx = np.fft.rfftfreq(w)[None, :]
    ring = np.rint(np.sqrt(kx * kx + ky * ky) * n).astype(np.int64)
    # the half-plane of rfft2 holds each conjugate pair once: weight those columns twice
    weight = np.full(kx.shape, 2.0)
    weight[0, 0] = 1.0
    if w % 2 == 0:
        weight[0, -1] = 1.0
    weight = np.broadcast_to(weight, ring.shape)
    nrings = n // 2
    keep = ring <= nrings
    idx = ring[keep]
    wk = weight[keep]
    num = np.bincount(idx, wk * np.real(fx_ * np.conj(fy_))[keep], minlength=nrings + 1)
    pa = np.bincount(idx, wk * np.abs(fx_[keep]) ** 2, minlength=nrings + 1)
    pb = np.bincount(idx, wk * np.abs(fy_[keep]) ** 2, minlength=nrings + 1)
    den = np.sqrt(pa * pb)
    curve = np.divide(num, den, out=np.zeros_like(num), where=den > 0)[1:]
    freq = np.arange(1, nrings + 1, dtype=np.float64) / n
    if voxel_size is not None:
        if not voxel_size > 0:
            raise InputError(f"voxel size must be > 0, found {voxel_size}")
        freq = freq / voxel_size
    return freq, curve


def frc_crossing(freq: np.ndarray, curve: np.ndarray, threshold: float) -> float | None:
    """Resolution (1/frequency: px, or Angstrom if ``freq`` is in 1/Angstrom) where ``curve`` first
    falls below ``threshold``, linearly interpolated between rings; None if it never does."""
    f = np.asarray(freq, dtype=np.float64)
    c = np.asarray(curve, dtype=np.float64)
    below = np.nonzero(c < threshold)[0]
    if below.size == 0:
        return None
    i = int(below[0])
    if i == 0:
        return float(1.0 / f[0])
    t = (c[i - 1] - threshold) / (c[i - 1] - c[i])
    return float(1.0 / (f[i - 1] + t * (f[i] - f[i - 1])))


def best_gaussian_sigma(
    noisy_list: Sequence[np.ndarray],
    clean_list: Sequence[np.ndarray],
    sigmas: Sequence[float] = DEFAULT_SIGMAS,
) -> tuple[float, list[float]]:
    """The sigma (px) whose Gaussian low-pass of the noisy images has the highest mean PSNR against
    the clean ones; returns it and the mean PSNR of every sigma tried (same order as ``sigmas``)."""
    if not noisy_list or len(noisy_list) != len(clean_list):
        raise InputError(
            f"found {len(noisy_list)} noisy and {len(clean_list)} clean images, "
            "expected equal non-zero counts"
        )
    if not sigmas:
        raise InputError("found no sigmas to try, expected at least one")
    scores = [
        float(np.mean([psnr(gaussian_filter(n, s), c) for n, c in zip(noisy_list, clean_list, strict=True)]))
        for s in sigmas
    ]
    return float(sigmas[int(np.argmax(scores))]), scores


def flat_mask(reference: np.ndarray, sigma: float = 8.0, window: int = 32,
              fraction: float = 0.1) -> np.ndarray:
    """Boolean mask of the flattest ``fraction`` of pixels (empty ice): lowest local variance, over
    ``window`` px, of ``reference`` low-passed with ``sigma`` px; borders of ``window/2`` excluded."""
    from scipy import ndimage

    ref = np.asarray(reference, dtype=np.float64)
    if min(ref.shape) <= window:
        raise InputError(f"image {ref.shape} is too small for a {window}-px flat-region window")
    lp = ndimage.gaussian_filter(ref, sigma, mode="reflect")
    mean = ndimage.uniform_filter(lp, window, mode="reflect")
    var = ndimage.uniform_filter(lp * lp, window, mode="reflect") - mean * mean
    inner = np.zeros(ref.shape, bool)
    m = window // 2
    inner[m:-m, m:-m] = True
    cut = np.quantile(var[inner], fraction)
    return inner & (var <= cut)


def flat_noise(image: np.ndarray, mask: np.ndarray, sigma: float = 8.0) -> float:
    """Standard deviation, inside ``mask``, of ``image`` minus its ``sigma``-px Gaussian low-pass:
    the noise left in flat regions, in the image's intensity units."""
    img = np.asarray(image, dtype=np.float64)
    if mask.shape != img.shape or not mask.any():
        raise InputError(f"flat mask {mask.shape} does not fit image {img.shape} or is empty")
    resid = img - gaussian_filter(img, sigma)
    return float(np.std(resid[mask]))


def summarize(records: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Means of ``keys`` over per-item ``records`` plus ``summary`` (min, median, max) and ``per_item``."""
    out: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    for k in keys:
        vals = np.array([r[k] for r in records if r.get(k) is not None], dtype=np.float64)
        if vals.size == 0:
            out[k] = None
            continue
        out[k] = float(vals.mean())
        summary[k] = {"min": float(vals.min()), "median": float(np.median(vals)), "max": float(vals.max())}
    out["summary"] = summary
    out["per_item"] = records
    return out


def window_blocks(image: np.ndarray, window: int, offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """The non-overlapping ``window``-px blocks of a 2-D image or [N, H, W] stack whose tiling starts
    at ``offset`` (rows, columns), as [N, blocks, window^2] in row-major block order (partial blocks at
    the edges dropped); shared by :func:`window_noise_left` and
    :func:`cryodeploy.imaging.splits.residual_spread`."""
    x = np.asarray(image)
    x = x.reshape(-1, *x.shape[-2:])
    dy, dx = offset
    hh, ww = (x.shape[1] - dy) // window, (x.shape[2] - dx) // window
    x = x[:, dy:dy + hh * window, dx:dx + ww * window]
    blocks = x.reshape(len(x), hh, window, ww, window).transpose(0, 1, 3, 2, 4)
    return blocks.reshape(len(x), hh * ww, window * window)


def spread(values: np.ndarray) -> float:
    """Coefficient of variation, std / mean, of per-window measures (the spread of
    :func:`patchiness` and of :func:`cryodeploy.imaging.splits.residual_spread`)."""
    return float(np.std(values) / np.mean(values))


def window_noise_left(out: np.ndarray, noisy: np.ndarray, clean: np.ndarray, window: int = 64) -> np.ndarray:
    """Per ``window``-px block of a 2-D image or [N, H, W] stack: rms(out - clean) / rms(noisy - clean),
    the fraction of the noise a denoiser left there (partial blocks at the edges dropped)."""
    o, n, c = (np.asarray(a, dtype=np.float64) for a in (out, noisy, clean))
    if not o.shape == n.shape == c.shape or o.ndim not in (2, 3):
        raise InputError(f"found shapes {o.shape}, {n.shape}, {c.shape}, expected equal 2-D or 3-D shapes")
    if n.shape[-2] < window or n.shape[-1] < window:
        raise InputError(f"image {n.shape[-2:]} is smaller than the {window}-px window")
    left = np.sqrt(np.mean((window_blocks(o, window) - window_blocks(c, window)) ** 2, axis=-1))
    noise = np.sqrt(np.mean((window_blocks(n, window) - window_blocks(c, window)) ** 2, axis=-1))
    ratios: np.ndarray = (left / noise).reshape(-1)
    return ratios


def patchiness(out: np.ndarray, noisy: np.ndarray, clean: np.ndarray, window: int = 64) -> dict[str, float]:
    """How unevenly a denoiser removed noise over a region without structure (flat or empty ice),
    measured against the clean image (simulation); without one, on two independent halves, the same
    idea is :func:`cryodeploy.imaging.splits.residual_spread`.

    ``spread``: the coefficient of variation of :func:`window_noise_left` over the windows;
    ``uniform_spread``: the same for a Gaussian low-pass that leaves the same mean fraction of white
    noise (sigma = 1 / (2 sqrt(pi) * noise_left)), a spatially uniform filter whose spread is only
    the sampling noise of the windows' estimates (it grows with the smoothing); ``noise_left``: the
    mean fraction left. A patchwork (raw noise beside smoothed patches) has ``spread`` far above
    ``uniform_spread``.
    """
    r = window_noise_left(out, noisy, clean, window)
    left = float(np.mean(r))
    sigma = 1.0 / (2.0 * np.sqrt(np.pi) * max(left, 1e-3))
    stack = np.asarray(noisy, dtype=np.float32).reshape(-1, *np.shape(noisy)[-2:])
    smooth = np.stack([gaussian_filter(f, sigma) for f in stack]) if sigma > 0.3 else stack
    u = window_noise_left(smooth, stack, np.asarray(clean).reshape(stack.shape), window)
    return {"noise_left": left, "spread": spread(r), "uniform_spread": spread(u)}
