"""The noise model: Poisson at a dose plus Gaussian, on a [0, 1] image."""

from __future__ import annotations

import numpy as np
import pytest

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.noise import NoiseSpec, add_noise, to_unit_range


def _levels() -> np.ndarray:
    """Eight constant stripes of 8192 pixels at intensities 0.05 ... 0.95."""
    return np.repeat(np.linspace(0.05, 0.95, 8, dtype=np.float32), 8192).reshape(8, 8192)


@pytest.mark.parametrize(("dose", "sigma"), [(20.0, 0.05), (5.0, 0.1), (0.0, 0.05), (50.0, 0.0)])
def test_mean_and_variance_follow_the_model(rng: np.random.Generator, dose: float, sigma: float) -> None:
    clean = _levels()
    noisy = add_noise(clean, NoiseSpec(dose=dose, sigma=sigma), rng)
    assert noisy.dtype == np.float32 and noisy.shape == clean.shape
    n = clean.shape[1]
    for row in range(clean.shape[0]):
        x = float(clean[row, 0])
        expected_var = (x / dose if dose else 0.0) + sigma**2
        # 4 standard errors of the mean and of the variance of n pixels (the Poisson term's 4th
        # cumulant, x*dose/dose**4, adds to the variance's error at low counts).
        kurtosis = (x / dose**3 if dose else 0.0) / expected_var**2
        assert float(noisy[row].mean()) == pytest.approx(x, abs=4 * np.sqrt(expected_var / n))
        assert float(noisy[row].var()) == pytest.approx(expected_var, rel=4 * np.sqrt((2 + kurtosis) / n))


def test_poisson_only_gives_counts_over_dose(rng: np.random.Generator) -> None:
    noisy = add_noise(_levels(), NoiseSpec(dose=10.0, sigma=0.0), rng)
    counts = noisy.astype(np.float64) * 10.0
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-4)


def test_same_seed_same_noise_other_seed_other_noise() -> None:
    clean = _levels()[:, :512]
    spec = NoiseSpec()
    a = add_noise(clean, spec, np.random.default_rng(7))
    b = add_noise(clean, spec, np.random.default_rng(7))
    c = add_noise(clean, spec, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_dose_override_and_dose_range(rng: np.random.Generator) -> None:
    clean = np.full((64, 1024), 0.5, np.float32)
    low = add_noise(clean, NoiseSpec(dose=20.0, sigma=0.0), rng, dose=2.0)
    assert float(low.var()) == pytest.approx(0.5 / 2.0, rel=0.1)
    spec = NoiseSpec(dose_range=(4.0, 40.0))
    doses = np.array([spec.draw_dose(rng) for _ in range(4000)])
    assert doses.min() >= 4.0 and doses.max() <= 40.0
    assert float(np.median(doses)) == pytest.approx(np.sqrt(4.0 * 40.0), rel=0.05)  # log-uniform


def test_spec_validation_and_round_trip() -> None:
    spec = NoiseSpec(dose=12.0, sigma=0.02, dose_range=(5.0, 30.0))
    assert NoiseSpec.from_dict(spec.to_dict()) == spec
    for bad in ({"dose": -1.0}, {"sigma": -0.1}, {"kind": "gaussian"}, {"dose_range": (0.0, 3.0)}):
        with pytest.raises(ConfigError):
            NoiseSpec(**bad)  # type: ignore[arg-type]


def test_to_unit_range_maps_robust_percentiles(rng: np.random.Generator) -> None:
    img = (5600.0 + 70.0 * rng.standard_normal((512, 512))).astype(np.float32)
    img[0, :5] = 65535.0  # hot pixels are clipped, not allowed to squash the range
    unit = to_unit_range(img)
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    assert float(np.median(unit)) == pytest.approx(0.5, abs=0.02)
    assert 0.001 < float(np.mean(unit == 1.0)) < 0.003
    with pytest.raises(ConfigError, match="no dynamic range"):
        to_unit_range(np.ones((64, 64), np.float32))


def test_count_gain_of_integer_scaled_and_gain_corrected_counts() -> None:
    from cryodeploy.imaging.noise import count_gain

    rng = np.random.default_rng(11)
    counts = rng.poisson(12.0, (256, 256)).astype(np.float32)
    assert count_gain(counts) == (1.0, "integer")
    assert count_gain(2.5 * counts) == (2.5, "variance/mean")  # snapped to the value spacing
    # a gain-corrected counting image, Poisson(g * rate) / g with a 3 % per-pixel efficiency g
    g = np.exp(0.03 * rng.standard_normal((256, 256)))
    corrected = (rng.poisson(12.0 * g) / g).astype(np.float32)
    gain, found = count_gain(corrected)
    assert found == "variance/mean" and gain == pytest.approx(1.0, abs=0.03)


def test_count_gain_refuses_data_that_cannot_be_counts() -> None:
    from cryodeploy.errors import InputError
    from cryodeploy.imaging.noise import count_gain

    rng = np.random.default_rng(12)
    with pytest.raises(InputError, match=r"^m\.mrc: pixels range .* expected non-negative counts"):
        count_gain(rng.standard_normal((64, 64)).astype(np.float32), "m.mrc")
    with pytest.raises(InputError, match="no shot noise found"):
        count_gain(np.full((64, 64), 1.5, np.float32))


def test_thin_halves_sum_to_the_counts_with_independent_noise() -> None:
    from cryodeploy.imaging.noise import thin

    rng = np.random.default_rng(13)
    image = (2.0 * rng.poisson(20.0, (256, 256))).astype(np.float32)
    a, b = thin(image, 2.0, np.random.default_rng(0))
    np.testing.assert_array_equal(a + b, image)
    assert a.mean() == pytest.approx(20.0, rel=0.01) and b.mean() == pytest.approx(20.0, rel=0.01)
    # each half: Poisson(10) counts x 2 -> variance 40, and the halves uncorrelated
    assert a.var() == pytest.approx(40.0, rel=0.05)
    assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1]) < 0.02
    a2, _ = thin(image, 2.0, np.random.default_rng(0))
    np.testing.assert_array_equal(a, a2)
