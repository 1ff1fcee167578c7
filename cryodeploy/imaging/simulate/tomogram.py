"""Synthetic tomograms with exact clean volumes and independent even/odd noise, in torch (CPU or CUDA).

Model (a reconstruction in counts per voxel, weak-phase, linear):

* **Density** ``s``: an ice slab (1 inside, soft faces), particles as pseudo-atom point clouds of
  the simulator's procedural shapes (:func:`~cryodeploy.imaging.simulate.particles.procedural_model`)
  rotated uniformly in SO(3), trilinearly scattered (excess 0.4 over ice, times the fraction of
  a voxel each point fills), and lipid bilayers (two Gaussian leaflets 40 A apart, excess 0.5) on
  spherical shells: vesicles and spheres far larger than the box (curved sheets), inside the ice.
* **Imaging**: the expected counts ``rate = dose * (1 + contrast * irfft(H * rfft(s)))`` where
  ``H(k) = CTF_t(|k|) * exp(-2 pi^2 sigma^2 |k|^2)``; the tilt ``t`` of a Fourier voxel is the
  one whose central slice (rotated about Y) holds it, nearest in angle, each tilt with its own
  defocus and B-factor (``CTF = -1`` without ``ctf``: dark protein). Not modelled: the defocus
  gradient across a tilted specimen, Crowther gaps between tilts, multiple scattering.
* **Missing wedge**: ``W`` keeps the Fourier voxels within +-tilt range of the X axis in the
  X-Z plane (``|kz| <= tan(range) |kx|``) and zeroes the rest exactly; ``clean = W(rate)``.
* **Noise**: ``even = W(Poisson(rate))`` and ``odd`` likewise with an independent stream, so
  ``E[even] = E[odd] = clean`` exactly (``W`` is linear). Without a wedge (range 90) and CTF-free
  or not, the halves are integer counts (thinnable).

Tomogram ``i`` of seed ``s`` depends only on ``(s, i)`` and the config: the scene comes from numpy,
the Poisson draws from per-tomogram ``torch.Generator`` s on the device, and the scatter sums in
integer fixed point on CUDA, so a device gives the same volumes on every run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryodeploy.imaging.simulate.optics import _ctf_from_grid, electron_wavelength
from cryodeploy.imaging.simulate.scene import _torch_seed
from cryodeploy.imaging.simulate.tomoscene import TomoConfig, TomoScene, plan_scene, tomo_library

__all__ = ["Tomogram", "missing_wedge_mask", "simulate_tomogram"]

_PROTEIN_EXCESS = 0.4
_LIPID_EXCESS = 0.5
_LEAFLET_A = 20.0  # half the head-group separation of a bilayer
_LEAFLET_SIGMA_A = 6.0
_POINT_SIGMA = 0.5  # voxels: the size of a pseudo-atom
_FIXED_POINT = float(2**24)


@dataclass
class Tomogram:
    """One synthetic tomogram: ``clean`` (the exact expectation), ``even`` and ``odd`` (independent
    noisy halves), float32 [nz, ny, nx] on the device, and what was drawn (``meta``)."""

    clean: torch.Tensor
    even: torch.Tensor
    odd: torch.Tensor
    meta: dict[str, Any]


def _freqs(shape: tuple[int, int, int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frequencies (cycles/voxel) ``kz, ky, kx`` of an rfftn grid, broadcastable to its shape."""
    nz, ny, nx = shape
    kz = torch.fft.fftfreq(nz, device=dev)[:, None, None]
    ky = torch.fft.fftfreq(ny, device=dev)[None, :, None]
    kx = torch.fft.rfftfreq(nx, device=dev)[None, None, :]
    return kz, ky, kx


