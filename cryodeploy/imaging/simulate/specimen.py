"""What the specimen does to the beam, batched in torch: the projected potential (particles,
filaments, carbon film, amorphous water) and the transmission (ice, contamination)."""

from __future__ import annotations

import math

import numpy as np
import torch

from cryodeploy.imaging.simulate.particles import ModelLibrary
from cryodeploy.imaging.simulate.scene import _column, _Plan

# Amorphous water: molecules per A^3 and the integrated potential of one molecule (V*A^3, MIP 4.5 V).
_WATER_DENSITY = 0.0334
_WATER_WEIGHT = 4.5 / 0.0334
# Amorphous carbon: atoms per A^3, integrated potential per atom (V*A^3), excess potential over ice (V).
_CARBON_DENSITY = 0.1
_CARBON_WEIGHT = 100.0
_CARBON_EXCESS_V = 5.0
# Fixed-point scale of the integer scatter used on CUDA (exact, order-independent sums).
_FIXED_POINT = float(2**24)


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
