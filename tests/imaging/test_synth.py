"""Synthetic micrographs: particle model, determinism, and the noise statistics of the written files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError
from cryodeploy.imaging.synth import (
    SUBDIRS,
    SynthConfig,
    _paint_particles,
    _particle_centres,
    _side_view,
    _top_view,
    _transfer,
    render_clean,
    synth_micrographs,
)
from cryodeploy.io.mrc import read_micrograph


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _local_maxima(profile: np.ndarray) -> int:
    inner = profile[1:-1]
    return int(np.sum((inner > profile[:-2]) & (inner >= profile[2:])))


def test_config_validation() -> None:
    assert SynthConfig(count=2, size=(64, 96)).size == (64, 96)
    for bad in (
        {"count": 0},
        {"size": (16, 64)},
        {"size": (64,)},
        {"seed": -1},
        {"dose": -1.0},
        {"sigma": -0.1},
        {"voxel_size": 0.0},
        {"dose": float("nan")},
    ):
        with pytest.raises(ConfigError):
            SynthConfig(**{"count": 1, **bad})  # type: ignore[arg-type]


def test_side_view_has_four_stripes_and_top_view_seven_lobes() -> None:
    u = np.linspace(-80, 80, 641, dtype=np.float32)
    side = _side_view(u, np.zeros_like(u), 57.0, 150.0)
    assert _local_maxima(side) == 4  # four rings along the barrel
    assert side[np.abs(u) > 76].max() == 0.0  # 150 A long
    across = _side_view(
        np.full(201, 18.75, np.float32), np.linspace(-70, 70, 201, dtype=np.float32), 57.0, 150.0
    )
    assert np.count_nonzero(across) * 0.7 == pytest.approx(114.0, abs=2.0)  # 114 A wide
    theta = np.linspace(0, 2 * np.pi, 720, endpoint=False, dtype=np.float32)
    ring = _top_view(0.62 * 57.0 * np.cos(theta), 0.62 * 57.0 * np.sin(theta), 57.0, 150.0)
    assert _local_maxima(np.r_[ring[-1:], ring, ring[:1]]) == 7  # a 7-fold ring (periodic)
    assert _top_view(np.zeros(1, np.float32), np.zeros(1, np.float32), 57.0, 150.0)[0] == 0.0  # the pore


def test_particles_are_dense_and_do_not_overlap() -> None:
    spacing = 1.3 * 150.0
    ys, xs = _particle_centres(np.random.default_rng(0), (4096, 4096), spacing, None)
    d = np.hypot(ys[:, None] - ys[None], xs[:, None] - xs[None])
    np.fill_diagonal(d, np.inf)
    assert ys.size > 150
    assert d.min() >= 150.0  # centres at least one particle length apart
    density = np.zeros((512, 512), np.float32)
    _paint_particles(np.random.default_rng(1), density, 1.0, None)
    assert 0.15 < np.mean(density > 0) < 0.7
    assert 60.0 < density.max() < 130.0  # projected thickness of a 114-150 A barrel


def test_ctf_oscillates_and_no_ctf_is_a_low_pass() -> None:
    ctf = _transfer(np.random.default_rng(0), (256, 256), 1.0, ctf=True)
    plain = _transfer(np.random.default_rng(0), (256, 256), 1.0, ctf=False)
    assert ctf.min() < -0.3 and ctf.max() > 0.3
    assert plain.min() > 0.0 and plain[0, 0] == 1.0


@pytest.mark.parametrize(("carbon", "ctf"), [(True, True), (False, False), (True, False)])
def test_render_clean_is_a_unit_range_image(carbon: bool, ctf: bool) -> None:
    cfg = SynthConfig(count=1, size=(200, 300), carbon=carbon, ctf=ctf, voxel_size=2.0)
    img = render_clean(np.random.default_rng(3), (200, 300), cfg)
    assert img.dtype == np.float32 and img.shape == (200, 300)
    assert img.min() >= 0.0 and img.max() <= 1.0
    assert 0.3 < float(img.mean()) < 0.8 and float(img.std()) > 0.01
    np.testing.assert_array_equal(img, render_clean(np.random.default_rng(3), (200, 300), cfg))
    assert not np.array_equal(img, render_clean(np.random.default_rng(4), (200, 300), cfg))


def test_synth_is_deterministic_per_seed_and_index(tmp_path: Path) -> None:
    cfg = SynthConfig(count=2, size=(64, 80), seed=11, voxel_size=3.0)
    paths = synth_micrographs(tmp_path / "a", cfg)
    synth_micrographs(tmp_path / "b", cfg)
    synth_micrographs(tmp_path / "c", SynthConfig(count=1, size=(64, 80), seed=11, voxel_size=3.0))
    synth_micrographs(tmp_path / "d", SynthConfig(count=1, size=(64, 80), seed=12, voxel_size=3.0))

    a = _files(tmp_path / "a")
    assert paths == [tmp_path / "a" / "noisy" / f"synth_000{i}.mrc" for i in range(2)]
    assert sorted(a) == sorted(["synth.json"] + [f"{s}/synth_000{i}.mrc" for s in SUBDIRS for i in range(2)])
    assert _files(tmp_path / "b") == a  # byte-identical rerun
    c = _files(tmp_path / "c")
    assert all(c[k] == a[k] for k in c if k.endswith(".mrc"))  # micrograph 0 does not depend on count
    d = _files(tmp_path / "d")
    assert all(d[k] != a[k] for k in d if k.endswith(".mrc"))  # another seed, other images
    assert a["clean/synth_0000.mrc"] != a["clean/synth_0001.mrc"]
    record = json.loads(a["synth.json"])
    assert record["config"]["seed"] == 11 and record["noise"] == {
        "kind": "poisson-gaussian",
        "dose": 20.0,
        "sigma": 0.05,
        "dose_range": None,
    }


@pytest.mark.parametrize(("dose", "sigma"), [(20.0, 0.05), (5.0, 0.1)])
def test_noisy_files_follow_the_noise_model(tmp_path: Path, dose: float, sigma: float) -> None:
    cfg = SynthConfig(count=2, size=(256, 256), seed=3, dose=dose, sigma=sigma, voxel_size=1.5)
    synth_micrographs(tmp_path, cfg)
    clean, noisy, noisy2 = (
        np.concatenate([read_micrograph(tmp_path / sub / f"synth_000{i}.mrc").data.ravel() for i in range(2)])
        for sub in SUBDIRS
    )
    header = read_micrograph(tmp_path / "noisy" / "synth_0000.mrc").header
    assert header.voxel_size == pytest.approx((1.5, 1.5, 1.5)) and header.mode == 2
    r1, r2 = (noisy - clean).astype(np.float64), (noisy2 - clean).astype(np.float64)

    # Per bin of clean intensity, the residual's mean is 0 and its variance mean(clean)/dose + sigma^2,
    # within 4 standard errors (at most 0.01 and 10 % here, for bins of >= 8000 pixels at dose 20).
    which = np.digitize(clean, np.arange(0.0, 1.0001, 0.05))
    checked = 0
    for b in np.unique(which):
        sel = which == b
        n = int(sel.sum())
        if n < 8000:
            continue
        x = float(clean[sel].mean())
        expected_var = x / dose + sigma**2
        kurtosis = x / dose**3 / expected_var**2  # the Poisson term's excess kurtosis
        for r in (r1, r2):
            assert float(r[sel].mean()) == pytest.approx(0.0, abs=4 * np.sqrt(expected_var / n))
            assert float(r[sel].var()) == pytest.approx(expected_var, rel=4 * np.sqrt((2 + kurtosis) / n))
        checked += n
    assert checked > 0.8 * clean.size  # most pixels were in a tested bin
    corr = float(np.corrcoef(r1, r2)[0, 1])
    assert abs(corr) < 4 / np.sqrt(clean.size)  # the two draws are independent


def test_cli_synth(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "syn"
    res = runner.invoke(
        cli,
        [
            "synth",
            str(out),
            "--count",
            "2",
            "--size",
            "48",
            "64",
            "--seed",
            "4",
            "--dose",
            "10",
            "--sigma",
            "0.02",
            "--voxel-size",
            "2.5",
            "--no-carbon",
            "--no-ctf",
            "-q",
        ],
    )
    assert res.exit_code == 0, res.output
    assert res.output == ""
    mic = read_micrograph(out / "noisy2" / "synth_0001.mrc")
    assert mic.data.shape == (48, 64) and mic.header.voxel_size == pytest.approx((2.5, 2.5, 2.5))
    record = json.loads((out / "synth.json").read_text())
    assert record["config"] | {"size": None} == {
        "count": 2,
        "size": None,
        "seed": 4,
        "dose": 10.0,
        "sigma": 0.02,
        "voxel_size": 2.5,
        "carbon": False,
        "ctf": False,
    }

    res = runner.invoke(cli, ["synth", str(tmp_path / "x"), "--size", "16", "16"])
    assert res.exit_code == 2 and "16 is not in the range x>=32" in res.output
    assert not (tmp_path / "x").exists()
    res = runner.invoke(cli, ["synth", "--help"])
    assert res.exit_code == 0 and "--no-carbon" in res.output
