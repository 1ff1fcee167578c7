"""Per-micrograph robust normalization and its inverse."""

from __future__ import annotations

import numpy as np
import pytest

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.normalize import NormSpec, NormStats, denormalize, norm_stats, normalize


def _micrograph(rng: np.random.Generator, shape: tuple[int, int] = (256, 256)) -> np.ndarray:
    """Counts-like image: a uint16 detector level with Gaussian spread."""
    return np.round(5600.0 + 70.0 * rng.standard_normal(shape)).astype(np.float32)


def test_normalized_core_has_zero_mean_unit_std(rng: np.random.Generator) -> None:
    img = _micrograph(rng)
    stats = norm_stats(img)
    z = normalize(img, stats)
    assert z.dtype == np.float32
    # For a Gaussian, the 1-99 % core (+-2.326 sigma) keeps the mean and has 0.9345 of the std.
    assert stats.center == pytest.approx(5600.0, abs=1.0)
    assert stats.scale == pytest.approx(0.9345 * 70.0, rel=0.02)
    assert float(np.median(z)) == pytest.approx(0.0, abs=0.03)


@pytest.mark.parametrize("offset", [0.0, 5600.0, -3.0e4])
def test_denormalize_inverts_to_float32_rounding(rng: np.random.Generator, offset: float) -> None:
    img = (offset + 70.0 * rng.standard_normal((128, 128))).astype(np.float32)
    stats = norm_stats(img)
    back = denormalize(normalize(img, stats), stats)
    assert back.dtype == np.float32
    # Tolerance: 4 float32 ulps of the larger of |x| and |center| (two roundings each way).
    tol = 4 * np.finfo(np.float32).eps * (np.abs(img) + abs(stats.center) + 1e-30)
    err = np.abs(back.astype(np.float64) - img.astype(np.float64))
    assert np.all(err <= tol), float((err / tol).max())


def test_hot_pixels_barely_move_center_and_scale(rng: np.random.Generator) -> None:
    img = _micrograph(rng)
    clean = norm_stats(img)
    hot = img.copy()
    idx = rng.choice(hot.size, size=hot.size // 200, replace=False)  # 0.5 % hot pixels
    hot.reshape(-1)[idx] = 65535.0

    robust = norm_stats(hot)

    assert abs(robust.center - clean.center) < 0.05 * clean.scale
    assert robust.scale == pytest.approx(clean.scale, rel=0.05)
    # The plain mean/std would be ruined by the same pixels: the test would notice a non-robust method.
    assert hot.std() > 50 * img.std()


def test_stats_are_deterministic_and_use_a_subsample_of_big_images(rng: np.random.Generator) -> None:
    img = _micrograph(rng, shape=(1100, 1000))  # more than 2**20 pixels: subsampled
    first = norm_stats(img)
    assert norm_stats(img.copy()) == first
    assert norm_stats(img) == first
    assert first.center == pytest.approx(5600.0, abs=1.0)


def test_constant_image_gets_a_usable_scale() -> None:
    stats = norm_stats(np.full((64, 64), 3.0, np.float32))
    assert stats == NormStats(center=3.0, scale=1.0)
    assert np.all(normalize(np.full((4, 4), 3.0), stats) == 0.0)


def test_spec_round_trip_and_validation() -> None:
    spec = NormSpec(low_percentile=2.0, high_percentile=98.0)
    assert NormSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ConfigError, match="unknown fields"):
        NormSpec.from_dict({"method": "robust", "clip": 3})
    with pytest.raises(ConfigError, match="percentiles"):
        NormSpec(low_percentile=60.0, high_percentile=40.0)
    with pytest.raises(ConfigError, match="unknown, expected 'robust'"):
        NormSpec(method="minmax")


def test_percentiles_change_the_result(rng: np.random.Generator) -> None:
    img = _micrograph(rng)
    wide = norm_stats(img, NormSpec(low_percentile=0.0, high_percentile=100.0))
    narrow = norm_stats(img, NormSpec(low_percentile=25.0, high_percentile=75.0))
    assert wide.scale == pytest.approx(float(img.astype(np.float64).std()), rel=1e-6)
    assert narrow.scale < 0.5 * wide.scale


def test_norm_stats_torch_is_norm_stats_per_image(rng: np.random.Generator) -> None:
    import torch

    from cryodeploy.imaging.normalize import norm_stats_torch

    images = np.stack([_micrograph(rng, (64, 80)), rng.poisson(3.0, (64, 80)).astype(np.float32),
                       np.full((64, 80), 7.0, np.float32)])  # counts with ties; a constant image
    center, scale = norm_stats_torch(torch.from_numpy(images))
    for i, img in enumerate(images):
        stats = norm_stats(img)
        assert center[i].item() == pytest.approx(stats.center, rel=1e-12, abs=1e-12)
        assert scale[i].item() == pytest.approx(stats.scale, rel=1e-12)
    assert (center[2].item(), scale[2].item()) == (7.0, 1.0)
