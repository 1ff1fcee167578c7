"""The RELION 5 tomogram External job: a RELION-style project from ``synth --volume``, run as RELION 5
runs an External job, real STAR and MRC files, a tiny unet3d."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import starfile
from click.testing import CliRunner
from conftest import load_plugin

from cryodeploy.cli import cli
from cryodeploy.io.volumes import VolumeHeader, read_volume, write_volume

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "relion" / "cryodeploy_relion_tomo.py"
JOB = "External/job008/"
RECON = "Tomograms/job006"
STAR = f"{RECON}/tomograms.star"
VOXEL = 10.8  # rlnTomoTiltSeriesPixelSize 1.35 x rlnTomoTomogramBinning 8
SHAPE = (24, 40, 48)  # (nz, ny, nx) as synth --size 40 48 --depth 24 writes it


@pytest.fixture(scope="module")
def tomo() -> ModuleType:
    return load_plugin(PLUGIN, "cryodeploy_relion_tomo")


@pytest.fixture(scope="module")
def unet3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seeded, randomly initialised small unet3d checkpoint."""
    import torch

    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 1})
    return save_checkpoint(tmp_path_factory.mktemp("u3") / "unet3d.safetensors", build_model(spec), spec)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth --volume`` into the project folder (its tomograms.star at the top, paths relative to
    it), and a RELION 5 Reconstruct-tomograms job folder: the halves as ``rec_<name>_half1/2.mrc``
    and a tomograms.star with the columns RELION 5 writes (no full tomogram, as with even/odd)."""
    root = tmp_path_factory.mktemp("relion5_project")
    made = CliRunner().invoke(cli, ["synth", "--volume", str(root), "--count", "2", "--size", "40", "48",
                                    "--depth", "24", "--voxel-size", str(VOXEL), "--seed", "5", "-q"])
    assert made.exit_code == 0, made.output
    names = ["TS_01", "TS_03"]
    (root / RECON / "tomograms").mkdir(parents=True)
    for i, name in enumerate(names):
        for half, sub in (("half1", "even"), ("half2", "odd")):
            dst = root / RECON / "tomograms" / f"rec_{name}_{half}.mrc"
            shutil.copy(root / sub / f"tomo_{i:04d}.mrc", dst)
    n = len(names)
    table = pd.DataFrame({
        "rlnTomoName": names,
        "rlnTomoTiltSeriesStarFile": [f"AlignTiltSeries/job005/tilt_series/{t}.star" for t in names],
        "rlnVoltage": ["300.000000"] * n, "rlnSphericalAberration": ["2.700000"] * n,
        "rlnAmplitudeContrast": ["0.100000"] * n, "rlnMicrographOriginalPixelSize": ["0.675000"] * n,
        "rlnTomoHand": ["-1.000000"] * n, "rlnTomoTiltSeriesPixelSize": ["1.350000"] * n,
        "rlnTomoTomogramBinning": ["8.000000"] * n, "rlnTomoSizeX": ["384"] * n, "rlnTomoSizeY": ["320"] * n,
        "rlnTomoSizeZ": ["192"] * n,
        "rlnTomoReconstructedTomogramHalf1": [f"{RECON}/tomograms/rec_{t}_half1.mrc" for t in names],
        "rlnTomoReconstructedTomogramHalf2": [f"{RECON}/tomograms/rec_{t}_half2.mrc" for t in names],
    })
    starfile.write({"global": table}, root / STAR, overwrite=True)
    text = (root / STAR).read_text()
    (root / STAR).write_text("\n# version 50001\n\n" + text[text.index("data_"):])
    return root


def _copy(project: Path, name: str) -> Path:
    dest = project.parent / f"{project.name}_{name}"
    shutil.copytree(project, dest)
    return dest


def _argv(model: Path, star: str = STAR, *extra: str, flag: str = "--in_mics") -> list[str]:
    return ["--o", JOB, flag, star, "--model", str(model), "--device", "cpu", *extra, "--j", "1"]


def _denoised(model: Path, *paths: Path) -> np.ndarray:
    """What the job should write: the mean of the API's denoised volumes."""
    from cryodeploy import Denoiser

    with Denoiser.load(str(model), device="cpu") as d:
        return sum(d(read_volume(p).data) for p in paths) / len(paths)


