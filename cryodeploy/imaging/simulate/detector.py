"""The counting detector: MTF blur, gain, Poisson counts and the interpolated-sum resampling."""

from __future__ import annotations

import math

import torch

from cryodeploy.imaging.simulate.scene import _Plan, _torch_seed


def _mtf_blur(
    intensity: torch.Tensor, sig: torch.Tensor, fy: torch.Tensor, fx: torch.Tensor, grid: tuple[int, int]
) -> torch.Tensor:
    """Expected counts blurred by the detector MTF: the pixel aperture ``sinc(fx) sinc(fy)``
    (cycles/pixel) times a Gaussian of ``sig`` px ([n, 1, 1]); ringing below 0 is clipped."""
    mtf = torch.sinc(fy) * torch.sinc(fx) * torch.exp(-2.0 * math.pi**2 * sig * sig * (fy * fy + fx * fx))
    return torch.fft.irfft2(torch.fft.rfft2(intensity) * mtf, s=grid).clamp_min(0.0)


def _gain(
    plans: list[_Plan], gens: list[torch.Generator], shape: tuple[int, int], dev: torch.device
) -> torch.Tensor:
    """Per-pixel detector efficiency (1 where no gain): a smooth flat-field-like pattern times
    3 % pixel-to-pixel variation, [n, H+1, W+1]."""
    h, w = shape
    f32 = torch.float32
    yy = torch.linspace(-1, 1, h, device=dev, dtype=f32)[:, None]
    xx = torch.linspace(-1, 1, w, device=dev, dtype=f32)[None, :]
    out = torch.ones(len(plans), h, w, device=dev)
    for i, (p, g) in enumerate(zip(plans, gens, strict=True)):
        if not p.meta["gain"]:
            continue
        c = torch.randn(5, generator=g, device=dev) * 0.02
        smooth = (
            1.0
            + c[0] * xx
            + c[1] * yy
            + c[2] * xx * yy
            + c[3] * (xx * xx - yy * yy)
            + c[4] * (xx * xx + yy * yy)
        )
        out[i] = (smooth * torch.exp(0.03 * torch.randn(h, w, generator=g, device=dev))).clamp(0.7, 1.3)
    return out


def _shift(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Bilinear resampling of [n, H+1, W+1] at (y + dy, x + dx) -> [n, H, W]; shift [n, 2] in [0, 1)."""
    if not bool(torch.any(shift != 0)):
        return x[:, :-1, :-1].clone()
    dy, dx = shift[:, 0, None, None], shift[:, 1, None, None]
    top = x[:, :-1, :-1] * (1 - dx) + x[:, :-1, 1:] * dx
    bottom = x[:, 1:, :-1] * (1 - dx) + x[:, 1:, 1:] * dx
    return top * (1 - dy) + bottom * dy


def _counts(rate: torch.Tensor, gain: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Gain-corrected Poisson counts ``Poisson(g * rate) / g``, each image from its own generator."""
    out = []
    for i in range(rate.shape[0]):
        g = torch.Generator(device=rate.device).manual_seed(_torch_seed(seed, i, stream))
        out.append(torch.poisson(rate[i] * gain[i], generator=g) / gain[i])
    return torch.stack(out)
