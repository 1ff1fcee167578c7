"""Realistic cryo-EM micrographs with exact clean targets, simulated in torch (CPU or CUDA).

Physics (weak-phase object, one defocus per image):

* **Particles** are pseudo-atom models: point clouds in A, sampled uniformly inside procedural
  shapes (barrels, rings, short helices, globular unions of sub-blobs, elongated complexes) or in
  proportion to the density of a real 3-D map (:func:`model_from_map`). Each image uses one to
  three species of the library, uniformly random orientations (SO(3)) and positions (empty,
  sparse or crowded fields, with or without overlap); some fields hold long helical filaments
  crossing the whole field. A point carries ``dV * volume / n_points`` (V*A^3), ``dV`` being the
  excess potential of protein over ice; bilinear scatter-add onto the pixel grid divided by the
  pixel area gives the projected potential in V*A, blurred in Fourier space by the pseudo-atom
  size ``exp(-2 pi^2 sigma^2 s^2)``.
* **Sample**: ice of a smoothly varying thickness t (intensity loss ``exp(-t / lambda)``, lambda the
  mean free path, 3500 A at 300 kV scaled by beta^2), a weak amorphous-water texture of the
  projected potential (a random field with the structure factor of amorphous ice, peak at 3.7 A,
  amplitude ~ sqrt(t)), in some fields a carbon film with a sharp curved edge (excess potential
  5 V x its thickness, tapered over 3-20 A at the edge, and a fine amorphous texture; it is darker
  through the amplitude-contrast term) and contamination blobs (ice lumps 1000-6000 A thick,
  strongly absorbing: transmission only, no phase).
* **Optics**: phase ``phi = sigma_e * V`` (rad; sigma_e the relativistic interaction constant),
  CTF ``-(sqrt(1 - w^2) sin chi + w cos chi) * exp(-B s^2 / 4)``, ``chi = pi lambda df s^2 -
  pi/2 Cs lambda^3 s^4 + phase_shift`` with astigmatic defocus (underfocus positive).
  Intensity ``I = dose * T * (1 + 2 * CTF (*) phi)``, T the product of the transmissions.
* **Detector**: a counting camera: the expected image is blurred by the pixel-aperture MTF
  ``sinc(fx) sinc(fy)`` (cycles/pixel) times an optional Gaussian, then Poisson counts (white
  noise). Optional gain: a gain-corrected counting image, ``Poisson(g * rate) / g`` for a fixed
  flat-field-like efficiency ``g``: its expectation is still ``rate``, so the clean target never
  contains the gain, only the noise variance (``rate / g``) does. Optional "interpolated sum":
  counts on a (H+1, W+1) grid resampled by bilinear interpolation at a sub-pixel shift (each
  axis 0.25-0.75 px), as in a motion-corrected sum: neighbouring pixels' noise correlates by
  ``a(1-a) / ((1-a)^2 + a^2)``, 0.3-0.5 (``noise_corr_x`` / ``noise_corr_y`` in the metadata).

``clean`` is the exact expectation of ``noisy`` (same units: counts per pixel). Image ``i`` of
seed ``s`` depends only on ``(s, i)`` and the config: scalar parameters come from a numpy
generator seeded with ``[s, i]`` (the same on every device), arrays from per-image
``torch.Generator`` s on the device; the scatter is exact integer (fixed-point) arithmetic on
CUDA, so results are deterministic there too. Not modelled: per-particle defocus, multiple
scattering, beam-induced motion blur, detector dead time and coincidence loss.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cryodeploy.errors import ConfigError, InputError

__all__ = [
    "KINDS",
    "POOL_POINTS",
    "ModelLibrary",
    "PseudoAtomModel",
    "SimBatch",
    "SimConfig",
    "build_library",
    "ctf_2d",
    "electron_wavelength",
    "ice_mean_free_path",
    "interaction_constant",
    "model_from_map",
    "procedural_model",
    "simulate",
]

# Physical constants (SI).
_H = 6.62607015e-34
_M0 = 9.1093837015e-31
_QE = 1.602176634e-19
_C = 299792458.0

#: Kinds of procedural particle models.
KINDS = ("barrel", "ring", "helix", "globular", "elongated")
#: Points kept per library model (a particle resamples them with a small jitter).
POOL_POINTS = 16384
# Inelastic mean free path of vitreous ice at 300 kV (A); it scales with beta^2.
_MFP_ICE_300 = 3500.0
# Amorphous water: molecules per A^3 and the integrated potential of one molecule (V*A^3, MIP 4.5 V).
_WATER_DENSITY = 0.0334
_WATER_WEIGHT = 4.5 / 0.0334
# Amorphous carbon: atoms per A^3, integrated potential per atom (V*A^3), excess potential over ice (V).
_CARBON_DENSITY = 0.1
_CARBON_WEIGHT = 100.0
_CARBON_EXCESS_V = 5.0
# Pseudo-atoms per effective blur area (4 pi sigma^2): sets how many points a particle gets.
_POINTS_PER_BLOB = 12.0
_MAX_POINTS_PER_IMAGE = 3_000_000
_MAX_PARTICLES = 4000
# Fixed-point scale of the integer scatter used on CUDA (exact, order-independent sums).
_FIXED_POINT = float(2**24)


# ----------------------------------------------------------------------------------------------
# Electron optics helpers
# ----------------------------------------------------------------------------------------------


def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength (A) at an accelerating voltage in kV (0.0197 A at 300 kV)."""
    v = float(voltage_kv) * 1e3
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"voltage: found {voltage_kv!r} kV, expected a positive number")
    p = math.sqrt(2.0 * _M0 * _QE * v * (1.0 + _QE * v / (2.0 * _M0 * _C * _C)))
    return _H / p * 1e10


