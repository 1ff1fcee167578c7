"""Ensembles (``--model A --model B``): the mean of the members, tiled = whole image, on any backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cryodeploy import Denoiser
from cryodeploy.cli import cli
from cryodeploy.errors import ConfigError
from cryodeploy.imaging.normalize import NormSpec
from cryodeploy.io.mrc import read_micrograph, write_micrograph


def _cnn3(path: Path, seed: int, normalization: NormSpec | None = None) -> Path:
    import torch

    from cryodeploy.models import ModelSpec, build_model
    from cryodeploy.models.checkpoint import save_checkpoint

    torch.manual_seed(seed)
    spec = ModelSpec("cnn3", normalization=normalization or NormSpec())
    return save_checkpoint(path, build_model(spec), spec)


@pytest.fixture(scope="module")
def second(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _cnn3(tmp_path_factory.mktemp("ens") / "cnn3_seed1.safetensors", seed=1)


@pytest.fixture
def image(rng: np.random.Generator) -> np.ndarray:
    return (rng.standard_normal((150, 130)) * 12 + 80).astype(np.float32)


def test_ensemble_is_the_mean_of_its_members(cnn3_checkpoint: Path, second: Path, image: np.ndarray) -> None:
    with (Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch") as a,
          Denoiser.load(str(second), device="cpu", backend="torch") as b,
          Denoiser.load([str(cnn3_checkpoint), str(second)], device="cpu", backend="torch") as ens):
        ya, yb = a(image, tile=64), b(image, tile=64)
        got = ens(image, tile=64, batch=3)
        assert ens.backend.label == "ensemble[torch/cpu/fp32, torch/cpu/fp32]"
        assert [m.path.name for m in ens.members] == ["cnn3.safetensors", "cnn3_seed1.safetensors"]
    mean = (ya.astype(np.float64) + yb) / 2
    assert np.abs(ya - yb).max() > 1e-2 * image.std()  # the members differ: the mean is a real test
    np.testing.assert_allclose(got, mean, rtol=0, atol=2e-5 * np.abs(mean).max())


def test_mixed_geometries_tile_exactly(
    cnn3_checkpoint: Path, unet_checkpoint: Path, image: np.ndarray
) -> None:
    with Denoiser.load([str(cnn3_checkpoint), str(unet_checkpoint)], device="cpu", backend="torch") as ens:
        assert ens.spec.architecture == "unet"  # its radius and stride serve both members
        whole = ens(image, tile=256, batch=1)  # one tile: a whole-image pass
        tiled = ens(image, tile=64, batch=5)
    assert np.abs(tiled - whole).max() <= 1e-5 * np.abs(whole).max()


def test_ort_ensemble_matches_torch(cnn3_checkpoint: Path, second: Path, image: np.ndarray) -> None:
    pytest.importorskip("onnxruntime")
    models = [str(cnn3_checkpoint), str(second)]
    with (Denoiser.load(models, device="cpu", backend="torch") as t,
          Denoiser.load(models, device="cpu", backend="ort", threads=1) as o):
        yt, yo = t(image, tile=64), o(image, tile=64)
        assert o.backend.label == "ensemble[ort/cpu/fp32, ort/cpu/fp32]"
    assert np.abs(yt - yo).max() <= 1e-5 * np.abs(yt).max()


def test_cli_two_models(cnn3_checkpoint: Path, second: Path, tmp_path: Path, image: np.ndarray) -> None:
    src = write_micrograph(tmp_path / "m.mrc", image)
    res = CliRunner().invoke(cli, ["denoise", str(src), "-o", str(tmp_path / "out"), "--model",
                                   str(cnn3_checkpoint), "--model", str(second), "--backend", "torch",
                                   "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    assert "with ensemble[torch/cpu/fp32, torch/cpu/fp32]" in res.output
    with Denoiser.load([str(cnn3_checkpoint), str(second)], device="cpu", backend="torch") as ens:
        expected = ens(image)
    np.testing.assert_allclose(read_micrograph(tmp_path / "out" / "m.mrc").data, expected, rtol=0, atol=1e-4)


def test_members_must_share_the_normalization(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    other = _cnn3(tmp_path / "other.safetensors", seed=2, normalization=NormSpec(low_percentile=5.0))
    with pytest.raises(ConfigError, match=r"ensemble: .*other\.safetensors normalizes .*must share one"):
        Denoiser.load([str(cnn3_checkpoint), str(other)], device="cpu", backend="torch")


def test_cli_ensemble_with_precision_auto_and_tiff(
    cnn3_checkpoint: Path, second: Path, tmp_path: Path, image: np.ndarray
) -> None:
    """--precision auto (each member's default variant: eager fp32 on the CPU) with --format tiff."""
    tifffile = pytest.importorskip("tifffile")
    src = write_micrograph(tmp_path / "m.mrc", image)
    res = CliRunner().invoke(cli, ["denoise", str(src), "-o", str(tmp_path / "out"), "--model",
                                   str(cnn3_checkpoint), "--model", str(second), "--backend", "torch",
                                   "--device", "cpu", "--precision", "auto", "--format", "tiff", "-q"])
    assert res.exit_code == 0, res.output
    assert "with ensemble[torch/cpu/fp32, torch/cpu/fp32]" in res.output
    with Denoiser.load([str(cnn3_checkpoint), str(second)], device="cpu", backend="torch",
                       precision="auto") as ens:
        assert ens.backend.label == "ensemble[torch/cpu/fp32, torch/cpu/fp32]"
        expected = ens(image)
    got = tifffile.imread(tmp_path / "out" / "m.tif")
    assert got.dtype == np.float32 and got.shape == image.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