def missing_wedge_mask(
    shape: tuple[int, int, int], tilt_range_deg: float, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """Boolean rfftn-grid mask [nz, ny, nx // 2 + 1] of the Fourier voxels a tilt series over
    +-``tilt_range_deg`` about Y measures: ``|kz| <= tan(range) |kx|`` (all of them at 90)."""
    kz, ky, kx = _freqs(shape, torch.device(device))
    full = torch.ones(kz.shape[0], ky.shape[1], kx.shape[2], dtype=torch.bool, device=kz.device)
    if tilt_range_deg >= 90.0:
        return full
    return full & (kz.abs() <= math.tan(math.radians(tilt_range_deg)) * kx.abs() + 1e-12)


def _scatter(points: torch.Tensor, weights: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Trilinear scatter-add of ``weights`` at ``points`` [N, 3] (z, y, x voxels) onto a grid; points
    outside are dropped. On CUDA the sum is in integer fixed point (exact, order-independent)."""
    dims = torch.tensor(shape, device=points.device)
    inside = ((points >= 0) & (points <= dims - 1)).all(dim=1)
    p, w = points[inside], weights[inside]
    base = torch.floor(p)
    f = p - base
    i0 = base.long()
    nz, ny, nx = shape
    idx, wt = [], []
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                z = torch.clamp(i0[:, 0] + dz, max=nz - 1)
                y = torch.clamp(i0[:, 1] + dy, max=ny - 1)
                x = torch.clamp(i0[:, 2] + dx, max=nx - 1)
                idx.append((z * ny + y) * nx + x)
                wt.append(
                    w
                    * (f[:, 0] if dz else 1 - f[:, 0])
                    * (f[:, 1] if dy else 1 - f[:, 1])
                    * (f[:, 2] if dx else 1 - f[:, 2])
                )
    index, weight = torch.cat(idx), torch.cat(wt)
    if index.is_cuda:
        acc = torch.zeros(nz * ny * nx, dtype=torch.int64, device=index.device)
        acc.index_add_(0, index, torch.round(weight.double() * _FIXED_POINT).long())
        return (acc.double() / _FIXED_POINT).float().view(shape)
    out = torch.zeros(nz * ny * nx, dtype=torch.float32, device=index.device)
    out.index_add_(0, index, weight.float())
    return out.view(shape)


def _particles(cfg: TomoConfig, scene: TomoScene, dev: torch.device) -> torch.Tensor:
    """The particles' excess density on the grid."""
    lib = tomo_library(cfg.library_size, cfg.seed, cfg.particle_diameter_a)
    if not scene.particles:
        return torch.zeros(cfg.shape, device=dev)
    rng = np.random.default_rng([cfg.seed, int(scene.meta["index"]), 7333])
    pts, wts = [], []
    for j, centre, rot in scene.particles:
        m = lib[j]
        xyz = m.points.astype(np.float64) + m.jitter_a * rng.standard_normal(m.points.shape)
        zyx = (xyz @ rot.T)[:, ::-1] / cfg.voxel_size + centre
        pts.append(zyx)
        wts.append(np.full(len(zyx), _PROTEIN_EXCESS * m.volume_a3 / len(zyx) / cfg.voxel_size**3))
    p = torch.from_numpy(np.concatenate(pts)).to(dev, torch.float32)
    return _scatter(p, torch.from_numpy(np.concatenate(wts)).to(dev, torch.float32), cfg.shape)


def _grid(shape: tuple[int, int, int], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    nz, ny, nx = shape
    return (
        torch.arange(nz, device=dev, dtype=torch.float32)[:, None, None],
        torch.arange(ny, device=dev, dtype=torch.float32)[None, :, None],
        torch.arange(nx, device=dev, dtype=torch.float32)[None, None, :],
    )


def _slab(cfg: TomoConfig, scene: TomoScene, dev: torch.device) -> torch.Tensor:
    """The ice slab, 1 inside with faces softened over ~1 voxel."""
    z, y, x = _grid(cfg.shape, dev)
    _, ny, nx = cfg.shape
    n = scene.slab_normal
    d = (z - scene.slab_centre) * n[0] + (y - 0.5 * (ny - 1)) * n[1] + (x - 0.5 * (nx - 1)) * n[2]
    return torch.sigmoid((0.5 * scene.slab_thickness - d.abs()) / 0.5)


def _membranes(cfg: TomoConfig, scene: TomoScene, dev: torch.device) -> torch.Tensor:
    """The bilayers on every shell, computed in each shell's bounding box."""
    out = torch.zeros(cfg.shape, device=dev)
    reach = (_LEAFLET_A + 4 * _LEAFLET_SIGMA_A) / cfg.voxel_size
    delta, sigma = _LEAFLET_A / cfg.voxel_size, _LEAFLET_SIGMA_A / cfg.voxel_size
    z, y, x = _grid(cfg.shape, dev)
    for centre, radius in scene.shells:
        lo = [max(0, math.floor(c - radius - reach)) for c in centre]
        hi = [min(n, math.ceil(c + radius + reach) + 1) for c, n in zip(centre, cfg.shape, strict=True)]
        if any(h <= lo_ for lo_, h in zip(lo, hi, strict=True)):
            continue
        zz, yy, xx = z[lo[0] : hi[0]], y[:, lo[1] : hi[1]], x[..., lo[2] : hi[2]]
        r = torch.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2) - radius
        leaflets = torch.exp(-0.5 * ((r - delta) / sigma) ** 2) + torch.exp(-0.5 * ((r + delta) / sigma) ** 2)
        out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] += _LIPID_EXCESS * leaflets
    return out


def _transfer(cfg: TomoConfig, scene: TomoScene, dev: torch.device) -> torch.Tensor:
    """``contrast * CTF_tilt(|k|) * point blur`` on the rfftn grid (before the wedge)."""
    kz, ky, kx = _freqs(cfg.shape, dev)
    k2 = kz * kz + ky * ky + kx * kx
    blur = torch.exp(-2.0 * math.pi**2 * _POINT_SIGMA**2 * k2)
    if not cfg.ctf:
        return -cfg.contrast * blur
    k = (len(cfg.tilts_deg) - 1) // 2
    angle = torch.atan2(-kz, kx).expand(k2.shape)  # the tilt whose central slice holds k, in [-90, 90]
    which = torch.clamp(torch.round(torch.rad2deg(angle) / cfg.tilt_step_deg).long() + k, 0, 2 * k)

    def per_tilt(values: np.ndarray) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=dev)[which]

    s2 = k2 / cfg.voxel_size**2
    df = per_tilt(scene.defocus_a)
    f32 = torch.float32
    ctf = _ctf_from_grid(
        s2,
        torch.zeros((), device=dev),
        torch.tensor(electron_wavelength(cfg.voltage_kv), dtype=f32, device=dev),
        df,
        df,
        torch.zeros((), device=dev),
        torch.tensor(cfg.cs_mm * 1e7, dtype=f32, device=dev),
        torch.tensor(cfg.amplitude_contrast, dtype=f32, device=dev),
        per_tilt(scene.bfactor),
        torch.zeros((), device=dev),
    )
    return cfg.contrast * ctf * blur


