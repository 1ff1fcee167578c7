"""The RELION External job plugin: a RELION-style project in a temp dir, real STAR and MRC files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from re import MULTILINE
from re import sub as re_sub
from types import ModuleType

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile
from conftest import load_plugin

from cryodeploy.imaging.synth import SynthConfig, synth_micrographs

PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "relion" / "cryodeploy_relion.py"
JOB = "External/job001/"


@pytest.fixture(scope="module")
def relion() -> ModuleType:
    return load_plugin(PLUGIN, "cryodeploy_relion")


def _write_star(blocks: dict[str, pd.DataFrame], path: Path, version: int | None) -> None:
    """Write with starfile, then add RELION's "# version" line before each block (as RELION 3.1+ does)."""
    starfile.write(blocks, path, overwrite=True)
    if version is not None:
        text = path.read_text().replace("\ndata_", f"\n# version {version}\n\ndata_")
        path.write_text(text)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A RELION project: 3 synthetic micrographs in two folders (two share a file name), two STAR forms."""
    root = tmp_path_factory.mktemp("relion_project")
    noisy = synth_micrographs(
        root / "Raw", SynthConfig(count=2, size=(48, 64), seed=3, voxel_size=1.5, carbon=False, ctf=False)
    )
    movies = root / "MotionCorr" / "job002" / "Movies"
    movies.mkdir(parents=True)
    shutil.copy(noisy[1], movies / noisy[0].name)  # same name as Raw/noisy/synth_0000.mrc, other content
    names = [str(p.relative_to(root)) for p in noisy] + [f"MotionCorr/job002/Movies/{noisy[0].name}"]
    optics = pd.DataFrame(
        {
            "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"],
            "rlnOpticsGroup": [1, 2],
            "rlnMicrographPixelSize": [0.885, 1.77],
            "rlnVoltage": [300.0, 200.0],
        }
    )
    mics = pd.DataFrame(
        {
            "rlnCtfPowerSpectrum": [n.replace(".mrc", "_PS.mrc") for n in names],
            "rlnMicrographName": names,
            "rlnOpticsGroup": [1, 2, 1],
            "rlnAccumMotionTotal": ["16.420495", "2.506308", "13.914187"],
        }
    )
    _write_star({"optics": optics, "micrographs": mics}, root / "mics31.star", version=30001)
    _write_star({"": mics[["rlnMicrographName", "rlnAccumMotionTotal"]]}, root / "mics30.star", version=None)
    return root


def _job(project: Path, name: str) -> Path:
    """A fresh copy of the project for one test (jobs write into it)."""
    dest = project.parent / f"{project.name}_{name}"
    shutil.copytree(project, dest)
    return dest


def _argv(checkpoint: Path, star: str, *extra: str) -> list[str]:
    return ["--o", JOB, "--in_mics", star, "--model", str(checkpoint), *extra, "--j", "1"]


def _read(path: Path) -> np.ndarray:
    with mrcfile.open(path, permissive=True) as mrc:
        return np.asarray(mrc.data, dtype=np.float32)


def test_executable_runs_like_relion_and_writes_all_outputs(project: Path, cnn3_checkpoint: Path) -> None:
    from cryodeploy import Denoiser

    root = _job(project, "exe")
    assert os.access(PLUGIN, os.X_OK) and PLUGIN.read_text().startswith("#!/usr/bin/env python3\n")
    cmd = [str(PLUGIN), *_argv(cnn3_checkpoint, "mics31.star", "--pipeline_control", JOB)]
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=120, env=_env())
    assert proc.returncode == 0, proc.stderr
    job = root / JOB
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()

    before = starfile.read(root / "mics31.star", always_dict=True)
    after = starfile.read(job / "micrographs_denoised.star", always_dict=True)
    assert list(after) == ["optics", "micrographs"]
    pd.testing.assert_frame_equal(after["optics"], before["optics"])
    mics_in, mics_out = before["micrographs"], after["micrographs"]
    assert list(mics_out.columns) == list(mics_in.columns) and len(mics_out) == len(mics_in) == 3
    rest = [c for c in mics_in.columns if c != "rlnMicrographName"]
    pd.testing.assert_frame_equal(mics_out[rest], mics_in[rest])
    assert "16.420495" in (job / "micrographs_denoised.star").read_text()  # values kept verbatim
    assert (job / "micrographs_denoised.star").read_text().count("# version 30001") == 2

    denoiser = Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch")
    for src, dst in zip(mics_in["rlnMicrographName"], mics_out["rlnMicrographName"], strict=True):
        assert dst == JOB + src  # project-relative, keeps the input's relative path (no collisions)
        raw, den = _read(root / src), _read(root / dst)
        assert den.shape == raw.shape == (48, 64)
        assert np.abs(den - raw).max() > 1e-3  # the model changed it
        np.testing.assert_allclose(den, denoiser(raw), atol=1e-5)
    assert len(set(mics_out["rlnMicrographName"])) == 3

    nodes = starfile.read(job / "RELION_OUTPUT_NODES.star", always_dict=True)
    assert list(nodes) == ["output_nodes"]
    assert nodes["output_nodes"].to_dict("list") == {
        "rlnPipeLineNodeName": [JOB + "micrographs_denoised.star", JOB + "logfile.pdf"],
        "rlnPipeLineNodeType": [1, 13],  # micrographs, PDF log file
    }
    assert (job / "RELION_OUTPUT_NODES.star").read_text().startswith("# version 30001\n")
    assert (job / "logfile.pdf").read_bytes().startswith(b"%PDF")
    assert "ignoring arguments: --pipeline_control" in proc.stdout


def test_old_single_table_star_and_rerun_skips_finished(project: Path, cnn3_checkpoint: Path, relion) -> None:
    root = _job(project, "old")
    assert relion.main(_argv(cnn3_checkpoint, "mics30.star"), project_dir=root) == 0
    out = starfile.read(root / JOB / "micrographs_denoised.star", always_dict=True)
    assert list(out) == [""]  # the single data_ block stays a single data_ block
    assert (root / JOB / "micrographs_denoised.star").read_text().startswith("# version 30001\n")
    names = list(out[""]["rlnMicrographName"])
    assert names == [JOB + n for n in starfile.read(root / "mics30.star")["rlnMicrographName"]]
    stamps = {n: (root / n).stat().st_mtime_ns for n in names}

    (root / names[1]).unlink()  # as if the first run had died before this one
    assert relion.main(_argv(cnn3_checkpoint, "mics30.star"), project_dir=root) == 0
    assert (root / names[1]).exists()
    assert all((root / n).stat().st_mtime_ns == stamps[n] for n in (names[0], names[2]))
    assert (root / JOB / "RELION_JOB_EXIT_SUCCESS").exists()


def test_node_type_follows_the_relion_version(project: Path, cnn3_checkpoint: Path, relion) -> None:
    root = _job(project, "v5")
    label = {
        "rlnPipeLineNodeName": [JOB + "micrographs_denoised.star", JOB + "logfile.pdf"],
        "rlnPipeLineNodeTypeLabel": ["MicrographGroupMetadata.star.relion", "LogFile.pdf.relion"],
    }
    # RELION 4/5 project: its pipeline uses type labels
    (root / "default_pipeline.star").write_text(
        "# version 30001\n\ndata_pipeline_processes\n\nloop_\n_rlnPipeLineProcessName #1\n"
        "_rlnPipeLineProcessAlias #2\n_rlnPipeLineProcessTypeLabel #3\n_rlnPipeLineProcessStatusLabel #4\n"
        f"{JOB} None relion.external Running\n"
    )
    assert relion.main(_argv(cnn3_checkpoint, "mics31.star"), project_dir=root) == 0
    assert starfile.read(root / JOB / "RELION_OUTPUT_NODES.star").to_dict("list") == label
    # explicit option wins over the project
    assert (
        relion.main(_argv(cnn3_checkpoint, "mics31.star", "--relion_version", "3.1"), project_dir=root) == 0
    )
    assert starfile.read(root / JOB / "RELION_OUTPUT_NODES.star")["rlnPipeLineNodeType"].tolist() == [1, 13]
    # no pipeline: a RELION 5 STAR file ("# version 50001") means labels
    (root / "default_pipeline.star").unlink()
    star5 = (root / "mics31.star").read_text().replace("30001", "50001")
    (root / "mics50.star").write_text(star5)
    assert relion.main(_argv(cnn3_checkpoint, "mics50.star"), project_dir=root) == 0
    assert starfile.read(root / JOB / "RELION_OUTPUT_NODES.star").to_dict("list") == label
    assert (root / JOB / "micrographs_denoised.star").read_text().count("# version 50001") == 2
    assert (root / JOB / "RELION_OUTPUT_NODES.star").read_text().startswith("# version 50001\n")


def test_corrupt_micrograph_fails_with_a_readable_reason(
    project: Path, cnn3_checkpoint: Path, relion, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _job(project, "bad")
    bad = root / "Raw" / "noisy" / "synth_0001.mrc"
    bad.write_bytes(b"not an MRC file at all" * 10)
    job = root / JOB
    job.mkdir(parents=True)
    for stale in ("RELION_JOB_EXIT_SUCCESS", "micrographs_denoised.star", "RELION_OUTPUT_NODES.star"):
        (job / stale).write_text("from an earlier run\n")
    assert relion.main(_argv(cnn3_checkpoint, "mics31.star"), project_dir=root) == 1
    assert (job / "RELION_JOB_EXIT_FAILURE").exists() and not (job / "RELION_JOB_EXIT_SUCCESS").exists()
    reason = (job / "RELION_JOB_EXIT_FAILURE").read_text().strip()
    assert "synth_0001.mrc" in reason and "1 of 3 micrographs failed" in reason and "\n" not in reason
    assert f"error: {reason}" in capsys.readouterr().err
    assert (
        not (job / "micrographs_denoised.star").exists() and not (job / "RELION_OUTPUT_NODES.star").exists()
    )
    assert (
        job / "Raw" / "noisy" / "synth_0000.mrc"
    ).exists()  # the good ones are done: Continue redoes only the bad

    shutil.copy(project / "Raw" / "noisy" / "synth_0001.mrc", bad)  # fix the input, then "Continue"
    assert relion.main(_argv(cnn3_checkpoint, "mics31.star"), project_dir=root) == 0
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()


def test_bad_command_lines_leave_a_failure_marker(
    tmp_path: Path, relion, capsys: pytest.CaptureFixture[str]
) -> None:
    assert relion.main(["--o", JOB, "--j", "2"], project_dir=tmp_path) == 1
    assert "--in_mics: missing" in (tmp_path / JOB / "RELION_JOB_EXIT_FAILURE").read_text()
    assert relion.main(["--o", JOB, "--in_mics", "nope.star", "--tile", "big"], project_dir=tmp_path) == 1
    assert "--tile big" in (tmp_path / JOB / "RELION_JOB_EXIT_FAILURE").read_text()
    assert relion.main(["--o", JOB, "--in_mics", "nope.star"], project_dir=tmp_path) == 1
    assert "nope.star: no such file" in (tmp_path / JOB / "RELION_JOB_EXIT_FAILURE").read_text()
    assert "error: " in capsys.readouterr().err


def test_output_paths_stay_inside_outdir_and_never_collide(tmp_path: Path, relion) -> None:
    from cryodeploy.errors import InputError

    out = tmp_path / "External" / "job009"
    pairs = relion.output_paths(["a/x.mrc", "b/x.mrc", "a/../c/x.mrc", "/data/x.mrc"], tmp_path, out)
    assert [dst.relative_to(out).as_posix() for _, dst in pairs] == [
        "a/x.mrc",
        "b/x.mrc",
        "c/x.mrc",
        "_abs/data/x.mrc",
    ]
    assert all(dst.is_relative_to(out) for _, dst in pairs)
    with pytest.raises(InputError, match="also the output of"):
        relion.output_paths(["/data/x.mrc", "_abs/data/x.mrc"], tmp_path, out)


TEMPLATE = PLUGIN.parent / "job.star"


def _relion_job_star(exe: Path, in_mics: str, params: dict[str, str]) -> str:
    """The shipped template ``plugins/relion/job.star`` (RELION 3.1, External = type 99) filled in."""
    text = TEMPLATE.read_text()
    text = text.replace("/path/to/cryodeploy/plugins/relion/cryodeploy_relion.py", str(exe))
    text = text.replace("CtfFind/job003/micrographs_ctf.star", in_mics)
    text = text.replace("/path/to/model.safetensors", params.pop("model"))
    for label, value in params.items():  # e.g. device auto -> device cpu
        pattern = rf"^(param\d+_label {label}\nparam\d+_value ).*$"
        text = re_sub(pattern, rf"\g<1>{value}", text, flags=MULTILINE)
    return text


def _image_stats(path: Path) -> dict[str, float]:
    """Mean, std and max as RELION's own reader sees them (``relion_image_handler --stats``)."""
    out = subprocess.run(
        ["relion_image_handler", "--i", str(path), "--stats"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    fields = out.replace("=", " ").replace(";", " ").split()
    return {k: float(fields[fields.index(k) + 1]) for k in ("avg", "stddev", "maxval", "angpix")}


@pytest.mark.slow
def test_real_relion_pipeliner_runs_the_job_and_registers_its_output(
    project: Path, cnn3_checkpoint: Path
) -> None:
    if shutil.which("relion_pipeliner") is None:
        pytest.skip("relion_pipeliner not on PATH (RELION 3.1 is not installed: apt-get install -y relion)")
    root = _job(project, "relion")
    (root / "default_pipeline.star").write_text(
        "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n"
    )
    params = {"model": str(cnn3_checkpoint), "device": "cpu", "tile": "auto"}
    (root / "job.star").write_text(_relion_job_star(PLUGIN, "mics31.star", params))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    subprocess.run(
        ["relion_pipeliner", "--addJobFromStar", "job.star"], cwd=root, env=env, check=True, timeout=60
    )
    subprocess.run(
        ["relion_pipeliner", "--RunJobs", JOB, "--sec_wait_after", "1"],
        cwd=root,
        env=env,
        check=True,
        timeout=300,
        capture_output=True,
    )
    job = root / JOB
    logs = f"run.out: {(job / 'run.out').read_text()}\nrun.err: {(job / 'run.err').read_text()}"
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists(), logs
    assert "--in_mics mics31.star --model" in (job / "note.txt").read_text()  # RELION built the command line

    node = JOB + "micrographs_denoised.star"
    pipeline = starfile.read(root / "default_pipeline.star", always_dict=True)
    nodes = pipeline["pipeline_nodes"].set_index("rlnPipeLineNodeName")["rlnPipeLineNodeType"]
    assert nodes[node] == 1  # registered as a micrographs node
    edges = pipeline["pipeline_output_edges"]
    assert ((edges["rlnPipeLineEdgeProcess"] == JOB) & (edges["rlnPipeLineEdgeToNode"] == node)).sum() == 1
    processes = pipeline["pipeline_processes"].set_index("rlnPipeLineProcessName")
    assert processes.loc[JOB, "rlnPipeLineProcessStatus"] == 2  # finished successfully

    listed = subprocess.run(
        ["relion_star_printtable", node, "data_micrographs", "rlnMicrographName"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.split()
    assert listed == list(starfile.read(root / node, always_dict=True)["micrographs"]["rlnMicrographName"])
    assert len(listed) == 3
    for name in listed:
        data = _read(root / name)
        stats = _image_stats(root / name)
        assert stats["avg"] == pytest.approx(float(data.mean()), rel=1e-3, abs=1e-4)
        assert stats["stddev"] == pytest.approx(float(data.std()), rel=1e-3)
        assert stats["maxval"] == pytest.approx(float(data.max()), rel=1e-3, abs=1e-4)
        assert stats["angpix"] == pytest.approx(1.5)  # voxel size kept


def _pipeliner_project(root: Path, checkpoint: Path, count: int) -> Path:
    """A RELION 3.1 project with ``count`` micrographs and the template job added by the pipeliner."""
    noisy = synth_micrographs(
        root / "Raw",
        SynthConfig(count=count, size=(128, 128), seed=4, voxel_size=1.2, carbon=False, ctf=False),
    )
    mics = pd.DataFrame({"rlnMicrographName": [str(p.relative_to(root)) for p in noisy]})
    _write_star({"micrographs": mics}, root / "mics.star", version=30001)
    (root / "default_pipeline.star").write_text(
        "# version 30001\n\ndata_pipeline_general\n\n_rlnPipeLineJobCounter                       1\n"
    )
    params = {"model": str(checkpoint), "device": "cpu", "tile": "64"}
    (root / "job.star").write_text(_relion_job_star(PLUGIN, "mics.star", params))
    subprocess.run(["relion_pipeliner", "--addJobFromStar", "job.star"], cwd=root, env=_env(), check=True,
                   timeout=60, capture_output=True)
    return root


def _env() -> dict[str, str]:
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")


@pytest.mark.slow
def test_real_relion_pipeliner_aborts_the_job_mid_run(tmp_path: Path, cnn3_checkpoint: Path) -> None:
    if shutil.which("relion_pipeliner") is None:
        pytest.skip("relion_pipeliner not on PATH (RELION 3.1 is not installed: apt-get install -y relion)")
    count = 40
    root = _pipeliner_project(tmp_path / "proj", cnn3_checkpoint, count)
    job = root / JOB
    proc = subprocess.Popen(["relion_pipeliner", "--RunJobs", JOB, "--sec_wait_after", "1"], cwd=root,
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    first = job / "Raw" / "noisy"
    while not (first.is_dir() and any(first.glob("*.mrc"))):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    (job / "RELION_JOB_ABORT_NOW").touch()  # what RELION's GUI does on "Abort"
    proc.communicate(timeout=300)
    logs = f"run.out: {(job / 'run.out').read_text()}\nrun.err: {(job / 'run.err').read_text()}"
    assert (job / "RELION_JOB_EXIT_ABORTED").exists(), logs
    assert not (job / "RELION_JOB_EXIT_SUCCESS").exists() and not (job / "RELION_JOB_EXIT_FAILURE").exists()
    assert not (job / "RELION_JOB_ABORT_NOW").exists() and not (job / "micrographs_denoised.star").exists()
    done = sorted((job / "Raw" / "noisy").glob("*.mrc"))
    assert 0 < len(done) < count, f"{len(done)} of {count} done: the abort did not land mid-run"
    for path in done:  # every finished micrograph is complete
        assert _read(path).shape == (128, 128)
    assert not [p for p in (job / "Raw" / "noisy").iterdir() if p.name.startswith(".")]  # no temporaries
    assert "aborted by RELION (RELION_JOB_ABORT_NOW) after" in (job / "run.out").read_text()
    pipeline = starfile.read(root / "default_pipeline.star", always_dict=True)
    processes = pipeline["pipeline_processes"].set_index("rlnPipeLineProcessName")
    status = processes.loc[JOB, "rlnPipeLineProcessStatus"]
    print(f"aborted after {len(done)} of {count}; pipeline status {status}")
    assert status == 4  # RELION 3.1's PROC_ABORTED

    rerun = subprocess.run([str(PLUGIN), "--o", JOB, "--in_mics", "mics.star", "--model",
                            str(cnn3_checkpoint), "--device", "cpu"],
                           cwd=root, env=_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr  # Continue: the rest, then success
    assert (job / "RELION_JOB_EXIT_SUCCESS").exists()
    assert len(list((job / "Raw" / "noisy").glob("*.mrc"))) == count
    assert f"{count} micrographs: {len(done)} already denoised" in rerun.stdout


def test_gpu_ids_pick_the_device_unless_device_is_given(relion) -> None:
    from cryodeploy.errors import ConfigError

    def opts(*extra: str):
        return relion.parse_args(["--o", JOB, "--in_mics", "m.star", *extra])

    assert opts("--gpu", "1,2").compute_device == "cuda:1"  # RELION's list: the first id
    assert opts("--gpu", "0:1").compute_device == "cuda:0"
    assert opts("--gpu", "").compute_device == "cuda" and opts("--gpu").compute_device == "cuda"  # any GPU
    assert opts("--gpu", "1", "--device", "cpu").compute_device == "cpu"
    assert opts().compute_device == "auto" and opts("--j", "6").threads == 6
    with pytest.raises(ConfigError, match="--gpu a: expected GPU ids"):
        opts("--gpu", "a")


def test_shipped_job_star_templates() -> None:
    v31, v45 = (starfile.read(PLUGIN.parent / n, always_dict=True) for n in ("job.star", "job_relion45.star"))
    assert v31["job"]["rlnJobType"] == 99 and v45["job"]["rlnJobTypeLabel"] == "relion.external"
    for blocks in (v31, v45):
        values = dict(zip(blocks["joboptions_values"]["rlnJobOptionVariable"],
                          blocks["joboptions_values"]["rlnJobOptionValue"], strict=True))
        assert values["fn_exe"] == "/path/to/cryodeploy/plugins/relion/cryodeploy_relion.py"
        assert values["in_mic"] == "CtfFind/job003/micrographs_ctf.star"
        assert (values["param1_label"], values["param1_value"]) == ("model", "/path/to/model.safetensors")
        labels = [values[f"param{i}_label"] for i in range(1, 7)]
        assert labels == ["model", "device", "backend", "tile", "precision", "relion_version"]
    readme = (PLUGIN.parent / "README.md").read_text()
    assert "job.star" in readme and "default_pipeline.star" in readme and ".relion_lock" in readme


@pytest.mark.parametrize("outdir", [".", "./", "MotionCorr", "MotionCorr/job002/Movies"])
def test_output_folder_that_is_the_project_or_holds_inputs_is_refused(
    project: Path, cnn3_checkpoint: Path, relion, capsys: pytest.CaptureFixture[str], outdir: str
) -> None:
    """Once, ``--o .`` reported "3 already denoised", wrote RELION_JOB_EXIT_SUCCESS and a STAR file
    listing the raw inputs. Now: exit 1, one line, nothing written or removed anywhere."""
    root = _job(project, f"outdir-{outdir.replace('/', '-').replace('.', 'dot')}")
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    argv = ["--o", outdir, "--in_mics", "mics31.star", "--model", str(cnn3_checkpoint), "--j", "1"]
    assert relion.main(argv, project_dir=root) == 1
    err = capsys.readouterr().err.splitlines()
    what = "is the project folder" if outdir in (".", "./") else "contains the input "
    assert len(err) == 1 and err[0].startswith(f"error: --o {root / outdir}: {what}"), err
    assert err[0].endswith("expected a new job folder such as External/job004/")
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