def test_runs_as_relion5_calls_it_and_writes_a_tomograms_star(project: Path, unet3d: Path) -> None:
    root = _copy(project, "exe")
    before = (root / STAR).read_bytes()
    assert os.access(PLUGIN, os.X_OK) and PLUGIN.read_text().startswith("#!/usr/bin/env python3\n")
    cmd = [str(PLUGIN), *_argv(unet3d), "--pipeline_control", JOB]  # RELION 5's External job command line
    # as RELION would, with the environment that has cryodeploy first on PATH (the shebang's python3)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    job = root / JOB
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert "ignoring arguments: --pipeline_control" in proc.stdout
    assert (root / STAR).read_bytes() == before  # the input is never touched

    text = (job / "tomograms.star").read_text()
    assert text.startswith("# version 50001\n") and "300.000000" in text and "-1.000000" in text  # verbatim
    inp = starfile.read(root / STAR, always_dict=True)["global"]
    out = starfile.read(job / "tomograms.star", always_dict=True)
    assert list(out) == ["global"]
    table = out["global"]
    assert list(table.columns) == [*inp.columns, "rlnTomoReconstructedTomogramDenoised"]
    pd.testing.assert_frame_equal(table[list(inp.columns)], inp)
    names = list(table["rlnTomoReconstructedTomogramDenoised"])
    assert names == [f"{JOB}tomograms/rec_TS_01.mrc", f"{JOB}tomograms/rec_TS_03.mrc"]
    starfile.write(out, root / "again.star", overwrite=True)  # and it round-trips through starfile
    pd.testing.assert_frame_equal(starfile.read(root / "again.star", always_dict=True)["global"], table)

    for name, row in zip(names, inp.itertuples(), strict=True):
        den = read_volume(root / name)
        assert den.data.shape == SHAPE
        assert den.header.voxel_size == pytest.approx((VOXEL,) * 3, abs=1e-4)
        assert den.header.origin == (0.0, 0.0, 0.0) and den.header.ispg == 1
        halves = [root / row.rlnTomoReconstructedTomogramHalf1, root / row.rlnTomoReconstructedTomogramHalf2]
        np.testing.assert_allclose(den.data, _denoised(unet3d, *halves), rtol=0, atol=1e-5)
        one = _denoised(unet3d, halves[0])
        assert np.abs(den.data - one).max() > 1e-2  # the mean of both halves, not one of them

    nodes = starfile.read(job / "RELION_OUTPUT_NODES.star", always_dict=True)
    assert list(nodes) == ["output_nodes"]
    assert nodes["output_nodes"].to_dict("list") == {
        "rlnPipeLineNodeName": [f"{JOB}tomograms.star", f"{JOB}logfile.pdf"],
        "rlnPipeLineNodeTypeLabel": ["TomogramGroupMetadata.star.relion", "LogFile.pdf.relion"],
    }
    assert (job / "RELION_OUTPUT_NODES.star").read_text().startswith("# version 50001\n")
    assert (job / "logfile.pdf").read_bytes().startswith(b"%PDF")
    if shutil.which("relion_image_handler"):  # RELION's own MRC reader (3.1 here) takes the outputs
        stats = subprocess.run(["relion_image_handler", "--i", names[0], "--stats"], cwd=root, check=True,
                               capture_output=True, text=True, timeout=60).stdout
        assert f"(x,y,z,n)= {SHAPE[2]} x {SHAPE[1]} x {SHAPE[0]} x 1" in stats
        assert float(stats.split("angpix =")[1].split()[0]) == pytest.approx(VOXEL)


def test_synth_star_the_full_tomogram_and_continue(project: Path, unet3d: Path, tomo: ModuleType) -> None:
    """synth's own tomograms.star via a Param (``--in_tomoset``); ``--source tomogram`` denoises
    rlnTomoReconstructedTomogram alone; a rerun (Continue) redoes only the missing output."""
    root = _copy(project, "synth")
    argv = _argv(unet3d, "tomograms.star", "--source", "tomogram", flag="--in_tomoset")
    assert tomo.main(argv, project_dir=root) == 0
    table = starfile.read(root / JOB / "tomograms.star", always_dict=True)["global"]
    outs = [root / n for n in table["rlnTomoReconstructedTomogramDenoised"]]
    assert [p.name for p in outs] == ["rec_tomo_0000.mrc", "rec_tomo_0001.mrc"]
    np.testing.assert_allclose(read_volume(outs[0]).data, _denoised(unet3d, root / "clean" / "tomo_0000.mrc"),
                               rtol=0, atol=1e-5)
    stamp = outs[0].stat().st_mtime_ns
    outs[1].unlink()
    assert tomo.main(argv, project_dir=root) == 0
    assert outs[1].exists() and outs[0].stat().st_mtime_ns == stamp
    assert (root / JOB / "RELION_JOB_EXIT_SUCCESS").exists()