def _wedge(volume: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.fft.irfftn(torch.fft.rfftn(volume) * mask, s=volume.shape)


def simulate_tomogram(cfg: TomoConfig, index: int = 0, device: str | torch.device = "cpu") -> Tomogram:
    """Tomogram ``index`` of ``cfg`` (see the module docstring) on ``device``."""
    dev = torch.device(device)
    scene = plan_scene(cfg, index)
    density = _slab(cfg, scene, dev)
    density = density * (1.0 + _membranes(cfg, scene, dev)) + _particles(cfg, scene, dev)
    mask = missing_wedge_mask(cfg.shape, cfg.tilt_range_deg, dev)
    signal = torch.fft.irfftn(torch.fft.rfftn(density) * _transfer(cfg, scene, dev), s=cfg.shape)
    rate = cfg.dose * (1.0 + signal)
    clipped = int((rate < 0).sum())
    rate = rate.clamp_min(0.0)
    del signal, density
    halves = []
    for stream in (1, 2):
        g = torch.Generator(device=dev)
        g.manual_seed(_torch_seed(cfg.seed, index, 7340 + stream))
        counts = torch.poisson(rate, generator=g)
        halves.append(counts if cfg.tilt_range_deg >= 90.0 else _wedge(counts, mask))
    clean = rate if cfg.tilt_range_deg >= 90.0 else _wedge(rate, mask)
    meta = {
        **scene.meta,
        "dose_per_voxel": cfg.dose,
        "clipped_voxels": clipped,
        "measured_fourier_fraction": float(mask.float().mean()),
    }
    return Tomogram(
        clean.float().contiguous(), halves[0].float().contiguous(), halves[1].float().contiguous(), meta
    )
