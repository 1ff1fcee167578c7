"""Realistic synthetic micrographs for demos, tests and benchmarks.

A micrograph is a field of T20S-proteasome-like particles (a barrel 150 A long and 114 A wide:
side views are rectangles with four stripes, top views are 7-fold rings) in vitreous ice of
varying thickness, optionally beside a carbon film edge, imaged through a CTF-like transfer
function. The clean image is on the [0, 1] scale; noisy copies follow the noise model of
:mod:`cryodeploy.imaging.noise` (Poisson at a dose plus Gaussian). Micrograph ``i`` of seed ``s`` is the
same whatever the count, and reruns write byte-identical files.
"""

from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cryodeploy._version import __version__
from cryodeploy.errors import ConfigError, OutputError
from cryodeploy.files import atomic_write
from cryodeploy.imaging.noise import NoiseSpec, add_noise
from cryodeploy.io.mrc import MIN_SIZE, MicrographHeader, write_micrograph
from cryodeploy.progress import progress

__all__ = ["SUBDIRS", "SynthConfig", "as_integer", "render_clean", "synth_micrographs"]

#: Sub-folders written by :func:`synth_micrographs`: the clean image and two independent noisy draws.
SUBDIRS = ("clean", "noisy", "noisy2")

# The particle (Angstrom): T20S proteasome, four stacked 7-membered rings.
_LENGTH = 150.0
_RADIUS = 57.0
# The microscope: 300 kV electrons, spherical aberration 2.7 mm (Angstrom).
_WAVELENGTH = 0.01969
_CS = 2.7e7
# Darkening per Angstrom of projected protein (the clean image is on the [0, 1] scale).
_CONTRAST = 0.0035
# How far (A) the CTF spreads a point's signal, at the largest defocus and smallest B-factor drawn.
_DELOCALISATION = 120.0


def as_integer(value: object) -> int | None:
    """``value`` as an int if it is an integer (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        return None


@dataclass(frozen=True)
class SynthConfig:
    """What to generate: ``count`` micrographs of ``size`` (H, W) pixels at ``voxel_size`` A/pixel.

    ``dose`` (expected counts at intensity 1) and ``sigma`` are the noise model; ``carbon`` adds a
    carbon film edge and ``ctf`` a defocus transfer function (else an amplitude-contrast image).
    """

    count: int
    size: tuple[int, int] = (1024, 1024)
    seed: int = 0
    dose: float = 20.0
    sigma: float = 0.05
    voxel_size: float = 1.0
    carbon: bool = True
    ctf: bool = True

    def __post_init__(self) -> None:
        count, seed = as_integer(self.count), as_integer(self.seed)
        if count is None or count < 1:
            raise ConfigError(f"synth count is {self.count!r}, expected an integer >= 1")
        if seed is None or seed < 0:
            raise ConfigError(f"synth seed is {self.seed!r}, expected an integer >= 0")
        size = tuple(as_integer(s) for s in self.size)
        if len(size) != 2 or not all(s is not None and s >= MIN_SIZE for s in size):
            raise ConfigError(f"synth size is {self.size!r}, expected (height, width) integers >= {MIN_SIZE}")
        object.__setattr__(self, "count", count)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "size", size)
        if not (math.isfinite(self.voxel_size) and self.voxel_size > 0):
            raise ConfigError(
                f"synth voxel size is {self.voxel_size!r}, expected a positive number (A/pixel)"
            )
        if not (math.isfinite(self.dose) and math.isfinite(self.sigma)):
            raise ConfigError(f"synth dose {self.dose!r} and sigma {self.sigma!r} must be finite")
        self.noise_spec()  # validates dose and sigma

    def noise_spec(self) -> NoiseSpec:
        """The noise model of the noisy copies."""
        return NoiseSpec(dose=float(self.dose), sigma=float(self.sigma))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["size"] = list(self.size)
        return d



@dataclass(frozen=True)
class _Hole:
    """A circular hole in the carbon film: carbon lies outside the circle."""

    cy: float
    cx: float
    radius: float

    def outside(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Signed distance (pixels) into the carbon; negative inside the hole."""
        return np.hypot(y - self.cy, x - self.cx) - self.radius


def _draw_hole(rng: np.random.Generator, shape: tuple[int, int], px: float) -> _Hole:
    """A hole edge (1-2 um hole, at least as wide as the image) crossing the image; ~10-35 % is carbon."""
    h, w = shape
    radius = max(rng.uniform(5000.0, 10000.0) / px, math.hypot(h, w) * rng.uniform(0.8, 1.2))
    angle = rng.uniform(0.0, 2.0 * math.pi)
    edge = 0.5 * min(h, w) * rng.uniform(0.3, 0.8)  # distance of the edge from the image centre
    cy = 0.5 * h - math.sin(angle) * (radius - edge)
    cx = 0.5 * w - math.cos(angle) * (radius - edge)
    return _Hole(cy, cx, radius)


