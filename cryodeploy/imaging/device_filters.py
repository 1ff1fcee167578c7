"""Torch versions of :mod:`cryodeploy.imaging.filters` for the device frame path: the same
definitions (Fourier cropping with the even-size Nyquist row/column zeroed, the raised-cosine
low-pass edge :data:`~cryodeploy.imaging.filters.EDGE_WIDTH`, the Gaussian's kernel to 4 sigma with
reflecting borders) on 2-D float32 tensors of any device, computed in float32 there.

:data:`TORCH_OPS` lets :class:`~cryodeploy.imaging.filters.FrameFilters` apply itself to device
frames as it does to numpy ones.
"""

from __future__ import annotations

import math

import torch

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.filters import EDGE_WIDTH, FilterOps, check_lowpass

__all__ = ["TORCH_OPS", "fourier_bin", "gaussian", "lowpass"]


def _centre_indices(n: int, m: int, device: torch.device) -> torch.Tensor:
    """Indices (in FFT order) of the ``m`` lowest frequencies of an ``n``-point transform."""
    return torch.fft.ifftshift(torch.arange(m, device=device) - m // 2) % n


def fourier_bin(frame: torch.Tensor, factor: int) -> torch.Tensor:
    """``frame`` downsampled by ``factor`` through Fourier cropping to ``(H // factor, W // factor)``."""
    if factor < 1:
        raise ConfigError(f"bin factor {factor}: expected an integer >= 1")
    x = frame.to(torch.float32)
    if factor == 1:
        return x
    h, w = x.shape
    oh, ow = h // factor, w // factor
    if oh < 1 or ow < 1:
        raise ConfigError(f"bin factor {factor}: a {w}x{h} frame would have no pixels left")
    spectrum = torch.fft.fft2(x)
    rows, cols = _centre_indices(h, oh, x.device), _centre_indices(w, ow, x.device)
    cropped = spectrum.index_select(0, rows).index_select(1, cols)
    if oh % 2 == 0:  # an even output size: its Nyquist row/column has no real-valued partner, drop it
        cropped[oh // 2, :] = 0
    if ow % 2 == 0:
        cropped[:, ow // 2] = 0
    return torch.fft.ifft2(cropped).real.mul_((oh * ow) / (h * w))


def lowpass_transfer(shape: tuple[int, int], cutoff: float, device: torch.device) -> torch.Tensor:
    """The low-pass filter's real transfer function on ``torch.fft.rfft2``'s grid; ``cutoff`` in cycles/px."""
    fy = torch.fft.fftfreq(shape[0], device=device, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(shape[1], device=device, dtype=torch.float64)[None, :]
    t = ((fy * fy + fx * fx).sqrt() - cutoff).div_(EDGE_WIDTH).clamp_(0.0, 1.0)
    return (0.5 * (1.0 + torch.cos(math.pi * t))).to(torch.float32)


def lowpass(frame: torch.Tensor, resolution: float, pixel_size: float | None = None) -> torch.Tensor:
    """``frame`` with detail finer than ``resolution`` (Å if ``pixel_size`` is given, else px) removed."""
    px = check_lowpass(resolution, pixel_size)
    x = frame.to(torch.float32)
    shape = (int(x.shape[0]), int(x.shape[1]))
    spectrum = torch.fft.rfft2(x) * lowpass_transfer(shape, px / resolution, x.device)
    return torch.fft.irfft2(spectrum, s=shape)


def _reflect_indices(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices of ``n`` samples extended by ``radius`` each side, mirrored about the edges
    (``d c b a | a b c d | d c b a``, scipy's ``reflect``), for any ``radius``."""
    j = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(j >= n, 2 * n - 1 - j, j)


def gaussian(frame: torch.Tensor, sigma: float) -> torch.Tensor:
    """``frame`` blurred with a Gaussian of ``sigma`` pixels (borders reflected, kernel to 4 sigma)."""
    if not sigma > 0:
        raise ConfigError(f"gaussian sigma {sigma:g}: expected > 0 pixels")
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, device=frame.device, dtype=torch.float64)
    kernel = torch.exp(-0.5 / (sigma * sigma) * offsets * offsets)
    kernel = (kernel / kernel.sum()).to(torch.float32).view(1, 1, -1)
    x = frame.to(torch.float32)
    h, w = x.shape
    # rows first (axis 0), then columns, as a separable 1-D correlation each
    cols = x.index_select(0, _reflect_indices(h, radius, x.device)).t().unsqueeze(1)  # [w, 1, h + 2r]
    x = torch.nn.functional.conv1d(cols, kernel).squeeze(1).t()  # [h, w]
    rows = x.index_select(1, _reflect_indices(w, radius, x.device)).unsqueeze(1)  # [h, 1, w + 2r]
    return torch.nn.functional.conv1d(rows, kernel).squeeze(1).contiguous()


#: :class:`~cryodeploy.imaging.filters.FrameFilters` applies these to device frames
TORCH_OPS = FilterOps(fourier_bin, lowpass, gaussian)
