"""Volume halves (even/odd, thinning), split gain and FSC, with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryodeploy.errors import InputError
from cryodeploy.imaging.volsplits import (
    fsc,
    half_bit_threshold,
    thin_volume,
    volume_band_errors,
    volume_halves,
    volume_power_ratio,
    volume_split_error,
    volume_split_gain,
)

SHAPE = (32, 40, 48)


def test_fsc_of_a_volume_with_itself_is_one_and_of_independent_noise_is_zero(
    rng: np.random.Generator,
) -> None:
    a = rng.standard_normal(SHAPE)
    same = fsc(a, a, voxel_size=2.0)
    assert np.allclose(same.curve, 1.0)
    assert (
        len(same.freq) == 16
        and same.freq[0] == pytest.approx(1 / 32 / 2.0)
        and same.freq[-1] == pytest.approx(0.25)
    )
    noise = fsc(a, rng.standard_normal(SHAPE))
    # per shell the FSC of independent white noise has sd ~ 1/sqrt(voxels); the tapered edges lower
    # the effective count a little: 6 sigma
    assert np.all(np.abs(noise.curve[1:]) < 6.0 / np.sqrt(noise.voxels[1:]))
    # shells 1/32 wide hold ~ 4 pi k^2 coefficients at radius k
    k = np.arange(1, 17)
    assert np.allclose(noise.voxels[4:12] / (4 * np.pi * k[4:12] ** 2 * (40 * 48) / 32**2), 1.0, atol=0.15)


def test_fsc_of_signal_plus_equal_noise_is_one_half(rng: np.random.Generator) -> None:
    """FSC = SNR / (1 + SNR) for white signal and noise; SNR 1 gives 1/2."""
    s = rng.standard_normal(SHAPE)
    c = fsc(s + rng.standard_normal(SHAPE), s + rng.standard_normal(SHAPE))
    assert np.all(np.abs(c.curve[2:] - 0.5) < 6.0 / np.sqrt(c.voxels[2:]))
    assert c.resolution(0.9) == pytest.approx(1 / c.freq[0])  # below 0.9 from the first shell
    assert c.resolution(0.1) is None


def test_half_bit_threshold_limits() -> None:
    assert half_bit_threshold(np.array([1.0]))[0] == pytest.approx(1.0, abs=1e-4)
    assert half_bit_threshold(np.array([1e12]))[0] == pytest.approx(0.2071 / 1.2071, abs=1e-5)


def test_thin_volume_splits_counts_exactly_and_refuses_reconstructions(rng: np.random.Generator) -> None:
    counts = rng.poisson(6.0, SHAPE).astype(np.float32)
    a, b = thin_volume(counts, np.random.default_rng(1))
    assert np.array_equal(a + b, counts)
    assert float(a.mean()) == pytest.approx(3.0, rel=0.02)
    # independent Poisson halves: their noise does not correlate
    r = np.corrcoef((a - 3).ravel(), (b - 3).ravel())[0, 1]
    assert abs(r) < 5 / math.sqrt(counts.size)
    scaled = counts * 0.25
    a4, b4 = thin_volume(scaled, np.random.default_rng(1), gain=0.25)
    assert np.array_equal(a4 + b4, scaled) and np.array_equal(a4, a * 0.25)
    with pytest.raises(
        InputError,
        match=r"tomo.mrc: found \d+ non-integer voxels \(gain 1\), expected integer "
        r"counts >= 0 to thin; a reconstruction is not counts",
    ):
        thin_volume(counts + 0.3, rng, name="tomo.mrc")
    with pytest.raises(InputError, match=r"volume: found negative counts \(min -7\)"):
        thin_volume(counts - 7, rng)
    with pytest.raises(InputError, match=r"found a 2-D array of shape \(4, 4\), expected a 3-D volume"):
        thin_volume(np.ones((4, 4)), rng)


def test_volume_halves_and_split_gain(rng: np.random.Generator) -> None:
    s = 5 * rng.standard_normal(SHAPE)
    even, odd = s + rng.standard_normal(SHAPE), s + rng.standard_normal(SHAPE)
    a, b, how = volume_halves(even, odd)
    assert how == "even/odd" and np.array_equal(a, even.astype(np.float32))
    assert volume_split_gain(a, b, a, b) == 0.0  # identity
    # halving the noise of each half (the average of the half with the true signal) leaves E = 1/4: 6 dB
    gain = volume_split_gain(0.5 * (a + s), 0.5 * (b + s), a, b)
    assert gain == pytest.approx(10 * math.log10(4), abs=0.1)
    counts = rng.poisson(3.0, SHAPE).astype(np.float32)
    ta, tb, how = volume_halves(counts, rng=np.random.default_rng(0))
    assert how == "thinned" and np.array_equal(ta + tb, counts)
    with pytest.raises(InputError, match="needs a random generator"):
        volume_halves(counts)
    with pytest.raises(InputError, match=r"volumes differ in shape: found \(32, 40, 48\) and \(32, 40, 47\)"):
        volume_halves(even, odd[..., :-1])


def test_volume_band_errors_and_power_ratio(rng: np.random.Generator) -> None:
    s = rng.standard_normal(SHAPE)
    a, b = s + rng.standard_normal(SHAPE), s + rng.standard_normal(SHAPE)
    edges = [0.0, 0.1, 0.25, 0.5]
    assert volume_band_errors(a, b, a, b, edges) == [1.0, 1.0, 1.0]  # identity, exactly
    # the average with the true signal halves each half's noise in every band: E = 1/4 per band
    got = volume_band_errors(0.5 * (a + s), 0.5 * (b + s), a, b, edges)
    assert got == pytest.approx([0.25] * 3, abs=0.03)
    assert volume_split_error(0.5 * (a + s), 0.5 * (b + s), a, b) == pytest.approx(0.25, abs=0.01)
    assert volume_power_ratio(3.0 * a + 7.0, a, edges) == pytest.approx([9.0] * 3, rel=1e-9)
    # a low-pass keeping exactly the first band: ratio 1 there, 0 beyond
    k = np.sqrt(np.fft.fftfreq(32)[:, None, None] ** 2 + np.fft.fftfreq(40)[None, :, None] ** 2
                + np.fft.rfftfreq(48)[None, None, :] ** 2)
    low = np.fft.irfftn(np.fft.rfftn(a) * (k < 0.1), a.shape, axes=(0, 1, 2))
    assert volume_power_ratio(low, a, edges) == pytest.approx([1.0, 0.0, 0.0], abs=1e-9)
