"""One image's plan: every scalar parameter (optics, ice, carbon hole, contamination, detector
mode, particles, filaments) drawn from ``default_rng([seed, index])``, the same on every device;
and the per-image torch streams."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from cryodeploy.imaging.simulate.config import SimConfig
from cryodeploy.imaging.simulate.optics import electron_wavelength, ice_mean_free_path
from cryodeploy.imaging.simulate.particles import ModelLibrary
from cryodeploy.imaging.simulate.placement import (
    _Filament,
    _log_uniform,
    _Particles,
    _plan_filaments,
    _plan_particles,
    _uniform,
)


@dataclass
class _Plan:
    """Everything about one image except its large random arrays."""

    meta: dict[str, Any]
    particles: _Particles
    filaments: list[_Filament]
    hole: tuple[float, float, float] | None  # cy, cx, radius (px); carbon outside
    blobs: list[tuple[float, float, float, float, np.ndarray, np.ndarray]]  # cy, cx, r, h(A), amps, phases
    ice_plane: tuple[float, float]  # gradient direction (uy, ux)
    ice_waves: np.ndarray  # [3, 4]: ky, kx (cycles/px), phase, amplitude


def _plan_hole(
    rng: np.random.Generator,
    config: SimConfig,
    grid: tuple[int, int],
    field0: tuple[int, int],
    px: float,
) -> tuple[float, float, float] | None:
    """A hole edge crossing the field (hole 1-2 um, carbon outside, 10-40 % of the field carbon)."""
    if rng.uniform() >= config.p_carbon:
        return None
    h, w = config.shape
    radius = max(rng.uniform(5000.0, 10000.0) / px, 0.6 * math.hypot(*grid))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    edge = 0.5 * min(h, w) * rng.uniform(0.2, 0.8)
    cy = field0[0] + 0.5 * h - math.sin(angle) * (radius - edge)
    cx = field0[1] + 0.5 * w - math.cos(angle) * (radius - edge)
    return (cy, cx, radius)


def _plan_blobs(
    rng: np.random.Generator, config: SimConfig, grid: tuple[int, int], px: float
) -> list[tuple[float, float, float, float, np.ndarray, np.ndarray]]:
    """Contamination blobs: centre, radius (px), height (A), outline harmonics (m = 2..4)."""
    if rng.uniform() >= config.p_contamination:
        return []
    out = []
    for _ in range(int(rng.integers(1, 4))):
        r = 0.5 * _log_uniform(rng, config.contamination_diameter_a) / px
        out.append(
            (
                rng.uniform(0, grid[0]),
                rng.uniform(0, grid[1]),
                r,
                _uniform(rng, config.contamination_height_a),
                rng.uniform(0.0, 0.12, 3),
                rng.uniform(0.0, 2 * math.pi, 3),
            )
        )
    return out


def _corr(a: float) -> float:
    """Neighbour correlation of white noise after 1-D linear interpolation at fraction ``a``."""
    return a * (1 - a) / ((1 - a) ** 2 + a * a)


def _plan_image(
    config: SimConfig,
    lib: ModelLibrary,
    seed: int,
    index: int,
    grid: tuple[int, int],
    field0: tuple[int, int],
) -> _Plan:
    """Draw all scalar parameters of image ``index`` from ``default_rng([seed, index])``."""
    rng = np.random.default_rng([seed, index])
    px = _uniform(rng, config.pixel_size_a)
    dose = _log_uniform(rng, config.dose_e_per_px)
    voltage = float(config.voltages_kv[int(rng.integers(0, len(config.voltages_kv)))])
    cs = _uniform(rng, config.cs_mm)
    df = _uniform(rng, config.defocus_um)
    astig = _uniform(rng, config.astigmatism_um)
    angle = float(rng.uniform(0.0, 180.0))
    amp = _uniform(rng, config.amplitude_contrast)
    bfac = _uniform(rng, config.bfactor_a2)
    phase = _uniform(rng, config.phase_shift_deg)
    sigma_a = _uniform(rng, config.atom_sigma_a)
    protein_v = _uniform(rng, config.protein_potential_v)
    ice_t = _uniform(rng, config.ice_thickness_a)
    ice_g = _uniform(rng, config.ice_gradient)
    ice_dir = rng.uniform(0, 2 * math.pi)
    water = _uniform(rng, config.water_texture)
    micron = 1e4 / px  # ice thickness varies on the scale of microns
    waves = np.stack(
        [
            rng.uniform(-1.0, 1.0, 3) / micron,
            rng.uniform(-1.0, 1.0, 3) / micron,
            rng.uniform(0, 2 * math.pi, 3),
            rng.uniform(0, 0.5, 3),
        ],
        axis=1,
    )
    carbon_t = _uniform(rng, config.carbon_thickness_a)
    carbon_edge = float(rng.uniform(3.0, 20.0))  # width (A) of the film's edge taper
    hole = _plan_hole(rng, config, grid, field0, px)
    blobs = _plan_blobs(rng, config, grid, px)
    mtf_sigma = _uniform(rng, config.mtf_sigma_px)
    gain = bool(rng.uniform() < config.p_gain)
    interp = bool(rng.uniform() < config.p_interpolated)
    shift = rng.uniform(0.25, 0.75, 2) if interp else np.zeros(2)
    meta: dict[str, Any] = {
        "index": index,
        "seed": seed,
        "shape": list(config.shape),
        "pixel_size_a": px,
        "dose_e_per_px": dose,
        "dose_e_per_a2": dose / (px * px),
        "voltage_kv": voltage,
        "wavelength_a": electron_wavelength(voltage),
        "cs_mm": cs,
        "defocus_um": df,
        "defocus_u_um": df + 0.5 * astig,
        "defocus_v_um": df - 0.5 * astig,
        "astigmatism_um": astig,
        "astig_angle_deg": angle,
        "amplitude_contrast": amp,
        "phase_shift_deg": phase,
        "bfactor_a2": bfac,
        "atom_sigma_a": sigma_a,
        "protein_potential_v": protein_v,
        "ice_thickness_a": ice_t,
        "ice_gradient": ice_g,
        "ice_mean_free_path_a": ice_mean_free_path(voltage),
        "water_texture": water,
        "has_carbon": hole is not None,
        "carbon_thickness_a": carbon_t if hole is not None else 0.0,
        "carbon_edge_a": carbon_edge if hole is not None else 0.0,
        "has_contamination": bool(blobs),
        "n_contamination": len(blobs),
        "mtf": "sinc",
        "mtf_sigma_px": mtf_sigma,
        "gain": gain,
        "interpolated": interp,
        "shift_px": [float(shift[0]), float(shift[1])],
        "noise_corr_y": _corr(float(shift[0])) if interp else 0.0,
        "noise_corr_x": _corr(float(shift[1])) if interp else 0.0,
    }
    sigma_eff = max(sigma_a, 0.6 * px)
    particles = _plan_particles(rng, config, lib, grid, px, sigma_eff, protein_v, hole, meta)
    filaments = _plan_filaments(rng, config, grid, px, sigma_eff, protein_v, meta["empty_field"])
    meta["n_filaments"] = len(filaments)
    return _Plan(meta, particles, filaments, hole, blobs, (math.sin(ice_dir), math.cos(ice_dir)), waves)


def _torch_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit torch seed for a stream of image ``index``."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _column(plans: list[_Plan], key: str, dev: torch.device, scale: float = 1.0) -> torch.Tensor:
    """A metadata value of every image as a [n, 1, 1] float32 tensor."""
    v = np.array([float(p.meta[key]) * scale for p in plans])
    return torch.from_numpy(v).to(dev, torch.float32).view(-1, 1, 1)
