"""Volumes (tomograms): the kind rule, reading and validating, exact header round trips (real MRC files)."""

from __future__ import annotations

import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryodeploy.errors import InputError, OutputError
from cryodeploy.io.mrc import read_micrograph
from cryodeploy.io.volumes import mrc_kind, read_volume, read_volume_header, write_volume


def _write(
    path: Path,
    data: np.ndarray,
    ispg: int = 1,
    mz: int | None = None,
    *,
    voxel=(2.5, 2.5, 3.25),
    origin=(12.5, -7.25, 300.0),
    nstart=(4, -2, 9),
    label: str = "tomo",
) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with mrcfile.new(path, overwrite=True) as mrc:
            mrc.set_data(data)
            mrc.header.ispg = ispg
            mrc.header.mz = data.shape[0] if mz is None else mz
            mrc.voxel_size = voxel
            mrc.header.origin.x, mrc.header.origin.y, mrc.header.origin.z = origin
            mrc.header.nxstart, mrc.header.nystart, mrc.header.nzstart = nstart
            mrc.header.nlabl = 0  # not mrcfile's time-stamped label
            mrc.add_label(label)
    return path


def _volume(rng: np.random.Generator, shape=(20, 40, 36)) -> np.ndarray:
    return (rng.standard_normal(shape) * 3 + 10).astype(np.float32)


@pytest.mark.parametrize(
    ("name", "nz", "ispg", "mz", "kind"),
    [
        ("a.mrc", 1, 0, 1, "image"),
        ("a.rec", 1, 1, 1, "image"),
        ("a.mrcs", 40, 1, 40, "stack"),  # the extension wins over the header
        ("a.rec", 40, 0, 1, "volume"),  # IMOD's tomogram extension wins too
        ("a.mrc", 40, 401, 40, "volume-stack"),
        ("a.mrc", 40, 1, 40, "volume"),
        ("a.map", 40, 230, 40, "volume"),
        ("a.mrc", 40, 0, 1, "stack"),
        ("a.mrc", 40, 0, 20, "stack"),
        ("a.mrc", 40, 0, 40, "ambiguous"),  # RELION 5 tomograms and maps
        ("a.mrc", 40, 300, 40, "unknown"),
        ("A.REC", 40, 0, 1, "volume"),
    ],
)
def test_kind_rule(name: str, nz: int, ispg: int, mz: int, kind: str) -> None:
    assert mrc_kind(name, nz, ispg, mz) == kind


