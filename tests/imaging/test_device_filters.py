"""The torch filters (imaging/device_filters.py, run here on CPU tensors: the same code as on CUDA)
equal the numpy ones (imaging/filters.py) to 1e-5 of the frame's range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryodeploy.errors import ConfigError
from cryodeploy.imaging import device_filters as dev
from cryodeploy.imaging import filters as host

#: float32 FFTs and convolutions on the device vs float64 numpy/scipy: within 1e-5 of the range
REL = 1e-5

SHAPES = [(64, 80), (65, 81), (97, 96), (128, 127)]


def _frame(shape: tuple[int, int], seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 10 + 50).astype(np.float32)


def _close(expected: np.ndarray, got: torch.Tensor) -> None:
    assert got.dtype == torch.float32 and tuple(got.shape) == expected.shape
    span = float(np.abs(expected).max())
    assert float(np.abs(got.numpy().astype(np.float64) - expected).max()) <= REL * span


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("factor", [1, 2, 3])
def test_fourier_bin_equals_numpy(shape, factor) -> None:
    a = _frame(shape, factor)
    _close(host.fourier_bin(a, factor), dev.fourier_bin(torch.from_numpy(a), factor))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize(("resolution", "pixel"),
                         [(2.0, None), (5.0, None), (8.0, None), (6.6, 1.1), (3.3, 1.65)])
def test_lowpass_equals_numpy_in_pixels_and_angstrom(shape, resolution, pixel) -> None:
    a = _frame(shape, 1)
    _close(host.lowpass(a, resolution, pixel), dev.lowpass(torch.from_numpy(a), resolution, pixel))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sigma", [0.5, 0.8, 1.0, 1.5, 2.5, 4.0])
def test_gaussian_equals_scipy_with_reflecting_borders(shape, sigma) -> None:
    a = _frame(shape, 2)
    _close(host.gaussian(a, sigma), dev.gaussian(torch.from_numpy(a), sigma))


def test_gaussian_reflects_beyond_a_small_frame() -> None:
    """A kernel radius (16 px at sigma 4) longer than the frame (12 px) mirrors again, as scipy does."""
    a = _frame((12, 10), 3)
    _close(host.gaussian(a, 4.0), dev.gaussian(torch.from_numpy(a), 4.0))


def test_the_same_errors_as_numpy() -> None:
    t = torch.zeros(64, 64)
    with pytest.raises(ConfigError, match="no pixels left"):
        dev.fourier_bin(t, 100)
    with pytest.raises(ConfigError, match=r"lowpass 2.5 Å: expected at least 2 pixels \(3 Å, Nyquist\)"):
        dev.lowpass(t, 2.5, 1.5)
    with pytest.raises(ConfigError, match="gaussian sigma 0"):
        dev.gaussian(t, 0.0)


def test_device_frame_filters_follow_frame_filters() -> None:
    """before/after on tensors equal FrameFilters' on arrays, with the binned header's pixel size."""
    from cryodeploy.io.mrc import MicrographHeader

    a = _frame((130, 161), 4)
    header = MicrographHeader(shape=a.shape, mode=2, voxel_size=(1.1, 1.1, 1.1), origin=(0, 0, 0))
    both = host.FrameFilters(bin=2, lowpass=8.8, gaussian=1.0)
    for f in (both, host.FrameFilters(bin=3, lowpass=9.0, at="after")):
        before = f.before(a, header)
        _close(before, f.before(torch.from_numpy(a), header, dev.TORCH_OPS))
        out = f.header(header)
        _close(f.after(before, out), f.after(torch.from_numpy(before), out, dev.TORCH_OPS))
