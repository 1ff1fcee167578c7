"""Split metrics on synthetic counted micrographs whose clean image is known (fixed seeds)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryodeploy.errors import InputError
from cryodeploy.imaging import metrics as M
from cryodeploy.imaging import splits as S


def counted(rng: np.random.Generator, side: int, dose: float, contrast: float = 0.3) -> tuple[np.ndarray,
                                                                                             np.ndarray]:
    """(counts, expected counts): a smooth positive image x dose, Poisson noise."""
    from scipy import ndimage

    s = ndimage.gaussian_filter(rng.standard_normal((side, side)), 5.0)
    clean = dose * np.clip(1.0 + contrast * s / s.std(), 0.05, None)
    return rng.poisson(clean).astype(np.float32), clean


def test_identity_scores_exactly_zero_and_one_per_band() -> None:
    rng = np.random.default_rng(0)
    x, _ = counted(rng, 256, 20.0)
    a, b = S.binomial_thin(x, rng)
    assert S.split_error(a, b, a, b) == 1.0 and S.split_gain(a, b, a, b) == 0.0
    assert S.band_errors(a, b, a, b, S.band_edges(None)[0]) == [1.0, 1.0, 1.0, 1.0]
    assert S.residual_spread(a, b, a, b) == 0.0
    _, ratio = S.power_ratio(x, x)
    np.testing.assert_allclose(ratio, 1.0, rtol=1e-12)


def test_thinning_is_exact_deterministic_and_independent() -> None:
    x, _ = counted(np.random.default_rng(1), 512, 30.0)
    a, b = S.binomial_thin(x, np.random.default_rng(7))
    a2, b2 = S.binomial_thin(x, np.random.default_rng(7))
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    assert not np.array_equal(a, S.binomial_thin(x, np.random.default_rng(8))[0])
    np.testing.assert_array_equal(a + b, x)  # integer counts, gain 1: every count goes to one half
    d = (a - b).astype(np.float64)
    assert abs(d.var() / x.mean() - 1.0) < 0.01  # Poisson halves: var(A - B) = E[x]
    check = S.independence(a, b)
    assert check.independent and max(abs(check.frc_mid), abs(check.frc_outer)) < 0.02
    with pytest.raises(InputError, match="negative values"):
        S.binomial_thin(x - 100, np.random.default_rng(0))


def test_gain_of_scaled_counts() -> None:
    x, _ = counted(np.random.default_rng(2), 512, 25.0, contrast=0.05)
    assert S.diagonal_gain(x) == pytest.approx(1.0, abs=0.02)
    assert S.diagonal_gain(7.5 * x) == pytest.approx(7.5, rel=0.02)
    a, b = S.binomial_thin(7.5 * x, np.random.default_rng(0), gain=7.5)
    assert set(np.unique(a / 7.5)) <= set(range(200)) and S.independence(a, b).independent


def test_correlated_noise_fails_independence() -> None:
    """Interpolated noise (a 0.7 px blur, the EPU symptom) correlates neighbouring pixels."""
    rng = np.random.default_rng(3)
    noise = M.gaussian_filter(rng.standard_normal((512, 512)), 0.7)
    check = S.independence(*M.split_diagonals(100 + noise))
    assert not check.independent and check.frc_outer > 0.3
    assert S.independence(*M.split_diagonals(100 + rng.standard_normal((512, 512)))).independent


@pytest.mark.parametrize(("dose", "sigma"), [(5.0, 1.0), (5.0, 3.0), (20.0, 2.0), (50.0, 4.0)])
def test_split_gain_agrees_with_the_true_gain(dose: float, sigma: float) -> None:
    """Split gain vs -10 log10(MSE(f(A), clean_A) / MSE(A, clean_A)) (both directions averaged).

    With A = c + nA, B = c + nB (thinning: both halves expect c = clean / 2) and e = f(A) - c,
    E_split - E_true = -(<eA nB> + <eB nA>) / s2 + (1 + E) <nA nB> / s2 to first order. Both terms
    have mean 0; <e nB> has variance sum(e^2 v) / N^2 (e is independent of nB) and <nA nB>
    sum(v^2) / N^2, so std(dE) <= k (sqrt(2 E) + 1 + E) / sqrt(N), k = sqrt(mean(v^2)) / mean(v)
    (v = c, the Poisson variance). In dB: 10 / ln 10 * dE / E; asserted within 4 standard deviations.
    """
    rng = np.random.default_rng(int(dose * 10 + sigma))
    x, clean = counted(rng, 1024, dose)
    a, b = S.binomial_thin(x, rng)
    c = clean / 2
    fa, fb = M.gaussian_filter(a, sigma), M.gaussian_filter(b, sigma)
    e_true = (M.mse(fa, c) + M.mse(fb, c)) / (M.mse(a, c) + M.mse(b, c))
    k = math.sqrt(float(np.mean(c * c))) / float(np.mean(c))
    tol_db = 4 * 10 / math.log(10) * k * (math.sqrt(2 * e_true) + 1 + e_true) / math.sqrt(x.size) / e_true
    gain = S.split_gain(fa, fb, a, b)
    assert tol_db == pytest.approx(4 * k * S.split_gain_sd(e_true, x.size))
    assert gain > 0 and tol_db < 1.5
    assert abs(gain - -10 * math.log10(e_true)) <= tol_db


def test_band_errors_add_up_to_the_split_error() -> None:
    """Parseval: the bands' errors, weighted by their share of the noise, sum to E."""
    rng = np.random.default_rng(4)
    x, _ = counted(rng, 384, 20.0)
    a, b = S.binomial_thin(x, rng)
    fa, fb = M.gaussian_filter(a, 2.0), M.gaussian_filter(b, 2.0)
    edges, names = S.band_edges(1.0)
    assert names == ["> 100 A", "100-34 A", "34-15 A", "15-8 A", "8-4 A", "4-2 A"]
    noise = S._band_power([a.astype(np.float64) - b], edges)[0]
    bands = S.band_errors(fa, fb, a, b, edges)
    total = sum(e * w for e, w in zip(bands, noise / noise.sum(), strict=True))
    assert total == pytest.approx(S.split_error(fa, fb, a, b), rel=1e-9)
    assert bands[-1] < 0.1 < bands[1]  # a blur removes the high-frequency noise, keeps low bands' signal


def patchy(image: np.ndarray, sigma: float, block: int = 64, offset: int = 0) -> np.ndarray:
    """Blur on every other ``block``-px square (a checkerboard), identity elsewhere."""
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]]
    mask = ((yy + offset) // block + (xx + offset) // block) % 2 == 0
    return np.where(mask, M.gaussian_filter(image, sigma), image).astype(np.float32)


@pytest.mark.parametrize("offset", [0, 32])
def test_residual_spread_separates_patchwork_from_blur(offset: int) -> None:
    from cryodeploy.evaluation.flags import PATCHWORK_SPREAD

    rng = np.random.default_rng(5)
    x, _ = counted(rng, 512, 20.0)
    a, b = S.binomial_thin(x, rng)
    for sigma in (1.0, 2.0, 4.0):
        spread = S.residual_spread(M.gaussian_filter(a, sigma), M.gaussian_filter(b, sigma), a, b)
        assert spread is not None and spread < 0.4 * PATCHWORK_SPREAD
    spread = S.residual_spread(patchy(a, 2.0, offset=offset), patchy(b, 2.0, offset=offset), a, b)
    assert spread is not None and spread > 2.5 * PATCHWORK_SPREAD
    assert S.residual_spread(a[:128, :128], b[:128, :128], a[:128, :128], b[:128, :128]) is None
