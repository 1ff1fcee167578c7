"""What a synthetic tomogram holds: :class:`TomoConfig` and the scene drawn from it (positions,
orientations, membranes, ice slab, tilts and defoci), all from a numpy generator seeded with
``[seed, index]``, so the scene is the same on every device."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.simulate.particles import KINDS, PseudoAtomModel, procedural_model

__all__ = ["TomoConfig", "TomoScene", "plan_scene", "tomo_library"]

Range = tuple[float, float]


def _check(name: str, ok: bool, value: object, expected: str) -> None:
    if not ok:
        raise ConfigError(f"TomoConfig.{name}: found {value!r}, expected {expected}")


@dataclass(frozen=True)
class TomoConfig:
    """A synthetic tomogram of ``shape`` (nz, ny, nx) voxels of ``voxel_size`` A.

    ``particles`` particles (diameters in ``particle_diameter_a``, the library's procedural
    shapes, uniformly random SO(3) orientations) and ``vesicles`` membrane vesicles plus
    ``sheets`` curved membrane sheets, inside an ice slab ``ice_fraction`` of nz thick, tilted by
    up to ``slab_tilt_deg``. Imaging: a tilt series over +-``tilt_range_deg`` about Y in steps of
    ``tilt_step_deg`` (missing wedge beyond; 90 = none), a CTF per tilt (``ctf``; defocus drawn
    in ``defocus_um`` with ``defocus_spread_um`` per tilt, B-factor growing ``bfactor_per_tilt``
    per tilt in dose-symmetric order), ``contrast`` the relative darkening by a voxel of ice, and
    Poisson noise at ``dose`` expected counts per voxel in each of the even and odd halves.
    """

    shape: tuple[int, int, int] = (64, 256, 256)
    voxel_size: float = 10.0
    seed: int = 0
    dose: float = 40.0
    particles: int = 80
    particle_diameter_a: Range = (100.0, 250.0)
    vesicles: int = 2
    vesicle_radius_a: Range = (150.0, 500.0)
    sheets: int = 1
    ice_fraction: Range = (0.6, 0.85)
    slab_tilt_deg: float = 5.0
    tilt_range_deg: float = 60.0
    tilt_step_deg: float = 3.0
    ctf: bool = True
    defocus_um: Range = (2.0, 5.0)
    defocus_spread_um: float = 0.1
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.07
    bfactor: float = 50.0
    bfactor_per_tilt: float = 4.0
    contrast: float = 0.3
    library_size: int = 10

    def __post_init__(self) -> None:
        s = tuple(self.shape)
        _check(
            "shape",
            len(s) == 3 and all(isinstance(v, int) and 8 <= v <= 4096 for v in s),
            self.shape,
            "(nz, ny, nx) integers in 8..4096",
        )
        object.__setattr__(self, "shape", s)
        for name in ("voxel_size", "tilt_step_deg", "voltage_kv"):
            v = getattr(self, name)
            _check(name, math.isfinite(v) and v > 0, v, "a positive number")
        for name in ("dose", "defocus_spread_um", "cs_mm", "bfactor", "bfactor_per_tilt", "slab_tilt_deg"):
            v = getattr(self, name)
            _check(name, math.isfinite(v) and v >= 0, v, "a number >= 0")
        for name in ("particles", "vesicles", "sheets", "seed"):
            v = getattr(self, name)
            _check(name, isinstance(v, int) and not isinstance(v, bool) and v >= 0, v, "an integer >= 0")
        _check(
            "library_size",
            isinstance(self.library_size, int) and self.library_size >= 1,
            self.library_size,
            "an integer >= 1",
        )
        for name, lo_min, hi_max in (
            ("particle_diameter_a", 20.0, 2000.0),
            ("vesicle_radius_a", 50.0, 1e5),
            ("ice_fraction", 0.05, 1.0),
            ("defocus_um", 0.0, 20.0),
        ):
            r = tuple(getattr(self, name))
            _check(
                name,
                len(r) == 2 and lo_min <= r[0] <= r[1] <= hi_max,
                getattr(self, name),
                f"(lo, hi) with {lo_min:g} <= lo <= hi <= {hi_max:g}",
            )
            object.__setattr__(self, name, (float(r[0]), float(r[1])))
        _check("tilt_range_deg", 0 < self.tilt_range_deg <= 90, self.tilt_range_deg, "0 < degrees <= 90")
        _check("amplitude_contrast", 0 <= self.amplitude_contrast < 1, self.amplitude_contrast, "0 <= w < 1")
        _check("contrast", 0 < self.contrast < 1, self.contrast, "0 < c < 1")

    @property
    def tilts_deg(self) -> np.ndarray:
        """The tilt angles, 0 and +-k steps up to the tilt range."""
        k = math.floor(self.tilt_range_deg / self.tilt_step_deg + 1e-9)
        return np.arange(-k, k + 1) * self.tilt_step_deg

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


@dataclass
class TomoScene:
    """One tomogram's drawn content (voxel units; z, y, x order)."""

    slab_centre: float
    slab_thickness: float
    slab_normal: np.ndarray  # unit (z, y, x)
    particles: list[tuple[int, np.ndarray, np.ndarray]]  # (library index, centre, rotation 3x3 on x,y,z)
    shells: list[tuple[np.ndarray, float]]  # (centre, radius): vesicles and sheets
    defocus_a: np.ndarray  # per tilt
    bfactor: np.ndarray  # per tilt
    meta: dict[str, Any]


