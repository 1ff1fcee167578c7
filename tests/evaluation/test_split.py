"""`cryodeploy evaluate --split` on real MRC files: synthetic counted micrographs (known clean image),
other tools' outputs through --compare, the red flags of the old default's failures, and the
real micrographs of ../shared/data that a split must refuse or accept."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.imaging import metrics as M
from cryodeploy.io.mrc import MicrographHeader, read_micrograph, write_micrograph

DOSE = 20.0


def _write(path: Path, data: np.ndarray, voxel: float = 1.0) -> None:
    write_micrograph(path, data, MicrographHeader(data.shape, 2, (voxel,) * 3, (0.0, 0.0, 0.0)))


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """Two 512-px counted micrographs (smooth positive image x dose 20, Poisson, seed 0) and their
    expected counts."""
    from scipy import ndimage

    out = tmp_path_factory.mktemp("counted")
    (out / "mics").mkdir()
    rng = np.random.default_rng(0)
    cleans = []
    for i in range(2):
        s = ndimage.gaussian_filter(rng.standard_normal((512, 512)), 5.0)
        clean = DOSE * np.clip(1.0 + 0.3 * s / s.std(), 0.05, None)
        _write(out / "mics" / f"mic{i}.mrc", rng.poisson(clean).astype(np.float32))
        cleans.append(clean)
    return out / "mics", cleans


def _run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, ["evaluate", "--backend", "torch", "-q", *args])
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def split_run(counted: tuple[Path, list[np.ndarray]], cnn3_checkpoint: Path,
              tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One split evaluation writing its halves: (report folder, halves folder)."""
    tmp = tmp_path_factory.mktemp("split")
    code, out = _run("--model", str(cnn3_checkpoint), "--split", "auto", str(counted[0]),
                     "--write-halves", str(tmp / "halves"), "-o", str(tmp / "rep"))
    assert code == 0, out
    return tmp / "rep", tmp / "halves"


def test_identity_zero_gaussian_positive(split_run: tuple[Path, Path], counted: tuple[Path, list]) -> None:
    rep, _ = split_run
    r = json.loads((rep / "metrics.json").read_text())
    assert r["mode"] == "split" and r["n_items"] == 2
    assert r["split_kinds"] == ["thin (integer counts, gain 1)"]
    assert [s["gain"] for s in r["splits"]] == [1, 1]
    ident, gauss = r["methods"]["identity"], r["methods"]["gaussian"]
    assert [it["split_gain_db"] for it in ident["per_item"]] == [0.0, 0.0]
    assert ident["band_error"] == [1.0] * 6 and ident["change"] == 0.0 and ident["residual_spread"] == 0.0
    assert r["bands"]["names"] == ["> 100 A", "100-34 A", "34-15 A", "15-8 A", "8-4 A", "4-2 A"]
    assert gauss["split_gain_db"] > 10.0 and gauss["sigma"] in M.DEFAULT_SIGMAS
    assert 0 < gauss["change"] < 1 and gauss["residual_spread"] < 0.02
    assert set(r["methods"]) == {"identity", "constant", "gaussian", "model"}
    page = (rep / "index.html").read_text()
    srcs = re.findall(r'<img[^>]*src="([^"]+)"', page)
    assert {"bands.png", "frc.png", "crop_model.png", "crop_identity.png", "gaussian_sigma.png"} <= set(srcs)
    assert all((rep / s).is_file() for s in srcs)
    assert 'id="band-error-table"' in page and "split gain (dB)" in page


def test_halves_are_written_deterministically(split_run: tuple[Path, Path], counted: tuple[Path, list],
                                              cnn3_checkpoint: Path, tmp_path: Path) -> None:
    _, halves = split_run
    assert sorted(p.name for p in halves.iterdir()) == [
        f"mic{i}_{k}.mrc" for i in range(2) for k in ("A", "B", "full")]
    x = read_micrograph(counted[0] / "mic0.mrc").data
    a, b = (read_micrograph(halves / f"mic0_{k}.mrc").data for k in "AB")
    np.testing.assert_array_equal(a + b, x)
    np.testing.assert_array_equal(read_micrograph(halves / "mic0_full.mrc").data, x)
    for seed, same in (("0", True), ("1", False)):
        code, out = _run("--model", str(cnn3_checkpoint), "--split", "thin", str(counted[0] / "mic0.mrc"),
                         "--seed", seed, "--write-halves", str(tmp_path / seed),
                         "-o", str(tmp_path / f"r{seed}"))
        assert code == 0, out
        again = read_micrograph(tmp_path / seed / "mic0_A.mrc").data
        assert np.array_equal(again, a) is same