def _side_view(u: np.ndarray, v: np.ndarray, radius: float, length: float) -> np.ndarray:
    """Projected thickness (A) of the barrel seen from the side; ``u`` runs along its axis."""
    au = np.abs(u)
    ring_r = np.where(au > 0.25 * length, 0.93 * radius, radius)  # the outer (alpha) rings are narrower
    v2 = v * v
    outer = 2.0 * np.sqrt(np.clip(ring_r * ring_r - v2, 0.0, None))
    inner_r = 0.5 * radius
    cavity = 2.0 * np.sqrt(np.clip(inner_r * inner_r - v2, 0.0, None))
    ends = np.clip(0.5 * (length - 2.0 * au) / 2.0 + 0.5, 0.0, 1.0)  # 2 A soft ends
    # Four rings: density peaks at their centres (u = +-L/8, +-3L/8), grooves between them.
    gaps = 0.7 + 0.3 * np.cos((2.0 * math.pi * 4.0 / length) * (u - 0.125 * length))
    result: np.ndarray = (outer - 0.6 * cavity) * ends * gaps
    return result


def _top_view(u: np.ndarray, v: np.ndarray, radius: float, length: float) -> np.ndarray:
    """Projected thickness (A) of the barrel seen down its axis: a 7-fold ring with a pore."""
    rho = np.hypot(u, v)
    theta = np.arctan2(v, u)
    c7 = np.cos(7.0 * theta)
    r_out = radius * (1.0 + 0.05 * c7)
    ring = np.clip(0.5 * (r_out - rho) + 0.5, 0.0, 1.0) * np.clip(0.5 * (rho - 0.22 * radius) + 0.5, 0.0, 1.0)
    lobes = 1.0 + 0.35 * c7 * np.exp(-(((rho - 0.62 * radius) / (0.25 * radius)) ** 2))
    result: np.ndarray = 0.5 * length * ring * lobes
    return result


def _particle_centres(
    rng: np.random.Generator, shape: tuple[int, int], spacing: float, hole: _Hole | None
) -> tuple[np.ndarray, np.ndarray]:
    """Dense, mostly non-overlapping centres: a jittered grid, thinned, fewer on carbon."""
    h, w = shape
    oy, ox = rng.uniform(0.0, spacing, size=2)
    ny, nx = math.ceil((h + oy) / spacing) + 1, math.ceil((w + ox) / spacing) + 1
    gy, gx = np.mgrid[0:ny, 0:nx].astype(np.float64)
    y = (gy + 0.5 + rng.uniform(-0.3, 0.3, (ny, nx))) * spacing - oy
    x = (gx + 0.5 + rng.uniform(-0.3, 0.3, (ny, nx))) * spacing - ox
    occupancy = rng.uniform(0.55, 0.9)
    keep_p = np.full((ny, nx), occupancy)
    if hole is not None:
        keep_p = np.where(hole.outside(y, x) > 0, 0.2 * occupancy, keep_p)
    keep = rng.uniform(size=(ny, nx)) < keep_p
    # Only grid neighbours can come closer than the minimum distance: drop the later one of a close pair.
    min_dist = spacing / 1.3
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        a = (slice(0, ny - dy), slice(max(0, -dx), nx - max(0, dx)))
        b = (slice(dy, ny), slice(max(0, dx), nx - max(0, -dx)))
        close = np.hypot(y[a] - y[b], x[a] - x[b]) < min_dist
        keep[b] &= ~(keep[a] & close)
    margin = 0.6 * spacing
    keep &= (y > -margin) & (y < h + margin) & (x > -margin) & (x < w + margin)
    return y[keep], x[keep]