@functools.lru_cache(maxsize=4)
def tomo_library(size: int, seed: int, diameters: Range) -> tuple[PseudoAtomModel, ...]:
    """``size`` procedural particle models (kinds in turn, diameters log-uniform in ``diameters``)."""
    rng = np.random.default_rng([seed, 3301])
    lo, hi = diameters
    return tuple(
        procedural_model(
            KINDS[j % len(KINDS)],
            float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
            seed * 100003 + j,
            n_points=8192,
            name=f"{KINDS[j % len(KINDS)]}-{j}",
        )
        for j in range(size)
    )


def _rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation (unit quaternion from four normals)."""
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _in_slab(rng: np.random.Generator, cfg: TomoConfig, scene: TomoScene, margin: float) -> np.ndarray:
    """A uniform point (z, y, x) inside the slab, ``margin`` voxels from its faces (or its mid-plane)."""
    nz, ny, nx = cfg.shape
    half = max(0.0, 0.5 * scene.slab_thickness - margin)
    mid = np.array([0.5 * (nz - 1), 0.5 * (ny - 1), 0.5 * (nx - 1)])
    for _ in range(100):
        p = np.array([rng.uniform(0, nz - 1), rng.uniform(0, ny - 1), rng.uniform(0, nx - 1)])
        d = float(np.dot(p - mid, scene.slab_normal)) - (scene.slab_centre - mid[0]) * scene.slab_normal[0]
        if abs(d) <= half:
            return p
    return mid + (scene.slab_centre - mid[0]) * np.array([1.0, 0.0, 0.0])


def plan_scene(cfg: TomoConfig, index: int) -> TomoScene:
    """The scene of tomogram ``index`` of ``cfg.seed`` (independent of the count and the device)."""
    rng = np.random.default_rng([cfg.seed, index, 7331])
    nz = cfg.shape[0]
    thickness = rng.uniform(*cfg.ice_fraction) * nz
    centre = 0.5 * (nz - 1) + rng.uniform(-0.5, 0.5) * (nz - thickness) * 0.5
    ax, ay = np.radians(rng.uniform(-cfg.slab_tilt_deg, cfg.slab_tilt_deg, size=2))
    normal = np.array([1.0, -math.tan(ay), -math.tan(ax)])
    tilts = cfg.tilts_deg
    order = np.argsort(np.abs(tilts), kind="stable")  # dose-symmetric: 0, then growing |tilt|
    rank = np.empty(len(tilts), np.int64)
    rank[order] = np.arange(len(tilts))
    defocus = (rng.uniform(*cfg.defocus_um) + cfg.defocus_spread_um * rng.standard_normal(len(tilts))) * 1e4
    scene = TomoScene(
        centre,
        thickness,
        normal / np.linalg.norm(normal),
        [],
        [],
        defocus,
        cfg.bfactor + cfg.bfactor_per_tilt * rank,
        {},
    )
    lib = tomo_library(cfg.library_size, cfg.seed, cfg.particle_diameter_a)
    placed: list[tuple[np.ndarray, float]] = []
    for _ in range(cfg.particles):
        j = int(rng.integers(len(lib)))
        r = 0.5 * lib[j].diameter_a / cfg.voxel_size
        for _attempt in range(20):  # no overlap if it can be helped
            c = _in_slab(rng, cfg, scene, r)
            if all(np.linalg.norm(c - q) >= r + rq for q, rq in placed):
                break
        placed.append((c, r))
        scene.particles.append((j, c, _rotation(rng)))
    for _ in range(cfg.vesicles):
        radius = rng.uniform(*cfg.vesicle_radius_a) / cfg.voxel_size
        scene.shells.append((_in_slab(rng, cfg, scene, min(radius, 0.4 * thickness)), radius))
    for _ in range(cfg.sheets):  # a sphere far larger than the box: a gently curved sheet through it
        radius = rng.uniform(3.0, 10.0) * max(cfg.shape)
        n = rng.standard_normal(3)
        n /= np.linalg.norm(n)
        scene.shells.append((_in_slab(rng, cfg, scene, 0.0) + radius * n, radius))
    scene.meta = {
        "index": index,
        "ice_thickness_voxels": float(thickness),
        "slab_centre_z": float(centre),
        "slab_normal_zyx": scene.slab_normal.tolist(),
        "tilts_deg": tilts.tolist(),
        "defocus_um": (defocus / 1e4).tolist(),
        "bfactor_a2": scene.bfactor.tolist(),
        "particles": [
            {"model": lib[j].name, "centre_zyx": c.tolist(), "rotation_xyz": rot.tolist()}
            for j, c, rot in scene.particles
        ],
        "membranes": [{"centre_zyx": c.tolist(), "radius_voxels": float(r)} for c, r in scene.shells],
    }
    return scene
