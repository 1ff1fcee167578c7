"""Particle models as pseudo-atom point clouds: procedural shapes, models of real 3-D maps, and the
library :func:`simulate` draws its species from."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cryodeploy.errors import ConfigError, InputError
from cryodeploy.imaging.simulate.config import Range, SimConfig

#: Kinds of procedural particle models.
KINDS = ("barrel", "ring", "helix", "globular", "elongated")
#: Points kept per library model (a particle resamples them with a small jitter).
POOL_POINTS = 16384


@dataclass(frozen=True, eq=False)
class PseudoAtomModel:
    """A 3-D particle as a point cloud: ``points`` [P, 3] (x, y, z in A, centred on the centroid).

    ``volume_a3`` is the particle's volume (the excess potential times it is the integrated
    potential the points share); ``diameter_a`` twice the largest distance from the centroid;
    ``jitter_a`` the Gaussian jitter (A) a resampled point gets so that copies differ and the
    pool's spacing does not show; ``scalable``: a particle may be drawn at another size
    (procedural shapes), or only at its own (a real map).
    """

    name: str
    kind: str
    points: np.ndarray
    volume_a3: float
    diameter_a: float
    jitter_a: float
    scalable: bool = True


def _rejection(
    rng: np.random.Generator, inside: Callable[[np.ndarray], np.ndarray], half: np.ndarray, n: int
) -> tuple[np.ndarray, float]:
    """``n`` points uniform inside a shape (within the box ``+-half``) and the shape's volume (A^3)."""
    kept: list[np.ndarray] = []
    got = tried = 0
    while got < n:
        m = 65536
        cand = rng.uniform(-half, half, size=(m, 3))
        inner = cand[inside(cand)]
        kept.append(inner)
        got += len(inner)
        tried += m
        if tried > 64 * 65536 and got < n:
            raise ConfigError("pseudo-atom shape: found an (almost) empty shape, expected a solid")
    volume = float(np.prod(2.0 * half)) * got / tried
    return np.concatenate(kept)[:n], volume


def _barrel(rng: np.random.Generator) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """A cylinder shell (stacked rings with grooves, k-fold lobes), unit-ish size."""
    aspect = rng.uniform(0.6, 1.8)  # length / outer diameter
    r_out, length = 1.0, 2.0 * aspect
    r_in = rng.uniform(0.3, 0.65)
    k, lobe = int(rng.integers(5, 10)), rng.uniform(0.0, 0.08)
    n_rings, groove = int(rng.integers(2, 6)), rng.uniform(0.03, 0.15)

    def inside(p: np.ndarray) -> np.ndarray:
        rho, theta, z = np.hypot(p[:, 0], p[:, 1]), np.arctan2(p[:, 1], p[:, 0]), p[:, 2]
        ring = 0.5 + 0.5 * np.cos(2.0 * math.pi * n_rings * (z / length + 0.5))  # 1 at the grooves
        outer = r_out * (1.0 + lobe * np.cos(k * theta)) / (1.0 + lobe) * (1.0 - groove * ring)
        result: np.ndarray = (rho < outer) & (rho > r_in) & (np.abs(z) < 0.5 * length)
        return result

    return inside, np.array([r_out, r_out, 0.5 * length])


def _ring(rng: np.random.Generator) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """A torus with beads (k-fold modulated tube)."""
    minor = rng.uniform(0.2, 0.45)
    k, bead = int(rng.integers(6, 15)), rng.uniform(0.0, 0.35)

    def inside(p: np.ndarray) -> np.ndarray:
        rho, theta = np.hypot(p[:, 0], p[:, 1]), np.arctan2(p[:, 1], p[:, 0])
        tube = minor * (1.0 + bead * np.cos(k * theta)) / (1.0 + bead)
        result: np.ndarray = (rho - 1.0) ** 2 + p[:, 2] ** 2 < tube * tube
        return result

    return inside, np.array([1.0 + minor, 1.0 + minor, minor])


def _helix(rng: np.random.Generator) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """A short helical tube of one or two strands along z."""
    tube = rng.uniform(0.25, 0.45)  # relative to the outer radius 1
    rh = 1.0 - tube
    length = 2.0 * rng.uniform(1.0, 3.0)
    pitch = length / rng.uniform(1.5, 4.0)
    strands = int(rng.integers(1, 3))

    def inside(p: np.ndarray) -> np.ndarray:
        ok = np.abs(p[:, 2]) < 0.5 * length
        hit = np.zeros(len(p), bool)
        for s in range(strands):
            th = 2.0 * math.pi * (p[:, 2] / pitch + s / strands)
            hit |= np.hypot(p[:, 0] - rh * np.cos(th), p[:, 1] - rh * np.sin(th)) < tube
        result: np.ndarray = ok & hit
        return result

    return inside, np.array([1.0, 1.0, 0.5 * length])


