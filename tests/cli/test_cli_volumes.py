"""``synth --volume`` and ``preprocess --volumes`` through the command line."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.io.volumes import read_volume
from cryodeploy.training.store import PatchStore


def run(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_synth_volume_then_preprocess_from_the_star_file(tmp_path: Path) -> None:
    res = run(
        "synth",
        "--volume",
        str(tmp_path / "d"),
        "-n",
        "2",
        "--size",
        "48",
        "40",
        "--depth",
        "16",
        "--tilt-range",
        "45",
        "--seed",
        "3",
    )
    assert res.exit_code == 0, res.output
    assert "wrote 2 tomograms of 40x48x16 voxels" in res.output
    vol = read_volume(tmp_path / "d" / "odd" / "tomo_0001.mrc")
    assert vol.data.shape == (16, 48, 40) and vol.header.voxel_size == (10.0, 10.0, 10.0)
    res = run(
        "preprocess",
        "--volumes",
        str(tmp_path / "d" / "tomograms.star"),
        "-o",
        str(tmp_path / "s"),
        "--patch",
        "16",
        "--test-fraction",
        "0",
        "-q",
    )
    assert res.exit_code == 0, res.output
    assert "train 12, test 0 patches of 16^3 (pairs) from 2 tomograms" in res.output
    store = PatchStore(tmp_path / "s")
    assert store.patch == (16, 16, 16) and store.manifest["targets"] == "pairs"
    assert store.manifest["sources"][1]["target_path"] == str(
        (tmp_path / "d" / "odd" / "tomo_0001.mrc").resolve()
    )


def test_preprocess_volumes_pairs_by_name_and_self_supervised(tmp_path: Path) -> None:
    assert (
        run("synth", "--volume", str(tmp_path / "d"), "--size", "32", "32", "--depth", "16", "-q").exit_code
        == 0
    )
    for half in ("even", "odd"):
        (tmp_path / "d" / half / "tomo_0000.mrc").rename(tmp_path / f"a_{half}.mrc")
    res = run(
        "preprocess",
        "--volumes",
        "--even-odd",
        str(tmp_path / "a_even.mrc"),
        str(tmp_path / "a_odd.mrc"),
        "-o",
        str(tmp_path / "s"),
        "--patch",
        "16",
        "--test-fraction",
        "0",
    )
    assert res.exit_code == 0 and "(pairs) from 1 tomograms" in res.output, res.output
    res = run(
        "preprocess",
        "--volumes",
        "--self-supervised",
        str(tmp_path / "d" / "clean"),
        "-o",
        str(tmp_path / "n"),
        "--patch",
        "16",
        "--test-fraction",
        "0",
    )
    assert res.exit_code == 0 and "train 4, test 0 patches of 16^3 (none)" in res.output, res.output
    assert not PatchStore(tmp_path / "n").has_target("train")


def test_usage_errors(tmp_path: Path) -> None:
    res = run("synth", "--volume", str(tmp_path / "d"), "--sigma", "0.1")
    assert res.exit_code == 2 and "--volume takes no --sigma or --no-carbon" in res.output
    res = run("synth", str(tmp_path / "d"), "--depth", "32")
    assert res.exit_code == 2 and "--depth, --tilt-range and --device need --volume" in res.output
    res = run("preprocess", str(tmp_path), "-o", str(tmp_path / "s"), "--even-odd")
    assert res.exit_code == 2 and "--even-odd and --self-supervised need --volumes" in res.output
    assert (
        run("synth", "--volume", str(tmp_path / "d"), "--size", "32", "32", "--depth", "16", "-q").exit_code
        == 0
    )
    res = run(
        "preprocess",
        "--volumes",
        "--pairs",
        str(tmp_path / "d" / "even"),
        str(tmp_path / "d" / "odd"),
        "--thin",
        "-o",
        str(tmp_path / "s"),
    )
    assert res.exit_code == 2 and "even/odd pairs are their own targets: they take no --thin" in res.output
    res = run(
        "preprocess",
        "--volumes",
        str(tmp_path / "d" / "even"),
        "--thin",
        "--self-supervised",
        "-o",
        str(tmp_path / "s"),
    )
    assert (
        res.exit_code == 2 and "choose one kind of targets, found --thin and --self-supervised" in res.output
    )
    res = run(
        "preprocess",
        "--volumes",
        str(tmp_path / "d" / "even"),
        "--thin",
        "-o",
        str(tmp_path / "s"),
        "--patch",
        "16",
    )
    assert (
        res.exit_code == 1 and "non-integer voxels" in res.output and "give its even/odd halves" in res.output
    )
    assert not (tmp_path / "s").exists()
