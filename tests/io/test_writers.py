"""The output-format registry: one entry per format, unknown names refused with the known ones."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryodeploy.errors import ConfigError
from cryodeploy.inference.jobs import RunConfig
from cryodeploy.io.mrc import read_micrograph
from cryodeploy.io.writers import FORMATS, output_format


def test_mrc_writer_round_trips(tmp_path: Path) -> None:
    fmt = output_format("mrc")
    data = np.random.default_rng(0).normal(size=(40, 48)).astype(np.float32)
    path = fmt.write(tmp_path / "a.mrc", data, None, "float32", (), "test")
    assert path.suffix == ".mrc" and fmt.suffix is None  # MRC keeps the input's .mrc or .mrcs
    np.testing.assert_array_equal(read_micrograph(path).data, data)


def test_unknown_format_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="output format 'gif' unknown, expected one of mrc"):
        output_format("gif")
    with pytest.raises(ConfigError, match="output format"):
        RunConfig(output_format="gif")
    assert set(FORMATS) >= {"mrc"} and RunConfig().output_format == "mrc"


def test_tiff_keeps_values_stack_pages_and_pixel_size(tmp_path: Path) -> None:
    import tifffile

    from cryodeploy.io.mrc import MicrographHeader

    data = np.random.default_rng(1).normal(size=(3, 40, 48)).astype(np.float32)
    header = MicrographHeader(shape=data.shape, mode=2, voxel_size=(1.25, 1.25, 1.25), origin=(0, 0, 0))
    path = output_format("tiff").write(tmp_path / "a.tif", data, header, "float32", (), "denoised")
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 3
        np.testing.assert_array_equal(tif.asarray(), data)  # exact: float32 pixels
        page = tif.pages[0]
        assert page.tags["ResolutionUnit"].value == 3  # centimetre
        num, den = page.tags["XResolution"].value
        assert abs(num / den - 1e8 / 1.25) < 1e-3 * 1e8 / 1.25
        assert '"pixel_size_angstrom": 1.25' in page.description and '"label": "denoised"' in page.description
    half = output_format("tiff").write(tmp_path / "h.tif", data[0], None, "float16", (), None)
    assert tifffile.imread(half).dtype == np.float16
    np.testing.assert_allclose(tifffile.imread(half), data[0], rtol=1e-3, atol=1e-3)


def test_8bit_contrast_mapping_is_the_documented_one(tmp_path: Path) -> None:
    from PIL import Image

    from cryodeploy.io.images import to_8bit

    ramp = np.linspace(0.0, 1.0, 201 * 10, dtype=np.float32).reshape(201, 10)  # 2010 distinct values
    ramp[0, 0], ramp[-1, -1] = -1e6, 1e6  # one dead and one hot pixel must not set the contrast
    lo, hi = np.percentile(ramp.astype(np.float64), [0.5, 99.5])
    expected = np.round(np.clip((ramp - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    assert np.array_equal(to_8bit(ramp), expected)
    assert expected.min() == 0 and expected.max() == 255 and 120 <= expected[100, 5] <= 135
    png = output_format("png").write(tmp_path / "a.png", ramp, None, "float32", (), None)
    assert np.array_equal(np.asarray(Image.open(png)), expected)  # lossless
    jpg = output_format("jpg").write(tmp_path / "a.jpg", ramp, None, "float32", (), None)
    with Image.open(jpg) as im:
        assert im.format == "JPEG" and im.mode == "L"
        assert np.abs(np.asarray(im).astype(int) - expected).mean() < 2.0
    assert np.array_equal(to_8bit(np.full((8, 8), 3.0)), np.zeros((8, 8), np.uint8))


def test_8bit_formats_refuse_stacks_and_bad_pixels(tmp_path: Path) -> None:
    from cryodeploy.errors import OutputError

    with pytest.raises(OutputError, match=r"s.png: found a stack of 2 frames, expected one 2-D image for"):
        output_format("png").write(tmp_path / "s.png", np.zeros((2, 8, 8)), None, "float32", (), None)
    bad = np.zeros((8, 8), np.float32)
    bad[1, 1] = np.nan
    for name, ext in (("png", "png"), ("jpg", "jpg"), ("tiff", "tif")):
        with pytest.raises(OutputError, match="NaN/Inf"):
            output_format(name).write(tmp_path / f"b.{ext}", bad, None, "float32", (), None)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing partial left