def interaction_constant(voltage_kv: float) -> float:
    """Relativistic interaction constant sigma_e (rad per V*A of projected potential); 6.5e-4 at 300 kV."""
    v = float(voltage_kv) * 1e3
    lam = electron_wavelength(voltage_kv) * 1e-10
    gamma = 1.0 + _QE * v / (_M0 * _C * _C)
    return 2.0 * math.pi * gamma * _M0 * _QE * lam / (_H * _H) * 1e-10


def _beta2(voltage_kv: float) -> float:
    """(v / c)^2 of the electrons."""
    gamma = 1.0 + float(voltage_kv) * 1e3 * _QE / (_M0 * _C * _C)
    return 1.0 - 1.0 / (gamma * gamma)


def ice_mean_free_path(voltage_kv: float) -> float:
    """Mean free path (A) for the intensity loss exp(-t / lambda) in ice: 3500 A at 300 kV, ~ beta^2."""
    return _MFP_ICE_300 * _beta2(voltage_kv) / _beta2(300.0)


def _freq_grid(
    shape: tuple[int, int], rfft: bool, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spatial frequencies (cycles/pixel) ``fy, fx`` of an FFT grid, broadcastable to [H, W(//2+1)]."""
    h, w = shape
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype)[:, None]
    fx = (
        torch.fft.rfftfreq(w, device=device, dtype=dtype)
        if rfft
        else torch.fft.fftfreq(w, device=device, dtype=dtype)
    )[None, :]
    return fy, fx


def _ctf_from_grid(
    s2: torch.Tensor,
    theta: torch.Tensor,
    wavelength: torch.Tensor,
    defocus_u: torch.Tensor,
    defocus_v: torch.Tensor,
    astig_angle: torch.Tensor,
    cs: torch.Tensor,
    amplitude_contrast: torch.Tensor,
    bfactor: torch.Tensor,
    phase_shift: torch.Tensor,
) -> torch.Tensor:
    """CTF on a frequency grid: ``s2`` (1/A^2) and ``theta`` (rad); parameters broadcast (A, rad).

    Parameters are tensors shaped to broadcast against ``s2`` (e.g. [n, 1, 1] for a batch).
    """
    df = 0.5 * (defocus_u + defocus_v + (defocus_u - defocus_v) * torch.cos(2.0 * (theta - astig_angle)))
    chi = math.pi * wavelength * df * s2 - 0.5 * math.pi * cs * wavelength**3 * s2 * s2 + phase_shift
    w = amplitude_contrast
    ctf = -(torch.sqrt(1.0 - w * w) * torch.sin(chi) + w * torch.cos(chi))
    return ctf * torch.exp(-0.25 * bfactor * s2)


def ctf_2d(
    shape: tuple[int, int],
    pixel_size: float,
    voltage_kv: float,
    defocus_u_um: float,
    defocus_v_um: float,
    astig_angle_deg: float,
    cs_mm: float,
    amplitude_contrast: float,
    bfactor: float,
    phase_shift_deg: float = 0.0,
    *,
    rfft: bool = False,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The 2-D contrast transfer function on an FFT grid (unshifted, ``torch.fft.fftfreq`` layout).

    ``CTF(s) = -(sqrt(1 - w^2) sin chi + w cos chi) exp(-B s^2 / 4)`` with ``chi = pi lambda df s^2
    - pi/2 Cs lambda^3 s^4 + phase_shift``; ``df(theta) = (du + dv + (du - dv) cos 2(theta -
    angle)) / 2``, positive for underfocus, theta the angle of the frequency from the x (column)
    axis. Units: pixel size A, defocus um, Cs mm, B A^2. Returns float64 [H, W] (``rfft``:
    [H, W // 2 + 1], the half-plane of ``torch.fft.rfft2``). Protein (positive potential) is dark
    at low frequency in underfocus, because the image is ``1 + 2 * CTF (*) phase``.
    """
    if not (math.isfinite(pixel_size) and pixel_size > 0):
        raise ConfigError(f"ctf_2d pixel_size: found {pixel_size!r}, expected a positive number (A)")
    if not 0.0 <= amplitude_contrast < 1.0:
        raise ConfigError(f"ctf_2d amplitude_contrast: found {amplitude_contrast!r}, expected 0 <= w < 1")
    dev = torch.device(device)
    f64 = torch.float64
    fy, fx = _freq_grid((int(shape[0]), int(shape[1])), rfft, dev, f64)
    s2 = (fy * fy + fx * fx) / (pixel_size * pixel_size)
    theta = torch.atan2(fy, fx)

    def t(v: float) -> torch.Tensor:
        return torch.tensor(float(v), dtype=f64, device=dev)

    return _ctf_from_grid(
        s2,
        theta,
        t(electron_wavelength(voltage_kv)),
        t(defocus_u_um * 1e4),
        t(defocus_v_um * 1e4),
        t(math.radians(astig_angle_deg)),
        t(cs_mm * 1e7),
        t(amplitude_contrast),
        t(bfactor),
        t(math.radians(phase_shift_deg)),
    )


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

# (lowest lo, highest hi) allowed for each range field.
_RANGE_BOUNDS: dict[str, tuple[float, float]] = {
    "pixel_size_a": (0.1, 20.0),
    "dose_e_per_px": (0.01, 1e5),
    "cs_mm": (0.0, 10.0),
    "defocus_um": (0.0, 20.0),
    "astigmatism_um": (0.0, 5.0),
    "amplitude_contrast": (0.0, 0.5),
    "bfactor_a2": (0.0, 2000.0),
    "phase_shift_deg": (0.0, 180.0),
    "particle_diameter_a": (20.0, 2000.0),
    "filament_diameter_a": (20.0, 1000.0),
    "coverage": (0.001, 3.0),
    "protein_potential_v": (0.0, 20.0),
    "atom_sigma_a": (0.2, 20.0),
    "ice_thickness_a": (0.0, 1e5),
    "ice_gradient": (0.0, 1.0),
    "water_texture": (0.0, 100.0),
    "carbon_thickness_a": (0.0, 1e4),
    "contamination_diameter_a": (10.0, 1e5),
    "contamination_height_a": (0.0, 1e5),
    "mtf_sigma_px": (0.0, 5.0),
}
_PROBABILITIES = (
    "p_empty",
    "p_overlap",
    "p_filament",
    "p_carbon",
    "p_contamination",
    "p_interpolated",
    "p_gain",
    "p_real_map",
)

Range = tuple[float, float]


@dataclass(frozen=True)
class SimConfig:
    """What to simulate: each ``(lo, hi)`` range is sampled uniformly per image (dose and coverage
    log-uniformly), each ``p_*`` is the probability that an image has the feature.

    Units: A, e-/pixel, kV, um (defocus), mm (Cs), A^2 (B-factor), V (excess potential of protein
    over ice), pixels (``mtf_sigma_px``: extra Gaussian blur of the detector). ``coverage`` is the
    summed projected area of the particles' discs over the field area; ``p_real_map`` is the
    chance that a species comes from ``map_paths`` (when any). ``ice_gradient`` is the relative
    thickness change per micron, ``water_texture`` multiplies the physical estimate of the
    amorphous-water texture. ``library_size`` procedural models are drawn from ``library_seed``.
    """

    shape: tuple[int, int] = (256, 256)
    pixel_size_a: Range = (0.5, 2.5)
    dose_e_per_px: Range = (5.0, 80.0)
    voltages_kv: tuple[float, ...] = (200.0, 300.0)
    cs_mm: Range = (2.7, 2.7)
    defocus_um: Range = (0.3, 3.5)
    astigmatism_um: Range = (0.0, 0.2)
    amplitude_contrast: Range = (0.05, 0.1)
    bfactor_a2: Range = (20.0, 120.0)
    phase_shift_deg: Range = (0.0, 0.0)
    particle_diameter_a: Range = (80.0, 400.0)
    filament_diameter_a: Range = (60.0, 250.0)
    coverage: Range = (0.1, 1.0)
    protein_potential_v: Range = (1.5, 2.5)
    atom_sigma_a: Range = (1.0, 1.5)
    ice_thickness_a: Range = (300.0, 900.0)
    ice_gradient: Range = (0.0, 0.3)
    water_texture: Range = (0.05, 0.15)
    carbon_thickness_a: Range = (80.0, 250.0)
    contamination_diameter_a: Range = (300.0, 3000.0)
    contamination_height_a: Range = (1000.0, 6000.0)
    mtf_sigma_px: Range = (0.0, 0.5)
    p_empty: float = 0.05
    p_overlap: float = 0.3
    p_filament: float = 0.1
    p_carbon: float = 0.25
    p_contamination: float = 0.15
    p_interpolated: float = 0.3
    p_gain: float = 0.3
    p_real_map: float = 0.3
    map_paths: tuple[str, ...] = ()
    library_size: int = 40
    library_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _check_shape(self.shape))
        for name, (lo_min, hi_max) in _RANGE_BOUNDS.items():
            object.__setattr__(self, name, _check_range(name, getattr(self, name), lo_min, hi_max))
        for name in _PROBABILITIES:
            object.__setattr__(self, name, _check_probability(name, getattr(self, name)))
        object.__setattr__(self, "voltages_kv", _check_voltages(self.voltages_kv))
        object.__setattr__(self, "map_paths", _check_paths(self.map_paths))
        for name, lo in (("library_size", 1), ("library_seed", 0)):
            value = _integer(getattr(self, name))
            if value is None or value < lo:
                raise ConfigError(
                    f"SimConfig.{name}: found {getattr(self, name)!r}, expected an integer >= {lo}"
                )
            object.__setattr__(self, name, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples as lists); :meth:`from_dict` reads it back."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Any) -> SimConfig:
        """A config from a mapping (e.g. parsed JSON); unknown fields are a :class:`ConfigError`."""
        if not isinstance(data, dict):
            raise ConfigError(f"SimConfig: found {type(data).__name__}, expected a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise ConfigError(
                f"SimConfig: found unknown field(s) {', '.join(unknown)}, "
                f"expected only {', '.join(sorted(known))}"
            )
        return cls(**data)


def _jsonable(value: Any) -> Any:
    """Tuples (nested) to lists for JSON."""
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


def _number(value: object) -> float | None:
    """``value`` as a finite float if it is a real number (not a bool or string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _check_shape(value: object) -> tuple[int, int]:
    """(H, W) as ints >= 16."""
    items = tuple(value) if isinstance(value, (tuple, list)) else ()
    dims = tuple(_integer(v) for v in items)
    if len(dims) != 2 or not all(d is not None and 16 <= d <= 16384 for d in dims):
        raise ConfigError(f"SimConfig.shape: found {value!r}, expected (height, width) integers in 16..16384")
    return (int(dims[0]), int(dims[1]))  # type: ignore[arg-type]


def _check_range(name: str, value: object, lo_min: float, hi_max: float) -> Range:
    """A ``(lo, hi)`` pair of finite numbers with ``lo_min <= lo <= hi <= hi_max``."""
    items = tuple(value) if isinstance(value, (tuple, list)) else ()
    nums = tuple(_number(v) for v in items)
    if len(nums) != 2 or nums[0] is None or nums[1] is None or not lo_min <= nums[0] <= nums[1] <= hi_max:
        raise ConfigError(
            f"SimConfig.{name}: found {value!r}, "
            f"expected a (lo, hi) pair with {lo_min:g} <= lo <= hi <= {hi_max:g}"
        )
    return (nums[0], nums[1])


def _check_probability(name: str, value: object) -> float:
    """A number in [0, 1]."""
    p = _number(value)
    if p is None or not 0.0 <= p <= 1.0:
        raise ConfigError(f"SimConfig.{name}: found {value!r}, expected a probability in [0, 1]")
    return p


def _check_voltages(value: object) -> tuple[float, ...]:
    """A non-empty tuple of voltages in kV (10..3000)."""
    items = tuple(value) if isinstance(value, (tuple, list)) else ()
    nums = tuple(_number(v) for v in items)
    if not nums or not all(v is not None and 10.0 <= v <= 3000.0 for v in nums):
        raise ConfigError(
            f"SimConfig.voltages_kv: found {value!r}, expected a non-empty list of kV in 10..3000"
        )
    return tuple(float(v) for v in nums)  # type: ignore[arg-type]


def _check_paths(value: object) -> tuple[str, ...]:
    """A tuple of path strings."""
    if isinstance(value, (str, Path)):
        value = (value,)
    items = tuple(value) if isinstance(value, (tuple, list)) else None
    if items is None or not all(isinstance(p, (str, Path)) and str(p) for p in items):
        raise ConfigError(f"SimConfig.map_paths: found {value!r}, expected a list of map file paths")
    return tuple(str(p) for p in items)


# ----------------------------------------------------------------------------------------------
# Pseudo-atom models
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Per-image plans (scalar parameters, drawn with numpy: the same on every device)
# ----------------------------------------------------------------------------------------------


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


def _plan_hole(
    rng: np.random.Generator,
    config: SimConfig,
    grid: tuple[int, int],
    field0: tuple[int, int],
    shape: tuple[int, int],
    px: float,
) -> tuple[float, float, float] | None:
    """A hole edge crossing the field (hole 1-2 um, carbon outside, 10-40 % of the field carbon)."""
    if rng.uniform() >= config.p_carbon:
        return None
    h, w = shape
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
    hole = _plan_hole(rng, config, grid, field0, config.shape, px)
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


# ----------------------------------------------------------------------------------------------
# Rendering (torch, batched)
# ----------------------------------------------------------------------------------------------


@dataclass
class SimBatch:
    """Simulated micrographs: ``noisy`` counts and ``clean`` = E[noisy], [n, H, W] float32 on the device.

    ``noisy2``: a second, independent draw of the same detector (``pairs=True``), for
    Noise2Noise. ``potential``: the particles' projected potential (V*A, pseudo-atom blur, no
    CTF; ``with_potential=True``), resampled like ``clean``. ``meta``: one JSON-ready dict per image.
    """

    noisy: torch.Tensor
    clean: torch.Tensor
    meta: list[dict[str, Any]]
    noisy2: torch.Tensor | None = None
    potential: torch.Tensor | None = None


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


def _torch_seed(seed: int, index: int, stream: int) -> int:
    """A 63-bit torch seed for a stream of image ``index``."""
    return int(np.random.SeedSequence([seed, index, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _scatter(
    n: int,
    grid: tuple[int, int],
    img: torch.Tensor,
    y: torch.Tensor,
    x: torch.Tensor,
    w: torch.Tensor,
    exact: bool | None = None,
) -> torch.Tensor:
    """Bilinear scatter-add of weights at (y, x) px onto an [n, H, W] grid (float32); points
    outside the grid are dropped (a particle larger than the grid must not wrap onto itself).

    ``exact`` (default: on CUDA, whose float atomics add in a varying order) sums in integer
    fixed point (2^-24 units): exact and order-independent. On the CPU the float sum is
    sequential, hence deterministic too.
    """
    hp, wp = grid
    inside = (y >= 0) & (y <= hp - 1) & (x >= 0) & (x <= wp - 1)
    img, y, x, w = img[inside], y[inside], x[inside], w[inside]
    y0f, x0f = torch.floor(y), torch.floor(x)
    fy, fx = y - y0f, x - x0f
    y0, x0 = y0f.long(), x0f.long()
    base = img * (hp * wp)
    idx, wt = [], []
    for dy, wy in ((0, 1.0 - fy), (1, fy)):
        for dx, wx in ((0, 1.0 - fx), (1, fx)):
            idx.append(base + torch.clamp(y0 + dy, max=hp - 1) * wp + torch.clamp(x0 + dx, max=wp - 1))
            wt.append(w * wy * wx)
    index, weight = torch.cat(idx), torch.cat(wt)
    if index.is_cuda if exact is None else exact:
        acc = torch.zeros(n * hp * wp, dtype=torch.int64, device=index.device)
        acc.index_add_(0, index, torch.round(weight.double() * _FIXED_POINT).long())
        return (acc.double() / _FIXED_POINT).float().view(n, hp, wp)
    out = torch.zeros(n * hp * wp, dtype=torch.float32, device=index.device)
    out.index_add_(0, index, weight.float())
    return out.view(n, hp, wp)


def _particle_points(
    plans: list[_Plan], gens: list[torch.Generator], lib: ModelLibrary, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected pseudo-atom positions of all particles (image, y, x in px) and weights."""
    pts, offsets, sizes = lib.packed(dev)
    f32 = torch.float32
    parts = [p.particles for p in plans]
    counts = [int(q.n_points.sum()) for q in parts]
    if sum(counts) == 0:
        z = torch.zeros(0, device=dev)
        return z.long(), z, z, z
    u = torch.cat([torch.rand(c, generator=g, device=dev) for c, g in zip(counts, gens, strict=True)])
    jit = torch.cat([torch.randn(c, 2, generator=g, device=dev) for c, g in zip(counts, gens, strict=True)])

    def cat(key: str, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([getattr(q, key) for q in parts])).to(dev, dtype)

    n_pts = cat("n_points", torch.int64)
    pid = torch.repeat_interleave(torch.arange(len(n_pts), device=dev), n_pts)
    model = cat("model", torch.int64)[pid]
    pool = offsets[model] + torch.minimum((u * sizes[model]).long(), sizes[model] - 1)
    scale_px = cat("scale", f32) / torch.from_numpy(
        np.concatenate(
            [np.full(len(q.model), pl.meta["pixel_size_a"]) for q, pl in zip(parts, plans, strict=True)]
        )
    ).to(dev, f32)
    rot = cat("rot2", f32)[pid]  # [N, 2, 3]
    xy = torch.bmm(rot, pts[pool].unsqueeze(-1)).squeeze(-1) * scale_px[pid, None]
    xy = xy + jit * cat("jitter", f32)[pid, None]
    centre = cat("centre", f32)[pid]
    img = torch.repeat_interleave(
        torch.arange(len(plans), device=dev), torch.tensor([len(q.model) for q in parts], device=dev)
    )[pid]
    return img, centre[:, 0] + xy[:, 1], centre[:, 1] + xy[:, 0], cat("weight", f32)[pid]


def _filament_points(
    plans: list[_Plan], gens: list[torch.Generator], dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Projected pseudo-atoms of all filaments (image, y, x in px, weight)."""
    out: list[tuple[torch.Tensor, ...]] = []
    f32 = torch.float32
    for i, (plan, g) in enumerate(zip(plans, gens, strict=True)):
        for f in plan.filaments:
            t = f.t0 + torch.rand(f.n_points, generator=g, device=dev) * (f.t1 - f.t0)
            strand = torch.randint(0, f.strands, (f.n_points,), generator=g, device=dev).to(f32)
            ball = torch.randn(f.n_points, 3, generator=g, device=dev)
            ball = ball / ball.norm(dim=1, keepdim=True).clamp_min(1e-6)
            ball = ball * (f.tube * torch.rand(f.n_points, 1, generator=g, device=dev) ** (1.0 / 3.0))
            th = 2 * math.pi * (t / f.pitch + strand / f.strands)
            a, e1, e2 = (torch.tensor(v, dtype=f32, device=dev) for v in (f.axis, f.e1, f.e2))
            p = t[:, None] * a + f.radius * (torch.cos(th)[:, None] * e1 + torch.sin(th)[:, None] * e2) + ball
            out.append(
                (
                    torch.full((f.n_points,), i, dtype=torch.int64, device=dev),
                    f.centre[0] + p[:, 1],
                    f.centre[1] + p[:, 0],
                    torch.full((f.n_points,), f.weight, dtype=f32, device=dev),
                )
            )
    if not out:
        z = torch.zeros(0, device=dev)
        return z.long(), z, z, z
    return (
        torch.cat([o[0] for o in out]),
        torch.cat([o[1] for o in out]),
        torch.cat([o[2] for o in out]),
        torch.cat([o[3] for o in out]),
    )


def _column(plans: list[_Plan], key: str, dev: torch.device, scale: float = 1.0) -> torch.Tensor:
    """A metadata value of every image as a [n, 1, 1] float32 tensor."""
    v = np.array([float(p.meta[key]) * scale for p in plans])
    return torch.from_numpy(v).to(dev, torch.float32).view(-1, 1, 1)


def _water_structure(s: torch.Tensor) -> torch.Tensor:
    """Structure factor of amorphous ice: 0.05 at low s, peak ~2.2 at 1/3.7 A^-1, 1 at high s."""
    return 1.0 - 0.95 * torch.exp(-((s / 0.16) ** 2)) + 1.3 * torch.exp(-0.5 * ((s - 0.27) / 0.035) ** 2)


def _ice_relative_thickness(plans: list[_Plan], grid: tuple[int, int], dev: torch.device) -> torch.Tensor:
    """Relative ice thickness change (a plane plus three long waves, per micron), [n, Hp, Wp].

    Every term is a product of a function of y and one of x, so the field is one batched matmul.
    """
    hp, wp = grid
    yy = torch.arange(hp, device=dev, dtype=torch.float64) - 0.5 * hp
    xx = torch.arange(wp, device=dev, dtype=torch.float64) - 0.5 * wp
    us, vs = [], []
    for p in plans:
        micron = 1e4 / p.meta["pixel_size_a"]
        uy, ux = p.ice_plane
        u = [yy * (uy / micron), torch.ones_like(yy)]
        v = [torch.ones_like(xx), xx * (ux / micron)]
        for ky, kx, ph, amp in p.ice_waves:
            ay, bx = 2 * math.pi * float(ky) * yy + float(ph), 2 * math.pi * float(kx) * xx
            u += [0.4 * float(amp) * torch.cos(ay), -0.4 * float(amp) * torch.sin(ay)]
            v += [torch.cos(bx), torch.sin(bx)]
        us.append(torch.stack(u, dim=1))
        vs.append(torch.stack(v, dim=1))
    return torch.bmm(torch.stack(us), torch.stack(vs).transpose(1, 2)).float()


def _transmission(plans: list[_Plan], grid: tuple[int, int], dev: torch.device) -> torch.Tensor:
    """T = ice loss exp(-t / lambda) x contamination loss, [n, Hp, Wp] (the carbon film darkens the
    image through its amplitude-contrast term, ``-2 w phi`` at low frequency)."""
    hp, wp = grid
    f32 = torch.float32
    yy = torch.arange(hp, device=dev, dtype=f32)[:, None]
    xx = torch.arange(wp, device=dev, dtype=f32)[None, :]
    t_mean = _column(plans, "ice_thickness_a", dev)
    mfp = _column(plans, "ice_mean_free_path_a", dev)
    rel = _ice_relative_thickness(plans, grid, dev) * _column(plans, "ice_gradient", dev)
    log_t = -(t_mean / mfp) * (1.0 + rel).clamp_min(0.1)
    for i, p in enumerate(plans):
        m = p.meta
        for cy, cx, r, height, amps, phases in p.blobs:
            reach = r * (1.0 + float(np.sum(amps))) + 1.0
            y0, y1 = max(0, int(cy - reach)), min(hp, int(cy + reach) + 1)
            x0, x1 = max(0, int(cx - reach)), min(wp, int(cx + reach) + 1)
            if y0 >= y1 or x0 >= x1:
                continue
            dy, dx = yy[y0:y1] - cy, xx[:, x0:x1] - cx
            theta = torch.atan2(dy, dx)
            outline = r * (
                1.0
                + sum(
                    float(a) * torch.cos((j + 2) * theta + float(f))
                    for j, (a, f) in enumerate(zip(amps, phases, strict=True))
                )
            )
            rho2 = (dy * dy + dx * dx) / (outline * outline)
            t_blob = height * torch.sqrt((1.0 - rho2).clamp_min(0.0))
            log_t[i, y0:y1, x0:x1] -= t_blob / m["ice_mean_free_path_a"]
    return torch.exp(log_t)


def _carbon_mask(p: _Plan, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """Carbon film fraction (0 in the hole, 1 on the film): a linear taper ``carbon_edge_a`` wide
    (at least one pixel) at the hole's edge."""
    assert p.hole is not None
    width = max(1.0, p.meta["carbon_edge_a"] / p.meta["pixel_size_a"])
    dist = torch.hypot(yy - p.hole[0], xx - p.hole[1]) - p.hole[2]
    return (dist / width + 0.5).clamp(0.0, 1.0)


def _carbon_potential(
    plans: list[_Plan], gens: list[torch.Generator], grid: tuple[int, int], dev: torch.device
) -> torch.Tensor | None:
    """Carbon film's excess projected potential (V*A) with an amorphous texture, [n, Hp, Wp]."""
    if all(p.hole is None for p in plans):
        return None
    hp, wp = grid
    f32 = torch.float32
    yy = torch.arange(hp, device=dev, dtype=f32)[:, None]
    xx = torch.arange(wp, device=dev, dtype=f32)[None, :]
    out = torch.zeros(len(plans), hp, wp, device=dev)
    for i, (p, g) in enumerate(zip(plans, gens, strict=True)):
        if p.hole is None:
            continue
        t_c, px = p.meta["carbon_thickness_a"], p.meta["pixel_size_a"]
        cmask = _carbon_mask(p, yy, xx)
        # Poisson-gas estimate of the per-pixel fluctuation, halved for the short-range order.
        std = 0.5 * _CARBON_WEIGHT * math.sqrt(_CARBON_DENSITY * t_c / (px * px))
        out[i] = cmask * (_CARBON_EXCESS_V * t_c + std * torch.randn(hp, wp, generator=g, device=dev))
    return out


def _water_spectrum(
    plans: list[_Plan], gens: list[torch.Generator], s: torch.Tensor, grid: tuple[int, int], dev: torch.device
) -> torch.Tensor:
    """Amorphous-water texture of the projected potential, directly as rfft2 coefficients (V*A)."""
    hp, wp = grid
    out = []
    for i, (p, g) in enumerate(zip(plans, gens, strict=True)):
        m = p.meta
        var = _WATER_WEIGHT**2 * _WATER_DENSITY * m["ice_thickness_a"] / m["pixel_size_a"] ** 2
        amp = m["water_texture"] * torch.sqrt(var * _water_structure(s[i]) * (hp * wp / 2.0))
        z = torch.randn(2, *s.shape[1:], generator=g, device=dev)
        out.append(torch.complex(z[0], z[1]) * amp)
    spec = torch.stack(out)
    spec[:, 0, 0] = 0
    return spec


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


def _phase_spectrum(
    plans: list[_Plan],
    gens: list[torch.Generator],
    lib: ModelLibrary,
    grid: tuple[int, int],
    s2: torch.Tensor,
    dev: torch.device,
    with_potential: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """rfft2 of the projected potential (V*A: particles and carbon with the pseudo-atom blur, plus
    the water texture) and, if asked, the particles' potential alone in real space.

    The grid is padded; the FFTs treat it as periodic, and the padding keeps what the blur, the
    CTF's delocalisation (in part) and the MTF wrap around out of the field.
    """
    n = len(plans)
    pi, py, px, pw = _particle_points(plans, gens, lib, dev)
    fi, fy, fx, fw = _filament_points(plans, gens, dev)
    pot = _scatter(
        n, grid, torch.cat([pi, fi]), torch.cat([py, fy]), torch.cat([px, fx]), torch.cat([pw, fw])
    )
    blur = torch.exp(-2.0 * math.pi**2 * _column(plans, "atom_sigma_a", dev) ** 2 * s2)
    potential = torch.fft.irfft2(torch.fft.rfft2(pot) * blur, s=grid) if with_potential else None
    carbon = _carbon_potential(plans, gens, grid, dev)
    if carbon is not None:
        pot = pot + carbon
    return torch.fft.rfft2(pot) * blur + _water_spectrum(plans, gens, torch.sqrt(s2), grid, dev), potential


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
    sig = _column(plans, "mtf_sigma_px", dev)
    mtf = torch.sinc(fy) * torch.sinc(fx) * torch.exp(-2.0 * math.pi**2 * sig * sig * (fy * fy + fx * fx))
    return torch.fft.irfft2(torch.fft.rfft2(intensity) * mtf, s=grid).clamp_min(0.0)


def _counts(rate: torch.Tensor, gain: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """Gain-corrected Poisson counts ``Poisson(g * rate) / g``, each image from its own generator."""
    out = []
    for i in range(rate.shape[0]):
        g = torch.Generator(device=rate.device).manual_seed(_torch_seed(seed, i, stream))
        out.append(torch.poisson(rate[i] * gain[i], generator=g) / gain[i])
    return torch.stack(out)


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
    n_i, seed_i = _integer(n), _integer(seed)
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
    return SimBatch(noisy, clean, [p.meta for p in plans], noisy2, potential)
