"""The simulator: :func:`simulate` renders a batch of planned images to expected and noisy counts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.simulate.config import SimConfig
from cryodeploy.imaging.simulate.detector import _counts, _gain, _mtf_blur, _shift
from cryodeploy.imaging.simulate.optics import _ctf_from_grid, _freq_grid, interaction_constant
from cryodeploy.imaging.simulate.particles import ModelLibrary, build_library
from cryodeploy.imaging.simulate.scene import _column, _Plan, _plan_image, _torch_seed
from cryodeploy.imaging.simulate.specimen import _phase_spectrum, _transmission
from cryodeploy.imaging.synth import as_integer


@dataclass
class SimBatch:
    """Simulated micrographs: ``noisy`` counts and ``clean`` = E[noisy], [n, H, W] float32 on the device.

    ``noisy2``: a second, independent draw of the same detector (``pairs=True``), for
    Noise2Noise. ``potential``: the particles' projected potential (V*A, pseudo-atom blur, no
    CTF; ``with_potential=True``), resampled like ``clean``. ``meta``: one JSON-ready dict per image.
    ``rate``, ``gain``, ``shift``: the detector's state (expected counts on its (H+1, W+1) pixels,
    per-pixel gain, interpolation shift [n, 2]), which :meth:`redraw` uses.
    """

    noisy: torch.Tensor
    clean: torch.Tensor
    meta: list[dict[str, Any]]
    noisy2: torch.Tensor | None = None
    potential: torch.Tensor | None = None
    rate: torch.Tensor | None = None
    gain: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    def redraw(self, scale: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The same scenes at ``scale`` [n] times the dose, with fresh counts of ``seed``: (noisy, clean),
        [n, H, W] each, exactly as :func:`simulate` makes them at that dose."""
        if self.rate is None or self.gain is None or self.shift is None:
            raise ConfigError("redraw needs the detector state that simulate() records")
        rate = self.rate * scale.to(self.rate).view(-1, 1, 1)
        return _shift(_counts(rate, self.gain, seed, 2), self.shift), _shift(rate, self.shift)


def _good_size(n: int) -> int:
    """The smallest even n' >= n whose prime factors are 2, 3 and 5 (fast FFTs)."""
    m = n + (n % 2)
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 2


def _padded(shape: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Padded simulation grid for (H+1, W+1) output pixels, and the field's origin in it."""
    grid = tuple(_good_size(d + 1 + 2 * max(16, math.ceil(0.125 * d))) for d in shape)
    origin = tuple((g - d - 1) // 2 for g, d in zip(grid, shape, strict=True))
    return (grid[0], grid[1]), (origin[0], origin[1])


def _batch_ctf(plans: list[_Plan], s2: torch.Tensor, theta: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """Each image's CTF on the rfft grid, [n, Hp, Wp // 2 + 1]."""
    return _ctf_from_grid(
        s2,
        theta,
        _column(plans, "wavelength_a", dev),
        _column(plans, "defocus_u_um", dev, 1e4),
        _column(plans, "defocus_v_um", dev, 1e4),
        _column(plans, "astig_angle_deg", dev, math.pi / 180),
        _column(plans, "cs_mm", dev, 1e7),
        _column(plans, "amplitude_contrast", dev),
        _column(plans, "bfactor_a2", dev),
        _column(plans, "phase_shift_deg", dev, math.pi / 180),
    )


def _expected_counts(
    plans: list[_Plan],
    spec: torch.Tensor,
    s2: torch.Tensor,
    grid: tuple[int, int],
    fy: torch.Tensor,
    fx: torch.Tensor,
    dev: torch.device,
) -> torch.Tensor:
    """Expected counts per detector pixel on the padded grid: dose x T x (1 + 2 CTF (*) phase),
    blurred by the detector MTF."""
    sigma = torch.tensor([interaction_constant(p.meta["voltage_kv"]) for p in plans], device=dev).view(
        -1, 1, 1
    )
    contrast = torch.fft.irfft2(spec * (_batch_ctf(plans, s2, torch.atan2(fy, fx), dev) * sigma), s=grid)
    dose = _column(plans, "dose_e_per_px", dev)
    intensity = (dose * _transmission(plans, grid, dev) * (1.0 + 2.0 * contrast)).clamp_min(0.0)
    return _mtf_blur(intensity, _column(plans, "mtf_sigma_px", dev), fy, fx, grid)


def simulate(
    config: SimConfig,
    n: int,
    seed: int,
    device: str | torch.device = "cpu",
    *,
    pairs: bool = False,
    with_potential: bool = False,
    library: ModelLibrary | None = None,
) -> SimBatch:
    """Simulate ``n`` micrographs: images ``0..n-1`` of ``seed`` (image i depends only on seed, i).

    ``pairs``: also return ``noisy2``, an independent draw with the same detector (gain,
    interpolation); ``with_potential``: also the particles' projected potential. ``library``:
    the models to draw from (default :func:`build_library` of the config).
    """
    n_i, seed_i = as_integer(n), as_integer(seed)
    if n_i is None or n_i < 1:
        raise ConfigError(f"simulate n: found {n!r}, expected an integer >= 1")
    if seed_i is None or seed_i < 0:
        raise ConfigError(f"simulate seed: found {seed!r}, expected an integer >= 0")
    dev = torch.device(device)
    lib = library if library is not None else build_library(config)
    h, w = config.shape
    grid, (oy, ox) = _padded(config.shape)
    plans = [_plan_image(config, lib, seed_i, i, grid, (oy, ox)) for i in range(n_i)]
    gens = [torch.Generator(device=dev).manual_seed(_torch_seed(seed_i, i, 1)) for i in range(n_i)]

    fy, fx = _freq_grid(grid, True, dev, torch.float32)
    pixel = _column(plans, "pixel_size_a", dev)
    s2 = (fy * fy + fx * fx) / (pixel * pixel)  # [n, Hp, Wp // 2 + 1], 1/A^2
    spec, potential = _phase_spectrum(plans, gens, lib, grid, s2, dev, with_potential)
    rate = _expected_counts(plans, spec, s2, grid, fy, fx, dev)[
        :, oy : oy + h + 1, ox : ox + w + 1
    ].contiguous()

    # The detector: (H+1, W+1) pixels, gain, Poisson; then the (optional) interpolation to (H, W).
    gain = _gain(plans, gens, (h + 1, w + 1), dev)
    shift = torch.from_numpy(np.array([p.meta["shift_px"] for p in plans])).to(dev, torch.float32)
    clean = _shift(rate, shift)
    noisy = _shift(_counts(rate, gain, seed_i, 2), shift)
    noisy2 = _shift(_counts(rate, gain, seed_i, 3), shift) if pairs else None
    if potential is not None:
        potential = _shift(potential[:, oy : oy + h + 1, ox : ox + w + 1], shift)
    means = clean.mean(dim=(1, 2))
    contrasts = clean.std(dim=(1, 2)) / means.clamp_min(1e-12)
    for p, mean, con in zip(plans, means.tolist(), contrasts.tolist(), strict=True):
        p.meta["mean_counts"] = mean
        p.meta["contrast"] = con
    return SimBatch(noisy, clean, [p.meta for p in plans], noisy2, potential, rate, gain, shift)
