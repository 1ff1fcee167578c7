"""Electron optics: the relativistic wavelength and interaction constant, the inelastic mean free
path of ice, and the contrast transfer function."""

from __future__ import annotations

import math

import torch

from cryodeploy.errors import ConfigError

# Physical constants (SI).
_H = 6.62607015e-34
_M0 = 9.1093837015e-31
_QE = 1.602176634e-19
_C = 299792458.0
# Inelastic mean free path of vitreous ice at 300 kV (A); it scales with beta^2.
_MFP_ICE_300 = 3500.0


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
