"""``preprocess --thin``: Noise2Noise pairs from binomially thinned halves of counted micrographs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import smooth_image

from cryodeploy.cli import cli
from cryodeploy.errors import InputError
from cryodeploy.io.mrc import read_micrograph, write_micrograph
from cryodeploy.training.preprocess import PreprocessConfig, preprocess
from cryodeploy.training.store import MANIFEST

SHAPE = (160, 200)


@pytest.fixture(scope="module")
def counted(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("counted")
    rng = np.random.default_rng(7)
    images = [rng.poisson(20 + 4 * smooth_image(rng, SHAPE)).astype(np.float32) for _ in range(3)]
    return [write_micrograph(d / f"c{i}.mrc", image) for i, image in enumerate(images)]


def _cfg(**kw: object) -> PreprocessConfig:
    base: dict[str, object] = {"patch": 64, "stride": 48, "test_fraction": 0.0, "seed": 3, "targets": "thin"}
    return PreprocessConfig(**{**base, **kw})  # type: ignore[arg-type]


def test_thinned_halves_sum_to_the_counts(tmp_path: Path, counted: list[Path]) -> None:
    store = preprocess(counted, tmp_path / "s", _cfg(), quiet=True)
    assert store.manifest["targets"] == "thin" and store.manifest["noise"] is None
    src = store.manifest["sources"][0]
    assert (src["gain"], src["gain_from"]) == (1.0, "integer")
    idx = range(src["start"], src["start"] + src["count"])
    a = store.read(src["split"], idx) * src["scale"] + src["center"]
    b = store.read(src["split"], idx, "target") * src["scale"] + src["center"]
    counts = read_micrograph(counted[0]).data
    cut = np.stack([counts[y:y + 64, x:x + 64] for y in (0, 48, 96) for x in (0, 48, 96)])
    np.testing.assert_allclose(a + b, cut, atol=2e-3)  # float32 normalization round trip
    assert np.abs(a - np.round(a)).max() < 2e-3  # each half is whole counts
    assert a.mean() == pytest.approx(cut.mean() / 2, rel=0.02)
    noise_a, noise_b = a - cut / 2, b - cut / 2  # = -(noise_a): the halves' noise, given the sum
    assert np.corrcoef(noise_a.ravel(), noise_b.ravel())[0, 1] == pytest.approx(-1.0)


def test_thin_is_deterministic_per_seed_and_any_workers(tmp_path: Path, counted: list[Path]) -> None:
    preprocess(counted, tmp_path / "a", _cfg(workers=0), quiet=True)
    preprocess(counted, tmp_path / "b", _cfg(workers=3), quiet=True)
    preprocess(counted, tmp_path / "c", _cfg(seed=4), quiet=True)
    for name in ("train_input.bin", "train_target.bin", MANIFEST):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    first, other = ((tmp_path / r / "train_input.bin").read_bytes() for r in ("a", "c"))
    assert first != other


def test_thin_refuses_normalized_micrographs_and_cli(tmp_path: Path, counted: list[Path]) -> None:
    rng = np.random.default_rng(8)
    normalized = write_micrograph(tmp_path / "norm.mrc", smooth_image(rng, SHAPE))
    with pytest.raises(InputError, match=f"^{normalized}: pixels range .* expected non-negative counts"):
        preprocess([normalized], tmp_path / "s", _cfg(), quiet=True)
    assert not (tmp_path / "s" / MANIFEST).exists()
    runner = CliRunner()
    res = runner.invoke(cli, ["preprocess", str(counted[0]), "-o", str(tmp_path / "t"), "--thin", "--patch",
                              "64", "-q"])
    assert res.exit_code == 0, res.output
    assert "train 6, test 0 patches of 64x64 from 1 micrographs" in res.output  # 2 x 3 at stride 64
    res = runner.invoke(cli, ["preprocess", str(normalized), "-o", str(tmp_path / "u"), "--thin", "--patch",
                              "64", "-q"])
    assert res.exit_code != 0 and res.output.startswith(f"error: {normalized}: pixels range")
    assert len(res.output.splitlines()) == 1 and not (tmp_path / "u" / MANIFEST).exists()
    res = runner.invoke(cli, ["preprocess", str(counted[0]), "-o", str(tmp_path / "v"), "--thin",
                              "--noise2noise"])
    assert res.exit_code != 0 and "--thin takes no --pairs, --noise2noise or noise options" in res.output