def _spheres_inside(centres: np.ndarray, radii: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Inside the union of spheres."""

    def inside(p: np.ndarray) -> np.ndarray:
        hit = np.zeros(len(p), bool)
        for c, r in zip(centres, radii, strict=True):
            hit |= np.sum((p - c) ** 2, axis=1) < r * r
        return hit

    return inside


def _globular(rng: np.random.Generator) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """A compact blob: union of 3-12 random sub-blobs (a random walk of spheres)."""
    k = int(rng.integers(3, 13))
    radii = rng.uniform(0.25, 0.5, k)
    centres = np.zeros((k, 3))
    for j in range(1, k):
        step = rng.normal(size=3)
        centres[j] = centres[rng.integers(0, j)] + step / np.linalg.norm(step) * rng.uniform(0.3, 0.6)
    centres -= centres.mean(axis=0)
    half = np.max(np.abs(centres) + radii[:, None], axis=0)
    return _spheres_inside(centres, radii), half


def _elongated(rng: np.random.Generator) -> tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]:
    """An ellipsoid (aspect 1.7-4) with 1-4 attached domains."""
    a = 1.0
    b = a * rng.uniform(0.25, 0.6)
    c = b * rng.uniform(0.5, 1.0)
    k = int(rng.integers(1, 5))
    u = rng.normal(size=(k, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    centres = u * np.array([a, b, c])
    radii = b * rng.uniform(0.4, 0.9, k)
    blobs = _spheres_inside(centres, radii)

    def inside(p: np.ndarray) -> np.ndarray:
        ell = (p[:, 0] / a) ** 2 + (p[:, 1] / b) ** 2 + (p[:, 2] / c) ** 2 < 1.0
        result: np.ndarray = ell | blobs(p)
        return result

    half = np.maximum(np.array([a, b, c]), np.max(np.abs(centres) + radii[:, None], axis=0))
    return inside, half


_SHAPES: dict[str, Callable[[np.random.Generator], tuple[Callable[[np.ndarray], np.ndarray], np.ndarray]]] = {
    "barrel": _barrel,
    "ring": _ring,
    "helix": _helix,
    "globular": _globular,
    "elongated": _elongated,
}


def procedural_model(
    kind: str, diameter_a: float, seed: int, n_points: int = POOL_POINTS, name: str | None = None
) -> PseudoAtomModel:
    """A random procedural particle of ``kind`` (one of :data:`KINDS`) scaled to ``diameter_a``."""
    if kind not in _SHAPES:
        raise ConfigError(f"procedural_model kind: found {kind!r}, expected one of {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, KINDS.index(kind)])
    inside, half = _SHAPES[kind](rng)
    pts, vol = _rejection(rng, inside, half, n_points)
    pts = pts - pts.mean(axis=0)
    scale = float(diameter_a) / (2.0 * float(np.sqrt(np.max(np.sum(pts * pts, axis=1)))))
    pts *= scale
    vol *= scale**3
    return PseudoAtomModel(
        name=name or f"{kind}-{seed}",
        kind=kind,
        points=pts.astype(np.float32),
        volume_a3=vol,
        diameter_a=float(diameter_a),
        jitter_a=0.5 * (vol / n_points) ** (1.0 / 3.0),
    )


def _read_map(source: str | Path) -> tuple[np.ndarray, float]:
    """A 3-D map's data (z, y, x) and voxel size (A) from an MRC file."""
    import mrcfile

    path = Path(source)
    if not path.is_file():
        raise InputError(f"{path}: found no such file, expected a 3-D map (MRC)")
    try:
        with mrcfile.open(path, permissive=True) as mrc:
            data = np.asarray(mrc.data, dtype=np.float64)
            voxel = float(mrc.voxel_size.x)
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: found an unreadable map ({err}), expected an MRC file") from err
    return data, voxel


def model_from_map(
    source: str | Path | np.ndarray,
    voxel_size_a: float | None = None,
    *,
    threshold: float | None = None,
    mask_radius_a: float | None = None,
    n_points: int = POOL_POINTS,
    seed: int = 0,
    name: str | None = None,
) -> PseudoAtomModel:
    """Pseudo-atoms sampled in proportion to a real 3-D density map (an MRC path or a [z, y, x] array).

    The density above ``threshold`` (default: mean + 0.5 std of the map), inside a soft sphere of
    ``mask_radius_a`` (default: the largest sphere in the box), is the sampling weight; points get
    a uniform position inside their voxel. The volume is the count of voxels above threshold
    inside the mask. ``voxel_size_a`` overrides the file's (and is required for an array).
    """
    if isinstance(source, np.ndarray):
        data = np.asarray(source, dtype=np.float64)
        voxel = voxel_size_a
        label = name or "map"
    else:
        data, voxel = _read_map(source)
        voxel = voxel_size_a if voxel_size_a is not None else voxel
        label = name or f"map:{Path(source).stem}"
    if data.ndim != 3 or min(data.shape) < 2 or not np.all(np.isfinite(data)):
        raise InputError(f"{label}: found a map of shape {data.shape}, expected a finite 3-D volume")
    if voxel is None or not (math.isfinite(voxel) and voxel > 0):
        raise ConfigError(f"{label}: found voxel size {voxel!r}, expected a positive number (A)")
    thr = float(data.mean() + 0.5 * data.std()) if threshold is None else float(threshold)
    zz, yy, xx = np.meshgrid(*(np.arange(d) - 0.5 * (d - 1) for d in data.shape), indexing="ij")
    r = np.sqrt(xx * xx + yy * yy + zz * zz) * voxel
    radius = 0.5 * (min(data.shape) - 1) * voxel if mask_radius_a is None else float(mask_radius_a)
    mask = np.clip((radius - r) / voxel + 0.5, 0.0, 1.0)
    weight = np.clip(data - thr, 0.0, None) * mask
    total = float(weight.sum())
    if total <= 0:
        raise InputError(f"{label}: found no density above threshold {thr:g}, expected a particle")
    rng = np.random.default_rng([seed, 7919])
    flat = rng.choice(weight.size, size=n_points, p=(weight / total).ravel())
    iz, iy, ix = np.unravel_index(flat, data.shape)
    centre = 0.5 * (np.array(data.shape) - 1)
    zyx = np.stack([iz, iy, ix], axis=1) - centre + rng.uniform(-0.5, 0.5, (n_points, 3))
    pts = zyx[:, ::-1] * voxel  # x, y, z
    pts -= pts.mean(axis=0)
    volume = float(np.count_nonzero(weight > 0)) * voxel**3
    return PseudoAtomModel(
        name=label,
        kind="map",
        points=pts.astype(np.float32),
        volume_a3=volume,
        diameter_a=2.0 * float(np.sqrt(np.max(np.sum(pts * pts, axis=1)))),
        jitter_a=0.4 * voxel,
        scalable=False,
    )


@dataclass(frozen=True, eq=False)
class ModelLibrary:
    """Particle models for :func:`simulate`: ``procedural`` shapes and ``maps`` (real densities)."""

    procedural: tuple[PseudoAtomModel, ...]
    maps: tuple[PseudoAtomModel, ...] = ()
    _packed: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    @property
    def models(self) -> tuple[PseudoAtomModel, ...]:
        """All models: procedural first, then maps (the index used in the metadata)."""
        return self.procedural + self.maps

    def packed(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All points [sum P, 3] on ``device``, each model's first index and its point count."""
        key = str(device)
        if key not in self._packed:
            models = self.models
            sizes = np.array([len(m.points) for m in models], np.int64)
            offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            pts = torch.from_numpy(np.concatenate([m.points for m in models])).to(device)
            self._packed[key] = (
                pts,
                torch.from_numpy(offsets).to(device),
                torch.from_numpy(sizes).to(device),
            )
        return self._packed[key]


def build_library(config: SimConfig, maps: Sequence[PseudoAtomModel] = ()) -> ModelLibrary:
    """The config's model library: ``library_size`` procedural models (kinds in turn, diameters
    log-uniform over ``particle_diameter_a``) plus a model of each of ``map_paths`` and ``maps``.
    Cached per config values, so repeated calls are free."""
    lib = _cached_library(
        config.library_size, config.library_seed, config.particle_diameter_a, config.map_paths
    )
    if maps:
        return ModelLibrary(lib.procedural, lib.maps + tuple(maps))
    return lib


@functools.lru_cache(maxsize=8)
def _cached_library(size: int, seed: int, diameters: Range, map_paths: tuple[str, ...]) -> ModelLibrary:
    """Build (once) the procedural models and the map models."""
    rng = np.random.default_rng([seed, 104729])
    lo, hi = diameters
    procedural = []
    for j in range(size):
        kind = KINDS[j % len(KINDS)]
        d = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        procedural.append(procedural_model(kind, d, seed * 100003 + j, name=f"{kind}-{j}"))
    maps = tuple(model_from_map(p, seed=seed) for p in map_paths)
    return ModelLibrary(tuple(procedural), maps)
