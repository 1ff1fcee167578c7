"""`cryodeploy evaluate --volumes` on real MRC tomograms written by `cryodeploy synth --volume`
(32 x 64 x 64 voxels of 10 A, fixed seeds): even/odd halves from folders, a STAR file or names,
thinned integer counts, exact clean volumes, other tools' outputs through --compare, refusals."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import mrcfile
import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.evaluation.volsplit import orthogonal_views
from cryodeploy.imaging import metrics as M
from cryodeploy.imaging.volsplits import fsc
from cryodeploy.io.mrc import MicrographHeader, write_micrograph
from cryodeploy.io.volumes import read_volume, write_volume

NAMES = ("tomo_0000", "tomo_0001")


def _cli(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, list(args))
    return res.exit_code, res.output


def _eval(*args: str) -> tuple[int, str]:
    return _cli("evaluate", "--backend", "torch", "--device", "cpu", "-q", *args)


def _synth(out: Path, *extra: str) -> Path:
    code, text = _cli("synth", str(out), "--volume", "--size", "64", "64", "--depth", "32", "-q", *extra)
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def tomos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two synthetic tomograms (missing wedge +-60, CTF, dose 40 per half, seed 0)."""
    return _synth(tmp_path_factory.mktemp("tomos") / "syn", "--count", "2", "--seed", "0")


