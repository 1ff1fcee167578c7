"""The micrograph simulator: optics helpers, config validation, determinism, noise statistics,
contrast, empty fields and the real-map path."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cryodeploy.errors import ConfigError, InputError
from cryodeploy.imaging.simulate import (
    KINDS,
    SimConfig,
    ctf_2d,
    electron_wavelength,
    interaction_constant,
    model_from_map,
    procedural_model,
    simulate,
)
from cryodeploy.imaging.simulate.specimen import _scatter

# Small fields keep the file fast; no carbon/contamination unless a test asks for them.
PLAIN = SimConfig(shape=(128, 128), p_carbon=0.0, p_contamination=0.0, p_gain=0.0, p_interpolated=0.0)


def _map_path() -> Path:
    """EMD-3197.map from the shared data folder (searched upwards from this file), else skip."""
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / "EMD-3197.map"
        if candidate.is_file():
            return candidate
    pytest.skip("shared/data/EMD-3197.map not present")


def _neighbour_corr(r: torch.Tensor, dim: int) -> np.ndarray:
    """Per-image correlation of each pixel with its neighbour along ``dim`` (1: rows, 2: columns)."""
    x = r - r.mean(dim=(1, 2), keepdim=True)
    n = x.shape[dim]
    u, v = x.narrow(dim, 0, n - 1), x.narrow(dim, 1, n - 1)
    return ((u * v).mean(dim=(1, 2)) / (u.std(dim=(1, 2)) * v.std(dim=(1, 2)))).numpy()


def _zero_crossings(profile: np.ndarray, step: float) -> np.ndarray:
    """Positions (in units of ``step``) where ``profile`` changes sign, linearly interpolated."""
    i = np.nonzero(np.sign(profile[:-1]) * np.sign(profile[1:]) < 0)[0]
    return (i + profile[i] / (profile[i] - profile[i + 1])) * step


def _analytic_zeros(lam: float, df: float, cs: float, w: float, s_max: float) -> np.ndarray:
    """Frequencies (1/A) where chi(s) + asin(w) = n pi, chi = pi lam df s^2 - pi/2 cs lam^3 s^4."""
    out = []
    for n in range(1, 10000):
        c = n * math.pi - math.asin(w)
        a, b = 0.5 * math.pi * cs * lam**3, math.pi * lam * df
        disc = b * b - 4 * a * c
        if disc < 0:
            break
        s = math.sqrt((b - math.sqrt(disc)) / (2 * a))
        if s > s_max:
            break
        out.append(s)
    return np.array(out)


def test_electron_wavelength_and_interaction_constant() -> None:
    assert electron_wavelength(300) == pytest.approx(0.0197, abs=1e-4)
    assert electron_wavelength(200) == pytest.approx(0.0251, abs=1e-4)
    assert electron_wavelength(300) == pytest.approx(0.019687, abs=2e-6)  # relativistic, not 0.0224
    assert interaction_constant(300) == pytest.approx(6.526e-4, rel=5e-3)
    assert interaction_constant(200) == pytest.approx(7.288e-4, rel=5e-3)
    with pytest.raises(ConfigError):
        electron_wavelength(-1)


def test_ctf_zeros_match_the_analytic_formula() -> None:
    px, df_um, cs_mm, w = 1.0, 1.8, 2.7, 0.07
    ctf = ctf_2d((4, 4096), px, 300, df_um, df_um, 30.0, cs_mm, w, 0.0).numpy()
    assert ctf.shape == (4, 4096)
    assert ctf[0, 0] == pytest.approx(-w)  # amplitude contrast at s = 0
    step = 1.0 / (4096 * px)
    found = _zero_crossings(ctf[0, : 2048 + 1], step)  # along +x up to Nyquist
    expected = _analytic_zeros(electron_wavelength(300), df_um * 1e4, cs_mm * 1e7, w, 0.5 / px)
    assert len(expected) > 20
    assert len(found) == len(expected)
    np.testing.assert_allclose(found, expected, atol=0.5 * step)
    # Not astigmatic: the same along y, along a diagonal radius, and B only damps.
    np.testing.assert_allclose(
        ctf_2d((4096, 4), px, 300, df_um, df_um, 30.0, cs_mm, w, 0.0).numpy()[:, 0], ctf[0], atol=1e-9
    )
    damped = ctf_2d((4, 4096), px, 300, df_um, df_um, 30.0, cs_mm, w, 100.0).numpy()[0]
    s = np.fft.fftfreq(4096, px)
    np.testing.assert_allclose(damped, ctf[0] * np.exp(-25.0 * s * s), atol=1e-9)


def test_ctf_is_astigmatic_when_defocus_u_differs_from_v() -> None:
    px, du, dv, w = 1.0, 2.4, 1.4, 0.1
    lam = electron_wavelength(200)
    for angle, along_x, along_y in ((0.0, du, dv), (90.0, dv, du)):
        ctf = ctf_2d((1024, 1024), px, 200, du, dv, angle, 2.7, w, 0.0).numpy()
        step = 1.0 / 1024
        zx = _zero_crossings(ctf[0, :513], step)[:3]
        zy = _zero_crossings(ctf[:513, 0], step)[:3]
        np.testing.assert_allclose(
            zx, _analytic_zeros(lam, along_x * 1e4, 2.7e7, w, 0.5)[:3], atol=0.6 * step
        )
        np.testing.assert_allclose(
            zy, _analytic_zeros(lam, along_y * 1e4, 2.7e7, w, 0.5)[:3], atol=0.6 * step
        )
        assert np.abs(ctf - ctf.T).max() > 0.5
    round_ctf = ctf_2d((256, 256), px, 200, 2.0, 2.0, 17.0, 2.7, w, 0.0).numpy()
    np.testing.assert_allclose(round_ctf, round_ctf.T, atol=1e-12)


def test_config_validation_and_round_trip() -> None:
    cfg = SimConfig(shape=(64, 96), dose_e_per_px=[10, 20])  # type: ignore[arg-type]
    assert cfg.dose_e_per_px == (10.0, 20.0)
    again = SimConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    for bad, field in (
        ({"pixel_size_a": (2.0, 1.0)}, "pixel_size_a"),
        ({"dose_e_per_px": (0.0, 10.0)}, "dose_e_per_px"),
        ({"defocus_um": (1.0,)}, "defocus_um"),
        ({"amplitude_contrast": (0.1, float("nan"))}, "amplitude_contrast"),
        ({"p_carbon": 1.5}, "p_carbon"),
        ({"shape": (8, 64)}, "shape"),
        ({"voltages_kv": ()}, "voltages_kv"),
        ({"library_size": 0}, "library_size"),
    ):
        with pytest.raises(ConfigError, match=f"SimConfig.{field}: found .*, expected"):
            SimConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"unknown field.*dose_per_px"):
        SimConfig.from_dict({"dose_per_px": [5, 80]})
    with pytest.raises(ConfigError, match="expected a JSON object"):
        SimConfig.from_dict([("shape", (64, 64))])
    with pytest.raises(ConfigError):
        simulate(PLAIN, 0, 1)


def test_determinism_and_image_i_independent_of_batch_size() -> None:
    cfg = dataclasses.replace(PLAIN, p_interpolated=0.5, p_gain=0.5, p_filament=0.5, p_carbon=0.3)
    a = simulate(cfg, 5, 42)
    b = simulate(cfg, 5, 42)
    c = simulate(cfg, 2, 42)
    d = simulate(cfg, 5, 43)
    assert a.noisy.shape == a.clean.shape == (5, 128, 128)
    assert a.noisy.dtype == a.clean.dtype == torch.float32
    assert torch.equal(a.noisy, b.noisy) and torch.equal(a.clean, b.clean)
    assert a.meta == b.meta
    assert torch.equal(a.noisy[:2], c.noisy) and torch.equal(a.clean[:2], c.clean)
    assert a.meta[:2] == c.meta
    assert not torch.equal(a.clean, d.clean) and not torch.equal(a.noisy, d.noisy)
    assert not torch.equal(a.clean[0], a.clean[1])
    json.dumps(a.meta)  # JSON-ready


def test_noisy_is_poisson_around_clean() -> None:
    batch = simulate(PLAIN, 8, 7, pairs=True)
    noisy, clean, noisy2 = batch.noisy, batch.clean, batch.noisy2
    assert noisy2 is not None
    assert torch.equal(noisy, noisy.round()) and float(noisy.min()) >= 0  # counts
    n = noisy.numel()
    z = (noisy - clean) / clean.sqrt()
    assert abs(float(z.mean())) < 4.0 / math.sqrt(n)  # E[noisy] = clean
    assert float((z * z).mean()) == pytest.approx(1.0, abs=6.0 * math.sqrt(2.2 / n))  # var = clean
    # Unbiased everywhere, not just on average: residuals do not follow the clean image's structure.
    c = clean - clean.mean(dim=(1, 2), keepdim=True)
    corr = float((c * z).mean() / (c.std() * z.std()))
    assert abs(corr) < 4.0 / math.sqrt(n)
    # The second draw is independent, with the same expectation.
    z2 = (noisy2 - clean) / clean.sqrt()
    assert abs(float((z * z2).mean())) < 4.0 / math.sqrt(n)
    assert abs(float(z2.mean())) < 4.0 / math.sqrt(n)
    assert not torch.equal(noisy, noisy2)


def test_dose_units_mean_counts() -> None:
    batch = simulate(dataclasses.replace(PLAIN, p_empty=1.0), 6, 3)
    for m, clean in zip(batch.meta, batch.clean, strict=True):
        expected = m["dose_e_per_px"] * math.exp(-m["ice_thickness_a"] / m["ice_mean_free_path_a"])
        assert float(clean.mean()) == pytest.approx(expected, rel=0.02)
    doses = [m["dose_e_per_px"] for m in batch.meta]
    assert min(doses) >= 5.0 and max(doses) <= 80.0


def test_gain_changes_the_noise_not_the_clean_target() -> None:
    plain = simulate(PLAIN, 4, 11)
    gained = simulate(dataclasses.replace(PLAIN, p_gain=1.0), 4, 11)
    assert all(m["gain"] for m in gained.meta)
    assert torch.equal(plain.clean, gained.clean)
    assert not torch.equal(gained.noisy, gained.noisy.round())  # gain-corrected counts
    z = (gained.noisy - gained.clean) / gained.clean.sqrt()
    assert abs(float(z.mean())) < 4.0 / math.sqrt(z.numel())
    assert float((z * z).mean()) == pytest.approx(1.0, abs=0.05)  # var = clean / g, g ~ 1 +- 3 %


def test_interpolated_mode_correlates_neighbouring_noise() -> None:
    interp = simulate(dataclasses.replace(PLAIN, shape=(192, 192), p_interpolated=1.0), 6, 5)
    r = interp.noisy - interp.clean
    cx, cy = _neighbour_corr(r, 2), _neighbour_corr(r, 1)
    assert all(m["interpolated"] for m in interp.meta)
    assert np.all((cx > 0.28) & (cx < 0.52)) and np.all((cy > 0.28) & (cy < 0.52))
    np.testing.assert_allclose(cx, [m["noise_corr_x"] for m in interp.meta], atol=0.03)
    np.testing.assert_allclose(cy, [m["noise_corr_y"] for m in interp.meta], atol=0.03)
    assert abs(float((r / interp.clean.sqrt()).mean())) < 4.0 / math.sqrt(r.numel())  # still E = clean
    plain = simulate(dataclasses.replace(PLAIN, shape=(192, 192)), 6, 5)
    r0 = plain.noisy - plain.clean
    assert np.all(np.abs(_neighbour_corr(r0, 2)) < 0.02) and np.all(np.abs(_neighbour_corr(r0, 1)) < 0.02)


def test_contrast_is_a_few_percent() -> None:
    batch = simulate(SimConfig(), 24, 2)
    contrast = np.array([float(c.std() / c.mean()) for c in batch.clean])
    np.testing.assert_allclose(contrast, [m["contrast"] for m in batch.meta], rtol=1e-4)
    typical = np.array([not (m["has_carbon"] or m["has_contamination"]) for m in batch.meta])
    assert typical.sum() >= 8
    assert 0.01 <= np.median(contrast) <= 0.1
    assert np.mean((contrast[typical] >= 0.005) & (contrast[typical] <= 0.12)) >= 0.8
    # Contamination is strongly absorbing: it dominates the contrast where present.
    dirty_cfg = dataclasses.replace(
        PLAIN, p_contamination=1.0, pixel_size_a=(2.0, 2.5), contamination_diameter_a=(150, 250)
    )
    dirty = simulate(dirty_cfg, 4, 2)
    assert max(m["contrast"] for m in dirty.meta) > 0.15
    loss = [
        m["mean_counts"] / (m["dose_e_per_px"] * math.exp(-m["ice_thickness_a"] / m["ice_mean_free_path_a"]))
        for m in dirty.meta
    ]
    assert min(loss) < 0.9


def test_particles_are_dark_at_low_frequency() -> None:
    cfg = dataclasses.replace(
        PLAIN,
        p_empty=0.0,
        pixel_size_a=(2.0, 2.5),
        particle_diameter_a=(80, 150),
        coverage=(0.5, 0.8),
        defocus_um=(2.5, 3.5),
    )
    batch = simulate(cfg, 4, 9, with_potential=True)
    assert batch.potential is not None
    f = torch.fft.rfft2(batch.clean - batch.clean.mean(dim=(1, 2), keepdim=True))
    low = torch.fft.irfft2(
        f * (torch.fft.rfftfreq(128)[None, :] ** 2 + torch.fft.fftfreq(128)[:, None] ** 2 < 0.03**2),
        s=(128, 128),
    )
    for lo, pot in zip(low, batch.potential, strict=True):
        corr = np.corrcoef(lo.flatten().numpy(), pot.flatten().numpy())[0, 1]
        assert corr < -0.2


def test_empty_fields_have_no_particle_signal() -> None:
    empty = dataclasses.replace(PLAIN, p_empty=1.0, p_filament=1.0)
    batch = simulate(empty, 4, 13, with_potential=True)
    assert batch.potential is not None and float(batch.potential.abs().max()) == 0.0
    assert all(m["n_particles"] == 0 and m["n_filaments"] == 0 and m["empty_field"] for m in batch.meta)
    assert max(m["contrast"] for m in batch.meta) < 0.05  # weak water texture only
    # Without the ice's texture and gradient an empty field is flat: nothing else adds signal.
    flat = simulate(dataclasses.replace(empty, water_texture=(0.0, 0.0), ice_gradient=(0.0, 0.0)), 4, 13)
    assert max(float(c.std() / c.mean()) for c in flat.clean) < 1e-5
    # The same seeds with particles do have particle signal.
    full = simulate(dataclasses.replace(empty, p_empty=0.0), 4, 13, with_potential=True)
    assert full.potential is not None and all(float(p.abs().max()) > 0 for p in full.potential)
    # Carbon in an empty field adds its own structure (film edge, texture), still no particles.
    carbon = simulate(dataclasses.replace(empty, p_carbon=1.0), 4, 13, with_potential=True)
    assert carbon.potential is not None and float(carbon.potential.abs().max()) == 0.0
    assert all(m["has_carbon"] for m in carbon.meta)


def test_procedural_models_have_their_diameter() -> None:
    for kind in KINDS:
        m = procedural_model(kind, 150.0, seed=3, n_points=4000)
        r = np.linalg.norm(m.points, axis=1)
        assert m.points.shape == (4000, 3) and m.kind == kind
        assert r.max() == pytest.approx(75.0, rel=1e-4)
        assert 0.0 < m.volume_a3 < 4.0 / 3.0 * math.pi * 75.0**3
        assert np.abs(m.points.mean(axis=0)).max() < 1e-3
    with pytest.raises(ConfigError):
        procedural_model("cube", 100.0, 0)


def test_map_points_follow_the_density() -> None:
    data = np.zeros((16, 16, 16))
    data[3:6, 3:6, 3:6] = 1.0  # two cubes, the second three times as dense, 7 voxels apart in x
    data[3:6, 3:6, 10:13] = 3.0
    model = model_from_map(data, 2.0, threshold=0.0, mask_radius_a=100.0, n_points=20000, seed=4)
    x = model.points[:, 0]
    assert np.mean(x > x.min() + 7.0) == pytest.approx(0.75, abs=0.015)
    assert np.ptp(x) == pytest.approx(2.0 * 10.0, abs=0.2)  # 7 + 3 voxels of 2 A
    assert model.volume_a3 == pytest.approx(54 * 8.0)


def test_real_map_pseudo_atoms() -> None:
    path = _map_path()
    import mrcfile

    with mrcfile.open(path, permissive=True) as mrc:
        data = np.asarray(mrc.data, dtype=np.float64)
    model = model_from_map(path, n_points=8000, seed=1)
    assert model.kind == "map" and model.name == "map:EMD-3197" and not model.scalable
    assert model.points.shape == (8000, 3)
    # 20 voxels of 11.4 A, masked by a sphere of 9.5 voxels (217 A across); the diameter is measured
    # from the centroid, which the slab-like density moves off the box centre.
    assert 150.0 < model.diameter_a < 300.0
    thr = data.mean() + 0.5 * data.std()
    assert 0 < model.volume_a3 < np.count_nonzero(data > thr) * 11.4**3
    same = model_from_map(data, 11.4, n_points=8000, seed=1)  # the array path: the same model
    np.testing.assert_allclose(same.points, model.points, atol=1e-3)  # the header's 11.4 is float32
    assert same.volume_a3 == pytest.approx(model.volume_a3, rel=1e-6)
    with pytest.raises(ConfigError):
        model_from_map(data)  # an array needs its voxel size
    with pytest.raises(InputError):
        model_from_map(path.with_name("no-such.map"))
    cfg = dataclasses.replace(PLAIN, map_paths=(str(path),), p_real_map=1.0, coverage=(0.5, 0.8))
    batch = simulate(cfg, 3, 1, with_potential=True)
    assert batch.potential is not None
    for m in batch.meta:
        assert m["species"] and all(s == "map:EMD-3197" for s in m["species"])
        assert m["particle_kinds"] == {"map": m["n_particles"]}
    assert float(batch.potential.abs().max()) > 0


def test_exact_scatter_matches_the_float_sum() -> None:
    """The fixed-point scatter (used on CUDA for determinism) agrees with the float one, drops
    points off the grid and conserves the weight of the others."""
    g = torch.Generator().manual_seed(0)
    n, grid = 3, (40, 56)
    img = torch.randint(0, n, (5000,), generator=g)
    y = torch.rand(5000, generator=g) * 60 - 10  # some fall off the grid: they are dropped
    x = torch.rand(5000, generator=g) * 70 - 7
    w = torch.rand(5000, generator=g) * 300
    fast = _scatter(n, grid, img, y, x, w, exact=False)
    exact = _scatter(n, grid, img, y, x, w, exact=True)
    torch.testing.assert_close(exact, fast, rtol=1e-5, atol=1e-3)
    on_grid = (y >= 0) & (y <= 39) & (x >= 0) & (x <= 55)
    for i in range(n):
        assert float(exact[i].sum()) == pytest.approx(float(w[on_grid & (img == i)].sum()), rel=1e-5)
    one = _scatter(
        1,
        (8, 8),
        torch.zeros(2, dtype=torch.long),
        torch.tensor([6.25, 3.0]),
        torch.tensor([0.5, 8.5]),
        torch.tensor([1.0, 5.0]),
        exact=True,
    )[0]
    assert float(one[6, 0]) == pytest.approx(0.75 * 0.5) and float(one[7, 1]) == pytest.approx(0.25 * 0.5)
    assert float(one.sum()) == pytest.approx(1.0)