def _paint_particles(rng: np.random.Generator, density: np.ndarray, px: float, hole: _Hole | None) -> None:
    """Add the projected thickness (A) of randomly placed, oriented and scaled particles."""
    h, w = density.shape
    length_px = _LENGTH / px
    ys, xs = _particle_centres(rng, (h, w), 1.3 * length_px, hole)
    n = ys.size
    top = rng.uniform(size=n) < 0.35
    angles = rng.uniform(0.0, 2.0 * math.pi, n)
    scales = rng.normal(1.0, 0.03, n)
    weights = rng.uniform(0.85, 1.1, n)
    for i in range(n):
        s = scales[i]
        half = math.ceil(0.65 * length_px * s) + 2
        cy, cx = round(float(ys[i])), round(float(xs[i]))
        y0, y1, x0, x1 = max(cy - half, 0), min(cy + half + 1, h), max(cx - half, 0), min(cx + half + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = ((np.arange(y0, y1, dtype=np.float32) - np.float32(ys[i])) * np.float32(px))[:, None]
        dx = ((np.arange(x0, x1, dtype=np.float32) - np.float32(xs[i])) * np.float32(px))[None, :]
        c, sn = np.float32(math.cos(angles[i])), np.float32(math.sin(angles[i]))
        u, v = c * dx + sn * dy, c * dy - sn * dx
        view = _top_view if top[i] else _side_view
        density[y0:y1, x0:x1] += np.float32(weights[i]) * view(u, v, _RADIUS * s, _LENGTH * s)


def _transfer(rng: np.random.Generator, shape: tuple[int, int], px: float, ctf: bool) -> np.ndarray:
    """Transfer function on the rfft2 grid: a CTF (defocus, Cs, amplitude contrast) or 1, times a B-factor."""
    h, w = shape
    ky = np.fft.fftfreq(h, d=px).astype(np.float32)[:, None]
    kx = np.fft.rfftfreq(w, d=px).astype(np.float32)[None, :]
    k2 = ky * ky + kx * kx
    bfactor = rng.uniform(150.0, 300.0)
    envelope = np.exp(np.float32(-bfactor / 4.0) * k2)
    if not ctf:
        return envelope
    defocus = rng.uniform(8000.0, 20000.0)
    amplitude = 0.1
    chi = (
        np.float32(math.pi * _WAVELENGTH * defocus) * k2
        - np.float32(0.5 * math.pi * _CS * _WAVELENGTH**3) * k2 * k2
    )
    result: np.ndarray = (
        np.float32(math.sqrt(1 - amplitude**2)) * np.sin(chi) + np.float32(amplitude) * np.cos(chi)
    ) * envelope
    return result


def _low_frequency(rng: np.random.Generator, shape: tuple[int, int], rms: float) -> np.ndarray:
    """rfft2 coefficients of a smooth random field (a few cycles per image) with the given rms."""
    h, w = shape
    spec = np.zeros((h, w // 2 + 1), np.complex64)
    kmax = 3
    rows = np.r_[0 : kmax + 1, h - kmax : h] if h > 2 * kmax + 1 else np.arange(h)
    cols = np.arange(min(kmax + 1, w // 2 + 1))
    block = rng.normal(size=(rows.size, cols.size)) + 1j * rng.normal(size=(rows.size, cols.size))
    ry = np.minimum(rows, h - rows)[:, None]
    falloff = 1.0 / (1.0 + ry * ry + cols[None, :] ** 2)
    block *= falloff
    block[0, 0] = 0.0
    field_rms = math.sqrt(2.0 * float(np.sum(np.abs(block) ** 2))) / (h * w)
    if field_rms > 0:
        spec[np.ix_(rows, cols)] = block * (rms / field_rms)
    return spec


def _fft_size(n: int) -> int:
    """Smallest 5-smooth integer >= n (fast FFT length)."""
    while True:
        m = n
        for f in (2, 3, 5):
            while m % f == 0:
                m //= f
        if m == 1:
            return n
        n += 1


def render_clean(
    rng: np.random.Generator, shape: tuple[int, int], config: SynthConfig | None = None
) -> np.ndarray:
    """One clean micrograph of ``shape`` (H, W), float32 on [0, 1] (particles dark on bright ice).

    ``config`` supplies the voxel size and whether to add a carbon edge and a CTF (its count,
    size, seed and noise are not used here); by default 1 A/pixel with carbon and CTF.
    """
    cfg = config if config is not None else SynthConfig(count=1)
    h, w = int(shape[0]), int(shape[1])
    px = float(cfg.voxel_size)
    # Work on a padded canvas, wider than the CTF delocalises signal, so that particles cut by the
    # canvas edge and the FFT's wrap-around leave the image untouched.
    pad = math.ceil((_DELOCALISATION if cfg.ctf else 20.0) / px)
    ch, cw = _fft_size(h + 2 * pad), _fft_size(w + 2 * pad)
    hole = _draw_hole(rng, (h, w), px) if cfg.carbon else None
    if hole is not None:
        hole = _Hole(hole.cy + pad, hole.cx + pad, hole.radius)

    density = np.zeros((ch, cw), np.float32)  # projected thickness of protein and carbon (A)
    _paint_particles(rng, density, px, hole)
    noise = rng.standard_normal((ch, cw), dtype=np.float32)
    density += np.float32(rng.uniform(2.0, 4.0)) * noise  # amorphous ice
    carbon = None
    if hole is not None:
        yy = np.arange(ch, dtype=np.float32)[:, None]
        xx = np.arange(cw, dtype=np.float32)[None, :]
        depth = hole.outside(yy, xx) * np.float32(px)  # A into the carbon
        carbon = np.clip(depth / np.float32(2.0 * px) + np.float32(0.5), 0.0, 1.0)
        # Amorphous carbon texture, and a sharp rim whose phase step gives the edge its Fresnel fringes.
        rim = np.float32(rng.uniform(20.0, 40.0)) * np.exp(-np.maximum(depth, 0.0) / np.float32(40.0))
        density += carbon * (np.float32(5.0) * noise + rim)

    spectrum = np.fft.rfft2(density) * _transfer(rng, (ch, cw), px, cfg.ctf)
    spectrum += _low_frequency(rng, (ch, cw), rms=0.03 / _CONTRAST)  # smooth ice-thickness variation
    window = (slice(pad, pad + h), slice(pad, pad + w))
    contrast = np.fft.irfft2(spectrum, s=(ch, cw))[window].astype(np.float32) * np.float32(_CONTRAST)

    # Bright ice, darker where it is thicker (a linear gradient) and over the carbon film.
    level = rng.uniform(0.6, 0.72)
    slope = rng.uniform(0.05, 0.15)
    angle = rng.uniform(0.0, 2.0 * math.pi)
    ramp_y = np.float32(math.sin(angle) / max(h, w)) * (np.arange(h, dtype=np.float32) - np.float32(h / 2))
    ramp_x = np.float32(math.cos(angle) / max(h, w)) * (np.arange(w, dtype=np.float32) - np.float32(w / 2))
    background = np.float32(level) * (1.0 - np.float32(slope) * (ramp_y[:, None] + ramp_x[None, :]))
    if carbon is not None:
        background *= np.float32(1.0) - np.float32(rng.uniform(0.1, 0.2)) * carbon[window]
    image = background * (np.float32(1.0) - contrast)
    return np.clip(image, 0.0, 1.0, out=image)


def synth_micrographs(
    outdir: str | os.PathLike[str], config: SynthConfig, quiet: bool = True, overwrite: bool = False
) -> list[Path]:
    """Write ``config.count`` micrographs to ``outdir/{clean,noisy,noisy2}/synth_NNNN.mrc``.

    ``noisy`` and ``noisy2`` are independent noise draws of the same clean image (a Noise2Noise
    pair). ``outdir/synth.json`` records the configuration. A folder that already holds a
    dataset is refused (mixing two datasets breaks later commands) unless ``overwrite``, which
    first removes the old dataset's ``synth_*.mrc`` files. Returns the ``noisy`` paths.
    """
    out = Path(outdir)
    old = sorted(p for sub in SUBDIRS for p in (out / sub).glob("*.mrc"))
    if (out / "synth.json").exists() or old:
        if not overwrite:
            raise OutputError(f"{out}: already holds a dataset; choose another folder or use --overwrite")
        for p in old:
            if p.name.startswith("synth_"):
                p.unlink()
    try:
        for sub in SUBDIRS:
            (out / sub).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{out}: cannot create output folders ({err.strerror or err})") from err
    vs = float(config.voxel_size)
    header = MicrographHeader(shape=config.size, mode=2, voxel_size=(vs, vs, vs), origin=(0.0, 0.0, 0.0))
    spec = config.noise_spec()
    noisy_paths: list[Path] = []
    with progress(config.count, "synth", quiet) as task:
        for i in range(config.count):
            clean_seq, noise_seq, noise2_seq = np.random.SeedSequence(config.seed, spawn_key=(i,)).spawn(3)
            clean = render_clean(np.random.default_rng(clean_seq), config.size, config)
            name = f"synth_{i:04d}.mrc"
            label = (
                f"cryodeploy synth seed={config.seed} index={i} dose={config.dose:g} sigma={config.sigma:g}"
            )
            write_micrograph(out / "clean" / name, clean, header, label=f"{label} clean")
            for sub, seq in (("noisy", noise_seq), ("noisy2", noise2_seq)):
                noisy = add_noise(clean, spec, np.random.default_rng(seq))
                write_micrograph(out / sub / name, noisy, header, label=f"{label} {sub}")
            noisy_paths.append(out / "noisy" / name)
            task.advance(1)
    record = {
        "format": "cryodeploy-synth/1",
        "created_by": f"cryodeploy {__version__}",
        "config": config.to_dict(),
        "noise": spec.to_dict(),
        "subdirs": list(SUBDIRS),
    }
    with atomic_write(out / "synth.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return noisy_paths