@pytest.fixture(scope="module")
def run(tomos: Path, unet3d_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Even/odd folders with clean volumes, the halves written, and an 'oracle' compared: the clean
    volume given as its output on both halves and the whole input. (report folder, halves folder)."""
    tmp = tmp_path_factory.mktemp("run")
    (tmp / "oracle").mkdir()
    for n in NAMES:
        for suffix in ("A", "B", "full"):
            shutil.copy(tomos / "clean" / f"{n}.mrc", tmp / "oracle" / f"{n}_{suffix}.mrc")
    code, out = _eval(
        "--model",
        str(unet3d_checkpoint),
        "--volumes",
        "--half-pairs",
        str(tomos / "even"),
        str(tomos / "odd"),
        "--clean",
        str(tomos / "clean"),
        "--write-halves",
        str(tmp / "halves"),
        "--compare",
        f"oracle={tmp / 'oracle'}",
        "-o",
        str(tmp / "rep"),
    )
    assert code == 0, out
    return tmp / "rep", tmp / "halves"


def _halves(tomos: Path, n: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return tuple(read_volume(tomos / sub / f"{n}.mrc").data for sub in ("even", "odd", "clean"))  # type: ignore


def test_identity_zero_gaussian_beats_it_fsc_and_psnr_match_the_files(
    run: tuple[Path, Path], tomos: Path
) -> None:
    r = json.loads((run[0] / "metrics.json").read_text())
    assert r["mode"] == "volume-split" and r["n_items"] == 2 and r["split_kinds"] == ["even/odd"]
    assert set(r["methods"]) == {"identity", "constant", "gaussian", "model", "oracle"}
    ident, gauss = r["methods"]["identity"], r["methods"]["gaussian"]
    assert [it["split_gain_db"] for it in ident["per_item"]] == [0.0, 0.0]
    assert ident["split_error"] == 1.0 and ident["change"] == 0.0 and ident["band_error"] == [1.0] * 3
    assert r["bands"]["names"] == ["> 100 A", "100-34 A", "34-20 A"] and r["frc"]["unit"] == "1/A"
    # measured: the best 3-D Gaussian (sigma 1.5 voxels) gains 15.19 dB on these halves and lifts
    # PSNR against the clean volume from 13.95 to 27.22 dB
    assert gauss["sigma"] == 1.5 and 14.5 < gauss["split_gain_db"] < 16.0
    assert all(it["split_gain_db"] > 14.0 for it in gauss["per_item"])
    assert gauss["psnr"] > ident["psnr"] + 12.0
    curves, psnrs = [], []
    for n in NAMES:
        even, odd, clean = _halves(tomos, n)
        curves.append(fsc(even, odd, 10.0))
        psnrs.append(M.psnr((0.5 * (even.astype(np.float64) + odd)).astype(np.float32), clean))
    assert [it["psnr"] for it in ident["per_item"]] == pytest.approx(psnrs, abs=1e-9)
    mean = np.mean([c.curve for c in curves], axis=0)
    assert ident["fsc_0.143"] == pytest.approx(M.frc_crossing(curves[0].freq, mean, 0.143), abs=1e-9)
    assert r["frc"]["curves"]["identity"] == pytest.approx(mean.tolist(), abs=1e-12)
    assert 20.0 < ident["fsc_0.143"] < ident["fsc_half_bit"] < 100.0  # A, Nyquist 20 A
    # the oracle's halves are one volume: FSC exactly 1, never crossing; its split error is the
    # estimate's noise around 0, far below the Gaussian's
    oracle = r["methods"]["oracle"]
    assert np.allclose(r["frc"]["curves"]["oracle"], 1.0, atol=1e-12) and oracle["fsc_0.143"] is None
    assert abs(oracle["split_error"]) < 0.01 < gauss["split_error"] and oracle["psnr"] is None  # inf
    assert [f["check"] for f in r["red_flags"] if f["method"] == "oracle"] == []


def test_halves_folder_holds_the_halves_and_the_report_the_views(run: tuple[Path, Path], tomos: Path) -> None:
    rep, halves = run
    even, odd, _ = _halves(tomos, NAMES[1])
    got = [read_volume(halves / f"{NAMES[1]}_{s}.mrc") for s in ("A", "B", "full")]
    assert np.array_equal(got[0].data, even) and np.array_equal(got[1].data, odd)
    assert np.array_equal(got[2].data, (0.5 * (even.astype(np.float64) + odd)).astype(np.float32))
    assert got[0].header.voxel_size == (10.0, 10.0, 10.0)
    page = (rep / "index.html").read_text()
    srcs = set(re.findall(r'<img[^>]*src="([^"]+)"', page))
    assert {
        "crop_identity.png",
        "crop_gaussian.png",
        "crop_model.png",
        "crop_oracle.png",
        "crop_clean.png",
        "frc.png",
        "bands.png",
        "gaussian_sigma.png",
        "hexbin.png",
    } <= srcs
    assert all((rep / s).is_file() for s in srcs)
    assert 'id="tomograms-table"' in page and "resolution at FSC half-bit (A)" in page
    assert "Central sections" in page and "central XY section (z = 16)" in page
    # one contrast for every method: the 0.5-99.5th percentiles of the clean views map to black and white
    from matplotlib.image import imread

    even, odd, clean = _halves(tomos, NAMES[0])
    lo, hi = np.nanpercentile(orthogonal_views(clean), [0.5, 99.5])
    for label, vol in (
        ("clean", clean),
        ("identity", (0.5 * (even.astype(np.float64) + odd)).astype(np.float32)),
    ):
        png = imread(rep / f"crop_{label}.png")
        view = orthogonal_views(vol)
        assert (
            png.shape[:2] == view.shape == (64 + 2 + 32, 64 + 2 + 32) and png[70, 70, 3] == 0.0
        )  # gap: clear
        shown = np.isfinite(view)
        assert np.abs(png[..., 0][shown] - np.clip((view[shown] - lo) / (hi - lo), 0, 1)).max() < 2 / 255


def test_orthogonal_views_places_the_central_sections() -> None:
    v = np.arange(16 * 8 * 12, dtype=np.float32).reshape(16, 8, 12)
    out = orthogonal_views(v)
    assert out.shape == (8 + 2 + 16, 12 + 2 + 16)
    assert np.array_equal(out[:8, :12], v[8]) and np.array_equal(out[:8, 14:], v[:, :, 6].T)
    assert (
        np.array_equal(out[10:, :12], v[:, 4, :])
        and np.isnan(out[8:10]).all()
        and np.isnan(out[10:, 12:]).all()
    )


def test_star_and_name_pairs_find_the_same_halves(
    run: tuple[Path, Path], tomos: Path, unet3d_checkpoint: Path, tmp_path: Path
) -> None:
    ref = json.loads((run[0] / "metrics.json").read_text())["methods"]["identity"]["per_item"]
    code, out = _eval(
        "--model",
        str(unet3d_checkpoint),
        "--volumes",
        str(tomos / "tomograms.star"),
        "--clean",
        str(tomos / "clean"),
        "-o",
        str(tmp_path / "star"),
    )
    assert code == 0, out
    star = json.loads((tmp_path / "star" / "metrics.json").read_text())
    assert star["methods"]["identity"]["per_item"] == ref  # the STAR's half columns: the same files
    (tmp_path / "named").mkdir()
    (tmp_path / "clean").mkdir()
    shutil.copy(tomos / "even" / "tomo_0001.mrc", tmp_path / "named" / "t1_even.mrc")
    shutil.copy(tomos / "odd" / "tomo_0001.mrc", tmp_path / "named" / "t1_odd.mrc")
    shutil.copy(tomos / "clean" / "tomo_0001.mrc", tmp_path / "clean" / "t1.mrc")
    code, out = _eval(
        "--model",
        str(unet3d_checkpoint),
        "--volumes",
        "--even-odd",
        str(tmp_path / "named"),
        "--clean",
        str(tmp_path / "clean"),
        "-o",
        str(tmp_path / "rep"),
    )
    assert code == 0, out
    named = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    (item,) = named["methods"]["identity"]["per_item"]
    assert (
        item["name"] == "t1" and item["psnr"] == ref[1]["psnr"] and item["fsc_0.143"] == ref[1]["fsc_0.143"]
    )


def test_thinning_integer_counts(unet3d_checkpoint: Path, tmp_path: Path) -> None:
    counts = _synth(tmp_path / "counts", "--seed", "1", "--tilt-range", "90")  # no wedge: integer counts
    args = (
        "--model",
        str(unet3d_checkpoint),
        "--volumes",
        str(counts / "even"),
        "--clean",
        str(counts / "clean"),
        "--write-halves",
        str(tmp_path / "h"),
    )
    code, out = _eval(*args, "-o", str(tmp_path / "rep"))
    assert code == 0, out
    r = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert r["split_kinds"] == ["thinned (integer counts)"]
    assert r["methods"]["identity"]["split_gain_db"] == 0.0
    # measured: 17.76 dB for the best Gaussian (sigma 3 voxels) on the thinned halves of dose-40 counts
    assert (
        r["methods"]["gaussian"]["sigma"] == 3.0 and 17.0 < r["methods"]["gaussian"]["split_gain_db"] < 18.5
    )
    a, b, full = (read_volume(tmp_path / "h" / f"tomo_0000_{s}.mrc").data for s in ("A", "B", "full"))
    assert (
        np.array_equal(a + b, full) and np.array_equal(a, np.round(a)) and 0.45 < a.sum() / full.sum() < 0.55
    )
    assert np.array_equal(full, read_volume(counts / "even" / "tomo_0000.mrc").data)
    code, out = _eval(*args, "-o", str(tmp_path / "again"))  # the same seed: the same halves
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert code == 0 and again["methods"]["gaussian"]["per_item"] == r["methods"]["gaussian"]["per_item"]


def test_refusals(tomos: Path, unet3d_checkpoint: Path, cnn3_checkpoint: Path, tmp_path: Path) -> None:
    model = ("--model", str(unet3d_checkpoint))
    (tmp_path / "e").mkdir()
    (tmp_path / "o").mkdir()
    vol = read_volume(tomos / "even" / "tomo_0000.mrc")
    write_volume(tmp_path / "e" / "t.mrc", vol.data)
    write_volume(tmp_path / "o" / "t.mrc", vol.data[:, :, :48])
    code, out = _eval(
        *model,
        "--volumes",
        "--half-pairs",
        str(tmp_path / "e"),
        str(tmp_path / "o"),
        "-o",
        str(tmp_path / "rep"),
    )
    assert code == 1 and re.search(
        r"error: \S+/o/t\.mrc: found shape \(32, 64, 48\), expected \(32, 64, 64\) "
        r"as its even half \S+/e/t\.mrc",
        out,
    ), out
    assert not (tmp_path / "rep").exists()  # no partial output
    (tmp_path / "mics").mkdir()
    image = np.random.default_rng(0).poisson(20.0, (64, 64)).astype(np.float32)
    write_micrograph(
        tmp_path / "mics" / "m.mrc", image, MicrographHeader(image.shape, 2, (1.0,) * 3, (0.0,) * 3)
    )
    code, out = _eval(*model, "--volumes", str(tmp_path / "mics"), "-o", str(tmp_path / "rep"))
    assert code == 1 and "m.mrc: found a 2-D image (64x64), expected a 3-D volume" in out, out
    code, out = _eval(
        "--model",
        str(cnn3_checkpoint),
        "--volumes",
        str(tomos / "tomograms.star"),
        "-o",
        str(tmp_path / "rep"),
    )
    assert code == 2 and "a 2-D image model (cnn3) cannot denoise tomograms, expected a volume model" in out
    code, out = _eval(*model, "--split", "auto", str(tmp_path / "mics"), "-o", str(tmp_path / "rep"))
    assert code == 2 and "a volume model (unet3d) denoises tomograms, expected volume data (--volumes)" in out
    code, out = _eval(*model, "--volumes", str(tomos / "even"), "-o", str(tmp_path / "rep"))
    assert code == 1 and re.search(
        r"tomo_0000\.mrc: found \d+ non-integer voxels \(gain 1\), expected integer "
        "counts >= 0 to thin; a reconstruction is not counts",
        out,
    ), out
    code, out = _eval(
        *model, "--volumes", "--split", "thin", str(tomos / "tomograms.star"), "-o", str(tmp_path / "rep")
    )
    assert code == 2 and "split thin takes single tomograms, but 'tomo_0000' has even/odd halves" in out
    code, out = _eval(
        *model, "--volumes", "--split", "diagonal", str(tomos / "even"), "-o", str(tmp_path / "rep")
    )
    assert code == 2 and "--split diagonal is for micrographs" in out
    code, out = _eval(
        *model,
        "--volumes",
        "--half-pairs",
        str(tomos / "even"),
        str(tomos / "odd"),
        "--compare",
        f"other={tmp_path / 'e'}",
        "-o",
        str(tmp_path / "rep"),
    )
    assert (
        code == 1 and "found no other output for 6 of 6 halves of tomograms (first: tomo_0000_A.mrc)" in out
    )
    assert not (tmp_path / "rep").exists()
    with mrcfile.open(tomos / "even" / "tomo_0000.mrc") as m:  # inputs untouched
        assert np.array_equal(m.data, vol.data)
