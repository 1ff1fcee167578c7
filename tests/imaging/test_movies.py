"""Movies: frame sums streamed one frame at a time, even/odd Noise2Noise stores, ``denoise --movies``."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from cryodeploy.cli import cli
from cryodeploy.errors import InputError
from cryodeploy.imaging.filters import fourier_bin
from cryodeploy.imaging.movies import MovieConfig, movie_micrograph, sum_movie
from cryodeploy.io.mrc import MicrographHeader, read_micrograph, write_micrograph


def _frames(n: int, shape: tuple[int, int] = (96, 80), seed: int = 0) -> np.ndarray:
    """``n`` frames: one smooth signal plus independent Poisson-like noise per frame."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    signal = 2.0 + np.sin(y / 7.0) * np.cos(x / 5.0)
    return (signal + rng.normal(scale=1.0, size=(n, *shape))).astype(np.float32)


def _mrcs(path: Path, frames: np.ndarray, px: float = 0.8) -> Path:
    header = MicrographHeader(shape=frames.shape, mode=2, voxel_size=(px, px, px), origin=(0, 0, 0))
    return write_micrograph(path, frames, header)


def test_even_odd_sums_of_mrc_and_tiff_movies(tmp_path: Path) -> None:
    frames = _frames(5)
    even, odd = frames[0::2].astype(np.float64).sum(0), frames[1::2].astype(np.float64).sum(0)
    tifffile.imwrite(tmp_path / "m.tif", frames, photometric="minisblack")  # one page per frame
    for path in (_mrcs(tmp_path / "m.mrcs", frames), tmp_path / "m.tif"):
        sums = sum_movie(path)
        assert sums.frames == 5
        np.testing.assert_allclose(sums.even, even, rtol=1e-6)
        np.testing.assert_allclose(sums.odd, odd, rtol=1e-6)
        np.testing.assert_allclose(sums.total, even + odd, rtol=1e-6)
    assert sum_movie(tmp_path / "m.mrcs").pixel_size == pytest.approx(0.8)
    assert sum_movie(tmp_path / "m.tif").pixel_size == 0.0  # unknown from a plain TIFF

    gain = np.random.default_rng(3).uniform(0.9, 1.1, size=frames.shape[1:]).astype(np.float32)
    write_micrograph(tmp_path / "gain.mrc", gain)
    binned = sum_movie(tmp_path / "m.mrcs", MovieConfig(gain=tmp_path / "gain.mrc", bin=2))
    np.testing.assert_allclose(binned.even, fourier_bin(even * gain, 2), rtol=1e-5, atol=1e-5)
    assert binned.even.shape == (48, 40) and binned.pixel_size == pytest.approx(1.6)


def test_memory_is_a_few_frames_not_the_movie(tmp_path: Path) -> None:
    frames = _frames(40, (256, 256))
    path = _mrcs(tmp_path / "long.mrcs", frames)
    frame_bytes = 256 * 256 * 4
    tracemalloc.start()
    sum_movie(path)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 8 * frame_bytes, f"peak {peak / frame_bytes:.1f} frames of a 40-frame movie"


def test_bad_movies_are_one_line_errors(tmp_path: Path) -> None:
    one = _mrcs(tmp_path / "one.mrc", _frames(1)[0])
    with pytest.raises(InputError, match=r"one\.mrc: found 1 frame"):
        sum_movie(one)
    movie = _mrcs(tmp_path / "m.mrcs", _frames(3))
    write_micrograph(tmp_path / "gain.mrc", np.ones((10, 10), np.float32))
    with pytest.raises(InputError, match=r"gain.mrc: gain reference is 10x10, expected the 80x96 frames"):
        sum_movie(movie, MovieConfig(gain=tmp_path / "gain.mrc"))
    (tmp_path / "x.eer").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match="EER movies are not supported"):
        sum_movie(tmp_path / "x.eer")
    with pytest.raises(InputError, match="not a readable movie"):
        (tmp_path / "bad.tif").write_bytes(b"not a tiff" * 10)
        sum_movie(tmp_path / "bad.tif")