def _folder(src: Path, dst: Path, fn) -> Path:  # type: ignore[no-untyped-def]
    dst.mkdir()
    for p in sorted(src.glob("*.mrc")):
        _write(dst / p.name, fn(read_micrograph(p).data))
    return dst


def _patchy(x: np.ndarray) -> np.ndarray:
    """The old default's failure: blur on every other 64-px block, raw elsewhere."""
    yy, xx = np.mgrid[0:x.shape[0], 0:x.shape[1]]
    return np.where((yy // 64 + xx // 64) % 2 == 0, M.gaussian_filter(x, 2.0), x)


def test_compare_tools_and_red_flags(split_run: tuple[Path, Path], counted: tuple[Path, list],
                                     cnn3_checkpoint: Path, tmp_path: Path) -> None:
    """Patchwork and near-identity outputs on the written halves are flagged (--strict exits 3);
    the best Gaussian written as another tool's output is not, and its split gain matches the truth."""
    rep, halves = split_run
    sigma = json.loads((rep / "metrics.json").read_text())["methods"]["gaussian"]["sigma"]
    smooth = _folder(halves, tmp_path / "smooth", lambda x: M.gaussian_filter(x, sigma))
    patchy = _folder(halves, tmp_path / "patchy", _patchy)
    near = _folder(halves, tmp_path / "near", lambda x: x + 0.1 * (M.gaussian_filter(x, sigma) - x))
    args = ["--model", str(cnn3_checkpoint), "--split", "auto", str(counted[0]), "-o", str(tmp_path / "rep"),
            "--compare", f"smooth={smooth}", "--compare", f"patchy={patchy}", "--compare", f"near={near}"]
    code, out = _run(*args, "--strict")
    assert code == 3, out
    r = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    checks = {n: {f["check"] for f in r["red_flags"] if f["method"] == n}
              for n in ("smooth", "patchy", "near")}
    assert checks["smooth"] == set()
    assert "patchwork" in checks["patchy"] and "near_identity" not in checks["patchy"]
    assert "near_identity" in checks["near"] and "patchwork" not in checks["near"]
    m = r["methods"]
    assert m["smooth"]["split_gain_db"] == pytest.approx(m["gaussian"]["split_gain_db"], abs=1e-4)
    assert m["patchy"]["residual_spread"] > 0.1 > 0.02 > m["smooth"]["residual_spread"]
    assert m["near"]["change"] < 0.15 * m["gaussian"]["change"] and m["near"]["split_gain_db"] < 1.5
    assert "red flag: patchy: noise is removed unevenly" in out
    # the true gain, from the known clean image (each thinned half expects clean / 2); the tolerance is
    # 4 standard deviations of the split estimate (derivation: tests/imaging/test_splits.py)
    for i, clean in enumerate(counted[1]):
        a, b = (read_micrograph(halves / f"mic{i}_{k}.mrc").data for k in "AB")
        fa, fb = (read_micrograph(smooth / f"mic{i}_{k}.mrc").data for k in "AB")
        c = clean / 2
        e = (M.mse(fa, c) + M.mse(fb, c)) / (M.mse(a, c) + M.mse(b, c))
        k = math.sqrt(float(np.mean(c * c))) / float(np.mean(c))
        tol = 4 * 10 / math.log(10) * k * (math.sqrt(2 * e) + 1 + e) / math.sqrt(a.size) / e
        assert tol < 2.5 and abs(m["smooth"]["per_item"][i]["split_gain_db"] + 10 * math.log10(e)) <= tol
    code, out = _run(*args)  # flags without --strict: exit 0
    assert code == 0, out


def test_compare_folder_must_hold_the_halves(split_run: tuple[Path, Path], counted: tuple[Path, list],
                                             cnn3_checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "tool").mkdir()
    code, out = _run("--model", str(cnn3_checkpoint), "--split", "auto", str(counted[0]), "-o",
                     str(tmp_path / "rep"), "--compare", f"tool={tmp_path / 'tool'}")
    assert code == 1 and "found no tool output for 6 of 6 halves and inputs (first: mic0_A.mrc)" in out
    assert not (tmp_path / "rep" / "metrics.json").exists()
    code, out = _run("--model", "m", "--pairs", "a", "b", "--write-halves", "h", "-o", str(tmp_path))
    assert code == 2 and "--write-halves goes with --split" in out


@pytest.mark.parametrize(("name", "split"), [
    ("epu2.9_example.mrc", "auto"), ("epu2.9_example.mrc", "diagonal"),
    ("ucsf/Ucsf_stack_1142_DW.mrc", "auto"), ("ucsf/Ucsf_stack_1142_DW.mrc", "thin")])
def test_dependent_halves_are_refused(shared_data: Path, cnn3_checkpoint: Path, tmp_path: Path, name: str,
                                      split: str) -> None:
    """Interpolated (EPU sum) and low-passed (UCSF) noise: one line naming the file, exit 1, no report."""
    code, out = _run("--model", str(cnn3_checkpoint), "--split", split, str(shared_data / name),
                     "-o", str(tmp_path / "rep"))
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {shared_data / name}: the raw halves")
    assert "not independent" in lines[0] and not (tmp_path / "rep" / "metrics.json").exists()


def test_real_particle_images_pass_a_diagonal_split(shared_data: Path, cnn3_checkpoint: Path,
                                                    tmp_path: Path) -> None:
    """The 7 EMPIAR-10076 particle images (near-white noise), rewritten as a stack (space group 0)."""
    import mrcfile

    stack = mrcfile.read(shared_data / "empiar-10076" / "empiar_10076_7.mrc")
    write_micrograph(tmp_path / "particles.mrcs", stack,
                     MicrographHeader(stack.shape, 2, (1.31,) * 3, (0.0, 0.0, 0.0)))
    code, out = _run("--model", str(cnn3_checkpoint), "--split", "auto", str(tmp_path / "particles.mrcs"),
                     "-o", str(tmp_path / "rep"))
    assert code == 0, out
    r = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert r["n_items"] == 7 and r["split_kinds"] == ["diagonal"]
    assert all(max(abs(s["frc_mid"]), abs(s["frc_outer"])) < 0.05 for s in r["splits"])
    assert r["bands"]["names"][-1] == "8-5.24 A"  # halves: 2.62 A pixels
    assert r["methods"]["gaussian"]["split_gain_db"] > 0.5
    code, out = _run("--model", str(cnn3_checkpoint), "--split", "thin", str(tmp_path / "particles.mrcs"),
                     "-o", str(tmp_path / "rep2"))
    assert code == 1 and "particles.mrcs[0]: cannot make a thin split" in out


def test_simulated_micrographs(tmp_path: Path) -> None:
    """The realistic simulator (imaging.simulate): counted images are thinned and the best Gaussian's
    split error E matches its true error against clean = E[counts] within 4 sigma (as above). At
    realistic contrast (2%) the blur leaves E ~ 0.002 (27 dB), as small as the noise of the estimate
    at 512 px (1 / sqrt(N) = 0.002), so E, not dB, is compared. The same images as interpolated sums
    are refused."""
    from cryodeploy.errors import InputError
    from cryodeploy.evaluation.data import EvalConfig, SplitData
    from cryodeploy.evaluation.split import evaluate_split
    from cryodeploy.imaging.simulate import SimConfig, simulate

    config = dict(shape=(512, 512), pixel_size_a=(1.0, 1.0), p_gain=0.0, library_size=8)
    batch = simulate(SimConfig(**config, p_interpolated=0.0), 3, 0)  # type: ignore[arg-type]
    (tmp_path / "mics").mkdir()
    for i in range(3):
        _write(tmp_path / "mics" / f"sim{i}.mrc", batch.noisy[i].numpy())
    r, _ = evaluate_split([], SplitData((str(tmp_path / "mics"),), "auto", tmp_path / "halves"),
                          EvalConfig(quiet=True))
    assert r["split_kinds"] == ["thin (integer counts, gain 1)"]
    g = r["methods"]["gaussian"]
    assert g["split_gain_db"] > 3.0 and g["residual_spread"] < 0.02
    for i in range(3):
        a, b = (read_micrograph(tmp_path / "halves" / f"sim{i}_{k}.mrc").data for k in "AB")
        fa, fb = M.gaussian_filter(a, g["sigma"]), M.gaussian_filter(b, g["sigma"])
        c = batch.clean[i].numpy().astype(np.float64) / 2
        e = (M.mse(fa, c) + M.mse(fb, c)) / (M.mse(a, c) + M.mse(b, c))
        k = math.sqrt(float(np.mean(c * c))) / float(np.mean(c))
        tol = 4 * k * (math.sqrt(2 * e) + 1 + e) / math.sqrt(a.size)  # in units of the noise variance
        assert tol < 0.01 and abs(g["per_item"][i]["split_error"] - e) <= tol
    interp = simulate(SimConfig(**config, p_interpolated=1.0), 1, 0)  # type: ignore[arg-type]
    (tmp_path / "interp").mkdir()
    _write(tmp_path / "interp" / "sum.mrc", interp.noisy[0].numpy())
    with pytest.raises(InputError, match=r"sum\.mrc: the raw halves of a diagonal split are not independent"):
        evaluate_split([], SplitData((str(tmp_path / "interp"),), "auto"), EvalConfig(quiet=True))
