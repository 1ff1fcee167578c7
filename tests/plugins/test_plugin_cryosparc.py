"""The cryoSPARC external-job plugin, everything but the server calls, with real cryosparc-tools Datasets."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from types import ModuleType

import mrcfile
import numpy as np
import pytest
from conftest import load_plugin

from cryodeploy.errors import InputError
from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

pytest.importorskip("cryosparc.dataset", reason="cryosparc-tools is not installed")
from cryosparc.dataset import Dataset

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "cryosparc" / "cryodeploy_cryosparc.py"


@pytest.fixture(scope="module")
def plugin() -> ModuleType:
    return load_plugin(PLUGIN, "cryodeploy_cryosparc")


@pytest.fixture(scope="module")
def denoiser(cnn3_checkpoint: Path):
    from cryodeploy import Denoiser

    return Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch")


def _exposures(project: Path) -> Dataset:
    """Three exposures as a Patch Motion job would output them: two jobs' folders, one file name shared."""
    noisy = synth_micrographs(
        project / "tmp", SynthConfig(count=2, size=(40, 72), seed=5, voxel_size=0.83, carbon=False, ctf=False)
    )
    paths = [
        "J3/motioncorrected/a_doseweighted.mrc",
        "J3/motioncorrected/b_doseweighted.mrc",
        "J9/motioncorrected/a_doseweighted.mrc",
    ]
    for src, rel in zip([noisy[0], noisy[1], noisy[1]], paths, strict=True):
        (project / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, project / rel)
    fields = [
        ("micrograph_blob/path", "O"),
        ("micrograph_blob/idx", "u4"),
        ("micrograph_blob/shape", "u4", (2,)),
        ("micrograph_blob/psize_A", "f4"),
        ("micrograph_blob/format", "O"),
        ("micrograph_blob/is_background_subtracted", "u1"),
        ("ctf/df1_A", "f4"),
    ]
    dset = Dataset.allocate(3, fields)
    dset["micrograph_blob/path"] = paths
    dset["micrograph_blob/shape"] = [[40, 72]] * 3
    dset["micrograph_blob/psize_A"] = [0.83, 0.83, 0.0]  # 0: unknown, taken from the MRC header
    dset["micrograph_blob/format"] = ["MRC/2"] * 3
    dset["micrograph_blob/is_background_subtracted"] = [1, 1, 0]
    dset["ctf/df1_A"] = [11000.0, 12000.0, 13000.0]
    return dset


def _read(path: Path) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float32)


def test_denoise_dataset_returns_a_micrograph_blob_result(plugin, denoiser, tmp_path: Path) -> None:
    dset = _exposures(tmp_path)
    out = plugin.denoise_dataset(dset, tmp_path, "J42/denoised", denoiser)
    slot = "micrograph_blob_denoised"
    assert isinstance(out, Dataset) and len(out) == 3
    assert sorted(out.fields()) == sorted(
        ["uid"]
        + [f"{slot}/{f}" for f in ("path", "idx", "shape", "psize_A", "format", "is_background_subtracted")]
    )
    np.testing.assert_array_equal(out["uid"], dset["uid"])
    assert list(out[f"{slot}/path"]) == [f"J42/denoised/{p}" for p in dset["micrograph_blob/path"]]
    assert out[f"{slot}/shape"].tolist() == [[40, 72]] * 3  # [ny, nx], like the input
    np.testing.assert_allclose(out[f"{slot}/psize_A"], [0.83, 0.83, 0.83], rtol=1e-6)
    assert list(out[f"{slot}/format"]) == ["MRC/2"] * 3
    assert out[f"{slot}/is_background_subtracted"].tolist() == [1, 1, 0]
    for src, dst in zip(dset["micrograph_blob/path"], out[f"{slot}/path"], strict=True):
        raw, den = _read(tmp_path / src), _read(tmp_path / dst)
        assert np.abs(den - raw).max() > 1e-3
        np.testing.assert_allclose(den, denoiser(raw), atol=1e-5)

    # as cryoSPARC stores and joins it: save as .cs, load, join with the passthrough input
    out.save(tmp_path / "out.cs")
    loaded = Dataset.load(tmp_path / "out.cs")
    assert loaded == out
    joined = dset.innerjoin(loaded)
    assert len(joined) == 3 and joined["ctf/df1_A"].tolist() == [11000.0, 12000.0, 13000.0]