def _edit_star(root: Path, **columns: list[str] | None) -> None:
    table = starfile.read(root / STAR, always_dict=True)["global"]
    for column, values in columns.items():
        if values is None:
            table = table.drop(columns=column)
        else:
            table[column] = values
    starfile.write({"global": table}, root / STAR, overwrite=True)


def _mics_star(root: Path) -> None:
    mics = pd.DataFrame({"rlnMicrographName": ["a.mrc"]})
    starfile.write({"micrographs": mics}, root / STAR, overwrite=True)


def _bad_half(root: Path) -> None:
    other = np.random.default_rng(0).random((24, 40, 40))
    write_volume(root / RECON / "tomograms" / "rec_TS_03_half2.mrc", other)


BAD = {
    "missing STAR": (lambda r: (r / STAR).unlink(), None,
                     "{root}/Tomograms/job006/tomograms.star: no such file"),
    "2-D model": (None, "cnn3", "cnn3 is a 2-D image model, expected a volume model (e.g. unet3d)"),
    "micrographs STAR": (_mics_star, None, "found a micrographs STAR file (rlnMicrographName)"),
    "one half column": (lambda r: _edit_star(r, rlnTomoReconstructedTomogramHalf2=None), None,
                        "found rlnTomoReconstructedTomogramHalf1 without rlnTomoReconstructedTomogramHalf2"),
    "missing tomogram": (lambda r: (r / RECON / "tomograms" / "rec_TS_01_half1.mrc").unlink(), None,
                         "1 of 2 tomograms failed; first: "
                         "{root}/Tomograms/job006/tomograms/rec_TS_01_half1.mrc: no such file"),
    "halves differ": (_bad_half, None, "rec_TS_03_half2.mrc: shape (24, 40, 40) differs from"),
    "duplicate names": (lambda r: _edit_star(r, rlnTomoName=["TS_01", "TS_01"]), None,
                        "rlnTomoName 'TS_01' appears twice, expected unique names"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_fail_with_one_line(project: Path, unet3d: Path, cnn3_checkpoint: Path, tomo: ModuleType,
                                       capsys: pytest.CaptureFixture[str], case: str) -> None:
    root = _copy(project, f"bad-{case.replace(' ', '-')}")
    change, model, expected = BAD[case]
    if change is not None:
        change(root)
    assert tomo.main(_argv(cnn3_checkpoint if model else unet3d), project_dir=root) == 1
    job = root / JOB
    reason = (job / "RELION_JOB_EXIT_FAILURE").read_text()
    assert reason.count("\n") == 1 and expected.replace("{root}", str(root)) in reason, reason
    assert f"error: {reason.strip()}" in capsys.readouterr().err.splitlines()
    for absent in ("RELION_JOB_EXIT_SUCCESS", "tomograms.star", "RELION_OUTPUT_NODES.star"):
        assert not (job / absent).exists()
    if case == "missing tomogram":  # the other tomogram was done; Continue after the fix redoes only TS_01
        done, todo = job / "tomograms" / "rec_TS_03.mrc", job / "tomograms" / "rec_TS_01.mrc"
        assert done.exists() and not todo.exists()
        stamp = done.stat().st_mtime_ns
        name = "tomograms/rec_TS_01_half1.mrc"
        shutil.copy(project / RECON / name, root / RECON / name)
        assert tomo.main(_argv(unet3d), project_dir=root) == 0
        assert todo.exists() and done.stat().st_mtime_ns == stamp


def test_bad_command_lines_and_output_folders(project: Path, unet3d: Path, tomo: ModuleType,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = _copy(project, "argv")
    assert tomo.main(["--o", JOB, "--model", str(unet3d)], project_dir=root) == 1
    marker = root / JOB / "RELION_JOB_EXIT_FAILURE"
    assert "--in_tomoset: missing" in marker.read_text()
    assert tomo.main(_argv(unet3d, STAR, "--source", "odd"), project_dir=root) == 1
    assert "--source odd: expected auto, halves or tomogram" in marker.read_text()
    assert tomo.main(_argv(unet3d, STAR, "--source", "tomogram"), project_dir=root) == 1
    assert "found no rlnTomoReconstructedTomogram column" in marker.read_text()
    both = [*_argv(unet3d), "--in_tomoset", "tomograms.star"]
    assert tomo.main(both, project_dir=root) == 1
    assert "expected one STAR file" in marker.read_text()
    capsys.readouterr()
    shutil.rmtree(root / JOB)
    files = sorted(root.rglob("*"))
    for outdir in (".", RECON):  # the project itself, or a folder holding the inputs: nothing written
        argv = ["--o", outdir, *_argv(unet3d)[2:]]
        assert tomo.main(argv, project_dir=root) == 1
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].endswith("expected a new job folder such as External/job004/"), err
        assert sorted(root.rglob("*")) == files


def test_abort_request_stops_before_the_next_tomogram(project: Path, unet3d: Path, tomo: ModuleType) -> None:
    root = _copy(project, "abort")
    (root / JOB).mkdir(parents=True)
    (root / JOB / "RELION_JOB_ABORT_NOW").touch()  # what RELION's Abort does
    assert tomo.main(_argv(unet3d), project_dir=root) == 1
    job = root / JOB
    assert (job / "RELION_JOB_EXIT_ABORTED").exists() and not (job / "RELION_JOB_ABORT_NOW").exists()
    assert not (job / "tomograms.star").exists() and not list((job / "tomograms").glob("*.mrc"))
    assert tomo.main(_argv(unet3d), project_dir=root) == 0  # Continue
    assert len(list((job / "tomograms").glob("*.mrc"))) == 2
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_ABORTED").exists()


def test_voxel_size_comes_from_the_star_only_where_the_header_has_none(
    project: Path, unet3d: Path, tomo: ModuleType, caplog: pytest.LogCaptureFixture
) -> None:
    root = _copy(project, "voxel")
    for half in ("half1", "half2"):
        path = root / RECON / "tomograms" / f"rec_TS_01_{half}.mrc"
        vol = read_volume(path)
        header = VolumeHeader(shape=vol.header.shape, mode=2, voxel_size=(0.0,) * 3, origin=(1.0, 2.0, 3.0))
        write_volume(path, vol.data, header)
    assert tomo.main(_argv(unet3d), project_dir=root) == 0
    first = read_volume(root / JOB / "tomograms" / "rec_TS_01.mrc").header
    assert first.voxel_size == pytest.approx((VOXEL,) * 3, abs=1e-4) and first.origin == (1.0, 2.0, 3.0)
    _edit_star(root, rlnTomoTomogramBinning=["4.0", "4.0"])  # disagrees with the headers of TS_03 (10.8)
    (root / JOB / "tomograms" / "rec_TS_03.mrc").unlink()
    assert tomo.main(_argv(unet3d), project_dir=root) == 0
    assert read_volume(root / JOB / "tomograms" / "rec_TS_03.mrc").header.voxel_size == pytest.approx(
        (VOXEL,) * 3, abs=1e-4)  # the header's is kept, the disagreement logged
    assert "rec_TS_03_half1.mrc: header voxel size 10.8 A, the STAR file gives 5.4 A" in caplog.text


def test_shipped_relion5_job_star() -> None:
    blocks = starfile.read(PLUGIN.parent / "job_tomo.star", always_dict=True)
    assert blocks["job"]["rlnJobTypeLabel"] == "relion.external" and blocks["job"]["rlnJobIsTomo"] == 1
    values = dict(zip(blocks["joboptions_values"]["rlnJobOptionVariable"],
                      blocks["joboptions_values"]["rlnJobOptionValue"], strict=True))
    assert values["fn_exe"] == "/path/to/cryodeploy/plugins/relion/cryodeploy_relion_tomo.py"
    assert values["in_mic"] == "Tomograms/job006/tomograms.star"
    labels = [values[f"param{i}_label"] for i in range(1, 7)]
    assert labels == ["model", "source", "device", "backend", "tile", "precision"]
    for label in labels:  # every param is an option of the script
        assert f'"--{label}"' in PLUGIN.read_text()