def test_preprocess_movies_makes_noise2noise_pairs(tmp_path: Path) -> None:
    from cryodeploy.training.store import PatchStore

    (tmp_path / "in").mkdir()
    paths = [_mrcs(tmp_path / "in" / f"mov{i}.mrcs", _frames(6, (128, 128), seed=i)) for i in range(3)]
    res = CliRunner().invoke(cli, ["preprocess", *map(str, paths), "-o", str(tmp_path / "store"), "--movies",
                                   "--patch", "64", "--test-fraction", "0", "--bin", "1", "-q"])
    assert res.exit_code == 0, res.output
    store = PatchStore(tmp_path / "store")
    assert store.count("train") == 3 * 4  # 128x128 sums cut into 64x64 patches
    inp, tgt = store.read("train", np.arange(12), "input"), store.read("train", np.arange(12), "target")
    corr = np.corrcoef(inp.ravel(), tgt.ravel())[0, 1]
    assert 0.3 < corr < 0.99  # one signal, independent noise: a Noise2Noise pair
    assert sorted(p.name for p in (tmp_path / "store" / "sums" / "odd").iterdir()) == [
        "mov0.mrc", "mov1.mrc", "mov2.mrc"]
    again = CliRunner().invoke(cli, ["preprocess", str(paths[0]), "-o", str(tmp_path / "store"), "--movies"])
    assert again.exit_code == 1 and "a patch store already exists here" in again.output


def test_denoise_movies_sums_first(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    from cryodeploy import Denoiser

    frames = _frames(4)
    tifffile.imwrite(tmp_path / "mov.tif", frames, photometric="minisblack")
    res = CliRunner().invoke(cli, ["denoise", str(tmp_path / "mov.tif"), "-o", str(tmp_path / "out"),
                                   "--movies", "--model", str(cnn3_checkpoint), "--backend", "torch",
                                   "--device", "cpu", "-q"])
    assert res.exit_code == 0, res.output
    with Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch") as d:
        expected = d(movie_micrograph(tmp_path / "mov.tif").data)
    np.testing.assert_allclose(read_micrograph(tmp_path / "out" / "mov.mrc").data, expected, atol=1e-4)


def test_folders_and_globs_of_tiff_movies(cnn3_checkpoint: Path, tmp_path: Path) -> None:
    """denoise --movies and preprocess --movies take a folder (or a glob) of tifffile-written movies
    as they take MRC ones; without --movies a folder still gives only MRC files."""
    from cryodeploy import Denoiser
    from cryodeploy.training.store import PatchStore

    folder = tmp_path / "movies"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"mov{i}.tif", _frames(4, (128, 128), seed=i), photometric="minisblack")
    _mrcs(folder / "mov2.mrcs", _frames(4, (128, 128), seed=2))
    model = ["--model", str(cnn3_checkpoint), "--backend", "torch", "--device", "cpu", "-q"]
    for given, out in ((str(folder), "out"), (str(folder / "*.tif"), "glob")):
        res = CliRunner().invoke(cli, ["denoise", given, "-o", str(tmp_path / out), "--movies", *model])
        assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mov0.mrc", "mov1.mrc", "mov2.mrc"]
    assert sorted(p.name for p in (tmp_path / "glob").iterdir()) == ["mov0.mrc", "mov1.mrc"]
    with Denoiser.load(str(cnn3_checkpoint), device="cpu", backend="torch") as d:
        expected = d(movie_micrograph(folder / "mov1.tif").data)
    np.testing.assert_allclose(read_micrograph(tmp_path / "out" / "mov1.mrc").data, expected, atol=1e-4)
    plain = CliRunner().invoke(cli, ["denoise", str(folder), "-o", str(tmp_path / "plain"), *model])
    assert plain.exit_code == 0, plain.output
    assert sorted(p.name for p in (tmp_path / "plain").iterdir()) == ["mov2.mrcs"]

    res = CliRunner().invoke(cli, ["preprocess", str(folder), "-o", str(tmp_path / "store"), "--movies",
                                   "--patch", "64", "--test-fraction", "0", "-q"])
    assert res.exit_code == 0, res.output
    assert PatchStore(tmp_path / "store").count("train") == 3 * 4  # three 128x128 sums, 64x64 patches