def test_volume_reads_with_voxel_size_origin_and_labels_and_writes_them_back_exactly(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    data = _volume(rng)
    src = _write(tmp_path / "t.mrc", data)
    vol = read_volume(src)
    h = vol.header
    assert np.array_equal(vol.data, data) and vol.data.dtype == np.float32
    assert h.shape == (20, 40, 36) and h.kind == "volume" and h.ispg == 1
    assert h.voxel_size == (2.5, 2.5, 3.25) and h.origin == (12.5, -7.25, 300.0) and h.nstart == (4, -2, 9)
    assert h.labels == ("tomo",)
    out = write_volume(tmp_path / "out.mrc", vol.data * 2, h, protect=(src,), label="denoised")
    again = read_volume(out)
    assert np.array_equal(again.data, data * 2)
    g = again.header
    assert (g.voxel_size, g.origin, g.nstart, g.ispg) == (h.voxel_size, h.origin, h.nstart, 1)
    assert g.labels == ("tomo", "denoised")
    with mrcfile.open(out) as mrc:  # header statistics of the written data, a volume by mrcfile's test
        assert mrc.is_volume() and int(mrc.header.mz) == 20
        assert float(mrc.header.dmin) == float(data.min() * 2) and float(mrc.header.dmax) == float(
            data.max() * 2
        )
        assert float(mrc.header.dmean) == pytest.approx(float(np.mean(data * 2, dtype=np.float64)), rel=1e-6)
        assert float(mrc.header.rms) == pytest.approx(float(np.std(data * 2, dtype=np.float64)), rel=1e-5)


def test_ambiguous_file_is_a_volume_here_and_still_a_stack_for_micrographs(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    data = _volume(rng, (16, 32, 32))
    p = _write(tmp_path / "relion.mrc", data, ispg=0)  # RELION 5: space group 0, mz = nz
    vol = read_volume(p)
    assert vol.header.kind == "ambiguous" and np.array_equal(vol.data, data)
    assert read_micrograph(p).header.n_frames == 16  # micrograph behaviour unchanged
    out = write_volume(tmp_path / "o.mrc", vol.data, vol.header)
    assert read_volume_header(out).kind == "volume" and read_volume_header(out).ispg == 1


def test_rec_with_stack_header_is_a_volume(tmp_path: Path, rng: np.random.Generator) -> None:
    assert read_volume(_write(tmp_path / "t.rec", _volume(rng), ispg=0, mz=1)).header.kind == "volume"


def test_micrograph_reader_refusal_of_volumes_is_unchanged(tmp_path: Path, rng: np.random.Generator) -> None:
    p = _write(tmp_path / "v.mrc", _volume(rng))
    with pytest.raises(InputError, match=r"found a 3-D volume \(36x40x20, space group 1\), expected a 2-D"):
        read_micrograph(p)


@pytest.mark.parametrize(
    ("name", "shape", "ispg", "mz", "message"),
    [
        (
            "s.mrcs",
            (20, 32, 32),
            1,
            None,
            "found an image stack (32x32x20, the .mrcs extension), expected a 3-D volume (space group 1-230, "
            "space group 0 with mz = nz, or a .rec file)",
        ),
        (
            "s.mrc",
            (20, 32, 32),
            0,
            1,
            "found an image stack (32x32x20, space group 0 with mz 1), expected a 3-D volume "
            "(space group 1-230, space group 0 with mz = nz, or a .rec file)",
        ),
        (
            "i.mrc",
            (1, 32, 32),
            1,
            None,
            "found a 2-D image (32x32), expected a 3-D volume of at least 16 sections",
        ),
        ("thin.mrc", (8, 32, 32), 1, None, "found a volume of 8 sections (32x32x8), expected at least 16"),
        (
            "vs.mrc",
            (20, 32, 32),
            401,
            10,
            "found a stack of volumes (32x32x20, space group 401), expected one 3-D volume",
        ),
        (
            "sg.mrc",
            (20, 32, 32),
            300,
            None,
            "found space group 300, expected 0 (with mz = nz) or 1-230 for a 3-D volume",
        ),
    ],
)
def test_not_a_volume_is_refused_saying_why(
    tmp_path: Path, rng: np.random.Generator, name: str, shape, ispg: int, mz: int | None, message: str
) -> None:
    p = _write(tmp_path / name, _volume(rng, shape), ispg=ispg, mz=mz)
    with pytest.raises(InputError) as err:
        read_volume(p)
    assert str(err.value) == f"{p}: {message}"


def test_bad_voxels_are_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    data = _volume(rng)
    data[7, 3, 3] = np.nan
    data[9, 1, 1] = np.inf
    with pytest.raises(InputError, match=r"nan.mrc: found 2 NaN/Inf values \(first in section 7\)"):
        read_volume(_write(tmp_path / "nan.mrc", data))
    with pytest.raises(InputError, match=r"c.mrc: volume is constant \(3\), expected non-zero variance"):
        read_volume(_write(tmp_path / "c.mrc", np.full((16, 32, 32), 3, np.float32)))
    with pytest.raises(InputError, match=r"small.mrc: volume is 20x40x16 voxels, expected at least 32x32x16"):
        read_volume(_write(tmp_path / "small.mrc", _volume(rng, (16, 40, 20))))


def test_truncated_and_missing_files(tmp_path: Path, rng: np.random.Generator) -> None:
    p = _write(tmp_path / "t.mrc", _volume(rng))
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"t.mrc: truncated file, found \d+ bytes, expected \d+"):
        read_volume(p)
    with pytest.raises(InputError, match=r"none.mrc: no such file"):
        read_volume(tmp_path / "none.mrc")


def test_write_refuses_bad_data_and_inputs_and_leaves_no_file(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    src = _write(tmp_path / "in.mrc", _volume(rng))
    with pytest.raises(OutputError, match="refusing to overwrite an input file"):
        write_volume(src, _volume(rng), protect=(src,))
    with pytest.raises(OutputError, match=r"expected a 3-D volume \[nz, ny, nx\]"):
        write_volume(tmp_path / "flat.mrc", np.zeros((32, 32), np.float32))
    with pytest.raises(OutputError, match="values beyond the float16 range"):
        write_volume(tmp_path / "big.mrc", np.full((16, 32, 32), 1e6, np.float32), dtype="float16")
    assert sorted(q.name for q in tmp_path.iterdir()) == ["in.mrc"]
    half = write_volume(tmp_path / "h.mrc", _volume(rng), dtype="float16")
    with mrcfile.open(half) as mrc:
        assert int(mrc.header.mode) == 12
