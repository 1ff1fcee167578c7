"""What to simulate: :class:`SimConfig` and the validation of its fields."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.synth import as_integer

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
            value = as_integer(getattr(self, name))
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



def _number(value: object) -> float | None:
    """``value`` as a finite float if it is a real number (not a bool or string), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def _check_shape(value: object) -> tuple[int, int]:
    """(H, W) as ints >= 16."""
    items = tuple(value) if isinstance(value, (tuple, list)) else ()
    dims = tuple(as_integer(v) for v in items)
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