def test_replacing_the_main_slot_and_skipping_existing(plugin, denoiser, tmp_path: Path) -> None:
    dset = _exposures(tmp_path)
    first = plugin.denoise_dataset(dset, tmp_path, "J42/denoised", denoiser, slot="micrograph_blob")
    assert first["micrograph_blob/path"][0] == "J42/denoised/J3/motioncorrected/a_doseweighted.mrc"
    done = tmp_path / first["micrograph_blob/path"][1]
    stamp = done.stat().st_mtime_ns
    again = plugin.denoise_dataset(dset, tmp_path, "J42/denoised", denoiser, slot="micrograph_blob")
    assert done.stat().st_mtime_ns == stamp and again == first


def test_missing_micrograph_and_bad_paths_are_input_errors(plugin, denoiser, tmp_path: Path) -> None:
    dset = _exposures(tmp_path)
    (tmp_path / "J9/motioncorrected/a_doseweighted.mrc").unlink()
    with pytest.raises(
        InputError, match=r"1 of 3 micrographs failed; first: .*J9/motioncorrected/a_doseweighted"
    ):
        plugin.denoise_dataset(dset, tmp_path, "J42/denoised", denoiser)
    with pytest.raises(InputError, match="expected micrograph_blob/path"):
        plugin.denoise_dataset(Dataset.allocate(1, [("ctf/df1_A", "f4")]), tmp_path, "J42/denoised", denoiser)
    with pytest.raises(InputError, match="leaves the project directory"):
        plugin.output_paths(["../other/x.mrc"], tmp_path, "J42/denoised")
    with pytest.raises(InputError, match="also the output of"):
        plugin.output_paths(["/data/x.mrc", "_abs/data/x.mrc"], tmp_path, "J42/denoised")


def test_command_line_help_needs_no_server(plugin, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        plugin.main(["--help"])
    assert exc.value.code == 0
    assert "input_output" in capsys.readouterr().out


def test_every_option_has_help_and_parsing_needs_no_cryosparc_tools() -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['cryosparc'] = None; sys.modules['cryosparc.tools'] = None; "
            f"sys.path.insert(0, {str(PLUGIN.parent)!r}); import cryodeploy_cryosparc as p; "
            "import argparse; parser = p.build_parser(); "
            "print([a.dest for a in parser._actions if not a.help]); p.main(['--help'])")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0] == "[]"  # every argument and option has help
    assert "--precision {fp32,fp16,bf16}" in res.stdout and "cryodeploy[cryosparc]" in res.stdout


def test_missing_tools_credentials_or_server_are_one_line_errors(
    plugin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    args = ["P1", "W1", "J2", "exposures"]
    for var in ("CRYOSPARC_BASE_URL", "CRYOSPARC_EMAIL", "CRYOSPARC_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no saved cryosparc.tools login session
    assert plugin.main(args) == 1
    err = capsys.readouterr().err
    assert err == "error: no cryoSPARC server given: set CRYOSPARC_BASE_URL or pass --url\n"

    with socket.socket() as s:  # a port with nobody listening: connection refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert plugin.main([*args, "--url", url]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no cryoSPARC credentials for {url}: set CRYOSPARC_EMAIL")
    assert err.count("\n") == 1

    monkeypatch.setenv("CRYOSPARC_EMAIL", "me@lab.org")
    monkeypatch.setenv("CRYOSPARC_PASSWORD", "secret")
    assert plugin.main([*args, "--url", url, "--timeout", "5"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot connect to cryoSPARC at {url}: ") and err.count("\n") == 1

    monkeypatch.setitem(sys.modules, "cryosparc.tools", None)  # as if cryosparc-tools were not installed
    assert plugin.main([*args, "--url", url]) == 1
    assert "pip install 'cryodeploy[cryosparc]'" in capsys.readouterr().err
