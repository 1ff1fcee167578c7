"""The shipped CPU-trained 3-D U-Net (models/unet3d_cpu/, made by models/train_unet3d_cpu.sh) loads as a
volume model and denoises a tiny held-out synthetic tomogram well above identity (it stays below the best
3-D Gaussian: docs/benchmarks.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryodeploy.imaging.metrics import gaussian_filter, psnr
from cryodeploy.imaging.simulate.tomoscene import TomoConfig

CKPT = Path(__file__).resolve().parents[2] / "models" / "unet3d_cpu" / "best.safetensors"


@pytest.fixture(scope="module")
def tomogram() -> tuple[np.ndarray, np.ndarray]:
    """Even half and clean volume of a 32x64x64 tomogram (10 A, dose 10; seed unseen in training)."""
    from cryodeploy.imaging.simulate.tomogram import simulate_tomogram

    tomo = simulate_tomogram(TomoConfig(shape=(32, 64, 64), voxel_size=10.0, seed=20261202, dose=10.0), 0)
    return tomo.even.numpy(), tomo.clean.numpy()


def test_loads_as_a_small_volume_model() -> None:
    from cryodeploy.inference.denoiser import Denoiser

    assert CKPT.stat().st_size < 1_000_000
    with Denoiser.load(CKPT, device="cpu", backend="torch") as d:
        assert (d.spec.architecture, d.spec.ndim) == ("unet3d", 3)
        assert d.spec.params["base_channels"] == 8 and d.spec.params["depth"] == 2


def test_beats_identity_on_a_held_out_tomogram(tomogram: tuple[np.ndarray, np.ndarray]) -> None:
    from cryodeploy.inference.denoiser import Denoiser

    even, clean = tomogram
    with Denoiser.load(CKPT, device="cpu", backend="torch") as d:
        out = d(even)
    ident = psnr(even, clean)
    # measured (CPU, 2026-12-01): identity 1.46 dB, the model 16.94 dB (+15.48), the best Gaussian
    # (sigma 4 voxels) 22.14 dB
    assert out.shape == even.shape and out.dtype == np.float32
    assert 1.0 < ident < 2.0 and psnr(out, clean) > ident + 14.0
    assert psnr(gaussian_filter(even, 4.0), clean) == pytest.approx(22.14, abs=0.05)

