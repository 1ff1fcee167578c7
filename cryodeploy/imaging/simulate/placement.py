"""Where an image's particles and filaments go: species, counts, sizes, orientations, positions and
pseudo-atom budgets (scalar draws with numpy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from cryodeploy.imaging.simulate.config import Range, SimConfig
from cryodeploy.imaging.simulate.particles import ModelLibrary

# Pseudo-atoms per effective blur area (4 pi sigma^2): sets how many points a particle gets.
_POINTS_PER_BLOB = 12.0
_MAX_POINTS_PER_IMAGE = 3_000_000
_MAX_PARTICLES = 4000


@dataclass
class _Particles:
    """Particles of one image: model index, scale, projection rows of the rotation, centre (px)."""

    model: np.ndarray
    scale: np.ndarray
    rot2: np.ndarray
    centre: np.ndarray
    n_points: np.ndarray
    weight: np.ndarray  # per point, V*A (already divided by the pixel area)
    jitter: np.ndarray  # px


@dataclass
class _Filament:
    """A helical filament crossing the field (all lengths in px)."""

    centre: np.ndarray  # y, x
    axis: np.ndarray  # unit 3-vector (x, y, z)
    e1: np.ndarray
    e2: np.ndarray
    t0: float  # the axis runs from centre + t0 * axis to centre + t1 * axis
    t1: float
    radius: float  # helix radius
    tube: float  # tube radius
    pitch: float
    strands: int
    n_points: int
    weight: float


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _log_uniform(rng: np.random.Generator, r: Range) -> float:
    return float(math.exp(rng.uniform(math.log(r[0]), math.log(r[1]))))


def _rotations2(rng: np.random.Generator, k: int) -> np.ndarray:
    """First two rows of ``k`` uniformly random rotations (unit quaternions), [k, 2, 3]."""
    q = rng.normal(size=(k, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    r0 = np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], axis=1)
    r1 = np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], axis=1)
    return np.stack([r0, r1], axis=1)


def _on_carbon(hole: tuple[float, float, float] | None, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Whether points (px) lie on the carbon (outside the hole)."""
    if hole is None:
        return np.zeros(np.shape(y), bool)
    result: np.ndarray = np.hypot(y - hole[0], x - hole[1]) > hole[2]
    return result


def _place(rng: np.random.Generator, radii: np.ndarray, grid: tuple[int, int], overlap: bool) -> np.ndarray:
    """Centres (px, [k, 2]) on the padded grid; without overlap, greedy rejection (a few tries
    each; particles that do not fit are dropped: their centre is NaN)."""
    hp, wp = grid
    k = len(radii)
    if overlap:
        return np.stack([rng.uniform(0, hp, k), rng.uniform(0, wp, k)], axis=1)
    centres = np.full((k, 2), np.nan)
    placed = np.zeros((0, 2))
    placed_r = np.zeros(0)
    for j in range(k):
        cand = np.stack([rng.uniform(0, hp, 24), rng.uniform(0, wp, 24)], axis=1)
        if len(placed):
            dy = cand[:, None, 0] - placed[None, :, 0]
            dx = cand[:, None, 1] - placed[None, :, 1]
            ok = np.all(np.hypot(dy, dx) > 0.85 * (radii[j] + placed_r[None, :]), axis=1)
            if not ok.any():
                continue
            cand = cand[np.argmax(ok)][None]
        centres[j] = cand[0]
        placed = np.concatenate([placed, cand[:1]])
        placed_r = np.append(placed_r, radii[j])
    return centres


