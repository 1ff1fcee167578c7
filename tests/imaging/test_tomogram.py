"""Synthetic tomograms: determinism, the missing wedge, the noise model and its even/odd independence."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryodeploy.errors import ConfigError
from cryodeploy.imaging.simulate.tomogram import missing_wedge_mask, simulate_tomogram
from cryodeploy.imaging.simulate.tomoscene import TomoConfig, plan_scene
from cryodeploy.imaging.tomosynth import synth_tomograms
from cryodeploy.imaging.volsplits import thin_volume
from cryodeploy.io.tomopairs import read_star_tomograms
from cryodeploy.io.volumes import read_volume

SMALL = TomoConfig(shape=(32, 64, 64), particles=12, seed=5)


@pytest.fixture(scope="module")
def tomo():
    return simulate_tomogram(SMALL, 0)


def test_same_seed_same_volumes_and_index_independent_of_count(tomo) -> None:
    again = simulate_tomogram(SMALL, 0)
    for name in ("clean", "even", "odd"):
        assert torch.equal(getattr(tomo, name), getattr(again, name))
    other = simulate_tomogram(SMALL, 1)
    assert not torch.equal(other.clean, tomo.clean)
    assert plan_scene(SMALL, 3).meta == plan_scene(SMALL, 3).meta
    assert len(tomo.meta["particles"]) == 12 and len(tomo.meta["membranes"]) == 3  # 2 vesicles, 1 sheet
    assert tomo.meta["clipped_voxels"] == 0  # clean is the exact expectation, never clipped
    assert len(tomo.meta["tilts_deg"]) == 41 and tomo.meta["tilts_deg"][0] == -60.0


def test_missing_wedge_is_zero_in_fourier_space_to_float_precision(tomo) -> None:
    mask = missing_wedge_mask(SMALL.shape, 60.0)
    assert not mask.all() and mask.any()
    measured = mask.clone()
    measured[0, 0, 0] = False  # DC
    for name in ("clean", "even", "odd"):
        v = getattr(tomo, name).double()
        f = torch.fft.rfftn(v).abs()
        # float32 storage rounds each voxel by <= |v|max 2^-24: a Fourier amplitude of ~sqrt(N) times that
        floor = float(v.abs().max()) * 2.0**-24 * math.sqrt(v.numel())
        assert float(f[~mask].max()) < 10 * floor
        assert float(f[measured].median()) > 1000 * floor
    # the geometry: kept within 60 degrees of the X axis in the X-Z plane
    kz, kx = np.fft.fftfreq(32), np.fft.rfftfreq(64)
    iz, ix = 4, 4  # kz = 1/8, kx = 1/16: 63.4 degrees from X: missing
    assert math.degrees(math.atan2(kz[iz], kx[ix])) > 60 and not bool(mask[iz, 0, ix])
    iz, ix = 2, 8  # 26.6 degrees: kept
    assert bool(mask[iz, 0, ix]) and bool(mask[0, 5, 0]) and not bool(mask[1, 0, 0])


def test_even_odd_noise_is_independent_with_the_derived_variance(tomo) -> None:
    """The noise is W(Poisson - rate), W a projector onto m of the N real degrees of freedom:
    its variance per voxel is about (m / N) * mean rate, and the correlation of two independent
    draws has standard deviation 1 / sqrt(m)."""
    mask = missing_wedge_mask(SMALL.shape, 60.0)
    n = SMALL.shape[0] * SMALL.shape[1] * SMALL.shape[2]
    m = n * float(tomo.meta["measured_fourier_fraction"])  # the rfft half-space fraction ~ the full one
    assert float(mask.float().mean()) == pytest.approx(m / n)
    a = (tomo.even - tomo.clean).double().flatten()
    b = (tomo.odd - tomo.clean).double().flatten()
    r = float(a @ b / (a.norm() * b.norm()))
    assert abs(r) < 5.0 / math.sqrt(m)
    expected_var = m / n * float(tomo.clean.double().mean())
    assert float(a.var()) == pytest.approx(expected_var, rel=0.05)
    assert float(b.var()) == pytest.approx(expected_var, rel=0.05)
    assert abs(float(a.mean())) < 5 * math.sqrt(expected_var / m)  # E[even] = clean


def test_without_wedge_the_halves_are_counts_and_thin_exactly() -> None:
    cfg = TomoConfig(shape=(16, 32, 32), particles=3, tilt_range_deg=90.0, ctf=False, dose=5.0)
    t = simulate_tomogram(cfg, 0)
    even = t.even.numpy()
    assert np.array_equal(even, np.round(even)) and even.min() >= 0
    a, b = thin_volume(even, np.random.default_rng(0))
    assert np.array_equal(a + b, even)
    assert float(a.mean()) == pytest.approx(0.5 * float(even.mean()), rel=0.01)


def test_ctf_changes_the_transfer_not_the_scene() -> None:
    base = TomoConfig(shape=(16, 32, 32), particles=4)
    with_ctf, without = (
        simulate_tomogram(base, 0),
        simulate_tomogram(TomoConfig(**{**base.to_dict(), "ctf": False, "shape": (16, 32, 32)}), 0),
    )
    assert with_ctf.meta["particles"] == without.meta["particles"]
    assert not torch.allclose(with_ctf.clean, without.clean)
    # without a CTF, protein and membranes are dark: the clean volume never exceeds the ice-free level
    assert float(without.clean.max()) <= base.dose * 1.0001


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"TomoConfig.shape: found \(4, 64, 64\), expected \(nz, ny, nx\)"):
        TomoConfig(shape=(4, 64, 64))
    with pytest.raises(ConfigError, match=r"TomoConfig.tilt_range_deg: found 95"):
        TomoConfig(tilt_range_deg=95)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_runs_the_same_model() -> None:
    cpu, gpu = simulate_tomogram(SMALL, 0), simulate_tomogram(SMALL, 0, "cuda")
    assert torch.allclose(cpu.clean, gpu.clean.cpu(), rtol=1e-4, atol=1e-3)


def test_synth_tomograms_writes_clean_even_odd_and_a_star_byte_identically(tmp_path: Path) -> None:
    cfg = TomoConfig(shape=(16, 32, 48), particles=3, seed=2, voxel_size=7.5)
    evens = synth_tomograms(tmp_path / "a", cfg, count=2)
    synth_tomograms(tmp_path / "b", cfg, count=2)
    assert [p.name for p in evens] == ["tomo_0000.mrc", "tomo_0001.mrc"]
    for sub in ("clean", "even", "odd"):
        for name in ("tomo_0000.mrc", "tomo_0001.mrc"):
            assert (tmp_path / "a" / sub / name).read_bytes() == (tmp_path / "b" / sub / name).read_bytes()
    assert (tmp_path / "a" / "tomograms.star").read_bytes() == (
        tmp_path / "b" / "tomograms.star"
    ).read_bytes()
    vol = read_volume(tmp_path / "a" / "even" / "tomo_0001.mrc")
    assert vol.header.voxel_size == (7.5, 7.5, 7.5) and vol.header.shape == (16, 32, 48)
    direct = simulate_tomogram(cfg, 1)
    assert np.array_equal(vol.data, direct.even.numpy())
    pairs = read_star_tomograms(tmp_path / "a" / "tomograms.star")
    assert [(p.name, p.even, p.odd) for p in pairs][1] == (
        "tomo_0001",
        tmp_path / "a" / "even" / "tomo_0001.mrc",
        tmp_path / "a" / "odd" / "tomo_0001.mrc",
    )
    record = json.loads((tmp_path / "a" / "synth.json").read_text())
    assert record["config"]["voxel_size"] == 7.5 and len(record["tomograms"]) == 2
