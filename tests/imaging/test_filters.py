"""Fourier binning, low-pass and Gaussian filters, and ``denoise --bin/--lowpass/--gaussian``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError
from cryodeploy.imaging.filters import EDGE_WIDTH, FrameFilters, fourier_bin, gaussian, lowpass
from cryodeploy.io.mrc import MicrographHeader, read_micrograph, write_micrograph


def _wave(shape: tuple[int, int], ky: int, kx: int) -> np.ndarray:
    """A cosine with ky, kx whole cycles over the frame, plus an offset."""
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    return 3.0 + np.cos(2 * np.pi * (ky * y / shape[0] + kx * x / shape[1]) + 0.3)


def test_fourier_bin_keeps_band_limited_content_exactly() -> None:
    for shape, factor in (((120, 96), 2), ((121, 97), 2), ((96, 96), 3)):
        out = (shape[0] // factor, shape[1] // factor)
        got = fourier_bin(_wave(shape, 3, 5), factor)
        assert got.shape == out and got.dtype == np.float32
        np.testing.assert_allclose(got, _wave(out, 3, 5), atol=1e-5)
    noise = np.random.default_rng(0).normal(size=(64, 80))
    assert abs(float(fourier_bin(noise, 2).mean()) - noise.mean()) < 1e-6  # the mean (DC) is kept
    above = fourier_bin(_wave((64, 64), 0, 20), 2)  # 20 cycles: above the binned Nyquist (16): removed
    np.testing.assert_allclose(above, 3.0, atol=1e-5)
    with pytest.raises(ConfigError, match="no pixels left"):
        fourier_bin(noise, 100)


def test_lowpass_in_pixels_and_angstrom() -> None:
    shape = (128, 128)
    keep, drop = _wave(shape, 8, 0), _wave(shape, 40, 0)  # periods 16 px and 3.2 px
    for res, px in ((8.0, None), (8.0 * 1.5, 1.5)):  # cutoff 1/8 cycles per px either way
        np.testing.assert_allclose(lowpass(keep, res, px), keep, atol=1e-5)
        np.testing.assert_allclose(lowpass(drop, res, px), 3.0, atol=1e-5)
    edge = _wave(shape, int(128 * (1 / 8 + EDGE_WIDTH / 2)), 0)  # half way into the raised-cosine edge
    amplitude = np.abs(lowpass(edge, 8.0) - 3.0).max()
    assert 0.3 < amplitude < 0.8
    with pytest.raises(ConfigError, match=r"lowpass 2.5 Å: expected at least 2 pixels \(3 Å, Nyquist\)"):
        lowpass(keep, 2.5, 1.5)


def test_gaussian_blur_has_the_given_sigma() -> None:
    impulse = np.zeros((65, 65), np.float32)
    impulse[32, 32] = 1.0
    blurred = gaussian(impulse, 2.5)
    y = np.arange(65) - 32
    assert abs(float(blurred.sum()) - 1.0) < 1e-5
    variance = float((blurred.sum(axis=1) * y * y).sum())
    assert abs(variance - 2.5**2) < 0.02 * 2.5**2
    with pytest.raises(ConfigError):
        FrameFilters(gaussian=0.0)


def test_binned_header_pixel_size() -> None:
    header = MicrographHeader(shape=(2, 121, 96), mode=2, voxel_size=(0.8, 0.8, 1.0), origin=(0, 0, 0))
    out = FrameFilters(bin=2).header(header)
    assert out.shape == (2, 60, 48)
    assert out.voxel_size == (pytest.approx(1.6), pytest.approx(0.8 * 121 / 60), 1.0)
    assert FrameFilters().header(header) is header and not FrameFilters().active


def _denoise(checkpoint: Path, src: Path, out: Path, *extra: str):
    return CliRunner().invoke(cli, ["denoise", str(src), "-o", str(out), "--model", str(checkpoint),
                                    "--backend", "torch", "--device", "cpu", "-q", *extra])


def test_denoise_bin_and_filters_around_the_network(
    cnn3_checkpoint: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    from cryodeploy import Denoiser

    image = (rng.standard_normal((128, 160)) * 10 + 50).astype(np.float32)
    header = MicrographHeader(shape=image.shape, mode=2, voxel_size=(1.1, 1.1, 1.1), origin=(0, 0, 0))
    src = write_micrograph(tmp_path / "m.mrc", image, header)
    with Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch") as d:
        binned_then_denoised = d(fourier_bin(image, 2))
        lowpassed_then_denoised = d(lowpass(image, 6.6, 1.1))
        denoised_then_blurred = gaussian(d(image), 1.5)

    assert _denoise(cnn3_checkpoint, src, tmp_path / "bin", "--bin", "2").exit_code == 0
    mic = read_micrograph(tmp_path / "bin" / "m.mrc")
    assert mic.data.shape == (64, 80)
    assert mic.header.voxel_size[:2] == (pytest.approx(2.2), pytest.approx(2.2))
    np.testing.assert_allclose(mic.data, binned_then_denoised, atol=1e-4)

    assert _denoise(cnn3_checkpoint, src, tmp_path / "lp", "--lowpass", "6.6").exit_code == 0  # Å: 6 px
    np.testing.assert_allclose(read_micrograph(tmp_path / "lp" / "m.mrc").data, lowpassed_then_denoised,
                               atol=1e-4)
    res = _denoise(cnn3_checkpoint, src, tmp_path / "g", "--gaussian", "1.5", "--filter-at", "after")
    assert res.exit_code == 0, res.output
    np.testing.assert_allclose(read_micrograph(tmp_path / "g" / "m.mrc").data, denoised_then_blurred,
                               atol=1e-4)
    small = _denoise(cnn3_checkpoint, src, tmp_path / "s", "--bin", "5")  # 25x32: below the 32 px minimum
    assert small.exit_code == 1 and "binned to 32x25, smaller than the model's 32 px minimum" in small.output


def test_binned_lowpass_after_the_network_uses_the_binned_pixel_size(
    cnn3_checkpoint: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    """--bin 2 --lowpass 8.8 --filter-at after: the low-pass of the output is in Å of the binned
    pixel (2.2 Å: 4 px), applied after de-normalization, and the header says 2.2 Å."""
    from cryodeploy import Denoiser

    image = (rng.standard_normal((128, 160)) * 10 + 50).astype(np.float32)
    header = MicrographHeader(shape=image.shape, mode=2, voxel_size=(1.1, 1.1, 1.1), origin=(0, 0, 0))
    src = write_micrograph(tmp_path / "m.mrc", image, header)
    with Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch") as d:
        binned = d(fourier_bin(image, 2))
    expected, unbinned_pixel = lowpass(binned, 8.8, 2.2), lowpass(binned, 8.8, 1.1)
    res = _denoise(cnn3_checkpoint, src, tmp_path / "o", "--bin", "2", "--lowpass", "8.8",
                   "--filter-at", "after")
    assert res.exit_code == 0, res.output
    mic = read_micrograph(tmp_path / "o" / "m.mrc")
    assert mic.header.voxel_size[:2] == (pytest.approx(2.2), pytest.approx(2.2))
    assert np.abs(mic.data - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(unbinned_pixel - expected).max() > 1e-2 * expected.std()  # the pixel size matters here