def _plan_particles(
    rng: np.random.Generator,
    config: SimConfig,
    lib: ModelLibrary,
    grid: tuple[int, int],
    px: float,
    sigma_eff: float,
    protein_v: float,
    hole: tuple[float, float, float] | None,
    meta: dict[str, Any],
) -> _Particles:
    """Species, count, sizes, orientations and positions of the image's particles."""
    models = lib.models
    n_proc, n_maps = len(lib.procedural), len(lib.maps)
    empty = bool(rng.uniform() < config.p_empty)
    overlap = bool(rng.uniform() < config.p_overlap)
    coverage = _log_uniform(rng, config.coverage)
    n_species = int(rng.integers(1, 4))
    species, scales = [], []
    lo, hi = config.particle_diameter_a
    for _ in range(n_species):
        if n_maps and rng.uniform() < config.p_real_map:
            m = n_proc + int(rng.integers(0, n_maps))
        else:
            m = int(rng.integers(0, n_proc))
        s = 1.0
        if models[m].scalable:
            d = models[m].diameter_a * rng.uniform(0.8, 1.25)
            s = float(np.clip(d, lo, hi)) / models[m].diameter_a
        species.append(m)
        scales.append(s)
    mix = rng.dirichlet(np.full(n_species, 0.7))
    mix[0] += 1.0  # the first species dominates
    mix /= mix.sum()
    area = grid[0] * grid[1] * px * px
    mean_disc = float(
        np.dot(
            mix, [math.pi * (models[m].diameter_a * s) ** 2 / 4 for m, s in zip(species, scales, strict=True)]
        )
    )
    k = 0 if empty else int(min(_MAX_PARTICLES, max(1, rng.poisson(coverage * area / mean_disc))))
    pick = rng.choice(n_species, size=k, p=mix)
    model = np.array(species, np.int64)[pick]
    scale = np.array(scales)[pick] * rng.normal(1.0, 0.02, k)
    diam_px = np.array([models[m].diameter_a for m in model]) * scale / px
    centre = _place(rng, 0.5 * diam_px, grid, overlap)
    keep = np.isfinite(centre[:, 0])
    on_c = _on_carbon(hole, centre[:, 0], centre[:, 1])
    keep &= ~on_c | (rng.uniform(size=k) < 0.3)  # fewer particles on carbon
    rot2 = _rotations2(rng, k)
    model, scale, centre, rot2 = model[keep], scale[keep], centre[keep], rot2[keep]
    vol = np.array([models[m].volume_a3 for m in model]) * scale**3
    rho = _POINTS_PER_BLOB / (4.0 * math.pi * sigma_eff**2)  # points per A^2 of projection
    n_points = np.clip(np.round(rho * 1.21 * vol ** (2.0 / 3.0)), 300, 400_000).astype(np.int64)
    total = int(n_points.sum())
    if total > _MAX_POINTS_PER_IMAGE:
        n_points = np.maximum(1, n_points * _MAX_POINTS_PER_IMAGE // total)
    weight = protein_v * vol / n_points / (px * px)
    jitter = np.array([models[m].jitter_a for m in model]) * scale / px
    kinds: dict[str, int] = {}
    for m in model:
        kinds[models[m].kind] = kinds.get(models[m].kind, 0) + 1
    meta.update(
        empty_field=empty,
        overlap_allowed=overlap,
        coverage_target=coverage,
        n_particles=len(model),
        species=[models[m].name for m in species],
        particle_kinds=kinds,
        particle_diameters_a=[
            round(models[m].diameter_a * s, 1) for m, s in zip(species, scales, strict=True)
        ],
    )
    return _Particles(model, scale, rot2, centre, n_points, weight, jitter)


def _clip_line(
    centre: np.ndarray, axis: np.ndarray, grid: tuple[int, int], margin: float
) -> tuple[float, float]:
    """The range of t for which the projection of ``centre + t * axis`` (y, x px; axis x, y, z)
    stays within the grid widened by ``margin`` on every side."""
    lo, hi = -math.inf, math.inf
    for c, a, size in ((centre[1], axis[0], grid[1]), (centre[0], axis[1], grid[0])):
        if abs(a) < 1e-9:
            continue
        ta, tb = (-margin - c) / a, (size + margin - c) / a
        lo, hi = max(lo, min(ta, tb)), min(hi, max(ta, tb))
    return lo, hi


def _plan_filaments(
    rng: np.random.Generator,
    config: SimConfig,
    grid: tuple[int, int],
    px: float,
    sigma_eff: float,
    protein_v: float,
    empty: bool,
) -> list[_Filament]:
    """Helical filaments that cross the whole simulated grid (their ends lie outside it)."""
    if empty or rng.uniform() >= config.p_filament:
        return []
    hp, wp = grid
    out = []
    for _ in range(int(rng.integers(1, 4))):
        phi = rng.uniform(0, math.pi)
        tilt = math.radians(rng.uniform(-10, 10))
        axis = np.array([math.cos(phi) * math.cos(tilt), math.sin(phi) * math.cos(tilt), math.sin(tilt)])
        e1 = np.cross(axis, [0.0, 0.0, 1.0])
        e1 /= np.linalg.norm(e1)
        e2 = np.cross(axis, e1)
        centre = np.array([rng.uniform(0, hp), rng.uniform(0, wp)])
        d = _uniform(rng, config.filament_diameter_a) / px
        t0, t1 = _clip_line(centre, axis, grid, 0.5 * d)
        length = t1 - t0
        if length <= 0:
            continue
        tube = 0.5 * d * rng.uniform(0.35, 0.5)
        radius = 0.5 * d - tube
        pitch = d * rng.uniform(0.6, 3.0)
        strands = int(rng.integers(1, 3))
        arc = math.sqrt(1.0 + (2 * math.pi * radius / pitch) ** 2)
        vol_a3 = strands * math.pi * tube**2 * length * arc * px**3
        rho = _POINTS_PER_BLOB / (4.0 * math.pi * sigma_eff**2)
        n = int(min(_MAX_POINTS_PER_IMAGE // 4, max(1000, rho * d * length * px * px)))
        out.append(
            _Filament(
                centre, axis, e1, e2, t0, t1, radius, tube, pitch, strands, n, protein_v * vol_a3 / n / px**2
            )
        )
    return out
