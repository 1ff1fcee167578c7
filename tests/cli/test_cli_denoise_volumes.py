"""``cryodeploy denoise`` with a volume model on real MRC tomograms, through click's CliRunner."""

from __future__ import annotations

import numpy as np
import torch
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.io.mrc import write_micrograph
from cryodeploy.io.volumes import VolumeHeader, read_volume, write_volume
from cryodeploy.models import ModelSpec, build_model
from cryodeploy.models.checkpoint import save_checkpoint


def test_denoise_a_folder_of_tomograms(tmp_path, rng) -> None:
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 1})
    ckpt = save_checkpoint(tmp_path / "v.safetensors", build_model(spec), spec)
    src = tmp_path / "tomos"
    src.mkdir()
    for name in ("a.rec", "b.mrc"):
        data = rng.standard_normal((16, 32, 40)) * 5 + 9
        write_volume(src / name, data, VolumeHeader((16, 32, 40), 2, (7.0, 7.0, 7.0), (1.0, 2.0, 3.0)))
    write_micrograph(tmp_path / "micrograph.mrc", rng.standard_normal((40, 40)))
    (src / "notes.txt").write_text("not a volume")

    def run(*args: str):
        return CliRunner().invoke(cli, ["denoise", *args, "-o", str(tmp_path / "out"), "--model", str(ckpt),
                                        "--device", "cpu", "--backend", "torch", "-q"])

    first = run(str(src), "--tile", "40")
    assert first.exit_code == 0, first.output
    assert "denoised 2, skipped 0, failed 0" in first.output
    done = read_volume(tmp_path / "out" / "a.rec")
    assert done.data.shape == (16, 32, 40) and done.header.voxel_size == (7.0, 7.0, 7.0)
    assert done.header.origin == (1.0, 2.0, 3.0) and np.isfinite(done.data).all() and done.data.std() > 0
    again = run(str(src), "--skip-existing")
    assert again.exit_code == 0 and "denoised 0, skipped 2, failed 0" in again.output, again.output
    wrong = run(str(tmp_path / "micrograph.mrc"))
    assert wrong.exit_code == 1
    assert "micrograph.mrc: found a 2-D image (40x40), expected a 3-D volume of at least 16" in wrong.output
    tiff = run(str(src), "--format", "tiff", "--overwrite")
    assert tiff.exit_code != 0 and "error: output format tiff: not supported for volumes" in tiff.output


def test_parity_of_a_volume_model_on_synthetic_tomograms(tmp_path) -> None:
    """``synth --volume`` then ``parity`` on the even halves with the clean volumes as targets."""
    torch.manual_seed(0)
    spec = ModelSpec("unet3d", params={"base_channels": 4, "depth": 1})
    ckpt = save_checkpoint(tmp_path / "v.safetensors", build_model(spec), spec)
    runner = CliRunner()
    made = runner.invoke(cli, ["synth", "--volume", str(tmp_path / "d"), "--count", "1", "--size", "32",
                               "40", "--depth", "16"])
    assert made.exit_code == 0, made.output
    args = ["parity", str(ckpt), str(tmp_path / "d" / "even"), "--targets", str(tmp_path / "d" / "clean"),
            "--backends", "torch,ort", "--precisions", "fp32", "--device", "cpu", "--tile", "32", "-q"]
    run = runner.invoke(cli, args)
    assert run.exit_code == 0, run.output  # 0: every fp32 pair within 1e-5
    assert "ort/cpu/fp32" in run.output and "torch/cpu/fp32" in run.output
    synth = runner.invoke(cli, ["parity", str(ckpt), "--synth", "2", "-q"])
    assert synth.exit_code == 2 and "write tomograms with `cryodeploy synth --volume`" in synth.output
