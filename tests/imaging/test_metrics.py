"""Metric functions against hand-computed values, scikit-image's SSIM, and FRC's known limits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryodeploy.errors import InputError
from cryodeploy.imaging import metrics as M


def test_mse_rmse_of_known_arrays() -> None:
    a = np.array([[0.0, 1.0], [2.0, 3.0]])
    b = np.zeros((2, 2))
    assert M.mse(a, b) == pytest.approx(3.5)  # (0 + 1 + 4 + 9) / 4
    assert M.rmse(a, b) == pytest.approx(math.sqrt(3.5))
    assert M.mse(b, b) == 0.0


def test_psnr_of_known_mse_and_range() -> None:
    target = np.array([[0.0, 2.0], [1.0, 0.5]])  # range 2
    pred = target + 0.1  # MSE 0.01
    assert M.psnr(pred, target) == pytest.approx(10 * math.log10(4 / 0.01))  # 26.0206 dB
    assert M.psnr(pred, target, data_range=1.0) == pytest.approx(20.0)
    assert M.psnr(target, target) == math.inf


def test_pearson_of_linear_relations() -> None:
    x = np.random.default_rng(0).standard_normal((16, 16))
    assert M.pearson(3 * x + 2, x) == pytest.approx(1.0)
    assert M.pearson(-0.5 * x, x) == pytest.approx(-1.0)
    assert M.pearson(np.ones_like(x), x) == 0.0


@pytest.mark.parametrize("shape, noise", [((64, 80), 0.2), ((33, 47), 0.05), ((128, 128), 1.0)])
def test_ssim_matches_skimage(shape: tuple[int, int], noise: float) -> None:
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(7)
    clean = rng.random(shape)
    pred = clean + noise * rng.standard_normal(shape)
    r = float(np.ptp(clean))
    ref = structural_similarity(pred, clean, data_range=r, gaussian_weights=True, sigma=1.5,
                                use_sample_covariance=False)
    assert M.ssim(pred, clean) == pytest.approx(ref, abs=1e-9)
    assert M.ssim(clean, clean) == pytest.approx(1.0)


def test_shape_mismatch_is_an_input_error() -> None:
    with pytest.raises(InputError, match="found"):
        M.mse(np.zeros((4, 4)), np.zeros((4, 5)))


def test_frc_of_identical_images_is_one() -> None:
    x = np.random.default_rng(1).standard_normal((96, 128))
    freq, curve = M.frc(x, x)
    assert curve.shape == freq.shape == (48,)
    np.testing.assert_allclose(curve, 1.0, atol=1e-12)
    assert freq[0] == pytest.approx(1 / 96) and freq[-1] == pytest.approx(0.5)
    freq_a, _ = M.frc(x, x, voxel_size=2.5)
    assert freq_a[-1] == pytest.approx(0.5 / 2.5)  # Nyquist in 1/Angstrom


def test_frc_of_independent_noise_is_near_zero() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((2, 256, 256))
    _, curve = M.frc(a, b)
    assert abs(curve[4:].mean()) < 0.05
    assert np.abs(curve[4:]).max() < 0.35  # single rings of ~tens to hundreds of pixels


def test_frc_crossing_interpolates() -> None:
    freq = np.array([0.1, 0.2, 0.3, 0.4])
    curve = np.array([0.9, 0.6, 0.4, 0.1])
    assert M.frc_crossing(freq, curve, 0.5) == pytest.approx(1 / 0.25)  # halfway between 0.2 and 0.3
    assert M.frc_crossing(freq, curve, 0.143) == pytest.approx(1 / (0.3 + 0.1 * (0.4 - 0.143) / 0.3))
    assert M.frc_crossing(freq, curve, 0.05) is None
    assert M.frc_crossing(freq, curve, 0.95) == pytest.approx(10.0)  # below from the first ring


def test_split_diagonals_shapes_and_values() -> None:
    x = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    a, b = M.split_diagonals(x)
    assert a.shape == b.shape == (2, 3)
    # block (0, 0): main diagonal x[0,0], x[1,1] = 0, 8; anti-diagonal x[0,1], x[1,0] = 1, 7
    assert a[0, 0] == pytest.approx(4.0) and b[0, 0] == pytest.approx(4.0)
    # block (1, 2): rows 2-3, cols 4-5: x[2,4]=18, x[3,5]=26 ; x[2,5]=19, x[3,4]=25
    assert a[1, 2] == pytest.approx(22.0) and b[1, 2] == pytest.approx(22.0)
    y = np.zeros((4, 4), np.float32)
    y[0::2, 0::2] = 1.0  # top-left of each block only
    a, b = M.split_diagonals(y)
    np.testing.assert_array_equal(a, 0.5)
    np.testing.assert_array_equal(b, 0.0)


def test_diagonal_halves_share_signal_not_noise() -> None:
    rng = np.random.default_rng(3)
    noise_a, noise_b = M.split_diagonals(rng.standard_normal((256, 256)))
    _, curve = M.frc(noise_a, noise_b)
    assert abs(curve[4:].mean()) < 0.05
    yy, xx = np.mgrid[0:256, 0:256]
    signal = np.sin(2 * np.pi * xx / 32.0) + np.cos(2 * np.pi * yy / 20.0)
    a, b = M.split_diagonals(signal + 0.5 * rng.standard_normal((256, 256)))
    freq, curve = M.frc(a, b)
    ring = int(np.argmin(np.abs(freq - 2 / 32.0)))  # period 32 px = 16 px in the halves
    assert curve[ring] > 0.9


def test_best_gaussian_sigma_picks_a_useful_blur() -> None:
    rng = np.random.default_rng(4)
    yy, xx = np.mgrid[0:96, 0:96]
    clean = [np.sin(xx / (6.0 + k)) * np.cos(yy / 9.0) for k in range(3)]
    noisy = [c + 0.8 * rng.standard_normal(c.shape) for c in clean]
    sigmas = (0.5, 1.0, 2.0, 4.0, 16.0)
    sigma, scores = M.best_gaussian_sigma(noisy, clean, sigmas)
    assert len(scores) == len(sigmas)
    assert sigma in (2.0, 4.0)
    assert scores[sigmas.index(sigma)] == max(scores)
    assert max(scores) > scores[0] + 5  # blurring white noise on a smooth image gains > 5 dB
    with pytest.raises(InputError):
        M.best_gaussian_sigma(noisy, clean[:2], sigmas)


def test_flat_region_noise() -> None:
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[0:128, 0:256]
    clean = np.where(xx < 128, 0.0, np.sin(xx / 5.0) * np.cos(yy / 7.0))
    image = clean + 0.1 * rng.standard_normal(clean.shape)
    mask = M.flat_mask(clean)
    assert mask.sum() > 0.05 * mask.size
    assert mask[:, 128:].sum() == 0  # the flat region is the empty left half
    assert M.flat_noise(image, mask) == pytest.approx(0.1, rel=0.05)
    assert M.flat_noise(M.gaussian_filter(image, 2.0), mask) < 0.03


def test_window_noise_left_is_exact_for_a_scaled_residual() -> None:
    from cryodeploy.imaging.metrics import patchiness, window_noise_left

    rng = np.random.default_rng(3)
    clean = rng.random((2, 130, 200))
    noisy = clean + rng.standard_normal(clean.shape)
    r = window_noise_left(clean + 0.5 * (noisy - clean), noisy, clean)
    assert r.shape == (2 * 2 * 3,)  # partial windows dropped
    np.testing.assert_allclose(r, 0.5, rtol=1e-12)
    assert patchiness(noisy, noisy, clean)["spread"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(InputError, match="smaller than the 64-px window"):
        window_noise_left(clean[:, :60], noisy[:, :60], clean[:, :60])
